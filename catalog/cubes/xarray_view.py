"""The xarray view of a catalog group: an array as a lazy DataArray whose every selection goes through the
checksummed ``CubeReader`` (only the chunks it touches are read), with the band coordinates and attributes that
plain ``xarray.open_zarr`` decodes from the same group."""

from __future__ import annotations

from typing import Any

import numpy as np
import xarray as xr
from xarray.backends import BackendArray
from xarray.core import indexing

from catalog.cubes.metadata import band_coordinates
from catalog.cubes.reader import CubeReader


class _LazyCube(BackendArray):
    """An array of a catalog group as xarray's lazy backend array: every selection goes through CubeReader
    (checksummed, only the chunks it touches)."""

    def __init__(self, reader: CubeReader, location: str, name: str, shape: tuple[int, ...], dtype: np.dtype):
        self.reader, self.location, self.name = reader, location, name
        self.shape = shape
        self.dtype = dtype

    def __getitem__(self, key: indexing.ExplicitIndexer) -> np.ndarray:
        return indexing.explicit_indexing_adapter(key, self.shape, indexing.IndexingSupport.BASIC, self._get)

    def _get(self, key: tuple[Any, ...]) -> np.ndarray:
        region: list[slice] = []
        after: list[int | np.ndarray | None] = []
        for k, n in zip(key, self.shape, strict=True):
            if isinstance(k, int | np.integer):
                i = int(k) + (n if int(k) < 0 else 0)
                region.append(slice(i, i + 1))
                after.append(0)
                continue
            picked = np.arange(n)[k]
            if picked.size == 0:
                region.append(slice(0, 0))
                after.append(None)
            elif k.step in (None, 1):
                region.append(slice(int(picked[0]), int(picked[-1]) + 1))
                after.append(None)
            else:
                lo = int(picked.min())
                region.append(slice(lo, int(picked.max()) + 1))
                after.append(picked - lo)
        data = self.reader.read(self.location, tuple(region), self.name)
        for axis in reversed(range(len(after))):
            sel = after[axis]
            if sel is not None:
                data = np.take(data, sel, axis=axis)
        return data


def open_dataarray(reader: CubeReader, location: str, name: str = "cube") -> xr.DataArray:
    """The array ``location/name`` as a lazy DataArray with its dimension names, its band coordinates
    (``wavelength``, ``fwhm``: those its ``coordinates`` attribute names, or in older groups those present) and the
    group's and array's attributes: what ``xarray.open_zarr`` shows of the group, read through the checksummed
    reader."""
    meta = reader.metadata(f"{reader.root}/{location}/{name}/zarr.json")
    shape = tuple(int(s) for s in meta["shape"])
    dims = tuple(meta.get("dimension_names") or (f"dim_{i}" for i in range(len(shape))))
    info = reader.info(location, name)
    dtype = info.dtype.newbyteorder("=") if info is not None else np.dtype(meta["data_type"])
    var = xr.Variable(dims, indexing.LazilyIndexedArray(_LazyCube(reader, location, name, shape, dtype)))
    attrs = dict(meta.get("attributes", {}))
    coords = {}
    for coord in band_coordinates(attrs):
        try:
            coord_meta = reader.metadata(f"{reader.root}/{location}/{coord}/zarr.json")
        except FileNotFoundError:
            continue
        coords[coord] = xr.Variable(tuple(coord_meta.get("dimension_names") or dims[:1]),
                                    reader.read(location, (), coord), attrs=dict(coord_meta.get("attributes", {})))
    attrs.pop("coordinates", None)  # decoded into coords, as xarray does
    da = xr.DataArray(var, coords=coords, name=name)
    da.attrs = {**reader.group_attrs(location), **attrs}
    return da
