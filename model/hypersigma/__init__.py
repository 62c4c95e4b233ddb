"""HyperSIGMA (spatial + spectral ViTs with sparse sampling attention, fused by a spectral gate): the backbone,
its registry layouts, the released-checkpoint loader, the input contract and the masked autoencoders that
pretrain it."""

from model.hypersigma.checkpoint import (
    RELEASED_CHECKPOINTS,
    PretrainedLoadReport,
    load_pretrained,
    load_released,
    read_released,
)
from model.hypersigma.layouts import FAMILY_HYPERSIGMA, LAYOUTS
from model.hypersigma.mae import (
    MAEConfig,
    MAEOutput,
    MaskedAutoencoder,
    create_mae,
    describe_input,
    encoder_state_dict,
    mae_config,
    mae_step,
    released_state_dict,
    save_released,
)
from model.hypersigma.model import HyperSigma, HyperSigmaConfig, HyperSigmaFeatures
from model.hypersigma.preprocess import describe_contract, extract_features, prepare_cube
from model.hypersigma.vit import SampleAttention, SpatialViT, SpectralViT

__all__ = [
    "FAMILY_HYPERSIGMA",
    "LAYOUTS",
    "RELEASED_CHECKPOINTS",
    "HyperSigma",
    "HyperSigmaConfig",
    "HyperSigmaFeatures",
    "MAEConfig",
    "MAEOutput",
    "MaskedAutoencoder",
    "PretrainedLoadReport",
    "SampleAttention",
    "SpatialViT",
    "SpectralViT",
    "create_mae",
    "describe_contract",
    "describe_input",
    "encoder_state_dict",
    "extract_features",
    "load_pretrained",
    "load_released",
    "mae_config",
    "mae_step",
    "prepare_cube",
    "read_released",
    "released_state_dict",
    "save_released",
]
