"""Prefect wiring of pseudo-labelling, fusion and relabelling of new datasets: ids and configurations in, ids out,
logic in stages/.

The mask store is the cache: a branch labels only the images without masks for its labeler id (which hashes the
model config, the checkpoint's sha256 and the parameters), fusion only the images without a pseudo-target for its
fusion id. A stage whose inputs are unchanged therefore has nothing to do; it returns a "Skipped" state saying so.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.states import State

from base.markdown import escape_markdown
from infra.settings import get_settings
from pipelines.catalogs import open_catalog
from pipelines.params import DEFAULT_LABEL, DEFAULT_PATHS, LabelParams, PathParams, Profile
from pipelines.profiles import RunConfig, resolve
from pipelines.wiring import (
    concurrently,
    engine_runner,
    fan_out,
    gpu_slot,
    in_process_subflows,
    png_data_uri,
    publish_markdown,
    publish_table,
    retry_on_io,
    skipped,
    threads,
    worker_device,
)
from stages.labelling import label as stage
from stages.labelling.label import LabelConfig, LabelerSpec


@task(name="label-images", retries=1, retry_delay_seconds=5, retry_condition_fn=retry_on_io, cache_policy=NO_CACHE,
      task_run_name="{branch} {image_ids[0]} (+{extra})")
def label_task(catalog_uri: str, image_ids: list[str], branch: str, labeler: LabelerSpec,
               extra: int = 0) -> list[dict[str, Any]]:
    """Label one shard of images with one branch's labeler, built once per spec and process on the device this
    worker owns, holding that device's slot; a retry (here or on another worker) redoes only the images still
    lacking masks."""
    device = worker_device()
    with gpu_slot(device):
        return stage.label_images(open_catalog(catalog_uri), image_ids,
                                  stage.cached_labeler(branch, labeler, None if device == "auto" else device))


@task(name="fuse-image", retries=1, retry_delay_seconds=2, retry_condition_fn=retry_on_io, cache_policy=NO_CACHE,
      task_run_name="fuse {image_id}")
def fuse_task(catalog_uri: str, image_id: str, labeler_ids: list[str], tau: float) -> dict[str, Any]:
    """Fuse one image's branch masks into its pseudo-target."""
    return stage.fuse_image(open_catalog(catalog_uri), image_id, labeler_ids, tau)


@flow(name="label-branch", flow_run_name="label-{config.branch}", log_prints=True, task_runner=threads(1))
def label_branch_flow(catalog: str, config: LabelConfig) -> dict[str, Any] | State:
    """The label stage of one branch: label every image lacking masks for its labeler id (a few images per task);
    returns the branch summary.

    Args:
        catalog: Catalog directory or fsspec URL (absolute).
        config: The branch's resolved stage config: its labeler (model, checkpoint, params) and datasets.
    """
    cat = open_catalog(catalog)
    plan = stage.start_label(cat, config)
    lab = plan.labeler
    if plan.skip_reason:
        return skipped(f"label-{config.branch}", plan.skip_reason,
                       stage.LabelResult(lab.branch, lab.labeler_id, lab.weights, plan.images,
                                         masks=stage.mask_count(cat, lab.labeler_id)).summary())
    print(f"{config.branch}: {len(plan.todo)} of {plan.images} image(s) to label with {lab.labeler_id} "
          f"(weights {lab.weights[:12]}, params {lab.params})")
    settings = get_settings()
    work = stage.shards(plan.todo, settings.label_batch)
    rows = fan_out(lambda ids: label_task.submit(cat.uri, ids, config.branch, config.labeler, len(ids) - 1), work,
                   settings.label_in_flight)
    result = stage.finish_label(cat, plan, [row for shard in rows for row in shard])
    empty = sum(1 for r in result.rows if not r["masks"])
    publish_table(f"label-{config.branch}",
                  [{k: v for k, v in r.items() if k != "labeler_id"} for r in result.rows],
                  description=f"Masks per image of the {config.branch} branch, labeler `{lab.labeler_id}`, "
                              f"weights `{lab.weights[:12]}`.")
    print(f"{config.branch}: {sum(r['masks'] for r in result.rows)} masks on {len(result.rows)} images ({empty} "
          "without any mask)")
    return result.summary()


