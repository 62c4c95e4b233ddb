"""Prefect wiring of the ingest stage: one task per source file, retried on I/O errors, ids and paths only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, task, unmapped
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from infra.settings import cube_options, open_catalog
from stages import ingest as stage


def _retry_on_io(task: Any, task_run: Any, state: Any) -> bool:
    """Retry only transient I/O failures; bad input and unreadable files are quarantined by the stage."""
    try:
        state.result()
    except stage.UNREADABLE:
        return False
    except OSError:
        return True
    except Exception:
        return False
    return False


# The catalog is the cache: unchanged sources (same sha256) are skipped inside the stage, so Prefect caching is off.
@task(name="ingest-file", retries=2, retry_delay_seconds=2, retry_condition_fn=_retry_on_io, cache_policy=NO_CACHE,
      task_run_name="ingest {dataset}/{primary}")
def ingest_file(catalog_uri: str, dataset: str, folder: str, primary: str, known_sha256: str | None,
                options: dict[str, Any]) -> dict[str, Any]:
    """Ingest one source image into the catalog (``options``: the cube-store options); returns the stage's result
    as a plain dict."""
    return stage.ingest_path(catalog_uri, folder, primary, known_sha256, options).as_dict()


@flow(name="ingest", log_prints=True)
def ingest_flow(source_dir: str, catalog: str | None = None, datasets: list[str] | None = None) -> list[dict[str, Any]]:
    """Ingest every dataset folder under ``source_dir`` into the catalog; returns per-dataset counts."""
    cat = open_catalog(catalog).init()
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
                          description=f"Ingest of `{source_dir}` into `{cat.uri}`: per-dataset counts.")
    return summary


def run_ingest(source_dir: str, catalog: str | None = None, datasets: list[str] | None = None,
               workers: int | None = None, dask_address: str | None = None) -> list[dict[str, Any]]:
    """Run the flow on threads (default), a local Dask cluster of ``workers`` processes, or a running cluster."""
    if dask_address or (workers and workers > 1):
        from prefect_dask import DaskTaskRunner

        runner: Any = (DaskTaskRunner(address=dask_address) if dask_address else
                       DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1}))
    else:
        runner = ThreadPoolTaskRunner(max_workers=2)
    return ingest_flow.with_options(task_runner=runner)(source_dir, catalog, datasets)
