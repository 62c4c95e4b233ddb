"""The head registry: each head class is registered by its module under a name that says what it builds, and
built from the backbone's feature layout (`build_head`) or from the options it recorded (`head_from_hparams`)."""

from __future__ import annotations

from typing import Any

from torch import nn

from base.registry import Registry
from model.heads.layout import FeatureLayout

HEADS: Registry[type[nn.Module]] = Registry("head")


def build_head(name: str, layout: FeatureLayout, **kwargs: Any) -> nn.Module:
    """The head `name` sized from the backbone's feature layout; `kwargs` are the head's own options."""
    return HEADS.get(name)(in_channels=layout.channels, strides=layout.strides, **kwargs)


def head_from_hparams(name: str, hparams: dict[str, Any]) -> nn.Module:
    """Rebuild head `name` from the `hparams` dict it recorded (as stored beside its checkpoint)."""
    return HEADS.get(name)(**hparams)
