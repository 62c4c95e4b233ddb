"""ENVI and TIFF readers on their datasets' fixtures: exact values, wavelengths, lazy (windowed) partial reads,
white/dark references, pickling across processes, and bad input rejected with the right field."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
import rasterio.io
import tifffile

from base.errors import InputError
from catalog.fixtures import write_dataset
from catalog.fixtures.base import FixtureImage
from catalog.fixtures.envi import write_envi
from catalog.readers.base import AxisView, RawCube, SourceItem, get_reader
from catalog.readers.envi import EnviArray, EnviOptions
from catalog.readers.tiff import TiffArray, TiffOptions
from catalog.specs import DatasetSpec, builtin_specs, parse_spec

ENVI_SLUGS = ["deephs-nir", "deephs-vis", "deephs-viscor", "hyperblood", "lib-hsi", "virginia-tech-tree",
              "apple-fire-blight"]
TIFF_SLUGS = ["hsi-road"]
#: The unit each fixture's header states (None: not stated).
HEADER_UNITS = {"deephs-nir": "um", "deephs-vis": "nm", "deephs-viscor": "nm", "hyperblood": None,
                "lib-hsi": "nm", "virginia-tech-tree": "nm", "apple-fire-blight": "nm"}


def build_items(folder: Path, spec: DatasetSpec) -> list[SourceItem]:
    """SourceItems as discovery makes them: the spec's globs minus its excludes, companions and aligned RGB."""
    options = spec.reader_options()
    excluded = {p for pattern in spec.exclude for p in folder.glob(pattern)}
    primaries = sorted({p for pattern in spec.files for p in folder.glob(pattern) if p.is_file()} - excluded)
    items = []
    for primary in primaries:
        key = primary.relative_to(folder).with_suffix("").as_posix()
        bare = SourceItem(spec.slug, folder, primary, (primary,), key, stem_suffix=spec.stem_suffix)
        rgb = bare.resolve(spec.rgb) if spec.rgb else None
        files = (primary, *spec.reader.companions(primary, options))
        items.append(SourceItem(spec.slug, folder, primary, files, key, rgb, spec.stem_suffix))
    return items


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, list[FixtureImage]]]:
    root = tmp_path_factory.mktemp("envi-tiff")
    return {slug: (root / slug, write_dataset(slug, root)) for slug in ENVI_SLUGS + TIFF_SLUGS}


def read_dataset(slug: str, written: dict) -> list[tuple[FixtureImage, SourceItem, RawCube]]:
    """(truth, item, what the reader returned) for every fixture image of ``slug``."""
    spec = builtin_specs()[slug]
    folder, truth = written[slug]
    items = {i.key: i for i in build_items(folder, spec)}
    assert sorted(items) == sorted(fx.key for fx in truth)
    return [(fx, items[fx.key], spec.reader.read(items[fx.key], spec.reader_options())) for fx in truth]


@pytest.mark.parametrize("slug", ENVI_SLUGS + TIFF_SLUGS)
def test_fixture_reads_exactly(slug: str, written: dict) -> None:
    spec = builtin_specs()[slug]
    for fx, item, raw in read_dataset(slug, written):
        assert tuple(raw.data.shape) == fx.cube.shape and fx.cube.shape[0] == spec.bands
        assert np.dtype(raw.data.dtype) == fx.cube.dtype
        np.testing.assert_array_equal(np.asarray(raw.data[:, :, :]), fx.cube)
        np.testing.assert_array_equal(raw.data[2:5, 3:9, 1:7], fx.cube[2:5, 3:9, 1:7])
        assert (item.rgb is not None) == fx.has_rgb and raw.rgb is None
        if spec.wavelengths_from == "file":
            assert raw.wavelength_units == HEADER_UNITS[slug]
            scale = 1000.0 if raw.wavelength_units == "um" else 1.0
            np.testing.assert_allclose(np.asarray(raw.wavelengths) * scale, fx.wavelengths, rtol=1e-12)
        else:
            assert raw.wavelengths is None


def test_envi_companions_and_attrs(written: dict) -> None:
    (_, item, raw), _ = read_dataset("deephs-nir", written)
    names = [p.name for p in item.files]
    stem = item.primary.stem
    assert names == [f"{stem}.hdr", f"{stem}.bin", f"{stem}_White.hdr", f"{stem}_White.bin",
                     f"{stem}_Dark.hdr", f"{stem}_Dark.bin"]
    assert raw.attrs == {"interleave": "bil", "byte_order": 0, "data_type": 12,
                         "description": "fixture written by catalog.fixtures.envi"}
    (_, lib_item, lib_raw), _ = read_dataset("lib-hsi", written)
    assert [p.name for p in lib_item.files] == ["lib_0001.hdr", "lib_0001.dat"]
    assert lib_raw.attrs["sensor_type"] == "Specim IQ" and lib_raw.attrs["reflectance_scale_factor"] == 1.0
    assert lib_raw.attrs["data_ignore_value"] == -1.0 and lib_raw.attrs["interleave"] == "bsq"


