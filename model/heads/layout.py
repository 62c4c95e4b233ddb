"""What a task head is built from: the channels and strides of the backbone's multi-scale features."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from model.encoder import EncoderConfig


@dataclass(frozen=True)
class FeatureLayout:
    """Channels and strides (input pixels per feature cell) of the list `forward_intermediates` returns."""

    channels: tuple[int, ...]
    strides: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        object.__setattr__(self, "strides", tuple(int(s) for s in self.strides))
        if not self.channels or len(self.channels) != len(self.strides):
            raise ValueError(
                f"FeatureLayout needs one stride per feature map; got channels={self.channels}, "
                f"strides={self.strides}. Build it with model.heads.feature_layout(encoder_config)."
            )
        if min(self.channels) < 1 or min(self.strides) < 1:
            raise ValueError(f"FeatureLayout channels and strides must be positive; got {self}.")

    @property
    def levels(self) -> tuple[int, ...]:
        """Distinct strides, coarsest first."""
        return tuple(sorted(set(self.strides), reverse=True))

    def indexes_at(self, stride: int) -> tuple[int, ...]:
        """Positions of the feature maps at `stride`."""
        return tuple(i for i, s in enumerate(self.strides) if s == stride)

    def channels_at(self, stride: int) -> int:
        """Channels of the maps at `stride`, concatenated."""
        return sum(self.channels[i] for i in self.indexes_at(stride))


def feature_layout(config: EncoderConfig) -> FeatureLayout:
    """Layout of `HyperFreeImageEncoder.forward_intermediates`: each `feature_indexes` block output (collected
    before the patch merge that follows that block), then the neck after every merge that runs."""
    indexes = config.feature_indexes or ()
    merges = config.effective_merges
    strides = [config.patch_size << sum(1 for m in merges if m < i) for i in indexes]
    return FeatureLayout(
        channels=(*(config.embed_dim for _ in indexes), config.out_chans),
        strides=(*strides, config.patch_size << len(merges)),
    )


def layout_from_info(info: Sequence[Mapping[str, Any]]) -> FeatureLayout:
    """Layout from a registry entry's timm-style `feature_info` (``num_chs``, ``reduction`` per map): sizes heads
    for any family (e.g. HyperSIGMA's fused maps) without building the model."""
    return FeatureLayout(tuple(int(i["num_chs"]) for i in info), tuple(int(i["reduction"]) for i in info))


def as_layout(in_channels: Sequence[int], strides: Sequence[int] | None) -> FeatureLayout:
    """A layout from a head's arguments; without strides all maps are taken to share one grid."""
    return FeatureLayout(tuple(in_channels), tuple(strides) if strides is not None else (1,) * len(in_channels))


def count_trainable_parameters(module: nn.Module) -> int:
    """Number of parameters that an optimizer would update (requires_grad)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
