"""Prefect wiring of the downstream stages: frozen features (one task per dataset) and head-only adaptation (one
task per head), each reusing what its inputs already produced, then the report as artifacts. Logic lives in
stages.downstream; `downstream_flow` is what the DAG calls after pretraining."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import State
from pydantic import BaseModel, ConfigDict, Field, field_validator

from infra.settings import open_catalog
from pipelines.wiring import gpu_slot, skipped
from stages.downstream.features import RANDOM_INIT, BackboneSpec, cached_backbone, compute_features, feature_images
from stages.downstream.report import preview_data_uri
from stages.downstream.run import (
    DEFAULT_DATASETS,
    TASKS,
    TaskSpec,
    load_outcome,
    summarise,
    task_spec,
    train_task,
)


class BackboneParams(BaseModel):
    """The frozen backbone: a registry layout, its weights and the preprocessing contract."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(default="tiny", description="registry name: tiny | hypervision_b | hypervision_l | "
                       "hypervision_h | hyperfree_b")
    checkpoint: str = Field(default=RANDOM_INIT, description="weights file, pretraining checkpoint or run folder, "
                            "or random-init")
    seed: int = Field(default=0, description="seed of random-init weights")
    overrides: dict[str, Any] | None = Field(default=None, description="create_model overrides, e.g. "
                                             '{"img_size": 256}; none: the model\'s downstream defaults')
    preprocessing: Literal["released", "crop_max"] = "released"
    strict: bool = Field(default=True, description="strict checkpoint loading")

    def spec(self) -> BackboneSpec:
        """The stage's BackboneSpec."""
        return BackboneSpec(model=self.model, checkpoint=self.checkpoint, seed=self.seed, overrides=self.overrides,
                            preprocessing=self.preprocessing, strict=self.strict)


class FeaturesParams(BaseModel):
    """Parameters of the `features` flow."""

    model_config = ConfigDict(extra="forbid")
    catalog: str | None = Field(default=None, description="catalog URI (default: $HVP_CATALOG)")
    backbone: BackboneParams = Field(default_factory=BackboneParams)
    datasets: list[str] = Field(default_factory=lambda: [DEFAULT_DATASETS["segmentation"],
                                                         DEFAULT_DATASETS["saliency"]],
                                description="labelled datasets whose images to encode (tracking sets are skipped)")
    splits: list[str] | None = Field(default=None, description="only these splits (default: all)")
    batch_size: int = Field(default=8, ge=1)
    device: str = Field(default="auto", description="auto | cuda | cpu")


class HeadsParams(BaseModel):
    """Parameters of the `heads` flow."""

    model_config = ConfigDict(extra="forbid")
    catalog: str | None = Field(default=None, description="catalog URI (default: $HVP_CATALOG)")
    backbone: BackboneParams = Field(default_factory=BackboneParams)
    out_dir: str = Field(default="./hvp-data/runs/downstream", description="report and one run folder per task")
    tasks: dict[str, str] = Field(default_factory=lambda: dict(DEFAULT_DATASETS),
                                  description="task (segmentation | saliency | tracking) -> labelled dataset slug")
    steps: int | None = Field(default=None, ge=1, description="training steps per head (default: by model size)")
    seed: int = 0
    device: str = Field(default="auto", description="auto | cuda | cpu")

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, value: dict[str, str]) -> dict[str, str]:
        unknown = sorted(set(value) - set(TASKS))
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; choose among {list(TASKS)}")
        return value


DEFAULT_FEATURES = FeaturesParams()
DEFAULT_HEADS = HeadsParams()


# The catalog's feature store is the cache (a feature set id per backbone), so Prefect's own caching stays off.
@task(name="features-dataset", tags=["gpu"], cache_policy=NO_CACHE, task_run_name="features {dataset}")
def features_task(catalog_uri: str, backbone: dict[str, Any], dataset: str, splits: list[str] | None,
                  batch_size: int, device: str) -> dict[str, Any]:
    """Encode one dataset's labelled images the cache lacks (holding a `gpu` slot); returns a summary row."""
    cat = open_catalog(catalog_uri)
    loaded = cached_backbone(BackboneSpec(**backbone), device)
    ids, skipped = feature_images(cat, [dataset], splits)
    row: dict[str, Any] = {"dataset": dataset, "feature_set": loaded.set_id, "weights": loaded.provenance,
                           "images": len(ids), "computed": 0, "cached": 0, "seconds": 0.0, "note": ""}
    if skipped:
        print(f"{dataset}: skipped: {skipped[dataset]}")
        return {**row, "note": skipped[dataset]}
    with gpu_slot():
        run = compute_features(cat, loaded, ids, batch_size=batch_size)
    print(f"{dataset}: {len(run.computed)} image(s) encoded, {len(run.cached)} cache hit(s) skipped (unchanged "
          f"inputs) into feature set {run.set_id} ({loaded.provenance})")
    return {**row, "computed": len(run.computed), "cached": len(run.cached), "seconds": round(run.seconds, 2),
            "note": "unchanged: nothing to compute" if not run.computed else ""}


