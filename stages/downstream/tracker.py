"""Single-object tracking with the Siamese head: crop geometry, training pairs and the online one-pass tracker.

Crops follow SiamFC: around a box (w, h) with context p = context x (w + h), the exemplar side is
s_z = sqrt((w + p)(h + p)); template and search crops are both squares of side search_factor x s_z around the
box centre, resampled to `crop_px` pixels and handed to an injected feature function (any callable from an
(H, W, C) crop to a feature list: the frozen backbone in production, anything in tests). The head correlates the
central 1 / search_factor of the template maps with the search maps.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torchvision.ops import roi_align

from model.heads.tracking import TrackingHead
from stages.downstream.samples import Features, TrackingPair, TrackingSequence, as_features, stack_features

FeatureFn = Callable[[np.ndarray], Sequence[torch.Tensor]]
"""Features of one (H, W, C) crop: the list a backbone's forward_intermediates returns (batch axis optional)."""


@dataclass(frozen=True)
class TrackerConfig:
    """Crop geometry, decoding and training-pair sampling of the Siamese tracker."""

    crop_px: int = 128
    """Side in pixels of the square crops handed to the feature function."""
    context: float = 0.5
    """SiamFC context margin p = context x (w + h)."""
    search_factor: float = 2.0
    """Crop side over exemplar side (SiamFC 255 / 127); the head's template_fraction must be its inverse."""
    window_influence: float = 0.4
    """Weight of the cosine window that favours small displacements when picking the peak."""
    size_lr: float = 0.3
    """Rate at which the box size follows the prediction (times the peak score)."""
    min_size: float = 4.0
    """Smallest box side in pixels."""
    max_gap: int = 10
    """Training pairs: largest frame distance between template and search frame."""
    shift: float = 0.25
    """Training pairs: largest search-crop centre shift, as a fraction of the exemplar side."""
    scale_jitter: float = 0.15
    """Training pairs: search-crop side scaled by exp(U(-j, j))."""

    def __post_init__(self) -> None:
        if self.crop_px < 8 or self.search_factor < 1 or self.context < 0:
            raise ValueError(f"TrackerConfig needs crop_px >= 8, search_factor >= 1 and context >= 0; got {self}.")

    @property
    def template_fraction(self) -> float:
        """Fraction of a crop that the exemplar covers (the head's template window)."""
        return 1.0 / self.search_factor


def crop_side(width: float, height: float, config: TrackerConfig) -> float:
    """Side in frame pixels of the template/search crop around a (width, height) box."""
    p = config.context * (width + height)
    return config.search_factor * math.sqrt((width + p) * (height + p))


def crop_square(frame: np.ndarray, cx: float, cy: float, side: float, out_px: int) -> np.ndarray:
    """The square of `side` frame pixels centred at (cx, cy), resampled to (out_px, out_px, C) float32; area
    outside the frame is zero (as the released preprocessing pads)."""
    if frame.ndim != 3:
        raise ValueError(f"Tracking frames must be (H, W, C) cubes; got shape {frame.shape}.")
    image = torch.from_numpy(np.ascontiguousarray(frame, dtype=np.float32)).permute(2, 0, 1).unsqueeze(0)
    half = side / 2
    box = torch.tensor([[0.0, cx - half, cy - half, cx + half, cy + half]], dtype=torch.float32)
    out = roi_align(image, box, output_size=out_px, spatial_scale=1.0, sampling_ratio=2, aligned=True)
    return out[0].permute(1, 2, 0).numpy()


def _check_head(head: TrackingHead, config: TrackerConfig) -> None:
    if not math.isclose(head.template_fraction, config.template_fraction, rel_tol=1e-6):
        raise ValueError(
            f"TrackingHead template_fraction={head.template_fraction} does not match TrackerConfig.search_factor="
            f"{config.search_factor} (needs 1 / search_factor = {config.template_fraction}); build both from the "
            "same setting."
        )


def _valid(box: np.ndarray) -> bool:
    return bool(np.isfinite(box).all() and box[2] > 0 and box[3] > 0)


def make_tracking_pairs(
    sequences: Sequence[TrackingSequence],
    feature_fn: FeatureFn,
    config: TrackerConfig,
    pairs_per_sequence: int,
    seed: int = 0,
) -> list[TrackingPair]:
    """Seeded (template, search) training pairs: template crop on a frame's box, search crop on a nearby frame's
    box shifted and rescaled at random, features computed once through `feature_fn`."""
    rng = np.random.default_rng(seed)
    pairs = []
    for seq in sequences:
        valid = np.flatnonzero([_valid(b) for b in seq.boxes])
        for _ in range(pairs_per_sequence):
            t = int(rng.choice(valid))
            near = valid[np.abs(valid - t) <= config.max_gap]
            u = int(rng.choice(near))
            x, y, w, h = seq.boxes[t]
            template = crop_square(seq.frames[t], x + w / 2, y + h / 2, crop_side(w, h, config), config.crop_px)
            x, y, w, h = seq.boxes[u]
            side = crop_side(w, h, config) * math.exp(rng.uniform(-config.scale_jitter, config.scale_jitter))
            dx, dy = rng.uniform(-config.shift, config.shift, 2) * side / config.search_factor
            cx, cy = x + w / 2 + dx, y + h / 2 + dy
            search = crop_square(seq.frames[u], cx, cy, side, config.crop_px)
            x0, y0 = cx - side / 2, cy - side / 2
            box = torch.tensor([(x - x0) / side, (y - y0) / side, (x + w - x0) / side, (y + h - y0) / side])
            pairs.append(TrackingPair(template=as_features(feature_fn(template), "feature_fn(template)"),
                                      search=as_features(feature_fn(search), "feature_fn(search)"), box=box))
    return pairs


