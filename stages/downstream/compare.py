"""Backbones side by side: the same heads on the same data for every listed backbone, into ONE report.

`run_compare(catalog, CompareConfig) -> CompareResult` runs `run_heads` once per backbone (a run folder per backbone
under `out_dir`, each with its own heads report), then writes compare.parquet, report.json and report.md: a row per
backbone per task (the task's columns, the primary metric, the head's trainable parameters, the backbone's
parameters and its feature time per image), the trivial baseline's row and the paper's figures in their own rows
(from the task cards). Features are cached per backbone (feature set ids), so adding a backbone costs only its own
encoding; rerunning reuses every head whose inputs did not change.

Feature time per image: each backbone encodes `timing_images` labelled test images of the compared datasets (whole
frames for tracking) one at a time, after one warm-up pass, timed on the run's device, whatever the cache holds.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from catalog.catalog import Catalog
from stages.downstream.features import Backbone, cube_info, encode, load_backbone, read_cube
from stages.downstream.outcomes import model_label, write_json
from stages.downstream.runners import BackboneConfig, Device, HeadsConfig, TaskChoice, run_heads
from stages.downstream.tasks import TASKS, ordered_tasks
from stages.registry import register_stage

COMPARE_CONFIG_FILE = "compare_config.json"


class CompareEntry(BaseModel):
    """One compared backbone: a label for the report and the frozen backbone (model + checkpoint or random-init)."""

    model_config = ConfigDict(extra="forbid")

    label: str | None = None
    """Row name in the report and run-folder name; None: the model name (plus "random-init" without weights)."""
    backbone: BackboneConfig

    @property
    def name(self) -> str:
        """The label, or one made from the model and its weights."""
        if self.label:
            return self.label
        weights = self.backbone.checkpoint
        return self.backbone.model + ("" if weights not in (None, "random-init") else " (random-init)")


class CompareConfig(BaseModel):
    """A comparison: the backbones, the tasks (with their datasets), the heads' size and schedule, where it goes."""

    model_config = ConfigDict(extra="forbid")

    out_dir: str
    backbones: list[CompareEntry] = Field(min_length=1)
    tasks: list[TaskChoice] = Field(default_factory=list)
    """Empty: every registered task on its benchmark."""
    head_size: Literal["small", "paper"] = "paper"
    """"small" (CPU-sized, fixtures) or "paper" (the paper's heads and schedules)."""
    steps: int | None = Field(default=None, ge=1)
    seed: int = 0
    device: Device = "auto"
    timing_images: int = Field(default=2, ge=1)
    """Images encoded per backbone to time its features."""
    replace: bool = False

    @model_validator(mode="after")
    def _unique_labels(self) -> CompareConfig:
        names = [e.name for e in self.backbones]
        if len(set(names)) != len(names):
            raise ValueError(f"CompareConfig.backbones: labels must differ, got {names}; give each entry a label")
        return self

    def task_choices(self) -> list[TaskChoice]:
        """The tasks given, or every registered task on its benchmark."""
        return self.tasks or [TaskChoice(task=n) for n in ordered_tasks()]


@dataclass
class CompareResult:
    """The comparison: its rows (this run's, the baselines' and the paper's), the report files and the config."""

    rows: list[dict[str, Any]]
    parquet: Path
    json: Path
    markdown: Path
    config_path: Path
    heads_reports: dict[str, Path]
    """Backbone label -> its own heads report.md."""


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-")


def timing_images(catalog: Catalog, datasets: list[str], splits: list[str]) -> list[str]:
    """Labelled images of the compared datasets' test splits (whole frames for tracking), in id order: what each
    backbone encodes to time its features."""
    index = catalog.images()
    if index.empty:
        return []
    rows = index[index["dataset"].isin(datasets) & index["split"].isin(splits) & index["label_kind"].notna()]
    return sorted(rows["image_id"])


def feature_ms_per_image(catalog: Catalog, backbone: Backbone, image_ids: list[str], n: int) -> float | None:
    """Milliseconds to encode one image (mean over `n` images, one at a time, after a warm-up pass); None when
    there is no image to time."""
    ids = image_ids[:n]
    if not ids:
        return None
    cubes = [(read_cube(catalog, i), cube_info(catalog, i, backbone.spec.default_gsd_m)) for i in ids]
    encode(backbone, [cubes[0][0]], cubes[0][1].wavelengths, [cubes[0][1].gsd_m])  # warm-up
    sync = torch.cuda.synchronize if backbone.device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for cube, info in cubes:
        encode(backbone, [cube], info.wavelengths, [info.gsd_m])
    sync()
    return 1000.0 * (time.perf_counter() - start) / len(cubes)


def _task_rows(label: str, backbone: Backbone, table: list[dict[str, Any]], reports: dict[str, Any],
               ms: float | None) -> list[dict[str, Any]]:
    """This run's rows of one backbone and the trivial baselines' rows (the same for every backbone), per task."""
    params = sum(p.numel() for p in backbone.model.parameters())
    rows = []
    for summary in table:
        task = TASKS.get(summary["task"])
        entry = reports[summary["task"]]
        for source, scores in (("this run", entry["head"]), ("baseline", entry["baseline"])):
            ours = source == "this run"
            rows.append({
                "task": summary["task"], "dataset": summary["dataset"],
                "backbone": label if ours else task.report.baseline_name,
                "source": source, "model": model_label(backbone) if ours else None,
                "weights": backbone.provenance if ours else None,
                "random_init": ours and "random-init" in backbone.provenance, "metric": summary["metric"],
                "value": float(scores[summary["metric"]]),
                **{c.label: float(scores[c.metric]) * c.scale for c in task.report.columns
                   if c.metric is not None and c.metric in scores},
                "trainable_parameters": summary["trainable_parameters"] if ours else None,
                "backbone_parameters": params if ours else None,
                "feature_ms_per_image": ms if ours else None,
                "feature_set": backbone.set_id if ours else None,
                "reused": bool(summary["reused"]) if ours else None,
            })
    return rows


