"""The RGB SAM2 sees: CIE 1931 synthesis, band-pick false colour, native pass-through, spectral sequences."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from stages.labelling.falsecolor import (
    band_pick_bands,
    covers_visible,
    percentile_stretch,
    sequence_bands,
    spectral_sequence,
    to_rgb,
)


def peaked_cube(peak_nm: float, wavelengths: np.ndarray, h: int = 12, w: int = 16) -> np.ndarray:
    """A cube whose every pixel has a Gaussian spectrum at ``peak_nm`` (left half darker, for contrast)."""
    spectrum = np.exp(-0.5 * ((wavelengths - peak_nm) / 25.0) ** 2)
    cube = np.broadcast_to(spectrum[:, None, None], (wavelengths.size, h, w)).astype(np.float32)
    cube[:, :, : w // 2] *= 0.5
    return cube


@pytest.mark.parametrize(("peak", "channel"), [(450.0, 2), (550.0, 1), (650.0, 0)])
def test_cie1931_colour_of_a_peaked_spectrum(peak: float, channel: int) -> None:
    wl = np.linspace(400.0, 1000.0, 31)
    rgb, method = to_rgb(peaked_cube(peak, wl), wl)
    assert method == "cie1931"
    assert rgb.dtype == np.uint8 and rgb.shape == (12, 16, 3)
    mean = rgb.reshape(-1, 3).astype(float).mean(axis=0)
    assert int(np.argmax(mean)) == channel
    assert mean[channel] > 2 * np.delete(mean, channel).max()


def test_cie1931_weights_uneven_sampling_by_spacing() -> None:
    """A flat (grey) reflectance stays neutral whether the bands are dense in the blue or spread evenly."""
    for wl in (np.linspace(400.0, 700.0, 16), np.concatenate([np.linspace(400, 500, 40), np.linspace(510, 700, 8)])):
        cube = np.full((wl.size, 4, 4), 0.5, np.float32)
        cube[:, 0, 0] = 1.0  # a white pixel sets the stretch
        cube[:, 3, 3] = 0.0
        rgb, method = to_rgb(cube, wl)
        assert method == "cie1931"
        grey = rgb[1, 1].astype(int)
        assert grey.max() - grey.min() <= 6, grey


@pytest.mark.parametrize("wl_range", [(600.0, 975.0), (950.0, 1700.0)])
def test_band_pick_without_the_visible_range(wl_range: tuple[float, float]) -> None:
    wl = np.linspace(*wl_range, 25)
    rng = np.random.default_rng(0)
    cube = rng.uniform(0, 4000, (25, 10, 12)).astype(np.uint16)
    rgb, method = to_rgb(cube, wl)
    assert method == "band-pick"
    r, g, b = band_pick_bands(wl)
    assert (r, g, b) == (20, 12, 4)  # nearest 85 %, 50 %, 15 % of the range
    for c, band in enumerate((r, g, b)):
        np.testing.assert_array_equal(rgb[..., c], percentile_stretch(cube[band]))


def test_visible_coverage_rule() -> None:
    assert covers_visible(np.linspace(400, 1000, 16))
    assert covers_visible(np.array([450.0, 520.0, 600.0]))  # 3 bands spanning 150 nm
    assert not covers_visible(np.array([450.0, 520.0, 599.0]))  # 149 nm
    assert not covers_visible(np.array([400.0, 700.0]))  # 2 bands
    assert not covers_visible(np.linspace(600, 975, 25))


def test_native_rgb_passes_through() -> None:
    wl = np.linspace(400, 1000, 16)
    cube = np.zeros((16, 6, 8), np.float32)
    native = np.arange(6 * 8 * 3, dtype=np.uint8).reshape(6, 8, 3)
    rgb, method = to_rgb(cube, wl, native)
    assert method == "native" and rgb is native
    with pytest.raises(ValueError, match="aligned RGB"):
        to_rgb(cube, wl, native[:5])


def test_outputs_are_uint8_without_warnings_for_degenerate_cubes() -> None:
    """Dark, constant and negative cubes give finite uint8 images on every path (no NaN from 0/0)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for wl in (np.linspace(400, 1000, 16), np.linspace(950, 1700, 16)):
            for cube in (np.zeros((16, 5, 7), np.float32), np.full((16, 5, 7), -3.0), np.ones((16, 5, 7))):
                rgb, _ = to_rgb(cube, wl)
                assert rgb.dtype == np.uint8 and rgb.shape == (5, 7, 3)
                assert all(f.rgb.dtype == np.uint8 for f in spectral_sequence(cube, wl, 1))


