"""Torch modules of the pipeline: the channel-adaptive HyperFree / HyperVision model and its registry."""

from model.hyperfree import HyperFree, LoadReport, ModelConfig, extract_features, load_checkpoint
from model.registry import create_model, get_config, list_models

__all__ = [
    "HyperFree",
    "LoadReport",
    "ModelConfig",
    "create_model",
    "extract_features",
    "get_config",
    "list_models",
    "load_checkpoint",
]
