"""Prefect wiring of the ingest stage: one task per source file, retried on I/O errors, ids and paths only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, task, unmapped
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import State

from infra.settings import cube_options, open_catalog
from pipelines.params import PathParams, resolve_paths
from pipelines.wiring import retry_on_io, skipped, threads
from stages import ingest as stage


def _retry_on_io(task: Any, task_run: Any, state: Any) -> bool:
    """Retry only transient I/O failures; bad input and files that cannot be read for good (no permission, gone)
    are quarantined by the stage."""
    try:
        state.result()
    except stage.UNREADABLE:
        return False
    except Exception:
        return retry_on_io(task, task_run, state)
    return False


# The catalog is the cache, keyed on each source file's sha256: unchanged sources are skipped inside the stage, so
# Prefect's own caching stays off.
@task(name="ingest-file", retries=2, retry_delay_seconds=2, retry_condition_fn=_retry_on_io, cache_policy=NO_CACHE,
      task_run_name="ingest {dataset}/{primary}")
def ingest_file(catalog_uri: str, dataset: str, folder: str, primary: str, known_sha256: str | None,
                options: dict[str, Any]) -> dict[str, Any]:
    """Ingest one source image into the catalog (``options``: the cube-store options); returns the stage's result
    as a plain dict."""
    return stage.ingest_path(catalog_uri, folder, primary, known_sha256, options).as_dict()


def _ingest(source_dir: str, catalog: str, datasets: list[str] | None) -> list[dict[str, Any]] | State:
    """Plan, map one task per file on the current flow's task runner, publish the summary."""
    cat = open_catalog(catalog).init()
    print(f"ingest {source_dir} -> {cat.uri}" + (f" (datasets {', '.join(datasets)})" if datasets else ""))
    work = stage.plan(source_dir, cat, datasets)
    stage.record_problems(cat, work.problems)
    for _, path, exc in work.problems:
        print(f"quarantined {path}: {exc}")
    futures = ingest_file.map([cat.uri] * len(work.items), [w.dataset for w in work.items],
                              [w.folder for w in work.items], [w.primary for w in work.items],
                              [w.known_sha256 for w in work.items], unmapped(cube_options()))
    results: list[stage.IngestResult] = []
    for item, fut in zip(work.items, futures, strict=True):
        fut.wait()
        if fut.state.is_completed():
            results.append(stage.IngestResult(**fut.result()))
        else:  # I/O kept failing after the retries: record it and go on with the rest
            message = str(fut.state.message)
            path = str(Path(item.folder, item.primary).absolute())
            cat.add_quarantine(item.dataset, path, "OSError", "file", message,
                               "check that the file is readable and the storage reachable, then re-run ingest")
            results.append(stage.IngestResult(item.dataset, path, "quarantined", None, message))
    cat.compact()
    summary = stage.summarize(results, work.problems)
    create_table_artifact(key="ingest-summary", table=summary,
                          description=f"Ingest of `{source_dir}` into `{cat.uri}`: images per dataset.")
    changed = sum(r["ingested"] + r["quarantined"] for r in summary)
    if summary and not changed:
        unchanged = sum(r["skipped"] for r in summary)
        return skipped("ingest", f"all {unchanged} source files unchanged (same sha256 as catalogued)", summary)
    return summary


ingest_on_dask = flow(name="ingest-dask", log_prints=True)(_ingest)
"""The ingest body as a flow of its own, for a Dask task runner chosen at run time."""


@flow(name="ingest", log_prints=True, task_runner=threads(2))
def ingest_flow(source_dir: str | None = None, catalog: str | None = None, datasets: list[str] | None = None,
                workers: int = 1, dask_address: str | None = None) -> list[dict[str, Any]] | State:
    """Ingest every dataset folder under the source root into the catalog (bad files are quarantined, unchanged
    ones skipped by sha256); returns per-dataset counts.

    Args:
        source_dir: Folder of dataset folders. Empty: `HVP_SOURCE_ROOT` (default `./hvp-data/sources`).
        catalog: Catalog directory or fsspec URL. Empty: `HVP_CATALOG` (default `./hvp-data/catalog`).
        datasets: Only these dataset folders (slugs). Empty: all.
        workers: More than 1 ingests on a local Dask cluster of that many processes.
        dask_address: Address of a running Dask scheduler to ingest on instead.
    """
    paths = resolve_paths(PathParams(source_root=source_dir, catalog=catalog, datasets=datasets))
    if dask_address or workers > 1:
        from prefect_dask import DaskTaskRunner

        runner: Any = (DaskTaskRunner(address=dask_address) if dask_address else
                       DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1}))
        return ingest_on_dask.with_options(task_runner=runner)(paths.source_root, paths.catalog, paths.datasets)
    return _ingest(paths.source_root, paths.catalog, paths.datasets)


def run_ingest(source_dir: str, catalog: str | None = None, datasets: list[str] | None = None,
               workers: int | None = None, dask_address: str | None = None) -> list[dict[str, Any]]:
    """Run the flow on threads (default), a local Dask cluster of ``workers`` processes, or a running cluster."""
    result: list[dict[str, Any]] = ingest_flow(source_dir, catalog, datasets, workers or 1, dask_address)  # type: ignore[assignment]
    return result
