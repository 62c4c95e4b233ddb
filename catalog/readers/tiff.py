"""TIFF reader: multi-band (samples per pixel) or multi-page (one page per band) TIFF through tifffile.

Uncompressed contiguous files are memory-mapped (a slice reads only its region); others are read page by page.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tifffile

from catalog.errors import InputError
from catalog.readers.base import AxisView, RawCube, Reader, ReaderOptions, SourceItem, axes_for, register


class TiffOptions(ReaderOptions):
    """``axes``: order of the stored 3-D series ('byx' for pages-as-bands, 'yxb' for samples-as-bands);
    None infers it from the TIFF's own layout: samples per pixel are bands, else pages are."""

    axes: str | None = None


class PagedCube:
    """Lazy ``(band, y, x)`` view of a multi-page TIFF whose pages are compressed: reads only the pages asked."""

    def __init__(self, path: Any, shape: tuple[int, int, int], dtype: np.dtype) -> None:
        self.path, self.shape, self.dtype = path, shape, np.dtype(dtype)

    def __getitem__(self, key: Any) -> np.ndarray:
        if not isinstance(key, tuple):
            key = (key,)
        key = key + (slice(None),) * (3 - len(key))
        bands = range(*key[0].indices(self.shape[0]))
        with tifffile.TiffFile(self.path) as tif:
            pages = [tif.pages[i].asarray()[key[1], key[2]] for i in bands]  # type: ignore[union-attr]
        if not pages:
            return np.zeros((0, *np.zeros(self.shape[1:])[key[1], key[2]].shape), self.dtype)
        return np.stack(pages).astype(self.dtype, copy=False)


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
                series = tif.series[0]
                shape, dtype, series_axes = tuple(series.shape), np.dtype(series.dtype), series.axes
                n_pages = len(tif.pages)
                compressed = any(getattr(p, "compression", 1) not in (1, None) for p in tif.pages)  # type: ignore[union-attr]
        except (tifffile.TiffFileError, ValueError, IndexError, OSError) as exc:
            raise InputError(path, "file", f"not a readable TIFF ({exc})", "re-export the image as TIFF") from None
        if len(shape) != 3:
            raise InputError(path, "shape", f"the TIFF holds a {len(shape)}-D image {shape}, not a cube",
                             "give a multi-band or multi-page TIFF (one band per sample or page)")
        order = options.axes or ("yxb" if series_axes.endswith("S") else "byx")
        perm = axes_for(order, path, "options.axes")
        if n_pages > 1 and compressed and order == "byx":
            return RawCube(data=PagedCube(path, shape, dtype), attrs={"tiff_layout": "pages", "compressed": True})
        try:
            mm = tifffile.memmap(path, mode="r")
            source: Any = mm
        except ValueError:  # compressed or not contiguous: read it whole (single-page multi-sample images are small)
            source = tifffile.imread(path)
        return RawCube(data=AxisView(source, perm), attrs={"tiff_layout": "pages" if n_pages > 1 else "samples"})
