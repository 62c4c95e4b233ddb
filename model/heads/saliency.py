"""BA-SAM-style salient-object head: a SAM mask decoder driven by a learned saliency token instead of prompts.

The last feature map (the neck) is the image embedding; the other maps are projected to the embedding width and
added at the neck's grid, and the finest map also joins the upscaling path (as HQ-SAM fuses early ViT features).
A two-way transformer (segment_anything's) lets the token read the embedding; a hypernetwork MLP turns the token
into a dynamic 1x1 kernel over the 4x-upscaled embedding, giving one saliency logit map.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from segment_anything.modeling.common import LayerNorm2d
from segment_anything.modeling.mask_decoder import MLP
from segment_anything.modeling.prompt_encoder import PositionEmbeddingRandom
from segment_anything.modeling.transformer import TwoWayTransformer
from torch import nn

from model.heads.layout import as_layout
from model.heads.registry import HEADS


def _project(in_channels: int, out_channels: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False), LayerNorm2d(out_channels))


@HEADS.register("basam")
class SaliencyHead(nn.Module):
    """One saliency logit map per image from the multi-scale features of a frozen backbone."""

    def __init__(
        self,
        in_channels: Sequence[int],
        strides: Sequence[int] | None = None,
        dim: int = 256,
        depth: int = 2,
        num_heads: int = 8,
        mlp_dim: int = 2048,
    ) -> None:
        super().__init__()
        layout = as_layout(in_channels, strides)
        if dim % 8 or (dim // 2) % num_heads:
            raise ValueError(f"SaliencyHead dim={dim} must divide by 8, and dim/2 by num_heads={num_heads}.")
        self.hparams: dict[str, Any] = {
            "in_channels": list(layout.channels), "strides": list(layout.strides), "dim": dim, "depth": depth,
            "num_heads": num_heads, "mlp_dim": mlp_dim,
        }
        *side, neck = layout.channels
        self.embed = nn.Identity() if neck == dim else _project(neck, dim)
        self.side = nn.ModuleList(_project(c, dim) for c in side)
        finest = min(range(len(layout.strides)), key=lambda i: (layout.strides[i], i))
        self.skip_index = finest if layout.strides[finest] < layout.strides[-1] else None
        self.skip = _project(layout.channels[finest], dim // 4) if self.skip_index is not None else None
        self.pe = PositionEmbeddingRandom(dim // 2)
        self.token = nn.Embedding(1, dim)
        self.transformer = TwoWayTransformer(depth=depth, embedding_dim=dim, num_heads=num_heads, mlp_dim=mlp_dim)
        self.up1 = nn.Sequential(nn.ConvTranspose2d(dim, dim // 4, 2, stride=2), LayerNorm2d(dim // 4))
        self.up2 = nn.ConvTranspose2d(dim // 4, dim // 8, 2, stride=2)
        self.hyper = MLP(dim, dim, dim // 8, 3)

    def forward(self, features: Sequence[torch.Tensor], output_size: tuple[int, int] | None = None) -> torch.Tensor:
        """Logits (B, 1, 4h, 4w) over the neck grid (h, w), or resized to `output_size`."""
        *side, neck = features
        src = self.embed(neck)
        grid = src.shape[-2:]
        for proj, feat in zip(self.side, side, strict=True):
            src = src + F.interpolate(proj(feat), size=grid, mode="bilinear", align_corners=False)
        b, c, h, w = src.shape
        pe = self.pe((h, w)).unsqueeze(0).expand(b, -1, -1, -1).to(src.dtype)
        tokens = self.token.weight.unsqueeze(0).expand(b, -1, -1)
        hs, src = self.transformer(src, pe, tokens)
        x = self.up1(src.transpose(1, 2).reshape(b, c, h, w))
        if self.skip is not None and self.skip_index is not None:
            x = x + F.interpolate(self.skip(features[self.skip_index]), size=x.shape[-2:], mode="bilinear",
                                  align_corners=False)
        x = self.up2(F.gelu(x))
        x = F.gelu(x)
        kernel = self.hyper(hs[:, 0])
        logits = (kernel.unsqueeze(1) @ x.flatten(2)).view(b, 1, *x.shape[-2:])
        if output_size is not None and tuple(logits.shape[-2:]) != tuple(output_size):
            logits = F.interpolate(logits, size=output_size, mode="bilinear", align_corners=False)
        return logits
