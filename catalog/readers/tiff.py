"""TIFF reader: multi-band TIFF (bands as samples per pixel, contiguous or planar) or multi-page TIFF (one page per
band), through tifffile.

Uncompressed contiguous files are memory-mapped per read, so a slice touches only its region; compressed
multi-page files decode only the pages (bands) a slice asks for; a compressed single page is decoded when read.
The band axis is the TIFF's own structure: samples per pixel, or pages, are bands (``options.axes`` overrides).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
import tifffile

from base.errors import InputError
from catalog.readers.base import AxisView, RawCube, Reader, ReaderOptions, SourceItem, axes_for, register

Layout = Literal["mapped", "pages", "page"]


class TiffOptions(ReaderOptions):
    """``axes``: order of the stored 3-D series as a permutation of 'b', 'y', 'x' (e.g. 'byx' for one page per
    band, 'yxb' for bands as samples per pixel); None reads it from the TIFF: rows are y, columns x, the rest b."""

    axes: str | None = None


class TiffArray:
    """Lazy view of a TIFF's first series in its stored (3-axis, singletons dropped) order.

    Holds only the path and the layout found at read time, so it pickles cheaply; every slice opens the file
    (a memory map of just the image bytes, or a tifffile handle for compressed pages) and closes it again.
    """

    def __init__(self, path: Path, shape: tuple[int, int, int], file_dtype: np.dtype, layout: Layout,
                 offset: int | None = None) -> None:
        self.path, self._shape, self.layout, self.offset = str(path), shape, layout, offset
        self.file_dtype = np.dtype(file_dtype)

    @property
    def shape(self) -> tuple[int, ...]:
        return self._shape

    @property
    def dtype(self) -> np.dtype:
        return self.file_dtype.newbyteorder("=")

    def __getitem__(self, key: Any) -> np.ndarray:
        if not isinstance(key, tuple):
            key = (key,)
        if len(key) > 3 or any(not isinstance(k, slice) for k in key):
            raise TypeError("TiffArray supports up to three slices")
        key = key + (slice(None),) * (3 - len(key))
        if self.layout == "mapped":
            mapped = np.memmap(self.path, dtype=self.file_dtype, mode="r", offset=self.offset or 0, shape=self._shape)
            return np.array(mapped[key], dtype=self.dtype)
        with tifffile.TiffFile(self.path) as tif:
            if self.layout == "page":
                block = tif.series[0].asarray().reshape(self._shape)[key]
            else:  # one page per entry of the first axis: decode only the pages asked for
                pages = list(range(*key[0].indices(self._shape[0])))
                if not pages:
                    return np.empty((0, *np.empty(self._shape[1:], np.bool_)[key[1:]].shape), self.dtype)
                block = tif.asarray(key=pages, series=0).reshape(len(pages), *self._shape[1:])[:, key[1], key[2]]
        return np.asarray(block, dtype=self.dtype)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self[:, :, :]
        return out.astype(dtype) if dtype is not None else out


@register
class TiffReader(Reader):
    """Multi-band or multi-page TIFF; native dtype kept, wavelengths from the spec."""

    name = "tiff"
    version = "1"
    Options = TiffOptions

    def read(self, item: SourceItem, options: ReaderOptions) -> RawCube:
        assert isinstance(options, TiffOptions)
        path = item.primary
        try:
            with tifffile.TiffFile(path) as tif:
                if not tif.series:
                    raise InputError(path, "file", "the TIFF holds no image", "re-export the cube as TIFF")
                series = tif.series[0]
                axes, shape, offset = series.axes, tuple(series.shape), series.dataoffset
                file_dtype = np.dtype(series.dtype).newbyteorder(tif.byteorder)
                pages = [p for p in series.pages if p is not None]
                end = max((o + c for p in pages for o, c in zip(p.dataoffsets, p.databytecounts, strict=True)),
                          default=0)
        except (tifffile.TiffFileError, ValueError, OSError, IndexError, KeyError) as exc:
            raise InputError(path, "file", f"not a readable TIFF ({type(exc).__name__}: {exc})",
                             "re-export or copy the file again; it is not a valid TIFF") from None
        size = path.stat().st_size
        if end > size:
            raise InputError(path, "file", f"truncated: {size} bytes, but the image data runs to byte {end}",
                             "copy the file again from the source")
        kept = [i for i, (a, n) in enumerate(zip(axes, shape, strict=True)) if a in "YX" or n != 1]
        stored_axes = "".join(axes[i] for i in kept)
        stored_shape = tuple(shape[i] for i in kept)
        if len(kept) != 3:
            raise InputError(path, "shape", f"the TIFF holds a {len(kept)}-D image {stored_shape} (axes "
                             f"{stored_axes!r}), not a (band, y, x) cube",
                             "give a multi-band TIFF (bands as samples per pixel) or a multi-page TIFF (one page "
                             "per band)")
        order = options.axes or "".join({"Y": "y", "X": "x"}.get(a, "b") for a in stored_axes)
        if options.axes is None and sorted(order) != ["b", "x", "y"]:
            raise InputError(path, "options.axes", f"cannot tell the band axis of the stored axes {stored_axes!r}",
                             "set 'options.axes' in the spec, e.g. 'byx' or 'yxb'")
        perm = axes_for(order, path, "options.axes")
        layout: Layout = "mapped" if offset is not None else "pages" if len(pages) > 1 else "page"
        if layout == "pages" and len(pages) != stored_shape[0]:
            raise InputError(path, "shape", f"{len(pages)} pages for a series of shape {stored_shape}",
                             "store one page per band, or the whole cube in one page")
        array = TiffArray(path, stored_shape, file_dtype, layout, offset)  # type: ignore[arg-type]
        data = array if perm == (0, 1, 2) else AxisView(array, perm)
        return RawCube(data=data, attrs={"axes": order, "tiff_layout": layout})
