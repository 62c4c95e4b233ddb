"""A head run's outcome: its report entry, where it lives and what it cost; stored as result.json + overlays.npz in
the run folder (the commit point a rerun reuses), and the report of one or several outcomes."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stages.downstream.features import Backbone
from stages.downstream.report import Overlay, ReportPaths, TaskReport, write_report
from stages.downstream.tasks import TASKS
from stages.metrics import TrackingCurves

RUN_FILE, RESULT_FILE, OVERLAYS_FILE = "run.json", "result.json", "overlays.npz"


@dataclass
class TaskOutcome:
    """A head run's result: its report entry, where it lives, and what it cost."""

    report: TaskReport
    run_dir: Path
    fingerprint: str
    trainable_parameters: int
    steps: int
    counts: dict[str, int]
    timings: dict[str, float]
    skipped: bool = False
    """True when the inputs had not changed and the stored result was reused."""

    def summary(self) -> dict[str, Any]:
        """One table row: primary metric of head and baseline, the margin, the size and the time."""
        metric, higher = self.report.section.primary, self.report.section.higher_is_better
        head, base = self.report.head[metric], self.report.baseline[metric]
        return {"task": self.report.task, "dataset": self.report.dataset, "metric": metric,
                "head": round(head, 4), "baseline": round(base, 4),
                "margin": round((head - base) if higher else (base - head), 4),
                "trainable_parameters": self.trainable_parameters, "steps": self.steps,
                "train_items": self.counts.get("train", 0), "test_items": self.counts.get("test", 0),
                "seconds": round(sum(self.timings.values()), 2), "reused": self.skipped}


@dataclass
class DownstreamResult:
    """All heads of one backbone: the combined report, one summary row per task, and the runs."""

    report: ReportPaths
    table: list[dict[str, Any]]
    outcomes: list[TaskOutcome]


def _curves_json(curves: TrackingCurves | None) -> dict[str, list[float]] | None:
    return None if curves is None else {k: np.asarray(v).tolist() for k, v in dataclasses.asdict(curves).items()}


def _curves(data: dict[str, list[float]] | None) -> TrackingCurves | None:
    return None if data is None else TrackingCurves(**{k: np.asarray(v) for k, v in data.items()})


def write_json(path: Path, doc: dict[str, Any]) -> None:
    """Write `doc` as JSON atomically (a kill never leaves half a file)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=2, default=str))
    os.replace(tmp, path)


def save_outcome(outcome: TaskOutcome, out_dir: Path) -> None:
    """Write overlays.npz, then result.json atomically (enough to rebuild the report without recomputing anything).
    result.json marks a finished run folder: write it after everything else the run writes."""
    r = outcome.report
    arrays: dict[str, np.ndarray] = {}
    overlays = []
    for k, o in enumerate(r.overlays):
        arrays[f"image_{k}"] = np.asarray(o.image, dtype=np.float32)
        for name in ("target", "prediction"):
            value = getattr(o, name)
            if value is not None:
                arrays[f"{name}_{k}"] = np.asarray(value)
        overlays.append({"title": o.title, "boxes": {n: np.asarray(b).tolist() for n, b in o.boxes.items()}})
    np.savez_compressed(out_dir / OVERLAYS_FILE, **arrays)  # type: ignore[arg-type]  # numpy's stub types **kwds
    write_json(out_dir / RESULT_FILE, {
        "fingerprint": outcome.fingerprint, "task": r.task, "dataset": r.dataset, "head": r.head,
        "baseline": r.baseline, "confusion": None if r.confusion is None else np.asarray(r.confusion).tolist(),
        "class_names": list(r.class_names), "head_curves": _curves_json(r.head_curves),
        "baseline_curves": _curves_json(r.baseline_curves), "overlays": overlays,
        "trainable_parameters": outcome.trainable_parameters, "steps": outcome.steps, "counts": outcome.counts,
        "timings": outcome.timings})


def load_outcome(out_dir: Path, skipped: bool = True) -> TaskOutcome:
    """Rebuild a stored outcome (see `save_outcome`)."""
    doc = json.loads((out_dir / RESULT_FILE).read_text())
    with np.load(out_dir / OVERLAYS_FILE) as arrays:
        overlays = [Overlay(arrays[f"image_{k}"], o["title"],
                            arrays.get(f"target_{k}"), arrays.get(f"prediction_{k}"),
                            {n: np.asarray(b) for n, b in o["boxes"].items()})
                    for k, o in enumerate(doc["overlays"])]
    report = TaskReport(TASKS.get(doc["task"]).report, doc["dataset"], doc["head"], doc["baseline"],
                        confusion=None if doc["confusion"] is None else np.asarray(doc["confusion"]),
                        class_names=doc["class_names"], head_curves=_curves(doc["head_curves"]),
                        baseline_curves=_curves(doc["baseline_curves"]), overlays=overlays)
    return TaskOutcome(report, out_dir, doc["fingerprint"], doc["trainable_parameters"], doc["steps"],
                       doc["counts"], doc["timings"], skipped=skipped)


def model_label(backbone: Backbone) -> str:
    """The backbone as reports name it: registry name and overrides."""
    overrides = backbone.descriptor["overrides"]
    extra = ", ".join(f"{k}={v}" for k, v in sorted(overrides.items()))
    return f"{backbone.descriptor['model']} ({extra})" if extra else str(backbone.descriptor["model"])


def runs_markdown(outcomes: Sequence[TaskOutcome], feature_set: str) -> str:
    """The report's appendix: per head its trainable parameters, steps, split sizes, timings and run folder."""
    lines = ["## Runs", "", f"Feature set `{feature_set}` (catalog `features/sets/{feature_set}.json`).", "",
             "| task | dataset | trainable parameters | steps | train / test items | features s | train s | "
             "eval s | baseline s | reused |", "|---|---|---|---|---|---|---|---|---|---|"]
    for o in outcomes:
        t = o.timings
        lines.append(f"| {o.report.task} | {o.report.dataset} | {o.trainable_parameters:,} | {o.steps} | "
                     f"{o.counts.get('train', 0)} / {o.counts.get('test', 0)} | {t.get('features_s', 0):.1f} | "
                     f"{t.get('train_s', 0):.1f} | {t.get('eval_s', 0):.1f} | {t.get('baseline_s', 0):.1f} | "
                     f"{'yes' if o.skipped else 'no'} |")
    return "\n".join(lines)


def write_task_report(out_dir: Path, outcomes: Sequence[TaskOutcome], backbone: Backbone) -> ReportPaths:
    """The report of one or more head runs (write_report plus the runs appendix), provenance from the backbone."""
    return write_report(out_dir, [o.report for o in outcomes], weights=backbone.provenance,
                        preprocessing=backbone.spec.contract, model=model_label(backbone),
                        appendix=runs_markdown(outcomes, backbone.set_id))


def summarise(out_dir: Path, outcomes: Sequence[TaskOutcome], backbone: Backbone) -> DownstreamResult:
    """Write the combined report of several head runs under `out_dir`."""
    paths = write_task_report(Path(out_dir), outcomes, backbone)
    return DownstreamResult(paths, [o.summary() for o in outcomes], list(outcomes))
