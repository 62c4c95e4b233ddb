"""HyperSIGMA: the spatial and the spectral ViT fused by the spectral-enhancement gate, as a backbone that returns
multi-scale feature maps.

The gate (the release's segmentation copy, `ss_fusion_seg.SSFusionFramework`, by default): the spectral
descriptor (B, T, 128) is averaged over its 128 channels into s (B, T); per pyramid level k a gate
w_k = sigmoid(fc(relu(fc(s)))) (no biases) scales the spatial map, (1 + w_k) * spat_k, and a 1x1 conv `DR_k`
reduces it to 128 channels. ``gate_position="after_reduction"`` is the classification copy
(`ss_fusion_cls`): DR_k first, then a 128-wide gate. The released heads after the gate (concatenation, 1x1 convs,
classifier) are task heads, not part of the backbone. The gate and the DR convs are not in the pretrained
checkpoints: they are trained per task (random-init until then).

Keys: `spat_encoder.*`, `spec_encoder.*`, `DR1..DR4`, `fc_spec1..fc_spec4` as the release names them, so a released
fused model's state_dict loads with only its head keys left over. As in the release, DR1 / fc_spec1 belong to the
coarsest level (fpn4) and DR4 / fc_spec4 to the finest (fpn1); `forward_features` returns the levels finest first.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import nn

from model.hypersigma.vit import SPATIAL_FPN_STRIDES, SpatialViT, SpectralViT

GatePosition = Literal["before_reduction", "after_reduction"]
LEVELS = 4


@dataclass(frozen=True)
class HyperSigmaConfig:
    """Resolved HyperSIGMA hyper-parameters (defaults: -B in the pretraining frame, 100 bands at 64 x 64, p = 8)."""

    name: str = "hypersigma_b"
    img_size: int = 64
    """Input side; the spectral `spat_map` is Linear(img_size^2, D), so inputs must be exactly this size."""
    patch_size: int = 8
    """Spatial patch size: 8 in pretraining and segmentation, 2 in classification (2, 4, 8 or 16 here)."""
    in_chans: int = 100
    """Bands the spatial patch embedding takes (the spectral encoder pools any band count)."""
    num_tokens: int = 100
    """Spectral tokens (contiguous band groups by adaptive pooling); a perfect square (SSA grid)."""
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_path_rate: float = 0.1
    out_indices: tuple[int, ...] = (3, 5, 7, 11)
    """Spatial blocks whose outputs feed fpn1..fpn4."""
    spec_out_indices: tuple[int, ...] | None = None
    """Spectral blocks collected; the first feeds the gate. None: (out_indices[0],) as the release's fusion."""
    interval: int = 3
    """Full attention in blocks i with (i + 1) % interval == 0, SSA elsewhere."""
    n_points: int = 8
    """SSA sampling points per head."""
    spec_dim: int = 128
    """Width of the spectral descriptor (`spec_encoder.l1`)."""
    fused_dim: int = 128
    """Channels of each fused map (`DR_k`)."""
    gate_hidden: int = 128
    gate_position: GatePosition = "before_reduction"
    grad_checkpointing: bool = False

    def __post_init__(self) -> None:
        for key in ("out_indices", "spec_out_indices"):
            value = getattr(self, key)
            if value is not None:
                object.__setattr__(self, key, tuple(int(v) for v in value))
        if self.spec_out_indices is None:
            object.__setattr__(self, "spec_out_indices", (self.out_indices[0],))
        if self.patch_size not in SPATIAL_FPN_STRIDES:
            raise ValueError(f"patch_size={self.patch_size}: choose one of {sorted(SPATIAL_FPN_STRIDES)} (the "
                             "release's patch_size 1 puts the finest map at half-pixel stride, which no head layout "
                             "describes).")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim={self.embed_dim} must divide by num_heads={self.num_heads}.")
        if self.gate_position not in ("before_reduction", "after_reduction"):
            raise ValueError(f"gate_position={self.gate_position!r}: choose 'before_reduction' (segmentation copy) "
                             "or 'after_reduction' (classification copy).")
        for key in ("out_indices", "spec_out_indices"):
            bad = [i for i in getattr(self, key) if not 0 <= i < self.depth]
            if bad:
                raise ValueError(f"{key}={getattr(self, key)}: blocks {bad} do not exist at depth {self.depth}.")

    @property
    def strides(self) -> tuple[int, ...]:
        """Input pixels per cell of the four fused maps, finest first."""
        return SPATIAL_FPN_STRIDES[self.patch_size]

    @property
    def feature_info(self) -> list[dict[str, Any]]:
        """timm-style description of `forward_features`: per map its channels, stride and producing module."""
        return [{"num_chs": self.fused_dim, "reduction": s, "module": f"DR{LEVELS - k}"}
                for k, s in enumerate(self.strides)]

    def to_dict(self) -> dict[str, Any]:
        """Plain (JSON-friendly) dict of the resolved config."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> HyperSigmaConfig:
        """Inverse of `to_dict`."""
        return cls(**dict(data))

    def spatial_encoder(self) -> SpatialViT:
        """A randomly initialised spatial encoder of this config."""
        return SpatialViT(self.img_size, self.patch_size, self.in_chans, self.embed_dim, self.depth, self.num_heads,
                          self.mlp_ratio, self.qkv_bias, self.drop_path_rate, self.interval, self.n_points,
                          self.out_indices, self.grad_checkpointing)

    def spectral_encoder(self) -> SpectralViT:
        """A randomly initialised spectral encoder of this config."""
        return SpectralViT(self.img_size, self.num_tokens, self.embed_dim, self.depth, self.num_heads,
                           self.mlp_ratio, self.qkv_bias, self.drop_path_rate, self.interval, self.n_points,
                           self.spec_out_indices or (), self.spec_dim, self.grad_checkpointing)


@dataclass
class HyperSigmaFeatures:
    """Everything one forward computes: spatial pyramid (B, D, h_k, w_k), spectral descriptor (B, T, spec_dim),
    per-level gates (B, width) and the fused maps (B, fused_dim, h_k, w_k); lists finest first."""

    spatial: list[torch.Tensor]
    spectral: torch.Tensor
    gates: list[torch.Tensor]
    fused: list[torch.Tensor]


def _gate(num_tokens: int, hidden: int, width: int) -> nn.Sequential:
    """Linear(T, hidden) -> ReLU -> Linear(hidden, width) -> Sigmoid, no biases (keys .0 and .2)."""
    return nn.Sequential(nn.Linear(num_tokens, hidden, bias=False), nn.ReLU(), nn.Linear(hidden, width, bias=False),
                         nn.Sigmoid())


class HyperSigma(nn.Module):
    """Spatial + spectral encoders and the spectral-enhancement gate; `forward_features` gives the fused maps."""

    def __init__(self, config: HyperSigmaConfig) -> None:
        super().__init__()
        self.config = config
        self.spat_encoder = config.spatial_encoder()
        self.spec_encoder = config.spectral_encoder()
        width = config.embed_dim if config.gate_position == "before_reduction" else config.fused_dim
        for level in range(1, LEVELS + 1):
            self.add_module(f"DR{level}", nn.Conv2d(config.embed_dim, config.fused_dim, kernel_size=1, bias=False))
            self.add_module(f"fc_spec{level}", _gate(config.num_tokens, config.gate_hidden, width))
        self.feature_info = config.feature_info

    @property
    def device(self) -> torch.device:
        """Device of the parameters."""
        return self.spec_encoder.pos_embed.device

    def forward_intermediates(self, x: torch.Tensor) -> HyperSigmaFeatures:
        """(B, in_chans, img, img) float -> spatial pyramid, spectral descriptor, gates and fused maps."""
        cfg = self.config
        if x.ndim != 4 or x.shape[1] != cfg.in_chans or tuple(x.shape[-2:]) != (cfg.img_size,) * 2:
            raise ValueError(f"Model {cfg.name!r} takes (B, {cfg.in_chans}, {cfg.img_size}, {cfg.img_size}) inputs; "
                             f"got {tuple(x.shape)}. Select/resample the bands and resize the image, or build the "
                             "model with in_chans / img_size overrides.")
        spatial = self.spat_encoder(x)
        spectral = self.spec_encoder(x)
        s = spectral.mean(-1)  # B, T
        gates: list[torch.Tensor] = []
        fused: list[torch.Tensor] = []
        for k, level_map in enumerate(spatial):
            level = LEVELS - k  # DR1 / fc_spec1 belong to the coarsest map
            w = getattr(self, f"fc_spec{level}")(s)[:, :, None, None]
            reduce = getattr(self, f"DR{level}")
            fused.append(reduce((1 + w) * level_map) if cfg.gate_position == "before_reduction"
                         else (1 + w) * reduce(level_map))
            gates.append(w[:, :, 0, 0])
        return HyperSigmaFeatures(spatial=spatial, spectral=spectral, gates=gates, fused=fused)

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, in_chans, img, img) -> the four fused maps (B, fused_dim, img / stride_k, img / stride_k), finest
        first; channels and strides as `feature_info` (and `config.strides`) say."""
        return self.forward_intermediates(x).fused

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Same as `forward_features`."""
        return self.forward_features(x)


def replace_config(config: HyperSigmaConfig, overrides: Mapping[str, Any]) -> HyperSigmaConfig:
    """The config with flat overrides applied; unknown names raise a ValueError that lists the valid ones."""
    fields = {f.name for f in dataclasses.fields(HyperSigmaConfig)} - {"name"}
    unknown = set(overrides) - fields
    if unknown:
        raise ValueError(f"Unknown override(s) {sorted(unknown)} for model {config.name!r}; valid: {sorted(fields)}.")
    changes = dict(overrides)
    if "out_indices" in changes and "spec_out_indices" not in changes:
        changes["spec_out_indices"] = None  # re-resolve from the new spatial indexes
    return dataclasses.replace(config, **changes)
