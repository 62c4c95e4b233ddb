"""Readers of the band-folder (CAVE), snapshot-mosaic (HOT-2024) and .hsd (Hyperspectral City v2) formats,
checked against their seeded fixtures, plus the bad inputs each must reject with an InputError naming the
field."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from base.errors import InputError
from catalog.fixtures import write_dataset
from catalog.fixtures.base import FixtureImage
from catalog.fixtures.hsd import write_hsd
from catalog.fixtures.mosaic import mosaic
from catalog.readers.base import RawCube, SourceItem, load_rgb
from catalog.readers.mosaic import MosaicOptions
from catalog.specs import DatasetSpec, builtin_specs

SLUGS = ["cave", "hot-2024-vis", "hot-2024-nir", "hot-2024-rednir", "hyperspectral-city-v2"]


def source_items(spec: DatasetSpec, folder: Path) -> list[SourceItem]:
    """Items as discovery makes them: the spec's globs minus excludes, one in every ``sample_every`` per
    folder, companions appended to the files, and the aligned RGB resolved from the spec's template."""
    options = spec.reader_options()
    excluded = {p for pattern in spec.exclude for p in folder.glob(pattern)}
    found = sorted({p for pattern in spec.files for p in folder.glob(pattern) if p.is_file()} - excluded)
    by_dir: dict[Path, list[Path]] = {}
    for p in found:
        by_dir.setdefault(p.parent, []).append(p)
    items = []
    for paths in by_dir.values():
        for p in paths[:: spec.sample_every]:
            item = SourceItem(dataset=spec.slug, root=folder, primary=p,
                              files=(p, *spec.reader.companions(p, options)),
                              key=p.relative_to(folder).with_suffix("").as_posix(),
                              stem_suffix=spec.stem_suffix)
            items.append(dataclasses.replace(item, rgb=item.resolve(spec.rgb) if spec.rgb else None))
    return items


def read(spec: DatasetSpec, item: SourceItem) -> RawCube:
    return spec.reader.read(item, spec.reader_options())


