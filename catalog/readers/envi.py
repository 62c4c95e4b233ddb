"""ENVI reader: a ``.hdr`` header (the primary) plus the binary data file beside it, read through GDAL (rasterio).

The header is parsed and checked here (first line, sizes against the data file, wavelength count) so that a bad
file fails with an error naming the field and the fix; pixels are read by GDAL's ENVI driver, which handles
BSQ/BIL/BIP and both byte orders. Reads are windowed: a slice of the lazy cube touches only that region of the file.
DeepHS-style white/dark reference recordings are summarised (per band and column) and kept beside the cube, so
reflectance stays computable while the raw counts are stored unchanged.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.errors import NotGeoreferencedWarning, RasterioIOError
from rasterio.windows import Window

from base.errors import InputError
from catalog.readers.base import AxisView, LazyArray, RawCube, Reader, ReaderOptions, SourceItem, register

# Ground-based cameras are never georeferenced: GDAL's warning about it says nothing useful here.
warnings.filterwarnings("ignore", category=NotGeoreferencedWarning)

#: Extensions tried, in order, for the data file beside ``<stem>.hdr`` when the header does not name it.
DATA_EXTENSIONS = ("", ".bin", ".img", ".raw", ".float", ".dat", ".bsq", ".bil", ".bip")
#: ENVI ``data type`` code -> (numpy type without byte order, GDAL type name). Complex types are not cubes.
ENVI_TYPES = {1: ("u1", "Byte"), 2: ("i2", "Int16"), 3: ("i4", "Int32"), 4: ("f4", "Float32"), 5: ("f8", "Float64"),
              12: ("u2", "UInt16"), 13: ("u4", "UInt32"), 14: ("i8", "Int64"), 15: ("u8", "UInt64")}
#: ``wavelength units`` spellings -> the unit RawCube reports; "unknown" (ENVI's own word) and absent mean unstated.
UNITS = {"micrometers": "um", "micrometer": "um", "micrometres": "um", "micrometre": "um", "microns": "um",
         "micron": "um", "um": "um", "µm": "um", "nanometers": "nm", "nanometer": "nm", "nanometres": "nm",
         "nanometre": "nm", "nm": "nm"}
#: Band, line and pixel interleaving of the bytes on disk.
INTERLEAVES = ("bsq", "bil", "bip")


class EnviOptions(ReaderOptions):
    """``swap_xy``: the file is stored (W, H, C), i.e. its lines are the image's columns. ``white_ref`` /
    ``dark_ref``: path templates (e.g. ``{dir}/{stem}_White.hdr``) of reference ENVI headers whose means over
    their lines, per (band, sample), are stored beside the cube as extras; a configured reference that is missing
    is an error."""

    swap_xy: bool = False
    white_ref: str | None = None
    dark_ref: str | None = None


def parse_header(path: Path) -> dict[str, str]:
    """The header's fields: lower-case names with single spaces, raw string values (``{...}`` lists kept whole)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise InputError(path, "header", f"cannot read the header ({exc})",
                         "check that the file exists and is readable") from None
    lines = text.splitlines()
    first = lines[0].strip() if lines else ""
    if first != "ENVI":
        raise InputError(path, "header", f"first line is {first[:40]!r}, not 'ENVI'",
                         "point the spec's 'files' at ENVI .hdr headers, or re-export the header so its first "
                         "line reads ENVI")
    fields: dict[str, str] = {}
    name, value = "", ""
    for line in lines[1:]:
        if name:  # inside a multi-line {...} value
            value += " " + line.strip()
            if "}" in line:
                fields[name], name = value, ""
            continue
        if not line.strip() or line.lstrip().startswith(";"):
            continue
        key, sep, raw = line.partition("=")
        if not sep:
            raise InputError(path, "header", f"line {line.strip()[:60]!r} is not 'name = value'",
                             "repair the header: every field is 'name = value', lists are '{a, b, ...}'")
        key, raw = " ".join(key.lower().split()), raw.strip()
        if raw.startswith("{") and "}" not in raw:
            name, value = key, raw
        else:
            fields[key] = raw
    if name:
        raise InputError(path, f"header.{name}", "the '{' list is never closed", "add the closing '}'")
    return fields


def _floats(fields: dict[str, str], name: str, path: Path) -> np.ndarray | None:
    """A ``{a, b, ...}`` header list (or a single number) as float64, None if absent."""
    raw = fields.get(name, "").strip().strip("{}").strip()
    if not raw:
        return None
    try:
        return np.asarray([float(p) for p in re.split(r"[,\s]+", raw) if p], dtype=np.float64)
    except ValueError:
        raise InputError(path, name, f"'{name}' is not a list of numbers ({raw[:60]!r})",
                         f"write '{name} = {{v1, v2, ...}}' with plain numbers") from None


