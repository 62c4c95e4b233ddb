"""Single-object tracking: a Siamese head on (template, search) crops encoded by the frozen backbone on the fly;
OTB one-pass evaluation against the first-frame box held.

Tracking features come from the frozen backbone on the fly, one forward pass per search crop, rather than from
crops of cached whole-frame feature maps. The tracker cuts a square of about twice the target's context size around
the last box and resamples it to the backbone's whole input frame, so the search region always spans img_size /
stride cells (16 for tiny at 128 px, 32 for -B) whatever the target's size (SiamFC's scale normalisation); a crop of
a frame map spans only side x img_size / (frame side x stride) cells: a 100 px search region of a 512 px wide HOT VIS
frame is about 6 cells at -B instead of 32. Measured with bench/downstream.py (tiny, random-init, HOT-2023 VIS
fixture, whose 32 px frames are magnified 4x, the case most favourable to frame maps): success AUC 0.50 on the fly
vs 0.43 from cached frame maps (held first box 0.10), at 20 ms vs 0.6 ms per frame on one CPU core; one encoder pass
per frame is milliseconds for -B in bf16 on a GPU, cheap for a one-pass evaluation.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from catalog.catalog import Catalog
from model.heads import TrackingHead
from stages.downstream.backbone import backbone_feature_fn
from stages.downstream.baselines import evaluate_first_box
from stages.downstream.data import CatalogSequence, split_sequences
from stages.downstream.evaluate import score_tracks
from stages.downstream.features import Backbone
from stages.downstream.losses import TrackingLoss
from stages.downstream.registry import Scores, register_task
from stages.downstream.report import Overlay
from stages.downstream.samples import TrackingPair
from stages.downstream.spec import TaskData, TaskSpec
from stages.downstream.tasks.images import display_rgb
from stages.downstream.tracker import FeatureFn, make_tracking_pairs, track_sequence


def feature_fn(backbone: Backbone, seq: CatalogSequence) -> FeatureFn:
    """The frozen backbone's features of one crop of the sequence's sensor."""
    return backbone_feature_fn(backbone.model, seq.sensor.wavelengths, seq.sensor.gsd_m, backbone.spec.contract,
                               backbone.spec.adapter.extract)


def read(catalog: Catalog, backbone: Backbone, spec: TaskSpec, with_train: bool,
         on_progress: Callable[[int], None] | None) -> TaskData:
    """The splits' complete sequences (frames and boxes); nothing is cached."""
    gsd = backbone.spec.default_gsd_m
    test = split_sequences(catalog, spec.dataset, spec.test_split, gsd)
    train = split_sequences(catalog, spec.dataset, spec.train_split, gsd) if with_train else None
    return TaskData(spec, train, test, [s.seq_id for s in train or []], [s.seq_id for s in test], None)


def _sequences(items: Any) -> list[CatalogSequence]:
    return cast(list[CatalogSequence], items)


def head_options(spec: TaskSpec, data: TaskData) -> dict[str, Any]:
    """The head correlates the template's central window, as the tracker crops it."""
    return {"template_fraction": spec.tracker.template_fraction}


def samples(data: TaskData, backbone: Backbone) -> list[TrackingPair]:
    """Seeded (template, search) pairs per training sequence, encoded by the frozen backbone."""
    spec, pairs = data.spec, []
    for k, seq in enumerate(_sequences(data.train)):
        pairs += make_tracking_pairs([seq.sequence], feature_fn(backbone, seq), spec.tracker, spec.pairs_per_sequence,
                                     seed=spec.train.seed + k)
    return pairs


def loss(data: TaskData) -> TrackingLoss:
    """Balanced BCE on the response map + GIoU on the boxes."""
    return TrackingLoss()


def evaluate(catalog: Catalog, head: nn.Module, backbone: Backbone, data: TaskData, device: torch.device) -> Scores:
    """One-pass tracking of every test sequence from its first box; success and precision curves."""
    test = _sequences(data.test)
    boxes = [track_sequence(cast(TrackingHead, head), s.sequence, feature_fn(backbone, s), data.spec.tracker, device)
             for s in test]
    scored = score_tracks(boxes, [s.sequence for s in test])
    return Scores(scored.metrics, curves=scored.curves, predictions=boxes)


def baseline(catalog: Catalog, data: TaskData) -> Scores:
    """The first-frame box held for every frame."""
    held = evaluate_first_box([s.sequence for s in _sequences(data.test)])
    return Scores(held.metrics, curves=held.curves, predictions=held.boxes)


def overlays(catalog: Catalog, data: TaskData, head: Scores, base: Scores) -> list[Overlay]:
    """The middle frame of the first test sequences with the true, tracked and held boxes."""
    out = []
    for s, predicted, held in list(zip(_sequences(data.test), head.predictions, base.predictions,
                                       strict=True))[:data.spec.overlays]:
        t = len(s.sequence.frames) // 2
        rgb = display_rgb(catalog, catalog.sequence(s.seq_id).frames[t], np.asarray(s.sequence.frames[t]),
                          s.sensor.wavelengths)
        out.append(Overlay(rgb, f"{s.seq_id.split('/')[-1]} frame {t + 1}",
                           boxes={"truth": s.sequence.boxes[t], "head": predicted[t], "first box": held[t]}))
    return out


TASK = register_task(Path(__file__).with_suffix(".yaml"), read=read, head_options=head_options, samples=samples,
                     loss=loss, evaluate=evaluate, baseline=baseline, overlays=overlays)
