"""Ablations as a grid (the paper's Table 5): ``run_ablation(catalog, AblationConfig) -> AblationResult``.

The axes are the pseudo-mask sources (spatial only; spatial + spectral; + material), distillation on or off and the
model sizes. Every branch that some variant needs is labelled once (the label stage skips images its labeler id
has already labelled) and every source set is fused once (its fusion id names the labelers it fuses), so the
labelling and fusion caches are shared by all variants. Each variant then pretrains on its fusion's pseudo-targets
(a run keyed on its inputs: an unchanged variant reuses its finished run) and its last checkpoint is evaluated
(stages.research.evaluation). The table has Table 5's layout: a row per variant and model with each task's primary
metric, beside the paper's figures in rows marked 'paper' (stages/research/table5.yaml; blank where the project's
references hold none).
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import yaml
from pydantic import BaseModel, ConfigDict, Field

from catalog.catalog import Catalog
from stages.downstream.runners import TaskChoice
from stages.labelling.label import BranchName, FuseConfig, LabelConfig, LabelerSpec, run_fuse, run_label
from stages.pretraining.run import PretrainStageConfig, run_pretrain
from stages.registry import record_run_config, register_stage
from stages.research.cards import SNAPSHOT_DIR, keep_snapshot, step_of
from stages.research.evaluation import EvaluationConfig, run_evaluation

Sources = Literal["spatial", "spatial+spectral", "spatial+spectral+material"]
ALL_SOURCES: list[Sources] = ["spatial", "spatial+spectral", "spatial+spectral+material"]
SOURCES: dict[str, tuple[BranchName, ...]] = {"spatial": ("spatial",), "spatial+spectral": ("spatial", "spectral"),
                                       "spatial+spectral+material": ("spatial", "spectral", "material")}
TABLE_FILE = Path(__file__).with_name("table5.yaml")


@cache
def table_layout() -> dict[str, Any]:
    """Table 5's layout and the paper's figures (stages/research/table5.yaml)."""
    return dict(yaml.safe_load(TABLE_FILE.read_text()))


def variant_key(sources: str, distillation: bool) -> str:
    """A variant's key in the table ("spatial+spectral/distill")."""
    return f"{sources}/{'distill' if distillation else 'no-distill'}"


class AblationConfig(BaseModel):
    """The grid (sources x distillation x models), the labelers and fusion tau, the base pretraining config and the
    evaluation protocol shared by every variant."""

    model_config = ConfigDict(extra="forbid")

    labelers: dict[BranchName, LabelerSpec] = Field(description="each branch's labeler (those the sources need)")
    tau: float = Field(default=0.7, gt=0.0, le=1.0, description="IoU threshold of the fusion's global NMS")
    sources: list[Sources] = Field(default_factory=lambda: list(ALL_SOURCES), description="pseudo-mask source sets")
    distillation: list[bool] = Field(default_factory=lambda: [False, True], description="distillation off / on")
    models: list[str] = Field(default_factory=lambda: ["tiny"], description="registry models to pretrain")
    pretrain: PretrainStageConfig = Field(description="base pretraining config (model, lambda_distill, fusion and "
                                          "folder set per variant; lambda_distill is the 'on' weight)")
    tasks: list[TaskChoice] = Field(default_factory=list, description="evaluation tasks; empty: every task")
    head_size: Literal["small", "paper"] = "paper"
    head_steps: int | None = Field(default=None, ge=1, description="steps per head; None: the head size's")
    pairs_per_sequence: int | None = Field(default=None, ge=1)
    seed: int = 0
    device: Literal["auto", "cuda", "cpu"] = "auto"
    datasets: list[str] | None = Field(default=None, description="pretraining datasets; None: all")
    out_dir: str = Field(description="ablation folder: runs/, evaluations/<variant>/, table5.*")


@dataclass
class AblationResult:
    """The grid's rows (one per variant and model, plus the paper's rows) and the table files."""

    rows: list[dict[str, Any]]
    markdown: Path
    table: Path
    fusion_ids: dict[str, str]


def _last_snapshot(run_dir: str, checkpoint: str) -> Path:
    """The newest snapshot of a run (a run finished before snapshots existed: its last checkpoint, kept now)."""
    snaps = sorted((Path(run_dir) / SNAPSHOT_DIR).glob("step_*"), key=step_of)
    return snaps[-1] if snaps else keep_snapshot(checkpoint, run_dir)


