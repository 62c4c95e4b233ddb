"""Semantic segmentation: class maps of whole images from cached features; scored on the pooled confusion matrix
(overall and mean class accuracy, mean F1, mIoU) against a per-pixel spectral classifier fitted on the train split."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from catalog.annotations import AnnotationMap
from catalog.catalog import Catalog
from stages.downstream.baselines import fit_spectral_classifier
from stages.downstream.evaluate import predict_segmentation
from stages.downstream.features import Backbone, read_cube
from stages.downstream.losses import SegmentationLoss
from stages.downstream.registry import Scores, register_task
from stages.downstream.report import Overlay
from stages.downstream.samples import SegmentationSample
from stages.downstream.spec import TaskData, TaskSpec
from stages.downstream.tasks.images import display_rgb, image_task_data, image_wavelengths
from stages.metrics import confusion_matrix, scores_from_confusion


def sample(features: tuple[torch.Tensor, ...], label: AnnotationMap, geometry: dict[str, Any]) -> SegmentationSample:
    """An image's cached features with its class map."""
    return SegmentationSample(features, torch.from_numpy(label.array.astype(np.int64)), **geometry)


def read(catalog: Catalog, backbone: Backbone, spec: TaskSpec, with_train: bool, on_progress: Any) -> TaskData:
    """The splits as samples; the train ids also without training (the spectral classifier fits on them)."""
    return image_task_data(catalog, backbone, spec, with_train, on_progress, kind=TASK.annotation, build=sample,
                           train_ids_always=True)


def head_options(spec: TaskSpec, data: TaskData) -> dict[str, Any]:
    """One logit channel per class of the split's labels."""
    assert data.info is not None
    return {"num_classes": data.info.num_classes}


def samples(data: TaskData, backbone: Backbone) -> Any:
    """The train split's samples."""
    return data.train


def loss(data: TaskData) -> SegmentationLoss:
    """Cross-entropy over the labelled pixels."""
    assert data.info is not None
    return SegmentationLoss(data.info.num_classes, data.info.ignore_index)


def evaluate(catalog: Catalog, head: nn.Module, backbone: Backbone, data: TaskData, device: torch.device) -> Scores:
    """Scores of the pooled confusion matrix (predictions are not all held at once); keeps the first predictions
    for the report's examples."""
    assert data.info is not None
    k, ignore = data.info.num_classes, data.info.ignore_index
    confusion = np.zeros((k, k), dtype=np.int64)
    kept: list[np.ndarray] = []
    for start in range(0, len(data.test), 8):
        chunk = cast(list[SegmentationSample], data.test[start:start + 8])
        predictions = predict_segmentation(head, chunk, device)
        confusion += confusion_matrix(predictions, [s.target.numpy() for s in chunk], k, ignore)
        kept += predictions[:max(0, data.spec.overlays - len(kept))]
    return Scores(scores_from_confusion(confusion), confusion=confusion, class_names=data.info.class_names,
                  predictions=kept)


def baseline(catalog: Catalog, data: TaskData) -> Scores:
    """A per-pixel spectral classifier fitted on (at most 200,000) train pixels, scored like the head."""
    assert data.info is not None
    spec, k, ignore = data.spec, data.info.num_classes, data.info.ignore_index
    per_image = max(1, 200_000 // len(data.train_ids))
    model = fit_spectral_classifier((read_cube(catalog, i) for i in data.train_ids),
                                    (catalog.annotation(i, spec.variant).array for i in data.train_ids), k, ignore,
                                    seed=spec.train.seed, pixels_per_image=per_image)
    confusion = np.zeros((k, k), dtype=np.int64)
    for i in data.test_ids:
        confusion += confusion_matrix([model.predict(read_cube(catalog, i))],
                                      [catalog.annotation(i, spec.variant).array], k, ignore)
    return Scores(scores_from_confusion(confusion))


def overlays(catalog: Catalog, data: TaskData, head: Scores, base: Scores) -> list[Overlay]:
    """The first test images with their label (unlabelled pixels black) and the head's class map."""
    out = []
    for image_id, prediction in zip(data.test_ids, head.predictions, strict=False):
        rgb = display_rgb(catalog, image_id, read_cube(catalog, image_id), image_wavelengths(catalog, image_id))
        target = catalog.annotation(image_id, data.spec.variant).array.astype(np.int64)
        if data.info is not None and data.info.ignore_index is not None:
            target[target == data.info.ignore_index] = -1
        out.append(Overlay(rgb, image_id.split("/")[-1], target, prediction))
    return out


TASK = register_task(Path(__file__).with_suffix(".yaml"), read=read, head_options=head_options, samples=samples,
                     loss=loss, evaluate=evaluate, baseline=baseline, overlays=overlays)
