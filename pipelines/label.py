"""Prefect wiring of pseudo-labelling, fusion and relabelling of new datasets: ids and configurations in, ids out,
logic in stages/.

The mask store is the cache: a branch labels only the images without masks for its labeler id (which hashes the
model config, the checkpoint's sha256 and the parameters), fusion only the images without a pseudo-target for its
fusion id. A stage whose inputs are unchanged therefore has nothing to do; it returns a "Skipped" state saying so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import State

from catalog.catalog import Catalog
from catalog.masks import MaskStore
from infra.settings import get_settings, open_catalog
from pipelines.params import (
    DEFAULT_LABEL,
    LabelParams,
    PathParams,
    Profile,
    ResolvedLabel,
    resolve_label,
    resolve_paths,
)
from pipelines.wiring import (
    gpu_slot,
    in_process_subflows,
    png_data_uri,
    publish_markdown,
    retry_on_io,
    skipped,
    threads,
)
from stages.labelling import label as stage
from stages.labelling.fuse import fusion_id


@task(name="label-images", retries=1, retry_delay_seconds=5, retry_condition_fn=retry_on_io, cache_policy=NO_CACHE,
      task_run_name="{branch} {image_ids[0]} (+{extra})")
def label_task(catalog_uri: str, image_ids: list[str], branch: str, config: dict[str, Any],
               extra: int = 0) -> list[dict[str, Any]]:
    """Label a few images with one branch's labeler (built once per configuration and process) holding a `gpu`
    slot; a retry redoes only the images still lacking masks."""
    cat, labeler = open_catalog(catalog_uri), stage.cached_labeler(branch, config)
    todo = set(stage.pending(cat, labeler.labeler_id)) & set(image_ids)
    with gpu_slot():
        return [stage.label_image(cat, i, labeler) for i in image_ids if i in todo]


@task(name="fuse-image", retries=1, retry_delay_seconds=2, retry_condition_fn=retry_on_io, cache_policy=NO_CACHE,
      task_run_name="fuse {image_id}")
def fuse_task(catalog_uri: str, image_id: str, labeler_ids: list[str], tau: float) -> dict[str, Any]:
    """Fuse one image's branch masks into its pseudo-target."""
    return stage.fuse_image(open_catalog(catalog_uri), image_id, labeler_ids, tau)


@flow(name="label-branch", flow_run_name="label-{branch}", log_prints=True,
      task_runner=threads(1))
def label_branch_flow(catalog: str, branch: str, config: dict[str, Any],
                      datasets: list[str] | None = None) -> dict[str, Any] | State:
    """Label every image lacking masks for this branch's labeler id; returns the branch summary.

    Args:
        catalog: Catalog directory or fsspec URL (absolute).
        branch: spatial, spectral or material.
        config: The labeler's resolved configuration: model_config, checkpoint, params.
        datasets: Only images of these datasets. Empty: all.
    """
    cat = open_catalog(catalog)
    labeler = stage.cached_labeler(branch, config)
    todo = stage.pending(cat, labeler.labeler_id, datasets)
    total = len(stage.image_ids(cat, datasets))
    summary = {"branch": branch, "labeler_id": labeler.labeler_id, "weights": labeler.weights[:12],
               "images": total, "labelled": len(todo), "masks": _mask_count(cat, labeler.labeler_id)}
    if not todo:
        return skipped(f"label-{branch}", f"all {total} images already have masks of {labeler.labeler_id}", summary)
    print(f"{branch}: {len(todo)} of {total} image(s) to label with {labeler.labeler_id} "
          f"(weights {labeler.weights[:12]}, params {labeler.params})")
    size = get_settings().label_batch
    futures = [label_task.submit(cat.uri, todo[k:k + size], branch, config, len(todo[k:k + size]) - 1)
               for k in range(0, len(todo), size)]  # a few images per task: Prefect's per-task cost is amortised
    rows = [row for f in futures for row in f.result()]
    MaskStore(cat).compact()
    summary["masks"] = _mask_count(cat, labeler.labeler_id)
    empty = sum(1 for r in rows if not r["masks"])
    create_table_artifact(key=f"label-{branch}", table=[{k: v for k, v in r.items() if k != "labeler_id"}
                                                        for r in rows],
                          description=f"Masks per image of the {branch} branch, labeler `{labeler.labeler_id}`, "
                                      f"weights `{labeler.weights[:12]}`.")
    print(f"{branch}: {sum(r['masks'] for r in rows)} masks on {len(rows)} images ({empty} without any mask)")
    return summary


