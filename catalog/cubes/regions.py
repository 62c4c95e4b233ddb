"""Read requests on a chunk grid: a region (unit-step slices, band indices on the first axis) normalised against an
array and planned as, per chunk, the pieces of the output it fills."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from catalog.cubes.metadata import ArrayInfo

Region = tuple[slice | np.ndarray, ...]
"""A read request per dimension: a unit-step slice, or (first dimension only) a sorted array of band indices."""


@dataclass
class Piece:
    """One chunk's share of one output: which part of the chunk goes where in ``out``."""

    out: np.ndarray
    dst: tuple[Any, ...]
    src: tuple[Any, ...]


def plan_chunks(info: ArrayInfo, region: Region, out: np.ndarray) -> dict[tuple[int, ...], list[Piece]]:
    """Chunk grid index -> the pieces of ``out`` it fills, for one region of one array."""
    axes: list[list[tuple[int, Any, Any]]] = []  # per dim: (chunk index, src selector, dst selector)
    for d, (sel, c, n) in enumerate(zip(region, info.chunks, info.shape, strict=True)):
        entries: list[tuple[int, Any, Any]] = []
        if isinstance(sel, slice):
            lo, hi = sel.start or 0, n if sel.stop is None else sel.stop
            for k in range(lo // c, (hi - 1) // c + 1 if hi > lo else lo // c):
                a, b = max(lo, k * c), min(hi, (k + 1) * c)
                entries.append((k, slice(a - k * c, b - k * c), slice(a - lo, b - lo)))
        else:
            if d != 0:
                raise ValueError("index arrays are supported on the band axis only")
            idx = np.asarray(sel, dtype=np.int64)
            for k in np.unique(idx // c):
                pos = np.flatnonzero(idx // c == k)
                local = idx[pos] - k * c
                if local.size and np.all(np.diff(local) == 1) and np.all(np.diff(pos) == 1):
                    entries.append((int(k), slice(int(local[0]), int(local[-1]) + 1),
                                    slice(int(pos[0]), int(pos[-1]) + 1)))
                else:
                    entries.append((int(k), local, pos))
        axes.append(entries)
    plan: dict[tuple[int, ...], list[Piece]] = {}
    for combo in _product(axes):
        grid_index: tuple[int, ...] = tuple(int(e[0]) for e in combo)
        plan.setdefault(grid_index, []).append(Piece(out, tuple(e[2] for e in combo), tuple(e[1] for e in combo)))
    return plan


def _product(axes: list[list[Any]]) -> Iterator[tuple[Any, ...]]:
    """Every combination of one entry per axis, first axis slowest."""
    if not axes:
        yield ()
        return
    for head in axes[0]:
        for tail in _product(axes[1:]):
            yield (head, *tail)


def normalise_region(info: ArrayInfo, region: Sequence[slice | np.ndarray | Sequence[int] | None]) -> Region:
    """Clip slices to the array, turn band lists into sorted unique index arrays; missing trailing dims = all."""
    out: list[slice | np.ndarray] = []
    full = list(region) + [None] * (len(info.shape) - len(region))
    for d, (sel, n) in enumerate(zip(full, info.shape, strict=True)):
        if sel is None:
            out.append(slice(0, n))
        elif isinstance(sel, slice):
            lo, hi, step = sel.indices(n)
            if step != 1:
                raise ValueError("the direct reader takes unit-step slices; slice the result for strides")
            out.append(slice(lo, max(lo, hi)))
        else:
            idx = np.asarray(sel, dtype=np.int64).ravel()
            if d != 0:
                raise ValueError("index arrays are supported on the band axis only")
            if idx.size and (np.any(np.diff(idx) <= 0) or idx[0] < 0 or idx[-1] >= n):
                raise ValueError(f"band indices must be increasing, unique and within 0..{n - 1}")
            out.append(idx)
    return tuple(out)


def extent(sel: slice | np.ndarray) -> int:
    """How many indices a normalised selection picks."""
    return sel.stop - sel.start if isinstance(sel, slice) else int(sel.size)
