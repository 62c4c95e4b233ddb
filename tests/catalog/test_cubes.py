"""Cube chunk storage: every layout round-trips through the direct reader and zarr-python, every chunk read is
checksummed (a flipped byte that still decodes is caught), dtypes narrow losslessly, old layouts still read."""

from __future__ import annotations

import os
from pathlib import Path

import numcodecs.blosc
import numpy as np
import pytest
import xarray as xr
import zarr
from zarr.codecs import BloscCodec, BloscShuffle

from base.errors import CorruptChunkError
from catalog.catalog import Catalog
from catalog.cubes.dtypes import lossless_dtype
from catalog.cubes.layout import CubeLayout
from catalog.cubes.writer import CubeWrite

LAYOUTS = [
    CubeLayout(chunk_xy=16),  # the default: one shard per image here
    CubeLayout(chunk_xy=16, shard_xy=0),
    CubeLayout(chunk_xy=16, band_group=5, shard_xy=0),
    CubeLayout(chunk_xy=8, shard_xy=32),
    CubeLayout(chunk_xy=16, band_group=4, shard_xy=32, codec="lz4", shuffle="bit"),
    CubeLayout(chunk_xy=16, shard_xy=0, codec="zstd", level=2, shuffle="byte"),
    CubeLayout(chunk_xy=16, shard_xy=0, checksum=False),
]


def _cube(shape: tuple[int, int, int] = (12, 40, 50), seed: int = 0, dtype: str = "uint16") -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 4000, size=shape).astype(dtype)


def _write(cat: Catalog, data: np.ndarray, image: str = "img", store_dtype: np.dtype | None = None,
           rgb: np.ndarray | None = None, fwhm: np.ndarray | None = None) -> dict:
    return cat.write_cube(CubeWrite(
        dataset="ds", image_id=f"ds/{image}", key=image, sha256=image.ljust(64, "0"), data=data,
        wavelength_nm=np.linspace(400, 700, data.shape[0]), attrs={"source_path": f"/src/{image}.npy"},
        rgb=rgb, store_dtype=store_dtype, fwhm_nm=fwhm))


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda lay: lay.label())
def test_every_layout_round_trips_through_both_readers(tmp_path: Path, layout: CubeLayout) -> None:
    cat = Catalog(tmp_path / "cat", layout=layout, read_threads=2).init()
    data = _cube()
    rgb = np.random.default_rng(1).integers(0, 255, (40, 50, 3)).astype(np.uint8)
    loc = _write(cat, data, rgb=rgb)["location"]
    np.testing.assert_array_equal(cat.read_image("ds/img"), data)
    np.testing.assert_array_equal(cat.read_crop(loc, 7, 9, 20), data[:, 7:27, 9:29])
    np.testing.assert_array_equal(cat.read_crop(loc, 30, 40, 20), data[:, 30:, 40:])  # clipped at the edge
    np.testing.assert_array_equal(cat.read_crop(loc, 3, 5, 17, bands=[0, 2, 3, 9]), data[[0, 2, 3, 9], 3:20, 5:22])
    np.testing.assert_array_equal(cat.read_rgb_crop(loc, 5, 6, 16), rgb[5:21, 6:22])
    f32 = cat.read_crop(loc, 1, 2, 30, dtype=np.float32)
    assert f32.dtype == np.float32 and np.array_equal(f32, data[:, 1:31, 2:32].astype(np.float32))
    # what the catalog writes is plain Zarr v3: zarr-python reads the same values and checks the same checksums
    arr = zarr.open_group(str(tmp_path / "cat" / loc), mode="r")["cube"]
    assert isinstance(arr, zarr.Array)
    np.testing.assert_array_equal(arr[...], data)
    da = cat.open("ds/img")
    np.testing.assert_array_equal(da.isel(band=slice(2, 9, 3), y=slice(4, 30), x=[1, 7, 3]).values,
                                  data[2:9:3, 4:30][:, :, [1, 7, 3]])
    assert int(da[3, 10, 11]) == int(data[3, 10, 11]) and da.attrs["layout"]["chunk_xy"] == layout.chunk_xy
    assert cat.verify().healthy


