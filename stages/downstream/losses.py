"""Per-task training losses of the heads: what one batch of samples costs.

Each loss is a small, picklable description (its task's name and label conventions, recorded in every checkpoint)
with `loss(head, batch, device)`; the trainer in stages/downstream/train.py is task-agnostic.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import generalized_box_iou_loss

from model.losses import dice_loss
from stages.downstream.samples import SaliencySample, SegmentationSample, TrackingPair, stack_features


class HeadLoss(Protocol):
    """What the trainer needs from a task: its name and the loss of a batch."""

    name: str

    def loss(self, head: nn.Module, batch: Sequence[Any], device: torch.device) -> torch.Tensor:
        """Scalar loss of `batch` under `head`."""
        ...


@dataclass(frozen=True)
class SegmentationLoss:
    """Pixel-wise cross-entropy at the label's native size; `ignore_index` pixels carry no loss."""

    num_classes: int
    ignore_index: int | None
    name: str = "segmentation"

    def loss(self, head: nn.Module, batch: Sequence[SegmentationSample], device: torch.device) -> torch.Tensor:
        """Mean cross-entropy over the labelled pixels of the batch."""
        logits = head(stack_features([s.features for s in batch], device))
        ignore = -100 if self.ignore_index is None else self.ignore_index
        total = logits.new_zeros((), dtype=torch.float32)
        count = 0
        for i, sample in enumerate(batch):
            target = sample.target.to(device)
            native = sample.restore(logits[i: i + 1])
            total = total + F.cross_entropy(native.float(), target[None], ignore_index=ignore, reduction="sum")
            count += int((target != ignore).sum())
        return total / max(count, 1)


@dataclass(frozen=True)
class SaliencyLoss:
    """Binary cross-entropy plus soft dice on the mask at native size (the usual SOD objective)."""

    name: str = "saliency"

    def loss(self, head: nn.Module, batch: Sequence[SaliencySample], device: torch.device) -> torch.Tensor:
        """Mean over images of BCE + dice."""
        logits = head(stack_features([s.features for s in batch], device))
        losses = []
        for i, sample in enumerate(batch):
            mask = sample.mask.to(device)
            native = sample.restore(logits[i: i + 1])[0, 0].float()
            losses.append(F.binary_cross_entropy_with_logits(native, mask) + dice_loss(native, mask))
        return torch.stack(losses).mean()


def cell_centres(height: int, width: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Centres (u, v) of an (height, width) response grid as fractions of the crop, each (height, width)."""
    v = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height
    u = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width
    return u.expand(height, width), v[:, None].expand(height, width)


def tracking_targets(boxes: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positive and negative cells (B, H, W) for target boxes (B, 4) as crop fractions: positive where the cell
    centre lies in the central half of the box (and always the cell holding the box centre), negative outside the
    box, neither in the ring between."""
    u, v = cell_centres(height, width, boxes.device)
    x1, y1, x2, y2 = (boxes[:, k, None, None] for k in range(4))
    cx, cy, hw, hh = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2, (y2 - y1) / 2
    positive = ((u - cx).abs() <= hw / 2) & ((v - cy).abs() <= hh / 2)
    col = (cx.reshape(-1) * width).long().clamp(0, width - 1)
    row = (cy.reshape(-1) * height).long().clamp(0, height - 1)
    positive[torch.arange(len(boxes), device=boxes.device), row, col] = True
    negative = ~(((u - cx).abs() <= hw) & ((v - cy).abs() <= hh)) & ~positive
    return positive, negative


@dataclass(frozen=True)
class TrackingLoss:
    """Balanced BCE on the response map plus a GIoU loss on the boxes predicted at positive cells."""

    box_weight: float = 2.0
    name: str = "tracking"

    def loss(self, head: nn.Module, batch: Sequence[TrackingPair], device: torch.device) -> torch.Tensor:
        """Classification + box_weight x GIoU loss of a batch of pairs."""
        cls, dist = head(stack_features([p.template for p in batch], device),
                         stack_features([p.search for p in batch], device))
        cls, dist = cls[:, 0].float(), dist.float()
        boxes = torch.stack([p.box for p in batch]).to(device)
        grid_h, grid_w = cls.shape[-2:]
        positive, negative = tracking_targets(boxes, grid_h, grid_w)
        bce = F.binary_cross_entropy_with_logits(cls, positive.float(), reduction="none")
        cls_loss = 0.5 * bce[positive].mean() + 0.5 * (bce[negative].mean() if negative.any() else 0.0)
        u, v = cell_centres(grid_h, grid_w, device)
        pred = torch.stack([u - dist[:, 0], v - dist[:, 1], u + dist[:, 2], v + dist[:, 3]], dim=-1)
        target = boxes[:, None, None, :].expand_as(pred)
        box_loss = generalized_box_iou_loss(pred[positive], target[positive], reduction="mean")
        return cls_loss + self.box_weight * box_loss
