"""How a catalogued cube of any band count becomes HyperSIGMA's input, for frozen-feature extraction.

The release has no universal input rule (PCA to 20-30 components for classification and segmentation, per-band
standardisation for detection, min-max for change detection; raw / 4000 in pretraining), and its spatial patch
embedding takes a fixed band count. This contract (``hypersigma``, recorded with `describe_contract`) is ours:

- values: per-image min-max to [0, 1] (the range the release's pretraining saw, without a sensor-specific divisor);
- bands: to the model's `in_chans` along the band axis: contiguous-group averages when there are more bands
  (the spectral branch's own pooling rule), linear interpolation when there are fewer;
- frame: longest side resized to `img_size` (bilinear, antialiased), zeros padded bottom/right, as the
  HyperFree-family contract does, so masks and features map back to the cube the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from model.hypersigma.model import HyperSigma, HyperSigmaConfig
from model.preprocess import preprocess_shape

CONTRACT = "hypersigma"
CONTRACT_VERSION = "1"


@dataclass(frozen=True)
class PreparedInput:
    """A cube in HyperSIGMA's input frame: image (1, in_chans, img, img), (h, w) after the resize, (H, W) given."""

    image: torch.Tensor
    input_size: tuple[int, int]
    original_size: tuple[int, int]


def describe_contract(config: HyperSigmaConfig) -> dict[str, Any]:
    """What an artifact records about its HyperSIGMA preprocessing."""
    return {"name": CONTRACT, "version": CONTRACT_VERSION, "parameters": {
        "value_range": "per-image min-max to [0, 1] in float32",
        "bands": f"to {config.in_chans}: contiguous-group means when more, linear interpolation when fewer",
        "resize": f"longest side to {config.img_size}: bilinear, align_corners=False, antialias",
        "pad": f"zeros bottom/right to {config.img_size} x {config.img_size}",
    }}


def _bands(x: torch.Tensor, bands: int) -> torch.Tensor:
    """(1, C, H, W) -> (1, bands, H, W) along the band axis."""
    c, h, w = x.shape[1:]
    if c == bands:
        return x
    seq = x.flatten(2).transpose(1, 2)  # 1, H*W, C
    seq = (F.adaptive_avg_pool1d(seq, bands) if c > bands
           else F.interpolate(seq, size=bands, mode="linear", align_corners=True))
    return seq.transpose(1, 2).reshape(1, bands, h, w)


def prepare_cube(cube_hwc: np.ndarray | torch.Tensor, config: HyperSigmaConfig,
                 device: torch.device | str = "cpu") -> PreparedInput:
    """One cube (H, W, C), any numeric dtype and band count, as the model's input per the ``hypersigma`` contract."""
    if cube_hwc.ndim != 3:
        raise ValueError(f"Expected an (H, W, C) cube, got shape {tuple(cube_hwc.shape)}.")
    x = torch.as_tensor(cube_hwc, device=device).permute(2, 0, 1).unsqueeze(0).float()
    low, high = x.min(), x.max()
    if not bool(high > low):
        raise ValueError(f"Cannot normalise the cube: its values are constant or not finite (min {low.item()}, "
                         f"max {high.item()}); fill NaN/inf values and check the cube is not blank.")
    x = _bands((x - low) / (high - low), config.in_chans)
    original = (int(x.shape[-2]), int(x.shape[-1]))
    target = preprocess_shape(*original, config.img_size)
    x = F.interpolate(x, target, mode="bilinear", align_corners=False, antialias=True)
    x = F.pad(x, (0, config.img_size - target[1], 0, config.img_size - target[0]))
    return PreparedInput(image=x, input_size=target, original_size=original)


@torch.no_grad()
def extract_features(model: HyperSigma, cube_hwc: np.ndarray | torch.Tensor) -> list[torch.Tensor]:
    """The fused multi-scale maps (1, fused_dim, h_k, w_k), finest first, of one cube under the contract."""
    prepared = prepare_cube(cube_hwc, model.config, device=model.device)
    return model.forward_features(prepared.image.to(model.spec_encoder.pos_embed.dtype))
