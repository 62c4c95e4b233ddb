"""Downstream metrics against direct numpy computations and against pysodmetrics 1.6.2's published outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_f1_score, multiclass_jaccard_index

from stages.metrics import saliency_metrics, segmentation_metrics, tracking_curves, tracking_metrics


# ------------------------------------------------------------------------------------------------ segmentation
def _direct_segmentation(pred: np.ndarray, target: np.ndarray, k: int, ignore: int) -> dict[str, float]:
    keep = target != ignore
    p, t = pred[keep], target[keep]
    acc, f1, iou = [], [], []
    for c in range(k):
        if not (t == c).any():
            continue
        tp = np.sum((p == c) & (t == c))
        fp = np.sum((p == c) & (t != c))
        fn = np.sum((p != c) & (t == c))
        acc.append(tp / (tp + fn))
        f1.append(2 * tp / (2 * tp + fp + fn))
        iou.append(tp / (tp + fp + fn))
    return {"oa": float(np.mean(p == t)), "macc": float(np.mean(acc)), "mf1": float(np.mean(f1)),
            "miou": float(np.mean(iou))}


@pytest.mark.parametrize("ignore", [0, 255])
def test_segmentation_metrics_equal_direct_computation(ignore: int) -> None:
    rng = np.random.default_rng(0)
    k = 6
    target = rng.integers(0, k, size=(40, 50))
    target[rng.random(target.shape) < 0.1] = ignore
    target[target == 4] = 5  # class 4 absent from the target ...
    pred = np.where(rng.random(target.shape) < 0.6, target, rng.integers(0, k, size=target.shape))
    pred[pred == ignore] = 1
    assert (pred == 4).any()  # ... but predicted: it must not enter the class means
    got = segmentation_metrics(pred, target, k, ignore)
    want = _direct_segmentation(pred, target, k, ignore)
    assert got == pytest.approx(want, abs=1e-12)
    assert 0 < got["miou"] < got["mf1"] < 1


def test_segmentation_metrics_match_torchmetrics_macro_when_every_class_is_present() -> None:
    """HS3-Bench's numbers (torchmetrics macro averages) whenever all classes occur in the target."""
    rng = np.random.default_rng(1)
    k, ignore = 5, 0
    target = rng.integers(0, k, size=(30, 30))
    pred = np.where(rng.random(target.shape) < 0.7, target, rng.integers(1, k, size=target.shape))
    got = segmentation_metrics(torch.from_numpy(pred), torch.from_numpy(target), k, ignore)
    p, t = torch.from_numpy(pred), torch.from_numpy(target)
    kw = {"num_classes": k, "ignore_index": ignore}
    assert got["oa"] == pytest.approx(float(multiclass_accuracy(p, t, average="micro", **kw)), abs=1e-6)
    assert got["macc"] == pytest.approx(float(multiclass_accuracy(p, t, average="macro", **kw)), abs=1e-6)
    assert got["mf1"] == pytest.approx(float(multiclass_f1_score(p, t, average="macro", **kw)), abs=1e-6)
    assert got["miou"] == pytest.approx(float(multiclass_jaccard_index(p, t, average="macro", **kw)), abs=1e-6)


def test_segmentation_metrics_pool_pixels_over_images_of_different_sizes() -> None:
    rng = np.random.default_rng(2)
    targets = [rng.integers(0, 4, size=s) for s in ((8, 9), (13, 5))]
    preds = [np.where(rng.random(t.shape) < 0.5, t, 3 - t) for t in targets]
    pooled = _direct_segmentation(np.concatenate([p.ravel() for p in preds]),
                                  np.concatenate([t.ravel() for t in targets]), 4, 255)
    assert segmentation_metrics(preds, targets, 4, 255) == pytest.approx(pooled, abs=1e-12)


def test_segmentation_metrics_reject_unknown_class_ids() -> None:
    target = np.array([[0, 1], [2, 7]])
    with pytest.raises(ValueError, match="class id 7 outside"):
        segmentation_metrics(np.zeros_like(target), target, 3, 255)


