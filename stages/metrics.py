"""Downstream metrics as the paper's benchmarks compute them: HS3-Bench segmentation scores, the salient-object
measures of SMN / pysodmetrics, OTB one-pass tracking curves, and the airborne zero-shot scores (pixel
classification OA / AA / kappa, one-class precision / recall / F1, HyperFree's five detection AUCs, change-detection
scores of the change class).

Counting and curve code comes from torchmetrics where it has the metric (confusion matrix, binned ROC AUC, Pearson
correlation). S-measure (Fan et al., ICCV 2017), E-measure (Fan et al., IJCAI 2018) and the F-measure curve follow
pysodmetrics' definitions step for step; pysodmetrics itself is not a dependency because every release caps numpy
below the project's pin and pulls OpenCV, scikit-image and scikit-learn (tests pin its outputs instead).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torchmetrics.functional import pearson_corrcoef
from torchmetrics.functional.classification import binary_auroc, binary_roc, multiclass_confusion_matrix

ArrayLike = np.ndarray | torch.Tensor
"""A numpy array or a torch tensor (moved to the CPU when read)."""

#: Version of the metric definitions below: bump it when a definition changes, so that results computed under
#: another definition are never compared with today's (the research loop records it with every evaluation).
METRICS_VERSION = "1"
EPS = float(np.spacing(1))
"""MATLAB's eps, the guard the S- and E-measure definitions use."""
F_BETA2 = 0.3
"""beta^2 of the salient-object F-measure."""
SALIENCY_LEVELS = 256
"""Binarisation thresholds of the F-, E-measure and ROC curves."""
IOU_THRESHOLDS = np.linspace(0.0, 1.0, 21)
"""OTB success-plot thresholds 0:0.05:1."""
ERROR_THRESHOLDS = np.arange(0, 51, dtype=np.float64)
"""OTB precision-plot thresholds in pixels (0..50); precision_20 reads the value at 20 px."""


