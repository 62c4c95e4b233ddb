"""Every checkpoint evaluated: ``run_evaluation(catalog, EvaluationConfig) -> EvaluationResult``.

One evaluation runs the downstream heads (features cached on the way) on one pretraining checkpoint with the run's
downstream parameters and adds one row per task to the run's evaluation table: ``<run>/evaluations/`` holds one
Parquet file per evaluation (``rows/``, so that concurrent evaluations never write the same file), their union
``evaluations.parquet``, the plot of each task's primary metric against the pretraining step, the best checkpoint
per task (report.md / report.json) and TensorBoard event files. An evaluation is keyed on the checkpoint's sha256
and its protocol: evaluating the same weights under the same protocol again costs nothing.

Two numbers are comparable when everything but the weights is equal: the feature contract (layout, overrides,
preprocessing, stored dtype, GSD rule, the features' stage version), the head hyper-parameters (size, steps, seed),
the task's dataset, splits and label variant, and the versions of the metric definitions and head stage. Each row
records that protocol; the report never puts two results of different protocols in one row and says why.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from base.errors import InputError
from catalog.catalog import Catalog
from model.preprocess import DEFAULT_CONTRACT
from stages.downstream.features import STAGE_VERSION as FEATURES_VERSION
from stages.downstream.runners import BackboneConfig, Device, HeadsConfig, TaskChoice, run_heads
from stages.downstream.spec import HEADS_VERSION
from stages.downstream.tasks import ordered_tasks
from stages.downstream.train import LOG_FILE
from stages.labelling.labeler import file_sha256
from stages.metrics import METRICS_VERSION
from stages.registry import record_run_config, register_stage
from stages.research.cards import CONFIG_FILE, SNAPSHOT_DIR, WEIGHTS_FILE, keep_snapshot, step_of, write_model_card
from stages.research.tensorboard import EventWriter

EVAL_DIR = "evaluations"
TABLE_FILE = "evaluations.parquet"
ROWS_DIR = "rows"
PLOT_FILE = "metric_vs_step.png"
REPORT_MD, REPORT_JSON = "report.md", "report.json"
TB_DIR = "tensorboard"


class EvaluationConfig(BaseModel):
    """One checkpoint's evaluation: the checkpoint, its run, and the downstream protocol (tasks, heads' size and
    schedule, seed, the feature contract)."""

    model_config = ConfigDict(extra="forbid")

    checkpoint: str = Field(description="pretraining checkpoint folder (checkpoints/step_N or snapshots/step_N)")
    run_dir: str | None = Field(default=None, description="pretraining run folder; None: the checkpoint's run")
    step: int | None = Field(default=None, ge=0, description="pretraining step; None: from the folder name")
    tasks: list[TaskChoice] = Field(default_factory=list, description="tasks; empty: every registered task")
    head_size: Literal["small", "paper"] = Field(default="paper", description="the tasks' head sizes and schedules")
    steps: int | None = Field(default=None, ge=1, description="steps per head; None: the head size's schedule")
    pairs_per_sequence: int | None = Field(default=None, ge=1, description="tracking pairs per sequence")
    seed: int = Field(default=0, description="seed of head training")
    overrides: dict[str, Any] | None = Field(default=None, description="create_model overrides of the backbone")
    preprocessing: str | None = Field(default=None, description="input contract; None: the checkpoint's own")
    device: Device = "auto"
    out_dir: str | None = Field(default=None, description="evaluation folder; None: <run>/evaluations")

    def run_folder(self) -> Path:
        """The pretraining run the checkpoint belongs to."""
        if self.run_dir:
            return Path(self.run_dir)
        ckpt = Path(self.checkpoint).resolve()
        if ckpt.parent.name not in ("checkpoints", SNAPSHOT_DIR):
            raise InputError(ckpt, "run_dir", "is not inside a run's checkpoints/ or snapshots/ folder",
                             "name the pretraining run folder in run_dir")
        return ckpt.parent.parent

    def evaluation_folder(self) -> Path:
        """Where the run's evaluations accumulate."""
        return Path(self.out_dir) if self.out_dir else self.run_folder() / EVAL_DIR