def _mask_count(cat: Catalog, labeler_id: str) -> int:
    """Masks of one labeler over the whole catalog (from the mask index)."""
    index = MaskStore(cat).index(refresh=True)
    return int(index.loc[index["labeler_id"] == labeler_id, "n"].sum()) if not index.empty else 0


@flow(name="fuse", log_prints=True, task_runner=threads(2))
def fuse_flow(catalog: str | None = None, label: LabelParams = DEFAULT_LABEL, datasets: list[str] | None = None,
              profile: Profile = Profile.production) -> list[dict[str, Any]] | State:
    """Fuse the three branches' current masks into pseudo-targets where missing, then publish the fuse report and
    overlay previews; returns the report rows.

    Args:
        catalog: Catalog directory or fsspec URL. Empty: `HVP_CATALOG`.
        label: The labelers whose masks are fused and tau; empty fields take the profile's values.
        datasets: Only images of these datasets. Empty: all.
        profile: demo (tiny models, loose thresholds) or production (the settings' models and thresholds).
    """
    paths = resolve_paths(PathParams(catalog=catalog, datasets=datasets))
    print(f"fuse, profile {profile.value}, catalog {paths.catalog}")
    return fuse_resolved(paths.catalog, resolve_label(profile, label), paths.datasets)


def fuse_resolved(catalog: str, label: ResolvedLabel, datasets: list[str] | None) -> list[dict[str, Any]] | State:
    """The fuse stage on resolved labeler configurations (inside a fuse flow run)."""
    cat = open_catalog(catalog)
    ids = {b: stage.cached_labeler(b, c).labeler_id for b, c in label.configs.items()}
    fid = fusion_id(list(ids.values()), label.tau)
    todo = stage.pending(cat, fid, datasets)
    image_ids = stage.image_ids(cat, datasets)
    index = MaskStore(cat).index()
    has_masks = set(index.loc[index["labeler_id"].isin(list(ids.values())), "image_id"]) if not index.empty else set()
    labelled = [i for i in todo if i in has_masks]
    if not labelled:
        reason = (f"all {len(image_ids)} images already have pseudo-targets of {fid}" if not todo else
                  f"none of the {len(todo)} images without a pseudo-target has branch masks yet")
        return skipped("fuse", reason, [])
    print(f"fuse: {len(labelled)} image(s) with tau={label.tau} into {fid}")
    for f in fuse_task.map(cat.uri, labelled, [list(ids.values())] * len(labelled), label.tau):
        f.result()
    MaskStore(cat).compact()
    rows = stage.report(cat, image_ids, ids, label.tau)
    random_init = sorted(b for b, c in label.configs.items() if stage.cached_labeler(b, c).random_init)
    note = f" Weights: random-init for {', '.join(random_init)}." if random_init else ""
    short = [_short_row(r) for r in rows]
    create_table_artifact(key="fuse-report", table=short or [{"image": "(none)"}],
                          description=f"Masks per branch, fused sub-masks, coverage and branch agreement "
                                      f"(tau={label.tau}, fusion `{fid}`).{note}")
    pngs = stage.write_overlays(cat, image_ids, ids, label.tau, label.overlays)
    if pngs:
        blocks = [f"### `{image_id}`\n\n![{image_id} overlay]({png_data_uri(png)})\n\nFile: `{png}`\n"
                  for image_id, png in pngs.items()]
        publish_markdown("fuse-overlays", "## Mask overlays" + (" (random-init weights)" if random_init else "")
                         + "\n\nEach panel: the image's RGB, then each branch's masks and the fused pseudo-target.\n\n"
                         + "\n".join(blocks),
                         description=f"RGB with each branch's masks and the fused pseudo-target, {len(pngs)} images.")
    return rows


def _short_row(row: dict[str, Any]) -> dict[str, Any]:
    """A report row with short column names, so the table fits the UI's width."""
    names = {"image_id": "image", "spatial_masks": "spatial", "spectral_masks": "spectral",
             "material_masks": "material", "fused_masks": "fused", "coverage": "cover", "agreement": "agree"}
    return {names.get(k, k): v for k, v in row.items()}


