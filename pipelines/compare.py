"""Prefect wiring of the compare stage: the same heads on the same data for several backbones, one report
(stages.downstream.compare.run_compare), published as a table and a markdown artifact. The `hypervision` DAG runs it
after its heads stage when `downstream.backbones` lists backbones (the run's own backbone first).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import State

from pipelines.catalogs import open_catalog
from pipelines.downstream import resolve_backbone
from pipelines.params import (
    DEFAULT_BACKBONE,
    DEFAULT_DOWNSTREAM,
    DEFAULT_PATHS,
    CompareBackboneParams,
    Device,
    DownstreamParams,
    PathParams,
    Profile,
    absolute_path,
    head_size_for,
)
from pipelines.profiles import resolve
from pipelines.wiring import gpu_slot, skipped
from stages.downstream.compare import CompareConfig, CompareEntry, run_compare
from stages.downstream.features import RANDOM_INIT, BackboneSpec
from stages.downstream.heads import held_benchmarks
from stages.downstream.runners import BackboneConfig, TaskChoice


def compare_entry(params: CompareBackboneParams) -> CompareEntry:
    """A compared backbone from its flow parameters (a checkpoint path made absolute)."""
    checkpoint = params.checkpoint or RANDOM_INIT
    if checkpoint != RANDOM_INIT:
        checkpoint = absolute_path(checkpoint)
    return CompareEntry(label=params.label, backbone=BackboneConfig(model=str(params.model.value),
                                                                    checkpoint=checkpoint, seed=params.seed))


def own_entry(spec: BackboneSpec, label: str) -> CompareEntry:
    """A run's own backbone (resolved from the profile or the DAG) as the first compared entry."""
    return CompareEntry(label=label, backbone=BackboneConfig.from_spec(spec))


@task(name="compare-backbones", tags=["gpu"], cache_policy=NO_CACHE)
def compare_task(catalog_uri: str, config: dict[str, Any]) -> dict[str, Any]:
    """Run the compare stage (holding a `gpu` slot); returns the report's paths and rows."""
    with gpu_slot():
        result = run_compare(open_catalog(catalog_uri), CompareConfig.model_validate(config))
    return {"report": str(result.json), "markdown": str(result.markdown), "parquet": str(result.parquet),
            "rows": result.rows}


def _short(row: dict[str, Any]) -> dict[str, Any]:
    """A compare row in the UI's width."""
    return {"task": row["task"], "backbone": row["backbone"], "source": row["source"], "metric": row["metric"],
            "value": None if row["value"] is None else round(float(row["value"]), 4),
            "params": row["trainable_parameters"], "ms/image": None if row["feature_ms_per_image"] is None
            else round(float(row["feature_ms_per_image"]), 1), "weights": row["weights"]}


def compare_backbones(catalog: str, entries: list[CompareEntry], downstream: DownstreamParams, out_dir: Path,
                      seed: int = 0) -> dict[str, Any] | State:
    """The compare stage on the chosen tasks the catalog holds, with artifacts; a skipped state when it holds
    none."""
    tasks, missing = held_benchmarks(open_catalog(catalog), downstream.task_datasets())
    for note in missing:
        print(f"compare: left out: {note}")
    if not tasks:
        return skipped("compare", "; ".join(missing) or "no task chosen", {})
    sizes = {head_size_for(e.backbone.model) for e in entries}
    config = CompareConfig(out_dir=str(out_dir), backbones=entries,
                           tasks=[TaskChoice(task=t, dataset=d) for t, d in tasks.items()],
                           head_size="small" if sizes == {"small"} else "paper", steps=downstream.steps, seed=seed,
                           device=Device(downstream.device).value)
    print(f"compare: {', '.join(e.name for e in entries)} on {', '.join(f'{t} ({d})' for t, d in tasks.items())}; "
          f"{config.head_size} heads; report folder {out_dir}")
    out = compare_task(catalog, config.model_dump(mode="json"))
    ours = [r for r in out["rows"] if r["source"] == "this run"]
    create_table_artifact(key="compare-report", table=[_short(r) for r in out["rows"]],
                          description="Backbones compared: the same heads on the same data; rows marked paper are "
                                      "published figures, baseline the trivial baseline. random-init weights are "
                                      f"stated per row. Report `{out['markdown']}`.")
    create_markdown_artifact(key="compare-report-markdown", markdown=Path(out["markdown"]).read_text(),
                             description="Backbones compared, one table per task")
    for r in ours:
        ms = r["feature_ms_per_image"]
        print(f"compare: {r['backbone']} on {r['task']}: {r['metric']} {r['value']:.4f} ({r['weights']}); "
              f"{r['trainable_parameters']:,} head parameters; features "
              + ("not timed (no labelled test image)" if ms is None else f"{ms:.1f} ms/image"))
    result = {**out, "left_out": missing}
    if ours and all(r["reused"] for r in ours):
        return skipped("compare", f"all {len(ours)} heads' inputs unchanged (features, labels, parameters): their "
                                  "results were reused", result)
    return result


@flow(name="compare", log_prints=True)
def compare_flow(backbones: list[CompareBackboneParams] | None = None, profile: Profile = Profile.production,
                 paths: PathParams = DEFAULT_PATHS, downstream: DownstreamParams = DEFAULT_DOWNSTREAM,
                 out_dir: str | None = None, seed: int = 0) -> dict[str, Any] | State:
    """The same heads on the same data for every listed backbone, into one report (a row per backbone per task,
    the trivial baseline's and the paper's figures beside them, trainable parameters and feature time per image).
    Features are cached per backbone and unchanged heads are reused, so adding a backbone costs only its own runs.

    Args:
        backbones: The backbones, each a registry layout with a checkpoint or random-init. Empty: the profile's
            backbone (the latest finished pretraining run of its layout, else random-init) beside the profile's
            `downstream.backbones`.
        profile: Which profile fills the empty fields (the tasks' steps and device, the default backbones).
        paths: Catalog and runs folder, resolved to absolute paths.
        downstream: Tasks (each with its labelled dataset), steps per head and device.
        out_dir: Report folder. Empty: `<runs>/compare`.
        seed: Seed of head training.
    """
    run = resolve(profile, paths, downstream=downstream)
    if backbones:
        entries = [compare_entry(b) for b in backbones]
    else:
        spec, origin = resolve_backbone(run.profile, DEFAULT_BACKBONE, run.paths.runs)
        print(f"compare: the profile's backbone {spec.model}: {origin}")
        entries = [own_entry(spec, spec.model), *(compare_entry(b) for b in run.downstream.backbones)]
    folder = Path(absolute_path(out_dir)) if out_dir else Path(run.paths.runs) / "compare"
    return compare_backbones(run.paths.catalog, entries, run.downstream, folder, seed)
