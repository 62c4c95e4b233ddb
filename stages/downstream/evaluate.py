"""Head evaluation: predictions at the labels' native size and the task metrics over a split."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from model.heads.tracking import TrackingHead
from stages.downstream.samples import SaliencySample, SegmentationSample, TrackingSequence, stack_features
from stages.downstream.tracker import FeatureFn, TrackerConfig, track_sequence
from stages.metrics import (
    TrackingCurves,
    confusion_matrix,
    saliency_metrics,
    scores_from_confusion,
    tracking_curves,
    tracking_metrics,
)
from stages.training.device import autocast


@dataclass(frozen=True)
class SegmentationEval:
    """Scores, pooled confusion matrix (rows = target) and the predicted class maps."""

    metrics: dict[str, float]
    confusion: np.ndarray
    predictions: list[np.ndarray]


@dataclass(frozen=True)
class SaliencyEval:
    """Scores and the predicted saliency maps in [0, 1]."""

    metrics: dict[str, float]
    predictions: list[np.ndarray]


@dataclass(frozen=True)
class TrackingEval:
    """Scores, OTB curves and the predicted (x, y, w, h) boxes per sequence."""

    metrics: dict[str, float]
    curves: TrackingCurves
    boxes: list[np.ndarray]


def _device(head: nn.Module, device: torch.device | None) -> torch.device:
    return device or next(head.parameters()).device


@torch.no_grad()
def _native_outputs(head: nn.Module, samples: Sequence[SegmentationSample | SaliencySample],
                    device: torch.device, batch_size: int) -> list[torch.Tensor]:
    head.eval()
    outputs = []
    for start in range(0, len(samples), batch_size):
        batch = samples[start: start + batch_size]
        with autocast(device):
            logits = head(stack_features([s.features for s in batch], device))
        for i, sample in enumerate(batch):
            outputs.append(sample.restore(logits[i: i + 1].float())[0].cpu())
    return outputs


def predict_segmentation(head: nn.Module, samples: Sequence[SegmentationSample], device: torch.device | None = None,
                         batch_size: int = 8) -> list[np.ndarray]:
    """Class maps (H, W) at each label's native size."""
    return [o.argmax(0).numpy() for o in _native_outputs(head, samples, _device(head, device), batch_size)]


def evaluate_segmentation(head: nn.Module, samples: Sequence[SegmentationSample], num_classes: int,
                          ignore_index: int | None, device: torch.device | None = None,
                          batch_size: int = 8) -> SegmentationEval:
    """HS3-Bench scores of the head's class maps, pixels pooled over the split."""
    predictions = predict_segmentation(head, samples, device, batch_size)
    cm = confusion_matrix(predictions, [s.target.numpy() for s in samples], num_classes, ignore_index)
    return SegmentationEval(scores_from_confusion(cm), cm, predictions)


def predict_saliency(head: nn.Module, samples: Sequence[SaliencySample], device: torch.device | None = None,
                     batch_size: int = 8) -> list[np.ndarray]:
    """Saliency maps (H, W) in [0, 1] at each mask's native size."""
    return [o[0].sigmoid().numpy() for o in _native_outputs(head, samples, _device(head, device), batch_size)]


def evaluate_saliency(head: nn.Module, samples: Sequence[SaliencySample], device: torch.device | None = None,
                      batch_size: int = 8) -> SaliencyEval:
    """Salient-object scores of the head's maps."""
    predictions = predict_saliency(head, samples, device, batch_size)
    return SaliencyEval(saliency_metrics(predictions, [s.mask.numpy() for s in samples]), predictions)


def score_tracks(boxes: Sequence[np.ndarray], sequences: Sequence[TrackingSequence]) -> TrackingEval:
    """OTB scores and curves of predicted boxes, one (N, 4) array per sequence."""
    gts = [s.boxes for s in sequences]
    return TrackingEval(tracking_metrics(list(boxes), gts), tracking_curves(list(boxes), gts), list(boxes))


def evaluate_tracking(head: TrackingHead, sequences: Sequence[TrackingSequence], feature_fn: FeatureFn,
                      config: TrackerConfig, device: torch.device | None = None) -> TrackingEval:
    """One-pass evaluation of the online tracker over every sequence."""
    return score_tracks([track_sequence(head, s, feature_fn, config, device) for s in sequences], sequences)
