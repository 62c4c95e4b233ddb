"""Prefect wiring of the downstream stages: frozen features (one task per dataset) and head-only adaptation (one
task per head), each reusing what its inputs already produced, then the report as artifacts. Logic lives in
stages.downstream; the `hypervision` DAG calls `features_flow` and `heads_flow` after pretraining.

Parameters follow pipelines.params: empty fields take the profile's values (the backbone's layout) or the
settings' paths, resolved to absolute ones and printed in the run. An empty checkpoint is the latest finished
pretraining run of the layout under the runs folder (random-init when there is none), and an empty report folder
is `<runs>/downstream-<model>-<feature set id>`, keyed on the frozen backbone as pretraining runs are keyed on
their inputs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import State

from infra.settings import get_settings
from pipelines.catalogs import open_catalog
from pipelines.fanout import sharded_features
from pipelines.params import (
    DEFAULT_BACKBONE,
    DEFAULT_DOWNSTREAM,
    DEFAULT_PATHS,
    BackboneParams,
    Device,
    DownstreamParams,
    PathParams,
    Profile,
    absolute_path,
    cached_feature_datasets,
    head_size_for,
)
from pipelines.profiles import pretrain_model, resolve
from pipelines.wiring import gpu_slot, publish_table, skipped
from stages.downstream.features import RANDOM_INIT, BackboneSpec, cached_backbone
from stages.downstream.heads import held_benchmarks
from stages.downstream.outcomes import load_outcome, summarise
from stages.downstream.report import preview_data_uri
from stages.downstream.runners import BackboneConfig, FeaturesConfig, HeadsConfig, TaskChoice, run_features, run_heads
from stages.pretraining.run import latest_finished_run

#: Longest side of a report plot embedded in the markdown artifact (the plots are at most ~860 px wide).
PLOT_PREVIEW_SIDE = 640


def resolve_backbone(profile: Profile, backbone: BackboneParams, runs: str) -> tuple[BackboneSpec, str]:
    """The frozen backbone of a run and where its weights come from: the layout given or the profile's, the
    checkpoint given (absolute) or the latest finished pretraining run of that layout under ``runs``, else
    random-init."""
    model = backbone.model_name(pretrain_model(profile))
    checkpoint = backbone.checkpoint or None
    if checkpoint is None:
        latest = latest_finished_run(runs, model)
        checkpoint = str(latest["checkpoint"]) if latest else RANDOM_INIT
        origin = (f"the latest finished pretraining run of {model} under {runs}" if latest else
                  f"random-init: no finished pretraining run of {model} under {runs}")
    elif checkpoint == RANDOM_INIT:
        origin = "random-init, as asked"
    else:
        checkpoint = absolute_path(checkpoint)
        origin = "as given"
    spec = BackboneSpec(model=model, checkpoint=checkpoint, seed=backbone.seed, overrides=backbone.overrides,
                        preprocessing=backbone.preprocessing.value if backbone.preprocessing else None,
                        strict=backbone.strict)
    return spec, origin


# The catalog's feature store is the cache (a feature set id per backbone), so Prefect's own caching stays off.
@task(name="features-dataset", tags=["gpu"], cache_policy=NO_CACHE, task_run_name="features {dataset}")
def features_task(catalog_uri: str, dataset: str, config: dict[str, Any]) -> dict[str, Any]:
    """Encode one dataset's labelled images the cache lacks (the features runner, holding a `gpu` slot); returns
    its summary row."""
    features = FeaturesConfig.model_validate(config)
    loaded = cached_backbone(features.backbone.to_spec(), features.device)
    with gpu_slot():
        row = run_features(open_catalog(catalog_uri), features, backbone=loaded).rows[0]
    if not row["images"]:
        print(f"{dataset}: skipped: {row['note']}")
    else:
        print(f"{dataset}: {row['computed']} image(s) encoded, {row['cached']} cache hit(s) skipped (unchanged "
              f"inputs) into feature set {row['feature_set']} ({row['weights']})")
    return row


@flow(name="features", log_prints=True)
def features_flow(profile: Profile = Profile.production, paths: PathParams = DEFAULT_PATHS,
                  backbone: BackboneParams = DEFAULT_BACKBONE, downstream: DownstreamParams = DEFAULT_DOWNSTREAM,
                  splits: list[str] | None = None, batch_size: int = 8) -> list[dict[str, Any]] | State:
    """Compute and cache the frozen backbone's multi-scale features of labelled datasets in the catalog (images
    already cached for the same weights, model, overrides and preprocessing are skipped; with nothing to compute
    the stage says so). Returns one row per dataset.

    Args:
        profile: Which profile fills the empty fields: demo (`tiny`), production (the -B layout) or test.
        paths: Catalog, runs folder (where the latest pretraining run is looked up) and the labelled datasets
            (slugs) to encode. Empty datasets: the chosen tasks' benchmarks but tracking's (the tracker encodes its
            crops on the fly), i.e. `hsi-drive-v2-0` and `hssod` by default.
        backbone: The frozen backbone: layout, weights (empty: the latest finished pretraining run) and
            preprocessing.
        downstream: The tasks whose datasets are encoded by default, and the device.
        splits: Only images of these splits. Empty: all.
        batch_size: Images encoded per batch.
    """
    run = resolve(profile, paths, downstream=downstream)
    p, downstream = run.paths, run.downstream
    spec, origin = resolve_backbone(profile, backbone, p.runs)
    chosen = p.datasets or cached_feature_datasets(downstream.task_datasets())
    print(f"features, profile {run.profile.value}: catalog {p.catalog}; backbone {spec.model}, weights "
          f"{spec.checkpoint or RANDOM_INIT} ({origin}); datasets {', '.join(chosen)}")
    base: dict[str, Any] = {"backbone": BackboneConfig.from_spec(spec), "splits": splits, "batch_size": batch_size,
                            "device": Device(downstream.device).value}
    if get_settings().dask_address:  # shards of images over the cluster's workers (one per device)
        rows = sharded_features(p.catalog, FeaturesConfig.model_validate({**base, "datasets": chosen}).model_dump(
            mode="json"))
    else:
        rows = [features_task(p.catalog, d, FeaturesConfig.model_validate({**base, "datasets": [d]}).model_dump(
            mode="json")) for d in chosen]
    note = " Random-init weights: features show the plumbing, not quality." if spec.random_init else ""
    short = [{"dataset": r["dataset"], "images": r["images"], "computed": r["computed"], "cached": r["cached"],
              "s": r["seconds"], "note": r["note"]} for r in rows]
    first = rows[0] if rows else {"feature_set": "-", "weights": RANDOM_INIT}
    publish_table("features-summary", short or [{"dataset": "(none)"}],
                  description=f"Frozen `{spec.model}` features, feature set `{first['feature_set']}`, "
                              f"weights {first['weights']}, cached in `{p.catalog}`.{note}")
    if rows and not any(r["images"] for r in rows):
        return skipped("features", "no labelled image to encode (" + "; ".join(
            f"{r['dataset']}: {r['note']}" for r in rows) + ")", rows)
    if rows and not any(r["computed"] for r in rows):
        cached = sum(r["cached"] for r in rows)
        return skipped("features", f"all {cached} images already have features of this backbone cached", rows)
    return rows


@task(name="heads-train", tags=["gpu"], cache_policy=NO_CACHE, task_run_name="heads {task} {dataset}")
def head_task(catalog_uri: str, task: str, dataset: str, config: dict[str, Any]) -> dict[str, Any]:
    """Train, score and report one head (the heads runner on one task, holding a `gpu` slot); its run folder is
    reused when its inputs did not change."""
    heads = HeadsConfig.model_validate(config)
    loaded = cached_backbone(heads.backbone.to_spec(), heads.device)
    with gpu_slot():
        result = run_heads(open_catalog(catalog_uri), heads, backbone=loaded)
    row, outcome = result.table[0], result.outcomes[0]
    if outcome.skipped:
        print(f"{task}: inputs unchanged (fingerprint {outcome.fingerprint[:12]}): reused {heads.out_dir}")
    else:
        print(f"{task} head on {dataset}: {row['trainable_parameters']:,} trainable parameters, "
              f"{row['metric']} {row['head']} vs baseline {row['baseline']}")
    return row


def _short_row(row: dict[str, Any]) -> dict[str, Any]:
    """A head's summary row with short columns, so that the table fits the UI's width."""
    return {"task": row["task"], "dataset": row["dataset"], "metric": row["metric"], "head": row["head"],
            "baseline": row["baseline"], "margin": row["margin"], "params": row["trainable_parameters"],
            "steps": row["steps"], "train/test": f"{row['train_items']}/{row['test_items']}", "s": row["seconds"],
            "reused": row["reused"]}


def _report_markdown(markdown: Path, plots: list[Path], weights: str) -> str:
    """The report's markdown for the UI: the plots embedded as data-URI previews (no file links), and this run's
    rows named `this run` (the weights are stated once, above the tables, so that the tables fit)."""
    text = "\n".join(line for line in markdown.read_text().splitlines() if not line.startswith("Plots: "))
    text = text.replace(f"| this run ({weights}) |", "| this run |")
    previews = "\n\n".join(f"**{p.stem}**\n\n![{p.stem}]({preview_data_uri(p, PLOT_PREVIEW_SIDE)})" for p in plots)
    return f"{text}\n\n## Plots\n\n{previews}\n\nReport files: `{markdown.parent}` (weights {weights}).\n"


@flow(name="heads", log_prints=True)
def heads_flow(profile: Profile = Profile.production, paths: PathParams = DEFAULT_PATHS,
               backbone: BackboneParams = DEFAULT_BACKBONE, downstream: DownstreamParams = DEFAULT_DOWNSTREAM,
               out_dir: str | None = None, seed: int = 0) -> dict[str, Any] | State:
    """Train one head per task on the frozen backbone's features (a task whose inputs did not change reuses its
    result; a task whose dataset the catalog lacks is left out, saying so), score each against its trivial baseline
    and publish the report. Returns the report's paths and table.

    Args:
        profile: Which profile fills the empty fields: demo (`tiny`), production (the -B layout) or test.
        paths: Catalog and runs folder (pretraining runs, reports), resolved to absolute paths.
        backbone: The frozen backbone: layout, weights (empty: the latest finished pretraining run) and
            preprocessing.
        downstream: Tasks (each with its labelled dataset), training steps per head and device.
        out_dir: Report folder, with one run folder per task. Empty: `<runs>/downstream-<model>-<feature set id>`.
        seed: Seed of head training.
    """
    run = resolve(profile, paths, downstream=downstream)
    p, downstream = run.paths, run.downstream
    spec, origin = resolve_backbone(profile, backbone, p.runs)
    tasks, missing = held_benchmarks(open_catalog(p.catalog), downstream.task_datasets())
    for note in missing:
        print(f"heads: left out: {note}")
    if not tasks:
        return skipped("heads", "; ".join(missing) or "no task chosen", {})
    device = Device(downstream.device).value
    loaded = cached_backbone(spec, device)
    folder = Path(absolute_path(out_dir)) if out_dir else Path(p.runs) / f"downstream-{spec.model}-{loaded.set_id}"
    print(f"heads, profile {run.profile.value}: catalog {p.catalog}; backbone {spec.model}, weights "
          f"{loaded.provenance} ({origin}); tasks {', '.join(f'{t} on {d}' for t, d in tasks.items())}; report "
          f"folder {folder}")
    base: dict[str, Any] = {"backbone": BackboneConfig.from_spec(spec), "head_size": head_size_for(
        loaded.descriptor["model"]), "steps": downstream.steps, "seed": seed, "device": device, "replace": True,
        "folder_per_task": False, "tune": downstream.tune}
    rows = [head_task(p.catalog, t, d, HeadsConfig.model_validate(
        {**base, "out_dir": str(folder / t), "tasks": [TaskChoice(task=t, dataset=d)]}).model_dump(mode="json"))
            for t, d in tasks.items()]
    outcomes = [load_outcome(folder / t, skipped=row["reused"]) for t, row in zip(tasks, rows, strict=True)]
    result = summarise(folder, outcomes, loaded)
    weights = loaded.provenance
    publish_table("heads-report", [_short_row(r) for r in rows],
                  description=f"Head vs trivial baseline per task on the primary metric (`{spec.model}`, "
                              f"weights {weights}); params: the head's trainable parameters; s: seconds. "
                              f"Report folder `{folder}`.")
    create_markdown_artifact(key="heads-report-markdown",
                             markdown=_report_markdown(result.report.markdown, list(result.report.plots), weights),
                             description=f"Downstream report, backbone weights {weights}")
    print(f"report: {result.report.json}")
    out = {"report": str(result.report.json), "markdown": str(result.report.markdown), "table": rows,
           "left_out": missing}
    if rows and all(r["reused"] for r in rows):
        return skipped("heads", f"all {len(rows)} heads' inputs unchanged (features, labels, parameters): "
                                "their results were reused", out)
    return out


@flow(name="downstream", log_prints=True)
def downstream_flow(profile: Profile = Profile.production, paths: PathParams = DEFAULT_PATHS,
                    backbone: BackboneParams = DEFAULT_BACKBONE, downstream: DownstreamParams = DEFAULT_DOWNSTREAM,
                    out_dir: str | None = None, seed: int = 0) -> dict[str, Any]:
    """Features, then one head per task, then the report (`hvp heads run-all`). Returns {"report": report.json
    path, "markdown": report.md path, "table": one row per task (head vs baseline on the primary metric)}."""
    whole_images = cached_feature_datasets(downstream.task_datasets())
    if whole_images:  # the tracker encodes its crops on the fly
        only = PathParams.model_validate({**paths.model_dump(), "datasets": whole_images})
        features_flow(profile, only, backbone, downstream)
    result = heads_flow(profile, paths, backbone, downstream, out_dir, seed)
    return result.result() if isinstance(result, State) else result
