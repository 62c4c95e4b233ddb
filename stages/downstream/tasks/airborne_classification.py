"""Airborne pixel classification (HyperSIGMA's HSI classification): a labelled scene reduced to its principal
components (the card's count, HyperSIGMA's 30), encoded whole by the backbone; a per-pixel MLP on the features
sampled at the train pixels of the annotation's seeded split; OA / AA / kappa / per-class accuracy on the test
pixels against a logistic regression on the spectra of the same train pixels. The backbone stays frozen or is
fine-tuned with the head (tune=full)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import yaml
from torch import nn

from catalog.catalog import Catalog
from stages.downstream.data import LabelInfo
from stages.downstream.features import Backbone, cube_info, read_cube
from stages.downstream.pixels import (
    PixelLoss,
    PixelSample,
    PixelSplit,
    backbone_options,
    frozen_model,
    pca,
    pixel_head_options,
    pixel_samples,
    predict_pixels,
    scene_id,
    scene_of,
)
from stages.downstream.registry import Scores, register_task
from stages.downstream.report import Overlay
from stages.downstream.spec import TaskData, TaskSpec
from stages.downstream.tasks.images import display_rgb
from stages.metrics import classification_metrics, confusion_matrix
from stages.zeroshot.baselines import logistic_regression

CARD = Path(__file__).with_suffix(".yaml")
PCA_COMPONENTS = int(yaml.safe_load(CARD.read_text())["input"]["pca_components"])
"""Principal components the backbone reads (the card's `input.pca_components`)."""


def read(catalog: Catalog, backbone: Backbone, spec: TaskSpec, with_train: bool, on_progress: Any) -> TaskData:
    """The scene as its principal components, its train and test pixels (the annotation's seeded split)."""
    image_id = scene_id(catalog, spec.dataset, TASK.annotation)
    cube = read_cube(catalog, image_id)
    info = cube_info(catalog, image_id, backbone.spec.default_gsd_m)
    reduced, kept = pca(cube, PCA_COMPONENTS)
    # the components are passed with band centres spread over the scene's range (only wavelength-aware families
    # read them; HyperSIGMA ignores wavelengths)
    wavelengths = np.linspace(info.wavelengths.min(), info.wavelengths.max(), reduced.shape[-1])
    scene = scene_of(backbone, reduced, wavelengths, info.gsd_m)
    annotation = catalog.annotation(image_id, spec.variant)
    labels = annotation.array
    train_mask, test_mask = annotation.pixels(spec.train_split), annotation.pixels(spec.test_split)
    class_ids = sorted(int(c) for c in np.unique(labels[train_mask | test_mask]) if c > 0)
    names = tuple(annotation.class_names[c] if c < len(annotation.class_names) else str(c) for c in class_ids)
    train = PixelSplit.of((scene,), train_mask & (labels > 0), labels, class_ids)
    test = PixelSplit.of((scene,), test_mask & (labels > 0), labels, class_ids)
    extras = {"pca_components": int(reduced.shape[-1]), "pca_variance_kept": kept, "class_ids": class_ids,
              "cube": cube, "backbone": backbone_options(backbone)}
    return TaskData(spec, train if with_train else None, test, [image_id] if with_train else [], [image_id],
                    LabelInfo(TASK.annotation, names, None), extras=extras)


def _split(items: Any) -> PixelSplit:
    return cast(PixelSplit, items)


def head_options(spec: TaskSpec, data: TaskData) -> dict[str, Any]:
    """One logit per class (and, with tune=full, the backbone copy)."""
    assert data.info is not None
    return pixel_head_options(spec, data, data.info.num_classes)


def samples(data: TaskData, backbone: Backbone) -> list[PixelSample]:
    """The train pixels; head-only runs sample the frozen backbone's features once."""
    assert data.train is not None
    return pixel_samples(_split(data.train).encode, _split(data.train).targets, frozen_model(data.spec, backbone))


def loss(data: TaskData) -> PixelLoss:
    """Cross-entropy over the train pixels."""
    return PixelLoss(TASK.name)


def _metrics(pred_ids: np.ndarray, split: PixelSplit, extras: dict[str, Any]) -> dict[str, float]:
    scores = classification_metrics(pred_ids, split.ids, ignore_index=None)
    out = {k: float(v) for k, v in scores.items() if k != "per_class"}  # type: ignore[arg-type]
    out.update({f"class_{c}": float(v) for c, v in scores["per_class"].items()})  # type: ignore[attr-defined]
    out.update({"pca_components": float(extras["pca_components"]), "pca_variance_kept": extras["pca_variance_kept"]})
    return out


def evaluate(catalog: Catalog, head: nn.Module, backbone: Backbone, data: TaskData, device: torch.device) -> Scores:
    """OA / AA / kappa / per-class accuracy of the head's classes at the test pixels (the PCA input recorded)."""
    test, ids = _split(data.test), np.asarray(data.extras["class_ids"])
    pred = ids[predict_pixels(head, test.encode, backbone.model, device)]
    k = len(ids)
    index = {int(c): i for i, c in enumerate(ids)}
    confusion = confusion_matrix([np.array([index[int(p)] for p in pred])], [test.targets], k, None)
    class_map = np.zeros(test.shape, dtype=np.int64)
    class_map[test.rows, test.cols] = pred
    assert data.info is not None
    return Scores(_metrics(pred, test, data.extras), confusion=confusion, class_names=data.info.class_names,
                  predictions=[class_map])


def baseline(catalog: Catalog, data: TaskData) -> Scores:
    """Logistic regression on the standardised spectra of the same train pixels."""
    test, ids = _split(data.test), [int(c) for c in data.extras["class_ids"]]
    annotation = catalog.annotation(data.test_ids[0], data.spec.variant)
    train_mask = annotation.pixels(data.spec.train_split) & (annotation.array > 0)
    prompts = [list(zip(*np.nonzero(train_mask & (annotation.array == c)), strict=True)) for c in ids]
    kept = [(c, p) for c, p in zip(ids, prompts, strict=True) if p]
    class_map = logistic_regression(data.extras["cube"], [p for _, p in kept], [c for c, _ in kept],
                                    seed=data.spec.train.seed)
    return Scores(_metrics(class_map[test.rows, test.cols], test, data.extras), predictions=[class_map])


def overlays(catalog: Catalog, data: TaskData, head: Scores, base: Scores) -> list[Overlay]:
    """The scene with its test labels and the head's classes there."""
    image_id, test = data.test_ids[0], _split(data.test)
    target = np.full(test.shape, -1, dtype=np.int64)
    target[test.rows, test.cols] = test.ids
    info = cube_info(catalog, image_id, 1.0)
    rgb = display_rgb(catalog, image_id, data.extras["cube"], info.wavelengths)
    return [Overlay(rgb, image_id.split("/")[-1], target, head.predictions[0])][:data.spec.overlays]


TASK = register_task(CARD, read=read, head_options=head_options, samples=samples, loss=loss, evaluate=evaluate,
                     baseline=baseline, overlays=overlays)
