"""The preprocessing contract: how a cube becomes the encoder's input, one implementation for every stage.

A contract is named and versioned; every artifact that depends on it records `describe(contract)`. Two exist:

- ``released`` (the default; what the released HyperVision checkpoints were fed): the reader's per-image min-max
  to [0, 255] (float32 arithmetic in the reader's order), then the predictor's steps: bilinear antialiased resize
  of the longest side to the model's input size, division by the maximum, zero padding bottom/right. The GSD
  (m/pixel) reaches the encoder as given, as `HyperVision_Predictor.set_image(..., GSD=...)` passes it.
- ``crop_max``: no offset removal; the image (or pretraining crop) as given is resized and divided by its own
  maximum (HyperFree's predictor, and this pipeline's pretraining before the contract existed). The GSD is
  rescaled to the resized image as HyperFree's scripts do: GSD * max(H, W) / img_size.

Both use every wavelength-matched band at inference (the encoder's deterministic path). Pretraining crops go
through `prepare_batch`, which applies the same per-image steps to each crop's valid window.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from model.hyperfree import HyperFree

CONTRACTS: tuple[str, ...] = ("released", "crop_max")
"""Names accepted wherever a preprocessing contract is asked for."""

DEFAULT_CONTRACT = "released"
CONTRACT_VERSION = "1"
"""Bumped whenever a contract's arithmetic changes, so artifacts that record it are recomputed."""

_RESIZE = "longest side to the model's img_size: bilinear, align_corners=False, antialias"
_PARAMETERS: dict[str, dict[str, Any]] = {
    "released": {
        "value_range": "per-image min-max to [0, 255] in float32: 255 * (x - min) / (max - min)",
        "resize": _RESIZE,
        "scale": "divide by the maximum after the resize",
        "pad": "zeros bottom/right to img_size x img_size",
        "gsd": "as given (m/pixel), as the released predictor passes it",
        "bands": "every wavelength-matched band (deterministic inference path)",
        "crops": "each pretraining crop's valid window is one image; crops scale by img_size / crop side",
    },
    "crop_max": {
        "value_range": "as stored (no offset removal)",
        "resize": _RESIZE,
        "scale": "divide by the maximum after the resize",
        "pad": "zeros bottom/right to img_size x img_size",
        "gsd": "GSD * max(H, W) / img_size (HyperFree's scripts)",
        "bands": "every wavelength-matched band (deterministic inference path)",
        "crops": "each pretraining crop's valid window is one image; crops scale by img_size / crop side",
    },
}


def check_contract(contract: str) -> str:
    """`contract` if it names a contract, else a ValueError that lists the names."""
    if contract not in CONTRACTS:
        raise ValueError(f"Unknown preprocessing contract {contract!r}; choose one of {list(CONTRACTS)} "
                         "('released' for the released HyperVision checkpoints).")
    return contract


def describe(contract: str) -> dict[str, Any]:
    """What an artifact records about its preprocessing: name, version and the parameters in words."""
    return {"name": check_contract(contract), "version": CONTRACT_VERSION, "parameters": dict(_PARAMETERS[contract])}


@dataclass(frozen=True)
class PreparedCube:
    """A cube in the model's input frame, with the sizes needed to map prompts and masks back."""

    image: torch.Tensor
    """(1, C, img_size, img_size) float32: normalised per the contract, resized, zero-padded bottom/right."""
    input_size: tuple[int, int]
    """(h, w) after the resize, before padding."""
    original_size: tuple[int, int]
    """(H, W) of the cube as given."""
    contract: str

    def effective_gsd(self, gsd_m: float) -> float:
        """The GSD the encoder receives for a cube of GSD `gsd_m` (m/pixel), per this cube's contract."""
        return effective_gsd(gsd_m, self.original_size, self.image.shape[-1], self.contract)


@dataclass(frozen=True)
class PreparedBatch:
    """Pretraining crops in the model's input frame: images (B, C, S, S) and the GSD each one is encoded with."""

    image: torch.Tensor
    gsd: torch.Tensor
    """(B,) float32 effective GSD (m/pixel) per crop."""
    input_sizes: tuple[tuple[int, int], ...]
    """(h, w) of each crop's valid window after the resize."""
    contract: str


def preprocess_shape(height: int, width: int, long_side: int) -> tuple[int, int]:
    """Size after resizing the longest side to `long_side` (SAM `ResizeLongestSide.get_preprocess_shape`)."""
    scale = long_side * 1.0 / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def effective_gsd(gsd_m: float, original_size: tuple[int, int], img_size: int, contract: str = DEFAULT_CONTRACT
                  ) -> float:
    """The GSD (m/pixel) the encoder receives for an image of `original_size` (H, W) and GSD `gsd_m`:
    as given under ``released``; rescaled to the resized image, GSD * max(H, W) / img_size, under ``crop_max``."""
    if check_contract(contract) == "released":
        return float(gsd_m)
    return float(gsd_m) * max(original_size) / img_size


