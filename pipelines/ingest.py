"""Prefect wiring of the ingest stage: one task per shard of source files (each file retried on I/O errors), ids
and paths only."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.states import State

from base.shards import shards
from infra.settings import cube_options, get_settings
from pipelines.catalogs import open_catalog
from pipelines.params import DEFAULT_PATHS, PathParams, resolve_paths
from pipelines.wiring import fan_out, publish_table, skipped, threads
from stages import ingest as stage


def ingest_one(catalog_uri: str, item: dict[str, Any], options: dict[str, Any], attempts: int = 3,
               delay_s: float = 2.0) -> dict[str, Any]:
    """Ingest one source image (the stage quarantines bad input and unreadable files itself); a transient I/O error
    (OSError) is tried again up to ``attempts`` times. Returns ``{"result": FileResult}`` or, when it keeps
    failing, ``{"error": message}`` for the flow to quarantine."""
    for attempt in range(1, attempts + 1):
        try:
            return {"result": stage.ingest_path(catalog_uri, item["folder"], item["primary"], item["known_sha256"],
                                                options).as_dict()}
        except OSError as exc:
            if attempt == attempts:
                return {"error": f"{type(exc).__name__}: {exc} (after {attempts} attempts)"}
            time.sleep(delay_s)
        except Exception as exc:  # noqa: BLE001 (a file the stage could not handle: recorded, the rest go on)
            return {"error": f"{type(exc).__name__}: {exc}"}
    raise AssertionError("unreachable")


# The catalog is the cache, keyed on each source file's sha256: unchanged sources are skipped inside the stage, so
# Prefect's own caching stays off. A shard of files per task amortises the task's orchestration (about 0.1-0.2 s,
# bench/scale.py) over several files; a dead worker's shard is run again elsewhere (writes are idempotent).
@task(name="ingest-shard", retries=1, retry_delay_seconds=2, cache_policy=NO_CACHE, task_run_name="ingest {label}")
def ingest_shard(catalog_uri: str, items: list[dict[str, Any]], options: dict[str, Any], label: str
                 ) -> list[dict[str, Any]]:
    """Ingest a shard of source images into the catalog (``options``: the cube-store options), one result per item
    as `ingest_one` gives it."""
    return [ingest_one(catalog_uri, item, options) for item in items]


def _ingest(catalog: str, config: stage.IngestConfig) -> list[dict[str, Any]] | State:
    """The ingest stage on the current flow's task runner: start, shards of files as tasks (bounded in flight),
    finish; publish the summary."""
    cat = open_catalog(catalog).init()
    print(f"ingest {config.source_root} -> {cat.uri}" + (f" (datasets {', '.join(config.datasets)})"
                                                          if config.datasets else ""))
    work = stage.start_ingest(cat, config)
    for _, path, exc in work.problems:
        print(f"quarantined {path}: {exc}")
    settings = get_settings()
    items = [{"dataset": w.dataset, "folder": w.folder, "primary": w.primary, "known_sha256": w.known_sha256}
             for w in work.items]
    options = cube_options(settings)
    work_shards = shards(items, settings.ingest_shard, "ingest_shard (HVP_INGEST_SHARD)")
    done = fan_out(lambda shard: ingest_shard.submit(
        cat.uri, shard, options, f"{shard[0]['dataset']}/{shard[0]['primary']} (+{len(shard) - 1})"),
        work_shards, settings.label_in_flight)
    outcomes = [outcome for shard_out in done for outcome in shard_out]
    files: list[stage.FileResult] = []
    for item, outcome in zip(work.items, outcomes, strict=True):
        if "result" in outcome:
            files.append(stage.FileResult(**outcome["result"]))
        else:  # I/O kept failing after the retries: record it and go on with the rest
            path = str(Path(item.folder, item.primary).absolute())
            cat.add_quarantine(item.dataset, path, "OSError", "file", outcome["error"],
                               "check that the file is readable and the storage reachable, then re-run ingest")
            files.append(stage.FileResult(item.dataset, path, "quarantined", None, outcome["error"]))
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