@dataclass
class EvaluationResult:
    """One evaluation: its rows (one per task), whether they were found already, and the run's report files."""

    sha256: str
    step: int
    protocol_id: str
    rows: list[dict[str, Any]]
    reused: bool
    table: Path
    plot: Path
    report_md: Path
    best: list[dict[str, Any]]
    card: Path


class IncomparableResults(ValueError):
    """Raised when results of different protocols are asked to share one table row; says which fields differ."""


def protocol(config: EvaluationConfig, model: str, preprocessing: str) -> dict[str, Any]:
    """Everything that makes two evaluations' numbers comparable (all but the weights), as a flat dict."""
    tasks = config.tasks or [TaskChoice(task=n) for n in ordered_tasks()]
    out: dict[str, Any] = {
        "features.model": model, "features.overrides": json.dumps(config.overrides, sort_keys=True),
        "features.preprocessing": preprocessing, "features.dtype": BackboneConfig().dtype,
        "features.default_gsd_m": BackboneConfig().default_gsd_m, "features.version": FEATURES_VERSION,
        "head.size": config.head_size, "head.steps": config.steps, "head.seed": config.seed,
        "head.pairs_per_sequence": config.pairs_per_sequence, "head.version": HEADS_VERSION,
        "metrics.version": METRICS_VERSION,
    }
    for c in tasks:
        out[f"task.{c.task}"] = json.dumps(c.model_dump(mode="json"), sort_keys=True)
    return out


def protocol_id(proto: dict[str, Any]) -> str:
    """sha256 of a protocol."""
    return hashlib.sha256(json.dumps(proto, sort_keys=True, default=str).encode()).hexdigest()


def differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """The protocol fields in which two evaluations differ, as 'field: a vs b'."""
    return [f"{k}: {a.get(k)} vs {b.get(k)}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _row_protocol(row: dict[str, Any]) -> dict[str, Any]:
    """The protocol fields that bear on one task's row (the other tasks' choices do not)."""
    proto = json.loads(row["protocol"])
    return {k: v for k, v in proto.items() if not k.startswith("task.") or k == f"task.{row['task']}"}


def one_row(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Results of one task under one protocol merged into one table row (value per step); raises
    IncomparableResults naming every differing field when their protocols differ."""
    first = results[0]
    for other in results[1:]:
        if (other["task"], other["dataset"], other["metric"]) != (first["task"], first["dataset"], first["metric"]):
            raise IncomparableResults(f"{first['task']}/{first['dataset']}/{first['metric']} and "
                                      f"{other['task']}/{other['dataset']}/{other['metric']} are different measures")
        diff = differences(_row_protocol(first), _row_protocol(other))
        if diff:
            raise IncomparableResults(f"{first['task']}: step {first['step']} and step {other['step']} were "
                                      f"measured under different protocols ({'; '.join(diff)})")
    return {"task": first["task"], "dataset": first["dataset"], "metric": first["metric"],
            "protocol_id": protocol_id(_row_protocol(first)),
            "values": {int(r["step"]): float(r["value"]) for r in results}}


def best_checkpoints(rows: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """The best checkpoint per task and protocol (one table row each), and why rows of one task were kept apart
    (their protocols' differing fields)."""
    groups: dict[tuple[str, str, str, str], list[dict[str, Any]]] = {}
    for r in rows:
        key = (r["task"], r["dataset"], r["metric"], protocol_id(_row_protocol(r)))
        groups.setdefault(key, []).append(r)
    best, notes = [], []
    seen: dict[str, dict[str, Any]] = {}
    for (task, dataset, metric, pid), group in sorted(groups.items(), key=lambda g: g[0]):
        merged = one_row(group)
        higher = bool(group[0]["higher_is_better"])
        top = (max if higher else min)(group, key=lambda r: (float(r["value"]), -int(r["step"])))
        best.append({"task": task, "dataset": dataset, "metric": metric, "best_step": int(top["step"]),
                     "best_value": round(float(top["value"]), 4), "checkpoint": top["checkpoint"],
                     "sha256": top["sha256"][:12], "evaluations": len(merged["values"]), "protocol": pid[:12]})
        if task in seen:
            reason = "; ".join(differences(_row_protocol(seen[task]), _row_protocol(group[0])))
            notes.append(f"{task}: protocol {pid[:12]} is reported in its own row, not merged with "
                         f"{protocol_id(_row_protocol(seen[task]))[:12]}: {reason}")
        else:
            seen[task] = group[0]
    return best, notes


# ------------------------------------------------------------------------------------------------ the table
def read_table(folder: str | Path) -> pd.DataFrame:
    """Every evaluation row of a run (the union of its per-evaluation files), in step order."""
    parts = sorted((Path(folder) / ROWS_DIR).glob("*.parquet"))
    if not parts:
        return pd.DataFrame()
    return pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True).sort_values(["step", "task"])


def _write_parquet(df: pd.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    df.to_parquet(tmp, index=False)
    os.replace(tmp, path)


def plot_curves(df: pd.DataFrame, png: Path, title: str) -> Path:
    """Each task's primary metric (head, and its baseline dashed) against the pretraining step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted(set(df["task"]))
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.4), dpi=100, squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        rows = df[df["task"] == task].sort_values("step")
        for pid, group in rows.groupby("protocol_id"):
            ax.plot(group["step"], group["value"], marker="o", label=f"head ({str(pid)[:8]})")
            ax.plot(group["step"], group["baseline"], linestyle="--", color="grey", label="baseline")
        ax.set_title(f"{task} ({rows['dataset'].iloc[0]})", fontsize=9)
        ax.set_xlabel("pretraining step")
        ax.set_ylabel(str(rows["metric"].iloc[0]))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return png


def write_report(folder: Path, df: pd.DataFrame) -> tuple[Path, Path, list[dict[str, Any]], list[str]]:
    """The run's plot, best-checkpoint table and notes (report.md, report.json) from its evaluation rows."""
    rows = df.to_dict("records")
    best, notes = best_checkpoints(rows)
    random_init = bool(df["random_init"].any())
    note = " (random-init)" if random_init else ""
    png = plot_curves(df, folder / PLOT_FILE, f"downstream primary metric vs pretraining step{note}")
    lines = [f"# Evaluations of {folder.parent.name}{note}", "", f"{df['sha256'].nunique()} checkpoint(s), "
             f"{len(df)} result(s). Plot: `{png}`", "", "## Best checkpoint per task", "",
             "| task | dataset | metric | best step | value | evaluations | checkpoint sha256 | protocol |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {b['task']} | {b['dataset']} | {b['metric']} | {b['best_step']} | {b['best_value']} | "
              f"{b['evaluations']} | `{b['sha256']}` | `{b['protocol']}` |" for b in best]
    if notes:
        lines += ["", "## Not compared", ""] + [f"- {n}" for n in notes]
    lines += ["", "## Every evaluation", "", "| step | task | metric | head | baseline | sha256 |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {r['step']} | {r['task']} | {r['metric']} | {r['value']:.4f} | {r['baseline']:.4f} | "
              f"`{r['sha256'][:12]}` |" for r in rows]
    md, js = folder / REPORT_MD, folder / REPORT_JSON
    md.write_text("\n".join(lines) + "\n")
    js.write_text(json.dumps({"best": best, "notes": notes, "random_init": random_init,
                              "rows": [{k: v for k, v in r.items() if k != "protocol"} for r in rows]},
                             indent=2, default=str))
    return md, png, best, notes


def _tensorboard(folder: Path, rows: list[dict[str, Any]], heads_dir: Path, proto: dict[str, Any]) -> None:
    """The evaluation's scalars (eval/<task>/<metric> and its baseline at the pretraining step), the heads'
    training losses and the protocol as hyper-parameters."""
    step = int(rows[0]["step"])
    writer = EventWriter(folder / TB_DIR / "evaluation")
    values = {}
    for r in rows:
        values[f"eval/{r['task']}/{r['metric']}"] = float(r["value"])
        values[f"eval/{r['task']}/{r['metric']}_baseline"] = float(r["baseline"])
    writer.scalars(step, values)
    writer.hparams({**proto, "checkpoint.sha256": rows[0]["sha256"], "pretraining.step": step},
                   tag=f"hparams/step_{step}", metrics=[k for k in values if not k.endswith("_baseline")])
    for r in rows:
        log = heads_dir / r["task"] / LOG_FILE
        if not log.is_file():
            continue
        head_writer = EventWriter(folder / TB_DIR / f"heads-step_{step:07d}" / r["task"])
        for rec in pd.read_csv(log).to_dict("records"):
            head_writer.scalars(int(rec["step"]), {f"head/{r['task']}/loss": float(rec["loss"]),
                                                   f"head/{r['task']}/lr": float(rec["lr"])})


@register_stage("evaluate", EvaluationConfig, "Evaluate one pretraining checkpoint downstream (keyed on its "
                "sha256) and update its run's metric-vs-step table, plot and best-checkpoint report")
def run_evaluation(catalog: Catalog, config: EvaluationConfig) -> EvaluationResult:
    """Evaluate a checkpoint (kept as a snapshot of its run), or find its rows under the same protocol; then
    rebuild the run's table, plot, report and the snapshot's model card."""
    run_dir = config.run_folder()
    ckpt = Path(config.checkpoint)
    if not (ckpt / WEIGHTS_FILE).is_file() or not (ckpt / CONFIG_FILE).is_file():
        raise InputError(ckpt, "checkpoint", f"holds no {WEIGHTS_FILE} and {CONFIG_FILE}",
                         "pass a pretraining checkpoint folder (<run>/checkpoints/step_N or <run>/snapshots/step_N)")
    snapshot = ckpt if ckpt.parent.name == SNAPSHOT_DIR else keep_snapshot(ckpt, run_dir)
    resolved = json.loads((snapshot / CONFIG_FILE).read_text())
    model = resolved["config"]["model"]
    preprocessing = config.preprocessing or resolved["config"].get("preprocessing", DEFAULT_CONTRACT)
    sha = file_sha256(snapshot / WEIGHTS_FILE)
    step = config.step if config.step is not None else step_of(snapshot)
    proto = protocol(config, model, preprocessing)
    pid = protocol_id(proto)
    folder = config.evaluation_folder()
    part = folder / ROWS_DIR / f"{sha[:16]}-{pid[:12]}.parquet"
    reused = part.is_file()
    if not reused:
        record_run_config(folder, "evaluate", config)
        backbone = BackboneConfig(model=model, checkpoint=str(snapshot / WEIGHTS_FILE), overrides=config.overrides,
                                  preprocessing=preprocessing)
        heads_dir = folder / "heads" / f"{sha[:12]}-{pid[:8]}"
        t0 = time.perf_counter()
        result = run_heads(catalog, HeadsConfig(out_dir=str(heads_dir), backbone=backbone, tasks=config.tasks,
                                                head_size=config.head_size, steps=config.steps,
                                                pairs_per_sequence=config.pairs_per_sequence, seed=config.seed,
                                                device=config.device, overlays=0))
        seconds = round(time.perf_counter() - t0, 2)
        random_init = "random-init" in (resolved.get("student_weights"), resolved.get("teacher_weights"))
        rows = []
        for outcome in result.outcomes:
            section = outcome.report.section
            rows.append({
                "run": str(run_dir), "step": step, "checkpoint": str(snapshot), "sha256": sha,
                "task": outcome.report.task, "dataset": outcome.report.dataset, "metric": section.primary,
                "value": float(outcome.report.head[section.primary]),
                "baseline": float(outcome.report.baseline[section.primary]),
                "higher_is_better": bool(section.higher_is_better),
                "metrics": json.dumps(outcome.report.head, sort_keys=True), "feature_set": result.feature_set,
                "weights": result.weights, "protocol": json.dumps(proto, sort_keys=True), "protocol_id": pid,
                "heads_dir": str(outcome.run_dir), "seconds": seconds, "random_init": random_init,
                "evaluated_at": pd.Timestamp.now(tz="UTC").isoformat()})
        _write_parquet(pd.DataFrame(rows), part)
        _tensorboard(folder, rows, heads_dir, proto)
    df = read_table(folder)
    _write_parquet(df, folder / TABLE_FILE)
    md, png, best, _ = write_report(folder, df)
    mine = df[df["sha256"] == sha].to_dict("records")
    card, _ = write_model_card(catalog, snapshot, mine)
    return EvaluationResult(sha, step, pid, [r for r in mine if r["protocol_id"] == pid], reused,
                            folder / TABLE_FILE, png, md, best, card)


__all__ = ["EvaluationConfig", "EvaluationResult", "IncomparableResults", "best_checkpoints", "one_row",
           "read_table", "run_evaluation"]
