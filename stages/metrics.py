"""The downstream metrics under their short import path (`stages.metrics`); defined in stages/downstream/metrics.py."""

from stages.downstream.metrics import (
    TrackingCurves,
    confusion_matrix,
    saliency_metrics,
    scores_from_confusion,
    segmentation_metrics,
    tracking_curves,
    tracking_metrics,
)

__all__ = [
    "TrackingCurves",
    "confusion_matrix",
    "saliency_metrics",
    "scores_from_confusion",
    "segmentation_metrics",
    "tracking_curves",
    "tracking_metrics",
]