@pytest.mark.parametrize("slug", ["deephs-nir", "deephs-viscor"])
def test_white_dark_references_are_line_means(slug: str, written: dict) -> None:
    for fx, item, raw in read_dataset(slug, written):
        assert set(raw.extras) == {"white_ref", "dark_ref"}
        for name, suffix in (("white_ref", "_White"), ("dark_ref", "_Dark")):
            with rasterio.open(item.primary.with_name(item.primary.stem + suffix + ".bin")) as src:
                expected = src.read().astype(np.float64).mean(axis=1)
            ref = raw.extras[name]
            assert ref.dtype == np.float32 and ref.shape == (fx.cube.shape[0], fx.cube.shape[2])
            np.testing.assert_allclose(ref, expected, rtol=1e-6)
        assert (raw.extras["white_ref"] > raw.extras["dark_ref"]).all()


def test_envi_reads_are_windowed_and_picklable(written: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    (fx, _, raw), _ = read_dataset("deephs-vis", written)
    data = pickle.loads(pickle.dumps(raw.data))
    assert isinstance(data, EnviArray) and len(pickle.dumps(raw.data)) < 1000
    calls: list[tuple[Any, Any]] = []
    original = rasterio.io.DatasetReader.read

    def spy(self: Any, indexes: Any = None, **kw: Any) -> np.ndarray:
        calls.append((indexes, kw.get("window")))
        return original(self, indexes, **kw)

    monkeypatch.setattr(rasterio.io.DatasetReader, "read", spy)
    np.testing.assert_array_equal(data[2:5, 3:9, 1:7], fx.cube[2:5, 3:9, 1:7])
    (indexes, window), = calls
    assert indexes == [3, 4, 5] and (window.row_off, window.col_off, window.height, window.width) == (3, 1, 6, 6)
    for key in [(slice(None, None, 7), slice(None, None, -2), slice(1, None, 4)), (slice(5, 5),),
                (slice(-3, None), slice(-1, 2, -1))]:
        np.testing.assert_array_equal(data[key], fx.cube[key])
    with pytest.raises(TypeError):
        data[0]


def test_swap_xy_transposes_lazily(written: dict) -> None:
    for fx, _, raw in read_dataset("apple-fire-blight", written):
        data = pickle.loads(pickle.dumps(raw.data))
        assert data.shape == fx.cube.shape and fx.cube.shape[1] != fx.cube.shape[2]
        np.testing.assert_array_equal(data[1:4, 2:7, 0:3], fx.cube[1:4, 2:7, 0:3])


# ------------------------------------------------------------------------------------------ small ENVI helpers
def _envi(folder: Path, name: str = "cube", bands: int = 5, **kw: Any) -> tuple[Path, np.ndarray]:
    """A small uint16 ENVI cube (band, line, sample) = (bands, 4, 6) with wavelengths; returns (header, truth)."""
    folder.mkdir(parents=True, exist_ok=True)
    cube = np.arange(bands * 4 * 6, dtype=np.uint16).reshape(bands, 4, 6) * 7
    kw.setdefault("wavelengths", np.linspace(500.0, 900.0, bands))
    write_envi(folder / f"{name}.hdr", cube, **kw)
    return folder / f"{name}.hdr", cube


def _read(header: Path, root: Path, **options: Any) -> RawCube:
    item = SourceItem("test", root, header, (header,), header.relative_to(root).with_suffix("").as_posix())
    return get_reader("envi").read(item, EnviOptions(**options))


@pytest.mark.parametrize("interleave", ["bsq", "bil", "bip"])
@pytest.mark.parametrize("big_endian", [False, True])
def test_envi_interleaves_and_byte_orders(tmp_path: Path, interleave: str, big_endian: bool) -> None:
    header, cube = _envi(tmp_path, interleave=interleave, big_endian=big_endian)
    raw = _read(header, tmp_path)
    assert raw.data.dtype == np.dtype(np.uint16) and raw.attrs["byte_order"] == int(big_endian)
    np.testing.assert_array_equal(np.asarray(raw.data[:, :, :]), cube)


def test_envi_data_file_named_in_header(tmp_path: Path) -> None:
    header, cube = _envi(tmp_path, interleave="bil", big_endian=True, fields={"data file": "raw_0001.img"})
    (tmp_path / "cube.bin").rename(tmp_path / "raw_0001.img")  # GDAL cannot pair these by name
    assert get_reader("envi").companions(header, EnviOptions()) == [tmp_path / "raw_0001.img"]
    raw = _read(header, tmp_path)
    np.testing.assert_array_equal(np.asarray(raw.data[:, :, :]), cube)
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(raw.data))[1:3, 1:, ::2], cube[1:3, 1:, ::2])


