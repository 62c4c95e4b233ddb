"""Task heads trained on the frozen backbone's multi-scale features, registered in `HEADS` by their modules:
"runet" (RU-Net-style segmentation decoder), "basam" (BA-SAM-style saliency decoder), "siamhyper" (SiamHYPER-style
tracking decoder), "pixel_mlp" (per-pixel MLP of the airborne tasks)."""

from __future__ import annotations

from model.heads.layout import FeatureLayout, count_trainable_parameters, feature_layout, layout_from_info
from model.heads.pixel import PixelHead
from model.heads.registry import HEADS, build_head, head_from_hparams
from model.heads.saliency import SaliencyHead
from model.heads.segmentation import SegmentationHead
from model.heads.tracking import TrackingHead

__all__ = [
    "HEADS",
    "PixelHead",
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
