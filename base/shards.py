"""Cutting a work list into shards: the unit of work a worker takes (one task per shard, not per item, so that an
orchestrator's per-task cost is amortised)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


def shards(items: Sequence[T], size: int, setting: str = "the shard size") -> list[list[T]]:
    """``items`` cut into consecutive shards of at most ``size``; ``setting`` names where the size comes from."""
    if size < 1:
        raise ValueError(f"shard size must be >= 1, got {size}; set {setting} to 1 or more.")
    return [list(items[k:k + size]) for k in range(0, len(items), size)]
