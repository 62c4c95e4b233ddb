"""Fusion: global IoU-NMS across branches then OR; properties checked on random and hand-made mask sets."""

from __future__ import annotations

import numpy as np
import pytest

from catalog.masks import MaskSet, table_from_masks
from stages.labelling.fuse import fuse, fusion_id, mask_nms, pseudo_target


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def _set(masks: np.ndarray, branch: str, scores: np.ndarray, lid: str) -> MaskSet:
    return MaskSet(masks, table_from_masks(masks, branch, score=scores, predicted_iou=scores, stability=0.9), lid)


def _random_sets(seed: int) -> list[MaskSet]:
    rng = np.random.default_rng(seed)
    out = []
    for b, branch in enumerate(("spatial", "spectral", "material")):
        n = int(rng.integers(0, 8))
        masks = np.zeros((n, 20, 24), bool)
        for k in range(n):
            y0, x0 = rng.integers(0, 14), rng.integers(0, 18)
            masks[k, y0:y0 + rng.integers(2, 8), x0:x0 + rng.integers(2, 8)] = True
        out.append(_set(masks, branch, rng.random(n), f"{branch}-{b}"))
    return out


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("tau", [0.3, 0.7])
def test_fusion_properties(seed: int, tau: float) -> None:
    sets = _random_sets(seed)
    fused = fuse(sets, tau)
    m = fused.masks
    for i in range(len(m)):
        for j in range(i + 1, len(m)):
            assert _iou(m[i], m[j]) <= tau
    np.testing.assert_array_equal(pseudo_target(fused), np.logical_or.reduce(m) if len(m) else np.zeros((20, 24), bool))
    assert set(fused.table["branch"]) <= {"fused"}
    for _, row in fused.table.iterrows():
        assert m[_, row.prompt_y, row.prompt_x]
    again = fuse([MaskSet(fused.masks, fused.table.assign(branch=fused.table["source_branch"]), "f")], tau)
    np.testing.assert_array_equal(again.masks, fused.masks)  # idempotent


def test_duplicate_across_branches_kept_once_with_higher_score() -> None:
    m = np.zeros((1, 10, 10), bool)
    m[0, 2:8, 2:8] = True
    a, b = _set(m, "spatial", np.array([0.6]), "s"), _set(m.copy(), "material", np.array([0.9]), "m")
    fused = fuse([a, b], 0.7)
    assert len(fused) == 1 and fused.table.iloc[0]["source_branch"] == "material"


def test_nms_keeps_disjoint_and_drops_empty() -> None:
    m = np.zeros((3, 6, 6), bool)
    m[0, :3] = True
    m[1, 3:] = True
    assert sorted(mask_nms(m, np.array([0.1, 0.2, 0.9]), 0.5).tolist()) == [0, 1]


def test_fusion_id_versions_inputs_and_tau() -> None:
    assert fusion_id(["a", "b"], 0.7) == fusion_id(["b", "a"], 0.7)
    assert fusion_id(["a", "b"], 0.7) != fusion_id(["a", "b"], 0.5) != fusion_id(["a", "c"], 0.5)


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="tau"):
        fuse([], 0.0)
    a = _set(np.ones((1, 4, 4), bool), "spatial", np.ones(1), "a")
    b = _set(np.ones((1, 5, 4), bool), "spectral", np.ones(1), "b")
    with pytest.raises(ValueError, match="image size"):
        fuse([a, b])
