"""HyperSIGMA's spatial and spectral masked autoencoders (the release's `SpatMAE` / `SpecMAE`), their loss, and a
one-call training step for the pretraining objectives ``mae_spatial`` / ``mae_spectral``.

Input (`mae_step`'s `cube`): float32 (B, in_chans, img_size, img_size), by default 100 contiguous bands of a
64 x 64 crop, scaled as the release does (raw counts / 4000; `describe_input` gives what a run records).

- spatial: 8 x 8 patch tokens; 75 % of them masked per sample (random, argsort of uniform noise); the decoder
  (512 wide, 8 deep, 16 heads, fixed 2-D sin-cos positions) predicts every patch's p^2 * C values; loss: MSE on
  the masked patches, optionally against per-patch normalised pixels (`norm_pix_loss`).
- spectral: the bands pooled into `num_tokens` groups, each group's image one token (`spat_map`); 75 % of the
  tokens masked (the release's README run; its argparse default is 0.25); the decoder predicts each token's
  C / T band images (img^2 * C / T values); its position embedding stays zero, as in the release.

Release facts kept on purpose: the encoders are plain ViTs (full attention in every block, no SSA), and the
encoder never adds its `pos_embed` (so the released checkpoints hold it at its random initialisation);
``encoder_pos_embed=True`` adds it. Parameter names are the release's, so `released_state_dict` loads into
`SpatMAE` / `SpecMAE` strictly and `encoder_state_dict` into our (and the release's) fine-tuning encoders.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from model.hypersigma.model import HyperSigmaConfig
from model.hypersigma.vit import Block, LayerNorm, PatchEmbed, ViTBase
from model.registry import get_config

MAEKind = Literal["spatial", "spectral"]

RELEASED_INPUT_SCALE = 4000.0
"""The release's pretraining divides the raw cube by this (`HyperionDataset`, maxNum)."""

_DECODER_DEFAULTS: dict[str, dict[str, int]] = {
    "hypersigma_tiny": {"decoder_embed_dim": 32, "decoder_depth": 2, "decoder_num_heads": 2},
}
"""Decoder sizes of layouts too small for the release's 512 x 8 decoder (CPU tests)."""


