"""Checks that turn what a reader returned into catalog-ready facts, or an InputError naming file, field and fix."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from base.errors import InputError

#: Band centres outside this range (nm) are not plausible for the cameras this catalog takes.
WL_MIN_NM, WL_MAX_NM = 300.0, 2600.0
#: Values below this are taken as micrometres when the unit is not stated (no camera band sits under 30 nm).
MICROMETRE_CEILING = 30.0
MIN_BANDS = 3


@dataclass(frozen=True)
class Wavelengths:
    """Validated band centres in nanometres, strictly increasing, with a note on any unit conversion made.

    ``keep`` is the run of the file's bands to store when out-of-range bands were dropped (``band_note`` records
    which; None keeps them all); ``nm`` and ``fwhm_nm`` are already cut to it.
    """

    nm: np.ndarray
    fwhm_nm: np.ndarray | None
    unit_note: str
    keep: slice | None = None
    band_note: str = ""


def wavelengths_nm(values: np.ndarray, units: str | None, bands: int, path: str | Path, origin: str,
                   fwhm: np.ndarray | None = None, out_of_range: str = "quarantine") -> Wavelengths:
    """Validate band centres against the band count and convert micrometres to nanometres (stated or detected).

    ``units`` is "nm", "um", or None/"auto" (detect: all values under 30 means micrometres). ``origin`` names where
    the values came from ("spec 'wavelengths_nm'" or "file header 'wavelength'") for error messages. Bands centred
    outside WL_MIN_NM-WL_MAX_NM are rejected, or with ``out_of_range="drop"`` left out (noted) when at least
    MIN_BANDS remain; being strictly increasing, they sit at the ends, so what is kept is one run of bands.
    """
    wl = np.asarray(values, dtype=np.float64).ravel()
    field = f"wavelength ({origin})"
    if wl.size != bands:
        raise InputError(path, field, f"{wl.size} wavelengths for {bands} bands",
                         "give exactly one wavelength per band, in band order (check 'band_range' and the file)")
    if not np.all(np.isfinite(wl)):
        raise InputError(path, field, "wavelengths contain NaN or Inf", "replace them with the band centres")
    note = "nm as given"
    if units == "um" or (units in (None, "auto") and wl.max() < MICROMETRE_CEILING):
        wl = wl * 1000.0
        fwhm = None if fwhm is None else np.asarray(fwhm, dtype=np.float64) * 1000.0
        note = "converted from micrometres (" + ("stated" if units == "um" else "detected: all values < 30") + ")"
    if np.any(np.diff(wl) == 0):
        dup = wl[1:][np.diff(wl) == 0][0]
        raise InputError(path, field, f"duplicate wavelength {dup:g} nm",
                         "each band needs its own centre; drop the duplicated band or fix the list")
    if np.any(np.diff(wl) < 0):
        i = int(np.argmax(np.diff(wl) < 0))
        raise InputError(path, field, f"wavelengths are not increasing (band {i}: {wl[i]:g} then {wl[i + 1]:g} nm)",
                         "list bands in increasing wavelength order (reorder the file's bands or the list)")
    if fwhm is not None:
        fwhm = np.asarray(fwhm, dtype=np.float64).ravel()
        if fwhm.size != bands:
            raise InputError(path, "fwhm", f"{fwhm.size} FWHM values for {bands} bands",
                             "give one FWHM per band or remove the field")
    inside = (wl >= WL_MIN_NM) & (wl <= WL_MAX_NM)
    if inside.all():
        return Wavelengths(nm=wl, fwhm_nm=fwhm, unit_note=note)
    listed = _bands(wl, np.flatnonzero(~inside))
    span = f"outside {WL_MIN_NM:g}-{WL_MAX_NM:g} nm"
    kept = int(inside.sum())
    if kept == 0:
        raise InputError(path, field, f"every band is {span} (they span {wl.min():g}-{wl.max():g} nm)",
                         "check the unit: give band centres in nanometres, or state micrometres "
                         "('wavelength_units: um' in the spec, or the file's own unit field)")
    if kept < MIN_BANDS or out_of_range != "drop":
        why = (f"; only {kept} band(s) would remain, fewer than {MIN_BANDS}" if kept < MIN_BANDS else "")
        raise InputError(path, field, f"{listed} {span}{why}",
                         "correct those band centres" + ("" if kept < MIN_BANDS else
                                                         ", or set 'out_of_range_bands: drop' in the dataset spec "
                                                         f"to store the other {kept} bands"))
    first = int(np.argmax(inside))
    keep = slice(first, first + kept)
    return Wavelengths(nm=wl[keep], fwhm_nm=None if fwhm is None else fwhm[keep], unit_note=note, keep=keep,
                       band_note=f"dropped {listed} {span}; {kept} of {bands} bands stored")


def _bands(wl: np.ndarray, index: np.ndarray, shown: int = 6) -> str:
    """'band 0 (250 nm)' or 'bands 0 (250 nm), 5 (2610 nm)', the first few and a count of the rest."""
    items = [f"{i} ({wl[i]:g} nm)" for i in index[:shown]]
    more = f" and {len(index) - shown} more" if len(index) > shown else ""
    return ("band " if len(index) == 1 else "bands ") + ", ".join(items) + more


def cube_shape(shape: tuple[int, ...], dtype: np.dtype, path: str | Path, expected_bands: int | None) -> None:
    """Reject cubes that are not ``(band, y, x)`` numeric arrays of a usable size or disagree with the spec."""
    if len(shape) != 3:
        raise InputError(path, "shape", f"expected a 3-D cube, got shape {shape}",
                         "point the spec at the hyperspectral cube (check 'options.key' and 'options.axes')")
    b, h, w = shape
    if np.dtype(dtype).kind not in "uif":
        raise InputError(path, "dtype", f"unsupported data type {dtype}", "store the cube as integers or floats")
    if h * w == 0 or b == 0:
        raise InputError(path, "shape", f"the cube is empty (shape {shape})",
                         "re-export the image; the file holds no data")
    if h < 2 or w < 2:
        raise InputError(path, "shape", f"the cube is {h}x{w} pixels", "a spatial image of at least 2x2 pixels is "
                         "needed; check 'options.axes' (band and spatial axes may be swapped)")
    if b < MIN_BANDS:
        raise InputError(path, "bands", f"{b} band(s)", f"a hyperspectral cube needs at least {MIN_BANDS} bands; "
                         "check 'options.axes'")
    if expected_bands is not None and b != expected_bands:
        raise InputError(path, "bands", f"the file holds {b} bands but the spec declares {expected_bands}",
                         "fix 'bands' (or 'band_range') in the dataset spec, or check that this file belongs to it")


def finite_block(block: np.ndarray, path: str | Path, y0: int) -> None:
    """Reject NaN/Inf in a float block (``y0`` locates it in the error)."""
    if block.dtype.kind == "f" and not np.all(np.isfinite(block)):
        bad = np.argwhere(~np.isfinite(block))[0]
        raise InputError(path, "values", f"NaN or Inf at band {bad[0]}, row {y0 + bad[1]}, column {bad[2]}",
                         "fill invalid pixels with the sensor's no-data value (and declare it) before ingesting")
