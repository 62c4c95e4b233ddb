"""Airborne hyperspectral change detection (HyperSIGMA's HCD): a Siamese pass of the same backbone over both dates
of a change pair, a per-pixel MLP on the absolute difference of the two dates' features sampled at the pixel,
trained on a seeded draw of changed and unchanged pixels of the change map (HyperSIGMA: 500 of each), scored on
the other pixels (OA / kappa / F1, precision, recall) against change-vector analysis with an Otsu threshold."""

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
from stages.metrics import change_metrics
from stages.zeroshot.baselines import change_vector

CARD = Path(__file__).with_suffix(".yaml")
TRAIN_PER_CLASS = int(yaml.safe_load(CARD.read_text())["input"]["train_per_class"])
"""Changed and unchanged training pixels drawn (the card's `input.train_per_class`; at most half of a class)."""


def joint_minmax(cube1: np.ndarray, cube2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both dates scaled per band by the band's range over the two dates together (HyperSIGMA's CD input)."""
    both = np.stack([cube1, cube2]).astype(np.float32)
    low, high = both.min(axis=(0, 1, 2)), both.max(axis=(0, 1, 2))
    scaled = (both - low) / np.where(high > low, high - low, 1.0)
    return scaled[0], scaled[1]


def draw_train(change: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """(H, W) bool: a seeded draw of `per_class` changed and as many unchanged pixels (at most half of each)."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(change.shape, dtype=bool)
    for value in (False, True):
        idx = np.flatnonzero(change.reshape(-1) == value)
        take = rng.choice(idx, size=min(per_class, len(idx) // 2), replace=False)
        mask.reshape(-1)[take] = True
    return mask


def read(catalog: Catalog, backbone: Backbone, spec: TaskSpec, with_train: bool, on_progress: Any) -> TaskData:
    """Both dates (jointly min-max scaled), the change map, the seeded train draw and the other pixels as test."""
    image_id = scene_id(catalog, spec.dataset, TASK.annotation)
    annotation = catalog.annotation(image_id, spec.variant)
    if annotation.second is None:
        raise ValueError(f"{image_id}: its change_pair annotation holds no second date")
    info = cube_info(catalog, image_id, backbone.spec.default_gsd_m)
    first, second = joint_minmax(read_cube(catalog, image_id), np.moveaxis(annotation.second, 0, -1))
    scenes = (scene_of(backbone, first, info.wavelengths, info.gsd_m),
              scene_of(backbone, second, info.wavelengths, info.gsd_m))
    change = (annotation.array > 0).astype(np.int64)
    train_mask = draw_train(change.astype(bool), TRAIN_PER_CLASS, spec.train.seed)
    train = PixelSplit.of(scenes, train_mask, change, [0, 1])
    test = PixelSplit.of(scenes, ~train_mask, change, [0, 1])
    return TaskData(spec, train if with_train else None, test, [image_id] if with_train else [], [image_id],
                    LabelInfo(TASK.annotation, ("unchanged", "changed"), None),
                    extras={"train_mask": train_mask, "backbone": backbone_options(backbone)})


def _split(items: Any) -> PixelSplit:
    return cast(PixelSplit, items)


def head_options(spec: TaskSpec, data: TaskData) -> dict[str, Any]:
    """Two classes (unchanged, changed) and, with tune=full, the backbone copy (both dates go through it)."""
    return pixel_head_options(spec, data, 2)


def samples(data: TaskData, backbone: Backbone) -> list[PixelSample]:
    """The drawn pixels; head-only runs sample the frozen Siamese difference vectors once."""
    assert data.train is not None
    return pixel_samples(_split(data.train).encode, _split(data.train).targets, frozen_model(data.spec, backbone))


def loss(data: TaskData) -> PixelLoss:
    """Cross-entropy over the drawn (balanced) pixels."""
    return PixelLoss(TASK.name)


def _scores(pred: np.ndarray, test: PixelSplit) -> dict[str, float]:
    return change_metrics(pred, test.ids)


def evaluate(catalog: Catalog, head: nn.Module, backbone: Backbone, data: TaskData, device: torch.device) -> Scores:
    """OA / kappa / F1 / precision / recall of the head's change map at the test pixels."""
    test = _split(data.test)
    pred = predict_pixels(head, test.encode, backbone.model, device)
    change_map = np.zeros(test.shape, dtype=np.int64)
    change_map[test.rows, test.cols] = pred
    return Scores(_scores(pred, test), predictions=[change_map])


def baseline(catalog: Catalog, data: TaskData) -> Scores:
    """Change-vector analysis with an Otsu threshold, scored at the same pixels."""
    test = _split(data.test)
    _, binary = change_vector(test.scenes[0].cube, test.scenes[1].cube)
    return Scores(_scores(binary[test.rows, test.cols], test), predictions=[binary])


def overlays(catalog: Catalog, data: TaskData, head: Scores, base: Scores) -> list[Overlay]:
    """The first date with the change map and the head's."""
    image_id, test = data.test_ids[0], _split(data.test)
    target = np.full(test.shape, -1, dtype=np.int64)
    target[test.rows, test.cols] = test.ids
    rgb = display_rgb(catalog, image_id, read_cube(catalog, image_id), cube_info(catalog, image_id, 1.0).wavelengths)
    return [Overlay(rgb, image_id.split("/")[-1], target, head.predictions[0])][:data.spec.overlays]


TASK = register_task(CARD, read=read, head_options=head_options, samples=samples, loss=loss, evaluate=evaluate,
                     baseline=baseline, overlays=overlays)
