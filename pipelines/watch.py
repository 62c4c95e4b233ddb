"""The "dataset arrived" event: a watcher polls the source root and emits `hvp.dataset.arrived` for each dataset
folder that appears there and has stopped changing; the `relabel-new` deployment's trigger runs on it.

The watcher runs inside `hvp ui` (or alone as `hvp watch`). Folders present when it starts are not arrivals (the
interval schedule of `relabel-new` picks up anything left uncatalogued); a folder still being copied (its file
count, size or newest modification time changed since the last poll) is emitted once it is stable.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Event name of a new dataset folder under the source root.
ARRIVED = "hvp.dataset.arrived"
#: Resource id prefix of a dataset folder (the trigger matches `hvp.dataset.*`).
RESOURCE_PREFIX = "hvp.dataset."


def folder_state(folder: Path) -> tuple[int, int, int]:
    """(files, bytes, newest mtime in ns) of a folder tree: equal on two polls means it stopped changing."""
    files = size = newest = 0
    for p in folder.rglob("*"):
        try:
            st = p.stat()
        except OSError:  # removed while listing: the folder is still changing
            return (-1, -1, -1)
        if p.is_file():
            files, size = files + 1, size + st.st_size
        newest = max(newest, st.st_mtime_ns)
    return files, size, newest


def emit_arrival(source_root: Path, name: str, state: tuple[int, int, int]) -> Any:
    """Emit the `hvp.dataset.arrived` event of one folder to the Prefect API (PREFECT_API_URL)."""
    from prefect.events import emit_event

    return emit_event(event=ARRIVED,
                      resource={"prefect.resource.id": f"{RESOURCE_PREFIX}{name}", "prefect.resource.name": name,
                                "hvp.source-root": str(source_root)},
                      payload={"dataset": name, "source_root": str(source_root), "files": state[0],
                               "bytes": state[1]})


@dataclass
class ArrivalWatcher:
    """Polls ``source_root`` every ``interval`` seconds and emits one event per arrived, stable folder."""

    source_root: Path
    interval: float = 5.0
    seen: set[str] = field(default_factory=set)
    pending: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    emitted: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.source_root = Path(self.source_root)
        self.seen = set(self._folders())

    def _folders(self) -> list[str]:
        if not self.source_root.is_dir():
            return []
        return sorted(p.name for p in self.source_root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def poll(self) -> list[str]:
        """One poll: emit the folders that appeared since the start and did not change since the last poll."""
        out = []
        for name in self._folders():
            if name in self.seen:
                continue
            state = folder_state(self.source_root / name)
            if self.pending.get(name) == state and state[0] > 0:
                emit_arrival(self.source_root, name, state)
                self.seen.add(name)
                self.pending.pop(name)
                out.append(name)
            else:
                self.pending[name] = state
        self.emitted.extend(out)
        return out

    def run(self, stop: threading.Event) -> None:
        """Poll until ``stop`` is set, printing each arrival."""
        while not stop.wait(self.interval):
            for name in self.poll():
                print(f"dataset arrived: {self.source_root / name} (event {ARRIVED} emitted)", flush=True)