def _int(fields: dict[str, str], name: str, path: Path, default: int | None = None) -> int:
    raw = fields.get(name)
    if raw is None and default is not None:
        return default
    try:
        return int(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise InputError(path, f"header.{name}", f"missing or not an integer ({raw!r})",
                         f"give '{name} = <integer>' in the header") from None


@dataclass(frozen=True)
class EnviHeader:
    """The facts of one ENVI header needed to read and check its data file."""

    path: Path
    fields: dict[str, str]
    bands: int
    lines: int
    samples: int
    type_code: int
    interleave: str
    byte_order: int
    offset: int

    @classmethod
    def read(cls, path: Path) -> EnviHeader:
        """Parse and check a header: sizes, data type, interleave and byte order."""
        fields = parse_header(path)
        bands, lines, samples = (_int(fields, k, path) for k in ("bands", "lines", "samples"))
        for name, n in (("bands", bands), ("lines", lines), ("samples", samples)):
            if n <= 0:
                raise InputError(path, f"header.{name}", f"'{name}' is {n}", "give the positive size of the cube")
        code = _int(fields, "data type", path)
        if code not in ENVI_TYPES:
            raise InputError(path, "header.data type", f"unsupported ENVI data type {code}",
                             f"store the cube as one of the real types {sorted(ENVI_TYPES)}")
        interleave = fields.get("interleave", "bsq").lower()
        if interleave not in INTERLEAVES:
            raise InputError(path, "header.interleave", f"unknown interleave {interleave!r}",
                             "use bsq, bil or bip")
        order = _int(fields, "byte order", path, default=0)
        if order not in (0, 1):
            raise InputError(path, "header.byte order", f"byte order is {order}",
                             "use 0 (little-endian) or 1 (big-endian)")
        return cls(path, fields, bands, lines, samples, code, interleave, order,
                   _int(fields, "header offset", path, default=0))

    @property
    def dtype(self) -> np.dtype:
        """The pixel type in native byte order (what GDAL returns)."""
        return np.dtype(ENVI_TYPES[self.type_code][0])

    @property
    def nbytes(self) -> int:
        """The smallest data file size the header allows."""
        return self.offset + self.bands * self.lines * self.samples * self.dtype.itemsize


def find_data_file(header: Path, fields: dict[str, str]) -> Path | None:
    """The binary file of ``header``: its ``data file`` field (as written, then by name beside the header), else
    ``<stem>`` plus the first of DATA_EXTENSIONS that exists; None if there is none."""
    named = fields.get("data file", "").strip()
    candidates = [header.parent / named, header.parent / re.split(r"[\\/]", named)[-1]] if named else []
    candidates += [header.with_suffix(ext) for ext in DATA_EXTENSIONS]
    return next((c for c in candidates if c != header and c.is_file()), None)


def _vrt(header: EnviHeader, data: Path) -> str:
    """A GDAL VRT describing ``data`` as raw bands, for a data file GDAL cannot pair with its header by name."""
    size = header.dtype.itemsize
    band, line, pixel = {  # byte strides of one band, one line and one pixel in each interleave
        "bsq": (header.lines * header.samples * size, header.samples * size, size),
        "bil": (header.samples * size, header.bands * header.samples * size, size),
        "bip": (size, header.samples * header.bands * size, header.bands * size),
    }[header.interleave]
    gdal_type, order = ENVI_TYPES[header.type_code][1], ("LSB", "MSB")[header.byte_order]
    source = str(data.resolve()).replace("&", "&amp;").replace("<", "&lt;")
    bands = "".join(
        f'<VRTRasterBand dataType="{gdal_type}" band="{b + 1}" subClass="VRTRawRasterBand">'
        f'<SourceFilename relativeToVRT="0">{source}</SourceFilename><ImageOffset>{header.offset + b * band}'
        f"</ImageOffset><PixelOffset>{pixel}</PixelOffset><LineOffset>{line}</LineOffset>"
        f"<ByteOrder>{order}</ByteOrder></VRTRasterBand>" for b in range(header.bands))
    return f'<VRTDataset rasterXSize="{header.samples}" rasterYSize="{header.lines}">{bands}</VRTDataset>'


class EnviArray(LazyArray):
    """Lazy ``(band, line, sample)`` view of an ENVI data file: each slice is one windowed GDAL read.

    It holds only a GDAL source string (the data file's path, or a VRT for an oddly named data file) and opens
    it per read, so it pickles cheaply and is safe to use from several threads or processes.
    """

    def __init__(self, source: str, shape: tuple[int, int, int], dtype: np.dtype) -> None:
        super().__init__(shape, dtype)
        self.source = source

    def __getitem__(self, key: Any) -> np.ndarray:
        if not isinstance(key, tuple):
            key = (key,)
        if len(key) > 3 or any(not isinstance(k, slice) for k in key):
            raise TypeError("EnviArray supports up to three slices")
        key = key + (slice(None),) * (3 - len(key))
        bands, rows, cols = (range(*k.indices(n)) for k, n in zip(key, self._shape, strict=True))
        if not (bands and rows and cols):
            return np.empty((len(bands), len(rows), len(cols)), self._dtype)
        r0, c0 = min(rows), min(cols)
        window = Window(c0, r0, max(cols) + 1 - c0, max(rows) + 1 - r0)
        with rasterio.open(self.source) as src:
            block = src.read([b + 1 for b in bands], window=window)
        # The window spans the requested rows/columns; stepping within it picks exactly them (any step sign).
        return block[:, rows.start - r0::rows.step, cols.start - c0::cols.step].astype(self._dtype, copy=False)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self[:, :, :]
        return out.astype(dtype) if dtype is not None else out


def open_envi(header_path: Path) -> tuple[EnviHeader, EnviArray]:
    """Parse and check a header, find and check its data file, and return the lazy ``(band, line, sample)`` array."""
    header = EnviHeader.read(header_path)
    data = find_data_file(header_path, header.fields)
    if data is None:
        tried = ", ".join(repr(header_path.stem + e) for e in DATA_EXTENSIONS)
        named = header.fields.get("data file")
        raise InputError(header_path, "data file", "no binary data file found"
                         + (f" (the header names {named!r})" if named else ""),
                         f"put the data file beside the header as one of {tried}, or set 'data file' in the header")
    actual = data.stat().st_size
    if actual < header.nbytes:
        _blame_short_file(header, data, actual)
    source = str(data)
    try:
        with rasterio.open(source) as src:
            paired = src.driver == "ENVI" and any(Path(f).resolve() == header_path.resolve() for f in src.files)
    except RasterioIOError:
        paired = False
    if not paired:  # GDAL finds headers by the data file's name only: describe the bytes to it directly instead
        source = _vrt(header, data)
    with rasterio.open(source) as src:
        if (src.count, src.height, src.width) != (header.bands, header.lines, header.samples):
            raise InputError(header_path, "header", f"GDAL reads {src.count} bands x {src.height} lines x "
                             f"{src.width} samples but the header says {header.bands} x {header.lines} x "
                             f"{header.samples}", "fix samples/lines/bands in the header")
    return header, EnviArray(source, (header.bands, header.lines, header.samples), header.dtype)


def _blame_short_file(header: EnviHeader, data: Path, actual: int) -> None:
    """Raise for a data file smaller than its header declares, blaming the header when the file holds a whole
    number of bands that the header's own wavelength list agrees with, or exactly one band fewer than declared
    (a header miscount); otherwise the data file, as truncated."""
    band_bytes = header.lines * header.samples * header.dtype.itemsize
    whole, rest = divmod(actual - header.offset, band_bytes)
    listed = _floats(header.fields, "wavelength", header.path)
    n_listed = None if listed is None else listed.size
    if rest == 0 and 0 < whole < header.bands and (n_listed == whole or whole == header.bands - 1):
        agrees = ", as many as its wavelength list has" if n_listed == whole else ""
        raise InputError(header.path, "header.bands", f"the header declares {header.bands} bands but the data file "
                         f"{data.name} holds exactly {whole} bands of {header.lines} lines x {header.samples} "
                         f"samples{agrees}", f"set 'bands = {whole}' in the header (and list {whole} wavelengths); "
                         "only if the data file was cut short, copy it again instead")
    raise InputError(data, "data file", f"{actual} bytes, but the header declares {header.nbytes} "
                     f"({header.bands} bands x {header.lines} lines x {header.samples} samples x "
                     f"{header.dtype.itemsize} bytes + {header.offset} offset)",
                     "the file is truncated: copy it again from the source (or fix samples/lines/bands in "
                     "the header if they are wrong)")


def _resolve_beside(primary: Path, template: str) -> Path | None:
    """Resolve a ``{dir}/...`` template next to ``primary`` without knowing the dataset root (for companions)."""
    if not template.startswith("{dir}/"):
        return None
    near = SourceItem(dataset="", root=primary.parent, primary=primary, files=(primary,), key=primary.stem)
    return near.resolve(template.removeprefix("{dir}/"))


@register
class EnviReader(Reader):
    """ENVI header + binary data (BSQ/BIL/BIP, either byte order) with wavelengths, FWHM and scale from the header."""

    name = "envi"
    version = "1"
    Options = EnviOptions
    file_wavelengths = True

    def companions(self, primary: Path, options: ReaderOptions) -> list[Path]:
        """The data file, and the white/dark reference headers and data files that exist. Lenient on purpose:
        a broken header yields no companions here and its InputError comes from ``read``, for that file only."""
        assert isinstance(options, EnviOptions)
        out: list[Path] = []
        headers = [primary, *(_resolve_beside(primary, t) for t in (options.white_ref, options.dark_ref) if t)]
        for header in headers:
            if header is None:
                continue
            try:
                data = find_data_file(header, parse_header(header))
            except InputError:
                continue
            out += [p for p in (header, data) if p is not None and p != primary]
        return out

    def read(self, item: SourceItem, options: ReaderOptions) -> RawCube:
        assert isinstance(options, EnviOptions)
        header, array = open_envi(item.primary)
        path, fields = item.primary, header.fields
        wavelengths = _floats(fields, "wavelength", path)
        if wavelengths is not None and wavelengths.size != header.bands:
            raise InputError(path, "wavelength", f"{wavelengths.size} wavelengths in the header for "
                             f"{header.bands} bands", "give exactly one 'wavelength' value per band in the header")
        fwhm = _floats(fields, "fwhm", path)
        if fwhm is not None and fwhm.size != header.bands:
            raise InputError(path, "fwhm", f"{fwhm.size} FWHM values in the header for {header.bands} bands",
                             "give one 'fwhm' value per band, or remove the field")
        stated = fields.get("wavelength units", "").strip().lower()
        if stated and stated != "unknown" and stated not in UNITS:
            raise InputError(path, "wavelength units", f"unsupported unit {stated!r}",
                             "state 'wavelength units = Nanometers' or 'Micrometers' in the header, or 'Unknown' "
                             "to have the unit detected from the values")
        extras = {}
        for name, template in (("white_ref", options.white_ref), ("dark_ref", options.dark_ref)):
            if template:
                extras[name] = self._reference(item, template, f"options.{name}", header)
        data = AxisView(array, (0, 2, 1)) if options.swap_xy else array
        return RawCube(data=data, wavelengths=wavelengths,
                       wavelength_units=UNITS.get(stated) if wavelengths is not None else None,
                       fwhm=fwhm, attrs=self._attrs(header), extras=extras)

    @staticmethod
    def _attrs(header: EnviHeader) -> dict[str, Any]:
        """JSON-ready header facts worth keeping with the cube."""
        f = header.fields
        attrs: dict[str, Any] = {"interleave": header.interleave, "byte_order": header.byte_order,
                                 "data_type": header.type_code}
        for name in ("data ignore value", "reflectance scale factor"):
            value = _floats(f, name, header.path)
            if value is not None:
                attrs[name.replace(" ", "_")] = float(value[0])
        for name in ("sensor type", "description"):
            if f.get(name):
                attrs[name.replace(" ", "_")] = f[name].strip("{} ")
        return attrs

    @staticmethod
    def _reference(item: SourceItem, template: str, field: str, cube: EnviHeader) -> np.ndarray:
        """A reference recording's mean over its lines, per band and sample: ``(band, samples)`` float32."""
        path = item.resolve(template)
        if path is None:
            pattern = template.format(**item.template_vars())
            raise InputError(item.primary, field, f"no reference file matches {pattern!r}",
                             "put the reference ENVI files beside the image, or fix (or remove) the template in "
                             "the dataset spec")
        header, array = open_envi(path)
        if (header.bands, header.samples) != (cube.bands, cube.samples):
            raise InputError(path, field, f"the reference has {header.bands} bands x {header.samples} samples, the "
                             f"image {cube.bands} x {cube.samples}",
                             "pair the image with a reference recorded by the same camera setting")
        step = 32  # bands per read: bounds memory for long references
        means = [array[b:b + step].mean(axis=1, dtype=np.float64) for b in range(0, header.bands, step)]
        return np.concatenate(means).astype(np.float32)
