"""The matlab, hdf5 and npy readers against their datasets' seeded fixtures; the bad inputs they reject."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.io

from base.errors import InputError
from catalog.fixtures import write_dataset
from catalog.fixtures.base import FixtureImage
from catalog.fixtures.matlab import write_mat_v5, write_mat_v73
from catalog.fixtures.synth import rgb_preview
from catalog.readers.base import AxisView, BandSubset, RawCube, Reader, ReaderOptions, SourceItem
from catalog.readers.hdf5 import H5Array, Hdf5Options, Hdf5Reader
from catalog.readers.matlab import MatlabOptions, MatlabReader
from catalog.readers.npy import NpyOptions, NpyReader
from catalog.specs import DatasetSpec, builtin_specs, parse_spec

MATLAB_V5 = ["50-outdoor", "harvard", "hyko-v2-nir", "hyko-v2-vis", "um-emm", "um-ld-2015", "um-ns-2002",
             "um-ns-2004", "um-os", "um-ri-2015"]
MATLAB_V73 = ["arad1k16", "arad1k31", "hsodbit-v2", "icvl"]
HDF5 = ["hssod"]
NPY = ["aphid", "hsi-drive-v2-0", "hyperdrive-vnir"]
LAZY = set(MATLAB_V73) | set(HDF5) | {"aphid", "hsi-drive-v2-0"}


def source_items(folder: Path, spec: DatasetSpec) -> list[SourceItem]:
    """Every item of a dataset folder: the spec's globs minus its excludes, with companions and the RGB."""
    found = {p for pattern in spec.files for p in folder.glob(pattern) if p.is_file()}
    found -= {p for pattern in spec.exclude for p in folder.glob(pattern)}
    options = spec.reader_options()
    items = []
    for primary in sorted(found):
        key = primary.relative_to(folder).with_suffix("").as_posix()
        item = SourceItem(dataset=spec.slug, root=folder, primary=primary, files=(primary,), key=key,
                          stem_suffix=spec.stem_suffix)
        items.append(dataclasses.replace(item, files=(primary, *spec.reader.companions(primary, options)),
                                         rgb=item.resolve(spec.rgb) if spec.rgb else None))
    return items


def save_mat(path: Path, variables: dict[str, np.ndarray], version: str) -> None:
    """Write a v5 or v7.3 MAT-file of ``variables`` (arrays in MATLAB's axis order)."""
    if version == "7.3":
        write_mat_v73(path, variables)
    else:
        write_mat_v5(path, variables)


def one_item(path: Path) -> SourceItem:
    """A SourceItem for a single ad-hoc file."""
    return SourceItem(dataset="adhoc", root=path.parent, primary=path, files=(path,), key=path.stem)


def read_fixture(slug: str, tmp_path: Path) -> list[tuple[FixtureImage, SourceItem, RawCube]]:
    """Write a dataset's fixture and read every image with the spec's reader and options."""
    spec = builtin_specs()[slug]
    truth = write_dataset(slug, tmp_path)
    items = {item.key: item for item in source_items(tmp_path / slug, spec)}
    assert sorted(items) == sorted(image.key for image in truth)
    return [(image, items[image.key], spec.reader.read(items[image.key], spec.reader_options()))
            for image in truth]


def bad(reader: Reader, path: Path, options: ReaderOptions, field: str) -> InputError:
    """Reading ``path`` must fail with an InputError naming the file and ``field``."""
    with pytest.raises(InputError) as info:
        reader.read(one_item(path), options)
    assert info.value.field == field, str(info.value)
    assert info.value.path == str(path) and info.value.fix
    return info.value


@pytest.mark.parametrize("slug", MATLAB_V5 + MATLAB_V73 + HDF5 + NPY)
def test_reads_fixture_exactly(slug: str, tmp_path: Path) -> None:
    spec = builtin_specs()[slug]
    for image, item, raw in read_fixture(slug, tmp_path):
        kept = spec.band_range
        data = BandSubset(raw.data, kept.start, kept.stop) if kept else raw.data
        assert data.shape == image.cube.shape
        assert data.dtype == image.cube.dtype
        assert spec.bands == image.cube.shape[0]
        np.testing.assert_array_equal(data[:], image.cube)
        np.testing.assert_array_equal(data[2:5, 3:9, 1:7], image.cube[2:5, 3:9, 1:7])
        if raw.wavelengths is not None:
            np.testing.assert_allclose(raw.wavelengths, image.wavelengths)
        assert image.has_rgb == (item.rgb is not None or raw.rgb is not None)
        if slug in LAZY:
            assert isinstance(raw.data, AxisView)
            assert isinstance(raw.data.source, H5Array | np.memmap)


def test_v73_layout_is_matlab_order_reversed(tmp_path: Path) -> None:
    (image, item, raw), *_ = read_fixture("arad1k31", tmp_path)
    with h5py.File(item.primary, "r") as f:
        assert f["cube"].shape == (31, image.cube.shape[2], image.cube.shape[1])  # MATLAB (y, x, b) reversed
        assert f["cube"].attrs["MATLAB_class"] == b"single"
    assert item.primary.read_bytes()[:10] == b"MATLAB 7.3"
    assert raw.attrs["matlab_version"] == "7.3"
    with h5py.File(item.primary, "a"):  # the lazy cube holds no open handle
        pass