def test_batches_decode_shared_chunks_once_and_pad_at_the_edge(tmp_path: Path) -> None:
    cat = Catalog(tmp_path / "cat", layout=CubeLayout(chunk_xy=16), read_threads=2, chunk_cache_mb=0).init()
    a, b = _cube(seed=1), _cube(seed=2)
    la, lb = _write(cat, a, "a")["location"], _write(cat, b, "b")["location"]
    batch = cat.read_batch([(la, 0, 0), (lb, 30, 35), (la, 8, 8)], 24, bands=[1, 4, 5, 6])
    assert batch.shape == (3, 4, 24, 24) and batch.dtype == np.float32
    np.testing.assert_array_equal(batch[0], a[[1, 4, 5, 6], :24, :24])
    np.testing.assert_array_equal(batch[1, :, :10, :15], b[[1, 4, 5, 6], 30:, 35:])
    assert not batch[1, :, 10:].any() and not batch[1, :, :, 15:].any()
    np.testing.assert_array_equal(batch[2], a[[1, 4, 5, 6], 8:32, 8:32])


def test_chunk_cache_serves_overlapping_crops(tmp_path: Path) -> None:
    cat = Catalog(tmp_path / "cat", layout=CubeLayout(chunk_xy=16), chunk_cache_mb=1).init()
    data = _cube()
    loc = _write(cat, data)["location"]
    cat.read_crop(loc, 0, 0, 32)
    misses = cat.cubes.cache.misses
    np.testing.assert_array_equal(cat.read_crop(loc, 4, 4, 20), data[:, 4:24, 4:24])
    assert cat.cubes.cache.misses == misses and cat.cubes.cache.hits >= 4


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([byte[0] ^ 0x10]))


FLIPPABLE = [CubeLayout(chunk_xy=16, shard_xy=0), CubeLayout(chunk_xy=16, shard_xy=0, codec="lz4"),
             CubeLayout(chunk_xy=8, shard_xy=16)]


@pytest.mark.parametrize("layout", FLIPPABLE, ids=lambda lay: lay.label())
def test_a_flipped_byte_is_caught_on_every_read_path(tmp_path: Path, layout: CubeLayout) -> None:
    cat = Catalog(tmp_path / "cat", layout=layout, chunk_cache_mb=0).init()
    data = _cube()
    loc = _write(cat, data)["location"]
    chunk_file = tmp_path / "cat" / loc / "cube" / "c" / "0" / "1" / "1"
    if layout.codec == "lz4":  # a byte of the compressed payload's literals: it still decodes, to wrong values
        raw = chunk_file.read_bytes()
        body = numcodecs.blosc.decompress(raw[:-4])
        _flip(chunk_file, len(raw) - 100)
        with open(chunk_file, "rb") as fh:
            assert numcodecs.blosc.decompress(fh.read()[:-4]) != body
    else:
        _flip(chunk_file, 123)
    with pytest.raises(CorruptChunkError) as err:
        cat.read_crop(loc, 16, 16, 8)
    first_inner = (0, 2, 2) if layout.shard_xy else (0, 1, 1)  # the shard file's first inner chunk
    assert err.value.image_id == "ds/img" and err.value.array == "cube" and err.value.chunk == first_inner
    assert err.value.path == str(chunk_file) and "verify --repair" in str(err.value)
    with pytest.raises(CorruptChunkError):
        cat.open("ds/img").values  # noqa: B018
    with pytest.raises(CorruptChunkError):
        cat.read_batch([(loc, 10, 10)], 16)
    np.testing.assert_array_equal(cat.read_crop(loc, 0, 0, 16), data[:, :16, :16])  # other chunks still read