@pytest.mark.parametrize(("stated", "expected"), [("Micrometers", "um"), ("microns", "um"), ("Nanometers", "nm"),
                                                  ("nm", "nm"), ("Unknown", None), (None, None)])
def test_envi_wavelength_units(tmp_path: Path, stated: str | None, expected: str | None) -> None:
    header, _ = _envi(tmp_path, units=stated)
    assert _read(header, tmp_path).wavelength_units == expected


def test_envi_fwhm_and_header_without_wavelengths(tmp_path: Path) -> None:
    header, _ = _envi(tmp_path, fields={"fwhm": "{2, 2.5, 3, 3.5, 4}"})
    np.testing.assert_array_equal(_read(header, tmp_path).fwhm, [2, 2.5, 3, 3.5, 4])
    bare, _ = _envi(tmp_path, name="bare", wavelengths=None)
    raw = _read(bare, tmp_path)
    assert raw.wavelengths is None and raw.wavelength_units is None and raw.fwhm is None


# ------------------------------------------------------------------------------------------ bad ENVI input
def _error(header: Path, root: Path, **options: Any) -> InputError:
    with pytest.raises(InputError) as info:
        _read(header, root, **options)
    assert info.value.fix
    return info.value


def test_envi_wrong_first_line(tmp_path: Path) -> None:
    header, _ = _envi(tmp_path)
    header.write_text(header.read_text().replace("ENVI\n", "ENVI-ish header\n", 1))
    err = _error(header, tmp_path)
    assert err.field == "header" and err.path == str(header)
    assert get_reader("envi").companions(header, EnviOptions()) == []  # lenient: read() reports it


