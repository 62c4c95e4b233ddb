"""The frozen backbone as a feature function: what the tracker and any in-the-loop feature computation call."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from model.preprocess import DEFAULT_CONTRACT
from model.registry import FAMILY_HYPERFREE
from stages.downstream.adapters import ADAPTERS, ExtractFn
from stages.downstream.tracker import FeatureFn
from stages.training.device import autocast


def freeze(module: nn.Module) -> nn.Module:
    """Eval mode and no trainable parameter: nothing downstream can update it."""
    module.eval()
    module.requires_grad_(False)
    return module


def backbone_feature_fn(model: nn.Module, wavelengths_nm: Sequence[float] | np.ndarray,
                        gsd_m: float = 1.0, contract: str = DEFAULT_CONTRACT, extract: ExtractFn | None = None
                        ) -> FeatureFn:
    """Features of an (H, W, C) cube or crop through the frozen backbone (preprocessing `contract`, no gradient,
    bf16 autocast on CUDA), as float32 tensors on the model's device. `extract` is the family adapter's (None: the
    HyperFree family's)."""
    freeze(model)
    wavelengths = np.asarray(wavelengths_nm, dtype=np.float64)
    run = extract or ADAPTERS.get(FAMILY_HYPERFREE).extract
    device = next(model.parameters()).device

    def features(cube: np.ndarray) -> list[torch.Tensor]:
        with torch.no_grad(), autocast(device):
            return [f.float() for f in run(model, cube, wavelengths, gsd_m, contract)]

    return features