def test_icvl_rgb_and_wavelengths_come_from_the_file(tmp_path: Path) -> None:
    for image, _, raw in read_fixture("icvl", tmp_path):
        assert raw.rgb is not None and raw.rgb.dtype == np.uint8
        np.testing.assert_array_equal(raw.rgb, rgb_preview(image.cube))  # (y, x, 3), exactly as stored
        assert raw.wavelengths is not None
        np.testing.assert_array_equal(raw.wavelengths, np.linspace(400, 700, 31))


def test_um_files_hold_a_distractor_cube(tmp_path: Path) -> None:
    (image, item, raw), *_ = read_fixture("um-os", tmp_path)
    other = scipy.io.loadmat(item.primary)["radiances"]
    assert other.shape == raw.data.shape[1:] + raw.data.shape[:1]
    assert not np.array_equal(np.transpose(other, (2, 0, 1)), image.cube)
    bad(MatlabReader(), item.primary, MatlabOptions(), "options.key")


def test_npz_keeps_float16_and_all_33_channels(tmp_path: Path) -> None:
    read = read_fixture("hyperdrive-vnir", tmp_path)
    assert read, "the hyperdrive-vnir fixture wrote no image"
    for image, _, raw in read:
        assert raw.data.shape == (33, *image.cube.shape[1:]) and raw.data.dtype == np.float16