@pytest.fixture(params=SLUGS)
def written(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[DatasetSpec, Path, list[FixtureImage]]:
    slug = request.param
    return builtin_specs()[slug], tmp_path / slug, write_dataset(slug, tmp_path)


def assert_same(actual: np.ndarray, expected: np.ndarray) -> None:
    """Exact equality, except the PCA reconstruction whose float64 BLAS sums may differ in the last bit."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    if expected.dtype == np.float32:
        np.testing.assert_allclose(actual, expected, rtol=1e-6, atol=1e-7)
    else:
        np.testing.assert_array_equal(actual, expected)


def test_fixture_round_trip(written: tuple[DatasetSpec, Path, list[FixtureImage]]) -> None:
    spec, folder, truths = written
    items = {it.key: it for it in source_items(spec, folder)}
    assert sorted(items) == sorted(t.key for t in truths)
    for truth in truths:
        item = items[truth.key]
        raw = read(spec, item)
        assert raw.data.shape == truth.cube.shape and raw.data.dtype == truth.cube.dtype
        assert spec.bands == truth.cube.shape[0]
        assert_same(np.asarray(raw.data), truth.cube)
        assert_same(raw.data[2:5, 3:9, 1:7], truth.cube[2:5, 3:9, 1:7])
        if spec.wavelengths_from == "file":
            assert raw.wavelengths is not None and raw.wavelength_units == "nm"
            np.testing.assert_array_equal(raw.wavelengths, truth.wavelengths)
        else:
            assert raw.wavelengths is None
            np.testing.assert_array_equal(spec.wavelength_values(), truth.wavelengths)
        assert "dropped_cells_nonzero" not in raw.attrs  # the RedNIR fixture's 16th cell is all zero
        assert raw.rgb is None  # none of these files embeds an RGB; the spec's template finds it
        assert (item.rgb is not None) == truth.has_rgb
        if item.rgb is not None:
            assert load_rgb(item.rgb).shape == (*truth.cube.shape[1:], 3)


def test_cave_companions_are_the_other_bands_in_numeric_order(tmp_path: Path) -> None:
    spec = builtin_specs()["cave"]
    write_dataset("cave", tmp_path)
    (item, *_) = source_items(spec, tmp_path / "cave")
    obj = item.primary.name.split("_ms_")[0]
    assert [p.name for p in item.files] == [f"{obj}_ms_{b:02d}.png" for b in range(1, 32)]
    assert item.rgb is not None and item.rgb.name.endswith("_RGB.bmp")


def test_bandfolder_orders_numerically_and_reads_tiff(tmp_path: Path) -> None:
    import tifffile

    spec = builtin_specs()["cave"].model_copy(update={"options": {"pattern": r"_b(\d+)\.tif$"}})
    planes = np.arange(11 * 4 * 5, dtype=np.float32).reshape(11, 4, 5)
    for b, plane in enumerate(planes, start=1):
        tifffile.imwrite(tmp_path / f"scene_b{b}.tif", plane)  # unpadded: b10 sorts before b2 lexically
    item = SourceItem("x", tmp_path, tmp_path / "scene_b1.tif", (tmp_path / "scene_b1.tif",), "scene_b1")
    np.testing.assert_array_equal(np.asarray(read(spec, item).data), planes)


def test_hot_rednir_drops_the_zero_cell_and_vis_keeps_all() -> None:
    rednir, vis = (builtin_specs()[s].reader_options() for s in ("hot-2024-rednir", "hot-2024-vis"))
    assert isinstance(rednir, MosaicOptions) and isinstance(vis, MosaicOptions)
    assert (rednir.cell, rednir.keep_cells) == (4, 15) and (vis.cell, vis.keep_cells) == (4, None)


def mosaic_item(tmp_path: Path, frame: np.ndarray) -> SourceItem:
    path = tmp_path / "0000.png"
    Image.fromarray(frame).save(path)
    return SourceItem("hot-2024-vis", tmp_path, path, (path,), "0000")


def test_mosaic_crops_to_whole_cells_and_flags_nonzero_dropped_cells(tmp_path: Path) -> None:
    spec = builtin_specs()["hot-2024-rednir"]
    cube = np.arange(16 * 3 * 2, dtype=np.uint16).reshape(16, 3, 2) + 1
    frame = np.pad(mosaic(cube, 4), ((0, 3), (0, 2)), constant_values=7)  # 15 x 10 -> cropped to 12 x 8
    raw = read(spec, mosaic_item(tmp_path, frame))
    np.testing.assert_array_equal(np.asarray(raw.data), cube[:15])
    assert raw.attrs["mosaic_cropped_from_hw"] == [15, 10]
    assert raw.attrs["dropped_cells_nonzero"] is True


def test_hsd_rows_are_reconstructed_lazily(tmp_path: Path) -> None:
    spec = builtin_specs()["hyperspectral-city-v2"]
    truth = write_dataset("hyperspectral-city-v2", tmp_path)[0]
    (item, *_) = [it for it in source_items(spec, tmp_path / spec.slug) if it.key == truth.key]
    raw = read(spec, item)
    assert not isinstance(raw.data, np.ndarray)  # nothing reconstructed until sliced
    assert raw.attrs["n_components"] == 8 and "lossy" in raw.attrs["value_scale"]
    assert_same(raw.data[5, 7], truth.cube[5, 7])
    assert_same(raw.data[-1, 2:4, -3], truth.cube[-1, 2:4, -3])
    assert_same(raw.data[::3, 1:15:4, 20:], truth.cube[::3, 1:15:4, 20:])
    assert raw.wavelengths is not None
    np.testing.assert_allclose(raw.wavelengths[[0, -1]], [450.0, 950.0], atol=1e-3)


# ---- bad inputs ------------------------------------------------------------------------------------------


def cave_item(tmp_path: Path) -> tuple[DatasetSpec, SourceItem]:
    spec = builtin_specs()["cave"]
    write_dataset("cave", tmp_path)
    return spec, source_items(spec, tmp_path / "cave")[0]


def test_bandfolder_gap_names_the_missing_band(tmp_path: Path) -> None:
    spec, item = cave_item(tmp_path)
    (item.primary.parent / "balloons_ms_07.png").unlink()
    with pytest.raises(InputError) as err:
        read(spec, item)
    assert err.value.field == "files" and err.value.path.endswith("balloons_ms_07.png")


def test_bandfolder_duplicate_band_number_names_the_file(tmp_path: Path) -> None:
    spec, item = cave_item(tmp_path)
    shutil.copy(item.primary.parent / "balloons_ms_04.png", item.primary.parent / "balloons_ms_4.png")
    with pytest.raises(InputError) as err:
        read(spec, item)
    assert err.value.field == "files" and "band 4 appears twice" in err.value.problem


def test_bandfolder_odd_size_names_the_file(tmp_path: Path) -> None:
    spec, item = cave_item(tmp_path)
    Image.fromarray(np.zeros((24, 30), np.uint16)).save(item.primary.parent / "balloons_ms_12.png")
    with pytest.raises(InputError) as err:
        read(spec, item)
    assert err.value.field == "files" and err.value.path.endswith("balloons_ms_12.png")


def test_bandfolder_odd_dtype_names_the_file(tmp_path: Path) -> None:
    spec, item = cave_item(tmp_path)
    Image.fromarray(np.zeros((24, 32), np.uint8)).save(item.primary.parent / "balloons_ms_03.png")
    with pytest.raises(InputError) as err:
        read(spec, item)
    assert err.value.field == "files" and err.value.path.endswith("balloons_ms_03.png")


def test_bandfolder_pattern_not_matching_the_primary(tmp_path: Path) -> None:
    spec, item = cave_item(tmp_path)
    other = spec.model_copy(update={"options": {"pattern": r"_band(\d+)\.png$"}})
    assert other.reader.companions(item.primary, other.reader_options()) == []
    with pytest.raises(InputError) as err:
        read(other, item)
    assert err.value.field == "options.pattern"


def test_bandfolder_pattern_without_one_group_is_rejected() -> None:
    spec = builtin_specs()["cave"].model_copy(update={"options": {"pattern": r"_ms_\d+\.png$"}})
    with pytest.raises(InputError) as err:
        spec.reader_options()
    assert err.value.field == "options.pattern"


def test_mosaic_rgb_frame_is_rejected(tmp_path: Path) -> None:
    item = mosaic_item(tmp_path, np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(InputError) as err:
        read(builtin_specs()["hot-2024-vis"], item)
    assert err.value.field == "file" and "RGB" in err.value.problem


def test_mosaic_frame_smaller_than_a_cell_is_rejected(tmp_path: Path) -> None:
    item = mosaic_item(tmp_path, np.zeros((3, 40), np.uint8))
    with pytest.raises(InputError) as err:
        read(builtin_specs()["hot-2024-vis"], item)
    assert err.value.field == "file"


def test_mosaic_keep_cells_beyond_the_cell_count_is_rejected() -> None:
    spec = builtin_specs()["hot-2024-vis"].model_copy(update={"options": {"cell": 4, "keep_cells": 17}})
    with pytest.raises(InputError):
        spec.reader_options()


def hsd_item(path: Path) -> SourceItem:
    return SourceItem("hyperspectral-city-v2", path.parent, path, (path,), path.stem)


def test_hsd_truncated_file_reports_expected_and_actual_bytes(tmp_path: Path) -> None:
    path = tmp_path / "a.hsd"
    write_hsd(path, np.random.default_rng(0).random((10, 4, 5), dtype=np.float32), 3, 450, 50.0, 900)
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size - 10)
    with pytest.raises(InputError) as err:
        read(builtin_specs()["hyperspectral-city-v2"], hsd_item(path))
    assert err.value.field == "file"
    assert str(size) in err.value.problem and str(size - 10) in err.value.problem


def test_hsd_shorter_than_its_header_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "a.hsd"
    path.write_bytes(b"\x01\x00\x00\x00")
    with pytest.raises(InputError) as err:
        read(builtin_specs()["hyperspectral-city-v2"], hsd_item(path))
    assert err.value.field == "file"


def test_hsd_end_wavelength_disagreeing_with_start_and_step(tmp_path: Path) -> None:
    path = tmp_path / "a.hsd"
    write_hsd(path, np.random.default_rng(0).random((10, 4, 5), dtype=np.float32), 3, 450, 50.0, 1000)
    with pytest.raises(InputError) as err:
        read(builtin_specs()["hyperspectral-city-v2"], hsd_item(path))
    assert err.value.field == "header.end wavelength"


def test_hsd_nonpositive_header_size_is_rejected(tmp_path: Path) -> None:
    src = tmp_path / "a.hsd"
    write_hsd(src, np.random.default_rng(0).random((10, 4, 5), dtype=np.float32), 3, 450, 50.0, 900)
    bad = tmp_path / "b.hsd"
    shutil.copy(src, bad)
    with open(bad, "r+b") as f:
        f.seek(12)
        f.write(np.int32(0).tobytes())
    with pytest.raises(InputError) as err:
        read(builtin_specs()["hyperspectral-city-v2"], hsd_item(bad))
    assert err.value.field == "header.components"
