"""Generic HDF5 cubes (e.g. HSSOD's ``hypercube``), read lazily through h5py.

The shared pieces (:func:`open_h5`, :class:`H5Array`) also serve MATLAB v7.3 files, which are HDF5 inside.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import h5py
import numpy as np
from pydantic import model_validator

from base.errors import InputError
from catalog.readers.base import AxisView, LazyArray, RawCube, Reader, ReaderOptions, SourceItem, axes_for, register

_UNREADABLE_FIX = "re-download or re-export the file (a truncated or partly copied file cannot be read)"
#: Names (any case, anywhere in the file) of a 1-D band-centre dataset found without ``wavelength_key``.
WAVELENGTH_NAMES = ("wavelength", "wavelengths", "wavelength_nm", "wavelengths_nm", "wl", "lambda")
#: HDF5 ``units`` attribute spellings of the two units a band centre comes in.
UNIT_ATTRS = {"nm": "nm", "nanometers": "nm", "nanometres": "nm", "um": "um", "µm": "um", "micrometers": "um",
              "micrometres": "um", "microns": "um"}


@contextmanager
def open_h5(path: Path) -> Iterator[h5py.File]:
    """Open an HDF5 file read-only; any failure to open or read it becomes an InputError on field 'file'."""
    try:
        with h5py.File(path, "r") as f:
            yield f
    except OSError as exc:
        raise InputError(path, "file", f"not a readable HDF5 file ({exc})", _UNREADABLE_FIX) from exc


class H5Array(LazyArray):
    """A lazy h5py dataset: it opens the file only for the duration of each slice, so it holds no handle and
    pickles to workers; ``data[b0:b1, ...]`` reads only that region (chunk by chunk for chunked datasets)."""

    def __init__(self, path: Path, key: str, shape: tuple[int, ...], dtype: np.dtype) -> None:
        super().__init__(shape, dtype)
        self.path, self.key = path, key

    def __getitem__(self, key: Any) -> np.ndarray:
        with open_h5(self.path) as f:
            return np.asarray(f[self.key][key])


def dataset_paths(f: h5py.File) -> list[str]:
    """Every dataset's path inside an HDF5 file (for error messages that list what is there)."""
    out: list[str] = []
    f.visititems(lambda name, obj: out.append(name) if isinstance(obj, h5py.Dataset) else None)
    return out


def is_numeric(dtype: np.dtype) -> bool:
    """True for integer and real floating dtypes (what a cube may hold)."""
    return np.dtype(dtype).kind in "uif"


class Hdf5Options(ReaderOptions):
    """``key``: dataset path inside the file ('a/b' allowed); ``axes``: its axis order as h5py shows it (e.g.
    'bxy'); ``wavelength_key``: 1-D dataset of band centres, in ``wavelength_units`` if stated (by default a
    dataset named like WAVELENGTH_NAMES with one value per band is used, its ``units`` attribute read)."""

    key: str
    axes: str
    wavelength_key: str | None = None
    wavelength_units: Literal["nm", "um"] | None = None

    @model_validator(mode="after")
    def _units_need_key(self) -> Hdf5Options:
        if self.wavelength_units is not None and self.wavelength_key is None:
            raise ValueError("wavelength_units is set but wavelength_key is not: name the wavelength dataset")
        return self


@register
class Hdf5Reader(Reader):
    """One HDF5 file holding one 3-D cube dataset (plus, optionally, a 1-D dataset of its wavelengths)."""

    name = "hdf5"
    version = "1"
    Options = Hdf5Options
    file_wavelengths = True

    def read(self, item: SourceItem, options: ReaderOptions) -> RawCube:
        assert isinstance(options, Hdf5Options)
        path = item.primary
        perm = axes_for(options.axes, path)
        with open_h5(path) as f:
            dset = f.get(options.key)
            if not isinstance(dset, h5py.Dataset):
                what = "is a group, not a dataset" if dset is not None else "is not in the file"
                present = ", ".join(dataset_paths(f)) or "none"
                raise InputError(path, "options.key", f"'{options.key}' {what}",
                                 f"set options.key to one of the datasets: {present}")
            if not is_numeric(dset.dtype):
                raise InputError(path, "options.key", f"'{options.key}' holds {dset.dtype}, not numbers",
                                 "point options.key at the numeric cube dataset")
            if dset.ndim != 3:
                raise InputError(path, "options.axes", f"'{options.key}' has {dset.ndim} dimensions "
                                 f"{dset.shape}, a cube needs 3 in the order options.axes='{options.axes}'",
                                 "point options.key at the 3-D cube dataset")
            data = AxisView(H5Array(path, options.key, dset.shape, dset.dtype), perm)
            key: str | None = options.wavelength_key
            units: str | None = options.wavelength_units
            if key is None and (key := self._find_wavelengths(f, data.shape[0])) is not None:
                raw_units = f[key].attrs.get("units", b"")
                raw_units = raw_units.decode() if isinstance(raw_units, bytes) else str(raw_units)
                units = UNIT_ATTRS.get(raw_units.strip().lower())
            wavelengths = self._wavelengths(f, path, key, data.shape[0]) if key else None
        return RawCube(data=data, wavelengths=wavelengths,
                       wavelength_units=units if wavelengths is not None else None,
                       attrs={"key": options.key, "axes": options.axes,
                              **({"wavelength_key": key} if key else {})})

    @staticmethod
    def _find_wavelengths(f: h5py.File, bands: int) -> str | None:
        """The path of a 1-D numeric dataset named like a wavelength list with one value per band, or None."""
        for name in dataset_paths(f):
            dset = f[name]
            if (name.rsplit("/", 1)[-1].lower() in WAVELENGTH_NAMES and is_numeric(dset.dtype)
                    and dset.size == bands and max(dset.shape, default=0) == bands):
                return name
        return None

    @staticmethod
    def _wavelengths(f: h5py.File, path: Path, key: str, bands: int) -> np.ndarray:
        """The 1-D band-centre dataset ``key``, checked against the cube's band count."""
        dset = f.get(key)
        if not isinstance(dset, h5py.Dataset) or not is_numeric(dset.dtype):
            raise InputError(path, "options.wavelength_key", f"'{key}' is not a numeric dataset in the file",
                             f"set it to one of: {', '.join(dataset_paths(f))}, or remove it and give the "
                             "wavelengths in the spec")
        values = np.asarray(dset[()], dtype=np.float64).ravel()
        if values.size != bands:
            raise InputError(path, "options.wavelength_key", f"'{key}' holds {values.size} values but the "
                             f"cube has {bands} bands", "point it at the band centres or fix options.axes")
        return values
