"""Storage dtypes: the smallest dtype that holds a cube losslessly (integers for integer-valued floats, float32
for float64 values that round-trip), guessed from a sample by ingest and widened by the writer when a chunk does
not fit."""

from __future__ import annotations

from typing import Any

import numpy as np

INT_DTYPES = [np.dtype(t) for t in ("uint8", "int8", "uint16", "int16", "uint32", "int32", "int64")]
"""The integer storage dtypes, narrowest first."""


def smallest_int(lo: float, hi: float) -> np.dtype | None:
    """The smallest integer dtype holding [lo, hi] (None when none does)."""
    for t in INT_DTYPES:
        info = np.iinfo(t)
        if info.min <= lo and hi <= info.max:
            return t
    return None


def lossless_dtype(sample: np.ndarray, source: np.dtype) -> np.dtype:
    """The smallest dtype that stores ``sample`` (drawn from a cube of dtype ``source``) exactly: integers for
    integer-valued data (floats included: MATLAB doubles that hold counts), float32 for float64 values that
    round-trip, else the source dtype. Never wider than the source."""
    source = np.dtype(source)
    if sample.size == 0 or source.kind not in "uif":
        return source
    if source.kind == "f" and not np.all(np.isfinite(sample)):
        return source
    lo, hi = float(sample.min()), float(sample.max())
    if source.kind in "ui" or np.array_equal(sample, np.round(sample)):
        cand = smallest_int(lo, hi)
        if cand is not None and cand.itemsize <= source.itemsize and (
                source.kind in "ui" or (abs(lo) < 2**53 and abs(hi) < 2**53)):
            return cand
    if source == np.float64 and np.array_equal(sample.astype(np.float32), sample):
        return np.dtype(np.float32)
    return source


def dtype_sample(data: Any, rows: int = 16) -> np.ndarray:
    """Values to guess the storage dtype from: an in-memory cube whole, a lazy one's top, middle and bottom
    ``rows`` rows (all bands and columns)."""
    if isinstance(data, np.ndarray):
        return data
    h = int(data.shape[1])
    starts = sorted({0, max(0, h // 2 - rows // 2), max(0, h - rows)})
    return np.concatenate([np.asarray(data[:, y:y + rows, :]).reshape(-1) for y in starts])


def wider(current: np.dtype, block: np.ndarray, source: np.dtype) -> np.dtype:
    """The storage dtype after ``block`` failed to round-trip through ``current``."""
    if block.dtype.kind == "f" and not np.all(np.isfinite(block)):
        return source
    lo, hi = float(block.min()), float(block.max())
    if current.kind in "ui" and (block.dtype.kind in "ui" or np.array_equal(block, np.round(block))):
        cur = np.iinfo(current)
        cand = smallest_int(min(lo, cur.min), max(hi, cur.max))
        if cand is not None and cand.itemsize <= source.itemsize and cand != current:
            return cand
    if source == np.float64 and current != np.float32 and (current.kind == "f" or current.itemsize <= 2) \
            and np.array_equal(block.astype(np.float32), block):
        return np.dtype(np.float32)
    return source
