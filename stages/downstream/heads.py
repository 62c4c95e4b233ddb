"""Head-only adaptation from the catalog: train a task head on a dataset's train split over the frozen backbone's
features, score it on the test split beside its trivial baseline, and write the report. Task-agnostic: what a task
reads, trains on and scores comes from its `TaskDef` (stages.downstream.tasks).

Run folder of one head (`train_task`)::

    run.json        the inputs: fingerprint, task spec, backbone spec and feature set, catalog, label fingerprint
    checkpoints/ train_log.csv      the head's training (stages.downstream.train)
    result.json     head and baseline scores, confusion matrix or curves, trainable parameters, timings
    overlays.npz    the qualitative examples of the report
    report.json report.md results.parquet plots/      the one-task report

A rerun whose inputs (feature set: weights sha256 or random-init + seed, model, overrides, preprocessing; the
split's labels; the task's parameters) did not change reuses the result and says so; a run killed mid-training
resumes from its latest checkpoint. result.json is written last, atomically: a folder without it is unfinished
(a run killed while scoring or reporting scores and reports again).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from base.errors import InputError
from catalog.annotations import SCENE_SPLIT
from catalog.catalog import Catalog
from model.heads import build_head, count_trainable_parameters
from stages.downstream.checkpoints import load_head
from stages.downstream.data import check_label_kind, labels_fingerprint
from stages.downstream.features import Backbone, BackboneSpec, load_backbone
from stages.downstream.outcomes import (
    RESULT_FILE,
    RUN_FILE,
    TaskOutcome,
    load_outcome,
    save_outcome,
    write_json,
    write_task_report,
)
from stages.downstream.report import ReportPaths, TaskReport
from stages.downstream.spec import TaskData, TaskSpec, changed_inputs, task_fingerprint
from stages.downstream.tasks import TASKS
from stages.downstream.train import TrainResult, train_head
from stages.training.device import resolve_device

logger = logging.getLogger(__name__)

PIXEL_SCENES = SCENE_SPLIT["pixel_classes"]


def held_benchmarks(catalog: Catalog, tasks: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """The tasks (task -> labelled dataset) whose dataset the catalog holds with labels, and a note for each task
    whose dataset it lacks."""
    images = catalog.images()
    held = set(images.loc[images["label_kind"].notna(), "dataset"]) if not images.empty else set()
    missing = [f"{t} needs {d}, which the catalog does not hold" for t, d in tasks.items() if d not in held]
    return {t: d for t, d in tasks.items() if d in held}, missing


def task_spec(task: str, head_size: str, img_size: int, dataset: str | None = None, steps: int | None = None,
              seed: int = 0, device: str = "auto", **fields: Any) -> TaskSpec:
    """The spec of registered task `task` at `head_size` ("small" or "paper", see TaskDef.spec)."""
    return TASKS.get(task).spec(head_size, img_size, dataset=dataset, steps=steps, seed=seed, device=device,
                                **fields)


def load_task_data(catalog: Catalog, backbone: Backbone, spec: TaskSpec, with_train: bool = True,
                   on_progress: Callable[[int], None] | None = None) -> TaskData:
    """Gather a task's splits from the catalog (its TaskDef's reader: cached features are computed where missing);
    `with_train=False` reads what scoring needs only."""
    start = time.perf_counter()
    task = TASKS.get(spec.task)
    check_label_kind(catalog, spec.dataset, task.annotation)
    data = task.read(catalog, backbone, spec, with_train, on_progress)
    return dataclasses.replace(data, features_s=time.perf_counter() - start)


def new_head(spec: TaskSpec, backbone: Backbone, data: TaskData) -> nn.Module:
    """A freshly initialised head (seeded by the training seed) sized from the backbone's feature layout. With
    ``tune="full"`` the head carries a trainable copy of the backbone (its `backbone` module, built from the options
    the task's `head_options` gives) starting from the loaded weights."""
    task = TASKS.get(spec.task)
    options = {**spec.head, **task.head_options(spec, data)}
    torch.manual_seed(spec.train.seed)
    head = build_head(task.head, backbone.layout, **options)
    if spec.tune == "full":
        tuned = getattr(head, "backbone", None)
        if not isinstance(tuned, nn.Module):
            raise ValueError(f"Task {spec.task!r}: its head {task.head!r} carries no backbone to tune; use tune='head'")
        tuned.load_state_dict(backbone.model.state_dict())
        tuned.requires_grad_(True)
    return head


def fit_head(head: nn.Module, data: TaskData, backbone: Backbone, run_dir: Path,
             on_step: Callable[[int, float], None] | None = None) -> TrainResult:
    """Train the head on the train split's samples with the task's loss."""
    task = TASKS.get(data.spec.task)
    samples = task.samples(data, backbone)
    return train_head(head, task.loss(data), samples, data.spec.train, run_dir, weights=backbone.provenance,
                      preprocessing=backbone.spec.contract, on_step=on_step)


def evaluate_head(catalog: Catalog, head: nn.Module, backbone: Backbone, data: TaskData
                  ) -> tuple[TaskReport, dict[str, float]]:
    """Score the head on the test split and its trivial baseline beside it; returns the task's report and the
    seconds each part took."""
    task = TASKS.get(data.spec.task)
    device = resolve_device(data.spec.train.device, field="HeadTrainConfig.device")
    head.to(device).eval()
    t0 = time.perf_counter()
    scored = task.evaluate(catalog, head, backbone, data, device)
    t1 = time.perf_counter()
    base = task.baseline(catalog, data)
    t2 = time.perf_counter()
    overlays = task.overlays(catalog, data, scored, base)
    section = task.report
    if len(task.tune) > 1:  # tasks that can tune their backbone say which way this run went
        what = "fine-tuned backbone" if data.spec.tune == "full" else "frozen backbone"
        section = dataclasses.replace(section, head_name=f"{section.head_name} (tune={data.spec.tune}: {what})")
    report = TaskReport(section, data.spec.dataset, scored.metrics, base.metrics, confusion=scored.confusion,
                        class_names=scored.class_names, head_curves=scored.curves, baseline_curves=base.curves,
                        overlays=overlays)
    return report, {"eval_s": t1 - t0 + time.perf_counter() - t2, "baseline_s": t2 - t1}


def backbone_record(spec: BackboneSpec) -> dict[str, Any]:
    """A BackboneSpec as run.json stores it (checkpoint as an absolute path)."""
    record = dataclasses.asdict(spec)
    record["overrides"] = spec.resolved_overrides()
    if spec.checkpoint is not None:
        record["checkpoint"] = str(Path(spec.checkpoint).resolve())
    return record


def train_task(catalog: Catalog, backbone: Backbone, spec: TaskSpec, run_dir: Path, *, replace: bool = False,
               on_step: Callable[[int, float], None] | None = None,
               on_progress: Callable[[int], None] | None = None) -> TaskOutcome:
    """Train the head of `spec` on the frozen backbone, score it and its baseline, write the run folder and its
    report. Unchanged inputs reuse the stored result (``skipped``); a folder holding a run of other inputs is an
    error unless `replace`, which starts it over."""
    run_dir = Path(run_dir)
    TASKS.get(spec.task)  # an unknown task fails before anything is read
    # scenes split by pixels (airborne pixel classes) sit in their own catalog split
    labels = labels_fingerprint(catalog, spec.dataset, [spec.train_split, spec.test_split, PIXEL_SCENES])
    inputs = task_fingerprint(spec, backbone.set_id, labels)
    run_file = run_dir / RUN_FILE
    if run_file.is_file():
        recorded = json.loads(run_file.read_text())
        if recorded.get("fingerprint") != inputs["fingerprint"]:
            what = ", ".join(changed_inputs(recorded, inputs)) or "inputs"
            if not replace:
                raise InputError(run_file, "fingerprint", f"the run in {run_dir} was made from other {what}",
                                 "pass another output folder, or replace the run (--replace) to start it over")
            logger.info("%s: %s changed since the run in %s; starting it over", spec.task, what, run_dir)
            shutil.rmtree(run_dir)
        elif (run_dir / RESULT_FILE).is_file():
            logger.info("%s: inputs unchanged (fingerprint %s); reusing the result in %s", spec.task,
                        inputs["fingerprint"][:12], run_dir)
            return load_outcome(run_dir, skipped=True)
    data = load_task_data(catalog, backbone, spec, on_progress=on_progress)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_file, {**inputs, "catalog": catalog.uri, "backbone": backbone_record(backbone.spec),
                          "backbone_descriptor": backbone.descriptor, "spec": spec.to_dict()})
    head = new_head(spec, backbone, data)
    t0 = time.perf_counter()
    result = fit_head(head, data, backbone, run_dir, on_step)
    train_s = time.perf_counter() - t0
    logger.info("%s head: %d trainable parameters, %d steps in %.1f s", spec.task, result.trainable_parameters,
                result.steps, train_s)
    report, timings = evaluate_head(catalog, head, backbone, data)
    outcome = TaskOutcome(report, run_dir, inputs["fingerprint"], result.trainable_parameters, result.steps,
                          data.counts, {"features_s": data.features_s, "train_s": train_s, **timings})
    write_task_report(run_dir, [outcome], backbone)
    save_outcome(outcome, run_dir)  # last: result.json is the commit point a rerun reuses
    return outcome


