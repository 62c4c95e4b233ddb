"""The trainable module of pretraining: the HyperVision student and its distillation head, one forward for DDP."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model import HyperFree
from model.distill import DistillHead


@dataclass
class StudentOutput:
    """Per-prompt mask logits at crop resolution (N, M, S, S) and predicted IoU (N, M) for all images of the
    batch concatenated, plus the distillation head's logits (B, h*w, K) and the student token grid (h, w)."""

    mask_logits: torch.Tensor
    iou_pred: torch.Tensor
    head_logits: torch.Tensor
    grid: tuple[int, int]


class PretrainModule(nn.Module):
    """The trainable part: student (HyperFree/HyperVision) + distillation head; one forward for DDP."""

    def __init__(self, student: HyperFree, head: DistillHead, multimask: bool) -> None:
        super().__init__()
        self.student = student
        self.head = head
        self.multimask = multimask

    def forward(self, image: torch.Tensor, wavelengths: torch.Tensor, gsd: torch.Tensor,
                points: Sequence[torch.Tensor], out_size: int, grid_samples: int | None,
                generator: torch.Generator | None) -> StudentOutput:
        """Encoder once for the batch, mask decoder once per image with its prompts (points in input pixels)."""
        enc = self.student.image_encoder
        feats = enc.forward_intermediates(image, wavelengths, gsd, grid_samples, generator)
        tokens, embedding = feats[-2], feats[-1]
        logits, ious = [], []
        for b, pts in enumerate(points):
            if pts.shape[0] == 0:
                continue
            labels = torch.ones(pts.shape[0], 1, dtype=torch.int64, device=pts.device)
            low, iou = self.student.decode(embedding[b:b + 1], pts[:, None, :], labels,
                                           multimask_output=self.multimask)
            logits.append(F.interpolate(low.float(), (out_size, out_size), mode="bilinear", align_corners=False))
            ious.append(iou.float())
        m = self.student.config.num_multimask_outputs if self.multimask else 1
        mask_logits = torch.cat(logits) if logits else image.new_zeros(0, m, out_size, out_size)
        iou_pred = torch.cat(ious) if ious else image.new_zeros(0, m)
        grid = (int(tokens.shape[-2]), int(tokens.shape[-1]))
        return StudentOutput(mask_logits, iou_pred, self.head.student_logits(tokens), grid)


def student_token_dim(student: HyperFree) -> int:
    """Channels of the encoder's last collected block: the tokens the distillation head reads."""
    cfg = student.config.encoder
    if not cfg.feature_indexes or cfg.feature_indexes[-1] != cfg.depth - 1:
        raise ValueError(
            f"The distillation head reads the last block's tokens, but model {student.config.name!r} collects "
            f"blocks {cfg.feature_indexes} of {cfg.depth}; add {cfg.depth - 1} to feature_indexes."
        )
    return cfg.embed_dim


