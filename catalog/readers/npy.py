"""NumPy cubes: ``.npy`` files (memory-mapped, so slices read only their region) and ``.npz`` archives (the
array under ``key`` is loaded whole: a zip member cannot be sliced in place)."""

from __future__ import annotations

import zipfile
import zlib
from pathlib import Path

import numpy as np

from base.errors import InputError
from catalog.readers.base import AxisView, RawCube, Reader, ReaderOptions, SourceItem, axes_for, register

_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGIC = b"PK\x03\x04"
_ERRORS = (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error)
_UNREADABLE_FIX = "re-download or re-save it with numpy.save / numpy.savez (a truncated copy cannot be read)"


class NpyOptions(ReaderOptions):
    """``axes``: the array's axis order (e.g. 'yxb' = height x width x band); ``key``: the cube's name inside
    a ``.npz`` (None: the only 3-D numeric array; ignored for ``.npy``)."""

    axes: str = "yxb"
    key: str | None = None


@register
class NpyReader(Reader):
    """One ``.npy`` cube or one cube inside an ``.npz``; the format is told by the file's magic bytes."""

    name = "npy"
    version = "1"
    Options = NpyOptions

    def read(self, item: SourceItem, options: ReaderOptions) -> RawCube:
        assert isinstance(options, NpyOptions)
        path = item.primary
        perm = axes_for(options.axes, path)
        try:
            with path.open("rb") as fh:
                magic = fh.read(len(_NPY_MAGIC))
        except OSError as exc:
            raise InputError(path, "file", f"cannot open the file ({exc})", _UNREADABLE_FIX) from exc
        if magic.startswith(_ZIP_MAGIC):
            key, array = _load_npz(path, options.key)
        elif magic == _NPY_MAGIC:
            key, array = None, _load_npy(path)
        else:
            raise InputError(path, "file", "neither a .npy nor a .npz file (no NumPy or zip signature)",
                             _UNREADABLE_FIX)
        if array.dtype.kind not in "uif":
            raise InputError(path, "options.key" if key else "file", f"the array holds {array.dtype}, not "
                             "numbers", "store the cube as an integer or floating-point array")
        if array.ndim != 3:
            raise InputError(path, "options.axes", f"the array{f' {key!r}' if key else ''} has {array.ndim} "
                             f"dimensions {array.shape}, a cube needs 3 in the order "
                             f"options.axes='{options.axes}'",
                             "store the cube as a 3-D array" + (" or point options.key at it" if key else ""))
        attrs = {"axes": options.axes, **({"key": key} if key else {})}
        return RawCube(data=AxisView(array, perm), attrs=attrs)


def _load_npy(path: Path) -> np.ndarray:
    """Memory-map a ``.npy`` file (no pickles): nothing is read until the cube is sliced."""
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except _ERRORS as exc:
        raise InputError(path, "file", f"not a readable .npy file ({exc})", _UNREADABLE_FIX) from exc


def _npz_members(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Name -> (shape, dtype) of every array in an ``.npz``, read from the member headers without the data."""
    out: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            if not info.filename.endswith(".npy"):
                continue
            with zf.open(info) as member:
                version = np.lib.format.read_magic(member)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape, _, dtype = read_header(member)
            out[info.filename[: -len(".npy")]] = (tuple(shape), np.dtype(dtype))
    return out


def _load_npz(path: Path, key: str | None) -> tuple[str, np.ndarray]:
    """The array under ``key`` (or the only 3-D numeric array) of an ``.npz``, loaded whole."""
    try:
        members = _npz_members(path)
    except _ERRORS as exc:
        raise InputError(path, "file", f"not a readable .npz archive ({exc})", _UNREADABLE_FIX) from exc
    listing = ", ".join(f"{n} ({'x'.join(map(str, s))} {d})" for n, (s, d) in members.items()) or "none"
    if key is None:
        candidates = [n for n, (s, d) in members.items() if len(s) == 3 and d.kind in "uif"]
        if len(candidates) != 1:
            raise InputError(path, "options.key", f"options.key is not set and the archive holds "
                             f"{len(candidates)} 3-D numeric arrays, so the cube is ambiguous",
                             f"set options.key to the cube's name; the archive holds: {listing}")
        key = candidates[0]
    elif key not in members:
        raise InputError(path, "options.key", f"no array '{key}' in the archive",
                         f"set options.key to one of the arrays present: {listing}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            return key, npz[key]
    except _ERRORS as exc:
        raise InputError(path, "file", f"cannot read '{key}' from the .npz archive ({exc})",
                         _UNREADABLE_FIX) from exc
