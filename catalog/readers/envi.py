"""ENVI reader: a ``.hdr`` header (the primary) plus the binary data file beside it, read through GDAL (rasterio).

GDAL handles BSQ/BIL/BIP and byte order and exposes every header field in its ENVI metadata domain; reads are
windowed, so a slice touches only that region of the file. DeepHS-style white/dark reference files can be stored
beside the cube (their per-band, per-column means) so reflectance stays computable without altering raw counts.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.errors import RasterioIOError
from rasterio.windows import Window

from catalog.errors import InputError
from catalog.readers.base import RawCube, Reader, ReaderOptions, SourceItem, register

DATA_EXTENSIONS = ("", ".bin", ".img", ".raw", ".float", ".dat", ".bsq", ".bil", ".bip")
#: ENVI data type code -> numpy dtype (byte order applied separately).
ENVI_DTYPES = {1: "u1", 2: "i2", 3: "i4", 4: "f4", 5: "f8", 12: "u2", 13: "u4", 14: "i8", 15: "u8"}


class EnviOptions(ReaderOptions):
    """``swap_xy`` for datasets stored (W, H, C); ``white_ref``/``dark_ref`` are path templates of reference
    ENVI headers (e.g. ``{dir}/{stem}_White.hdr``) whose means are kept beside the cube."""

    swap_xy: bool = False
    white_ref: str | None = None
    dark_ref: str | None = None


def parse_header(path: Path) -> dict[str, str]:
    """The header's fields (lower-case keys, raw string values, braces kept), or an InputError if not ENVI."""
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        raise InputError(path, "header", f"cannot read the header ({exc})", "check the file exists and is readable") \
            from None
    if not text.lstrip().startswith("ENVI"):
        first = text.strip().splitlines()[0][:40] if text.strip() else "<empty>"
        raise InputError(path, "header", f"first line is '{first}', not 'ENVI'",
                         "this is not an ENVI header; re-export it, or fix its first line to read ENVI")
    fields: dict[str, str] = {}
    for m in re.finditer(r"^\s*([^=\n]+?)\s*=\s*(\{[^}]*\}|[^\n]*)", text, flags=re.M):
        fields[m.group(1).strip().lower()] = m.group(2).strip()
    return fields


def _floats(value: str | None) -> np.ndarray | None:
    if not value:
        return None
    parts = [p for p in re.split(r"[,\s]+", value.strip("{} \n")) if p]
    try:
        return np.asarray([float(p) for p in parts], dtype=np.float64)
    except ValueError:
        return None


def _units(value: str | None) -> str | None:
    v = (value or "").strip().lower()
    if v in ("micrometers", "micrometer", "microns", "micron", "um", "µm"):
        return "um"
    if v in ("nanometers", "nanometer", "nm"):
        return "nm"
    return None


def data_file(header: Path, fields: dict[str, str] | None = None) -> Path:
    """The binary file beside ``header``: the header's ``data file`` field, else the same stem with a known
    extension; an InputError if none exists."""
    if fields and fields.get("data file"):
        named = header.parent / fields["data file"]
        if named.is_file():
            return named
    for ext in DATA_EXTENSIONS:
        candidate = header.with_suffix(ext)
        if candidate != header and candidate.is_file():
            return candidate
    exts = ", ".join(e or "<none>" for e in DATA_EXTENSIONS)
    raise InputError(header, "data file", "no binary data file beside the header",
                     f"put the data file next to it with the same name and one of these extensions: {exts}")


def _int_field(fields: dict[str, str], name: str, path: Path) -> int:
    try:
        return int(fields[name])
    except (KeyError, ValueError):
        raise InputError(path, f"header.{name}", f"missing or not an integer ({fields.get(name)!r})",
                         f"give '{name} = <integer>' in the header") from None


class EnviCube:
    """Lazy ``(band, y, x)`` view of an ENVI data file: each slice is one windowed GDAL read."""

    def __init__(self, path: Path, shape: tuple[int, int, int], dtype: np.dtype, swap_xy: bool) -> None:
        self.path, self.swap_xy = path, swap_xy
        b, h, w = shape
        self._file_shape = (b, h, w)
        self.shape = (b, w, h) if swap_xy else (b, h, w)
        self.dtype = np.dtype(dtype)

    def __getitem__(self, key: Any) -> np.ndarray:
        if not isinstance(key, tuple):
            key = (key,)
        key = key + (slice(None),) * (3 - len(key))
        if any(not isinstance(k, slice) or k.step not in (None, 1) for k in key):
            raise TypeError("EnviCube supports unit-step slices only")
        (b0, b1, _), (y0, y1, _), (x0, x1, _) = (k.indices(n) for k, n in zip(key, self.shape, strict=True))
        if self.swap_xy:  # the file's rows are our columns
            y0, y1, x0, x1 = x0, x1, y0, y1
        if b1 <= b0 or y1 <= y0 or x1 <= x0:
            out = np.zeros((max(b1 - b0, 0), max(y1 - y0, 0), max(x1 - x0, 0)), self.dtype)
        else:
            with rasterio.open(self.path) as src:
                out = src.read(list(range(b0 + 1, b1 + 1)), window=Window(x0, y0, x1 - x0, y1 - y0))
        out = out.astype(self.dtype, copy=False)
        return np.ascontiguousarray(out.transpose(0, 2, 1)) if self.swap_xy else out