def test_percentile_stretch_maps_the_99th_percentile_to_255() -> None:
    x = np.arange(1001, dtype=np.float64)  # 1st percentile 10, 99th 990
    out = percentile_stretch(x)
    assert out.dtype == np.uint8
    assert out[990] == 255 and out[1000] == 255
    assert out[10] == 0 and out[0] == 0
    assert out[500] == 128
    assert np.all(np.diff(out.astype(int)) >= 0)
    assert not percentile_stretch(np.full(10, 7.0)).any()


def test_spectral_sequence_of_31_bands_with_stride_2() -> None:
    wl = np.linspace(400, 700, 31)
    cube = np.random.default_rng(1).uniform(0, 1, (31, 6, 8)).astype(np.float32)
    frames = spectral_sequence(cube, wl, 2)
    assert [f.bands for f in frames] == [(0, 2, 4), (6, 8, 10), (12, 14, 16), (18, 20, 22), (24, 26, 28)]
    for f in frames:
        assert f.wavelengths == tuple(float(wl[b]) for b in f.bands)
        assert f.rgb.dtype == np.uint8 and f.rgb.shape == (6, 8, 3)
        for c, band in enumerate(reversed(f.bands)):  # longest wavelength in red
            np.testing.assert_array_equal(f.rgb[..., c], percentile_stretch(cube[band]))
    assert sequence_bands(31, 1)[-1] == (27, 28, 29)  # stride 1: adjacent triplets, band 30 left over
    assert len(sequence_bands(128, 2)) == 21


@pytest.mark.parametrize("bands", [1, 2])
def test_too_few_bands_raise(bands: int) -> None:
    cube = np.ones((bands, 4, 4), np.float32)
    wl = np.linspace(500, 600, bands)
    with pytest.raises(ValueError, match="at least 3 bands"):
        spectral_sequence(cube, wl, 1)
    with pytest.raises(ValueError, match="at least 3 bands"):
        to_rgb(cube, wl)


def test_stride_too_large_and_bad_inputs_raise() -> None:
    cube = np.ones((5, 4, 4), np.float32)
    with pytest.raises(ValueError, match="at most 2"):
        spectral_sequence(cube, np.linspace(500, 600, 5), 3)
    with pytest.raises(ValueError, match="strictly increasing"):
        to_rgb(cube, np.array([500.0, 510, 505, 520, 530]))
    with pytest.raises(ValueError, match="4 wavelengths for 5 bands"):
        to_rgb(cube, np.linspace(500, 600, 4))


def test_nan_cube_raises_naming_nan() -> None:
    cube = np.ones((16, 4, 4), np.float32)
    cube[3, 1, 2] = np.nan
    wl = np.linspace(400, 1000, 16)
    with pytest.raises(ValueError, match=r"1 NaN .*band 3, row 1, column 2"):
        to_rgb(cube, wl)
    with pytest.raises(ValueError, match="NaN"):
        spectral_sequence(cube, wl, 2)


def test_ensure_falsecolor_stores_the_rgb_once(tmp_path) -> None:
    from catalog.catalog import Catalog
    from catalog.fixtures import write_dataset
    from catalog.specs import spec_for_folder
    from stages.ingest import ingest_item, plan
    from stages.ingest.discover import item_for
    from stages.labelling.falsecolor import ensure_falsecolor, to_rgb

    write_dataset("harvard", tmp_path / "src")  # no aligned RGB
    write_dataset("hssod", tmp_path / "src")  # aligned RGB
    cat = Catalog(tmp_path / "cat").init()
    for w in plan(tmp_path / "src", cat).items:
        spec = spec_for_folder(tmp_path / "src" / w.dataset)
        ingest_item(cat, spec, item_for(tmp_path / "src" / w.dataset, spec, w.primary))
    harvard = cat.images("harvard").iloc[0]
    assert cat.read_falsecolor_crop(harvard.location, 0, 0, 8) is None
    assert ensure_falsecolor(cat, harvard.image_id) == "cie1931"
    da = cat.open(harvard.image_id)
    expected, _ = to_rgb(da.values, da["wavelength"].values)
    np.testing.assert_array_equal(cat.read_falsecolor_crop(harvard.location, 2, 3, 8), expected[2:10, 3:11])
    assert ensure_falsecolor(cat, harvard.image_id) == "stored"
    assert ensure_falsecolor(cat, cat.images("hssod").iloc[0].image_id) == "native"