@flow(name="fuse", log_prints=True, task_runner=threads(2))
def fuse_flow(profile: Profile = Profile.production, paths: PathParams = DEFAULT_PATHS,
              label: LabelParams = DEFAULT_LABEL) -> list[dict[str, Any]] | State:
    """Fuse the three branches' current masks into pseudo-targets where missing, then publish the fuse report and
    overlay previews; returns the report rows.

    Args:
        profile: Which profile fills the empty fields: demo (tiny models, loose thresholds), production (released
            model sizes, the settings' checkpoints) or test.
        paths: Catalog and datasets (resolved to absolute paths and shown in the run).
        label: The labelers whose masks are fused and tau; empty fields take the profile's values.
    """
    run = resolve(profile, paths, label)
    config = run.fuse
    print(f"fuse, profile {run.profile.value}, catalog {run.paths.catalog}")
    cat = open_catalog(run.paths.catalog)
    plan = stage.start_fuse(cat, config)
    if plan.skip_reason:
        return skipped("fuse", plan.skip_reason, [])
    print(f"fuse: {len(plan.todo)} image(s) with tau={config.tau} into {plan.fusion_id}")
    ids = list(plan.labeler_ids.values())
    fused = [f.result() for f in fuse_task.map(cat.uri, plan.todo, [ids] * len(plan.todo), config.tau)]
    result = stage.finish_fuse(cat, config, plan, fused)
    note = f" Weights: random-init for {', '.join(result.random_init)}." if result.random_init else ""
    publish_table("fuse-report", [_short_row(r) for r in result.report] or [{"image": "(none)"}],
                  description=f"Masks per branch, fused sub-masks, coverage and branch agreement "
                              f"(tau={config.tau}, fusion `{plan.fusion_id}`).{note}")
    if result.overlays:
        blocks = [f"### {escape_markdown(image_id)}\n\n![{escape_markdown(image_id)} overlay]({png_data_uri(png)})"
                  f"\n\nFile: {escape_markdown(str(png))}\n" for image_id, png in result.overlays.items()]
        publish_markdown("fuse-overlays", "## Mask overlays" + (" (random-init weights)" if result.random_init else "")
                         + "\n\nEach panel: the image's RGB, then each branch's masks and the fused pseudo-target.\n\n"
                         + "\n".join(blocks),
                         description=f"RGB with each branch's masks and the fused pseudo-target, "
                                     f"{len(result.overlays)} images.")
    return result.report


def _short_row(row: dict[str, Any]) -> dict[str, Any]:
    """A report row with short column names, so the table fits the UI's width."""
    names = {"image_id": "image", "spatial_masks": "spatial", "spectral_masks": "spectral",
             "material_masks": "material", "fused_masks": "fused", "coverage": "cover", "agreement": "agree"}
    return {names.get(k, k): v for k, v in row.items()}


def _data(result: Any) -> Any:
    return result.result() if isinstance(result, State) else result


def label_resolved(run: RunConfig, workers: int = 1, dask_address: str | None = None) -> list[dict[str, Any]]:
    """One label-<branch> subflow per chosen branch (in the calling flow run), all branches at once; each branch
    on ``workers`` threads, or its shards on the running Dask cluster at ``dask_address`` (one worker per device);
    returns their summaries."""
    branch_flow = label_branch_flow.with_options(task_runner=engine_runner(workers, dask_address))
    calls = [functools.partial(branch_flow, run.paths.catalog, run.label_config(b)) for b in run.label.branches]
    with in_process_subflows():
        return [_data(r) for r in concurrently(calls)]


@flow(name="label", log_prints=True)
def label_flow(profile: Profile = Profile.production, paths: PathParams = DEFAULT_PATHS,
               label: LabelParams = DEFAULT_LABEL, fuse: bool = True, workers: int = 1,
               dask_address: str | None = None) -> list[dict[str, Any]]:
    """Label every image lacking masks for each chosen branch's labeler id (one subflow per branch), then (``fuse``)
    fuse them and publish the report; returns the report rows (or the branch summaries without fusion).

    Args:
        profile: Which profile fills the empty fields: demo (tiny models, loose thresholds), production (released
            model sizes, the settings' checkpoints) or test.
        paths: Catalog and datasets (resolved to absolute paths and shown in the run).
        label: Branches, each branch's labeler and tau; empty fields take the profile's values.
        fuse: Fuse the branches and publish the report afterwards.
        workers: Label tasks run at once per branch (models are shared in the process; 1 on small machines).
        dask_address: Address of a running Dask scheduler to label on instead (one model per worker process).
    """
    run = resolve(profile, paths, label)
    print(f"label {', '.join(run.label.branches)}, profile {run.profile.value}, catalog {run.paths.catalog}")
    summaries = label_resolved(run, workers, dask_address or get_settings().dask_address)
    if not fuse:
        return summaries
    with in_process_subflows():
        return list(_data(fuse_flow(profile, paths, label)) or [])


@flow(name="relabel-new", log_prints=True)
def relabel_flow(profile: Profile = Profile.production, paths: PathParams = DEFAULT_PATHS,
                 label: LabelParams = DEFAULT_LABEL) -> list[dict[str, Any]]:
    """Ingest the dataset folders that appeared under the source root (nothing in the catalog yet), then label and
    fuse only them; nothing new is a quick no-op. Runs on a schedule and on each "dataset arrived" event.

    Args:
        profile: Which profile fills the empty fields: demo (tiny models, loose thresholds), production (released
            model sizes, the settings' checkpoints) or test.
        paths: Source root and catalog (resolved to absolute paths and shown in the run).
        label: Branches, each branch's labeler and tau; empty fields take the profile's values.
    """
    from pipelines.ingest import ingest_flow
    from stages.ingest import new_dataset_folders

    run = resolve(profile, paths, label)
    p = run.paths
    print(f"relabel-new, profile {run.profile.value}: source root {p.source_root}, catalog {p.catalog}")
    new = new_dataset_folders(Path(p.source_root), open_catalog(p.catalog).init())
    if not new:
        print(f"no new dataset folder under {p.source_root}")
        return []
    print(f"new dataset folders under {p.source_root}: {', '.join(new)}")
    only = PathParams(source_root=p.source_root, catalog=p.catalog, runs=p.runs, datasets=new)
    ingest_flow(only)
    return label_flow(profile, only, label)