def test_envi_truncated_data_file(tmp_path: Path) -> None:
    header, cube = _envi(tmp_path)
    data = tmp_path / "cube.bin"
    data.write_bytes(data.read_bytes()[: cube.nbytes // 2])
    err = _error(header, tmp_path)
    assert err.field == "data file" and err.path == str(data)
    assert str(cube.nbytes) in err.problem and str(cube.nbytes // 2) in err.problem and "truncated" in err.fix


def test_envi_wavelength_count_disagrees_with_bands(tmp_path: Path) -> None:
    header, _ = _envi(tmp_path)
    header.write_text(header.read_text().replace("bands = 5", "bands = 4").replace("lines = 4", "lines = 5"))
    assert _error(header, tmp_path).field == "wavelength"


def test_envi_missing_data_file(tmp_path: Path) -> None:
    header, _ = _envi(tmp_path)
    (tmp_path / "cube.bin").unlink()
    err = _error(header, tmp_path)
    assert err.field == "data file" and "cube.bin" in err.fix
    assert get_reader("envi").companions(header, EnviOptions()) == []


@pytest.mark.parametrize("ref", ["white_ref", "dark_ref"])
def test_envi_configured_reference_missing(tmp_path: Path, written: dict, ref: str) -> None:
    folder = tmp_path / "deephs-vis"
    shutil.copytree(written["deephs-vis"][0], folder)
    suffix = "_White" if ref == "white_ref" else "_Dark"
    for path in folder.rglob(f"*{suffix}.*"):
        path.unlink()
    spec = builtin_specs()["deephs-vis"]
    item = build_items(folder, spec)[0]
    assert not any(p.stem.endswith(suffix) for p in item.files)
    with pytest.raises(InputError) as info:
        spec.reader.read(item, spec.reader_options())
    assert info.value.field == f"options.{ref}" and suffix in info.value.problem


def test_envi_reference_of_another_size(tmp_path: Path) -> None:
    header, _ = _envi(tmp_path)
    _envi(tmp_path, name="cube_Dark", bands=4)
    err = _error(header, tmp_path, dark_ref="{dir}/{stem}_Dark.hdr")
    assert err.field == "options.dark_ref" and err.path.endswith("cube_Dark.hdr")


@pytest.mark.parametrize(("edit", "field"), [
    (("wavelength units = Nanometers", "wavelength units = Index"), "wavelength units"),
    (("data type = 12", "data type = 6"), "header.data type"),
    (("interleave = bsq", "interleave = bsx"), "header.interleave"),
    (("samples = 6", "samples = six"), "header.samples"),
    (("900.0}", "900.0"), "header.wavelength"),
    (("header offset = 0", "header offset 0"), "header"),
])
def test_envi_malformed_header_fields(tmp_path: Path, edit: tuple[str, str], field: str) -> None:
    header, _ = _envi(tmp_path)
    text = header.read_text()
    assert edit[0] in text
    header.write_text(text.replace(*edit))
    assert _error(header, tmp_path).field == field


def test_envi_unknown_option_is_rejected() -> None:
    entry = {"name": "x", "format": "envi", "files": "*.hdr", "wavelengths_from": "file",
             "options": {"swap_yx": True}}
    with pytest.raises(InputError) as info:
        parse_spec(entry, "x.yaml")
    assert info.value.field == "options.swap_yx"


# ------------------------------------------------------------------------------------------ TIFF
def _tiff_read(path: Path, axes: str | None = None) -> RawCube:
    item = SourceItem("test", path.parent, path, (path,), path.stem)
    return get_reader("tiff").read(item, TiffOptions(axes=axes))


CUBE = np.random.default_rng(3).integers(0, 60000, (7, 9, 11)).astype(np.uint16)  # (band, y, x)


@pytest.mark.parametrize(("layout", "write"), [
    ("mapped", lambda p: tifffile.imwrite(p, CUBE, photometric="minisblack", metadata=None)),
    ("mapped", lambda p: tifffile.imwrite(p, CUBE, photometric="minisblack", planarconfig="separate",
                                          byteorder=">", metadata=None)),
    ("pages", lambda p: tifffile.imwrite(p, CUBE, photometric="minisblack", compression="zlib", metadata=None)),
    ("page", lambda p: tifffile.imwrite(p, CUBE.transpose(1, 2, 0), photometric="minisblack",
                                        planarconfig="contig", compression="zlib", metadata=None)),
    ("mapped", lambda p: tifffile.imwrite(p, CUBE[None], photometric="minisblack")),  # singleton axis dropped
])
def test_tiff_layouts(tmp_path: Path, layout: str, write: Any) -> None:
    path = tmp_path / "cube.tif"
    write(path)
    raw = _tiff_read(path)
    assert raw.attrs["tiff_layout"] == layout and raw.data.dtype == np.dtype(np.uint16)
    data = pickle.loads(pickle.dumps(raw.data))
    assert data.shape == CUBE.shape and len(pickle.dumps(raw.data)) < 1000
    np.testing.assert_array_equal(np.asarray(data[:, :, :]), CUBE)
    for key in [(slice(2, 5), slice(3, 9), slice(1, 7)), (slice(None, None, 3), slice(None, None, -1)),
                (slice(4, 4),)]:
        np.testing.assert_array_equal(data[key], CUBE[key])


def test_tiff_pages_decode_only_the_bands_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "cube.tif"
    tifffile.imwrite(path, CUBE, photometric="minisblack", compression="zlib", metadata=None)
    data = _tiff_read(path).data
    asked: list[Any] = []
    original = tifffile.TiffFile.asarray

    def spy(self: Any, key: Any = None, **kw: Any) -> np.ndarray:
        asked.append(key)
        return original(self, key, **kw)

    monkeypatch.setattr(tifffile.TiffFile, "asarray", spy)
    np.testing.assert_array_equal(data[2:5, 1:3], CUBE[2:5, 1:3])
    assert asked == [[2, 3, 4]]


def test_tiff_axes_option_overrides_the_layout(tmp_path: Path) -> None:
    path = tmp_path / "bxy.tif"
    tifffile.imwrite(path, np.ascontiguousarray(CUBE.transpose(0, 2, 1)), photometric="minisblack", metadata=None)
    raw = _tiff_read(path, axes="bxy")
    assert raw.data.shape == CUBE.shape and raw.attrs["axes"] == "bxy"
    np.testing.assert_array_equal(raw.data[1:3, 2:8, 0:5], CUBE[1:3, 2:8, 0:5])
    assert isinstance(raw.data, AxisView) and isinstance(raw.data.source, TiffArray)


def _tiff_error(path: Path, axes: str | None = None) -> InputError:
    with pytest.raises(InputError) as info:
        _tiff_read(path, axes)
    assert info.value.fix and info.value.path == str(path)
    return info.value


def test_tiff_2d_image_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "flat.tif"
    tifffile.imwrite(path, CUBE[0])
    assert _tiff_error(path).field == "shape"


@pytest.mark.parametrize("content", [b"this is not a tiff at all" * 10, b"II*\x00" + bytes(range(256)) * 2])
def test_tiff_corrupt_bytes(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "corrupt.tif"
    path.write_bytes(content)
    assert _tiff_error(path).field == "file"


def test_tiff_truncated(tmp_path: Path) -> None:
    path = tmp_path / "cut.tif"
    tifffile.imwrite(path, CUBE.transpose(1, 2, 0), photometric="minisblack", planarconfig="contig", metadata=None)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # the image data follows the IFD
    err = _tiff_error(path)
    assert err.field == "file" and "truncated" in err.problem


def test_tiff_bad_axes_option(tmp_path: Path) -> None:
    path = tmp_path / "cube.tif"
    tifffile.imwrite(path, CUBE, photometric="minisblack", metadata=None)
    assert _tiff_error(path, axes="bbx").field == "options.axes"
