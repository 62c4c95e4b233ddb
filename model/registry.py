"""The model registry, timm style: every layout is registered by the module that defines its family
(`model.layouts` for HyperFree / HyperVision) and built by name with `create_model(name, **overrides)`.

An entry holds the family's config dataclass, the builder, how flat overrides apply to the config and the feature
layout (to size heads without building the model). Aliases are former names kept for the layouts they always were;
they log what they resolve to.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from base.registry import Registry

logger = logging.getLogger(__name__)

FAMILY_HYPERFREE = "hyperfree"
"""HyperFree's encoder, prompt encoder and mask decoder (HyperFree-b, HyperVision -B/-L/-H, tiny)."""


@dataclass(frozen=True)
class ModelEntry:
    """One registered layout: its family, config, builder, override rule and feature layout."""

    name: str
    family: str
    config: Any
    build: Callable[[Any], nn.Module]
    override: Callable[[Any, dict[str, Any]], Any]
    """(config, flat overrides) -> config; raises ValueError naming the valid fields."""
    feature_info: Callable[[Any], list[dict[str, Any]]]
    resizable: Callable[[nn.Module, str, tuple[int, ...]], bool] | None = None
    """(model, key, stored shape) -> whether a strict load may resize that stored tensor (e.g. tables that depend
    on the image size); None: every shape must match."""


MODELS: Registry[ModelEntry] = Registry("model")
ALIASES: dict[str, str] = {}
"""Former names, kept for the layouts they always built."""

_RETIRED: dict[str, str] = {
    "large": "'large' (a ViT-L without patch merging) matched no released checkpoint and is gone; the released "
             "-L layout is 'hypervision_l'",
}


def register_model(entry: ModelEntry) -> ModelEntry:
    """Add a layout to the registry (called by the module defining its family)."""
    return MODELS.add(entry.name, entry)


def register_alias(alias: str, name: str) -> None:
    """Keep `alias` as a former name of layout `name`."""
    ALIASES[alias] = name


def list_models(family: str | None = None) -> list[str]:
    """Layout names accepted by `create_model` (aliases aside), optionally of one family."""
    return [n for n in MODELS.names() if family is None or MODELS.get(n).family == family]


def resolve_name(name: str) -> str:
    """The layout a name builds: itself, or (logged) the layout an alias stands for."""
    if name in ALIASES:
        logger.warning("Model name %r is an alias: it builds %r.", name, ALIASES[name])
        return ALIASES[name]
    if name not in MODELS:
        retired = f"{_RETIRED[name]}. " if name in _RETIRED else ""
        raise ValueError(f"Unknown model {name!r}. {retired}Choose one of {list_models()} "
                         f"(aliases: {sorted(ALIASES)}).")
    return name


def model_entry(name: str) -> ModelEntry:
    """The registry entry a name (or alias) builds."""
    return MODELS.get(resolve_name(name))


def get_config(name: str, **overrides: Any) -> Any:
    """The named layout's config with flat overrides applied and validated."""
    entry = model_entry(name)
    return entry.override(entry.config, overrides) if overrides else entry.config


def feature_info(name: str, **overrides: Any) -> list[dict[str, Any]]:
    """The encoder's feature layout (channels and stride per level) without building the model (to size heads)."""
    entry = model_entry(name)
    return entry.feature_info(get_config(name, **overrides))


def create_model(name: str, **overrides: Any) -> Any:
    """Build a randomly initialised model; load weights with the family's loader (strict by default)."""
    entry = model_entry(name)
    return entry.build(get_config(name, **overrides))


def fitting_layouts(shapes: Mapping[str, Sequence[int]], family: str | None = None) -> list[str]:
    """Registered layouts (optionally of one family) that load a state dict of these tensor shapes strictly: the same
    keys, the same shapes except those the layout's entry may resize. Shapes only: no tensor data is needed, and
    each layout is built on the meta device (no memory for weights)."""
    stored = {k: tuple(int(d) for d in v) for k, v in shapes.items()}
    found = []
    for name in list_models(family):
        entry = MODELS.get(name)
        with torch.device("meta"):
            candidate = entry.build(entry.config)
        own = {k: tuple(v.shape) for k, v in candidate.state_dict().items()}
        if set(own) == set(stored) and all(
            own[k] == shape or (entry.resizable is not None and entry.resizable(candidate, k, shape))
            for k, shape in stored.items()
        ):
            found.append(name)
    return found
