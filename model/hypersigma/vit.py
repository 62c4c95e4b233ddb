"""HyperSIGMA's two encoders: the spatial ViT (tokens are image patches) and the spectral ViT (tokens are band
groups), both with sparse sampling attention (SSA) in every block but each `interval`-th.

Module names follow the released fine-tuning encoders (`SpatViT`, `SpectralVisionTransformer` of the
classification/segmentation copy), so the released pretrained encoders' keys (`patch_embed.proj`, `spat_map`,
`pos_embed`, `blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}`, `norm`) load key for key. SSA is the
released maths in plain torch (`F.grid_sample`, as the release itself does; no compiled extension).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial
from typing import cast

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import nn
from torch.utils.checkpoint import checkpoint

LayerNorm = partial(nn.LayerNorm, eps=1e-6)

SPATIAL_FPN_STRIDES: dict[int, tuple[int, int, int, int]] = {
    2: (1, 2, 4, 8),
    4: (4, 4, 8, 16),
    8: (8, 8, 16, 32),
    16: (16, 16, 16, 16),
}
"""Input pixels per cell of the four spatial pyramid maps, per patch size (the release's fpn1..fpn4 ops)."""


def reference_points(height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Token-centre grid (N, 2) as (x, y) in [0, 1], row-major: ((j + 0.5) / W, (i + 0.5) / H)."""
    ys = (torch.arange(height, device=device, dtype=dtype) + 0.5) / height
    xs = (torch.arange(width, device=device, dtype=dtype) + 0.5) / width
    ref_y, ref_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack((ref_x.reshape(-1), ref_y.reshape(-1)), -1)


class Attention(nn.Module):
    """Full multi-head self-attention (the blocks at i = interval - 1, 2 * interval - 1, ...)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """x (B, N, C) -> (B, N, C); `grid` is unused (kept so both attentions share one call)."""
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class SampleAttention(nn.Module):
    """Sparse sampling attention: each query attends to `n_points` keys/values bilinearly sampled around its own
    grid cell at offsets predicted from the query (token units), per head; softmax over the points."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, n_points: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.n_points = n_points
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.sampling_offsets = nn.Linear(dim, num_heads * n_points * 2)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """x (B, N, C) with N = grid[0] * grid[1] tokens in row-major order -> (B, N, C)."""
        b, n, c = x.shape
        h, w = grid
        heads, points, d = self.num_heads, self.n_points, c // self.num_heads
        q, k, v = self.qkv(x).reshape(b, n, 3, c).unbind(2)
        offsets = self.sampling_offsets(q).reshape(b, n, heads, points, 2).transpose(1, 2)  # B, h, N, P, 2
        ref = reference_points(h, w, x.device, x.dtype)
        scale = torch.tensor([w, h], device=x.device, dtype=x.dtype)
        locations = (2 * (ref[None, None, :, None, :] + offsets / scale) - 1).reshape(b * heads, n, points, 2)

        def sample(t: torch.Tensor) -> torch.Tensor:
            """(B, N, C) -> per-head maps sampled at the locations, as (B, heads, N, P, d)."""
            maps = t.reshape(b, n, heads, d).permute(0, 2, 3, 1).reshape(b * heads, d, h, w)
            out = F.grid_sample(maps, locations, mode="bilinear", padding_mode="zeros", align_corners=False)
            return out.reshape(b, heads, d, n, points).permute(0, 1, 3, 4, 2)

        q = q.reshape(b, n, heads, d).transpose(1, 2)[:, :, :, None, :]  # B, h, N, 1, d
        attn = ((q * sample(k)).sum(-1) * self.scale).softmax(-1)  # B, h, N, P
        out = (attn[..., None] * sample(v)).sum(-2)  # B, h, N, d
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    """Two-layer GELU MLP (keys fc1, fc2)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., dim) -> (..., dim)."""
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm ViT block without layer scale; SSA (`sample=True`) or full attention."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, drop_path: float,
                 sample: bool, n_points: int) -> None:
        super().__init__()
        self.sample = sample
        self.norm1 = LayerNorm(dim)
        self.attn: nn.Module = (SampleAttention(dim, num_heads, qkv_bias, n_points) if sample
                                else Attention(dim, num_heads, qkv_bias))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """(B, N, C) -> (B, N, C)."""
        x = x + self.drop_path(self.attn(self.norm1(x), grid))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ViTBase(nn.Module):
    """What both encoders share, at their top level as in the release: absolute position embedding `pos_embed`,
    the `blocks` and the final `norm` (the MAE encoder applies it; the fine-tuning forward does not, as in the
    release, but keeps it for the checkpoint's keys). Weight
    init as the release: truncated normal 0.02 for Linear weights and pos_embed, zero biases, unit norms, then
    `attn.proj` and `mlp.fc2` weights divided by sqrt(2 * layer_id)."""

    def _build_trunk(self, num_tokens: int, embed_dim: int, depth: int, num_heads: int, mlp_ratio: float,
                     qkv_bias: bool, drop_path_rate: float, interval: int, n_points: int,
                     grad_checkpointing: bool) -> None:
        """Create pos_embed, blocks and norm (SSA in every block but each `interval`-th)."""
        self.grad_checkpointing = grad_checkpointing
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, embed_dim))
        rates = [float(r) for r in torch.linspace(0, drop_path_rate, depth, device="cpu")]
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, rates[i], (i + 1) % interval != 0, n_points)
            for i in range(depth)
        )
        self.norm = LayerNorm(embed_dim)

    def init_weights(self) -> None:
        """The release's `_init_weights` over every Linear/LayerNorm below `self`, then `fix_init_weight`."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        with torch.no_grad():
            for layer_id, blk in enumerate(self.blocks, start=1):
                for name in ("attn.proj", "mlp.fc2"):
                    cast(nn.Linear, blk.get_submodule(name)).weight.div_(math.sqrt(2.0 * layer_id))

    def run_blocks(self, x: torch.Tensor, grid: tuple[int, int], collect: Sequence[int]) -> list[torch.Tensor]:
        """Add the position embedding, run the blocks up to the last index in `collect` and return the outputs
        of the blocks in `collect` (B, N, C), in block order."""
        x = x + self.pos_embed
        out: list[torch.Tensor] = []
        last = max(collect)
        for i, blk in enumerate(self.blocks):
            if i > last:
                break
            if self.grad_checkpointing and self.training:
                x = checkpoint(blk, x, grid, use_reentrant=False)
            else:
                x = blk(x, grid)
            if i in collect:
                out.append(x)
        return out


class PatchEmbed(nn.Module):
    """Non-overlapping patch projection (key `patch_embed.proj`)."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """(B, C, H, W) -> tokens (B, Hp * Wp, D) and the grid (Hp, Wp)."""
        x = self.proj(x)
        return x.flatten(2).transpose(1, 2), (int(x.shape[2]), int(x.shape[3]))


def _fpn(patch_size: int, embed_dim: int) -> list[nn.Module]:
    """The release's fpn1..fpn4 ops for a patch size (see SPATIAL_FPN_STRIDES for the strides they give)."""
    if patch_size == 2:
        return [nn.Sequential(nn.ConvTranspose2d(embed_dim, embed_dim, kernel_size=2, stride=2)), nn.Identity(),
                nn.Sequential(nn.MaxPool2d(2, 2)), nn.Sequential(nn.MaxPool2d(4, 4))]
    if patch_size in (4, 8):
        return [nn.Identity(), nn.Sequential(nn.MaxPool2d(1, 1)), nn.Sequential(nn.MaxPool2d(2, 2)),
                nn.Sequential(nn.MaxPool2d(4, 4))]
    if patch_size == 16:
        return [nn.Identity(), nn.Identity(), nn.Identity(), nn.Identity()]
    raise ValueError(f"patch_size={patch_size} has no feature pyramid; choose one of {sorted(SPATIAL_FPN_STRIDES)}.")


class SpatialViT(ViTBase):
    """The spatial encoder: patch tokens on an (img / p)^2 grid; the four `out_indices` block outputs, as maps,
    go through fpn1..fpn4 (one up-sampling transposed conv at p = 2, max-pools below)."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int, depth: int, num_heads: int,
                 mlp_ratio: float, qkv_bias: bool, drop_path_rate: float, interval: int, n_points: int,
                 out_indices: Sequence[int], grad_checkpointing: bool = False) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size={img_size} must be a multiple of patch_size={patch_size}.")
        if len(out_indices) != 4:
            raise ValueError(f"out_indices={tuple(out_indices)}: the spatial pyramid takes exactly four blocks.")
        self.grid = (img_size // patch_size, img_size // patch_size)
        self.out_indices = tuple(out_indices)
        self.patch_embed = PatchEmbed(in_chans, embed_dim, patch_size)
        self._build_trunk(self.grid[0] * self.grid[1], embed_dim, depth, num_heads, mlp_ratio, qkv_bias,
                          drop_path_rate, interval, n_points, grad_checkpointing)
        fpn = _fpn(patch_size, embed_dim)
        self.fpn1, self.fpn2, self.fpn3, self.fpn4 = fpn
        self.init_weights()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, C, img, img) -> four maps (B, D, h_k, w_k), finest first (fpn1..fpn4)."""
        tokens, grid = self.patch_embed(x)
        feats = self.run_blocks(tokens, grid, self.out_indices)
        maps = [f.transpose(1, 2).reshape(f.shape[0], -1, *grid) for f in feats]
        return [op(m) for op, m in zip((self.fpn1, self.fpn2, self.fpn3, self.fpn4), maps, strict=True)]


class SpectralViT(ViTBase):
    """The spectral encoder: the bands are average-pooled (adaptively) into `num_tokens` contiguous groups, each
    group's whole image becomes one token through `spat_map` (Linear(img * img, D)), and the tokens, laid out on a
    sqrt(T) x sqrt(T) grid for SSA, run through the blocks. `l1` (Linear(D, 128), no bias) maps the first
    collected block's tokens to the spectral descriptor the fusion gate reads."""

    def __init__(self, img_size: int, num_tokens: int, embed_dim: int, depth: int, num_heads: int,
                 mlp_ratio: float, qkv_bias: bool, drop_path_rate: float, interval: int, n_points: int,
                 out_indices: Sequence[int], out_dim: int = 128, grad_checkpointing: bool = False) -> None:
        super().__init__()
        side = math.isqrt(num_tokens)
        if side * side != num_tokens:
            raise ValueError(f"num_tokens={num_tokens}: SSA lays the spectral tokens on a square grid, so it must "
                             "be a perfect square (the release uses 100, 144, 64 or 36).")
        self.grid = (side, side)
        self.img_size = img_size
        self.num_tokens = num_tokens
        self.out_indices = tuple(out_indices)
        self.spec_embed = nn.AdaptiveAvgPool1d(num_tokens)
        self.spat_map = nn.Linear(img_size * img_size, embed_dim)
        self._build_trunk(num_tokens, embed_dim, depth, num_heads, mlp_ratio, qkv_bias, drop_path_rate, interval,
                          n_points, grad_checkpointing)
        self.l1 = nn.Linear(embed_dim, out_dim, bias=False)
        self.init_weights()

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, img, img) -> spectral tokens before the blocks (B, T, D)."""
        if tuple(x.shape[-2:]) != (self.img_size, self.img_size):
            raise ValueError(f"The spectral encoder maps whole {self.img_size} x {self.img_size} images to tokens; "
                             f"got {tuple(x.shape[-2:])}. Resize or crop the input, or build the model with "
                             "img_size set to the input size.")
        groups = self.spec_embed(x.flatten(2).transpose(1, 2)).transpose(1, 2)  # B, T, H*W
        return self.spat_map(groups)

    def forward_blocks(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, C, img, img) -> the `out_indices` block outputs (B, T, D), in block order."""
        return self.run_blocks(self.tokens(x), self.grid, self.out_indices)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, img, img) -> the spectral descriptor `l1(first collected block)` (B, T, out_dim)."""
        return self.l1(self.forward_blocks(x)[0])