def decode_peak(cls: torch.Tensor, box: torch.Tensor, window_influence: float) -> tuple[float, np.ndarray]:
    """Peak score and its box (x1, y1, x2, y2 as fractions of the crop) from one response (1, 1, G, G), (1, 4, G, G);
    the peak is taken after blending in a cosine window."""
    gh, gw = cls.shape[-2:]
    score = cls[0, 0].float().sigmoid()
    window = torch.outer(torch.hann_window(gh + 2, periodic=False)[1:-1],
                         torch.hann_window(gw + 2, periodic=False)[1:-1])
    blended = score * (1 - window_influence) + window.to(score.device) * window_influence
    idx = int(blended.argmax())
    i, j = divmod(idx, gw)
    left, top, right, bottom = box[0, :, i, j].float().tolist()
    u, v = (j + 0.5) / gw, (i + 0.5) / gh
    return float(score[i, j]), np.array([u - left, v - top, u + right, v + bottom])


class SiamTracker:
    """Online tracker: template from the first frame's box, then a search crop around the previous box per frame,
    the box decoded from the head's response."""

    def __init__(self, head: TrackingHead, feature_fn: FeatureFn, config: TrackerConfig,
                 device: torch.device | None = None) -> None:
        _check_head(head, config)
        self.head = head.eval()
        self.feature_fn = feature_fn
        self.config = config
        self.device = device or next(head.parameters()).device
        self.kernels: list[torch.Tensor] = []
        self.box = np.zeros(4)

    def _features(self, frame: np.ndarray, box: np.ndarray) -> list[torch.Tensor]:
        x, y, w, h = box
        crop = crop_square(frame, x + w / 2, y + h / 2, crop_side(w, h, self.config), self.config.crop_px)
        features: Features = as_features(self.feature_fn(crop), "feature_fn(crop)")
        return stack_features([features], self.device)

    @torch.no_grad()
    def init(self, frame: np.ndarray, box: Sequence[float] | np.ndarray) -> None:
        """Start on `frame` with the target at `box` (x, y, w, h)."""
        self.box = np.asarray(box, dtype=np.float64).copy()
        if not _valid(self.box):
            raise ValueError(f"SiamTracker.init: box {self.box.tolist()} must be (x, y, w, h) with positive size.")
        self.kernels = self.head.kernels(self._features(frame, self.box))

    @torch.no_grad()
    def update(self, frame: np.ndarray) -> np.ndarray:
        """The target's box (x, y, w, h) in `frame`."""
        if not self.kernels:
            raise RuntimeError("SiamTracker.update called before init(frame, box).")
        cfg = self.config
        x, y, w, h = self.box
        side = crop_side(w, h, cfg)
        cls, box = self.head.correlate(self.kernels, self._features(frame, self.box))
        score, (x1, y1, x2, y2) = decode_peak(cls, box, cfg.window_influence)
        x0, y0 = x + w / 2 - side / 2, y + h / 2 - side / 2
        cx, cy = x0 + (x1 + x2) / 2 * side, y0 + (y1 + y2) / 2 * side
        lr = cfg.size_lr * score
        height, width = frame.shape[:2]
        new_w = float(np.clip(w * (1 - lr) + (x2 - x1) * side * lr, cfg.min_size, width))
        new_h = float(np.clip(h * (1 - lr) + (y2 - y1) * side * lr, cfg.min_size, height))
        cx, cy = float(np.clip(cx, 0, width)), float(np.clip(cy, 0, height))
        self.box = np.array([cx - new_w / 2, cy - new_h / 2, new_w, new_h])
        return self.box.copy()


def track_sequence(head: TrackingHead, sequence: TrackingSequence, feature_fn: FeatureFn, config: TrackerConfig,
                   device: torch.device | None = None) -> np.ndarray:
    """One-pass evaluation: boxes (N, 4) for every frame, the first being the given first box."""
    tracker = SiamTracker(head, feature_fn, config, device)
    tracker.init(sequence.frames[0], sequence.boxes[0])
    boxes = [sequence.boxes[0].copy()]
    boxes.extend(tracker.update(frame) for frame in sequence.frames[1:])
    return np.stack(boxes)