def _numpy(x: ArrayLike) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _pairs(pred: ArrayLike | Sequence[ArrayLike], target: ArrayLike | Sequence[ArrayLike], what: str,
           item_ndim: int | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """One (pred, target) pair per item: a single array pair (split along its first axis when it has one dimension
    more than an item, `item_ndim`), or two sequences of the same length."""
    if isinstance(pred, np.ndarray | torch.Tensor) and isinstance(target, np.ndarray | torch.Tensor):
        p, t = _numpy(pred), _numpy(target)
        stacked = item_ndim is not None and p.ndim == item_ndim + 1 and t.ndim == item_ndim + 1
        pairs = list(zip(p, t, strict=True)) if stacked and len(p) == len(t) else [(p, t)]
    else:
        preds, targets = list(pred), list(target)  # type: ignore[arg-type]
        if len(preds) != len(targets) or not preds:
            raise ValueError(
                f"{what}: got {len(preds)} predictions for {len(targets)} targets; pass one prediction per image."
            )
        pairs = [(_numpy(p), _numpy(t)) for p, t in zip(preds, targets, strict=True)]
    for i, (p, t) in enumerate(pairs):
        if p.shape != t.shape:
            raise ValueError(
                f"{what}: prediction {i} has shape {p.shape} but its target {t.shape}; resize the prediction to "
                "the label's size before scoring."
            )
    return pairs


# ------------------------------------------------------------------------------------------------ segmentation
def confusion_matrix(
    pred: ArrayLike | Sequence[ArrayLike],
    target: ArrayLike | Sequence[ArrayLike],
    num_classes: int,
    ignore_index: int | None,
) -> np.ndarray:
    """(num_classes, num_classes) pixel counts, rows = target class, columns = predicted class, over the pixels
    whose target is not `ignore_index`; sums over images when given sequences (torchmetrics' confusion matrix)."""
    total = np.zeros((num_classes, num_classes), dtype=np.int64)
    for i, (p, t) in enumerate(_pairs(pred, target, "segmentation_metrics")):
        p, t = p.astype(np.int64).ravel(), t.astype(np.int64).ravel()
        keep = t != ignore_index if ignore_index is not None else np.ones_like(t, dtype=bool)
        bad_t = (t[keep] < 0) | (t[keep] >= num_classes)
        if bad_t.any():
            raise ValueError(
                f"segmentation_metrics: target {i} holds class id {int(t[keep][bad_t][0])} outside "
                f"[0, {num_classes}) that is not ignore_index={ignore_index}; fix num_classes or the label map."
            )
        if ((p < 0) | (p >= num_classes)).any():
            raise ValueError(
                f"segmentation_metrics: prediction {i} holds ids outside [0, {num_classes}); predict with a head "
                f"of num_classes={num_classes}."
            )
        total += multiclass_confusion_matrix(
            torch.from_numpy(p), torch.from_numpy(t), num_classes, ignore_index=ignore_index, validate_args=False
        ).numpy()
    return total


def scores_from_confusion(confusion: np.ndarray) -> dict[str, float]:
    """`oa` (micro accuracy), `macc` (mean class accuracy), `mf1` (macro F1) and `miou` from a confusion matrix;
    the class means run over the classes present in the target (support > 0)."""
    cm = np.asarray(confusion, dtype=np.float64)
    tp = np.diag(cm)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    present = support > 0
    if not present.any():
        raise ValueError("segmentation_metrics: no labelled pixel to score (every target pixel is ignore_index).")
    tp, support, predicted = tp[present], support[present], predicted[present]
    return {
        "oa": float(np.trace(cm) / cm.sum()),
        "macc": float(np.mean(tp / support)),
        "mf1": float(np.mean(2 * tp / (support + predicted))),
        "miou": float(np.mean(tp / (support + predicted - tp))),
    }


def segmentation_metrics(
    pred: ArrayLike | Sequence[ArrayLike],
    target: ArrayLike | Sequence[ArrayLike],
    num_classes: int,
    ignore_index: int | None,
) -> dict[str, float]:
    """HS3-Bench scores of class maps (one pair, or one per image): `oa`, `macc`, `mf1`, `miou` in [0, 1]."""
    return scores_from_confusion(confusion_matrix(pred, target, num_classes, ignore_index))


# ---------------------------------------------------------------------------------------------------- saliency
def _prepare_saliency(pred: np.ndarray, gt: np.ndarray, index: int) -> tuple[np.ndarray, np.ndarray]:
    """Prediction as float64 min-max normalised per image (MATLAB mapminmax, as SOD toolkits), mask as bool."""
    p = pred.astype(np.float64)
    if p.size == 0 or not np.isfinite(p).all() or p.min() < 0 or p.max() > 1:
        raise ValueError(
            f"saliency_metrics: prediction {index} must be a non-empty map of finite values in [0, 1]; apply a "
            "sigmoid to logits first."
        )
    if p.max() != p.min():
        p = (p - p.min()) / (p.max() - p.min())
    return p, gt.astype(np.float64) > 0.5


def _threshold_counts(p: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For thresholds 255..0 on the 8-bit map: predicted-foreground pixels inside and outside the mask."""
    levels = (p * 255).astype(np.uint8)
    bins = np.linspace(0, 256, 257)
    fg = np.cumsum(np.flip(np.histogram(levels[g], bins=bins)[0]))
    bg = np.cumsum(np.flip(np.histogram(levels[~g], bins=bins)[0]))
    return fg.astype(np.float64), bg.astype(np.float64)


def f_measure_curve(p: np.ndarray, g: np.ndarray, beta2: float = F_BETA2) -> np.ndarray:
    """F-measure at the 256 thresholds (255..0) of a normalised map `p` against the bool mask `g`."""
    tp, fp = _threshold_counts(p, g)
    predicted = tp + fp
    predicted[predicted == 0] = 1
    precision = tp / predicted
    recall = tp / max(int(np.count_nonzero(g)), 1)
    numerator = (1 + beta2) * precision * recall
    denominator = np.where(numerator == 0, 1, beta2 * precision + recall)
    return numerator / denominator


def e_measure_curve(p: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Enhanced-alignment measure at the 256 thresholds (255..0) of a normalised map `p` against the mask `g`."""
    n = g.size
    n_fg = int(np.count_nonzero(g))
    tp, fp = _threshold_counts(p, g)
    pred_fg = tp + fp
    pred_bg = n - pred_fg
    if n_fg == 0:
        enhanced = pred_bg
    elif n_fg == n:
        enhanced = pred_fg
    else:
        fn = n_fg - tp
        tn = pred_bg - fn
        mean_pred = pred_fg / n
        mean_gt = n_fg / n
        enhanced = np.zeros_like(tp)
        for count, a, b in ((tp, 1 - mean_pred, 1 - mean_gt), (fp, 1 - mean_pred, -mean_gt),
                            (fn, -mean_pred, 1 - mean_gt), (tn, -mean_pred, -mean_gt)):
            align = 2 * a * b / (a**2 + b**2 + EPS)
            enhanced = enhanced + (align + 1) ** 2 / 4 * count
    return enhanced / (n - 1 + EPS)


def _s_object(x: np.ndarray) -> float:
    mean = float(np.mean(x))
    std = float(np.std(x, ddof=1)) if x.size > 1 else 0.0
    return 2 * mean / (mean**2 + 1 + std + EPS)


def _ssim(p: np.ndarray, g: np.ndarray) -> float:
    n = p.size
    x, y = float(p.mean()), float(g.mean())
    sx = float(np.sum((p - x) ** 2)) / (n - 1 + EPS)
    sy = float(np.sum((g - y) ** 2)) / (n - 1 + EPS)
    sxy = float(np.sum((p - x) * (g - y))) / (n - 1 + EPS)
    alpha = 4 * x * y * sxy
    beta = (x**2 + y**2) * (sx + sy)
    if alpha != 0:
        return alpha / (beta + EPS)
    return 1.0 if beta == 0 else 0.0


def s_measure(p: np.ndarray, g: np.ndarray, alpha: float = 0.5) -> float:
    """Structure measure: alpha x object-aware + (1 - alpha) x region-aware similarity (4 quadrants split at the
    mask's centroid, each an SSIM weighted by its area)."""
    y = float(g.mean())
    if y == 0:
        return 1 - float(p.mean())
    if y == 1:
        return float(p.mean())
    gf = g.astype(np.float64)
    obj = y * _s_object(p[g]) + (1 - y) * _s_object((1 - p)[~g])
    h, w = g.shape
    cy, cx = (int(v) + 1 for v in np.argwhere(g).mean(axis=0).round())
    weights = (cx * cy / (h * w), cy * (w - cx) / (h * w), (h - cy) * cx / (h * w))
    quads = ((slice(0, cy), slice(0, cx)), (slice(0, cy), slice(cx, w)), (slice(cy, h), slice(0, cx)),
             (slice(cy, h), slice(cx, w)))
    region = sum(wt * _ssim(p[q], gf[q]) for wt, q in zip((*weights, 1 - sum(weights)), quads, strict=True))
    return max(0.0, alpha * obj + (1 - alpha) * region)


def saliency_metrics(pred: ArrayLike | Sequence[ArrayLike], gt: ArrayLike | Sequence[ArrayLike]) -> dict[str, float]:
    """Salient-object scores of saliency maps in [0, 1] against binary masks (one pair, or one per image).

    Each map is min-max normalised first (as SOD toolkits read saved maps). `mae`, `auc` (binned ROC over 256
    thresholds, torchmetrics), `cc` (Pearson; 0 for a constant map or mask), `s_measure` are means over images;
    `max_f` is the maximum over thresholds of the image-mean F-measure curve (beta^2 = 0.3); `e_measure` is the mean
    over thresholds of the image-mean E-measure curve. AUC skips images whose mask is all one class.
    """
    maes, aucs, ccs, sms, f_curves, e_curves = [], [], [], [], [], []
    for i, (raw_p, raw_g) in enumerate(_pairs(pred, gt, "saliency_metrics", item_ndim=2)):
        p, g = _prepare_saliency(raw_p, raw_g, i)
        maes.append(float(np.mean(np.abs(p - g))))
        f_curves.append(f_measure_curve(p, g))
        e_curves.append(e_measure_curve(p, g))
        sms.append(s_measure(p, g))
        pt, gt_t = torch.from_numpy(p.ravel()), torch.from_numpy(g.ravel())
        if 0 < np.count_nonzero(g) < g.size:
            aucs.append(float(binary_auroc(pt, gt_t.long(), thresholds=SALIENCY_LEVELS, validate_args=False)))
        constant = p.min() == p.max() or g.min() == g.max()
        ccs.append(0.0 if constant else float(pearson_corrcoef(pt, gt_t.double())))
    return {
        "mae": float(np.mean(maes)),
        "max_f": float(np.max(np.mean(f_curves, axis=0))),
        "auc": float(np.mean(aucs)) if aucs else float("nan"),
        "cc": float(np.mean(ccs)),
        "s_measure": float(np.mean(sms)),
        "e_measure": float(np.mean(np.mean(e_curves, axis=0))),
    }


# ---------------------------------------------------------------------------------------------------- tracking
@dataclass(frozen=True)
class TrackingCurves:
    """OTB one-pass-evaluation curves, averaged over sequences (for plots and the scalar scores)."""

    iou_thresholds: np.ndarray
    success: np.ndarray
    """Fraction of frames with IoU > threshold."""
    error_thresholds: np.ndarray
    precision: np.ndarray
    """Fraction of frames whose centre error is <= threshold (pixels)."""


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of paired (x, y, w, h) boxes, shapes (N, 4)."""
    left = np.maximum(a[:, 0], b[:, 0])
    top = np.maximum(a[:, 1], b[:, 1])
    right = np.minimum(a[:, 0] + a[:, 2], b[:, 0] + b[:, 2])
    bottom = np.minimum(a[:, 1] + a[:, 3], b[:, 1] + b[:, 3])
    inter = np.clip(right - left, 0, None) * np.clip(bottom - top, 0, None)
    union = a[:, 2] * a[:, 3] + b[:, 2] * b[:, 3] - inter
    return np.clip(inter / np.maximum(union, np.finfo(np.float64).eps), 0.0, 1.0)


def centre_error(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Euclidean distance in pixels between the centres of paired (x, y, w, h) boxes."""
    ca = a[:, :2] + a[:, 2:] / 2
    cb = b[:, :2] + b[:, 2:] / 2
    return np.sqrt(((ca - cb) ** 2).sum(axis=1))


def _box_pairs(pred_boxes: ArrayLike | Sequence[ArrayLike],
               gt_boxes: ArrayLike | Sequence[ArrayLike]) -> list[tuple[np.ndarray, np.ndarray]]:
    pairs = _pairs(pred_boxes, gt_boxes, "tracking_metrics", item_ndim=2)
    out = []
    for i, (p, g) in enumerate(pairs):
        if p.ndim != 2 or p.shape[1] != 4:
            raise ValueError(f"tracking_metrics: sequence {i} boxes have shape {p.shape}; expected (frames, 4) "
                             "as x, y, w, h per frame.")
        valid = np.isfinite(g).all(axis=1) & (g[:, 2] > 0) & (g[:, 3] > 0)
        if not valid.any():
            raise ValueError(f"tracking_metrics: sequence {i} has no frame with a valid ground-truth box (w, h > 0).")
        out.append((p[valid].astype(np.float64), g[valid].astype(np.float64)))
    return out


def tracking_curves(pred_boxes: ArrayLike | Sequence[ArrayLike],
                    gt_boxes: ArrayLike | Sequence[ArrayLike]) -> TrackingCurves:
    """Success and precision curves of one sequence (N, 4) or of several (one array per sequence), frames without
    a valid ground-truth box (non-finite, zero width or height) left out; each sequence weighs the same."""
    success, precision = [], []
    for p, g in _box_pairs(pred_boxes, gt_boxes):
        iou = np.nan_to_num(box_iou(p, g), nan=0.0)
        err = centre_error(p, g)
        err[~np.isfinite(err)] = np.inf
        success.append((iou[:, None] > IOU_THRESHOLDS[None, :]).mean(axis=0))
        precision.append((err[:, None] <= ERROR_THRESHOLDS[None, :]).mean(axis=0))
    return TrackingCurves(IOU_THRESHOLDS.copy(), np.mean(success, axis=0), ERROR_THRESHOLDS.copy(),
                          np.mean(precision, axis=0))


def tracking_metrics(pred_boxes: ArrayLike | Sequence[ArrayLike],
                     gt_boxes: ArrayLike | Sequence[ArrayLike]) -> dict[str, float]:
    """OTB scores: `success_auc` (mean of the success curve over IoU thresholds 0:0.05:1) and `precision_20`
    (fraction of frames with centre error <= 20 px)."""
    curves = tracking_curves(pred_boxes, gt_boxes)
    return {
        "success_auc": float(curves.success.mean()),
        "precision_20": float(curves.precision[int(np.flatnonzero(ERROR_THRESHOLDS == 20)[0])]),
    }


# ------------------------------------------------------------------------------------------ airborne zero-shot
def _flat_pair(pred: ArrayLike, target: ArrayLike, what: str) -> tuple[np.ndarray, np.ndarray]:
    p, t = _numpy(pred), _numpy(target)
    if p.shape != t.shape:
        raise ValueError(f"{what}: prediction has shape {p.shape} but its target {t.shape}; score maps of the "
                         "scene's size.")
    return p.ravel(), t.ravel()


def classification_metrics(pred: ArrayLike, target: ArrayLike, ignore_index: int | None = 0) -> dict[str, object]:
    """Pixel classification scores over the pixels whose target is not `ignore_index`: `oa` (overall accuracy),
    `aa` (mean of the per-class accuracies), `kappa` (Cohen's) and `per_class` (class id -> accuracy, for the
    classes present in the target). A predicted id absent from the target (e.g. 0, "unassigned") counts as wrong."""
    p, t = _flat_pair(pred, target, "classification_metrics")
    p, t = p.astype(np.int64), t.astype(np.int64)
    keep = t != ignore_index if ignore_index is not None else np.ones(t.shape, dtype=bool)
    p, t = p[keep], t[keep]
    if not t.size:
        raise ValueError("classification_metrics: no labelled pixel to score (every target pixel is ignore_index).")
    if (p < 0).any() or (t < 0).any():
        raise ValueError("classification_metrics: class ids must be >= 0.")
    k = int(max(p.max(), t.max())) + 1
    cm = multiclass_confusion_matrix(torch.from_numpy(p), torch.from_numpy(t), k, validate_args=False).numpy()
    cm = cm.astype(np.float64)
    n = cm.sum()
    support = cm.sum(axis=1)
    present = np.flatnonzero(support > 0)
    per_class = {int(c): float(cm[c, c] / support[c]) for c in present}
    po = float(np.trace(cm) / n)
    pe = float((cm.sum(axis=0) * support).sum() / n**2)
    kappa = (po - pe) / (1 - pe) if pe < 1 else 1.0
    return {"oa": po, "aa": float(np.mean(list(per_class.values()))), "kappa": float(kappa), "per_class": per_class}


def one_class_metrics(pred: ArrayLike, positive: ArrayLike, valid: ArrayLike | None = None) -> dict[str, float]:
    """Precision, recall and F1 of a binary map against a positive-class mask, over the `valid` pixels (HyperFree's
    one-class evaluation: the labelled pixels only); 0 where a ratio has no denominator."""
    p, g = _flat_pair(pred, positive, "one_class_metrics")
    keep = _numpy(valid).ravel().astype(bool) if valid is not None else np.ones(p.shape, dtype=bool)
    p, g = p[keep].astype(bool), g[keep].astype(bool)
    tp = float(np.sum(p & g))
    fp = float(np.sum(p & ~g))
    fn = float(np.sum(~p & g))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def detection_auc(scores: ArrayLike, gt: ArrayLike) -> dict[str, float]:
    """HyperFree's (and HyperSIGMA's) five detection AUCs of a score map in [0, 1] against a binary ground truth:
    the exact ROC (every distinct score a threshold; torchmetrics), its first point (nothing detected) dropped as
    the released code drops it, then trapezoid areas `auc_pd_pf` (Pd over Pf), `auc_tau_pd` (Pd over the
    threshold), `auc_tau_pf` (Pf over the threshold), `auc_oa` = pd_pf + tau_pd - tau_pf and `auc_snpr` =
    tau_pd / tau_pf (inf when tau_pf is 0)."""
    s, g = _flat_pair(scores, gt, "detection_auc")
    s = s.astype(np.float64)
    if not np.isfinite(s).all() or s.min() < 0 or s.max() > 1:
        raise ValueError("detection_auc: scores must be finite and in [0, 1]; min-max normalise the score map.")
    g = g.astype(bool)
    if g.all() or not g.any():
        raise ValueError("detection_auc: the ground truth needs both target and background pixels.")
    fpr_t, tpr_t, _ = binary_roc(torch.from_numpy(s), torch.from_numpy(g.astype(np.int64)), thresholds=None,
                                 validate_args=False)
    fpr, tpr = fpr_t.double().numpy()[1:], tpr_t.double().numpy()[1:]
    thr = np.unique(s)[::-1]  # the thresholds after the first, in float64 (torchmetrics returns float32 ones)
    pd_pf = float(abs(np.trapezoid(tpr, fpr)))
    tau_pd = float(abs(np.trapezoid(tpr, thr)))
    tau_pf = float(abs(np.trapezoid(fpr, thr)))
    return {"auc_pd_pf": pd_pf, "auc_tau_pd": tau_pd, "auc_tau_pf": tau_pf, "auc_oa": pd_pf + tau_pd - tau_pf,
            "auc_snpr": tau_pd / tau_pf if tau_pf else float("inf")}


def change_metrics(pred: ArrayLike, gt: ArrayLike) -> dict[str, float]:
    """Binary change-map scores: `oa`, `kappa`, and `precision` (user's accuracy), `recall` (producer's
    accuracy), `f1` and `iou` of the change class (1), as HyperFree's change-detection evaluator counts them."""
    p, g = _flat_pair(pred, gt, "change_metrics")
    p, g = p.astype(bool), g.astype(bool)
    tp = float(np.sum(p & g))
    fp = float(np.sum(p & ~g))
    fn = float(np.sum(~p & g))
    tn = float(np.sum(~p & ~g))
    n = tp + fp + fn + tn
    oa = (tp + tn) / n
    pe = ((tp + fp) * (tp + fn) + (fn + tn) * (fp + tn)) / n**2
    return {"oa": oa, "kappa": (oa - pe) / (1 - pe) if pe < 1 else 1.0,
            "precision": tp / (tp + fp) if tp + fp else 0.0, "recall": tp / (tp + fn) if tp + fn else 0.0,
            "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0,
            "iou": tp / (tp + fp + fn) if tp + fp + fn else 0.0}
