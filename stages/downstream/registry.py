"""The task registry: one `TaskDef` per downstream task, registered by the module that defines it
(stages/downstream/tasks/<task>.py with its data, <task>.yaml), looked up by name in `TASKS`.

A TaskDef is data plus hooks. The data (its YAML card): the annotation kind a dataset must hold, its datasets (the
paper's benchmark first), the head (a `model.heads.HEADS` name), whether whole-image features are cached for it, the
report section (primary metric, names, the paper's columns and figures) and the head sizes and schedules per
`head_size` ("small": CPU-sized layouts whose fixtures train in seconds; "paper": the paper's head sizes). The hooks:
read its splits from the catalog, the head's data-dependent options, the training samples, the loss, scoring of the
head, the trivial baseline and the report's examples. The head-run code (stages.downstream.heads) is task-agnostic.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

from base.errors import InputError
from base.registry import Registry
from catalog.catalog import Catalog
from stages.downstream.features import Backbone
from stages.downstream.losses import HeadLoss
from stages.downstream.report import Column, Overlay, PaperTable, ReportSection
from stages.downstream.spec import HeadTrainConfig, TaskData, TaskSpec
from stages.downstream.tracker import TrackerConfig
from stages.metrics import TrackingCurves

HEAD_SIZES = ("small", "paper")
"""Head sizes a task card defines: "small" for CPU-sized layouts, "paper" for the paper's heads and schedules."""
TUNE_MODES = ("head", "full")
"""What a run adapts: the head on the frozen backbone, or the backbone too."""


@dataclass(frozen=True)
class HeadSize:
    """A task's head options and schedule at one `head_size`."""

    head: dict[str, Any] = field(default_factory=dict)
    """Options of the head (the head's own defaults are the paper's sizes)."""
    train: dict[str, Any] = field(default_factory=dict)
    """HeadTrainConfig fields."""
    spec: dict[str, Any] = field(default_factory=dict)
    """Other TaskSpec fields (e.g. pairs_per_sequence)."""
    checkpoint_once: bool = False
    """One checkpoint, at the end (runs of seconds)."""


@dataclass(frozen=True)
class Scores:
    """What scoring a head (or a baseline) on the test split gave: the metrics, the task's extras (pooled confusion
    with its class names, OTB curves) and predictions the report's examples show."""

    metrics: dict[str, float]
    confusion: np.ndarray | None = None
    class_names: tuple[str, ...] = ()
    curves: TrackingCurves | None = None
    predictions: list[Any] = field(default_factory=list)


ReadFn = Callable[[Catalog, Backbone, TaskSpec, bool, Callable[[int], None] | None], TaskData]
"""(catalog, backbone, spec, with_train, on_progress) -> the task's splits (computing features the cache lacks)."""
HeadOptionsFn = Callable[[TaskSpec, TaskData], dict[str, Any]]
"""Head options that depend on the data or the spec (e.g. the number of classes)."""
SamplesFn = Callable[[TaskData, Backbone], Sequence[Any]]
"""The training samples of the train split."""
LossFn = Callable[[TaskData], HeadLoss]
EvaluateFn = Callable[[Catalog, nn.Module, Backbone, TaskData, torch.device], Scores]
BaselineFn = Callable[[Catalog, TaskData], Scores]
OverlaysFn = Callable[[Catalog, TaskData, Scores, Scores], list[Overlay]]


