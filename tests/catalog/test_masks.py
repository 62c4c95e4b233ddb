"""Mask artifacts: bit-packed round trip, per-mask table, commit by index row, lookup of what is missing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from catalog.catalog import Catalog
from catalog.masks import MaskSet, MaskStore, table_from_masks


def _masks(n: int = 5, h: int = 13, w: int = 21) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.random((n, h, w)) > 0.6


def test_round_trip_and_table(tmp_path: Path) -> None:
    cat = Catalog(tmp_path / "cat").init()
    store = MaskStore(cat)
    m = _masks()
    table = table_from_masks(m, "spatial", score=np.arange(5) / 10, predicted_iou=0.9, stability=0.8)
    store.register_labeler("lab1", {"model": "tiny", "weights": "random-init"})
    loc = store.write("ds/img", "lab1", "spatial", MaskSet(m, table), random_init=True)
    assert loc == "masks/lab1/ds/img@5.zarr"
    got = cat.masks("ds/img", branch="spatial")
    np.testing.assert_array_equal(got.masks, m)
    assert list(got.table["area"]) == [int(x.sum()) for x in m]
    assert got.attrs["weights"] == "random-init" and got.labeler_id == "lab1"
    assert store.labeler("lab1")["weights"] == "random-init"
    assert store.missing("lab1", ["ds/img", "ds/other"]) == ["ds/other"]
    with pytest.raises(KeyError, match="hvp label"):
        cat.masks("ds/img", branch="material")


def test_table_prompt_is_inside_the_mask_and_bbox_tight() -> None:
    m = np.zeros((1, 10, 12), bool)
    m[0, 2:7, 3:11] = True
    t = table_from_masks(m, "fused", score=1.0)
    row = t.iloc[0]
    assert (row.bbox_x0, row.bbox_y0, row.bbox_x1, row.bbox_y1) == (3, 2, 11, 7)
    assert m[0, row.prompt_y, row.prompt_x] and row.prompt_y == 4


def test_empty_mask_set(tmp_path: Path) -> None:
    cat = Catalog(tmp_path / "cat").init()
    empty = np.zeros((0, 8, 9), bool)
    MaskStore(cat).write("ds/img", "lab", "spatial", MaskSet(empty, table_from_masks(empty, "spatial")), True)
    assert cat.masks("ds/img").masks.shape == (0, 8, 9)


def test_packed_windows_match_the_unpacked_masks(tmp_path: Path) -> None:
    cat = Catalog(tmp_path / "cat").init()
    m = _masks(4, 17, 29)
    MaskStore(cat).write("ds/img", "lab", "fused", MaskSet(m, table_from_masks(m, "fused")), True)
    packed = cat.fused("ds/img", packed=True)
    assert packed.nbytes == 4 * 17 * 4  # 29 columns -> 4 bytes per row
    np.testing.assert_array_equal(packed.unpack().masks, m)
    for y0, y1, x0, x1 in [(0, 17, 0, 29), (3, 9, 5, 22), (10, 40, 13, 29), (0, 1, 7, 9)]:
        np.testing.assert_array_equal(packed.window(y0, y1, x0, x1), m[:, y0:y1, x0:x1])
    np.testing.assert_array_equal(packed.window(2, 8, 9, 17, np.array([3, 1])), m[[3, 1], 2:8, 9:17])
