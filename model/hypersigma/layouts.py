"""The HyperSIGMA layouts of the model registry (family ``hypersigma``). A name says what it builds:

- ``hypersigma_b`` / ``hypersigma_l`` / ``hypersigma_h``: the released -B/-L/-H sizes (embed 768/1024/1280, depth
  12/24/32, heads 12/16/16, spatial out_indices (3,5,7,11) / (7,11,15,23) / (10,15,20,31), full attention every
  3rd / 6th / 8th block, 8 SSA points), in the pretraining frame (100 bands, 64 x 64, patch 8, 100 spectral
  tokens), where the released spat-vit / spec-vit checkpoints load with no resizing; override ``img_size``,
  ``patch_size``, ``in_chans`` or ``num_tokens`` per task (the loader then re-learns or interpolates what the
  release does);
- ``hypersigma_tiny``: CPU-sized, for tests and demos.
"""

from __future__ import annotations

from model.hypersigma.model import HyperSigma, HyperSigmaConfig, replace_config
from model.registry import ModelEntry, register_model

FAMILY_HYPERSIGMA = "hypersigma"
"""HyperSIGMA: spatial ViT + spectral ViT with sparse sampling attention, fused by the spectral gate."""

LAYOUTS: dict[str, HyperSigmaConfig] = {
    "hypersigma_tiny": HyperSigmaConfig(
        name="hypersigma_tiny", img_size=32, patch_size=4, in_chans=18, num_tokens=9, embed_dim=32, depth=4,
        num_heads=2, out_indices=(0, 1, 2, 3), interval=2, n_points=4, spec_dim=16, fused_dim=16, gate_hidden=16,
    ),
    "hypersigma_b": HyperSigmaConfig(name="hypersigma_b"),
    "hypersigma_l": HyperSigmaConfig(name="hypersigma_l", embed_dim=1024, depth=24, num_heads=16,
                                     out_indices=(7, 11, 15, 23), interval=6),
    "hypersigma_h": HyperSigmaConfig(name="hypersigma_h", embed_dim=1280, depth=32, num_heads=16,
                                     out_indices=(10, 15, 20, 31), interval=8),
}

for _name, _config in LAYOUTS.items():
    register_model(ModelEntry(name=_name, family=FAMILY_HYPERSIGMA, config=_config, build=HyperSigma,
                              override=replace_config, feature_info=lambda c: c.feature_info))
