"""HyperFree's prompt-mask-feature rules as plain functions over masks and feature maps (no model, no catalog).

Every task reads the same two things: the automatic masks of a scene and one backbone feature map. A mask's
feature is the mean of the feature map over the mask's pixels, the map brought to the scene's size by nearest
interpolation; a prompt pixel selects the smallest mask holding it; masks are painted largest first, so smaller
masks overwrite larger ones. ``behaviour`` picks between the released scripts' arithmetic, quirks included, and the
corrected one (see README.md in this package for each difference).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

Behaviour = Literal["released", "fixed"]
BEHAVIOURS: tuple[str, ...] = ("released", "fixed")
LARGE_MASK_RATIO = 0.9
"""Masks covering more than this share of the scene are dropped (the released `anns2mask`)."""


class PromptOutsideMasks(ValueError):
    """A prompt pixel lies in no mask: names the pixel and the mask-generator thresholds that produced the masks."""

    def __init__(self, pixel: tuple[int, int], what: str, thresholds: dict[str, float]) -> None:
        self.pixel, self.thresholds = pixel, dict(thresholds)
        listing = ", ".join(f"{k}={v:g}" for k, v in thresholds.items()) or "the given masks"
        super().__init__(
            f"{what} pixel (y={pixel[0]}, x={pixel[1]}) lies in no mask generated with {listing}. Fix: lower "
            "pred_iou_thresh / stability_score_thresh or raise points_per_side (or set relax: true to retry so), "
            "or prompt a pixel inside a segmented region")


@dataclass(frozen=True)
class Stack:
    """Masks in the released task order: sorted by area, largest first (a stable sort of the generator's order),
    masks over 90% of the scene dropped. Painting runs in this order; a pixel's smallest mask is its last."""

    masks: np.ndarray
    """(n, H, W) bool."""

    @classmethod
    def of(cls, masks: np.ndarray, drop_large: bool = True) -> Stack:
        """Order the generator's masks (n, H, W) as the released `anns2mask` does."""
        masks = np.asarray(masks, dtype=bool)
        h, w = masks.shape[1:]
        areas = masks.reshape(len(masks), h * w).sum(axis=1)
        order = sorted(range(len(masks)), key=lambda i: int(areas[i]), reverse=True)
        if drop_large:
            order = [i for i in order if areas[i] / (h * w) <= LARGE_MASK_RATIO]
        return cls(masks[order] if order else np.zeros((0, h, w), dtype=bool))

    def __len__(self) -> int:
        return int(self.masks.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.masks.shape[1]), int(self.masks.shape[2])

    def smallest_holding(self, pixel: tuple[int, int], what: str, thresholds: dict[str, float]) -> int:
        """Index of the smallest mask holding ``pixel`` (y, x); PromptOutsideMasks if none does."""
        y, x = pixel
        holding = np.flatnonzero(self.masks[:, y, x])
        if not holding.size:
            raise PromptOutsideMasks((int(y), int(x)), what, thresholds)
        return int(holding[-1])


def cell_index(feature_hw: tuple[int, int], scene_hw: tuple[int, int], pad_aware: bool = True) -> np.ndarray:
    """(H, W) index into the flattened feature grid of each scene pixel, by torch's nearest interpolation.

    ``pad_aware`` (every released task but change detection): the map covers the zero-padded square input, so it
    is resized to max(H, W) squared and cropped top-left; otherwise it is stretched to (H, W) as the released
    change detection does (which misplaces features on non-square scenes)."""
    h, w = feature_hw
    height, width = scene_hw
    ids = torch.arange(h * w, dtype=torch.float64).reshape(1, 1, h, w)
    if pad_aware:
        side = max(height, width)
        grid = F.interpolate(ids, (side, side))[0, 0, :height, :width]
    else:
        grid = F.interpolate(ids, (height, width))[0, 0]
    return grid.numpy().astype(np.int64)


class MaskFeatures:
    """Mean features of masks from one feature map (C, h, w) float32. ``gather`` (the released arithmetic): the
    torch float32 mean of the gathered pixel features, as the released code computes it; otherwise the same mean
    from per-cell pixel counts, one (C, h*w) product per mask however large the mask (for full-size scenes)."""

    def __init__(self, feature: np.ndarray | torch.Tensor, scene_hw: tuple[int, int], pad_aware: bool = True,
                 gather: bool = True) -> None:
        f = torch.as_tensor(np.asarray(feature, dtype=np.float32))
        self.flat = f.reshape(f.shape[0], -1)
        self.cells = cell_index((int(f.shape[1]), int(f.shape[2])), scene_hw, pad_aware)
        self.gather = gather
        self._flat64 = self.flat.double()

    def mean(self, mask: np.ndarray) -> torch.Tensor:
        """(C,) mean feature over the pixels of a (H, W) bool mask."""
        if self.gather:
            return self.flat[:, self.cells[mask]].mean(1)
        counts = np.bincount(self.cells[mask], minlength=self.flat.shape[1]).astype(np.float64)
        return (self._flat64 @ torch.from_numpy(counts) / max(counts.sum(), 1.0)).float()


def cosine_np(a: np.ndarray, b: np.ndarray) -> float:
    """The released classification / detection cosine: numpy dot over the product of the norms (no guard)."""
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def cosine_torch(a: torch.Tensor, b: torch.Tensor) -> float:
    """The released change-detection cosine: torch dot over the product of the norms plus 1e-8."""
    return float(torch.dot(a, b) / (torch.norm(a, dim=0) * torch.norm(b, dim=0) + 1e-8))


# ------------------------------------------------------------------------------------------------ classification
def classify(stack: Stack, feats: MaskFeatures, prompts: Sequence[Sequence[tuple[int, int]]],
             class_ids: Sequence[int], open_set_thresh: float, behaviour: Behaviour,
             thresholds: dict[str, float]) -> np.ndarray:
    """Multi-class map from labelled pixels: each pixel's smallest mask gives a class prototype; every mask,
    largest first, is painted with the class of its most similar prototype when the similarity passes the
    open-set threshold.

    released: the map holds the prompt-list index j (0-based) and 0 where unpainted, so unassigned pixels read as
    the first class; the open-set test reads the cosine of the last prototype compared. fixed: the map holds
    ``class_ids[j]``, 0 where unpainted or rejected, and the test reads the best cosine."""
    if len(prompts) != len(class_ids):
        raise ValueError(f"{len(prompts)} prompt lists for {len(class_ids)} classes")
    protos: list[tuple[int, np.ndarray]] = []
    for j, pixels in enumerate(prompts):
        for pixel in pixels:
            k = stack.smallest_holding(pixel, f"class {class_ids[j]} prompt", thresholds)
            protos.append((j, feats.mean(stack.masks[k]).numpy()))
    out = np.zeros(stack.shape, dtype=np.int64)
    for mask in stack.masks:
        f = feats.mean(mask).numpy()
        best, highest, cosine = -1, -1.0, float("nan")
        for j, proto in protos:
            cosine = cosine_np(f, proto)
            if cosine > highest:
                highest, best = cosine, j
        if behaviour == "released":
            if cosine > open_set_thresh:
                out[mask] = best
        else:
            out[mask] = class_ids[best] if best >= 0 and highest > open_set_thresh else 0
    return out


# ------------------------------------------------------------------------------------------------ one class
ONE_CLASS_SWEEP = np.arange(0.8, 0.98, 0.01)
"""Cosine thresholds swept by the released one-class classification (0.80 ... 0.97)."""


@dataclass(frozen=True)
class OneClassResult:
    """The chosen binary map, the threshold that gave it and every swept threshold's positive share."""

    map: np.ndarray
    threshold: float
    ratios: list[float]
    chosen: int


def paint_similar(stack: Stack, feats: MaskFeatures, target: np.ndarray, threshold: float) -> np.ndarray:
    """Binary map: every mask, largest first, painted 1 if its cosine to ``target`` exceeds ``threshold``, else 0."""
    out = np.zeros(stack.shape, dtype=np.uint8)
    for mask in stack.masks:
        out[mask] = 1 if cosine_np(feats.mean(mask).numpy(), target) > threshold else 0
    return out


def one_class(stack: Stack, feats: MaskFeatures, prompt: tuple[int, int], class_prior: float,
              behaviour: Behaviour, thresholds: dict[str, float],
              sweep: Sequence[float] | np.ndarray = ONE_CLASS_SWEEP) -> OneClassResult:
    """One-class map from one pixel and the class's share of the scene: the prompt's smallest mask gives the
    target feature; the map of each swept threshold is made, and the one whose positive share is closest to
    ``class_prior`` (among non-empty maps) is kept. released: when every map is empty the last is kept; fixed:
    an empty map is returned with threshold NaN."""
    target = feats.mean(stack.masks[stack.smallest_holding(prompt, "one-class prompt", thresholds)]).numpy()
    maps = [paint_similar(stack, feats, target, float(t)) for t in sweep]
    ratios = [float(m.sum() / m.size) for m in maps]
    least, chosen = 1e3, -1
    for i, ratio in enumerate(ratios):
        if ratio > 0 and abs(ratio - class_prior) < least:
            least, chosen = abs(ratio - class_prior), i
    if chosen < 0 and behaviour == "fixed":
        return OneClassResult(np.zeros(stack.shape, dtype=np.uint8), float("nan"), ratios, -1)
    return OneClassResult(maps[chosen], float(sweep[chosen]), ratios, chosen)


# ------------------------------------------------------------------------------------------------ target
def best_spectral_match(cube_hwc: np.ndarray, spectrum: np.ndarray) -> tuple[int, int]:
    """(y, x) of the pixel whose spectrum has the highest cosine to ``spectrum`` (the released rule, in float64)."""
    flat = cube_hwc.reshape(-1, cube_hwc.shape[2]).astype(np.float64)
    s = np.asarray(spectrum, dtype=np.float64).reshape(-1)
    if s.size != flat.shape[1]:
        raise ValueError(f"the target spectrum has {s.size} values for a {flat.shape[1]}-band cube; give one "
                         "value per band")
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = flat @ s / (np.linalg.norm(flat, axis=1) * np.linalg.norm(s))
    cos = np.where(np.isnan(cos), -np.inf, cos)
    y, x = np.unravel_index(int(np.argmax(cos)), cube_hwc.shape[:2])
    return int(y), int(x)


def dilate(binary: np.ndarray, kernel: int) -> np.ndarray:
    """Dilation by a ``kernel`` x ``kernel`` square (OpenCV's `dilate` with a ones kernel on a 0/1 map)."""
    return ndimage.maximum_filter(binary, size=kernel, mode="constant", cval=0).astype(binary.dtype)


def target_detection(stack: Stack, feats: MaskFeatures, cube_hwc: np.ndarray, spectrum: np.ndarray,
                     cosine_thresh: float, dilate_kernel: int, thresholds: dict[str, float]
                     ) -> tuple[np.ndarray, tuple[int, int]]:
    """Binary target map from a target spectrum: the best-matching pixel's smallest mask gives the target
    feature; masks more similar than ``cosine_thresh`` are painted 1 (largest first, others 0), then dilated."""
    pixel = best_spectral_match(cube_hwc, spectrum)
    target = feats.mean(stack.masks[stack.smallest_holding(pixel, "best-matching target", thresholds)]).numpy()
    out = paint_similar(stack, feats, target, cosine_thresh).astype(np.float64)
    return (dilate(out, dilate_kernel) if dilate_kernel > 1 else out), pixel


# ------------------------------------------------------------------------------------------------ anomaly
def anomaly_detection(masks: np.ndarray, area_ratio_threshold: float) -> np.ndarray:
    """Binary anomaly map: every mask smaller than ``area_ratio_threshold`` of the scene is an anomaly."""
    masks = np.asarray(masks, dtype=bool)
    out = np.zeros(masks.shape[1:], dtype=np.float64)
    n = masks.shape[1] * masks.shape[2]
    for mask in masks:
        if mask.sum() / n < area_ratio_threshold:
            out[mask] = 1
    return out


# ------------------------------------------------------------------------------------------------ change
def change_scores(stack: Stack, feats1: MaskFeatures, feats2: MaskFeatures, behaviour: Behaviour) -> np.ndarray:
    """Change score per pixel from one date's masks: 1 - cosine of the two dates' mean features over each mask,
    largest first. released: the score is not clamped (its clamp is dead code); fixed: clamped to [0, 1]."""
    out = np.zeros(stack.shape, dtype=np.float64)
    for mask in stack.masks:
        score = 1 - cosine_torch(feats1.mean(mask), feats2.mean(mask))
        out[mask] = score if behaviour == "released" else min(max(score, 0.0), 1.0)
    return out


def change_detection(stack1: Stack, stack2: Stack, feats1: MaskFeatures, feats2: MaskFeatures,
                     ratio_threshold: float, behaviour: Behaviour) -> tuple[np.ndarray, np.ndarray]:
    """Binary change map and the score map: the larger of the scores from each date's masks, thresholded at its
    ``ratio_threshold`` quantile."""
    scores = np.maximum(change_scores(stack2, feats1, feats2, behaviour),
                        change_scores(stack1, feats1, feats2, behaviour))
    cut = np.quantile(scores, ratio_threshold)
    if behaviour == "released":
        out = scores.copy()
        out[out > cut] = 1
        out[out != 1] = 0
        return out, scores
    return (scores > cut).astype(np.float64), scores
