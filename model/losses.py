"""Prompt-driven segmentation losses of HyperVision pretraining, as SAM trains its mask decoder.

Each prompt yields M candidate masks (M = 3 with multimask output) and a predicted IoU per candidate. The mask
loss is a linear combination of focal and dice loss (SAM: 20:1); with several candidates only the one with the
lowest mask loss is back-propagated (SAM's ambiguity rule). The IoU head is regressed, with MSE, onto the actual
IoU of each candidate's thresholded mask with the target.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def sigmoid_focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25,
                       gamma: float = 2.0) -> torch.Tensor:
    """Per-mask focal loss (Lin et al. 2017), averaged over the pixels of each mask.

    `logits` and `targets` share a shape (..., H, W); returns (...). `alpha` weighs the positives (a negative
    value disables the weighting); `gamma` down-weights easy pixels.
    """
    targets = targets.to(logits.dtype)
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss.flatten(-2).mean(-1)


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Per-mask soft dice loss 1 - (2|P.T| + s) / (|P| + |T| + s) on sigmoid probabilities: (..., H, W) -> (...).

    The smoothing term `s` keeps an empty target with an empty prediction at zero loss.
    """
    prob = logits.sigmoid().flatten(-2)
    targets = targets.to(prob.dtype).flatten(-2)
    inter = (prob * targets).sum(-1)
    return 1 - (2 * inter + smooth) / (prob.sum(-1) + targets.sum(-1) + smooth)


@torch.no_grad()
def mask_iou(logits: torch.Tensor, targets: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
    """IoU of the thresholded logits (logit > threshold) with the boolean targets: (..., H, W) -> (...).

    Two empty masks count as a perfect match (IoU 1). No gradient: this is the IoU head's regression target.
    """
    pred = (logits > threshold).flatten(-2)
    tgt = targets.bool().flatten(-2)
    inter = (pred & tgt).sum(-1).to(torch.float32)
    union = (pred | tgt).sum(-1).to(torch.float32)
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def iou_mse_loss(iou_pred: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor,
                 threshold: float = 0.0) -> torch.Tensor:
    """Per-mask squared error between the predicted IoU and the actual IoU of the thresholded mask: (...)."""
    return (iou_pred.float() - mask_iou(logits, targets, threshold)) ** 2


@dataclass(frozen=True)
class SegLossConfig:
    """Weights and hyper-parameters of the segmentation loss (defaults: SAM's 20:1:1)."""

    focal_weight: float = 20.0
    dice_weight: float = 1.0
    iou_weight: float = 1.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    mask_threshold: float = 0.0


@dataclass
class SegLoss:
    """The loss of N prompts (one each) and their components, each averaged over the prompts."""

    total: torch.Tensor
    focal: torch.Tensor
    dice: torch.Tensor
    iou: torch.Tensor
    chosen_iou: torch.Tensor
    """Actual IoU of the back-propagated candidates, (N,): a progress metric."""


def segmentation_loss(logits: torch.Tensor, iou_pred: torch.Tensor, targets: torch.Tensor,
                      config: SegLossConfig = SegLossConfig()) -> SegLoss:
    """SAM's loss for N prompts: `logits` (N, M, H, W), `iou_pred` (N, M), `targets` (N, H, W) bool.

    Per prompt, the candidate with the lowest focal*w_f + dice*w_d is trained on the mask loss (all of them
    when M = 1); the IoU MSE covers every candidate, so the IoU head learns to rank them. N = 0 gives zeros
    that keep the graph connected.
    """
    if logits.ndim != 4 or iou_pred.shape != logits.shape[:2] or targets.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(
            f"segmentation_loss expects logits (N, M, H, W), iou_pred (N, M), targets (N, H, W); got "
            f"{tuple(logits.shape)}, {tuple(iou_pred.shape)}, {tuple(targets.shape)}."
        )
    logits = logits.float()
    if logits.shape[0] == 0:
        zero = logits.sum() * 0 + iou_pred.float().sum() * 0
        return SegLoss(zero, zero, zero, zero, torch.zeros(0, device=logits.device))
    tgt = targets.unsqueeze(1).expand_as(logits)
    focal = sigmoid_focal_loss(logits, tgt, config.focal_alpha, config.focal_gamma)
    dice = dice_loss(logits, tgt)
    iou = iou_mse_loss(iou_pred, logits, tgt, config.mask_threshold)
    mask_loss = config.focal_weight * focal + config.dice_weight * dice
    best = mask_loss.detach().argmin(dim=1, keepdim=True)
    focal_b, dice_b = _pick(focal, best).mean(), _pick(dice, best).mean()
    iou_mean = iou.mean()
    total = config.focal_weight * focal_b + config.dice_weight * dice_b + config.iou_weight * iou_mean
    chosen = _pick(mask_iou(logits, tgt, config.mask_threshold), best)
    return SegLoss(total, focal_b, dice_b, iou_mean, chosen)


def _pick(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """values (N, M) at one candidate per prompt, index (N, 1) -> (N,)."""
    return values.gather(1, index).squeeze(1)