@register
class EnviReader(Reader):
    """ENVI header + binary data (BSQ/BIL/BIP, either byte order) with wavelengths, FWHM and scale from the header."""

    name = "envi"
    version = "1"
    Options = EnviOptions

    def companions(self, primary: Path, options: ReaderOptions) -> list[Path]:
        try:
            out = [data_file(primary, parse_header(primary))]
        except InputError:
            return []
        assert isinstance(options, EnviOptions)
        for template in (options.white_ref, options.dark_ref):
            if template:
                ref = SourceItem("", primary.parent, primary, (primary,), primary.stem).resolve(template)
                if ref is not None:
                    out.extend([ref, *self.companions(ref, EnviOptions())])
        return out

    def read(self, item: SourceItem, options: ReaderOptions) -> RawCube:
        assert isinstance(options, EnviOptions)
        header = item.primary
        fields = parse_header(header)
        cube = self._open(header, fields, options.swap_xy)
        wl = _floats(fields.get("wavelength"))
        if wl is not None and wl.size != cube.shape[0]:
            raise InputError(header, "wavelength", f"{wl.size} wavelengths in the header for {cube.shape[0]} bands",
                             "give one 'wavelength' value per band in the header")
        attrs: dict[str, Any] = {"interleave": fields.get("interleave", "bsq").lower(),
                                 "byte_order": fields.get("byte order", "0")}
        for key in ("data ignore value", "reflectance scale factor", "sensor type", "description"):
            if fields.get(key):
                attrs[key.replace(" ", "_")] = fields[key].strip("{} ")
        extras: dict[str, np.ndarray] = {}
        for name, template in (("white_ref", options.white_ref), ("dark_ref", options.dark_ref)):
            if not template:
                continue
            ref = item.resolve(template)
            if ref is None:
                raise InputError(header, f"options.{name}", f"no reference file matches '{template}'",
                                 "put the reference header beside the image or fix the template in the spec")
            ref_cube = self._open(ref, parse_header(ref), options.swap_xy)
            extras[name] = np.asarray(ref_cube[:, :, :], dtype=np.float32).mean(axis=1)  # (band, x)
        return RawCube(data=cube, wavelengths=wl, wavelength_units=_units(fields.get("wavelength units")),
                       fwhm=_floats(fields.get("fwhm")), attrs=attrs, extras=extras)

    def _open(self, header: Path, fields: dict[str, str], swap_xy: bool) -> EnviCube:
        data = data_file(header, fields)
        samples, lines, bands = (_int_field(fields, k, header) for k in ("samples", "lines", "bands"))
        code = _int_field(fields, "data type", header)
        if code not in ENVI_DTYPES:
            raise InputError(header, "header.data type", f"unsupported ENVI data type {code}",
                             f"use one of {sorted(ENVI_DTYPES)}")
        dtype = np.dtype(ENVI_DTYPES[code])
        offset = int(fields.get("header offset", "0") or 0)
        expected = offset + samples * lines * bands * dtype.itemsize
        actual = data.stat().st_size
        if actual < expected:
            raise InputError(data, "data file", f"{actual} bytes but the header declares {expected} "
                             f"({bands} bands x {lines} lines x {samples} samples x {dtype.itemsize} bytes + offset)",
                             "the file is truncated: copy it again from the source")
        try:
            with rasterio.open(data) as src:
                if (src.count, src.height, src.width) != (bands, lines, samples):
                    raise InputError(header, "header", f"GDAL reads {src.count}x{src.height}x{src.width}, the header "
                                     f"says {bands}x{lines}x{samples}", "fix the header's samples/lines/bands")
        except RasterioIOError as exc:
            raise InputError(data, "file", f"GDAL cannot open it as ENVI ({exc})", "check the header and data file") \
                from None
        return EnviCube(data, (bands, lines, samples), dtype, swap_xy)