# --- MATLAB: keys, versions, options ------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["5", "7.3"])
def test_mat_key_auto_detection(version: str, tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    cube = rng.random((6, 7, 5))
    path = tmp_path / "a.mat"
    variables: dict[str, np.ndarray] = {"label": rng.integers(0, 3, (6, 7)).astype(np.uint8), "hsi": cube}
    save_mat(path, variables, version)
    raw = MatlabReader().read(one_item(path), MatlabOptions())
    np.testing.assert_array_equal(raw.data[:], cube.transpose(2, 0, 1))
    assert raw.attrs["key"] == "hsi"

    variables["radiance"] = cube * 2
    save_mat(path, variables, version)
    err = bad(MatlabReader(), path, MatlabOptions(), "options.key")
    assert "hsi" in err.fix and "radiance" in err.fix
    err = bad(MatlabReader(), path, MatlabOptions(key="ref"), "options.key")
    assert "no variable 'ref'" in err.problem and "hsi" in err.fix
    bad(MatlabReader(), path, MatlabOptions(key="label"), "options.axes")
    bad(MatlabReader(), path, MatlabOptions(key="hsi", axes="yxz"), "options.axes")
    bad(MatlabReader(), path, MatlabOptions(key="hsi", rgb_key="rgb"), "options.rgb_key")


@pytest.mark.parametrize("version", ["5", "7.3"])
def test_mat_axes_rgb_and_wavelengths(version: str, tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    cube = rng.random((5, 6, 7)).astype(np.float32)  # (band, x, y) as MATLAB shows it
    rgb = rng.random((7, 6, 3))
    path = tmp_path / "b.mat"
    wavelengths = np.arange(500.0, 505.0)
    variables: dict[str, np.ndarray] = {"c": cube, "img": rgb, "wavelengths": wavelengths[None, :]}
    save_mat(path, variables, version)
    raw = MatlabReader().read(one_item(path), MatlabOptions(key="c", axes="bxy", rgb_key="img"))
    assert raw.data.shape == (5, 7, 6) and raw.data.dtype == np.float32
    np.testing.assert_array_equal(raw.data[1:3, 2:5, 0:4], cube.transpose(0, 2, 1)[1:3, 2:5, 0:4])
    assert raw.rgb is not None and raw.rgb.dtype == np.uint8
    np.testing.assert_array_equal(raw.rgb, np.round(rgb * 255).astype(np.uint8))
    assert raw.wavelengths is not None and raw.wavelength_units is None
    np.testing.assert_array_equal(raw.wavelengths, wavelengths)

    variables["wavelengths"] = np.arange(4.0)[None, :]
    variables["img"] = rgb * 300
    save_mat(path, variables, version)
    assert MatlabReader().read(one_item(path), MatlabOptions(key="c", axes="bxy")).wavelengths is None
    bad(MatlabReader(), path, MatlabOptions(key="c", axes="bxy", rgb_key="img"), "options.rgb_key")
    bad(MatlabReader(), path, MatlabOptions(key="c", axes="yxb", rgb_key="img"), "options.rgb_key")


@pytest.mark.parametrize("version", ["5", "7.3"])
def test_truncated_mat(version: str, tmp_path: Path) -> None:
    path = tmp_path / "t.mat"
    variables: dict[str, np.ndarray] = {"cube": np.random.default_rng(3).random((8, 9, 10))}
    save_mat(path, variables, version)
    whole = path.read_bytes()
    for size in (300, 600, len(whole) // 2, len(whole) - 8):
        path.write_bytes(whole[:size])
        bad(MatlabReader(), path, MatlabOptions(key="cube"), "file")


def test_not_a_mat_file(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    path = tmp_path / "x.mat"
    path.write_bytes(b"MATLAB 5.0 MAT-file" + rng.bytes(300))
    bad(MatlabReader(), path, MatlabOptions(key="ref"), "file")
    path.write_text("hello, not a mat file\n" * 20)
    bad(MatlabReader(), path, MatlabOptions(key="ref"), "file")
    bad(MatlabReader(), tmp_path / "missing.mat", MatlabOptions(key="ref"), "file")


def test_compressed_v5_is_read(tmp_path: Path) -> None:
    (image, item, raw), *_ = read_fixture("um-ns-2004", tmp_path)
    assert raw.attrs["matlab_version"] == "5"
    np.testing.assert_array_equal(raw.data[:], image.cube)


def test_matlab_options_are_strict() -> None:
    spec = builtin_specs()["harvard"]
    entry = {**spec.model_dump(exclude={"slug"}, exclude_none=True), "options": {"kee": "ref"}}
    with pytest.raises(InputError) as info:
        parse_spec(entry, "dataset.yaml")
    assert info.value.field == "options.kee"


# --- HDF5 ---------------------------------------------------------------------------------------------------


def test_hdf5_options_key_wavelengths_and_bad_inputs(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    cube = rng.integers(0, 4000, (6, 9, 7)).astype(np.uint16)  # (band, y, x)
    path = tmp_path / "c.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("data/cube", data=cube.transpose(2, 1, 0), chunks=(3, 3, 2), compression="gzip")
        f["data/wl"] = np.linspace(0.4, 0.9, 6)
        f["data/mask"] = np.zeros((9, 7), np.uint8)
    reader = Hdf5Reader()
    raw = reader.read(one_item(path), Hdf5Options(key="data/cube", axes="xyb", wavelength_key="data/wl",
                                                  wavelength_units="um"))
    np.testing.assert_array_equal(raw.data[:], cube)
    np.testing.assert_array_equal(raw.data[2:5, 3:9, 1:7], cube[2:5, 3:9, 1:7])
    assert raw.wavelength_units == "um" and raw.wavelengths is not None
    np.testing.assert_allclose(raw.wavelengths, np.linspace(0.4, 0.9, 6))

    err = bad(reader, path, Hdf5Options(key="cube", axes="xyb"), "options.key")
    assert "data/cube" in err.fix
    bad(reader, path, Hdf5Options(key="data", axes="xyb"), "options.key")
    bad(reader, path, Hdf5Options(key="data/mask", axes="xyb"), "options.axes")
    for wl_key in ("data/mask", "nope"):
        options = Hdf5Options(key="data/cube", axes="xyb", wavelength_key=wl_key)
        bad(reader, path, options, "options.wavelength_key")
    with pytest.raises(ValueError, match="wavelength_key"):
        Hdf5Options(key="data/cube", axes="xyb", wavelength_units="nm")

    whole = path.read_bytes()
    for size in (4, 1000, len(whole) - 16):
        path.write_bytes(whole[:size])
        bad(reader, path, Hdf5Options(key="data/cube", axes="xyb"), "file")


# --- NPY / NPZ ----------------------------------------------------------------------------------------------


def test_npy_bad_inputs(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    reader = NpyReader()
    path = tmp_path / "g.npy"
    path.write_bytes(rng.bytes(500))
    bad(reader, path, NpyOptions(), "file")
    path.write_bytes(b"\x93NUMPY" + rng.bytes(500))
    bad(reader, path, NpyOptions(), "file")
    np.save(path, rng.random((6, 7, 8)))
    path.write_bytes(path.read_bytes()[:200])
    bad(reader, path, NpyOptions(), "file")
    np.save(path, rng.random((6, 7)))
    bad(reader, path, NpyOptions(), "options.axes")
    np.save(path, np.array(["a", "b"]))
    bad(reader, path, NpyOptions(), "file")
    np.save(path, rng.random((6, 7, 8)))
    bad(reader, path, NpyOptions(axes="yx"), "options.axes")


def test_npz_keys(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    reader = NpyReader()
    cube = rng.random((6, 7, 8)).astype(np.float32)
    path = tmp_path / "z.npz"
    np.savez(path, cube=cube, mask=np.zeros((6, 7)))
    raw = reader.read(one_item(path), NpyOptions())
    np.testing.assert_array_equal(raw.data[:], cube.transpose(2, 0, 1))
    err = bad(reader, path, NpyOptions(key="hsi"), "options.key")
    assert "cube" in err.fix and "mask" in err.fix
    bad(reader, path, NpyOptions(key="mask"), "options.axes")
    np.savez_compressed(path, cube=cube, other=cube + 1)
    err = bad(reader, path, NpyOptions(), "options.key")
    assert "other" in err.fix
    np.testing.assert_array_equal(reader.read(one_item(path), NpyOptions(key="other")).data[:],
                                  (cube + 1).transpose(2, 0, 1))
    path.write_bytes(path.read_bytes()[:300])
    bad(reader, path, NpyOptions(key="cube"), "file")
