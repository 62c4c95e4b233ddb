"""HyperSIGMA (spatial + spectral ViTs with sparse sampling attention, fused by a spectral gate): the backbone,
its registry layouts, the released-checkpoint loader and the masked autoencoders that pretrain it."""

from model.hypersigma.layouts import FAMILY_HYPERSIGMA, LAYOUTS
from model.hypersigma.model import HyperSigma, HyperSigmaConfig, HyperSigmaFeatures
from model.hypersigma.vit import SampleAttention, SpatialViT, SpectralViT

__all__ = [
    "FAMILY_HYPERSIGMA",
    "LAYOUTS",
    "HyperSigma",
    "HyperSigmaConfig",
    "HyperSigmaFeatures",
    "SampleAttention",
    "SpatialViT",
    "SpectralViT",
]
