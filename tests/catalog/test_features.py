"""The feature cache's storage: round trip, per-chunk checksums, atomic writes, cache hits by image content."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from catalog.catalog import Catalog
from catalog.features import CHUNK_XY, FeatureCorruptError, FeatureStore, feature_set_id


def _maps(seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(8, 40, 36)).astype(np.float32), rng.normal(size=(4, 10, 9)).astype(np.float32)]


def test_round_trip_in_float16_and_float32(tmp_path: Path) -> None:
    store = FeatureStore(Catalog(tmp_path / "cat").init())
    descriptor = {"model": "tiny", "weights": "random-init", "seed": 0}
    set_id = feature_set_id(descriptor)
    assert set_id == feature_set_id(dict(reversed(descriptor.items())))  # key order does not matter
    assert set_id != feature_set_id({**descriptor, "seed": 1})
    store.register(set_id, descriptor)
    assert store.descriptor(set_id) == descriptor
    maps = _maps(0)
    rows = [store.write_group(set_id, "ds/a", "a" * 64, maps, {"input_size": [30, 36]}),
            store.write_group(set_id, "ds/b", "b" * 64, maps, {}, dtype="float32")]
    with pytest.raises(KeyError, match="hvp features"):
        FeatureStore(store.cat).read(set_id, "ds/a")  # written but not committed: invisible
    store.commit(rows)
    half = FeatureStore(store.cat).read(set_id, "ds/a")  # a fresh store reads the committed index
    assert [m.dtype for m in half.maps] == [np.float16, np.float16]
    for got, want in zip(half.maps, maps, strict=True):
        np.testing.assert_allclose(got.astype(np.float32), want, rtol=1e-3, atol=1e-3)
    assert half.attrs["input_size"] == [30, 36] and half.attrs["image_sha256"] == "a" * 64
    full = store.read(set_id, "ds/b")
    assert all(np.array_equal(g, w) for g, w in zip(full.maps, maps, strict=True))
    assert not [p for p in (tmp_path / "cat" / "features").rglob("*") if ".tmp-" in p.name]


def test_cache_hits_need_the_same_image_content_and_an_existing_group(tmp_path: Path) -> None:
    store = FeatureStore(Catalog(tmp_path / "cat").init())
    store.commit([store.write_group("s1", "ds/a", "a" * 64, _maps(1), {})])
    store.commit([store.write_group("s1", "ds/b", "b" * 64, _maps(2), {})])
    assert store.cached("s1", {"ds/a": "a" * 64, "ds/b": "b" * 64, "ds/c": "c" * 64}) == {"ds/a", "ds/b"}
    assert store.cached("s1", {"ds/a": "0" * 64}) == set()  # the image changed since: a miss
    assert store.cached("s2", {"ds/a": "a" * 64}) == set()  # another feature set
    location = store.entries("s1")["ds/b"]["location"]
    import shutil

    shutil.rmtree(tmp_path / "cat" / location)
    assert store.cached("s1", {"ds/b": "b" * 64}) == set()  # deleted by hand: recomputed on the next run
    assert store.compact() == 2 and store.cached("s1", {"ds/a": "a" * 64}) == {"ds/a"}


def test_a_flipped_byte_is_reported_with_the_map_and_the_fix(tmp_path: Path) -> None:
    store = FeatureStore(Catalog(tmp_path / "cat").init())
    store.commit([store.write_group("s1", "ds/a", "a" * 64, _maps(3), {})])
    location = tmp_path / "cat" / store.entries("s1")["ds/a"]["location"]
    chunks = sorted(p for p in (location / "f0").rglob("*") if p.is_file() and p.name != "zarr.json")
    assert len(chunks) == 4  # 40 x 36 cells in chunks of CHUNK_XY x CHUNK_XY, every channel per chunk
    assert CHUNK_XY == 32
    data = bytearray(chunks[-1].read_bytes())
    data[5] ^= 0xFF
    chunks[-1].write_bytes(bytes(data))
    with pytest.raises(FeatureCorruptError, match=r"feature map 'f0'.*hvp features") as err:
        store.read("s1", "ds/a")
    assert err.value.image_id == "ds/a" and str(location) in str(err.value)


def test_a_failed_write_leaves_nothing_visible(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import zarr

    store = FeatureStore(Catalog(tmp_path / "cat").init())

    def fail(*args: object, **kwargs: object) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(zarr.Group, "update_attributes", fail)  # fails after the maps are written
    with pytest.raises(RuntimeError, match="disk full"):
        store.write_group("s1", "ds/a", "a" * 64, _maps(4), {})
    monkeypatch.undo()
    assert not list((tmp_path / "cat" / "features").rglob("*.zarr*"))
    assert store.cached("s1", {"ds/a": "a" * 64}) == set()


KILLED_WRITER = """
import os, signal, sys
import numpy as np
from catalog.features import FeatureStore
from catalog.catalog import Catalog

store = FeatureStore(Catalog(sys.argv[1]))
store.storage.commit_folder = lambda tmp, rel: os.kill(os.getpid(), signal.SIGKILL)  # dies before the rename
store.write_group("s1", "ds/a", "a" * 64, [np.ones((2, 4, 4), np.float32)], {})
"""


def test_a_killed_writers_temporaries_are_removed_by_compact(tmp_path: Path) -> None:
    """kill -9 in the middle of a feature write leaves its temporary group; the next compact (every
    compute_features ends with one) removes it, so the catalog verifies clean again."""
    import subprocess
    import sys

    cat = Catalog(tmp_path / "cat").init()
    store = FeatureStore(cat)
    store.commit([store.write_group("s1", "ds/b", "b" * 64, _maps(5), {})])
    killed = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(tmp_path / "cat")],
                            cwd=Path(__file__).resolve().parents[2])
    assert killed.returncode == -9
    [stale] = cat.verify().stale
    assert stale.startswith("features/s1/ds/a@aaaaaaaaaaaa.zarr.tmp-")
    store.compact()
    report = cat.verify()
    assert report.healthy and not report.stale and not report.in_progress
    assert store.cached("s1", {"ds/a": "a" * 64, "ds/b": "b" * 64}) == {"ds/b"}  # the written entry is untouched
