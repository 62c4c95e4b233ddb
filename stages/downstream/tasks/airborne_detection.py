"""Airborne target and anomaly detection (HyperSIGMA's HTD and HAD), two registered tasks sharing this module: a
coarse detector's scores (ACE with the target spectrum for targets, RX for anomalies) give the pseudo-labels, the
lowest 30 % background and the top 0.15 % target (the rest unused); a per-pixel two-class MLP on the backbone's
features of the band-standardised scene learns them; its target probability over every pixel is scored with the
detection AUC set against the ground truth, beside the coarse detector's own scores (the baseline).

Training weighs the two classes inversely to their pseudo-label counts (about 200 background pixels per target
pixel), so the scarce targets are not drowned (the release uses plain cross-entropy on 32 x 32 windows)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from catalog.annotations import AnnotationMap
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
    predict_scores,
    scene_id,
    scene_of,
)
from stages.downstream.registry import Scores, TaskDef, register_task
from stages.downstream.report import Overlay
from stages.downstream.spec import TaskData, TaskSpec
from stages.downstream.tasks.images import display_rgb
from stages.metrics import detection_auc
from stages.zeroshot.baselines import ace, rx

BACKGROUND_FRACTION = 0.30
"""Lowest share of coarse scores taken as background pseudo-labels (HyperSIGMA's 30 %)."""
TARGET_FRACTION = 0.0015
"""Highest share of coarse scores taken as target pseudo-labels (HyperSIGMA's 0.15 %; at least one pixel)."""

Coarse = Callable[[np.ndarray, AnnotationMap], np.ndarray]
"""(cube (H, W, C), annotation) -> coarse detection scores (H, W) in [0, 1]."""


def target_spectrum(cube: np.ndarray, annotation: AnnotationMap) -> np.ndarray:
    """The dataset's target spectrum, else the mean spectrum of the ground-truth targets (HyperSIGMA's
    `ts_generation(type=0)`)."""
    if annotation.target_spectrum is not None:
        return np.asarray(annotation.target_spectrum, dtype=np.float64)
    return cube[annotation.array > 0].astype(np.float64).mean(axis=0)


def coarse_ace(cube: np.ndarray, annotation: AnnotationMap) -> np.ndarray:
    """ACE scores with the target spectrum."""
    return ace(cube, target_spectrum(cube, annotation))


def coarse_rx(cube: np.ndarray, annotation: AnnotationMap) -> np.ndarray:
    """Global RX scores."""
    return rx(cube)


def pseudo_labels(scores: np.ndarray, background: float = BACKGROUND_FRACTION,
                  target: float = TARGET_FRACTION) -> np.ndarray:
    """(H, W) int64: 0 for the lowest `background` share of scores, 1 for the highest `target` share (at least one
    pixel), -1 elsewhere (unused); ranks break ties by position."""
    flat = scores.reshape(-1)
    order = np.argsort(flat, kind="stable")
    labels = np.full(flat.shape, -1, dtype=np.int64)
    labels[order[:int(np.floor(background * flat.size))]] = 0
    labels[order[flat.size - max(1, int(np.floor(target * flat.size))):]] = 1
    return labels.reshape(scores.shape)


def standardised(cube: np.ndarray) -> np.ndarray:
    """Each band to zero mean and unit variance (HyperSIGMA's detection input, `--norm std`)."""
    x = cube.astype(np.float32)
    return (x - x.mean(axis=(0, 1))) / (x.std(axis=(0, 1)) + 1e-6)


def detection_task(card: Path, coarse: Coarse) -> TaskDef:
    """Register the detection task of `card` with its coarse detector."""

    def read(catalog: Catalog, backbone: Backbone, spec: TaskSpec, with_train: bool, on_progress: Any) -> TaskData:
        image_id = scene_id(catalog, spec.dataset, task.annotation)
        annotation = catalog.annotation(image_id, spec.variant)
        cube = read_cube(catalog, image_id)
        info = cube_info(catalog, image_id, backbone.spec.default_gsd_m)
        scene = scene_of(backbone, standardised(cube), info.wavelengths, info.gsd_m)
        scores = coarse(cube, annotation)
        labels = pseudo_labels(scores)
        gt = (annotation.array > 0).astype(np.int64)
        train = PixelSplit.of((scene,), labels >= 0, labels, [0, 1])
        test = PixelSplit.of((scene,), np.ones(gt.shape, dtype=bool), gt, [0, 1])
        counts = np.bincount(train.targets, minlength=2).astype(np.float64)
        return TaskData(spec, train if with_train else None, test, [image_id] if with_train else [], [image_id],
                        LabelInfo(task.annotation, ("background", "target"), None),
                        extras={"coarse": scores, "pseudo": labels, "counts": counts.tolist(),
                                "backbone": backbone_options(backbone)})

    def samples(data: TaskData, backbone: Backbone) -> list[PixelSample]:
        assert data.train is not None
        return pixel_samples(_split(data.train).encode, _split(data.train).targets,
                             frozen_model(data.spec, backbone))

    def loss(data: TaskData) -> PixelLoss:
        counts = np.asarray(data.extras["counts"])
        weights = counts.sum() / (2 * np.maximum(counts, 1))
        return PixelLoss(task.name, (float(weights[0]), float(weights[1])))

    task = register_task(card, read=read, head_options=head_options, samples=samples, loss=loss, evaluate=evaluate,
                         baseline=baseline, overlays=overlays)
    return task


def _split(items: Any) -> PixelSplit:
    return cast(PixelSplit, items)


def head_options(spec: TaskSpec, data: TaskData) -> dict[str, Any]:
    """Two classes (background, target) and, with tune=full, the backbone copy."""
    return pixel_head_options(spec, data, 2)


def _auc(scores: np.ndarray, test: PixelSplit) -> dict[str, float]:
    return detection_auc(np.clip(scores, 0.0, 1.0), test.ids)


def evaluate(catalog: Catalog, head: nn.Module, backbone: Backbone, data: TaskData, device: torch.device) -> Scores:
    """The detection AUC set of the head's target probability over every pixel."""
    test = _split(data.test)
    scores = predict_scores(head, test.encode, backbone.model, device)
    score_map = np.zeros(test.shape)
    score_map[test.rows, test.cols] = scores
    return Scores(_auc(scores, test), predictions=[score_map])


def baseline(catalog: Catalog, data: TaskData) -> Scores:
    """The coarse detector's scores, scored alike."""
    test, coarse = _split(data.test), np.asarray(data.extras["coarse"])
    return Scores(_auc(coarse[test.rows, test.cols], test), predictions=[coarse])


def overlays(catalog: Catalog, data: TaskData, head: Scores, base: Scores) -> list[Overlay]:
    """The scene with its ground truth and the head's target probability."""
    image_id, test = data.test_ids[0], _split(data.test)
    target = np.zeros(test.shape)
    target[test.rows, test.cols] = test.ids
    rgb = display_rgb(catalog, image_id, read_cube(catalog, image_id), cube_info(catalog, image_id, 1.0).wavelengths)
    return [Overlay(rgb, image_id.split("/")[-1], target, head.predictions[0])][:data.spec.overlays]


TARGET = detection_task(Path(__file__).with_name("airborne_target.yaml"), coarse_ace)
ANOMALY = detection_task(Path(__file__).with_name("airborne_anomaly.yaml"), coarse_rx)
