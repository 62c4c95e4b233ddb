"""The cold read path (catalog/cubes/reader.py ``run_cold``): chunks coalesced into a few ranges per file, read ahead
on the I/O thread with their checksums verified there, decoded on the caller's thread. It must return exactly what
the mapped path returns, name every corrupt or truncated chunk as that path does, and be taken only when the bytes
are not in the page cache."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest

from base.errors import CorruptChunkError
from catalog.catalog import Catalog
from catalog.cubes.files import FileAccess
from catalog.cubes.layout import CubeLayout
from catalog.cubes.reader import CubeReader
from catalog.cubes.writer import CubeWrite

LAYOUTS = [
    CubeLayout(chunk_xy=16),  # the default shape: one shard per image here
    CubeLayout(chunk_xy=8, shard_xy=32),
    CubeLayout(chunk_xy=16, shard_xy=0),
    CubeLayout(chunk_xy=16, band_group=4, shard_xy=32, codec="lz4", shuffle="bit"),
    CubeLayout(chunk_xy=16, shard_xy=0, codec="zstd", level=2, shuffle="byte", checksum=False),
]


def _cube(shape: tuple[int, int, int] = (12, 40, 50), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 4000, size=shape).astype("uint16")


def _write(cat: Catalog, data: np.ndarray, image: str = "img") -> str:
    return str(cat.write_cube(CubeWrite(
        dataset="ds", image_id=f"ds/{image}", key=image, sha256=image.ljust(64, "0"), data=data,
        wavelength_nm=np.linspace(400, 700, data.shape[0]), attrs={}))["location"])


@pytest.fixture
def cold_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every read of two chunks or more takes the cold path, in ranges of a few chunks (so buffers are reused);
    returns the list the number of ranges of each cold read is appended to."""
    calls: list[int] = []
    run_cold = CubeReader.run_cold

    def spy(self: CubeReader, segments: list) -> None:
        calls.append(len(segments))
        run_cold(self, segments)

    monkeypatch.setattr(CubeReader, "run_cold", spy)
    monkeypatch.setattr(CubeReader, "COLD_MIN_BYTES", 0)
    monkeypatch.setattr(CubeReader, "COLD_RUN_BYTES", 0)
    monkeypatch.setattr(CubeReader, "SEGMENT_BYTES", 3 * 12 * 16 * 16 * 2)
    monkeypatch.setattr(FileAccess, "in_page_cache", lambda self, path, offset: False)
    return calls


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda lay: lay.label())
def test_cold_reads_return_what_the_mapped_path_returns(tmp_path: Path, layout: CubeLayout, threads: int,
                                                        cold_calls: list[int]) -> None:
    cat = Catalog(tmp_path / "cat", layout=layout, read_threads=threads, chunk_cache_mb=0).init()
    data, other = _cube(), _cube(seed=1)
    loc, loc2 = _write(cat, data), _write(cat, other, "other")
    np.testing.assert_array_equal(cat.read_image("ds/img"), data)
    np.testing.assert_array_equal(cat.read_crop(loc, 7, 9, 20), data[:, 7:27, 9:29])
    np.testing.assert_array_equal(cat.read_crop(loc, 30, 40, 20), data[:, 30:, 40:])
    np.testing.assert_array_equal(cat.read_crop(loc, 3, 5, 30, bands=[0, 2, 3, 9]), data[[0, 2, 3, 9], 3:33, 5:35])
    f32 = cat.read_crop(loc, 1, 2, 30, dtype=np.float32)
    assert f32.dtype == np.float32 and np.array_equal(f32, data[:, 1:31, 2:32].astype(np.float32))
    batch = cat.read_batch([(loc, 0, 0), (loc2, 20, 30), (loc, 8, 8)], 24, bands=[1, 4, 5, 6])
    np.testing.assert_array_equal(batch[0], data[[1, 4, 5, 6], :24, :24])
    np.testing.assert_array_equal(batch[1, :, :20, :20], other[[1, 4, 5, 6], 20:, 30:])
    assert not batch[1, :, 20:].any()
    np.testing.assert_array_equal(batch[2], data[[1, 4, 5, 6], 8:32, 8:32])
    assert len(cold_calls) == 6 and max(cold_calls) > 1  # every read went cold, in several ranges


def test_cold_reads_fill_and_use_the_chunk_cache(tmp_path: Path, cold_calls: list[int]) -> None:
    cat = Catalog(tmp_path / "cat", layout=CubeLayout(chunk_xy=16), chunk_cache_mb=1).init()
    data = _cube()
    loc = _write(cat, data)
    np.testing.assert_array_equal(cat.read_crop(loc, 0, 0, 32), data[:, :32, :32])
    misses = cat.cubes.cache.misses
    np.testing.assert_array_equal(cat.read_crop(loc, 4, 4, 20), data[:, 4:24, 4:24])
    assert cat.cubes.cache.misses == misses and cat.cubes.cache.hits >= 4


