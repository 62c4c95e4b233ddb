"""The HyperFree-family layouts of the model registry. A name says what it builds:

- ``hypervision_b`` / ``hypervision_l`` / ``hypervision_h``: the released HyperVision -B/-L/-H layouts, key for key
  (`build_HyperVision_b/l/h` defaults: global attention and patch merging where the builders put them), at the
  released example's image size 512 (override ``img_size``; a strict load resizes the relative-position tables
  the way the released loader does);
- ``hyperfree_b``: HyperFree-b as its tuning-free scripts build it (1024 px, global attention at 2, 5, 8, 11, no
  merging): the material pseudo-labeller's layout;
- ``tiny``: CPU-sized, for tests and demos.

``base`` and ``huge`` are kept as aliases of the layouts they always were (``hyperfree_b``, ``hypervision_h``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from model.encoder import EncoderConfig
from model.hyperfree import HyperFree, ModelConfig, image_size_dependent
from model.registry import FAMILY_HYPERFREE, ModelEntry, register_alias, register_model

RELEASED_IMG_SIZE = 512
"""Image size of the released HyperVision example (the builders' own default is 1024)."""

_LAYOUTS: dict[str, ModelConfig] = {
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
    "hyperfree_b": ModelConfig(name="hyperfree_b"),
    "hypervision_b": ModelConfig(
        name="hypervision_b",
        encoder=EncoderConfig(img_size=RELEASED_IMG_SIZE, global_attn_indexes=(5, 8, 11), merge_indexes=(3, 12)),
    ),
    "hypervision_l": ModelConfig(
        name="hypervision_l",
        encoder=EncoderConfig(img_size=RELEASED_IMG_SIZE, embed_dim=1024, depth=24, num_heads=16,
                              global_attn_indexes=(11, 17, 23), merge_indexes=(6, 24)),
    ),
    "hypervision_h": ModelConfig(
        name="hypervision_h",
        encoder=EncoderConfig(img_size=RELEASED_IMG_SIZE, embed_dim=1280, depth=32, num_heads=16,
                              global_attn_indexes=(15, 23, 31), merge_indexes=(8, 32)),
    ),
}

_ENCODER_FIELDS = {f.name for f in dataclasses.fields(EncoderConfig)}
_MODEL_FIELDS = {f.name for f in dataclasses.fields(ModelConfig)} - {"name", "encoder"}


def _override(base: ModelConfig, overrides: dict[str, Any]) -> ModelConfig:
    """The config with flat overrides (encoder or decoder field names) applied and validated."""
    unknown = set(overrides) - _ENCODER_FIELDS - _MODEL_FIELDS
    if unknown:
        raise ValueError(f"Unknown override(s) {sorted(unknown)} for model {base.name!r}; "
                         f"valid: {sorted(_ENCODER_FIELDS | _MODEL_FIELDS)}.")
    enc_over = {k: v for k, v in overrides.items() if k in _ENCODER_FIELDS}
    if enc_over and "feature_indexes" not in enc_over:
        enc_over["feature_indexes"] = None  # re-resolve from the overridden indexes
    encoder = dataclasses.replace(base.encoder, **enc_over)
    return dataclasses.replace(base, encoder=encoder, **{k: v for k, v in overrides.items() if k in _MODEL_FIELDS})


for _name, _config in _LAYOUTS.items():
    register_model(ModelEntry(name=_name, family=FAMILY_HYPERFREE, config=_config, build=HyperFree,
                              override=_override, feature_info=lambda c: c.encoder.feature_info,
                              resizable=image_size_dependent))
register_alias("base", "hyperfree_b")
register_alias("huge", "hypervision_h")
