"""Prefect wiring shared by the flows: retry conditions, the per-device `gpu:<host>:<index>`
concurrency slots, the device a worker owns, "skipped" states, content
keys, and artifacts a person can read in the UI (tables that fit, PNG previews embedded as data URIs)."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import socket
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.states import Completed, State

from base.markdown import escape_markdown, escape_rows

#: Prefix of the per-device concurrency limits that model work takes a slot of: `gpu:<host>:<index>` (`hvp ui`
#: creates one, with one slot, per visible GPU; where a device has none, work on it proceeds unlimited). CPU work
#: takes no device slot: CPU stages keep their own task-runner limits.
GPU_LIMIT = "gpu"
#: Longest side of an image preview embedded in a markdown artifact, in pixels.
PREVIEW_SIDE = 720


def threads(workers: int) -> Any:
    """A thread-pool task runner of ``workers`` threads (typed loosely: Prefect's generic runner types do not unify
    with the flow decorator's)."""
    from prefect.task_runners import ThreadPoolTaskRunner

    return ThreadPoolTaskRunner(max_workers=workers)


def engine_runner(workers: int = 1, dask_address: str | None = None) -> Any:
    """The task runner that fans a stage's shards out: the Dask cluster at ``dask_address`` (workers on any machine
    that point at its scheduler, one per device), else ``workers`` threads of this process."""
    if dask_address:
        from prefect_dask import DaskTaskRunner

        return DaskTaskRunner(address=dask_address)
    return threads(max(1, workers))


def retry_on_io(task: Any, task_run: Any, state: Any) -> bool:
    """Retry only transient I/O failures (OSError); bad input and bugs fail at once."""
    try:
        state.result()
    except OSError:
        return True
    except Exception:
        return False
    return False


def worker_device() -> str:
    """The device this process owns: ``HVP_DEVICE`` (set per worker by infra.cluster, or by hand on a remote
    ``dask worker``), else "auto" (the stage picks CUDA when present)."""
    from infra.cluster import DEVICE_ENV

    return os.environ.get(DEVICE_ENV) or "auto"


def device_limit(device: str, host: str | None = None) -> str | None:
    """The concurrency limit guarding ``device`` on ``host`` (this machine by default): `gpu:<host>:<index>` for a
    GPU, None for the CPU."""
    if not device.startswith("cuda"):
        return None
    index = device.split(":", 1)[1] if ":" in device else "0"
    return f"{GPU_LIMIT}:{host or socket.gethostname()}:{index}"


@contextmanager
def gpu_slot(device: str | None = None) -> Iterator[None]:
    """Hold the slot of ``device``'s concurrency limit (`gpu:<host>:<index>`; default: this worker's device) while
    model work runs; a no-op on the CPU and where the server has no such limit (e.g. a CLI run's temporary
    server: `hvp ui` creates them)."""
    from prefect.concurrency.sync import concurrency

    name = device_limit(device or worker_device())
    if name is None or not _limit_exists(name):
        yield
        return
    with concurrency(name, occupy=1, strict=False):
        yield


_LIMIT_SEEN: dict[tuple[str, str], bool] = {}


def _limit_exists(name: str) -> bool:
    """Whether the current Prefect API has the concurrency limit ``name`` (asked once per API, name and
    process)."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL

    key = (str(PREFECT_API_URL.value()), name)
    if key not in _LIMIT_SEEN:
        try:
            with get_client(sync_client=True) as client:
                client.read_global_concurrency_limit_by_name(name)
            _LIMIT_SEEN[key] = True
        except ObjectNotFound:
            _LIMIT_SEEN[key] = False
    return _LIMIT_SEEN[key]


def fan_out(submit: Callable[[Any], Any], items: list[Any], in_flight: int) -> list[Any]:
    """Submit one task per item (``submit(item)`` returns a Prefect future) with at most ``in_flight`` unfinished
    at once, so a large pending list never floods the engine; returns the results in item order."""
    from prefect.futures import as_completed

    results: list[Any] = [None] * len(items)
    running: list[tuple[Any, int]] = []

    def collect(future: Any) -> None:
        k = next(i for i, (f, _) in enumerate(running) if f is future)
        results[running.pop(k)[1]] = future.result()

    for index, item in enumerate(items):
        if len(running) >= max(1, in_flight):
            collect(next(as_completed([f for f, _ in running])))
        running.append((submit(item), index))
    for future in as_completed([f for f, _ in running]):
        collect(future)
    return results


def concurrently(calls: Sequence[Callable[[], Any]]) -> list[Any]:
    """Run independent subflow calls at once, each in a thread that carries this flow run's context (so each is a
    subflow of it); returns their results in order. Used where the engine has room for several stages."""
    import contextvars
    from concurrent.futures import ThreadPoolExecutor

    if len(calls) <= 1:
        return [c() for c in calls]
    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        futures = [pool.submit(contextvars.copy_context().run, c) for c in calls]
        return [f.result() for f in futures]


@contextmanager
def in_process_subflows() -> Iterator[None]:
    """Subflows called in here run without their own heartbeat thread: they run in the parent flow run's process,
    whose heartbeat already tells the server when that process dies, and each heartbeat thread costs up to a second
    to stop (it sleeps in one-second steps), which on small inputs is most of a stage's orchestration cost."""
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield


def skipped(stage: str, reason: str, data: Any) -> State:
    """A Completed state named "Skipped" whose message says why: what a stage with unchanged inputs returns."""
    print(f"{stage}: skipped, {reason}")
    return Completed(name="Skipped", message=f"{stage} skipped: {reason}", data=data)


def content_key(*parts: Any) -> str:
    """sha256 of the JSON of ``parts`` (ids, hashes and plain values only, never arrays)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def png_data_uri(path: str | Path, side: int = PREVIEW_SIDE) -> str:
    """A PNG file as a ``data:image/png;base64,...`` URI, downscaled so its longest side is at most ``side``
    (the UI cannot open ``file://`` links, but it shows embedded images)."""
    from PIL import Image

    with Image.open(path) as src:
        im = src.convert("RGB")
    scale = min(1.0, side / max(im.size))
    if scale < 1.0:
        im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))),
                       Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """A markdown table of ``rows`` (the markdown renderer wraps long cells, where the table view cuts them); every
    header and cell is shown as text (``escape_markdown``): datasets name their own images, paths and classes."""
    if not rows:
        return "_(no rows)_\n"
    cols = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(map(_cell, cols)) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_cell(r.get(c, "")) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    """One table cell: a number as it is (rounded), anything else as escaped text."""
    if isinstance(value, float):
        return str(round(value, 3))
    return str(value) if isinstance(value, int) else escape_markdown(value)


def publish_markdown(key: str, markdown: str, description: str) -> None:
    """A markdown artifact named after its stage (``key``, e.g. ``fuse-overlays``)."""
    create_markdown_artifact(key=key, markdown=markdown, description=description)


def publish_table(key: str, rows: list[dict[str, Any]], description: str) -> None:
    """A table artifact whose text cells show as text (the UI renders each string cell as markdown, and datasets
    name their own images, paths and classes)."""
    create_table_artifact(key=key, table=escape_rows(rows), description=description)
