"""Readers of label files: class maps and masks (PNG/BMP/TIFF/JPEG images, .npy/.npz, MATLAB v5/v7.3) and box
files (text, one ``x y w h`` per line). Every failure is an InputError naming the file, the field and the fix.
"""

from __future__ import annotations

import re
import zlib
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import scipy.io

from base.errors import InputError
from catalog.annotations import AnnotationSpec

IMAGE_SUFFIXES = frozenset({".png", ".bmp", ".tif", ".tiff", ".jpg", ".jpeg", ".gif"})
FORMAT_BY_SUFFIX = {**dict.fromkeys(IMAGE_SUFFIXES, "image"), ".npy": "npy", ".npz": "npy", ".mat": "mat",
                    ".txt": "boxes", ".csv": "boxes"}
_SINGLE = frozenset({"1", "L", "P", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
_BOX_SPLIT = re.compile(r"[\s,;]+")
_MAT_KINDS = {"double": "f", "single": "f", "logical": "b"}
_REEXPORT = "re-export the label file (a truncated or damaged copy cannot be read)"


def label_format(path: Path, labels: AnnotationSpec) -> str:
    """The label file's format: the declared one, else told by the extension."""
    if labels.format != "auto":
        return labels.format
    fmt = FORMAT_BY_SUFFIX.get(path.suffix.lower())
    if fmt is None:
        raise InputError(path, "labels.format", f"cannot tell the format of '{path.name}' from its extension",
                         "set labels.format to image, npy, mat or boxes")
    return fmt


def read_label_map(path: Path, labels: AnnotationSpec) -> np.ndarray:
    """The label file as a 2-D array (y, x) of its stored values (``options.transpose`` applied)."""
    fmt = label_format(path, labels)
    if fmt == "image":
        array = _read_image(path, gray=labels.kind == "saliency")
    elif fmt == "npy":
        array = _read_npy(path, labels.options.key)
    elif fmt == "mat":
        array = _read_mat(path, labels.options.key)
    else:
        raise InputError(path, "labels.format", f"'{fmt}' files hold boxes, not a {labels.kind} map",
                         "set labels.format to image, npy or mat")
    if array.dtype.kind not in "uifb":
        raise InputError(path, "labels.files", f"the label map holds {array.dtype} values, not numbers",
                         "store class ids (or mask values) as integers")
    return np.ascontiguousarray(array.T if labels.options.transpose else array)


def class_ids(path: Path, array: np.ndarray) -> np.ndarray:
    """A class map as integers: floats are accepted only when every value is a whole number."""
    if array.dtype.kind in "ub":
        return array.astype(np.int64)
    if array.dtype.kind == "i":
        if array.size and int(array.min()) < 0:
            raise InputError(path, "labels.class_names", f"negative class id {int(array.min())}",
                             "class ids count from 0; map unlabelled pixels to labels.ignore_index")
        return array.astype(np.int64)
    if not np.all(np.isfinite(array)) or not np.all(array == np.round(array)):
        raise InputError(path, "labels.files", "the class map holds non-integer values",
                         "store class ids as whole numbers (a class map, not a score map)")
    return class_ids(path, array.astype(np.int64))


def saliency_mask(array: np.ndarray, threshold: float | None) -> np.ndarray:
    """A mask as uint8 0/1: values at or above ``threshold`` (default half the maximum, at least 1) are salient,
    so 0/1, 0/255 and JPEG-compressed masks all read right."""
    values = array.astype(np.float64)
    cut = threshold if threshold is not None else max(1.0, float(values.max(initial=0.0)) / 2.0)
    return (values >= cut).astype(np.uint8)


def read_boxes(path: Path) -> np.ndarray:
    """A box file as (N, 4) float64 ``x, y, w, h`` as written; separators may be tabs, spaces, commas."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(path, "labels.files", f"cannot read the box file ({exc})",
                         "restore it as plain text, one 'x y w h' line per frame") from exc
    boxes: list[list[float]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        parts = [p for p in _BOX_SPLIT.split(line.strip()) if p]
        try:
            values = [float(p) for p in parts]
        except ValueError:
            values = []
        if len(values) != 4:
            raise InputError(path, "labels.boxes", f"line {number} is {line.strip()!r}, not 4 numbers x, y, w, h",
                             "write one box per line as 'x y w h' (tabs, spaces or commas between numbers)")
        boxes.append(values)
    return np.asarray(boxes, dtype=np.float64).reshape(-1, 4)


def _read_image(path: Path, gray: bool) -> np.ndarray:
    if path.suffix.lower() in {".tif", ".tiff"}:
        import tifffile

        try:
            array = np.asarray(tifffile.imread(path))
        except (OSError, ValueError) as exc:
            raise InputError(path, "labels.files", f"cannot read the TIFF ({exc})", _REEXPORT) from exc
        return _one_channel(path, array, gray, f"{array.ndim}-D TIFF")
    from PIL import Image

    try:
        with Image.open(path) as im:
            mode = im.mode
            array = np.asarray(im if mode in _SINGLE else im.convert("RGB"))  # palette: the indices are the ids
    except (OSError, SyntaxError, ValueError) as exc:
        raise InputError(path, "labels.files", f"cannot read the image ({exc})", _REEXPORT) from exc
    return _one_channel(path, array, gray, f"mode {mode}")


def _one_channel(path: Path, array: np.ndarray, gray: bool, mode: str) -> np.ndarray:
    """A 2-D map from a possibly multi-channel image: equal channels collapse; a mask may be converted."""
    if array.ndim == 2:
        return array
    if array.ndim == 3 and array.shape[-1] in (3, 4):
        rgb = array[..., :3]
        if np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2]):
            return np.ascontiguousarray(rgb[..., 0])
        if gray:
            return np.round(rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])).astype(np.uint8)
    raise InputError(path, "labels.files", f"a colour image ({mode}), not a map of class ids",
                     "store the label as a single-channel (or palette) image whose values are the class ids")


def _only_2d(path: Path, names: dict[str, tuple[tuple[int, ...], str]], key: str | None) -> str:
    """The configured key, or the only 2-D numeric array of a container."""
    listing = ", ".join(f"{n} ({'x'.join(map(str, s))} {d})" for n, (s, d) in names.items()) or "none"
    if key is not None:
        if key not in names:
            raise InputError(path, "labels.options.key", f"no array '{key}' in the file",
                             f"set labels.options.key to one of: {listing}")
        return key
    candidates = [n for n, (s, d) in names.items() if len([v for v in s if v != 1]) == 2 and d[:1] in "uifb"]
    if len(candidates) != 1:
        raise InputError(path, "labels.options.key", f"labels.options.key is not set and the file holds "
                         f"{len(candidates)} 2-D numeric arrays", f"set labels.options.key; the file holds: {listing}")
    return candidates[0]


def _squeeze_2d(path: Path, array: np.ndarray, key: str) -> np.ndarray:
    array = np.squeeze(array) if array.ndim > 2 else array
    if array.ndim != 2:
        raise InputError(path, "labels.options.key", f"'{key}' has shape {array.shape}, not a 2-D map",
                         "point labels.options.key at the 2-D label map")
    return array


def _read_npy(path: Path, key: str | None) -> np.ndarray:
    try:
        loaded = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zlib.error) as exc:
        raise InputError(path, "labels.files", f"not a readable .npy/.npz file ({exc})", _REEXPORT) from exc
    if isinstance(loaded, np.ndarray):
        return _squeeze_2d(path, loaded, "the array")
    with loaded:
        names = {n: (loaded[n].shape, loaded[n].dtype.kind) for n in loaded.files}
        name = _only_2d(path, names, key)
        return _squeeze_2d(path, np.asarray(loaded[name]), name)


def _read_mat(path: Path, key: str | None) -> np.ndarray:
    """A 2-D variable of a v7.3 (HDF5; axes reversed back to MATLAB's order) or v5 MAT-file."""
    if h5py.is_hdf5(path):
        try:
            with h5py.File(path, "r") as f:
                names = {n: (tuple(o.shape[::-1]), o.dtype.kind) for n, o in f.items()
                         if isinstance(o, h5py.Dataset) and not n.startswith("#")}
                name = _only_2d(path, names, key)
                return _squeeze_2d(path, np.asarray(f[name][()]).T, name)
        except OSError as exc:
            raise InputError(path, "labels.files", f"not a readable MAT v7.3 (HDF5) file ({exc})", _REEXPORT) from exc
    errors = (ValueError, OSError, EOFError, TypeError, NotImplementedError, zlib.error, scipy.io.matlab.MatReadError)
    try:
        variables = {n: (tuple(s), _MAT_KINDS.get(c, "u" if c.startswith("uint") else "i" if c.startswith("int")
                                                 else "O")) for n, s, c in scipy.io.whosmat(path)}
    except errors as exc:
        raise InputError(path, "labels.files", f"not a readable MAT-file ({type(exc).__name__}: {exc})",
                         _REEXPORT) from exc
    name = _only_2d(path, variables, key)
    try:
        loaded: dict[str, Any] = scipy.io.loadmat(path, variable_names=[name])
    except errors as exc:
        raise InputError(path, "labels.files", f"cannot read '{name}' ({type(exc).__name__}: {exc})",
                         _REEXPORT) from exc
    return _squeeze_2d(path, np.asarray(loaded[name]), name)


def binary_map(path: Path, array: np.ndarray, kind: str) -> np.ndarray:
    """A binary ground-truth map as uint8 0/1: its values must be two levels, 0 and one positive value."""
    values = np.unique(array)
    if values.size > 2 or (values.size == 2 and values[0] != 0) or (values.size and values.min() < 0):
        listing = ", ".join(f"{v:g}" for v in values[:6])
        raise InputError(path, "labels.files", f"a {kind} map must be binary (0 and one positive value); it holds "
                         f"{listing}{' ...' if values.size > 6 else ''}",
                         "store 0 for background and 1 (or 255) for the positive pixels")
    return (array > 0).astype(np.uint8)


def read_spectrum(path: Path, key: str | None) -> np.ndarray:
    """A target spectrum as float64 (band,): a text file (numbers separated by newlines, spaces or commas), .npy,
    or a variable of a .mat (``labels.options.spectrum_key``, else the only numeric vector)."""
    suffix = path.suffix.lower()
    if suffix == ".npy":
        values = np.load(path, allow_pickle=False)
    elif suffix == ".mat":
        try:
            loaded = scipy.io.loadmat(path)
        except (ValueError, OSError, NotImplementedError) as exc:
            raise InputError(path, "labels.target_spectrum", f"not a readable MAT-file ({exc})", _REEXPORT) from exc
        vectors = [n for n, v in loaded.items() if not n.startswith("__") and isinstance(v, np.ndarray)
                   and v.dtype.kind in "uif" and np.squeeze(v).ndim == 1]
        name = key if key is not None else (vectors[0] if len(vectors) == 1 else None)
        if name is None or name not in loaded:
            raise InputError(path, "labels.options.spectrum_key", f"cannot tell the spectrum among {vectors}",
                             "set labels.options.spectrum_key to the variable holding the target spectrum")
        values = loaded[name]
    else:
        try:
            values = np.array([float(t) for t in _BOX_SPLIT.split(path.read_text().strip()) if t])
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise InputError(path, "labels.target_spectrum", f"cannot read the spectrum ({exc})",
                             "write one number per band, one per line") from exc
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    if not values.size or not np.isfinite(values).all():
        raise InputError(path, "labels.target_spectrum", "the spectrum is empty or holds NaN/inf values",
                         "write one finite number per band")
    return values
