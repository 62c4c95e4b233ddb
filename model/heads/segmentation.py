"""RU-Net-style segmentation head: the regularised U-Net decoder of HS3-Bench over the frozen backbone's features.

The U-Net's encoder is replaced by the backbone: maps that share a stride are concatenated and projected by a
1x1 lateral; the coarsest level runs through a dropout-regularised double convolution (the U-Net bottleneck); each
finer level is merged by bilinear upsampling, concatenation and a double convolution (the U-Net `Up`), and further
`Up` stages without a skip bring the logits to `out_stride` before a final bilinear resize.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from model.heads.layout import as_layout
from model.heads.registry import HEADS

DEFAULT_WIDTHS = (656, 320, 160, 80)
"""Decoder widths, bottleneck first; about 15.7 M trainable parameters over the released -B features."""


class DoubleConv(nn.Module):
    """(3x3 conv -> BatchNorm -> ReLU) x 2, the U-Net unit."""

    def __init__(self, in_channels: int, out_channels: int, mid_channels: int | None = None) -> None:
        super().__init__()
        mid = mid_channels or out_channels
        self.block = nn.Sequential(
            nn.Conv2d(in_channels, mid, 3, padding=1, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Two convolutions at the input's resolution."""
        return self.block(x)


def _lateral(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels),
                         nn.ReLU(inplace=True))


@HEADS.register("runet")
class SegmentationHead(nn.Module):
    """Per-pixel class logits from the multi-scale features of a frozen backbone."""

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        strides: Sequence[int] | None = None,
        widths: Sequence[int] = DEFAULT_WIDTHS,
        out_stride: int = 4,
        dropout: float = 0.25,
    ) -> None:
        super().__init__()
        layout = as_layout(in_channels, strides)
        levels = layout.levels
        finest = levels[-1]
        if num_classes < 1:
            raise ValueError(f"SegmentationHead num_classes={num_classes} must be at least 1.")
        if out_stride < 1 or finest % out_stride or (finest // out_stride) & (finest // out_stride - 1):
            raise ValueError(
                f"SegmentationHead out_stride={out_stride} must divide the finest feature stride {finest} by a "
                "power of two; pass out_stride=1 with strides=None."
            )
        extra = int(math.log2(finest // out_stride))
        n_stages = len(levels) + extra
        if len(widths) < n_stages:
            raise ValueError(
                f"SegmentationHead needs {n_stages} decoder widths for strides {layout.strides} and "
                f"out_stride={out_stride}; got widths={tuple(widths)}."
            )
        self.hparams: dict[str, Any] = {
            "in_channels": list(layout.channels), "num_classes": num_classes, "strides": list(layout.strides),
            "widths": list(widths), "out_stride": out_stride, "dropout": dropout,
        }
        self.groups = [layout.indexes_at(s) for s in levels]
        self.scales = [levels[i] // levels[i + 1] for i in range(len(levels) - 1)] + [2] * extra
        w = list(widths[:n_stages])
        self.laterals = nn.ModuleList(_lateral(layout.channels_at(s), w[i]) for i, s in enumerate(levels))
        self.dropout = nn.Dropout(dropout)
        self.bottleneck = DoubleConv(w[0], w[0])
        ups = []
        for j in range(1, n_stages):
            skip = w[j] if j < len(levels) else 0
            ups.append(DoubleConv(w[j - 1] + skip, w[j], (w[j - 1] + skip) // 2))
        self.ups = nn.ModuleList(ups)
        self.classifier = nn.Conv2d(w[-1], num_classes, 1)

    def forward(self, features: Sequence[torch.Tensor], output_size: tuple[int, int] | None = None) -> torch.Tensor:
        """Logits (B, num_classes, h, w) at `out_stride` of the input frame, or resized to `output_size`."""
        def level(i: int) -> torch.Tensor:
            return self.laterals[i](torch.cat([features[k] for k in self.groups[i]], dim=1))

        x = self.bottleneck(self.dropout(level(0)))
        for j, (up, scale) in enumerate(zip(self.ups, self.scales, strict=True), start=1):
            x = F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)
            if j < len(self.groups):
                skip = level(j)
                x = torch.cat([skip, x[..., : skip.shape[-2], : skip.shape[-1]]], dim=1)
            x = up(x)
        logits = self.classifier(x)
        if output_size is not None and tuple(logits.shape[-2:]) != tuple(output_size):
            logits = F.interpolate(logits, size=output_size, mode="bilinear", align_corners=False)
        return logits