def evaluate_run(catalog: Catalog, run_dir: Path, split: str | None = None, out_dir: Path | None = None,
                 device: str = "auto") -> tuple[TaskOutcome, ReportPaths]:
    """Score a trained head again from its run folder (its latest checkpoint, the backbone it was trained on) on
    `split` (default: its test split), with the baseline beside it; writes the report to `out_dir` (default:
    <run>/eval-<split>)."""
    run_dir = Path(run_dir)
    run_file = run_dir / RUN_FILE
    if not run_file.is_file():
        raise InputError(run_dir, RUN_FILE, "is not a head run folder (no run.json)",
                         "pass the --out folder of `hvp heads train` (or a task folder of `hvp heads run-all`)")
    recorded = json.loads(run_file.read_text())
    spec = TaskSpec.from_dict(recorded["spec"])
    spec = dataclasses.replace(spec, test_split=split or spec.test_split,
                               train=dataclasses.replace(spec.train, device=device))
    backbone = load_backbone(BackboneSpec(**recorded["backbone"]), device)
    if backbone.set_id != recorded["feature_set"]:
        raise InputError(run_file, "feature_set", f"the recorded backbone now gives feature set {backbone.set_id}, "
                         f"the head was trained on {recorded['feature_set']} (was the checkpoint file changed?)",
                         "restore the checkpoint the head was trained on, or train a new head")
    head, meta = load_head(run_dir)
    data = load_task_data(catalog, backbone, spec, with_train=False)
    report, timings = evaluate_head(catalog, head, backbone, data)
    outcome = TaskOutcome(report, run_dir, recorded["fingerprint"], count_trainable_parameters(head),
                          int(meta.get("step", 0)), data.counts, {"features_s": data.features_s, **timings})
    target = Path(out_dir) if out_dir is not None else run_dir / f"eval-{spec.test_split}"
    target.mkdir(parents=True, exist_ok=True)
    return outcome, write_task_report(target, [outcome], backbone)
