"""SiamHYPER-style tracking head: Siamese depth-wise cross-correlation of template and search features, then
anchor-free classification and box branches (SiamBAN / SiamCAR lineage).

Template and search crops are cut with the same geometry (a square around a box, see stages/downstream/tracker.py)
and go through the same frozen backbone; the head takes the central window of the template maps as correlation
kernels. Each level is adjusted by a shared 1x1 projection, correlated depth-wise per branch (SiamBAN's 3x3
kernel/search convs before, its 1x1 head after), resized to the finest search grid and mixed by learned softmax
weights; conv towers (SiamCAR) then give a target logit and the distances (left, top, right, bottom) from each cell
centre to the box edges, as fractions of the search crop side.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from model.heads.layout import as_layout
from model.heads.registry import HEADS

BRANCHES = ("cls", "box")


def _conv_bn(in_channels: int, out_channels: int, kernel: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


def depthwise_xcorr(search: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Per-sample, per-channel correlation of `search` (B, C, H, W) with `kernel` (B, C, kh, kw), sides odd;
    the output keeps the search size."""
    b, c, h, w = search.shape
    kh, kw = kernel.shape[-2:]
    out = F.conv2d(search.reshape(1, b * c, h, w), kernel.reshape(b * c, 1, kh, kw), padding=(kh // 2, kw // 2),
                   groups=b * c)
    return out.reshape(b, c, h, w)


class DepthwiseXCorr(nn.Module):
    """SiamBAN's correlation unit: 3x3 conv on kernel and on search, depth-wise correlation, 1x1 conv head."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.kernel_conv = _conv_bn(channels, channels, 3)
        self.search_conv = _conv_bn(channels, channels, 3)
        self.head = _conv_bn(channels, channels, 1)

    def forward(self, kernel: torch.Tensor, search: torch.Tensor) -> torch.Tensor:
        """Correlation map (B, C, H, W) at the search size."""
        return self.head(depthwise_xcorr(self.search_conv(search), self.kernel_conv(kernel)))


def template_window(size: int, fraction: float) -> int:
    """Odd side (in cells) of the template kernel cut from a map of `size` cells."""
    k = max(1, round(size * fraction))
    return k if k % 2 else max(1, k - 1)


@HEADS.register("siamhyper")
class TrackingHead(nn.Module):
    """Target logits and box distances over the search crop from template and search feature lists."""

    def __init__(
        self,
        in_channels: Sequence[int],
        strides: Sequence[int] | None = None,
        hidden: int = 320,
        tower_depth: int = 5,
        template_fraction: float = 0.5,
        groups: int = 32,
    ) -> None:
        super().__init__()
        layout = as_layout(in_channels, strides)
        if hidden % groups:
            raise ValueError(f"TrackingHead hidden={hidden} must divide by GroupNorm groups={groups}.")
        if not 0 < template_fraction <= 1:
            raise ValueError(f"TrackingHead template_fraction={template_fraction} must lie in (0, 1].")
        self.hparams: dict[str, Any] = {
            "in_channels": list(layout.channels), "strides": list(layout.strides), "hidden": hidden,
            "tower_depth": tower_depth, "template_fraction": template_fraction, "groups": groups,
        }
        self.template_fraction = template_fraction
        n = len(layout.channels)
        self.adjust = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, hidden, 1, bias=False), nn.BatchNorm2d(hidden)) for c in layout.channels
        )
        self.xcorr = nn.ModuleDict({b: nn.ModuleList(DepthwiseXCorr(hidden) for _ in range(n)) for b in BRANCHES})
        self.level_weights = nn.ParameterDict({b: nn.Parameter(torch.zeros(n)) for b in BRANCHES})
        self.towers = nn.ModuleDict({
            b: nn.Sequential(*(
                nn.Sequential(nn.Conv2d(hidden, hidden, 3, padding=1), nn.GroupNorm(groups, hidden), nn.ReLU())
                for _ in range(tower_depth)
            ))
            for b in BRANCHES
        })
        self.cls_out = nn.Conv2d(hidden, 1, 3, padding=1)
        self.box_out = nn.Conv2d(hidden, 4, 3, padding=1)

    def kernels(self, template: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Adjusted central windows of the template maps: the correlation kernels, computed once per sequence."""
        out = []
        for adjust, feat in zip(self.adjust, template, strict=True):
            h, w = feat.shape[-2:]
            kh, kw = template_window(h, self.template_fraction), template_window(w, self.template_fraction)
            top, left = (h - kh) // 2, (w - kw) // 2
            out.append(adjust(feat[..., top: top + kh, left: left + kw]))
        return out

    def correlate(
        self, kernels: Sequence[torch.Tensor], search: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, 1, H, W) and box distances (B, 4, H, W) on the finest search grid from precomputed kernels."""
        grid = min((f.shape[-2:] for f in search), key=lambda s: -s[0] * s[1])
        adjusted = [adjust(feat) for adjust, feat in zip(self.adjust, search, strict=True)]
        fused = {}
        for b in BRANCHES:
            weights = torch.softmax(self.level_weights[b], dim=0)
            maps = []
            for i, (xcorr, kernel, x) in enumerate(zip(cast(nn.ModuleList, self.xcorr[b]), kernels, adjusted,
                                                       strict=True)):
                corr = xcorr(kernel, x)
                if corr.shape[-2:] != grid:
                    corr = F.interpolate(corr, size=grid, mode="bilinear", align_corners=False)
                maps.append(weights[i] * corr)
            fused[b] = self.towers[b](torch.stack(maps).sum(0))
        return self.cls_out(fused["cls"]), F.softplus(self.box_out(fused["box"]))

    def forward(
        self, template: Sequence[torch.Tensor], search: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, 1, H, W) and box distances (B, 4, H, W) from template-crop and search-crop features."""
        return self.correlate(self.kernels(template), search)