@dataclass(frozen=True)
class TaskDef:
    """One downstream task: its card (data, from its YAML) and its hooks (see the module docstring)."""

    name: str
    order: int
    """Position in reports and forms (the paper's order)."""
    annotation: str
    """Annotation kind its datasets hold (catalog label_kind: segmentation, saliency, track, pixel_classes, ...)."""
    datasets: tuple[str, ...]
    """Datasets it is evaluated on; the first is its default benchmark."""
    head: str
    """The head's name in model.heads.HEADS."""
    cached_features: bool
    """Whether heads read cached whole-image features (false: the task encodes its inputs on the fly)."""
    uncached_reason: str
    report: ReportSection
    sizes: Mapping[str, HeadSize]
    tune: tuple[str, ...]
    """What `TaskSpec.tune` may be: "head" (frozen backbone) and, where the task supports it, "full"."""
    read: ReadFn
    head_options: HeadOptionsFn
    samples: SamplesFn
    loss: LossFn
    evaluate: EvaluateFn
    baseline: BaselineFn
    overlays: OverlaysFn

    @property
    def default_dataset(self) -> str:
        """The paper's benchmark of the task."""
        return self.datasets[0]

    def size(self, head_size: str) -> HeadSize:
        """The head options and schedule at `head_size`."""
        if head_size not in self.sizes:
            raise ValueError(f"Task {self.name!r} has no head size {head_size!r}; choose one of {sorted(self.sizes)}.")
        return self.sizes[head_size]

    def spec(self, head_size: str, img_size: int, dataset: str | None = None, steps: int | None = None,
             seed: int = 0, device: str = "auto", **fields: Any) -> TaskSpec:
        """The task's spec at `head_size` (head options and schedule from the card), the tracker's crops at the
        backbone's frame size; `fields` override any other TaskSpec field (``head`` updates the head options)."""
        size = self.size(head_size)
        train = {**size.train, "seed": seed, "device": device}
        if steps is not None:
            train["steps"] = steps
        if size.checkpoint_once:
            train["checkpoint_every"] = train.get("steps", HeadTrainConfig.steps)
        tune = fields.get("tune", "head")
        if tune not in self.tune:
            raise ValueError(f"Task {self.name!r} supports tune={list(self.tune)}, not {tune!r}: its head reads the "
                             "frozen backbone's features; run it with tune='head' (or tune 'full' on a task whose card "
                             "lists it, e.g. airborne_classification).")
        tracker = fields.pop("tracker", None) or TrackerConfig(crop_px=img_size)
        head = {**size.head, **fields.pop("head", {})}
        return TaskSpec(task=self.name, dataset=dataset or self.default_dataset, head=head,
                        train=HeadTrainConfig(**train), tracker=tracker, **{**size.spec, **fields})


TASKS: Registry[TaskDef] = Registry("task")
"""Every downstream task, registered by stages.downstream.tasks (import that package to look tasks up)."""


def ordered_tasks() -> list[str]:
    """Registered task names in report order."""
    return sorted(TASKS.names(), key=lambda n: (TASKS.get(n).order, n))


def _card_error(path: Path, key: str, problem: str) -> InputError:
    return InputError(path, key, problem, "fix the task card (see stages/downstream/tasks/segmentation.yaml)")


def load_card(path: Path) -> dict[str, Any]:
    """A task card (YAML) as TaskDef fields: name, order, annotation, datasets, head, cached_features,
    uncached_reason, report, sizes (one per HEAD_SIZES) and tune (default: head only)."""
    doc = yaml.safe_load(Path(path).read_text())
    required = ("name", "order", "annotation", "datasets", "head", "report", "sizes")
    missing = [k for k in required if k not in doc]
    if missing:
        raise _card_error(path, missing[0], f"missing (a card needs {', '.join(required)})")
    report = dict(doc["report"])
    columns = tuple(Column(c["label"], c.get("metric"), float(c.get("scale", 1.0))) for c in report.pop("columns"))
    paper = tuple(PaperTable(t["key"], t["name"], tuple(t["aliases"]),
                             {m: tuple(float(v) for v in f) for m, f in t["rows"].items()})
                  for t in report.pop("paper", []))
    for table in paper:
        if any(len(f) > len(columns) for f in table.rows.values()):
            raise _card_error(path, f"report.paper.{table.key}", "a row has more figures than the table has columns")
    tune = tuple(doc.get("tune", ["head"]))
    if "head" not in tune or not set(tune) <= set(TUNE_MODES):
        raise _card_error(path, "tune", f"is {list(tune)}; a card lists 'head' and optionally 'full'")
    if set(doc["sizes"]) != set(HEAD_SIZES):
        raise _card_error(path, "sizes", f"defines {sorted(doc['sizes'])}; a card defines {list(HEAD_SIZES)}")
    return {"name": doc["name"], "order": int(doc["order"]), "annotation": doc["annotation"],
            "datasets": tuple(doc["datasets"]), "head": doc["head"],
            "cached_features": bool(doc.get("cached_features", True)),
            "uncached_reason": str(doc.get("uncached_reason", "")),
            "report": ReportSection(task=doc["name"], columns=columns, paper=paper, **report),
            "sizes": {k: HeadSize(**(v or {})) for k, v in doc["sizes"].items()}, "tune": tune}


def register_task(card: Path, **hooks: Any) -> TaskDef:
    """Register the task of `card` (its YAML) with its hooks (read, head_options, samples, loss, evaluate,
    baseline, overlays)."""
    fields = load_card(card)
    return TASKS.add(fields["name"], TaskDef(**fields, **hooks))
