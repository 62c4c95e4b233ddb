"""Named model configs and `create_model`, timm style: `create_model("base")` is HyperFree-b."""

from __future__ import annotations

import dataclasses
from typing import Any

from model.encoder import EncoderConfig
from model.hyperfree import HyperFree, ModelConfig

_CONFIGS: dict[str, ModelConfig] = {
    # CPU-sized for tests: a forward pass takes milliseconds.
    "tiny": ModelConfig(
        name="tiny",
        encoder=EncoderConfig(
            img_size=64,
            patch_size=8,
            embed_dim=64,
            depth=2,
            num_heads=2,
            window_size=4,
            global_attn_indexes=(1,),
            out_chans=32,
            contrast_heads=2,
            contrast_window=4,
        ),
        decoder_mlp_dim=64,
        decoder_num_heads=2,
        mask_in_chans=4,
        iou_head_hidden_dim=32,
    ),
    # HyperFree-b as the tuning-free scripts build it (global [2, 5, 8, 11], no merge): official checkpoint.
    "base": ModelConfig(name="base"),
    # ViT-L body with the builder's "-1" global indexes and no merge.
    "large": ModelConfig(
        name="large",
        encoder=EncoderConfig(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23)),
    ),
    # As the released HyperVision-H example builds it.
    "huge": ModelConfig(
        name="huge",
        encoder=EncoderConfig(
            img_size=512,
            embed_dim=1280,
            depth=32,
            num_heads=16,
            global_attn_indexes=(15, 23, 31),
            merge_indexes=(8, 32),
        ),
    ),
}

_ENCODER_FIELDS = {f.name for f in dataclasses.fields(EncoderConfig)}
_MODEL_FIELDS = {f.name for f in dataclasses.fields(ModelConfig)} - {"name", "encoder"}


def list_models() -> list[str]:
    """Names accepted by `create_model`."""
    return sorted(_CONFIGS)


def get_config(name: str, **overrides: Any) -> ModelConfig:
    """The named config with flat overrides (encoder or decoder field names) applied and validated."""
    if name not in _CONFIGS:
        raise ValueError(f"Unknown model {name!r}; choose one of {list_models()}.")
    unknown = set(overrides) - _ENCODER_FIELDS - _MODEL_FIELDS
    if unknown:
        raise ValueError(
            f"Unknown override(s) {sorted(unknown)} for model {name!r}; "
            f"valid: {sorted(_ENCODER_FIELDS | _MODEL_FIELDS)}."
        )
    base = _CONFIGS[name]
    enc_over = {k: v for k, v in overrides.items() if k in _ENCODER_FIELDS}
    if enc_over and "feature_indexes" not in enc_over:
        enc_over["feature_indexes"] = None  # re-resolve from the overridden indexes
    encoder = dataclasses.replace(base.encoder, **enc_over)
    return dataclasses.replace(
        base, encoder=encoder, **{k: v for k, v in overrides.items() if k in _MODEL_FIELDS}
    )


def create_model(name: str, **overrides: Any) -> HyperFree:
    """Build a randomly initialised model; load weights with `model.load_checkpoint`."""
    return HyperFree(get_config(name, **overrides))