@dataclass(frozen=True)
class MAEConfig:
    """A masked autoencoder: encoder sizes (from a HyperSIGMA layout) and the release's pretraining settings."""

    kind: MAEKind = "spatial"
    layout: str = "hypersigma_b"
    img_size: int = 64
    in_chans: int = 100
    patch_size: int = 8
    num_tokens: int = 100
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_path_rate: float = 0.1
    mask_ratio: float = 0.75
    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    norm_pix_loss: bool = False
    """Per-patch (spatial) / per-token (spectral) normalised target; off by default, on in the README's runs."""
    encoder_pos_embed: bool = False
    """Add `pos_embed` in the encoder; the release does not (kept False for equivalence)."""
    grad_checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.kind not in ("spatial", "spectral"):
            raise ValueError(f"MAEConfig.kind={self.kind!r}: choose 'spatial' or 'spectral'.")
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio={self.mask_ratio} must be in [0, 1).")
        if self.kind == "spatial" and self.img_size % self.patch_size:
            raise ValueError(f"img_size={self.img_size} must be a multiple of patch_size={self.patch_size}.")
        if self.kind == "spectral" and self.in_chans % self.num_tokens:
            raise ValueError(f"in_chans={self.in_chans} must be a multiple of num_tokens={self.num_tokens}: each "
                             "spectral token reconstructs in_chans / num_tokens whole band images.")

    @property
    def num_patches(self) -> int:
        """Tokens per sample: (img / p)^2 spatial, num_tokens spectral."""
        return (self.img_size // self.patch_size) ** 2 if self.kind == "spatial" else self.num_tokens

    @property
    def target_dim(self) -> int:
        """Values each token reconstructs: p^2 * C (spatial) or C / T * img^2 (spectral)."""
        if self.kind == "spatial":
            return self.patch_size ** 2 * self.in_chans
        return self.in_chans // self.num_tokens * self.img_size ** 2

    def to_dict(self) -> dict[str, Any]:
        """Plain (JSON-friendly) dict."""
        return asdict(self)


def mae_config(layout: str, kind: MAEKind, **overrides: Any) -> MAEConfig:
    """The MAE of a registered HyperSIGMA layout (its encoder sizes and input frame) with flat overrides."""
    base: HyperSigmaConfig = get_config(layout)
    if not isinstance(base, HyperSigmaConfig):
        raise ValueError(f"Model {layout!r} is not a HyperSIGMA layout; the masked autoencoders pretrain "
                         "hypersigma_* layouts.")
    fields = {f.name for f in dataclasses.fields(MAEConfig)}
    unknown = set(overrides) - fields
    if unknown:
        raise ValueError(f"Unknown MAE override(s) {sorted(unknown)}; valid: {sorted(fields - {'kind', 'layout'})}.")
    values: dict[str, Any] = {k: getattr(base, k) for k in ("img_size", "in_chans", "patch_size", "num_tokens",
                                                             "embed_dim", "depth", "num_heads", "mlp_ratio",
                                                             "qkv_bias", "drop_path_rate")}
    values.update(_DECODER_DEFAULTS.get(layout, {}))
    values.update(overrides)
    return MAEConfig(kind=kind, layout=layout, **values)


def sincos_2d(dim: int, side: int) -> torch.Tensor:
    """The MAE's fixed 2-D sin-cos table (side^2, dim); the first half encodes the column (x), as the release."""
    def one_d(d: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=float) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid = np.meshgrid(np.arange(side, dtype=np.float32), np.arange(side, dtype=np.float32))
    table = np.concatenate([one_d(dim // 2, grid[0]), one_d(dim // 2, grid[1])], axis=1)
    return torch.from_numpy(table).float()


@dataclass
class MAEOutput:
    """Loss (scalar), prediction (B, N, target_dim) and mask (B, N; 1 = masked)."""

    loss: torch.Tensor
    pred: torch.Tensor
    mask: torch.Tensor


class MaskedAutoencoder(ViTBase):
    """The release's SpatMAE / SpecMAE: plain-ViT encoder on the visible tokens, ViT decoder on all tokens."""

    def __init__(self, config: MAEConfig) -> None:
        super().__init__()
        self.config = config
        n = config.num_patches
        if config.kind == "spatial":
            self.patch_embed = PatchEmbed(config.in_chans, config.embed_dim, config.patch_size)
        else:
            self.spec_embed = nn.AdaptiveAvgPool1d(config.num_tokens)
            self.spat_map = nn.Linear(config.img_size ** 2, config.embed_dim)
        self._build_trunk(n, config.embed_dim, config.depth, config.num_heads, config.mlp_ratio, config.qkv_bias,
                          config.drop_path_rate, 1, 0, config.grad_checkpointing)
        self.init_weights()  # the release initialises the encoder before the decoder exists
        rates = [float(r) for r in torch.linspace(0, config.drop_path_rate, config.depth, device="cpu")]
        dim = config.decoder_embed_dim
        self.decoder_embed = nn.Linear(config.embed_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        table = (sincos_2d(dim, config.img_size // config.patch_size) if config.kind == "spatial"
                 else torch.zeros(n, dim))
        self.decoder_pos_embed = nn.Parameter(table[None].to(self.mask_token.device), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            Block(dim, config.decoder_num_heads, config.mlp_ratio, config.qkv_bias, rates[min(i, config.depth - 1)],
                  False, 0) for i in range(config.decoder_depth)
        )
        self.decoder_norm = LayerNorm(dim)
        self.decoder_pred = nn.Linear(dim, config.target_dim)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, img, img) -> tokens (B, N, D)."""
        cfg = self.config
        if x.ndim != 4 or x.shape[1] != cfg.in_chans or tuple(x.shape[-2:]) != (cfg.img_size,) * 2:
            raise ValueError(f"The {cfg.kind} MAE takes (B, {cfg.in_chans}, {cfg.img_size}, {cfg.img_size}) cubes; "
                             f"got {tuple(x.shape)}.")
        if cfg.kind == "spatial":
            return self.patch_embed(x)[0]
        return self.spat_map(self.spec_embed(x.flatten(2).transpose(1, 2)).transpose(1, 2))

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """The reconstruction target (B, N, target_dim) of a cube (B, C, img, img), in token order."""
        cfg = self.config
        b, c = x.shape[:2]
        if cfg.kind == "spectral":
            return x.reshape(b, cfg.num_tokens, -1)
        p, side = cfg.patch_size, cfg.img_size // cfg.patch_size
        x = x.reshape(b, c, side, p, side, p)
        return torch.einsum("nchpwq->nhwpqc", x).reshape(b, side * side, p * p * c)

    def random_masking(self, x: torch.Tensor, generator: torch.Generator | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keep int(N * (1 - mask_ratio)) tokens per sample (argsort of uniform noise): kept tokens, mask (B, N)
        with 1 = masked, and the indexes that restore token order."""
        b, n, d = x.shape
        keep = int(n * (1 - self.config.mask_ratio))
        noise = torch.rand(b, n, device=x.device, generator=generator)
        shuffle = torch.argsort(noise, dim=1)
        restore = torch.argsort(shuffle, dim=1)
        kept = torch.gather(x, 1, shuffle[:, :keep, None].expand(-1, -1, d))
        mask = torch.ones(b, n, device=x.device)
        mask[:, :keep] = 0
        return kept, torch.gather(mask, 1, restore), restore

    def forward_encoder(self, x: torch.Tensor, generator: torch.Generator | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Visible-token latents (B, keep, D), mask and restore indexes."""
        tokens = self.embed(x)
        if self.config.encoder_pos_embed:
            tokens = tokens + self.pos_embed
        tokens, mask, restore = self.random_masking(tokens, generator)
        for blk in self.blocks:
            tokens = blk(tokens, (0, 0))
        return self.norm(tokens), mask, restore

    def forward_decoder(self, latent: torch.Tensor, restore: torch.Tensor) -> torch.Tensor:
        """Predictions for every token (B, N, target_dim)."""
        x = self.decoder_embed(latent)
        masked = self.mask_token.expand(x.shape[0], restore.shape[1] - x.shape[1], -1)
        x = torch.cat([x, masked], dim=1)
        x = torch.gather(x, 1, restore[:, :, None].expand(-1, -1, x.shape[2])) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x, (0, 0))
        return self.decoder_pred(self.decoder_norm(x))

    def loss(self, x: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error over the masked tokens (normalised target with `norm_pix_loss`)."""
        target = self.patchify(x)
        if self.config.norm_pix_loss:
            mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        per_token = ((pred - target) ** 2).mean(dim=-1)
        return (per_token * mask).sum() / mask.sum()

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> MAEOutput:
        """Mask, encode, decode, and the loss on the masked tokens."""
        latent, mask, restore = self.forward_encoder(x, generator)
        pred = self.forward_decoder(latent, restore)
        return MAEOutput(loss=self.loss(x, pred, mask), pred=pred, mask=mask)


def create_mae(layout: str, kind: MAEKind, **overrides: Any) -> MaskedAutoencoder:
    """A randomly initialised spatial or spectral MAE for a HyperSIGMA layout (e.g. 'hypersigma_b')."""
    return MaskedAutoencoder(mae_config(layout, kind, **overrides))


def mae_step(model: MaskedAutoencoder, cube: torch.Tensor, generator: torch.Generator | None = None
             ) -> torch.Tensor:
    """The scalar loss of one batch, for the trainer to backpropagate.

    `cube`: float (B, in_chans, img_size, img_size) on the model's device, (band, y, x) per sample: by default
    100 contiguous bands of a 64 x 64 crop, scaled by 1 / 4000 as the release does (record `describe_input`).
    `generator` seeds the masking (None: the global RNG, as the release).
    """
    return model(cube, generator).loss


def describe_input(config: MAEConfig, scale: float = RELEASED_INPUT_SCALE) -> dict[str, Any]:
    """What a pretraining run records about its inputs and objective."""
    return {
        "objective": f"mae_{config.kind}",
        "layout": "(B, bands, y, x) float32",
        "bands": f"{config.in_chans} contiguous bands (random start per image, as the release)",
        "crop": f"{config.img_size} x {config.img_size}",
        "scale": f"raw values / {scale:g}" + (" (the release's maxNum)" if scale == RELEASED_INPUT_SCALE else ""),
        "mask_ratio": config.mask_ratio,
        "norm_pix_loss": config.norm_pix_loss,
    }


def released_state_dict(model: MaskedAutoencoder) -> dict[str, torch.Tensor]:
    """The whole MAE in the release's key layout (what `SpatMAE` / `SpecMAE` load strictly)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def encoder_state_dict(model: MaskedAutoencoder) -> dict[str, torch.Tensor]:
    """The encoder part (no decoder, no mask token): what the fine-tuning encoders load."""
    return {k: v for k, v in released_state_dict(model).items() if not k.startswith(("decoder_", "mask_token"))}


def save_released(model: MaskedAutoencoder, path: str | Path, epoch: int = 0) -> Path:
    """Write {'model': state_dict, 'epoch': epoch} as the release's `misc.save_model` does (without optimizer
    and args), loadable by `load_pretrained` and by the release's `init_weights`."""
    out = Path(path)
    torch.save({"model": released_state_dict(model), "epoch": int(epoch)}, out)
    return out
