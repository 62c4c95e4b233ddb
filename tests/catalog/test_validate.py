"""Wavelength and shape validation: conversions are recorded, every rejection names file, field and fix."""

from __future__ import annotations

import numpy as np
import pytest

from base.errors import InputError
from catalog.validate import cube_shape, finite_block, wavelengths_nm


def test_nanometres_pass_through() -> None:
    wl = wavelengths_nm(np.array([400.0, 410.0, 420.0]), None, 3, "f.hdr", "file")
    np.testing.assert_array_equal(wl.nm, [400, 410, 420])
    assert wl.unit_note == "nm as given"


@pytest.mark.parametrize("units", ["um", None])
def test_micrometres_converted_and_recorded(units: str | None) -> None:
    wl = wavelengths_nm(np.array([0.4, 0.5, 0.6]), units, 3, "f.hdr", "file", fwhm=np.array([0.01] * 3))
    np.testing.assert_allclose(wl.nm, [400, 500, 600])
    np.testing.assert_allclose(wl.fwhm_nm, [10, 10, 10])
    assert "micrometres" in wl.unit_note and ("stated" if units else "detected") in wl.unit_note


@pytest.mark.parametrize(("values", "bands", "problem"), [
    ([400, 410], 3, "2 wavelengths for 3 bands"),
    ([400, 420, 410], 3, "not increasing"),
    ([400, 400, 410], 3, "duplicate"),
    ([100, 200, 300], 3, "outside 300-2600"),
    ([400, np.nan, 500], 3, "NaN"),
])
def test_bad_wavelengths(values: list[float], bands: int, problem: str) -> None:
    with pytest.raises(InputError) as err:
        wavelengths_nm(np.array(values, dtype=float), "nm", bands, "/data/x.hdr", "file")
    assert problem in err.value.problem and err.value.path == "/data/x.hdr"
    assert err.value.field.startswith("wavelength") and err.value.fix


@pytest.mark.parametrize(("shape", "dtype", "expected", "field"), [
    ((10, 10), "uint16", None, "shape"),
    ((5, 0, 10), "uint16", None, "shape"),
    ((5, 1, 1), "uint16", None, "shape"),
    ((2, 10, 10), "uint16", None, "bands"),
    ((5, 10, 10), "complex64", None, "dtype"),
    ((5, 10, 10), "float32", 6, "bands"),
])
def test_bad_shapes(shape: tuple[int, ...], dtype: str, expected: int | None, field: str) -> None:
    with pytest.raises(InputError) as err:
        cube_shape(shape, np.dtype(dtype), "/data/x.npy", expected)
    assert err.value.field == field


def test_finite_block_locates_the_bad_pixel() -> None:
    block = np.zeros((3, 4, 5), np.float32)
    block[2, 1, 3] = np.inf
    with pytest.raises(InputError, match="band 2, row 11, column 3"):
        finite_block(block, "/data/x.npy", y0=10)
    finite_block(np.zeros((3, 4, 5), np.uint16), "/data/x.npy", y0=0)  # integers cannot hold NaN