def test_truncated_and_undecodable_chunks_name_the_problem(tmp_path: Path) -> None:
    cat = Catalog(tmp_path / "cat", layout=CubeLayout(chunk_xy=16, shard_xy=0, codec="lz4", checksum=False)).init()
    loc = _write(cat, _cube())["location"]
    chunk_file = tmp_path / "cat" / loc / "cube" / "c" / "0" / "0" / "0"
    chunk_file.write_bytes(chunk_file.read_bytes()[:40])
    with pytest.raises(CorruptChunkError, match="cannot be decoded"):
        cat.read_crop(loc, 0, 0, 8)


def test_layout_1_catalogs_still_read(tmp_path: Path) -> None:
    """Groups written before layout 2 (Blosc lz4 + bitshuffle, no checksum, no layout attrs) read as before."""
    cat = Catalog(tmp_path / "cat").init()
    data = _cube()
    loc = _write(cat, data)["location"]
    group = zarr.open_group(str(tmp_path / "cat" / loc), mode="r+")
    del group["cube"]
    old = group.create_array("cube", shape=data.shape, chunks=(12, 64, 64), dtype=data.dtype, fill_value=0,
                             compressors=BloscCodec(cname="lz4", clevel=5, shuffle=BloscShuffle.bitshuffle),
                             dimension_names=("band", "y", "x"))
    old[...] = data
    attrs = dict(group.attrs)
    for key in ("layout_version", "layout", "source_dtype"):
        attrs.pop(key)
    group.attrs.clear()
    group.attrs.update(attrs)
    fresh = Catalog(tmp_path / "cat")
    np.testing.assert_array_equal(fresh.read_crop(loc, 5, 5, 30), data[:, 5:35, 5:35])
    np.testing.assert_array_equal(fresh.open("ds/img").values, data)


def test_integer_valued_floats_are_stored_as_integers(tmp_path: Path) -> None:
    cat = Catalog(tmp_path / "cat", layout=CubeLayout(chunk_xy=16)).init()
    counts = _cube().astype(np.float64)  # a MATLAB double holding 12-bit counts
    row = _write(cat, counts, store_dtype=lossless_dtype(counts, counts.dtype))
    da = cat.open("ds/img")
    assert row["dtype"] == "u2" and da.dtype == np.uint16 and da.attrs["source_dtype"] == "<f8"
    np.testing.assert_array_equal(da.values, counts)
    assert lossless_dtype(np.array([0.5, 1.25]), np.dtype(np.float64)) == np.float32
    assert lossless_dtype(np.array([0.1, 1.0]), np.dtype(np.float64)) == np.float64
    assert lossless_dtype(np.array([-3, 100]), np.dtype(np.int64)) == np.int8
    assert lossless_dtype(np.array([0.0, np.nan]), np.dtype(np.float32)) == np.float32


def test_a_too_narrow_guess_widens_and_stays_lossless(tmp_path: Path) -> None:
    cat = Catalog(tmp_path / "cat", layout=CubeLayout(chunk_xy=8)).init()
    data = _cube(dtype="float64")
    data[:, :20] = np.round(data[:, :20] / 100)  # the top looks like bytes
    data[5, 33, 40] = 70000.0  # one value needs 32 bits
    row = _write(cat, data, "wide", store_dtype=np.dtype(np.uint8))
    assert row["dtype"] == "u4"
    np.testing.assert_array_equal(cat.read_image("ds/wide"), data)
    frac = _cube(seed=4, dtype="float64")
    frac[7, 39, 49] = 0.1  # not an integer, not exact in float32
    assert _write(cat, frac, "frac", store_dtype=np.dtype(np.uint16))["dtype"] == "f8"
    np.testing.assert_array_equal(cat.read_image("ds/frac"), frac)
    assert not any(".tmp-" in p for p in os.listdir(tmp_path / "cat" / "cubes" / "ds"))


