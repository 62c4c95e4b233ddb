"""Salient object detection: a saliency map per whole image from cached features; AUC, CC, MAE, max F, S- and
E-measure against a centre prior."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from catalog.annotations import AnnotationMap
from catalog.catalog import Catalog
from stages.downstream.baselines import evaluate_centre_prior
from stages.downstream.evaluate import evaluate_saliency
from stages.downstream.features import Backbone, read_cube
from stages.downstream.losses import SaliencyLoss
from stages.downstream.registry import Scores, register_task
from stages.downstream.report import Overlay
from stages.downstream.samples import SaliencySample
from stages.downstream.spec import TaskData, TaskSpec
from stages.downstream.tasks.images import display_rgb, image_task_data, image_wavelengths


def sample(features: tuple[torch.Tensor, ...], label: AnnotationMap, geometry: dict[str, Any]) -> SaliencySample:
    """An image's cached features with its binary mask."""
    return SaliencySample(features, torch.from_numpy(label.array.astype(np.float32)), **geometry)


def read(catalog: Catalog, backbone: Backbone, spec: TaskSpec, with_train: bool, on_progress: Any) -> TaskData:
    """The splits as samples."""
    return image_task_data(catalog, backbone, spec, with_train, on_progress, kind=TASK.annotation, build=sample)


def head_options(spec: TaskSpec, data: TaskData) -> dict[str, Any]:
    """Nothing depends on the data."""
    return {}


def samples(data: TaskData, backbone: Backbone) -> Any:
    """The train split's samples."""
    return data.train


def loss(data: TaskData) -> SaliencyLoss:
    """BCE + dice on the mask."""
    return SaliencyLoss()


def _masks(data: TaskData) -> list[SaliencySample]:
    return cast(list[SaliencySample], list(data.test))


def evaluate(catalog: Catalog, head: nn.Module, backbone: Backbone, data: TaskData, device: torch.device) -> Scores:
    """SMN's metrics of the head's maps over the test split."""
    scored = evaluate_saliency(head, _masks(data), device)
    return Scores(scored.metrics, predictions=scored.predictions)


def baseline(catalog: Catalog, data: TaskData) -> Scores:
    """A centred Gaussian, scored like the head."""
    return Scores(evaluate_centre_prior([s.mask.numpy() for s in _masks(data)]).metrics)


def overlays(catalog: Catalog, data: TaskData, head: Scores, base: Scores) -> list[Overlay]:
    """The first test images with their mask and the head's map."""
    out = []
    for image_id, sample_, prediction in list(zip(data.test_ids, _masks(data), head.predictions,
                                                  strict=True))[:data.spec.overlays]:
        rgb = display_rgb(catalog, image_id, read_cube(catalog, image_id), image_wavelengths(catalog, image_id))
        out.append(Overlay(rgb, image_id.split("/")[-1], sample_.mask.numpy(), prediction))
    return out


TASK = register_task(Path(__file__).with_suffix(".yaml"), read=read, head_options=head_options, samples=samples,
                     loss=loss, evaluate=evaluate, baseline=baseline, overlays=overlays)
