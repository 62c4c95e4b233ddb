"""In-memory training and evaluation items of the task heads: frozen features plus their labels.

Feature lists are what the backbone's `forward_intermediates` returns for one image, without the batch axis:
one (C, h, w) tensor per map, all in the model's input frame (the image resized so its longest side fills the
frame, then zero-padded bottom/right). Labels stay at the image's native size; `input_size` says which part of
the frame holds the image, so predictions are cropped and resized back before losses and metrics.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

Features = tuple[torch.Tensor, ...]
"""One image's multi-scale features: a (C, h, w) tensor per map."""


def as_features(features: Sequence[torch.Tensor], what: str) -> Features:
    """Detached (C, h, w) tensors; a leading batch axis of 1 is dropped. Detaching keeps gradients off the backbone."""
    out = []
    for i, f in enumerate(features):
        t = torch.as_tensor(f).detach()
        if t.ndim == 4 and t.shape[0] == 1:
            t = t[0]
        if t.ndim != 3:
            raise ValueError(f"{what}: feature map {i} has shape {tuple(t.shape)}; expected (C, h, w) or (1, C, h, w).")
        out.append(t)
    if not out:
        raise ValueError(f"{what}: empty feature list; pass the list forward_intermediates returns.")
    return tuple(out)


def _input_size(value: tuple[int, int] | None, what: str) -> tuple[int, int] | None:
    if value is None:
        return None
    h, w = (int(v) for v in value)
    if h < 1 or w < 1:
        raise ValueError(f"{what}: input_size={value} must be positive (h, w) of the resized image in the frame.")
    return h, w


@dataclass(frozen=True)
class SegmentationSample:
    """Features of one image and its class map (H, W) at native size; `ignore_index` pixels carry no label."""

    features: Features
    target: torch.Tensor
    input_size: tuple[int, int] | None = None
    """(h, w) of the resized image inside the padded frame (released preprocessing); None: it fills the frame."""
    image_id: str = ""
    frame_size: int | None = None
    """Side of the square model frame; None: max(input_size), as when the longest side is resized to the frame."""

    def __post_init__(self) -> None:
        what = f"SegmentationSample {self.image_id!r}"
        object.__setattr__(self, "features", as_features(self.features, what))
        target = torch.as_tensor(np.asarray(self.target) if not isinstance(self.target, torch.Tensor) else self.target)
        if target.ndim != 2:
            raise ValueError(f"{what}: target has shape {tuple(target.shape)}; expected a (H, W) class map.")
        object.__setattr__(self, "target", target.long())
        object.__setattr__(self, "input_size", _input_size(self.input_size, what))

    def restore(self, logits: torch.Tensor) -> torch.Tensor:
        """Frame logits (1, K, h, w) -> (1, K, H, W) over this image's class map."""
        return to_native(logits, self.input_size, self.target.shape, self.frame_size)


@dataclass(frozen=True)
class SaliencySample:
    """Features of one image and its binary salient-object mask (H, W) at native size."""

    features: Features
    mask: torch.Tensor
    input_size: tuple[int, int] | None = None
    """(h, w) of the resized image inside the padded frame; None: it fills the frame."""
    image_id: str = ""
    frame_size: int | None = None
    """Side of the square model frame; None: max(input_size), as when the longest side is resized to the frame."""

    def __post_init__(self) -> None:
        what = f"SaliencySample {self.image_id!r}"
        object.__setattr__(self, "features", as_features(self.features, what))
        mask = torch.as_tensor(np.asarray(self.mask) if not isinstance(self.mask, torch.Tensor) else self.mask)
        if mask.ndim != 2:
            raise ValueError(f"{what}: mask has shape {tuple(mask.shape)}; expected (H, W).")
        object.__setattr__(self, "mask", (mask.float() > 0.5).float())
        object.__setattr__(self, "input_size", _input_size(self.input_size, what))

    def restore(self, logits: torch.Tensor) -> torch.Tensor:
        """Frame logits (1, 1, h, w) -> (1, 1, H, W) over this image's mask."""
        return to_native(logits, self.input_size, self.mask.shape, self.frame_size)


@dataclass(frozen=True)
class TrackingPair:
    """Features of a template crop and a search crop (same geometry) and the target box in the search crop as
    (x1, y1, x2, y2) fractions of its side."""

    template: Features
    search: Features
    box: torch.Tensor

    def __post_init__(self) -> None:
        object.__setattr__(self, "template", as_features(self.template, "TrackingPair.template"))
        object.__setattr__(self, "search", as_features(self.search, "TrackingPair.search"))
        box = torch.as_tensor(self.box, dtype=torch.float32).reshape(-1)
        if box.numel() != 4 or not bool((box[2:] > box[:2]).all()):
            raise ValueError(f"TrackingPair.box={box.tolist()} must be (x1, y1, x2, y2) with x2 > x1 and y2 > y1.")
        object.__setattr__(self, "box", box)


@dataclass(frozen=True)
class TrackingSequence:
    """Ordered frames (H, W, C) of one sequence and one (x, y, w, h) box per frame, in 0-based pixels."""

    frames: Sequence[np.ndarray]
    boxes: np.ndarray
    name: str = ""

    def __post_init__(self) -> None:
        boxes = np.asarray(self.boxes, dtype=np.float64)
        if boxes.ndim != 2 or boxes.shape[1] != 4 or len(boxes) != len(self.frames):
            raise ValueError(
                f"TrackingSequence {self.name!r}: {len(self.frames)} frames but boxes of shape {boxes.shape}; give "
                "one (x, y, w, h) box per frame."
            )
        if not (np.isfinite(boxes[0]).all() and boxes[0, 2] > 0 and boxes[0, 3] > 0):
            raise ValueError(f"TrackingSequence {self.name!r}: the first box {boxes[0].tolist()} must be a valid "
                             "(x, y, w, h) with positive size; trackers start from it.")
        object.__setattr__(self, "boxes", boxes)


def stack_features(items: Sequence[Features], device: torch.device) -> list[torch.Tensor]:
    """Batch the feature lists of several items: one (B, C, h, w) float32 tensor per map."""
    shapes = {tuple(tuple(f.shape) for f in item) for item in items}
    if len(shapes) != 1:
        raise ValueError(
            f"Cannot batch feature lists of different shapes {sorted(shapes)}; compute all features with the same "
            "model and input frame size."
        )
    return [torch.stack([item[i] for item in items]).to(device=device, dtype=torch.float32, non_blocking=True)
            for i in range(len(items[0]))]


def to_native(logits: torch.Tensor, input_size: tuple[int, int] | None, size: Sequence[int],
              frame_size: int | None = None) -> torch.Tensor:
    """Map frame logits (B, K, h, w) back to an image of `size` (H, W): upsample to the frame (`frame_size`, by
    default the longest side of `input_size`), drop the padding beyond `input_size`, resize to the image (SAM's
    postprocess_masks)."""
    if input_size is not None:
        side = frame_size or max(input_size)
        logits = F.interpolate(logits, (side, side), mode="bilinear", align_corners=False)
        logits = logits[..., : input_size[0], : input_size[1]]
    if tuple(logits.shape[-2:]) != tuple(size):
        logits = F.interpolate(logits, tuple(size), mode="bilinear", align_corners=False)
    return logits