def test_matlab_double_counts_ingest_as_integers(tmp_path: Path) -> None:
    """An Indian Pines-like MAT v5 file (class double, integer counts) lands as uint16, not float64."""
    import scipy.io

    from catalog.specs import parse_spec
    from stages.ingest import ingest_item
    from stages.ingest.discover import item_for

    folder = tmp_path / "src" / "pines"
    folder.mkdir(parents=True)
    counts = np.random.default_rng(0).integers(955, 9604, (20, 24, 30)).astype(np.float64)  # y, x, band
    scipy.io.savemat(folder / "pines.mat", {"cube": counts})
    spec = parse_spec({"name": "pines", "format": "matlab", "files": "*.mat", "options": {"key": "cube"},
                       "wavelengths_nm": {"start": 400, "stop": 2500, "count": 30}}, "<test>")
    cat = Catalog(tmp_path / "cat").init()
    res = ingest_item(cat, spec, item_for(folder, spec, "pines.mat"))
    assert res.status == "ingested"
    row = cat.row("pines/pines")
    assert row["dtype"] == "u2"
    np.testing.assert_array_equal(cat.read_image("pines/pines"), counts.transpose(2, 0, 1))


def test_remote_catalogs_use_the_same_reader(tmp_path: Path) -> None:
    cat = Catalog("memory://hvp-cubes-test/cat", layout=CubeLayout(chunk_xy=16, shard_xy=32)).init()
    data = _cube()
    loc = _write(cat, data)["location"]
    np.testing.assert_array_equal(cat.read_crop(loc, 5, 7, 30), data[:, 5:35, 7:37])
    np.testing.assert_array_equal(cat.open("ds/img").values, data)


def test_band_coordinates_decode_in_plain_xarray_and_old_groups_still_read(tmp_path: Path) -> None:
    """``wavelength`` and ``fwhm`` are coordinates of ``band`` for plain ``xarray.open_zarr`` as for the catalog;
    a group written before the cube named them (no ``coordinates`` attribute) still opens with both."""
    cat = Catalog(tmp_path / "cat", layout=CubeLayout(chunk_xy=16)).init()
    data, fwhm = _cube(), np.linspace(5, 8, 12)
    loc = _write(cat, data, fwhm=fwhm)["location"]
    ds = xr.open_zarr(str(tmp_path / "cat" / loc), consolidated=False)
    assert list(ds.data_vars) == ["cube"] and ds["cube"].dtype == np.uint16
    for da in (ds["cube"], cat.open("ds/img")):
        assert da.dims == ("band", "y", "x") and "coordinates" not in da.attrs
        assert da["wavelength"].dims == da["fwhm"].dims == ("band",) and da["wavelength"].attrs["units"] == "nm"
        np.testing.assert_array_equal(da["wavelength"].values, np.linspace(400, 700, 12))
        np.testing.assert_array_equal(da["fwhm"].values, fwhm)
        np.testing.assert_array_equal(da.values, data)
    no_fwhm = _write(cat, data, "plain")["location"]
    plain = zarr.open_group(str(tmp_path / "cat" / no_fwhm), mode="r")["cube"]
    assert plain.attrs["coordinates"] == "wavelength" and "fwhm" not in cat.open("ds/plain").coords
    # the old form: the same group without the attribute (the chunks are the same bytes either way)
    old = zarr.open_group(str(tmp_path / "cat" / loc), mode="r+")["cube"]
    del old.attrs["coordinates"]
    assert sorted(xr.open_zarr(str(tmp_path / "cat" / loc), consolidated=False).data_vars) == [
        "cube", "fwhm", "wavelength"]
    da = Catalog(tmp_path / "cat").open("ds/img")
    assert set(da.coords) == {"wavelength", "fwhm"} and da["wavelength"].dims == ("band",)
    np.testing.assert_array_equal(da["fwhm"].values, fwhm)


def test_the_catalog_layer_imports_no_torch() -> None:
    """Device batches are the pretraining stage's; the catalog (cubes included) loads without torch."""
    import subprocess
    import sys

    code = ("import sys, catalog.catalog, catalog.cubes.reader, catalog.cubes.writer, catalog.cubes.xarray_view; "
            "print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2], capture_output=True,
                          text=True, check=False)
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stderr
