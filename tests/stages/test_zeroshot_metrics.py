"""Airborne zero-shot metrics against direct numpy computations (the released scripts' definitions)."""

from __future__ import annotations

import numpy as np
import pytest

from stages.metrics import change_metrics, classification_metrics, detection_auc, one_class_metrics


def test_classification_metrics_equal_direct_computation() -> None:
    rng = np.random.default_rng(0)
    target = rng.integers(0, 5, size=(30, 40))  # 0 = unlabelled
    pred = np.where(rng.random(target.shape) < 0.7, target, rng.integers(0, 6, size=target.shape))
    got = classification_metrics(pred, target, ignore_index=0)
    keep = target != 0
    p, t = pred[keep], target[keep]
    acc = {c: float(np.mean(p[t == c] == c)) for c in range(1, 5)}
    po = float(np.mean(p == t))
    pe = sum(np.mean(t == c) * np.mean(p == c) for c in range(0, 6))
    assert got["oa"] == pytest.approx(po, abs=1e-12)
    assert got["per_class"] == pytest.approx(acc, abs=1e-12)
    assert got["aa"] == pytest.approx(np.mean(list(acc.values())), abs=1e-12)
    assert got["kappa"] == pytest.approx((po - pe) / (1 - pe), abs=1e-12)
    assert 0 < got["kappa"] < got["oa"] < 1


def test_classification_metrics_count_unassigned_as_wrong_and_reject_empty() -> None:
    target = np.array([[1, 1, 2, 2]])
    assert classification_metrics(np.array([[1, 0, 2, 2]]), target)["oa"] == 0.75
    with pytest.raises(ValueError, match="no labelled pixel"):
        classification_metrics(target, np.zeros_like(target))


def test_one_class_metrics_equal_direct_computation() -> None:
    rng = np.random.default_rng(1)
    gt = rng.random((20, 20)) < 0.3
    valid = rng.random((20, 20)) < 0.8
    pred = np.where(rng.random(gt.shape) < 0.8, gt, ~gt)
    got = one_class_metrics(pred, gt, valid)
    p, g = pred[valid], gt[valid]
    tp, fp, fn = np.sum(p & g), np.sum(p & ~g), np.sum(~p & g)
    assert got["precision"] == pytest.approx(tp / (tp + fp))
    assert got["recall"] == pytest.approx(tp / (tp + fn))
    assert got["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))


def _direct_roc(scores: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """sklearn's roc_curve(drop_intermediate=False) points, computed directly: one per distinct score, descending."""
    thr = np.unique(scores)[::-1]
    tpr = np.array([np.sum((scores >= t) & gt) / gt.sum() for t in thr])
    fpr = np.array([np.sum((scores >= t) & ~gt) / (~gt).sum() for t in thr])
    return fpr, tpr, thr


@pytest.mark.parametrize("binary", [True, False])
def test_detection_auc_equals_the_released_computation(binary: bool) -> None:
    rng = np.random.default_rng(2)
    gt = np.zeros((24, 24), dtype=bool)
    gt[5:9, 5:9] = True
    gt[15:17, 18:21] = True
    noise = rng.random(gt.shape)
    scores = (np.where(gt, noise < 0.8, noise < 0.1) if binary else np.clip(0.5 * gt + 0.6 * noise, 0, 1))
    scores = scores.astype(np.float64)
    got = detection_auc(scores, gt)
    fpr, tpr, thr = _direct_roc(scores.ravel(), gt.ravel())
    # the released code prepends the "nothing detected" point and drops it again: the direct points start at the
    # first threshold; areas by the trapezoid rule, x decreasing for the threshold axes (sklearn.metrics.auc)
    def trap(y: np.ndarray, x: np.ndarray) -> float:
        return float(abs(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2)))
    want = {"auc_pd_pf": trap(tpr, fpr), "auc_tau_pd": trap(tpr, thr), "auc_tau_pf": trap(fpr, thr)}
    want["auc_oa"] = want["auc_pd_pf"] + want["auc_tau_pd"] - want["auc_tau_pf"]
    want["auc_snpr"] = want["auc_tau_pd"] / want["auc_tau_pf"]
    assert got == pytest.approx(want, rel=1e-6)  # torchmetrics divides in float32
    if binary:  # two ROC points after the first is dropped: (pf, pd) at 1 and (1, 1) at 0
        pd, pf = float(np.mean(scores[gt] == 1)), float(np.mean(scores[~gt] == 1))
        assert got["auc_pd_pf"] == pytest.approx((1 - pf) * (1 + pd) / 2)
        assert got["auc_tau_pd"] == pytest.approx((1 + pd) / 2)


def test_detection_auc_rejects_scores_outside_unit_range() -> None:
    gt = np.array([[0, 1]])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        detection_auc(np.array([[0.0, 2.0]]), gt)


def test_change_metrics_equal_direct_computation() -> None:
    rng = np.random.default_rng(3)
    gt = rng.random((30, 30)) < 0.25
    pred = np.where(rng.random(gt.shape) < 0.85, gt, ~gt)
    got = change_metrics(pred.astype(np.uint8), gt.astype(np.uint8))
    tp, fp = np.sum(pred & gt), np.sum(pred & ~gt)
    fn, tn = np.sum(~pred & gt), np.sum(~pred & ~gt)
    n = gt.size
    oa = (tp + tn) / n
    pe = ((tp + fp) * (tp + fn) + (fn + tn) * (fp + tn)) / n**2
    assert got == pytest.approx({"oa": oa, "kappa": (oa - pe) / (1 - pe), "precision": tp / (tp + fp),
                                 "recall": tp / (tp + fn), "f1": 2 * tp / (2 * tp + fp + fn),
                                 "iou": tp / (tp + fp + fn)})
