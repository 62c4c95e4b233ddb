"""Plain labelling helpers: branch agreement, pending images, overlays (no Prefect)."""

from __future__ import annotations

import numpy as np

from catalog.masks import MaskSet, table_from_masks
from stages.labelling.label import branch_agreement


def _set(masks: np.ndarray, branch: str) -> MaskSet:
    return MaskSet(masks, table_from_masks(masks, branch, score=1.0), branch)


def test_branch_agreement_is_mean_best_iou_across_branches() -> None:
    a = np.zeros((1, 8, 8), bool)
    a[0, :4] = True
    half = np.zeros((1, 8, 8), bool)
    half[0, :2] = True  # IoU with a = 0.5
    assert branch_agreement([_set(a, "spatial"), _set(a.copy(), "material")]) == 1.0
    assert branch_agreement([_set(a, "spatial"), _set(half, "material")]) == 0.5
    assert branch_agreement([_set(a, "spatial"), _set(~a, "material")]) == 0.0
    assert branch_agreement([_set(a, "spatial")]) == 0.0  # nothing to agree with
