"""Hyperspectral City v2 ``.hsd`` files: a PCA-compressed cube reconstructed lazily, row block by row block.

Layout (little-endian): int32 height, width, bands, components, start wavelength; float32 step; int32 end
wavelength; float32 mean ``(bands,)``; float32 coefficients ``(components, bands)``; float32 scores
``(height * width, components)``. The cube is ``scores @ coefficients + mean`` in ``(y, x, band)`` order.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from base.errors import InputError
from catalog.readers.base import RawCube, Reader, ReaderOptions, SourceItem, register

HEADER = np.dtype([("height", "<i4"), ("width", "<i4"), ("bands", "<i4"), ("components", "<i4"),
                   ("start", "<i4"), ("step", "<f4"), ("end", "<i4")])
VALUE_SCALE = "float32 reconstructed from PCA (lossy at the source)"


@dataclass(frozen=True)
class HsdHeader:
    """The fixed 28-byte header of an ``.hsd`` file, as Python numbers."""

    height: int
    width: int
    bands: int
    components: int
    start: int
    step: float
    end: int

    @property
    def scores_offset(self) -> int:
        """Byte offset of the scores: after the header, the mean and the coefficients."""
        return HEADER.itemsize + 4 * (self.bands + self.components * self.bands)

    @property
    def file_size(self) -> int:
        """Bytes the whole file must have."""
        return self.scores_offset + 4 * self.height * self.width * self.components


def read_header(path: Path) -> HsdHeader:
    """Parse and check the header against itself and the file size; every mismatch is an InputError."""
    try:
        with open(path, "rb") as f:
            raw = f.read(HEADER.itemsize)
    except OSError as exc:
        raise InputError(path, "file", f"cannot read the file ({exc})",
                         "check the path and permissions") from exc
    if len(raw) < HEADER.itemsize:
        raise InputError(path, "file", f"file has {len(raw)} bytes, fewer than the {HEADER.itemsize}-byte "
                         "header", "re-download the file; it is truncated")
    rec = np.frombuffer(raw, dtype=HEADER)[0]
    head = HsdHeader(height=int(rec["height"]), width=int(rec["width"]), bands=int(rec["bands"]),
                     components=int(rec["components"]), start=int(rec["start"]), step=float(rec["step"]),
                     end=int(rec["end"]))
    for name in ("height", "width", "bands", "components"):
        if getattr(head, name) <= 0:
            raise InputError(path, f"header.{name}", f"{name} is {getattr(head, name)}, not positive",
                             "the file is not a valid .hsd (or is corrupt); re-download it")
    if not np.isfinite(head.step) or head.step <= 0:
        raise InputError(path, "header.step", f"wavelength step is {head.step}, not a positive number",
                         "the file is not a valid .hsd (or is corrupt); re-download it")
    last = head.start + head.step * (head.bands - 1)
    if abs(last - head.end) > head.step:
        raise InputError(path, "header.end wavelength", f"end wavelength {head.end} disagrees with start "
                         f"{head.start} + step {head.step:g} x ({head.bands} - 1) bands = {last:g}",
                         "the header is inconsistent; re-download the file or supply the wavelengths in a "
                         "dataset.yaml")
    actual = path.stat().st_size
    if actual != head.file_size:
        problem = "truncated" if actual < head.file_size else "longer than its header declares"
        raise InputError(path, "file", f"{problem}: expected {head.file_size} bytes for {head.height}x"
                         f"{head.width} pixels, {head.bands} bands and {head.components} components, got "
                         f"{actual}", "re-download the file")
    return head


class HsdCube:
    """Lazy ``(band, y, x)`` float32 view of an ``.hsd`` file: a slice reconstructs only the requested pixels.

    The scores are memory-mapped per access (no handle is kept, so the view pickles); reconstruction runs in
    float64 and is cast to float32 at the end.
    """

    def __init__(self, path: Path, header: HsdHeader, mean: np.ndarray, coeff: np.ndarray) -> None:
        self.path, self.header = path, header
        self.mean, self.coeff = mean, coeff  # float64 (bands,), (components, bands)

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.header.bands, self.header.height, self.header.width)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.float32)

    def __getitem__(self, key: Any) -> np.ndarray:
        if not isinstance(key, tuple):
            key = (key,)
        if len(key) > 3:
            raise IndexError(f"too many indices for a 3-D cube: {key}")
        key = key + (slice(None),) * (3 - len(key))
        norm: list[slice] = []
        drop: list[int] = []
        for axis, (k, size) in enumerate(zip(key, self.shape, strict=True)):
            if isinstance(k, slice):
                norm.append(k)
            elif isinstance(k, int | np.integer):
                i = int(k) + size if k < 0 else int(k)
                if not 0 <= i < size:
                    raise IndexError(f"index {k} is out of bounds for axis {axis} of size {size}")
                norm.append(slice(i, i + 1))
                drop.append(axis)
            else:
                raise TypeError("HsdCube supports integer and slice indices only")
        bs, ys, xs = norm
        h = self.header
        scores = np.memmap(self.path, dtype="<f4", mode="r", offset=h.scores_offset,
                           shape=(h.height, h.width, h.components))
        block = np.asarray(scores[ys, xs], dtype=np.float64)  # (y, x, components): only these rows are read
        del scores
        out = (block @ self.coeff[:, bs] + self.mean[bs]).astype(np.float32)
        out = np.ascontiguousarray(out.transpose(2, 0, 1))
        return out.squeeze(axis=tuple(drop)) if drop else out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self[:, :, :]
        return out.astype(dtype) if dtype is not None else out


@register
class HsdReader(Reader):
    """Hyperspectral City v2 PCA-compressed ``.hsd`` cubes, with wavelengths from the header."""

    name = "hsd"
    version = "1"
    file_wavelengths = True

    def read(self, item: SourceItem, options: ReaderOptions) -> RawCube:
        """Check the header and size, load mean and coefficients, and return the lazy reconstruction."""
        path = item.primary
        head = read_header(path)
        n_mean, n_coeff = head.bands, head.components * head.bands
        with open(path, "rb") as f:
            f.seek(HEADER.itemsize)
            small = np.fromfile(f, dtype="<f4", count=n_mean + n_coeff).astype(np.float64)
        mean, coeff = small[:n_mean], small[n_mean:].reshape(head.components, head.bands)
        wavelengths = head.start + np.float64(head.step) * np.arange(head.bands, dtype=np.float64)
        return RawCube(data=HsdCube(path, head, mean, coeff), wavelengths=wavelengths, wavelength_units="nm",
                       attrs={"value_scale": VALUE_SCALE, "n_components": head.components})
