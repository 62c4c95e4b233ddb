"""Prefect wiring shared by the flows: retry conditions, the `gpu` concurrency slot, "skipped" states, content
keys, and artifacts a person can read in the UI (tables that fit, PNG previews embedded as data URIs)."""

from __future__ import annotations

import base64
import hashlib
import io
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.states import Completed, State

from infra.markdown import escape_markdown, escape_rows

#: Name of the global concurrency limit that labelling and training take a slot of (`hvp ui` creates it with one
#: slot; where it does not exist, work proceeds unlimited).
GPU_LIMIT = "gpu"
#: Longest side of an image preview embedded in a markdown artifact, in pixels.
PREVIEW_SIDE = 720


def threads(workers: int) -> Any:
    """A thread-pool task runner of ``workers`` threads (typed loosely: Prefect's generic runner types do not unify
    with the flow decorator's)."""
    from prefect.task_runners import ThreadPoolTaskRunner

    return ThreadPoolTaskRunner(max_workers=workers)


def retry_on_io(task: Any, task_run: Any, state: Any) -> bool:
    """Retry only transient I/O failures (OSError); bad input and bugs fail at once."""
    try:
        state.result()
    except OSError:
        return True
    except Exception:
        return False
    return False


@contextmanager
def gpu_slot() -> Iterator[None]:
    """Hold one slot of the global `gpu` concurrency limit while model work runs (no-op where the server has no
    such limit, e.g. the temporary server of a CLI run: `hvp ui` creates it)."""
    from prefect.concurrency.sync import concurrency

    if not _gpu_limit_exists():
        yield
        return
    with concurrency(GPU_LIMIT, occupy=1, strict=False):
        yield


_GPU_LIMIT_SEEN: dict[str, bool] = {}


def _gpu_limit_exists() -> bool:
    """Whether the current Prefect API has the `gpu` limit (asked once per API address and process)."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL

    api = str(PREFECT_API_URL.value())
    if api not in _GPU_LIMIT_SEEN:
        try:
            with get_client(sync_client=True) as client:
                client.read_global_concurrency_limit_by_name(GPU_LIMIT)
            _GPU_LIMIT_SEEN[api] = True
        except ObjectNotFound:
            _GPU_LIMIT_SEEN[api] = False
    return _GPU_LIMIT_SEEN[api]


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