def _normalised(x: torch.Tensor, target: tuple[int, int], contract: str, flat: Literal["raise", "zero"]
                ) -> torch.Tensor:
    """One image (1, C, h, w) float32 -> (1, C, *target): the contract's value scaling around the resize."""
    if contract == "released":
        low, high = x.min(), x.max()
        if not bool(high > low):  # constant, or NaN (every comparison with NaN is False)
            return _flat(x, target, flat, f"its values are constant or not finite (min {low.item()}, "
                                          f"max {high.item()}), so a min-max has no range")
        x = 255.0 * (x - low) / (high - low)  # the released reader's float32 arithmetic, in its order
    x = F.interpolate(x, target, mode="bilinear", align_corners=False, antialias=True)
    peak = x.max()
    if not (torch.isfinite(peak) and peak > 0):
        return _flat(x, target, flat, f"its maximum after resizing is {peak.item()}; it must be finite and positive")
    return x / peak


def _flat(x: torch.Tensor, target: tuple[int, int], flat: Literal["raise", "zero"], problem: str) -> torch.Tensor:
    """Zeros for a crop that cannot be scaled (pretraining), or the error that says so (whole images)."""
    if flat == "zero":
        return x.new_zeros(*x.shape[:2], *target)
    raise ValueError(f"Cannot normalise the cube: {problem}; fill NaN/inf values and check the cube is not empty "
                     "or blank before encoding it.")


def _pad(x: torch.Tensor, size: int) -> torch.Tensor:
    """Zero-pad the last two axes bottom/right to size x size."""
    return F.pad(x, (0, size - x.shape[-1], 0, size - x.shape[-2]))


def prepare(cube_hwc: np.ndarray | torch.Tensor, img_size: int, contract: str = DEFAULT_CONTRACT,
            device: torch.device | str = "cpu") -> PreparedCube:
    """One cube (H, W, C), any numeric dtype, as the encoder's input (1, C, img_size, img_size) per `contract`."""
    check_contract(contract)
    if cube_hwc.ndim != 3:
        raise ValueError(f"Expected an (H, W, C) cube, got shape {tuple(cube_hwc.shape)}.")
    x = torch.as_tensor(cube_hwc, device=device).permute(2, 0, 1).unsqueeze(0).float()
    original_size = (int(x.shape[-2]), int(x.shape[-1]))
    target = preprocess_shape(*original_size, img_size)
    image = _pad(_normalised(x, target, contract, "raise"), img_size)
    return PreparedCube(image=image, input_size=target, original_size=original_size, contract=contract)


def prepare_batch(crops: torch.Tensor, sizes: Sequence[tuple[int, int]], img_size: int, gsd_m: torch.Tensor,
                  contract: str = DEFAULT_CONTRACT) -> PreparedBatch:
    """Pretraining crops (B, C, c, c), zero-padded bottom/right from their valid `sizes` (h, w), as encoder input.

    Each crop's valid window is normalised as one image under `contract`; every crop is scaled by img_size / c
    (so prompts in crop pixels map with one factor) and padded to img_size. A crop that cannot be scaled (blank)
    becomes zeros. `gsd_m` (B,) is each crop's GSD as stored; the result holds the GSD the encoder receives.
    """
    check_contract(contract)
    side = int(crops.shape[-1])
    if crops.ndim != 4 or crops.shape[-2] != side or len(sizes) != crops.shape[0]:
        raise ValueError(f"Expected square crops (B, C, c, c) and B valid sizes; got {tuple(crops.shape)} and "
                         f"{len(sizes)} sizes.")
    scale = img_size / side
    images: list[torch.Tensor] = []
    targets: list[tuple[int, int]] = []
    for b, (h, w) in enumerate(sizes):
        target = (int(h * scale + 0.5), int(w * scale + 0.5))
        x = crops[b:b + 1, :, :h, :w].float()
        images.append(_pad(_normalised(x, target, contract, "zero"), img_size))
        targets.append(target)
    gsd = torch.tensor([effective_gsd(float(g), (side, side), img_size, contract) for g in gsd_m.tolist()],
                       dtype=torch.float32, device=crops.device)
    return PreparedBatch(image=torch.cat(images), gsd=gsd, input_sizes=tuple(targets), contract=contract)


@torch.no_grad()
def extract_features(model: HyperFree, cube_hwc: np.ndarray | torch.Tensor,
                     wavelengths_nm: Sequence[float] | np.ndarray, gsd_m: float,
                     contract: str = DEFAULT_CONTRACT) -> list[torch.Tensor]:
    """Multi-stage backbone features of one cube: `prepare` under `contract`, then the encoder's deterministic
    inference path with the contract's GSD (the released `predictor.set_image(...)` then
    `predictor.multi_scale_features`). Returns the `feature_indexes` block outputs (1, D, h, w), then the neck."""
    enc = model.image_encoder
    prepared = prepare(cube_hwc, enc.img_size, contract, device=model.device)
    image = prepared.image.to(enc.point_spectral_weight_bank_w.dtype)
    return enc.forward_intermediates(image, wavelengths_nm, prepared.effective_gsd(gsd_m))
