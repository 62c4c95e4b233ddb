"""Per-pixel head of the airborne tasks: a light MLP on the backbone's multi-scale features sampled at a pixel
(every level's vector bilinearly read at the pixel's centre, concatenated). With ``backbone`` options it also
carries a trainable copy of the backbone (``--tune full``), built from the model registry so that a checkpoint of
the head rebuilds with its tuned backbone."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from model.heads.layout import as_layout
from model.heads.registry import HEADS
from model.registry import create_model


@HEADS.register("pixel_mlp")
class PixelHead(nn.Module):
    """Class logits (N, num_classes) of N pixels from their sampled feature vectors (N, sum of channels)."""

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        strides: Sequence[int] | None = None,
        hidden: int = 128,
        dropout: float = 0.1,
        backbone: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        layout = as_layout(in_channels, strides)
        if num_classes < 1:
            raise ValueError(f"PixelHead num_classes={num_classes} must be at least 1.")
        self.hparams: dict[str, Any] = {
            "in_channels": list(layout.channels), "num_classes": num_classes, "strides": list(layout.strides),
            "hidden": hidden, "dropout": dropout, "backbone": dict(backbone) if backbone else None,
        }
        width = sum(layout.channels)
        self.norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, num_classes))
        self.backbone: nn.Module | None = None
        if backbone:
            self.backbone = create_model(str(backbone["model"]), **dict(backbone.get("overrides") or {}))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Logits (N, num_classes) of feature vectors (N, sum of channels)."""
        return self.mlp(self.norm(features))
