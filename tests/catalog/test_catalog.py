"""The cube store and index: lossless round trip, lazy reads, atomic commits, concurrency, verify."""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
from pathlib import Path

import numpy as np
import pytest
import zarr

from catalog.catalog import Catalog
from catalog.cubes.writer import CubeWrite


def _cube(seed: int = 0, shape: tuple[int, int, int] = (12, 40, 50), dtype: str = "uint16") -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 4000, size=shape).astype(dtype)


def _write(cat: Catalog, image: str, data: np.ndarray, sha: str = "a" * 64, rgb: np.ndarray | None = None) -> dict:
    wl = np.linspace(400, 700, data.shape[0])
    return cat.write_cube(CubeWrite(dataset="ds", image_id=f"ds/{image}", key=image, sha256=sha, data=data,
                                    wavelength_nm=wl, attrs={"source_path": f"/src/{image}.npy", "reader": "npy"},
                                    rgb=rgb))


def test_round_trip_is_lossless_and_lazy(tmp_path: Path) -> None:
    cat = Catalog(tmp_path / "cat", chunk_xy=16).init()
    data = _cube()
    rgb = np.zeros((40, 50, 3), np.uint8)
    rgb[..., 1] = 200
    row = _write(cat, "scene/one", data, rgb=rgb)
    assert row["location"] == "cubes/ds/scene/one@aaaaaaaaaaaa.zarr"
    da = cat.open("ds/scene/one")
    assert da.dims == ("band", "y", "x") and da.dtype == np.uint16
    np.testing.assert_allclose(da["wavelength"].values, np.linspace(400, 700, 12))
    np.testing.assert_array_equal(da.values, data)
    np.testing.assert_array_equal(da.isel(y=slice(5, 21), x=slice(3, 19)).values, data[:, 5:21, 3:19])
    np.testing.assert_array_equal(cat.read_crop(row["location"], 7, 9, 16), data[:, 7:23, 9:25])
    np.testing.assert_array_equal(cat.rgb("ds/scene/one"), rgb)
    arr = zarr.open_group(str(tmp_path / "cat" / row["location"]), mode="r")["cube"]
    assert arr.chunks == (12, 16, 16)  # all bands per chunk: one chunk read per spatial tile
    df = cat.images()
    assert list(df["image_id"]) == ["ds/scene/one"] and df.iloc[0]["bands"] == 12 and bool(df.iloc[0]["has_rgb"])
    assert cat.verify().healthy and cat.verify().ok == 1


def test_rewrite_same_content_reuses_cube_and_new_content_keeps_old(tmp_path: Path) -> None:
    cat = Catalog(tmp_path / "cat").init()
    first = _write(cat, "img", _cube(0), sha="1" * 64)
    _write(cat, "img", _cube(0), sha="1" * 64)
    second = _write(cat, "img", _cube(1), sha="2" * 64)
    assert first["location"] != second["location"]
    np.testing.assert_array_equal(cat.open("ds/img").values, _cube(1))  # latest ingest wins
    report = cat.verify()
    assert report.healthy and report.orphans == [first["location"]]  # the old cube is kept, reported, not damaged


def test_failed_write_leaves_nothing_behind(tmp_path: Path) -> None:
    cat = Catalog(tmp_path / "cat", chunk_xy=8).init()
    good = _write(cat, "good", _cube(0))
    bad = _cube(1).astype(np.float32)
    bad[3, 30, 4] = np.nan
    with pytest.raises(ValueError, match="row 30"):
        _write(cat, "bad", bad, sha="b" * 64)
    assert list(cat.images()["image_id"]) == ["ds/good"]
    assert not any(".tmp-" in p for p in os.listdir(tmp_path / "cat" / "cubes" / "ds"))
    np.testing.assert_array_equal(cat.open("ds/good").values, _cube(0))
    assert cat.verify().healthy and good["location"]


