"""MATLAB .mat cubes: v7.3 files (HDF5 inside, read lazily with h5py) and v5 files (scipy.io.loadmat, eager).

Axis orders are given as MATLAB (and scipy.io.loadmat) shows the array; h5py shows a v7.3 array with its axes
reversed (MATLAB is column-major), so the reader reverses the order itself and one spec serves both versions.
The cube's variable is the configured ``key``, else the only 3-D numeric array: never "the last key".
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import scipy.io
from scipy.io.matlab import MatReadError

from base.errors import InputError
from catalog.readers.base import AxisView, RawCube, Reader, ReaderOptions, SourceItem, axes_for, register
from catalog.readers.hdf5 import H5Array, is_numeric, open_h5

NUMERIC_CLASSES = frozenset({"double", "single", "int8", "uint8", "int16", "uint16", "int32", "uint32",
                             "int64", "uint64"})
WAVELENGTH_NAMES = ("wavelength", "wavelengths", "bands", "wl")
_DTYPE_CLASSES = {"float64": "double", "float32": "single"}
_V5_ERRORS = (MatReadError, ValueError, OSError, EOFError, IndexError, TypeError, NotImplementedError,
              zlib.error)
_UNREADABLE_FIX = ("re-download or re-save the file (MATLAB: save(..., '-v7.3') or '-v7'); a truncated copy "
                   "cannot be read")


@dataclass(frozen=True)
class MatVariable:
    """One top-level variable: its shape as MATLAB shows it and its MATLAB class ('double', 'struct', ...)."""

    name: str
    shape: tuple[int, ...]
    mclass: str

    @property
    def numeric(self) -> bool:
        return self.mclass in NUMERIC_CLASSES

    def describe(self) -> str:
        return f"{self.name} ({'x'.join(map(str, self.shape))} {self.mclass})"


class MatlabOptions(ReaderOptions):
    """``key``: the cube's variable (None: the only 3-D numeric array); ``axes``: its axis order as MATLAB
    shows it (e.g. 'yxb' = height x width x band); ``rgb_key``: an aligned (y, x, 3) RGB in the same file."""

    key: str | None = None
    axes: str = "yxb"
    rgb_key: str | None = None


@register
class MatlabReader(Reader):
    """A .mat file holding one cube (plus, optionally, its aligned RGB and its band centres)."""

    name = "matlab"
    version = "1"
    Options = MatlabOptions

    def read(self, item: SourceItem, options: ReaderOptions) -> RawCube:
        assert isinstance(options, MatlabOptions)
        path = item.primary
        if not path.is_file():
            raise InputError(path, "file", "file does not exist", "restore the file or remove it")
        perm = axes_for(options.axes, path)
        if h5py.is_hdf5(path):
            return _read_v73(path, options, perm)
        return _read_v5(path, options, perm)


def _choose_key(path: Path, variables: dict[str, MatVariable], options: MatlabOptions) -> MatVariable:
    """The configured cube variable, or the only 3-D numeric one; checked to be a numeric 3-D array."""
    listing = ", ".join(v.describe() for v in variables.values()) or "none"
    if options.key is not None:
        if options.key not in variables:
            raise InputError(path, "options.key", f"no variable '{options.key}' in the file",
                             f"set options.key to one of the variables present: {listing}")
        var = variables[options.key]
    else:
        candidates = [v for v in variables.values()
                      if v.numeric and len(v.shape) == 3 and v.name != options.rgb_key]
        if len(candidates) != 1:
            found = ", ".join(v.describe() for v in candidates) if candidates else "none"
            raise InputError(path, "options.key", f"options.key is not set and the file holds "
                             f"{len(candidates)} 3-D numeric arrays ({found}), so the cube is ambiguous",
                             f"set options.key to the cube's variable; the file holds: {listing}")
        var = candidates[0]
    if not var.numeric:
        raise InputError(path, "options.key", f"'{var.name}' is a {var.mclass}, not a numeric array",
                         f"set options.key to the cube's variable; the file holds: {listing}")
    if len(var.shape) != 3:
        raise InputError(path, "options.axes", f"'{var.name}' has {len(var.shape)} dimensions {var.shape}, a "
                         f"cube needs 3 in the order options.axes='{options.axes}'",
                         f"point options.key at the 3-D cube; the file holds: {listing}")
    return var


def _check_rgb_key(path: Path, variables: dict[str, MatVariable], rgb_key: str) -> None:
    """The configured RGB variable must exist and hold numbers (its shape is checked once it is read)."""
    if rgb_key not in variables or not variables[rgb_key].numeric:
        listing = ", ".join(v.describe() for v in variables.values())
        problem = "is not a numeric array" if rgb_key in variables else "is not in the file"
        raise InputError(path, "options.rgb_key", f"variable '{rgb_key}' {problem}",
                         f"set options.rgb_key to one of: {listing}, or remove it")


def _wavelength_variable(variables: dict[str, MatVariable], bands: int) -> MatVariable | None:
    """A numeric vector named 'wavelength(s)', 'bands' or 'wl' with one value per band, if there is one."""
    for var in variables.values():
        vector = sum(d != 1 for d in var.shape) <= 1 and int(np.prod(var.shape)) == bands
        if var.name.lower() in WAVELENGTH_NAMES and var.numeric and vector:
            return var
    return None


def _rgb_uint8(path: Path, rgb: np.ndarray, yx: tuple[int, ...], rgb_key: str) -> np.ndarray:
    """The file's aligned RGB as (y, x, 3) uint8: uint8 kept, float in [0, 1] scaled by 255."""
    if rgb.shape != (*yx, 3):
        raise InputError(path, "options.rgb_key", f"'{rgb_key}' has shape {rgb.shape} but the cube's "
                         f"aligned RGB must be {(*yx, 3)} (y, x, 3)",
                         "point options.rgb_key at the aligned RGB or remove it")
    if rgb.dtype == np.uint8:
        return rgb
    if rgb.dtype.kind == "f" and rgb.size and float(np.nanmin(rgb)) >= 0.0 and float(np.nanmax(rgb)) <= 1.0:
        return np.round(np.nan_to_num(rgb) * 255.0).astype(np.uint8)
    raise InputError(path, "options.rgb_key", f"'{rgb_key}' holds {rgb.dtype} values that are neither uint8 "
                     "nor floats in [0, 1]", "store the RGB as uint8 or floats in [0, 1], or remove it")


