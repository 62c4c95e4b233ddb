"""Garbage collection removes exactly what no index row reaches (cubes, derived false colour, masks, features, dead
writers' temporaries), reports their bytes, never touches what is referenced, and is safe beside a running ingest:
its leased temporary and a cube it has just committed survive."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from catalog.catalog import Catalog, CubeWrite
from catalog.features import FeatureStore
from catalog.gc import collect_garbage
from catalog.masks import MaskSet, table_from_masks
from catalog.specs import spec_for_folder
from catalog.storage import TMP
from stages.ingest import IngestResult, ingest_item
from stages.ingest.discover import item_for


def _cube(seed: int, shape: tuple[int, int, int] = (6, 24, 24)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 4000, size=shape).astype("uint16")


def _write(cat: Catalog, image: str, seed: int, sha: str) -> dict[str, Any]:
    data = _cube(seed)
    return cat.write_cube(CubeWrite(dataset="ds", image_id=f"ds/{image}", key=image, sha256=sha, data=data,
                                    wavelength_nm=np.linspace(400, 700, data.shape[0]),
                                    attrs={"source_path": f"/src/{image}.npy", "reader": "npy"}))


def _masks() -> MaskSet:
    masks = np.zeros((2, 24, 24), bool)
    masks[0, 2:9, 3:12] = masks[1, 12:20, 5:22] = True
    return MaskSet(masks=masks, table=table_from_masks(masks, "spatial", score=0.9, predicted_iou=0.8,
                                                        stability=0.95))


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


@pytest.fixture()
def populated(tmp_path: Path) -> tuple[Catalog, dict[str, Any], set[tuple[str, str]]]:
    """A catalog with referenced items of every kind and one unreferenced item of every kind."""
    cat = Catalog(tmp_path / "cat", chunk_xy=8).init()
    a = _write(cat, "a", 0, "1" * 64)
    b_old = _write(cat, "b", 1, "2" * 64)
    b = _write(cat, "b", 2, "3" * 64)  # b's source changed: its old cube is unreachable
    rgb = np.full((24, 24, 3), 90, np.uint8)
    cat.write_falsecolor(a["location"], rgb, "bands")
    old_fc = cat.write_falsecolor(b_old["location"], rgb, "bands")
    cat.mask_store.write("ds/a", "lab1", "spatial", _masks(), random_init=True)
    dropped = cat.mask_store.write("ds/b", "lab1", "spatial", _masks(), random_init=True)
    cat.mask_store.drop([("ds/b", "lab1")])  # its group stays, no row names it
    features = FeatureStore(cat)
    maps = [np.ones((4, 3, 3), np.float32)]
    features.commit([features.write_group("set1", "ds/a", "1" * 64, maps, {})])
    uncommitted = features.write_group("set1", "ds/b", "3" * 64, maps, {})["location"]  # a killed run's entry
    stale = f"cubes/ds/c@{'4' * 12}.zarr{TMP}deadbeefdeadbeef-0001"  # no lease recorded: its writer is gone
    (Path(cat.root) / stale).mkdir(parents=True)
    (Path(cat.root) / stale / "zarr.json").write_text("{}")
    referenced = {"a": a["location"], "b": b["location"], "fc": cat.falsecolor_location(a["location"]),
                  "masks": "masks/lab1/ds/a@2.zarr", "features": FeatureStore.location("set1", "ds/a", "1" * 64)}
    garbage = {("cube", b_old["location"]), ("falsecolor", old_fc), ("masks", dropped),
               ("features", uncommitted), ("temporary", stale)}
    return cat, referenced, garbage


def test_a_dry_run_reports_every_unreferenced_item_with_its_bytes_and_removes_nothing(populated: tuple) -> None:
    cat, referenced, garbage = populated
    root = Path(cat.root)
    report = collect_garbage(cat, dry_run=True, grace_s=0)
    assert {(g.kind, g.rel) for g in report.garbage} == garbage
    for g in report.garbage:
        assert g.bytes == _du(root / g.rel) > 0
        assert (root / g.rel).exists()
    assert report.bytes == sum(_du(root / rel) for _, rel in garbage)
    assert report.by_kind()["cube"] == {"count": 1, "bytes": _du(root / next(r for k, r in garbage if k == "cube"))}
    assert "would remove 5 items" in report.summary()
    # with the default grace period, freshly written groups are left for later; dead writers' temporaries are not
    fresh = collect_garbage(cat)
    assert {g.kind for g in fresh.garbage} == {"temporary"} and len(fresh.recent) == 4


def test_collecting_removes_the_garbage_and_nothing_referenced(populated: tuple) -> None:
    cat, referenced, garbage = populated
    root = Path(cat.root)
    expected_bytes = sum(_du(root / rel) for _, rel in garbage)
    report = collect_garbage(cat, dry_run=False, grace_s=0)
    assert {(g.kind, g.rel) for g in report.garbage} == garbage and report.bytes == expected_bytes
    for _, rel in garbage:
        assert not (root / rel).exists()
    for rel in referenced.values():
        assert (root / rel).is_dir()
    assert not [p for p in root.rglob(f"*{TMP}*")]  # nothing left aside
    verify = cat.verify()
    assert verify.healthy and verify.orphans == [] and verify.stale == []
    np.testing.assert_array_equal(cat.open("ds/b").values, _cube(2))
    assert len(cat.masks("ds/a", branch="spatial")) == 2
    assert FeatureStore(cat).read("set1", "ds/a").maps[0].shape == (4, 3, 3)
    assert cat.read_falsecolor_crop(referenced["a"], 0, 0, 8) is not None
    again = collect_garbage(cat, dry_run=False, grace_s=0)
    assert again.garbage == [] and again.bytes == 0


def test_a_store_whose_index_is_lost_is_left_alone(populated: tuple) -> None:
    cat, referenced, _ = populated
    for part in (Path(cat.root) / "masks" / "index").glob("part-*.parquet"):
        part.unlink()
    report = collect_garbage(cat, dry_run=False, grace_s=0)
    assert not any(g.kind == "masks" for g in report.garbage)
    assert (Path(cat.root) / referenced["masks"]).is_dir()
    assert any(s.startswith("masks:") for s in report.skipped)


# ---------------------------------------------------------------------------------------------- beside an ingest
def _source(root: Path) -> tuple[Any, Any]:
    """A one-image npy dataset folder: (its spec, its source item)."""
    folder = root / "lab"
    (folder / "captures").mkdir(parents=True)
    np.save(folder / "captures" / "c0.npy", _cube(7, (30, 20, 6)))
    (folder / "dataset.yaml").write_text(yaml.safe_dump({
        "name": "lab", "format": "npy", "files": "captures/*.npy", "options": {"axes": "yxb"},
        "wavelengths_nm": [450.0, 500.0, 550.0, 600.0, 650.0, 700.0]}))
    spec = spec_for_folder(folder)
    assert spec is not None
    return spec, item_for(folder, spec, "captures/c0.npy")


def test_an_in_progress_ingest_keeps_its_leased_temporary(tmp_path: Path) -> None:
    cat = Catalog(tmp_path / "cat", chunk_xy=8, layout={"chunk_xy": 8, "shard_xy": 0}).init()
    _write(cat, "a", 0, "1" * 64)
    spec, item = _source(tmp_path / "src")
    writing, release = threading.Event(), threading.Event()
    results: list[IngestResult] = []

    def on_strip(_: int) -> None:  # the ingest stops mid-write, its cube half written under a temporary name
        writing.set()
        release.wait(60)

    worker = threading.Thread(target=lambda: results.append(ingest_item(cat, spec, item, on_strip=on_strip)))
    worker.start()
    try:
        assert writing.wait(60)
        live = [t.rel for t in cat.storage.temporaries() if t.alive]
        assert live and all(rel.startswith("cubes/lab/") for rel in live)
        report = collect_garbage(cat, dry_run=False, grace_s=0)
        assert set(report.live_temporaries) >= set(live) and report.garbage == []
        assert all((Path(cat.root) / rel).exists() for rel in live)
    finally:
        release.set()
        worker.join(60)
    assert [r.status for r in results] == ["ingested"]
    np.testing.assert_array_equal(cat.open("lab/captures/c0").values, _cube(7, (30, 20, 6)).transpose(2, 0, 1))
    assert cat.verify().healthy


def test_a_cube_committed_but_not_yet_indexed_survives(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cat = Catalog(tmp_path / "cat", chunk_xy=8).init()
    _write(cat, "a", 0, "1" * 64)
    spec, item = _source(tmp_path / "src")
    committed, release = threading.Event(), threading.Event()
    commit_row = Catalog._commit_row

    def slow_commit(self: Catalog, *args: Any) -> dict[str, Any]:  # the cube is in place; its row comes later
        committed.set()
        release.wait(60)
        return commit_row(self, *args)

    monkeypatch.setattr(Catalog, "_commit_row", slow_commit)
    results: list[IngestResult] = []
    worker = threading.Thread(target=lambda: results.append(ingest_item(cat, spec, item)))
    worker.start()
    gc_reports: list[Any] = []
    collector = threading.Thread(target=lambda: gc_reports.append(collect_garbage(cat, dry_run=False, grace_s=0)))
    try:
        assert committed.wait(60)
        (cube,) = [str(p.relative_to(cat.root)) for p in (Path(cat.root) / "cubes" / "lab").rglob("*.zarr")]
        assert TMP not in cube and cube not in set(cat.images()["location"])  # unindexed: a candidate
        collector.start()
        time.sleep(1.0)
        assert collector.is_alive()  # waiting for the image's ingest lock, not deleting
        assert (Path(cat.root) / cube).is_dir()
    finally:
        release.set()
        worker.join(60)
        if collector.ident is not None:
            collector.join(60)
    assert [r.status for r in results] == ["ingested"]
    (report,) = gc_reports
    assert report.garbage == [] and report.kept == [cube]
    assert os.path.isdir(Path(cat.root) / cube) and cube in set(cat.images()["location"])
    assert cat.verify().healthy
