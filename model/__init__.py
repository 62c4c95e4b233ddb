"""Torch modules of the pipeline: the channel-adaptive HyperFree / HyperVision model, its registry and the one
preprocessing contract."""

import model.hypersigma  # noqa: F401  (registers the HyperSIGMA layouts)
import model.layouts  # noqa: F401  (registers the HyperFree-family layouts)
from model.hyperfree import HyperFree, LoadReport, ModelConfig, load_checkpoint
from model.preprocess import CONTRACTS, describe, extract_features, prepare, prepare_batch
from model.registry import create_model, feature_info, get_config, list_models

__all__ = [
    "CONTRACTS",
    "HyperFree",
    "LoadReport",
    "ModelConfig",
    "create_model",
    "describe",
    "extract_features",
    "feature_info",
    "get_config",
    "list_models",
    "load_checkpoint",
    "prepare",
    "prepare_batch",
]