def _v73_variables(f: h5py.File) -> dict[str, MatVariable]:
    """Top-level variables of a v7.3 file, shapes reversed to MATLAB's order ('#refs#' etc. are skipped)."""
    out: dict[str, MatVariable] = {}
    for name, obj in f.items():
        if name.startswith("#"):
            continue
        mclass = obj.attrs.get("MATLAB_class", b"")
        mclass = mclass.decode() if isinstance(mclass, bytes) else str(mclass)
        if not isinstance(obj, h5py.Dataset):
            out[name] = MatVariable(name, (), mclass or "struct")
            continue
        if not mclass:  # written without MATLAB's attributes: name the class after the dtype
            mclass = _DTYPE_CLASSES.get(obj.dtype.name, obj.dtype.name)
        if obj.attrs.get("MATLAB_empty", 0):
            mclass = f"empty {mclass}"
        elif not is_numeric(obj.dtype):  # e.g. complex numbers, stored as a compound type
            mclass = f"{mclass} ({obj.dtype})"
        out[name] = MatVariable(name, tuple(obj.shape[::-1]), mclass)
    return out


def _read_v73(path: Path, options: MatlabOptions, perm: tuple[int, ...]) -> RawCube:
    """A v7.3 file: the cube stays in the file and is read lazily; h5py axis i is MATLAB axis (2 - i)."""
    with open_h5(path) as f:
        variables = _v73_variables(f)
        var = _choose_key(path, variables, options)
        dset = f[var.name]
        data = AxisView(H5Array(path, var.name, dset.shape, dset.dtype), tuple(2 - a for a in perm))
        rgb = None
        if options.rgb_key is not None:
            _check_rgb_key(path, variables, options.rgb_key)
            rgb = _rgb_uint8(path, np.asarray(f[options.rgb_key][()]).T, data.shape[1:], options.rgb_key)
        wl_var = _wavelength_variable(variables, data.shape[0])
        wavelengths = np.asarray(f[wl_var.name][()], dtype=np.float64).ravel() if wl_var else None
    return RawCube(data=data, wavelengths=wavelengths, rgb=rgb,
                   attrs={"matlab_version": "7.3", "key": var.name, "axes": options.axes})


def _unreadable(path: Path, exc: Exception) -> InputError:
    """The error for a file that is neither readable HDF5 (v7.3) nor a readable v5 MAT-file."""
    if isinstance(exc, NotImplementedError):  # scipy's answer to a v7.3 header: the HDF5 part is damaged
        problem = "a MATLAB v7.3 (HDF5) file whose HDF5 part cannot be opened"
    else:
        problem = f"neither readable HDF5 (MATLAB v7.3) nor a v5 MAT-file ({type(exc).__name__}: {exc})"
    return InputError(path, "file", problem, _UNREADABLE_FIX)


def _read_v5(path: Path, options: MatlabOptions, perm: tuple[int, ...]) -> RawCube:
    """A v5 (or v6/v7) file: scipy cannot read part of a variable, so the cube is loaded whole."""
    try:
        variables = {name: MatVariable(name, tuple(shape), mclass)
                     for name, shape, mclass in scipy.io.whosmat(path)}
    except _V5_ERRORS as exc:
        raise _unreadable(path, exc) from exc
    var = _choose_key(path, variables, options)
    if options.rgb_key is not None:
        _check_rgb_key(path, variables, options.rgb_key)
    wl_var = _wavelength_variable(variables, var.shape[perm[0]])
    wanted = [var.name, *(n for n in (options.rgb_key, wl_var.name if wl_var else None) if n is not None)]
    try:
        loaded: dict[str, Any] = scipy.io.loadmat(path, variable_names=wanted, mat_dtype=True)
    except _V5_ERRORS as exc:
        raise _unreadable(path, exc) from exc
    cube = np.asarray(loaded[var.name])
    if not is_numeric(cube.dtype):
        raise InputError(path, "options.key", f"'{var.name}' holds {cube.dtype} values, not real numbers",
                         "point options.key at the real-valued cube")
    data = np.transpose(cube, perm)
    rgb = (_rgb_uint8(path, np.asarray(loaded[options.rgb_key]), data.shape[1:], options.rgb_key)
           if options.rgb_key is not None else None)
    wavelengths = np.asarray(loaded[wl_var.name], dtype=np.float64).ravel() if wl_var else None
    return RawCube(data=data, wavelengths=wavelengths, rgb=rgb,
                   attrs={"matlab_version": "5", "key": var.name, "axes": options.axes})
