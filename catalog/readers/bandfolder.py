"""Band-folder format (CAVE style): one single-band image file per band, stacked into a ``(band, y, x)`` cube.

The spec's glob matches the first band file; its siblings are the files in the same folder that share its
prefix (the name before the band-number pattern) and match the pattern. Band files are small, so the stack
is eager.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from pydantic import Field, field_validator

from base.errors import InputError
from catalog.readers.base import RawCube, Reader, ReaderOptions, SourceItem, register

# Pillow modes that hold one intensity per pixel (palette and multi-channel modes do not).
_GRAY_MODES = frozenset({"L", "I;16", "I;16L", "I;16B", "I;16N", "I", "F"})


def read_gray_image(path: Path, field_name: str, fix: str) -> np.ndarray:
    """Read a single-channel PNG/BMP/TIFF as a 2-D array of its native dtype; else raise InputError."""
    if path.suffix.lower() in {".tif", ".tiff"}:
        import tifffile

        try:
            tif = np.asarray(tifffile.imread(path))
        except (OSError, ValueError) as exc:
            raise InputError(path, field_name, f"cannot read the TIFF ({exc})", "replace the file") from exc
        arr: np.ndarray | None = tif
        mode = f"{tif.ndim}-D TIFF"
    else:
        from PIL import Image

        try:
            with Image.open(path) as im:
                mode = im.mode
                arr = np.asarray(im) if mode in _GRAY_MODES else None
        except (OSError, SyntaxError, ValueError) as exc:
            raise InputError(path, field_name, f"cannot read the image ({exc})", "replace the file") from exc
    if arr is None or arr.ndim != 2:
        raise InputError(path, field_name, f"not a single-channel image (mode {mode})", fix)
    return arr


class BandFolderOptions(ReaderOptions):
    """``pattern``: regex whose one group is the band number (e.g. ``_ms_(\\d+)\\.png$``); ``first_band``: the
    number the first band file carries (the spec's glob matches that file)."""

    pattern: str
    first_band: int = Field(default=1, ge=0)

    @field_validator("pattern")
    @classmethod
    def _one_group(cls, v: str) -> str:
        try:
            groups = re.compile(v).groups
        except re.error as exc:
            raise ValueError(f"not a valid regular expression ({exc})") from None
        if groups != 1:
            raise ValueError(f"the pattern must have exactly one group (the band number), it has {groups}")
        return v


def _band_number(path: Path, prefix: str, pattern: re.Pattern[str]) -> int | None:
    """The band number in ``path``'s name if it shares ``prefix`` and matches ``pattern`` right after it."""
    m = pattern.search(path.name)
    if m is None or m.start() != len(prefix) or not path.name.startswith(prefix):
        return None
    try:
        return int(m.group(1))
    except (TypeError, ValueError):  # an optional group that did not match, or not digits
        return None


def _siblings(primary: Path, options: BandFolderOptions) -> list[tuple[int, Path]]:
    """(band number, file) for every band file beside ``primary``, in numeric (not lexical) order."""
    pattern = re.compile(options.pattern)
    m = pattern.search(primary.name)
    if m is None:
        return []
    prefix = primary.name[: m.start()]
    found = []
    for p in primary.parent.iterdir():
        number = _band_number(p, prefix, pattern) if p.is_file() else None
        if number is not None:
            found.append((number, p))
    return sorted(found)


def _missing_name(primary: Path, span: tuple[int, int], number: int) -> Path:
    """The file name band ``number`` would have, formatted like the primary (same zero padding)."""
    s, e = span
    return primary.with_name(primary.name[:s] + str(number).zfill(e - s) + primary.name[e:])


def band_files(primary: Path, options: BandFolderOptions) -> list[Path]:
    """The band files of the image whose first band is ``primary``, checked to be first_band..N once each."""
    pattern = re.compile(options.pattern)
    m = pattern.search(primary.name)
    number = _band_number(primary, primary.name[: m.start()], pattern) if m else None
    if m is None or number is None:
        raise InputError(primary, "options.pattern", f"'{options.pattern}' does not match the file name "
                         "with a band number", "give a regex whose one group captures the band number, "
                         "e.g. '_ms_(\\d+)\\.png$'")
    if number != options.first_band:
        raise InputError(primary, "files", f"the matched file is band {number}, not the first band "
                         f"{options.first_band}", "make the spec's 'files' glob match only the first band "
                         "file, or set 'options.first_band'")
    bands = _siblings(primary, options)
    for (n0, p0), (n1, p1) in zip(bands, bands[1:], strict=False):
        if n0 == n1:
            raise InputError(p1, "files", f"band {n1} appears twice ({p0.name} and {p1.name})",
                             "remove or rename the duplicate band file")
    expected = options.first_band
    for n, _ in bands:
        if n != expected:
            missing = _missing_name(primary, m.span(1), expected)
            raise InputError(missing, "files", f"band file for band {expected} is missing (found bands "
                             f"{bands[0][0]}..{bands[-1][0]} beside {primary.name})",
                             "restore the missing band file from the source archive")
        expected += 1
    return [p for _, p in bands]


@register
class BandFolderReader(Reader):
    """One single-band PNG (8/16-bit) or TIFF per band, stacked in band-number order."""

    name = "bandfolder"
    version = "1"
    Options = BandFolderOptions

    def companions(self, primary: Path, options: ReaderOptions) -> list[Path]:
        """The other band files (so they are hashed with the primary); the read checks they are complete."""
        assert isinstance(options, BandFolderOptions)
        return [p for _, p in _siblings(primary, options) if p != primary]

    def read(self, item: SourceItem, options: ReaderOptions) -> RawCube:
        """Stack every band image after checking they share one size and dtype."""
        assert isinstance(options, BandFolderOptions)
        fix = "store each band as a single-channel (grayscale) PNG or TIFF"
        planes: list[np.ndarray] = []
        files = band_files(item.primary, options)
        for path in files:
            plane = read_gray_image(path, "files", fix)
            if planes and (plane.shape != planes[0].shape or plane.dtype != planes[0].dtype):
                (h, w), (h0, w0) = plane.shape, planes[0].shape
                raise InputError(path, "files", f"band image is {w}x{h} {plane.dtype} but {files[0].name} "
                                 f"is {w0}x{h0} {planes[0].dtype}", "replace the odd band file so all bands "
                                 "share one size and bit depth")
            planes.append(plane)
        return RawCube(data=np.stack(planes))
