"""Prefect wiring of the ingest stage: one task per source file, retried on I/O errors, ids and paths only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, task, unmapped
from prefect.cache_policies import NO_CACHE
from prefect.states import State

from infra.settings import cube_options
from pipelines.catalogs import open_catalog
from pipelines.params import DEFAULT_PATHS, PathParams, resolve_paths
from pipelines.wiring import publish_table, retry_on_io, skipped, threads
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


def _ingest(catalog: str, config: stage.IngestConfig) -> list[dict[str, Any]] | State:
    """The ingest stage on the current flow's task runner: start, one task per file, finish; publish the summary."""
    cat = open_catalog(catalog).init()
    print(f"ingest {config.source_root} -> {cat.uri}" + (f" (datasets {', '.join(config.datasets)})"
                                                          if config.datasets else ""))
    work = stage.start_ingest(cat, config)
    for _, path, exc in work.problems:
        print(f"quarantined {path}: {exc}")
    futures = ingest_file.map([cat.uri] * len(work.items), [w.dataset for w in work.items],
                              [w.folder for w in work.items], [w.primary for w in work.items],
                              [w.known_sha256 for w in work.items], unmapped(cube_options()))
    files: list[stage.FileResult] = []
    for item, fut in zip(work.items, futures, strict=True):
        fut.wait()
        if fut.state.is_completed():
            files.append(stage.FileResult(**fut.result()))
        else:  # I/O kept failing after the retries: record it and go on with the rest
            message = str(fut.state.message)
            path = str(Path(item.folder, item.primary).absolute())
            cat.add_quarantine(item.dataset, path, "OSError", "file", message,
                               "check that the file is readable and the storage reachable, then re-run ingest")
            files.append(stage.FileResult(item.dataset, path, "quarantined", None, message))
    summary = stage.finish_ingest(cat, work, files).summary
    publish_table("ingest-summary", summary,
                  description=f"Ingest of `{config.source_root}` into `{cat.uri}`: images per dataset.")
    changed = sum(r["ingested"] + r["quarantined"] for r in summary)
    if summary and not changed:
        unchanged = sum(r["skipped"] for r in summary)
        return skipped("ingest", f"all {unchanged} source files unchanged (same sha256 as catalogued)", summary)
    return summary


ingest_on_dask = flow(name="ingest-dask", log_prints=True)(_ingest)
"""The ingest body as a flow of its own, for a Dask task runner chosen at run time."""


@flow(name="ingest", log_prints=True, task_runner=threads(2))
def ingest_flow(paths: PathParams = DEFAULT_PATHS, workers: int = 1,
                dask_address: str | None = None) -> list[dict[str, Any]] | State:
    """Ingest every dataset folder under the source root into the catalog (bad files are quarantined, unchanged
    ones skipped by sha256); returns per-dataset counts.

    Args:
        paths: Source root, catalog and datasets (empty: `HVP_SOURCE_ROOT`, `HVP_CATALOG`, all folders), resolved
            to absolute paths and shown in the run.
        workers: More than 1 ingests on a local Dask cluster of that many processes.
        dask_address: Address of a running Dask scheduler to ingest on instead.
    """
    p = resolve_paths(paths)
    config = stage.IngestConfig(source_root=p.source_root, datasets=p.datasets)
    if dask_address or workers > 1:
        from prefect_dask import DaskTaskRunner

        runner: Any = (DaskTaskRunner(address=dask_address) if dask_address else
                       DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1}))
        return ingest_on_dask.with_options(task_runner=runner)(p.catalog, config)
    return _ingest(p.catalog, config)