def _paper_rows(task: str, dataset: str) -> list[dict[str, Any]]:
    """The paper's figures for a task's dataset, one row per published method (from the task card)."""
    section = TASKS.get(task).report
    table = section.paper_table(dataset)
    if table is None:
        return []
    rows = []
    for method, figures in table.rows.items():
        cells = {c.label: float(v) for c, v in zip(section.columns, figures, strict=False)}
        primary = next((float(v) / c.scale for c, v in zip(section.columns, figures, strict=False)
                        if c.metric == section.primary), None)
        rows.append({"task": task, "dataset": dataset, "backbone": method, "source": "paper", "model": None,
                     "weights": None, "random_init": False, "metric": section.primary, "value": primary, **cells,
                     "trainable_parameters": None, "backbone_parameters": None, "feature_ms_per_image": None,
                     "feature_set": None, "reused": None})
    return rows


def _fmt(value: Any) -> str:
    """A table cell: counts with thousands separators, scores to 4 significant digits, absent as a dash."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "—"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int | np.integer):
        return f"{int(value):,}"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1 else f"{value:,.2f}"
    return str(value)


def compare_markdown(rows: list[dict[str, Any]]) -> str:
    """One table per task: a row per backbone, then the baseline's and the paper's rows."""
    md = ["# Backbones compared", "",
          "The same heads on the same data for every backbone (head-only adaptation on frozen features). Rows "
          "marked paper are published figures, not measured here."]
    random = sorted({r["backbone"] for r in rows if r["random_init"]})
    if random:
        md += ["", f"**random-init backbones ({', '.join(random)}): their figures measure the pipeline, not a "
                   "trained backbone.**"]
    for task, dataset in dict.fromkeys((r["task"], r["dataset"]) for r in rows):
        part = [r for r in rows if (r["task"], r["dataset"]) == (task, dataset)]
        section = TASKS.get(task).report
        columns = [c.label for c in section.columns if any(c.label in r for r in part)]
        header = ["backbone", "source", "weights", *columns, f"{section.primary} (primary)", "trainable parameters",
                  "backbone parameters", "feature ms / image"]
        md += ["", f"## {task} on {dataset}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for r in part:
            cells = [r["backbone"], r["source"], r["weights"], *(r.get(c) for c in columns), r["value"],
                     r["trainable_parameters"], r["backbone_parameters"], r["feature_ms_per_image"]]
            md.append("| " + " | ".join(_fmt(c) for c in cells) + " |")
    return "\n".join(md) + "\n"


@register_stage("compare", CompareConfig, "The same heads on the same data for several backbones, into one report")
def run_compare(catalog: Catalog, config: CompareConfig) -> CompareResult:
    """Every backbone of the config through `run_heads` (features cached per backbone; heads reused when their
    inputs did not change), then one report of all of them beside the paper's figures."""
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    choices = config.task_choices()
    timing_ids = timing_images(catalog, [c.dataset or TASKS.get(c.task).default_dataset for c in choices],
                               [c.test_split for c in choices])
    rows: list[dict[str, Any]] = []
    sets: dict[str, str] = {}
    heads_reports: dict[str, Path] = {}
    for entry in config.backbones:
        backbone = load_backbone(entry.backbone.to_spec(), config.device)
        if backbone.set_id in sets:
            raise ValueError(f"CompareConfig.backbones: {entry.name!r} and {sets[backbone.set_id]!r} are the same "
                             f"backbone (feature set {backbone.set_id}); give one other weights, seed or model")
        sets[backbone.set_id] = entry.name
        heads = run_heads(catalog, HeadsConfig(
            out_dir=str(out / _slug(entry.name)), backbone=entry.backbone, tasks=choices, head_size=config.head_size,
            steps=config.steps, seed=config.seed, device=config.device, replace=config.replace), backbone=backbone)
        heads_reports[entry.name] = heads.report.markdown
        reports = json.loads(heads.report.json.read_text())["tasks"]
        ms = feature_ms_per_image(catalog, backbone, timing_ids, config.timing_images)
        rows += [r for r in _task_rows(entry.name, backbone, heads.table, reports, ms)
                 if r["source"] == "this run" or entry is config.backbones[0]]
    for task, dataset in dict.fromkeys((r["task"], r["dataset"]) for r in list(rows)):
        rows += _paper_rows(task, dataset)
    order = {c.task: i for i, c in enumerate(choices)}
    source_order = {"this run": 0, "baseline": 1, "paper": 2}
    rows.sort(key=lambda r: (order[r["task"]], source_order[r["source"]]))
    parquet = out / "compare.parquet"
    pd.DataFrame(rows).to_parquet(parquet, index=False)
    doc = {"backbones": [{"label": e.name, **e.backbone.model_dump(mode="json")} for e in config.backbones],
           "random_init": sorted({r["backbone"] for r in rows if r["random_init"]}), "rows": rows}
    json_path = out / "report.json"
    json_path.write_text(json.dumps(doc, indent=2, default=str))
    md_path = out / "report.md"
    md_path.write_text(compare_markdown(rows))
    config_path = out / COMPARE_CONFIG_FILE
    write_json(config_path, {"config": config.model_dump(mode="json"), "feature_sets": sets, "catalog": catalog.uri})
    return CompareResult(rows, parquet, json_path, md_path, config_path, heads_reports)
