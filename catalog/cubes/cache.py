"""The per-process chunk cache: decoded, verified chunks kept least recently used first out, bounded in bytes."""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np


class ChunkCache:
    """Decoded, verified chunks of one process, least recently used first out, bounded in bytes (overlapping
    crops of one image read each chunk once). Thread-safe; 0 bytes disables it."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.nbytes = 0
        self.hits = 0
        self.misses = 0
        self._items: OrderedDict[tuple[str, tuple[int, ...]], np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, tuple[int, ...]]) -> np.ndarray | None:
        """The cached chunk or None (counted as a hit or a miss)."""
        with self._lock:
            chunk = self._items.get(key)
            if chunk is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return chunk

    def __contains__(self, key: tuple[str, tuple[int, ...]]) -> bool:
        return key in self._items

    def drop(self, prefix: str) -> None:
        """Forget the chunks of arrays whose path starts with ``prefix`` (their files were rewritten)."""
        with self._lock:
            for key in [k for k in self._items if k[0].startswith(prefix)]:
                self.nbytes -= self._items.pop(key).nbytes

    def put(self, key: tuple[str, tuple[int, ...]], chunk: np.ndarray) -> None:
        """Keep a (read-only) chunk, evicting the least recently used ones beyond ``max_bytes``."""
        if chunk.nbytes > self.max_bytes:
            return
        chunk.flags.writeable = False
        with self._lock:
            old = self._items.pop(key, None)
            self.nbytes += chunk.nbytes - (old.nbytes if old is not None else 0)
            self._items[key] = chunk
            while self.nbytes > self.max_bytes:
                self.nbytes -= self._items.popitem(last=False)[1].nbytes
