"""The zero-shot suite: every chosen tuning-free task on an annotated scene the catalog holds for it, with one
backbone (the DAG runs it on the freshly pretrained checkpoint). Each task is one `run_zeroshot` with its released
defaults (``params`` override them per task); tasks whose annotation kind the catalog lacks are left out and said so.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from catalog.catalog import Catalog
from stages.registry import register_stage
from stages.zeroshot.run import TASKS, ZeroShotConfig, run_zeroshot


class ZeroShotSuiteConfig(BaseModel):
    """Which tasks, on which datasets (default: the first dataset holding the task's annotation kind), with which
    backbone; ``params`` maps a task to its parameter overrides."""

    model_config = ConfigDict(extra="forbid")
    tasks: list[str] = Field(default_factory=list, description="zero-shot tasks; empty: every registered task")
    datasets: dict[str, str] = Field(default_factory=dict, description="task -> dataset; empty: the first held")
    model: str = "tiny"
    checkpoint: str | None = None
    model_overrides: dict[str, Any] = Field(default_factory=dict)
    behaviour: str = "fixed"
    params: dict[str, dict[str, Any]] = Field(default_factory=dict)
    relax: bool = True
    seed: int = 0
    out: str = "zeroshot-suite"
    device: str = "cpu"


@dataclass
class ZeroShotSuiteResult:
    """One row per task and scene, the tasks left out (why), and each task's report folder."""

    rows: list[dict[str, Any]]
    left_out: dict[str, str]
    reports: dict[str, str] = field(default_factory=dict)
    random_init: bool = True


def held_scenes(catalog: Catalog, tasks: list[str], datasets: dict[str, str] | None = None
                ) -> tuple[dict[str, str], dict[str, str]]:
    """task -> dataset for the tasks whose annotation kind the catalog holds (the given dataset, else the first
    in name order), and task -> why for the others. Tasks with no annotation kind (segment-anything) take the first
    annotated airborne dataset."""
    images = catalog.images()
    kinds: dict[str, list[str]] = {}
    if not images.empty and "label_kind" in images:
        for kind, group in images[images["label_kind"].notna()].groupby("label_kind"):
            kinds[str(kind)] = sorted(set(group["dataset"]))
    airborne = sorted({d for k in ("pixel_classes", "target_map", "anomaly_map", "change_pair")
                       for d in kinds.get(k, [])})
    held: dict[str, str] = {}
    missing: dict[str, str] = {}
    for name in tasks:
        task = TASKS.get(name)
        wanted = (datasets or {}).get(name)
        candidates = sorted({d for k in task.kinds for d in kinds.get(k, [])}) if task.kinds else airborne
        if wanted is not None and wanted in candidates:
            held[name] = wanted
        elif wanted is not None:
            missing[name] = f"{wanted} holds no {' or '.join(task.kinds) or 'airborne'} annotation"
        elif candidates:
            held[name] = candidates[0]
        else:
            missing[name] = f"the catalog holds no {' or '.join(task.kinds) or 'airborne'} annotation"
    return held, missing


@register_stage("zeroshot-suite", ZeroShotSuiteConfig, "HyperFree's tuning-free tasks on every held scene kind")
def run_zeroshot_suite(catalog: Catalog, config: ZeroShotSuiteConfig) -> ZeroShotSuiteResult:
    """Run each chosen task (masks and features cached in the catalog, baselines beside) and write the suite's
    table (suite.json) beside the per-task reports, with the resolved config."""
    tasks = config.tasks or TASKS.names()
    held, missing = held_scenes(catalog, tasks, config.datasets)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "suite-config.json").write_text(json.dumps(config.model_dump(mode="json"), indent=2))
    result = ZeroShotSuiteResult(rows=[], left_out=missing)
    for name, dataset in held.items():
        run = run_zeroshot(catalog, ZeroShotConfig(
            task=name, dataset=dataset, model=config.model, checkpoint=config.checkpoint,
            model_overrides=config.model_overrides, behaviour=config.behaviour,  # type: ignore[arg-type]
            params=config.params.get(name, {}), relax=config.relax, seed=config.seed, out=str(out),
            device=config.device))
        result.reports[name] = str(run.report_json)
        result.random_init = result.random_init and run.random_init
        result.rows += [{"task": name, "dataset": dataset, **row} for row in run.rows]
    (out / "suite.json").write_text(json.dumps({"rows": result.rows, "left_out": missing, "reports": result.reports,
                                                "random_init": result.random_init}, indent=2, default=str))
    return result
