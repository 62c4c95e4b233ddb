"""Task heads trained on the frozen backbone's multi-scale features (segmentation, salient objects, tracking)."""

from __future__ import annotations

from typing import Any

from torch import nn

from model.heads.layout import FeatureLayout, count_trainable_parameters, feature_layout, layout_from_info
from model.heads.saliency import SaliencyHead
from model.heads.segmentation import SegmentationHead
from model.heads.tracking import TrackingHead

HEADS: dict[str, type[nn.Module]] = {
    "segmentation": SegmentationHead,
    "saliency": SaliencyHead,
    "tracking": TrackingHead,
}
"""Head class per task name."""


def build_head(task: str, layout: FeatureLayout, **kwargs: Any) -> nn.Module:
    """The head for `task` sized from the backbone's feature layout; `kwargs` are the head's own options."""
    if task not in HEADS:
        raise ValueError(f"Unknown head task {task!r}; choose one of {sorted(HEADS)}.")
    return HEADS[task](in_channels=layout.channels, strides=layout.strides, **kwargs)


def head_from_hparams(task: str, hparams: dict[str, Any]) -> nn.Module:
    """Rebuild a head from the `hparams` dict it recorded (as stored beside its checkpoint)."""
    if task not in HEADS:
        raise ValueError(f"Unknown head task {task!r} in a checkpoint; choose one of {sorted(HEADS)}.")
    return HEADS[task](**hparams)


__all__ = [
    "HEADS",
    "FeatureLayout",
    "SaliencyHead",
    "SegmentationHead",
    "TrackingHead",
    "build_head",
    "count_trainable_parameters",
    "feature_layout",
    "head_from_hparams",
    "layout_from_info",
]
