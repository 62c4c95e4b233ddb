"""Fusion of the three branches' masks into a prompt-driven pseudo-target (paper section 4.2).

1. Global IoU non-maximum suppression over the masks of all branches together: masks are visited by decreasing
   *fusion score* and a mask is kept unless its IoU with an already kept mask exceeds ``tau``. The fusion score is
   each branch's ``score`` column, which every branch sets to the model's own predicted IoU (SAM's quality
   estimate, in [0, 1]); ties go to the larger mask, then to the branch order spatial, spectral, material.
2. The pseudo-target is the pixel-wise OR of the kept masks; the kept masks are its sub-masks, each with a prompt:
   the point deepest inside the mask (largest distance to its border) and its bounding box.

The fused set is stored like any mask set (branch "fused"), versioned by a fusion id that hashes the input labeler
ids, ``tau`` and this stage's version.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pandas as pd

from catalog.masks import MaskSet, table_from_masks

STAGE_VERSION = "1"
BRANCH_ORDER = {"spatial": 0, "spectral": 1, "material": 2}


def pairwise_iou(packed: np.ndarray, areas: np.ndarray, i: int, others: np.ndarray) -> np.ndarray:
    """IoU of mask ``i`` with masks ``others`` from bit-packed rows (popcount of AND / OR areas)."""
    if others.size == 0:
        return np.zeros(0)
    inter = np.bitwise_count(packed[others] & packed[i]).sum(axis=1).astype(np.float64)
    union = areas[others] + areas[i] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def mask_nms(masks: np.ndarray, scores: np.ndarray, tau: float, tiebreak: np.ndarray | None = None) -> np.ndarray:
    """Indices of the masks kept by greedy IoU-NMS (highest score first), in visiting order."""
    n = masks.shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    packed = np.packbits(masks.reshape(n, -1), axis=1)
    areas = masks.reshape(n, -1).sum(axis=1).astype(np.float64)
    keys = [np.arange(n)] + ([tiebreak] if tiebreak is not None else []) + [-areas, -np.asarray(scores, float)]
    order = np.lexsort(keys)
    kept: list[int] = []
    for i in order:
        if areas[i] == 0:
            continue
        if not kept or pairwise_iou(packed, areas, int(i), np.asarray(kept)).max() <= tau:
            kept.append(int(i))
    return np.asarray(kept, dtype=np.int64)


def fusion_id(labeler_ids: list[str], tau: float) -> str:
    """Version of a fused set: its inputs' labeler ids, tau and the stage version."""
    blob = json.dumps({"inputs": sorted(labeler_ids), "tau": tau, "stage_version": STAGE_VERSION}).encode()
    return f"fused-{hashlib.sha256(blob).hexdigest()[:16]}"


def fuse(sets: list[MaskSet], tau: float = 0.7) -> MaskSet:
    """Global IoU-NMS over every branch's masks, then OR; returns the kept sub-masks with prompts and sources."""
    if not 0.0 < tau <= 1.0:
        raise ValueError(f"tau must be in (0, 1], got {tau}")
    shapes = {s.masks.shape[1:] for s in sets if len(s)}
    if len(shapes) > 1:
        raise ValueError(f"mask sets disagree on the image size: {sorted(shapes)}")
    nonempty = [s for s in sets if len(s)]
    if not nonempty:
        h, w = sets[0].masks.shape[1:] if sets else (0, 0)
        empty = np.zeros((0, h, w), bool)
        return MaskSet(empty, _fused_table(empty, pd.DataFrame(columns=["score", "branch", "source_labeler"])))
    masks = np.concatenate([s.masks for s in nonempty])
    table = pd.concat([s.table.assign(source_labeler=s.labeler_id) for s in nonempty], ignore_index=True)
    scores = table["score"].to_numpy(dtype=float)
    scores = np.where(np.isfinite(scores), scores, 0.0)
    tiebreak = table["branch"].map(BRANCH_ORDER).fillna(len(BRANCH_ORDER)).to_numpy()
    keep = mask_nms(masks, scores, tau, tiebreak)
    return MaskSet(masks[keep], _fused_table(masks[keep], table.iloc[keep].reset_index(drop=True)))


def _fused_table(masks: np.ndarray, source: pd.DataFrame) -> pd.DataFrame:
    """Fused rows: geometry and prompt recomputed from the kept masks; score and origin kept from the source."""
    out = table_from_masks(masks, "fused", score=source["score"].to_numpy(dtype=float),
                           predicted_iou=source.get("predicted_iou", pd.Series(np.nan, index=source.index))
                           .to_numpy(dtype=float),
                           stability=source.get("stability", pd.Series(np.nan, index=source.index))
                           .to_numpy(dtype=float))
    out["source_branch"] = source["branch"].to_numpy() if len(source) else np.array([], dtype=object)
    out["source_labeler"] = source["source_labeler"].to_numpy() if len(source) else np.array([], dtype=object)
    return out


def pseudo_target(fused: MaskSet) -> np.ndarray:
    """The pixel-wise OR of the fused sub-masks: the image's pseudo-target."""
    return np.asarray(fused.masks.any(axis=0), dtype=bool)
