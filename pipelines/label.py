"""Prefect wiring of pseudo-labelling, fusion and scheduled relabelling: ids in, ids out, logic in stages/."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from catalog.masks import MaskStore
from catalog.store import Catalog
from infra.settings import get_settings, open_catalog
from stages.labelling import label as stage


# The mask store is the cache (keyed by labeler id), so Prefect's own caching stays off. The "gpu" tag lets a
# deployment cap concurrent model work: `prefect concurrency-limit create gpu 1`.
@task(name="label-images", tags=["gpu"], retries=1, retry_delay_seconds=5, cache_policy=NO_CACHE,
      task_run_name="{branch} {image_ids[0]} (+{extra})")
def label_task(catalog_uri: str, image_ids: list[str], branch: str, extra: int = 0) -> list[dict[str, Any]]:
    """Label a few images with one branch's labeler (built once per worker process); a retry redoes only the
    images still lacking masks."""
    cat, labeler = open_catalog(catalog_uri), stage.cached_labeler(branch)
    todo = set(stage.pending(cat, labeler.labeler_id)) & set(image_ids)
    return [stage.label_image(cat, i, labeler) for i in image_ids if i in todo]


@task(name="fuse-image", cache_policy=NO_CACHE, task_run_name="fuse {image_id}")
def fuse_task(catalog_uri: str, image_id: str, labeler_ids: list[str], tau: float) -> dict[str, Any]:
    """Fuse one image's branch masks into its pseudo-target."""
    return stage.fuse_image(open_catalog(catalog_uri), image_id, labeler_ids, tau)


def _threads(workers: int) -> Any:
    """A thread-pool task runner (typed loosely: Prefect's generic runner types do not unify here)."""
    return ThreadPoolTaskRunner(max_workers=workers)


@flow(name="label", log_prints=True, task_runner=_threads(1))
def label_flow(catalog: str | None = None, branches: list[str] | None = None, datasets: list[str] | None = None,
               overlays: int = 4, fuse: bool = True) -> list[dict[str, Any]]:
    """Label every image lacking masks for each branch's current labeler id, then (``fuse``) fuse them and
    publish a report; returns the report rows (or the labelled images' rows without fusion)."""
    cat = open_catalog(catalog)
    branches = list(branches or stage.BRANCHES)
    labelers = {b: stage.cached_labeler(b) for b in branches}
    ids = {b: lab.labeler_id for b, lab in labelers.items()}
    futures = []
    size = get_settings().label_batch
    for b, lab in labelers.items():
        todo = stage.pending(cat, lab.labeler_id, datasets)
        print(f"{b}: {len(todo)} image(s) to label with {lab.labeler_id} ({lab.weights[:12]})")
        for k in range(0, len(todo), size):  # a few images per task: Prefect's per-task cost is amortised
            chunk = todo[k:k + size]
            futures.append(label_task.submit(cat.uri, chunk, b, len(chunk) - 1))
    labelled = [row for f in futures for row in f.result()]
    MaskStore(cat).compact()
    return _fuse_and_report(cat, ids, datasets, overlays) if fuse else labelled


def _fuse_and_report(cat: Catalog, ids: dict[str, str], datasets: list[str] | None,
                     overlays: int) -> list[dict[str, Any]]:
    tau = get_settings().fuse_tau
    from stages.labelling.fuse import fusion_id

    fid = fusion_id(list(ids.values()), tau)
    todo = stage.pending(cat, fid, datasets)
    fused = fuse_task.map(cat.uri, todo, [list(ids.values())] * len(todo), tau)
    for f in fused:
        f.result()
    MaskStore(cat).compact()
    image_ids = stage.image_ids(cat, datasets)
    rows = stage.report(cat, image_ids, ids, tau)
    random_init = [b for b in ids if stage.cached_labeler(b).random_init]
    note = f" Weights: random-init for {', '.join(random_init)}." if random_init else ""
    create_table_artifact(key="label-report", table=rows or [{"image_id": "(none)"}],
                          description=f"Masks per branch, fused sub-masks, coverage and agreement (tau={tau}).{note}")
    pngs = stage.write_overlays(cat, image_ids, ids, tau, overlays)
    if pngs:
        links = "\n".join(f"- `{image_id}`: [{png.name}]({png.as_uri()})" for image_id, png in pngs.items())
        create_markdown_artifact(key="label-overlays", markdown="## Mask overlays" + (
            " (random-init weights)" if random_init else "") + "\n\n" + links)
    return rows


@flow(name="fuse", log_prints=True)
def fuse_flow(catalog: str | None = None, datasets: list[str] | None = None, overlays: int = 4) -> list[dict[str, Any]]:
    """Fuse the current labelers' masks of every image that lacks a pseudo-target, and publish the report."""
    ids = {b: stage.cached_labeler(b).labeler_id for b in stage.BRANCHES}
    return _fuse_and_report(open_catalog(catalog), ids, datasets, overlays)


@flow(name="relabel-new", log_prints=True)
def relabel_flow(source_root: str | None = None, catalog: str | None = None) -> list[dict[str, Any]]:
    """Scheduled: ingest dataset folders that appeared under the watched root, then label and fuse only them."""
    from pipelines.ingest import ingest_flow
    from stages.ingest import new_dataset_folders

    settings = get_settings()
    root = Path(source_root or settings.source_root)
    cat = open_catalog(catalog).init()
    new = new_dataset_folders(root, cat)
    if not new:
        print(f"no new dataset folder under {root}")
        return []
    print(f"new dataset folders: {', '.join(new)}")
    ingest_flow(str(root), cat.uri, new)
    return label_flow(cat.uri, None, new)


def run_label(catalog: str | None, branches: list[str] | None, workers: int = 1) -> list[dict[str, Any]]:
    """Run the label flow on a thread pool of ``workers`` (models are shared per process; 1 on small machines)."""
    return label_flow.with_options(task_runner=_threads(workers))(catalog, branches)