def test_ranges_coalesce_whole_chunk_rows_of_a_shard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cat = Catalog(tmp_path / "cat", layout=CubeLayout(chunk_xy=8, shard_xy=64)).init()
    data = _cube((6, 64, 64))
    loc = _write(cat, data)
    reader = cat.cubes
    info = reader.info(loc)
    assert info is not None
    from catalog.cubes.regions import normalise_region, plan_chunks

    def plan(y: int, x: int, size: int) -> list:
        out = np.empty((6, size, size), np.uint16)
        region = normalise_region(info, (None, slice(y, y + size), slice(x, x + size)))
        return [(info, idx, pieces) for idx, pieces in plan_chunks(info, region, out).items()]

    monkeypatch.setattr(CubeReader, "SEGMENT_GAP", 0)
    whole, rest = reader.segments(plan(0, 0, 64))
    assert rest == [] and len(whole) == 1 and whole[0].start == 0  # the shard's 64 chunks in one read
    assert [c[1] for c in whole[0].chunks] == sorted(c[1] for c in whole[0].chunks)
    assert whole[0].end - whole[0].start == sum(c[2] for c in whole[0].chunks)
    crop, _ = reader.segments(plan(4, 4, 40))  # chunk rows 0..5, columns 0..5 of 8: one range per row
    assert len(crop) == 6 and all(len(s.chunks) == 6 for s in crop)
    monkeypatch.setattr(CubeReader, "SEGMENT_GAP", 10**6)  # small gaps are read through: one range
    assert len(reader.segments(plan(4, 4, 40))[0]) == 1


def test_corrupt_and_truncated_chunks_are_named_on_the_cold_path(tmp_path: Path, cold_calls: list[int]) -> None:
    cat = Catalog(tmp_path / "cat", layout=CubeLayout(chunk_xy=8, shard_xy=16), chunk_cache_mb=0).init()
    data = _cube()
    loc = _write(cat, data)
    shard = tmp_path / "cat" / loc / "cube" / "c" / "0" / "1" / "1"
    with open(shard, "r+b") as fh:
        fh.seek(123)
        byte = fh.read(1)
        fh.seek(123)
        fh.write(bytes([byte[0] ^ 0x10]))
    with pytest.raises(CorruptChunkError, match="crc32c checksum mismatch") as err:
        cat.read_crop(loc, 10, 10, 20)
    assert err.value.chunk == (0, 2, 2) and err.value.path == str(shard) and cold_calls
    # nothing of the failed read is left behind: the chunks around it still read right, cold
    np.testing.assert_array_equal(cat.read_crop(loc, 0, 0, 16), data[:, :16, :16])
    np.testing.assert_array_equal(cat.read_crop(loc, 0, 32, 18), data[:, :18, 32:])
    tail = tmp_path / "cat" / loc / "cube" / "c" / "0" / "0" / "1"
    index_bytes = 16 * 4 + 4
    body = tail.read_bytes()
    cat.cubes.forget(loc)
    chunk = 12 * 8 * 8 * 2 + 4
    tail.write_bytes(body[:chunk + 100] + body[-index_bytes:])  # the index promises 4 chunks, 1 is left whole
    with pytest.raises(CorruptChunkError, match="truncated file"):
        cat.read_crop(loc, 0, 16, 16)


def _evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@pytest.mark.skipif(not hasattr(os, "RWF_NOWAIT"), reason="no RWF_NOWAIT: every read takes the mapped path")
def test_only_reads_the_page_cache_lacks_take_the_cold_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    run_cold = CubeReader.run_cold
    monkeypatch.setattr(CubeReader, "run_cold", lambda self, segs: (calls.append(len(segs)), run_cold(self, segs)))
    cat = Catalog(tmp_path / "cat", chunk_cache_mb=0).init()  # the default layout and thresholds
    data = _cube((64, 256, 256))  # 8 MB in one shard: one long run, above COLD_MIN_BYTES and COLD_RUN_BYTES
    loc = _write(cat, data)
    shard = tmp_path / "cat" / loc / "cube" / "c" / "0" / "0" / "0"
    _evict(shard)
    if cat.cubes.files.in_page_cache(str(shard), 0):
        pytest.skip(f"the file system under {tmp_path} keeps evicted pages (tmpfs?): nothing is ever cold")
    time.sleep(0.2)  # the probe's own read-ahead (a RWF_NOWAIT read still starts one) has landed: drop it too
    _evict(shard)
    np.testing.assert_array_equal(cat.read_image("ds/img"), data)
    assert len(calls) == 1 and calls[0] >= 2  # cold: a few long ranges
    assert cat.cubes.files.in_page_cache(str(shard), 0)
    np.testing.assert_array_equal(cat.read_crop(loc, 30, 40, 200), data[:, 30:230, 40:240])
    assert len(calls) == 1  # warm now: read in place from the mapping
    np.testing.assert_array_equal(cat.read_crop(loc, 0, 0, 8), data[:, :8, :8])  # small reads never go cold
    cat.cubes.forget(loc)
    _evict(shard)
    time.sleep(0.2)
    _evict(shard)
    np.testing.assert_array_equal(cat.read_crop(loc, 70, 70, 128), data[:, 70:198, 70:198])
    assert len(calls) == 1  # cold, but 3 short runs of 3 chunks: every chunk's read started at once, mapped
