"""The RGB images SAM2 sees: one colour image per cube (spatial branch) and a sequence of band triplets (spectral).

``to_rgb`` picks, in order:

1. ``native``: the dataset's aligned RGB, unchanged;
2. ``cie1931``: when the bands cover the visible range (``covers_visible``: at least 3 band centres inside
   400-700 nm spanning at least 150 nm), a colorimetric synthesis: the cube is read as reflectance, lit by CIE
   D65 and integrated against the CIE 1931 2-degree colour-matching functions, XYZ -> linear sRGB, then a
   percentile stretch and the sRGB transfer function;
3. ``band-pick``: otherwise (e.g. 600-975 nm or 950-1700 nm sensors) the bands nearest 85 %, 50 % and 15 % of the
   wavelength range as R, G and B, each stretched separately.

Stretches map the 1st percentile to 0 and the 99th to 255 (``STRETCH_PERCENTILES``), so a few saturated or
dead pixels do not set the contrast.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import colour
import numpy as np

if TYPE_CHECKING:
    from catalog.catalog import Catalog

VISIBLE_NM = (400.0, 700.0)
MIN_VISIBLE_BANDS = 3
MIN_VISIBLE_SPAN_NM = 150.0
#: Low and high percentiles of every contrast stretch (per image, or per band where said).
STRETCH_PERCENTILES = (1.0, 99.0)
#: Percentile of the cube's values taken as reflectance 1 before the CIE synthesis (robust to specular pixels).
REFLECTANCE_PERCENTILE = 99.0
#: Fractions of the wavelength range whose nearest bands become R, G and B in band-pick false colour.
BAND_PICK_FRACTIONS = (0.85, 0.50, 0.15)
_CMFS = colour.MSDS_CMFS["CIE 1931 2 Degree Standard Observer"]
_D65 = colour.SDS_ILLUMINANTS["D65"]


@dataclass(frozen=True)
class Frame:
    """One false-colour frame of the spectral sequence: ``rgb`` (y, x, 3) uint8 shows ``bands`` (ascending band
    indices, wavelengths in nm alongside) with the longest wavelength in red: R = bands[2], G = bands[1],
    B = bands[0]."""

    rgb: np.ndarray
    bands: tuple[int, int, int]
    wavelengths: tuple[float, float, float]


def check_cube(cube: np.ndarray, wavelengths: np.ndarray) -> np.ndarray:
    """Validate a (band, y, x) cube and its band centres (finite values, strictly increasing wavelengths);
    returns the wavelengths as float64."""
    if cube.ndim != 3:
        raise ValueError(f"cube must be (band, y, x), got shape {cube.shape}")
    wl = np.asarray(wavelengths, dtype=np.float64)
    if wl.shape != (cube.shape[0],):
        raise ValueError(f"{wl.size} wavelengths for {cube.shape[0]} bands: give one band centre (nm) per band")
    if not np.all(np.isfinite(wl)) or np.any(np.diff(wl) <= 0):
        raise ValueError("wavelengths must be finite and strictly increasing (band centres in nm)")
    if cube.dtype.kind == "f":
        bad = ~np.isfinite(cube)
        if bad.any():
            n_nan = int(np.isnan(cube).sum())
            b, y, x = np.argwhere(bad)[0]
            raise ValueError(f"cube contains {n_nan} NaN and {int(bad.sum()) - n_nan} Inf values (first at band "
                             f"{b}, row {y}, column {x}): fill or mask them before labelling (re-ingest the image)")
    return wl


def unit_stretch(x: np.ndarray, percentiles: tuple[float, float] = STRETCH_PERCENTILES) -> np.ndarray:
    """Map the low percentile of ``x`` to 0 and the high one to 1, clipping outside; a flat input maps to 0."""
    lo, hi = np.percentile(x, percentiles)
    if not hi > lo:
        return np.zeros(x.shape, np.float32)
    return np.clip((x.astype(np.float32) - np.float32(lo)) / np.float32(hi - lo), 0.0, 1.0)


def to_uint8(unit: np.ndarray) -> np.ndarray:
    """Values in [0, 1] to rounded uint8."""
    return np.rint(np.clip(unit, 0.0, 1.0) * 255.0).astype(np.uint8)


def percentile_stretch(x: np.ndarray, percentiles: tuple[float, float] = STRETCH_PERCENTILES) -> np.ndarray:
    """uint8 contrast stretch: the low percentile of ``x`` goes to 0, the high one (and above) to 255."""
    return to_uint8(unit_stretch(x, percentiles))


def covers_visible(wavelengths: np.ndarray) -> bool:
    """Whether the bands support a colorimetric RGB: >= 3 band centres inside 400-700 nm spanning >= 150 nm."""
    wl = np.asarray(wavelengths, dtype=np.float64)
    vis = wl[(wl >= VISIBLE_NM[0]) & (wl <= VISIBLE_NM[1])]
    return vis.size >= MIN_VISIBLE_BANDS and float(vis.max() - vis.min()) >= MIN_VISIBLE_SPAN_NM


def cie1931_rgb(cube: np.ndarray, wavelengths: np.ndarray) -> np.ndarray:
    """sRGB uint8 from a cube read as reflectance under D65 (see the module docstring for when it applies).

    Bands inside the CMF range (360-830 nm) are used; each is weighted by its spectral spacing (np.gradient of
    the band centres) so uneven sampling integrates correctly; XYZ is normalised so a perfect white has Y = 1.
    Reflectance = cube / its 99th percentile, clipped to [0, 1]. Linear sRGB is stretched jointly over the
    three channels (1st-99th percentile, keeping hue) before the sRGB transfer function.
    """
    wl = np.asarray(wavelengths, dtype=np.float64)
    inside = (wl >= _CMFS.wavelengths[0]) & (wl <= _CMFS.wavelengths[-1])
    spacing = np.gradient(wl)[inside]
    w = wl[inside]
    cmfs = np.stack([np.interp(w, _CMFS.wavelengths, _CMFS.values[:, i]) for i in range(3)], axis=1)
    weights = cmfs * (np.interp(w, _D65.wavelengths, _D65.values) * spacing)[:, None]
    weights /= weights[:, 1].sum()
    refl = cube[inside].astype(np.float32)
    scale = float(np.percentile(refl, REFLECTANCE_PERCENTILE))
    refl = np.clip(refl / (scale if scale > 0 else 1.0), 0.0, 1.0)
    xyz = np.tensordot(refl, weights.astype(np.float32), axes=([0], [0]))  # (y, x, 3)
    linear = np.clip(colour.XYZ_to_sRGB(xyz, apply_cctf_encoding=False), 0.0, None)
    return to_uint8(colour.cctf_encoding(unit_stretch(linear), function="sRGB"))


def band_pick_bands(wavelengths: np.ndarray) -> tuple[int, int, int]:
    """Band indices (R, G, B) nearest 85 %, 50 % and 15 % of the wavelength range."""
    wl = np.asarray(wavelengths, dtype=np.float64)
    targets = wl[0] + np.asarray(BAND_PICK_FRACTIONS) * (wl[-1] - wl[0])
    r, g, b = (int(np.argmin(np.abs(wl - t))) for t in targets)
    return r, g, b


def stretch_bands(cube: np.ndarray, bands: tuple[int, int, int]) -> np.ndarray:
    """(y, x, 3) uint8 of the given bands (in channel order), each stretched by its own percentiles."""
    return np.stack([percentile_stretch(cube[b]) for b in bands], axis=-1)


def to_rgb(cube: np.ndarray, wavelengths: np.ndarray, rgb: np.ndarray | None = None) -> tuple[np.ndarray, str]:
    """The RGB of one image and how it was made: "native", "cie1931" or "band-pick" (see the module docstring)."""
    if rgb is not None:
        if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.shape[:2] != cube.shape[1:]:
            raise ValueError(f"the aligned RGB must be uint8 (y, x, 3) matching the cube's {cube.shape[1:]}, got "
                             f"{rgb.dtype} {rgb.shape}: fix the dataset's RGB reader or drop the RGB")
        return rgb, "native"
    wl = check_cube(cube, wavelengths)
    if cube.shape[0] < 3:
        raise ValueError(f"a false-colour RGB needs at least 3 bands, the cube has {cube.shape[0]}: "
                         "give the dataset's aligned RGB instead")
    if covers_visible(wl):
        return cie1931_rgb(cube, wl), "cie1931"
    return stretch_bands(cube, band_pick_bands(wl)), "band-pick"


def sequence_bands(n_bands: int, stride: int) -> list[tuple[int, int, int]]:
    """Band triplets of the spectral sequence: frame k = (3ks, 3ks + s, 3ks + 2s) for stride s.

    The bands 0, s, 2s, ... are cut into consecutive triplets; the 1 or 2 grid bands left at the long-wavelength
    end are not used. Stride 1 partitions the cube into adjacent triplets. Example, 31 bands, stride 2: (0, 2, 4),
    (6, 8, 10), (12, 14, 16), (18, 20, 22), (24, 26, 28); band 30 and the odd bands are not used.
    """
    if n_bands < 3:
        raise ValueError(f"a spectral sequence needs at least 3 bands, the cube has {n_bands}")
    if stride < 1:
        raise ValueError(f"stride must be a positive number of bands, got {stride}")
    if 2 * stride >= n_bands:
        raise ValueError(f"stride {stride} is too large for {n_bands} bands (one frame spans 2 * stride + 1 "
                         f"bands): use a stride of at most {(n_bands - 1) // 2}")
    grid = range(0, n_bands, stride)
    return [(grid[i], grid[i + 1], grid[i + 2]) for i in range(0, len(grid) - 2, 3)]


def spectral_sequence(cube: np.ndarray, wavelengths: np.ndarray, stride: int) -> list[Frame]:
    """The cube as false-colour frames ordered along the spectrum (band rule in ``sequence_bands``); each band of
    a frame is stretched by its own 1st-99th percentiles, as in band-pick false colour."""
    wl = check_cube(cube, wavelengths)
    frames = []
    for b0, b1, b2 in sequence_bands(cube.shape[0], stride):
        frames.append(Frame(rgb=stretch_bands(cube, (b2, b1, b0)), bands=(b0, b1, b2),
                            wavelengths=(float(wl[b0]), float(wl[b1]), float(wl[b2]))))
    return frames


def ensure_falsecolor(catalog: Catalog, image_id: str) -> str:
    """Derive and store the image's false-colour RGB once (images with a native aligned RGB need none), so that
    training crops read it instead of recomputing it; returns the method used."""
    row = catalog.row(image_id)
    if bool(row["has_rgb"]):
        return "native"
    if catalog.read_falsecolor_crop(row["location"], 0, 0, 1) is not None:
        return "stored"
    da = catalog.open(image_id)
    rgb, method = to_rgb(np.asarray(da.values), np.asarray(da["wavelength"].values))
    catalog.write_falsecolor(row["location"], rgb, method)
    return method
