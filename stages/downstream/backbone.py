"""The frozen backbone as a feature function: what the tracker and any in-the-loop feature computation call."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from model.hyperfree import HyperFree
from model.preprocess import DEFAULT_CONTRACT, extract_features
from stages.downstream.tracker import FeatureFn
from stages.training.device import autocast


def freeze(module: nn.Module) -> nn.Module:
    """Eval mode and no trainable parameter: nothing downstream can update it."""
    module.eval()
    module.requires_grad_(False)
    return module


def backbone_feature_fn(model: HyperFree, wavelengths_nm: Sequence[float] | np.ndarray,
                        gsd_m: float = 1.0, contract: str = DEFAULT_CONTRACT) -> FeatureFn:
    """Features of an (H, W, C) cube or crop through the frozen backbone (preprocessing `contract`, no gradient,
    bf16 autocast on CUDA), as float32 tensors on the model's device."""
    freeze(model)
    wavelengths = np.asarray(wavelengths_nm, dtype=np.float64)

    def features(cube: np.ndarray) -> list[torch.Tensor]:
        with torch.no_grad(), autocast(model.device):
            return [f.float() for f in extract_features(model, cube, wavelengths, gsd_m, contract)]

    return features