def test_verify_detects_corruption_missing_and_partial(tmp_path: Path) -> None:
    cat = Catalog(tmp_path / "cat", chunk_xy=16).init()
    a = _write(cat, "a", _cube(0), sha="a" * 64)
    b = _write(cat, "b", _cube(1), sha="b" * 64)
    arr = zarr.open_group(str(tmp_path / "cat" / a["location"]), mode="r+")["cube"]
    arr[0, 0, 0] = arr[0, 0, 0] + 1
    import shutil

    shutil.rmtree(tmp_path / "cat" / b["location"])
    (tmp_path / "cat" / "cubes" / "ds" / "c@cccccccccccc.zarr.tmp-1234").mkdir()  # no lease: its writer is gone
    report = cat.verify()
    assert report.corrupt == ["ds/a"] and report.missing == ["ds/b"] and not report.healthy
    assert report.stale == ["cubes/ds/c@cccccccccccc.zarr.tmp-1234"]


def _writer_process(root: str, prefix: str, n: int) -> None:
    cat = Catalog(root, chunk_xy=16)
    for i in range(n):
        _write(cat, f"{prefix}{i}", _cube(i, (4, 16, 16)), sha=f"{prefix}{i}".ljust(64, "0"))
        if i % 3 == 0:
            cat.compact()


def test_two_processes_writing_and_compacting_lose_no_row(tmp_path: Path) -> None:
    root = str(tmp_path / "cat")
    Catalog(root).init()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer_process, args=(root, p, 12)) for p in ("x", "y")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    cat = Catalog(root)
    assert len(cat.images()) == 24
    cat.compact()
    assert len(cat.images()) == 24 and len(list((tmp_path / "cat" / "index").glob("part-*.parquet"))) == 1
    assert cat.verify().healthy


def test_quarantine_table(tmp_path: Path) -> None:
    cat = Catalog(tmp_path / "cat").init()
    cat.add_quarantine("ds", "/src/x.mat", "InputError", "options.key", "key 'cube' missing", "set options.key")
    q = cat.quarantine()
    assert q.iloc[0]["field"] == "options.key" and q.iloc[0]["fix"] == "set options.key"


def test_open_unknown_image_says_how_to_find_ids(tmp_path: Path) -> None:
    cat = Catalog(tmp_path / "cat").init()
    with pytest.raises(KeyError, match="hvp catalog list"):
        cat.open("nope/nothing")


def test_tiled_writes_round_trip_and_verify(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Catalog, "TILE_BYTES", 12 * 8 * 8 * 2)  # one 8x8 chunk column per tile: many tiles
    cat = Catalog(tmp_path / "cat", chunk_xy=8).init()
    data = _cube(3, (12, 30, 45))
    row = _write(cat, "wide", data)
    assert zarr.open_group(str(tmp_path / "cat" / row["location"]), mode="r").attrs["hash_tile"] == [8, 8]
    np.testing.assert_array_equal(cat.open("ds/wide").values, data)
    assert cat.verify().ok == 1
    arr = zarr.open_group(str(tmp_path / "cat" / row["location"]), mode="r+")["cube"]
    arr[5, 29, 44] = arr[5, 29, 44] + 1
    assert cat.verify().corrupt == ["ds/wide"]


def test_verify_reads_catalogs_written_before_tiling(tmp_path: Path) -> None:
    cat = Catalog(tmp_path / "cat", chunk_xy=16).init()
    row = _write(cat, "old", _cube(4))
    group = zarr.open_group(str(tmp_path / "cat" / row["location"]), mode="r+")
    attrs = dict(group.attrs)
    assert attrs.pop("hash_tile") == [16, 16]  # one all-band chunk column per hash tile
    strips = hashlib.sha256()  # catalogs before tiling hashed whole-width strips of `strip_rows` rows
    for y0 in range(0, 40, 16):
        strips.update(np.ascontiguousarray(_cube(4)[:, y0:y0 + 16]))
    group.attrs.clear()
    group.attrs.update({**attrs, "strip_rows": 16, "content_sha256": strips.hexdigest()})
    assert cat.verify().ok == 1