def table_markdown(rows: list[dict[str, Any]], random_init: bool) -> str:
    """Table 5's layout: variant, sources, distillation, model, a column per task (primary metric, %)."""
    columns = table_layout()["columns"]
    note = " Measured rows are random-init." if random_init else ""
    head = "| row | variant | sources | distillation | model | " + " | ".join(c["label"] for c in columns) + " |"
    lines = ["# Ablation (the paper's Table 5 layout)", "", f"Metrics in % (each task's primary metric).{note}", "",
             head, "|" + "---|" * (5 + len(columns))]
    for r in rows:
        cells = [("" if r.get(c["task"]) is None else f"{r[c['task']]:.2f}") for c in columns]
        lines.append(f"| {r['row']} | {r['label']} | {r['sources']} | {'on' if r['distillation'] else 'off'} | "
                     f"{r['model']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


@register_stage("ablation", AblationConfig, "Pretrain and evaluate every variant of the grid (sources x "
                "distillation x models) on shared label and fusion caches; write Table 5's layout")
def run_ablation(catalog: Catalog, config: AblationConfig) -> AblationResult:
    """Label and fuse once per branch and source set, pretrain and evaluate each variant, write table5.md /
    table5.json / table5.parquet (and the resolved config) in `out_dir`."""
    out = Path(config.out_dir)
    record_run_config(out, "ablation", config)
    layout = table_layout()
    labels = {v["sources"] + ("/distill" if v["distillation"] else "/no-distill"): v["label"]
              for v in layout["variants"]}
    needed: list[BranchName] = sorted({b for s in config.sources for b in SOURCES[s]})
    missing = [b for b in needed if b not in config.labelers]
    if missing:
        raise ValueError(f"AblationConfig.labelers lacks {missing}, which the sources {config.sources} need: add "
                         "their labeler specs (the profile's label group gives all three)")
    for branch in needed:
        run_label(catalog, LabelConfig(branch=branch, labeler=config.labelers[branch], datasets=config.datasets))
    fusion_ids: dict[str, str] = {}
    for sources in config.sources:
        fused = run_fuse(catalog, FuseConfig(labelers={b: config.labelers[b] for b in SOURCES[sources]},
                                             tau=config.tau, overlays=0, datasets=config.datasets))
        fusion_ids[sources] = fused.fusion_id
    rows: list[dict[str, Any]] = []
    random_init = False
    for model, sources, distill in itertools.product(config.models, config.sources, config.distillation):
        key = variant_key(sources, distill)
        lam = config.pretrain.lambda_distill if distill else 0.0
        pre = config.pretrain.model_copy(update={"model": model, "lambda_distill": lam,
                                                 "fusion_id": fusion_ids[sources], "out_dir": None,
                                                 "runs": str(out / "runs"), "datasets": config.datasets})
        result = run_pretrain(catalog, pre)
        random_init |= result.random_init
        evaluation = run_evaluation(catalog, EvaluationConfig(
            checkpoint=str(_last_snapshot(result.out_dir, result.checkpoint)), run_dir=result.out_dir,
            tasks=config.tasks, head_size=config.head_size, steps=config.head_steps,
            pairs_per_sequence=config.pairs_per_sequence, seed=config.seed, device=config.device,
            out_dir=str(out / "evaluations" / f"{model}-{key.replace('/', '-')}")))
        row: dict[str, Any] = {"row": "this run", "variant": key, "label": labels.get(key, key), "sources": sources,
                               "distillation": distill, "model": model, "fusion_id": fusion_ids[sources],
                               "run": result.out_dir, "sha256": evaluation.sha256, "step": evaluation.step,
                               "protocol_id": evaluation.protocol_id, "random_init": result.random_init}
        for r in evaluation.rows:
            row[r["task"]] = 100.0 * float(r["value"])
            row[f"{r['task']}_metric"] = r["metric"]
        rows.append(row)
    for c in layout["columns"]:
        for row in rows:
            if row.get(f"{c['task']}_metric", c["metric"]) != c["metric"]:
                raise ValueError(f"{TABLE_FILE}: column {c['task']} names metric {c['metric']} but the task's "
                                 f"primary metric is {row[c['task'] + '_metric']}: fix the column")
    for key, figures in layout["paper"].items():
        sources, distill = key.split("/")[0], key.endswith("/distill")
        rows.append({"row": "paper", "variant": key, "label": labels.get(key, key), "sources": sources,
                     "distillation": distill, "model": "paper", **figures})
    md = out / "table5.md"
    md.write_text(table_markdown(rows, random_init))
    (out / "table5.json").write_text(json.dumps({"rows": rows, "fusion_ids": fusion_ids,
                                                 "random_init": random_init}, indent=2, default=str))
    table = out / "table5.parquet"
    pd.DataFrame(rows).astype({"distillation": bool}).to_parquet(table, index=False)
    return AblationResult(rows, md, table, fusion_ids)