@flow(name="features", log_prints=True)
def features_flow(params: FeaturesParams = DEFAULT_FEATURES) -> list[dict[str, Any]] | State:
    """Compute and cache the frozen backbone's features of labelled datasets (cache hits are skipped; with
    nothing to compute the stage says so)."""
    cat = open_catalog(params.catalog)
    backbone = dataclasses.asdict(params.backbone.spec())
    rows = [features_task(cat.uri, backbone, d, params.splits, params.batch_size, params.device)
            for d in params.datasets]
    note = " (random-init weights: features show the plumbing, not quality)" if params.backbone.checkpoint in (
        RANDOM_INIT, "") else ""
    create_table_artifact(key="features-summary", table=rows or [{"dataset": "(none)"}],
                          description=f"Frozen {params.backbone.model} features cached in `{cat.uri}`{note}.")
    if rows and not any(r["computed"] for r in rows):
        cached = sum(r["cached"] for r in rows)
        return skipped("features", f"all {cached} images already have features of this backbone cached", rows)
    return rows


@task(name="heads-train", tags=["gpu"], cache_policy=NO_CACHE, task_run_name="heads {spec[task]} {spec[dataset]}")
def head_task(catalog_uri: str, backbone: dict[str, Any], spec: dict[str, Any], run_dir: str,
              device: str) -> dict[str, Any]:
    """Train, score and report one head holding a `gpu` slot (its run folder is reused when its inputs did not
    change)."""
    loaded = cached_backbone(BackboneSpec(**backbone), device)
    with gpu_slot():
        outcome = train_task(open_catalog(catalog_uri), loaded, TaskSpec.from_dict(spec), Path(run_dir),
                             replace=True)
    row = outcome.summary()
    if outcome.skipped:
        print(f"{row['task']}: inputs unchanged (fingerprint {outcome.fingerprint[:12]}): reused {run_dir}")
    else:
        print(f"{row['task']} head on {row['dataset']}: {row['trainable_parameters']:,} trainable parameters, "
              f"{row['metric']} {row['head']} vs baseline {row['baseline']}")
    return row


def _report_markdown(markdown: Path, plots: list[Path], description: str) -> str:
    """The report's markdown with its plots embedded as small data-URI previews (no file links)."""
    text = "\n".join(line for line in markdown.read_text().splitlines() if not line.startswith("Plots: "))
    previews = "\n\n".join(f"**{p.stem}**\n\n![{p.stem}]({preview_data_uri(p)})" for p in plots)
    return f"{text}\n\n## Plots\n\n{previews}\n\nReport files: `{markdown.parent}` ({description}).\n"


@flow(name="heads", log_prints=True)
def heads_flow(params: HeadsParams = DEFAULT_HEADS) -> dict[str, Any] | State:
    """Train one head per task on the frozen backbone's features (skipping those whose inputs did not change),
    score each against its trivial baseline and publish the report. Returns the report's paths and table."""
    cat = open_catalog(params.catalog)
    spec = params.backbone.spec()
    backbone = cached_backbone(spec, params.device)
    out_dir = Path(params.out_dir)
    specs = [task_spec(t, backbone.descriptor["model"], backbone.img_size, dataset=d, steps=params.steps,
                       seed=params.seed, device=params.device) for t, d in params.tasks.items()]
    record = dataclasses.asdict(spec)
    rows = [head_task(cat.uri, record, s.to_dict(), str(out_dir / s.task), params.device) for s in specs]
    outcomes = [load_outcome(out_dir / s.task, skipped=row["reused"]) for s, row in zip(specs, rows, strict=True)]
    result = summarise(out_dir, outcomes, backbone)
    weights = backbone.provenance
    create_table_artifact(key="heads-report", table=rows,
                          description=f"Head vs trivial baseline per task ({backbone.descriptor['model']}, weights "
                                      f"{weights}); primary metric, trainable parameters, seconds.")
    create_markdown_artifact(key="heads-report-markdown",
                             markdown=_report_markdown(result.report.markdown, list(result.report.plots), weights),
                             description=f"Downstream report, backbone weights {weights}")
    print(f"report: {result.report.json}")
    out = {"report": str(result.report.json), "markdown": str(result.report.markdown), "table": rows}
    if rows and all(r["reused"] for r in rows):
        return skipped("heads", f"all {len(rows)} heads' inputs unchanged (features, labels, parameters): "
                                "their results were reused", out)
    return out


@flow(name="downstream", log_prints=True)
def downstream_flow(catalog: str | None = None, checkpoint: str = RANDOM_INIT, model: str = "tiny",
                    preprocessing: str = "released", tasks: dict[str, str] | None = None,
                    out_dir: str = "./hvp-data/runs/downstream", steps: int | None = None,
                    overrides: dict[str, Any] | None = None, seed: int = 0, device: str = "auto") -> dict[str, Any]:
    """Features, then one head per task, then the report: what the DAG runs after pretraining (`checkpoint` is the
    pretraining run's folder or weights file). Returns {"report": report.json path, "markdown": report.md path,
    "table": one row per task (head vs baseline on the primary metric)}."""
    backbone = BackboneParams(model=model, checkpoint=checkpoint, overrides=overrides,
                              preprocessing=preprocessing, seed=seed)  # type: ignore[arg-type]  # validated here
    heads = HeadsParams(catalog=catalog, backbone=backbone, out_dir=out_dir, tasks=dict(tasks or DEFAULT_DATASETS),
                        steps=steps, seed=seed, device=device)
    datasets = [d for t, d in heads.tasks.items() if t != "tracking"]
    features_flow(FeaturesParams(catalog=catalog, backbone=backbone, datasets=datasets, device=device))
    result = heads_flow(heads)
    return result.result() if isinstance(result, State) else result
