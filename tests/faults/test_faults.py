"""Fault injection: each stage is killed (kill -9) at a few seeded random points, run again, and must leave the
catalog and the training run exactly as an uninterrupted run does (see tests/faults/harness.py; bench/faults.py
runs 50)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.faults import harness as faults

POINTS_PER_STAGE = 2


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> faults.Setup:
    return faults.build_setup(tmp_path_factory.mktemp("faults"))


@pytest.mark.parametrize("stage", faults.STAGES)
def test_stage_survives_kill_9_at_random_points(setup: faults.Setup, stage: str, tmp_path: Path) -> None:
    assert setup.points[stage] > 10  # the stage does enough I/O for the points to mean something
    for kill_at in faults.kill_points(setup, stage, POINTS_PER_STAGE, seed=0):
        result = faults.trial(setup, stage, kill_at, tmp_path / f"at-{kill_at}")
        assert result.killed, f"{stage}: the kill at point {kill_at} of {result.points} never fired"
        assert result.survived, f"{stage} killed at point {kill_at}: {result.problems}"


def test_the_checks_catch_damage(setup: faults.Setup, tmp_path: Path) -> None:
    """The harness is only as good as its checks: a duplicated row, lost masks and a torn part are all found."""
    import shutil

    from catalog.catalog import Catalog

    catalog = tmp_path / "catalog"
    shutil.copytree(setup.after["fuse"], catalog)
    cat = Catalog(str(catalog))
    row = {k: None if v is None or v != v else v for k, v in cat.images().iloc[0].to_dict().items()}  # NaN->null
    from catalog.catalog import INDEX_SCHEMA

    cat.storage.write_part("index", [row], INDEX_SCHEMA)  # the same image committed twice
    mask_part = sorted((catalog / "masks" / "index").glob("part-*.parquet"))[0]
    masks = cat.mask_store.index()
    cat.mask_store.drop([(masks.iloc[0]["image_id"], masks.iloc[0]["labeler_id"])])  # a mask set lost
    problems = faults.check(setup, "fuse", catalog, tmp_path / "run")
    assert any("committed twice" in p for p in problems) and any("masks missing" in p for p in problems)
    torn = catalog / "index" / "part-99999999999999999999-torn.parquet"
    torn.write_bytes(mask_part.read_bytes()[:40] if mask_part.exists() else b"PAR1")
    assert any("does not read" in p or "index" in p for p in faults.check(setup, "fuse", catalog, tmp_path / "run"))
