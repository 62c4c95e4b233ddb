"""Determinism: the same inputs and seed, run in two separate processes, give byte-identical cubes, masks and
labeler records, and the same index content (timestamps aside)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from catalog.catalog import Catalog
from catalog.fixtures import write_dataset
from catalog.masks import MASK_INDEX_SCHEMA
from tests.faults import harness as faults


def _files(root: Path, top: str) -> dict[str, bytes]:
    """Every file under ``root/top`` by relative path (part files of the tables aside: they hold timestamps)."""
    out = {}
    for path in sorted((root / top).rglob("*")):
        if path.is_file() and "part-" not in path.name:
            out[path.relative_to(root).as_posix()] = path.read_bytes()
    return out


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("determinism")
    for slug in faults.DATASETS:
        write_dataset(slug, root / "src")
    catalogs = (root / "a", root / "b")
    for catalog in catalogs:  # each run in its own fresh process
        code = faults.run_child(("ingest", "label", "fuse"), str(catalog), str(root / "run"), str(root / "src"), 0,
                                str(root / "count.txt"))
        assert code == 0
    return catalogs


def test_same_inputs_and_seed_give_byte_identical_masks_and_index(two_runs: tuple[Path, Path]) -> None:
    a, b = two_runs
    for top in ("cubes", "masks", "labelers"):
        fa, fb = _files(a, top), _files(b, top)
        assert fa.keys() == fb.keys() and fa, top
        differ = [k for k in fa if fa[k] != fb[k]]
        assert not differ, f"{top}: {differ[:5]}"
    ca, cb = Catalog(str(a)), Catalog(str(b))
    ia, ib = (c.images().drop(columns=["ingested_at"]) for c in (ca, cb))
    assert ia.equals(ib) and len(ia) == 4
    ma, mb = (c.storage.read_table("masks/index", MASK_INDEX_SCHEMA)[0].to_pandas().drop(columns=["created_at"])
              .sort_values(["image_id", "labeler_id"]).reset_index(drop=True) for c in (ca, cb))
    assert ma.equals(mb) and len(ma) == 4 * 4  # three branches and the fused set per image
    assert os.listdir(a / "masks") == os.listdir(b / "masks")