# ---------------------------------------------------------------------------------------------------- saliency
def _cases() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Deterministic uint8 (prediction, mask) pairs, as pysodmetrics reads saved maps."""
    out = {}
    y, x = np.mgrid[0:24, 0:32].astype(np.float64)
    d2 = (y - 12) ** 2 + (x - 18) ** 2
    pred = np.clip(np.exp(-d2 / (2 * 8.0**2)) + 0.15 * np.sin(0.7 * x + 0.3 * y), 0, 1)
    out["disk"] = ((pred * 255).round().astype(np.uint8), (d2 <= 49).astype(np.uint8) * 255)
    gt = np.zeros((20, 30), np.uint8)
    gt[3:9, 20:28] = 255
    yy, xx = np.mgrid[0:20, 0:30].astype(np.float64)
    pred = np.clip(0.5 + 0.4 * np.cos(xx / 4.0) * np.sin(yy / 3.0) + (xx > 18) * 0.2, 0, 1)
    out["rect"] = ((pred * 255).round().astype(np.uint8), gt)
    out["empty"] = (((np.mgrid[0:12, 0:16][1] * 13) % 256).astype(np.uint8), np.zeros((12, 16), np.uint8))
    gt = np.zeros((5, 7), np.uint8)
    gt[2, 3] = 255
    out["single"] = (((np.arange(35).reshape(5, 7) * 7) % 256).astype(np.uint8), gt)
    out["full"] = (((np.arange(54).reshape(6, 9) * 11) % 256).astype(np.uint8), np.full((6, 9), 255, np.uint8))
    return out


# Outputs of pysodmetrics 1.6.2 (Fmeasure(beta=0.3) curve max, Emeasure curve mean, Smeasure, MAE) on _cases().
PYSOD = {
    "disk": (0.8796356538711777, 0.5616413650668209, 0.6754546691554887, 0.29788602941176473),
    "rect": (0.7905405405405406, 0.39721800090266046, 0.41617515045300824, 0.45526928675400297),
    "empty": (0.0, 0.5006544502617801, 0.4999999999999999, 0.5000000000000001),
    "single": (0.07103825136612021, 0.29875902063659776, 0.3641367606825666, 0.5),
    "full": (1.0, 0.4678655660377358, 0.45886400234226316, 0.5411359976577368),
    "all": (0.38410919195590276, 0.4452276805811191, 0.4829261165266653, 0.4588582627647009),
}


@pytest.mark.parametrize("name", sorted(PYSOD))
def test_saliency_measures_equal_pysodmetrics(name: str) -> None:
    cases = _cases()
    items = list(cases.values()) if name == "all" else [cases[name]]
    got = saliency_metrics([p / 255 for p, _ in items], [g / 255 for _, g in items])
    assert (got["max_f"], got["e_measure"], got["s_measure"], got["mae"]) == pytest.approx(PYSOD[name], abs=1e-12)


def _direct_auc(p: np.ndarray, g: np.ndarray) -> float:
    """Binned ROC over thresholds linspace(0, 1, 256) (predicted positive when p >= t), trapezoid area."""
    p = (p - p.min()) / (p.max() - p.min())
    tpr, fpr = [], []
    for t in np.linspace(1, 0, 256):
        hit = p >= t
        tpr.append(np.sum(hit & g) / np.sum(g))
        fpr.append(np.sum(hit & ~g) / np.sum(~g))
    return float(np.trapezoid(tpr, fpr))


def test_saliency_auc_cc_mae_equal_direct_computation() -> None:
    rng = np.random.default_rng(3)
    gt = np.zeros((30, 40), bool)
    gt[8:20, 10:26] = True
    pred = np.clip(0.35 * gt + 0.65 * rng.random(gt.shape), 0, 1)
    got = saliency_metrics(pred, gt)
    norm = (pred - pred.min()) / (pred.max() - pred.min())
    assert got["auc"] == pytest.approx(_direct_auc(pred, gt), abs=1e-6)
    assert got["cc"] == pytest.approx(float(np.corrcoef(norm.ravel(), gt.ravel().astype(float))[0, 1]), abs=1e-9)
    assert got["mae"] == pytest.approx(float(np.mean(np.abs(norm - gt))), abs=1e-12)
    assert 0.7 < got["auc"] < 1


def test_saliency_perfect_map_scores_best() -> None:
    gt = np.zeros((16, 16))
    gt[4:10, 5:12] = 1
    got = saliency_metrics(gt, gt)
    assert got == pytest.approx({"mae": 0.0, "max_f": 1.0, "auc": 1.0, "cc": 1.0, "s_measure": 1.0,
                                 "e_measure": got["e_measure"]}, abs=1e-6)
    assert got["e_measure"] > 0.99


def test_saliency_metrics_reject_logits() -> None:
    with pytest.raises(ValueError, match="apply a sigmoid"):
        saliency_metrics(np.full((4, 4), 3.0), np.zeros((4, 4)))


# ---------------------------------------------------------------------------------------------------- tracking
def _direct_iou(a: np.ndarray, b: np.ndarray) -> float:
    ix = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def test_tracking_metrics_equal_direct_computation() -> None:
    rng = np.random.default_rng(4)
    gt = np.column_stack([rng.uniform(0, 100, 30), rng.uniform(0, 80, 30), rng.uniform(10, 40, 30),
                          rng.uniform(10, 40, 30)])
    pred = gt + rng.normal(0, 8, gt.shape)
    pred[:, 2:] = np.abs(pred[:, 2:]) + 1
    ious = np.array([_direct_iou(p, g) for p, g in zip(pred, gt, strict=True)])
    errors = np.hypot(pred[:, 0] + pred[:, 2] / 2 - gt[:, 0] - gt[:, 2] / 2,
                      pred[:, 1] + pred[:, 3] / 2 - gt[:, 1] - gt[:, 3] / 2)
    success = [np.mean(ious > t) for t in np.arange(21) * 0.05]
    got = tracking_metrics(pred, gt)
    assert got["success_auc"] == pytest.approx(float(np.mean(success)), abs=1e-12)
    assert got["precision_20"] == pytest.approx(float(np.mean(errors <= 20)), abs=1e-12)
    assert 0 < got["success_auc"] < 1 and 0 < got["precision_20"] < 1


def test_tracking_curves_average_sequences_and_skip_frames_without_a_target() -> None:
    gt_a = np.array([[10, 10, 20, 20], [12, 10, 20, 20], [0, 0, 0, 0]], float)  # last frame: target absent
    pred_a = np.array([[10, 10, 20, 20], [40, 40, 20, 20], [5, 5, 9, 9]], float)
    gt_b = np.array([[0, 0, 10, 10]], float)
    pred_b = np.array([[0, 0, 10, 10]], float)
    curves = tracking_curves([pred_a, pred_b], [gt_a, gt_b])
    # sequence a: frame 1 exact (IoU 1), frame 2 lost (IoU 0); sequence b exact. Perfect frames pass every
    # threshold below 1 (IoU > t), so the mean curve is (0.5 + 1) / 2 up to t = 0.95 and 0 at t = 1.
    assert curves.success[:20] == pytest.approx(np.full(20, 0.75))
    assert curves.success[20] == 0
    assert tracking_metrics([pred_a, pred_b], [gt_a, gt_b])["precision_20"] == pytest.approx(0.75)
    assert tracking_metrics(pred_b, gt_b)["success_auc"] == pytest.approx(20 / 21)