def label_resolved(catalog: str, label: ResolvedLabel, datasets: list[str] | None, workers: int = 1,
                   dask_address: str | None = None) -> list[dict[str, Any]]:
    """One label-<branch> subflow per chosen branch (in the calling flow run), each on ``workers`` threads, or on
    the running Dask cluster at ``dask_address``; returns their summaries."""
    if dask_address:
        from prefect_dask import DaskTaskRunner

        runner: Any = DaskTaskRunner(address=dask_address)  # typed loosely, as `threads`
        branch_flow = label_branch_flow.with_options(task_runner=runner)
    else:
        branch_flow = (label_branch_flow if workers <= 1 else
                       label_branch_flow.with_options(task_runner=threads(workers)))
    with in_process_subflows():
        return [_data(branch_flow(catalog, b, label.configs[b], datasets)) for b in label.branches]


def _data(result: Any) -> Any:
    return result.result() if isinstance(result, State) else result


@flow(name="label", log_prints=True)
def label_flow(catalog: str | None = None, label: LabelParams = DEFAULT_LABEL, datasets: list[str] | None = None,
               fuse: bool = True, profile: Profile = Profile.production, workers: int = 1,
               dask_address: str | None = None) -> list[dict[str, Any]]:
    """Label every image lacking masks for each chosen branch's labeler id (one subflow per branch), then (``fuse``)
    fuse them and publish the report; returns the report rows (or the branch summaries without fusion).

    Args:
        catalog: Catalog directory or fsspec URL. Empty: `HVP_CATALOG`.
        label: Branches, each branch's labeler and tau; empty fields take the profile's values.
        datasets: Only images of these datasets. Empty: all.
        fuse: Fuse the branches and publish the report afterwards.
        profile: demo (tiny models, loose thresholds) or production (the settings' models and thresholds).
        workers: Label tasks run at once per branch (models are shared in the process; 1 on small machines).
        dask_address: Address of a running Dask scheduler to label on instead (one model per worker process).
    """
    paths = resolve_paths(PathParams(catalog=catalog, datasets=datasets))
    resolved = resolve_label(profile, label)
    print(f"label {', '.join(resolved.branches)}, profile {profile.value}, catalog {paths.catalog}")
    summaries = label_resolved(paths.catalog, resolved, paths.datasets, workers, dask_address)
    if not fuse:
        return summaries
    with in_process_subflows():
        return list(_data(fuse_flow(paths.catalog, label, paths.datasets, profile)) or [])


@flow(name="relabel-new", log_prints=True)
def relabel_flow(source_root: str | None = None, catalog: str | None = None, label: LabelParams = DEFAULT_LABEL,
                 profile: Profile = Profile.production) -> list[dict[str, Any]]:
    """Ingest the dataset folders that appeared under the source root (nothing in the catalog yet), then label and
    fuse only them; nothing new is a quick no-op. Runs on a schedule and on each "dataset arrived" event.

    Args:
        source_root: Folder of dataset folders. Empty: `HVP_SOURCE_ROOT`.
        catalog: Catalog directory or fsspec URL. Empty: `HVP_CATALOG`.
        label: Branches, each branch's labeler and tau; empty fields take the profile's values.
        profile: demo (tiny models, loose thresholds) or production (the settings' models and thresholds).
    """
    from pipelines.ingest import ingest_flow
    from stages.ingest import new_dataset_folders

    paths = resolve_paths(PathParams(source_root=source_root, catalog=catalog))
    print(f"relabel-new, profile {profile.value}: source root {paths.source_root}, catalog {paths.catalog}")
    cat = open_catalog(paths.catalog).init()
    new = new_dataset_folders(Path(paths.source_root), cat)
    if not new:
        print(f"no new dataset folder under {paths.source_root}")
        return []
    print(f"new dataset folders under {paths.source_root}: {', '.join(new)}")
    ingest_flow(paths.source_root, cat.uri, new)
    return label_flow(cat.uri, label, new, True, profile)


def run_label(catalog: str | None, branches: list[str] | None, workers: int = 1,
              profile: Profile = Profile.production, label: LabelParams = DEFAULT_LABEL) -> list[dict[str, Any]]:
    """Run the label flow (the chosen branches, then fusion) as the CLI does; ``branches`` narrows ``label``'s."""
    params = label
    if branches:
        params = LabelParams.model_validate({**label.model_dump(), "branches": branches})
    return label_flow(catalog, params, None, True, profile, workers)
