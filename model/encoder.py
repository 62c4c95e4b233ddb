"""The HyperFree / HyperVision image encoder: spectral patch embedding, GSD-aware position embedding, ViT.

Module tree and maths follow the released `ImageEncoderViT` (HyperFree's, as HyperVision ships it), so the
released checkpoints load key for key.
The transformer blocks are segment_anything's `Block` (window attention, decomposed relative position): its
state_dict keys and maths are identical to the HyperFree copy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
from segment_anything.modeling.common import LayerNorm2d
from segment_anything.modeling.image_encoder import Block
from segment_anything.modeling.mask_decoder import MLP
from torch import nn
from torch.utils.checkpoint import checkpoint

from model.spectral import SpectralPatchEmbed

GsdLike = float | Sequence[float] | torch.Tensor | None


@dataclass(frozen=True)
class EncoderConfig:
    """Resolved image-encoder hyper-parameters (defaults: HyperFree-b as the tuning-free scripts build it)."""

    img_size: int = 1024
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    window_size: int = 14
    global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    merge_indexes: tuple[int, ...] = ()
    """PatchMerging after these blocks (official `merge_indexs`); an index >= depth owns an unused module."""
    feature_indexes: tuple[int, ...] | None = None
    """Blocks whose outputs `forward_intermediates` returns; None resolves to the official rule."""
    out_chans: int = 256
    contrast_depth: int = 2
    contrast_heads: int = 8
    contrast_window: int = 16
    grad_checkpointing: bool = False
    """Activation checkpointing of the blocks while training (the official code does it for patch <= 8)."""

    def __post_init__(self) -> None:
        for name in ("global_attn_indexes", "merge_indexes", "feature_indexes"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(int(v) for v in value))
        if self.embed_dim % self.num_heads or self.embed_dim % 4:
            raise ValueError(
                f"embed_dim={self.embed_dim} must divide by num_heads={self.num_heads} and by 4."
            )
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size={self.img_size} must be a multiple of patch_size={self.patch_size}.")
        if self.out_chans % self.contrast_heads:
            raise ValueError(
                f"out_chans={self.out_chans} must divide by contrast_heads={self.contrast_heads}."
            )
        if any(not 0 <= i < self.depth for i in self.global_attn_indexes):
            raise ValueError(
                f"global_attn_indexes={self.global_attn_indexes} must lie in [0, depth={self.depth})."
            )
        if list(self.merge_indexes) != sorted(set(self.merge_indexes)):
            raise ValueError(f"merge_indexes={self.merge_indexes} must be strictly increasing.")
        grid = self.grid_size
        for _ in self.effective_merges:
            if grid % 2:
                raise ValueError(f"PatchMerging needs an even token grid; got {grid} (config {self}).")
            grid //= 2
        if self.feature_indexes is None:
            if self.merge_indexes:
                if len(self.global_attn_indexes) < 3:
                    raise ValueError(
                        "With merge_indexes the official feature rule is (merge[0], global[0], global[2]); "
                        "give at least 3 global_attn_indexes or set feature_indexes."
                    )
                rule = {self.merge_indexes[0], self.global_attn_indexes[0], self.global_attn_indexes[2]}
                object.__setattr__(self, "feature_indexes", tuple(sorted(rule)))
            else:
                object.__setattr__(self, "feature_indexes", self.global_attn_indexes)
        if any(not 0 <= i < self.depth for i in self.feature_indexes or ()):
            raise ValueError(f"feature_indexes={self.feature_indexes} must lie in [0, depth={self.depth}).")

    @property
    def grid_size(self) -> int:
        """Token grid side at the patch embedding."""
        return self.img_size // self.patch_size

    @property
    def effective_merges(self) -> tuple[int, ...]:
        """Merge indexes that actually run (those below depth)."""
        return tuple(i for i in self.merge_indexes if i < self.depth)

    @property
    def output_grid_size(self) -> int:
        """Token grid side at the neck (after the merges that run)."""
        return self.grid_size >> len(self.effective_merges)

    @property
    def feature_info(self) -> list[dict[str, Any]]:
        """timm-style description of what `forward_intermediates` returns, in order: per map its channels
        (``num_chs``), its stride in input pixels (``reduction``) and the ``module`` that produces it."""
        info: list[dict[str, Any]] = []
        reduction = self.patch_size
        for i in range(self.depth):
            if i in (self.feature_indexes or ()):
                info.append({"num_chs": self.embed_dim, "reduction": reduction, "module": f"blocks.{i}"})
            if i in self.merge_indexes:
                reduction *= 2
        info.append({"num_chs": self.out_chans, "reduction": reduction, "module": "neck"})
        return info

    def to_dict(self) -> dict[str, Any]:
        """Plain (JSON-friendly) dict of the resolved config."""
        out = asdict(self)
        for key, value in out.items():
            if isinstance(value, tuple):
                out[key] = list(value)
        return out


def gsd_sincos_pos_embed(embed_dim: int, grid_size: int, gsd: torch.Tensor) -> torch.Tensor:
    """2-D sin-cos embedding of the token grid scaled by GSD, as HyperFree's scale-aware PE: (B, g, g, D).

    The first half of the channels encodes column index x GSD, the second half row index x GSD;
    each half is [sin(pos * w_k), cos(pos * w_k)] with w_k = 10000^(-k / (D/4)).
    """
    quarter = embed_dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32, device=gsd.device) / quarter)
    coords = torch.arange(grid_size, dtype=torch.float32, device=gsd.device)
    scale = gsd.to(torch.float32).view(-1, 1, 1)
    cols = (scale * coords.view(1, 1, -1)).expand(-1, grid_size, grid_size)
    rows = (scale * coords.view(1, -1, 1)).expand(-1, grid_size, grid_size)

    def encode(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.unsqueeze(-1) * omega
        return torch.cat([angles.sin(), angles.cos()], dim=-1)

    return torch.cat([encode(cols), encode(rows)], dim=-1)


def gsd_tensor(gsd: GsdLike, batch: int, device: torch.device) -> torch.Tensor:
    """GSD (m/pixel) as a float32 tensor of length `batch`; None means 1.0 as the official encoder."""
    value = torch.as_tensor(1.0 if gsd is None else gsd, dtype=torch.float32, device=device).reshape(-1)
    if value.numel() not in (1, batch):
        raise ValueError(
            f"GSD has {value.numel()} values for a batch of {batch}; give one value or one per image."
        )
    return value.expand(batch)


class PatchMerging(nn.Module):
    """Swin patch merging on (B, H, W, C) tokens: 2x2 neighbours -> LayerNorm(4C) -> Linear(4C, C)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.reduction = nn.Linear(4 * dim, dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Halve the token grid."""
        parts = [x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]]
        return self.reduction(self.norm(torch.cat(parts, dim=-1)))


class HyperFreeImageEncoder(SpectralPatchEmbed):
    """Channel-adaptive ViT encoder. Subclasses `SpectralPatchEmbed` so that the weight banks sit at the
    official state_dict paths (`image_encoder.point_spectral_weight_bank_w`, ...)."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__(config.embed_dim, config.patch_size)
        self.config = config
        self.img_size = config.img_size
        self.feature_indexes = frozenset(config.feature_indexes or ())
        self.feature_info = config.feature_info
        grid = (config.grid_size, config.grid_size)
        norm = partial(nn.LayerNorm, eps=1e-6)

        def block(dim: int, heads: int, window: int) -> Block:
            return Block(dim=dim, num_heads=heads, mlp_ratio=config.mlp_ratio, qkv_bias=True, norm_layer=norm,
                         use_rel_pos=True, window_size=window, input_size=grid)

        self.pos_embed_mlp = MLP(config.embed_dim, config.embed_dim // 2, config.embed_dim, 3)
        self.blocks = nn.ModuleList(
            block(config.embed_dim, config.num_heads, 0 if i in config.global_attn_indexes else config.window_size)
            for i in range(config.depth)
        )
        # Kept for checkpoint compatibility: HyperFree's `convert_semantic_feature` blocks on the neck output.
        self.contras_modules = nn.ModuleList(
            block(config.out_chans, config.contrast_heads, config.contrast_window)
            for _ in range(config.contrast_depth)
        )
        self.neck = nn.Sequential(
            nn.Conv2d(config.embed_dim, config.out_chans, kernel_size=1, bias=False),
            LayerNorm2d(config.out_chans),
            nn.Conv2d(config.out_chans, config.out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(config.out_chans),
        )
        self.multi_scale_convs = nn.ModuleList(PatchMerging(config.embed_dim) for _ in config.merge_indexes)

    def _run(
        self,
        x: torch.Tensor,
        wavelengths_nm: Sequence[float] | np.ndarray | torch.Tensor,
        gsd: GsdLike,
        grid_samples: int | None,
        generator: torch.Generator | None,
        collect: bool,
        band_draws: Sequence[int] | None = None,
    ) -> list[torch.Tensor]:
        """Embed, add the GSD position embedding, run the blocks and the neck; optionally collect stages."""
        cfg = self.config
        if x.shape[-2:] != (cfg.img_size, cfg.img_size):
            raise ValueError(
                f"Expected (B, C, {cfg.img_size}, {cfg.img_size}) input, got {tuple(x.shape)}; "
                "resize and pad with model.preprocess.prepare (or prepare_batch) first."
            )
        tokens, _ = self.embed_patches(x, wavelengths_nm, grid_samples, generator, band_draws)
        pos = self.pos_embed_mlp(
            gsd_sincos_pos_embed(cfg.embed_dim, cfg.grid_size, gsd_tensor(gsd, x.shape[0], x.device))
        )
        h = tokens.permute(0, 2, 3, 1) + pos.to(tokens.dtype)
        outputs: list[torch.Tensor] = []
        merges = iter(self.multi_scale_convs)
        use_ckpt = cfg.grad_checkpointing and self.training and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            h = checkpoint(block, h, use_reentrant=False) if use_ckpt else block(h)
            if collect and i in self.feature_indexes:
                outputs.append(h.permute(0, 3, 1, 2))
            if i in cfg.merge_indexes:
                h = next(merges)(h)
        outputs.append(self.neck(h.permute(0, 3, 1, 2)))
        return outputs

    def forward_intermediates(
        self,
        x: torch.Tensor,
        wavelengths_nm: Sequence[float] | np.ndarray | torch.Tensor,
        gsd: GsdLike = None,
        grid_samples: int | None = None,
        generator: torch.Generator | None = None,
        band_draws: Sequence[int] | None = None,
    ) -> list[torch.Tensor]:
        """Official `multi_stage_features`: the `feature_indexes` block outputs (B, D, h, w), then the neck.

        `x` is (B, C, img_size, img_size), already normalised and padded; `gsd` is the effective GSD (m/pixel)
        per image. `grid_samples` opts into the training-mode random grid-band subset (see spectral.py);
        `band_draws` replays one such draw (HyperFree's task scripts encode with a random draw).
        """
        return self._run(x, wavelengths_nm, gsd, grid_samples, generator, collect=True, band_draws=band_draws)

    def forward_features(
        self,
        x: torch.Tensor,
        wavelengths_nm: Sequence[float] | np.ndarray | torch.Tensor,
        gsd: GsdLike = None,
        grid_samples: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Neck output (B, out_chans, h, w): the image embedding the SAM mask decoder reads."""
        return self._run(x, wavelengths_nm, gsd, grid_samples, generator, collect=False)[-1]

    def forward(  # type: ignore[override]  # the encoder returns its stages, not (tokens, BandMatch)
        self,
        x: torch.Tensor,
        wavelengths_nm: Sequence[float] | np.ndarray | torch.Tensor,
        gsd: GsdLike = None,
        grid_samples: int | None = None,
        generator: torch.Generator | None = None,
    ) -> list[torch.Tensor]:
        """Same as `forward_intermediates` (the official encoder returns its multi-stage features)."""
        return self.forward_intermediates(x, wavelengths_nm, gsd, grid_samples, generator)

    def contrast_features(self, neck: torch.Tensor) -> torch.Tensor:
        """HyperFree's `convert_semantic_feature`: `contras_modules` applied to a neck output (B, C, h, w)."""
        h = neck.permute(0, 2, 3, 1)
        for block in self.contras_modules:
            h = block(h)
        return h.permute(0, 3, 1, 2)
