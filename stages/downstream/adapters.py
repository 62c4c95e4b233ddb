"""Backbone adapters, one per model family (`model.registry` families): how the frozen-feature stages build and load
a family's backbone, prepare a cube under its preprocessing contract and encode it into multi-scale maps.

`stages.downstream.features` looks the adapter up by the layout's family (`ADAPTERS.get(family)`), so a new family
plugs into run_features / run_heads / run_compare by registering one `BackboneAdapter` here; heads are sized from the
registry entry's `feature_info`, whatever the family.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from base.registry import Registry
from model import HyperFree, describe, load_checkpoint
from model.hyperfree import file_sha256, read_state_dict
from model.hypersigma import FAMILY_HYPERSIGMA, HyperSigma, describe_contract, load_pretrained, prepare_cube
from model.hypersigma.checkpoint import checkpoint_branch, read_released
from model.preprocess import DEFAULT_CONTRACT, check_contract, prepare
from model.registry import FAMILY_HYPERFREE

Geometry = tuple[tuple[int, int], tuple[int, int], float]
"""(input size after the resize, original size, effective GSD) of one encoded cube."""
EncodeFn = Callable[[nn.Module, Sequence[np.ndarray], np.ndarray, Sequence[float], str, torch.device],
                    tuple[list[list[torch.Tensor]], list[Geometry]]]
"""(model, cubes (H, W, C) of one band set, wavelengths, GSDs, contract, device) -> per cube its maps (C, h, w) as
float32 on the CPU, and its geometry. Called under no autograd and the device's autocast."""
ExtractFn = Callable[[nn.Module, np.ndarray, np.ndarray, float, str], list[torch.Tensor]]
"""(model, one cube (H, W, C), wavelengths, GSD, contract) -> its maps (1, C, h, w) on the model's device."""


@dataclass(frozen=True)
class LoadedWeights:
    """What loading a checkpoint into a backbone did: the weights' sha256, the load report and the parts of the
    model the checkpoint did not cover (they keep their random initialisation)."""

    sha256: str
    load: dict[str, Any]
    random_parts: tuple[str, ...] = ()


@dataclass(frozen=True)
class BackboneAdapter:
    """A model family as a frozen feature extractor."""

    family: str
    default_contract: str
    """The preprocessing contract used when a spec names none."""
    check_contract: Callable[[str], str]
    """Raises a ValueError naming the valid contracts; returns the contract."""
    describe_contract: Callable[[Any, str], dict[str, Any]]
    """(resolved model config, contract) -> what feature artifacts record about the preprocessing."""
    img_size: Callable[[Any], int]
    """Side of the square input frame of a resolved config."""
    load_weights: Callable[[nn.Module, Path, bool], LoadedWeights]
    encode: EncodeFn
    extract: ExtractFn


ADAPTERS: Registry[BackboneAdapter] = Registry("backbone family")


def register_adapter(adapter: BackboneAdapter) -> BackboneAdapter:
    """Add a family's adapter (keyed by its `model.registry` family name)."""
    return ADAPTERS.add(adapter.family, adapter)


# ------------------------------------------------------------------------------------------------ HyperFree family
def _hyperfree_load(model: nn.Module, path: Path, strict: bool) -> LoadedWeights:
    report = load_checkpoint(model, path, strict=strict)
    return LoadedWeights(report.sha256, {"strict": strict, "dropped": sorted(report.dropped),
                                         "missing": sorted(report.missing), "resized": sorted(report.resized)})


def _hyperfree_encode(model: nn.Module, cubes: Sequence[np.ndarray], wavelengths: np.ndarray,
                      gsd_m: Sequence[float], contract: str, device: torch.device
                      ) -> tuple[list[list[torch.Tensor]], list[Geometry]]:
    assert isinstance(model, HyperFree)
    enc = model.image_encoder
    prepared = [prepare(c, enc.img_size, contract, device=device) for c in cubes]
    gsd = [p.effective_gsd(g) for p, g in zip(prepared, gsd_m, strict=True)]
    image = torch.cat([p.image for p in prepared]).to(enc.point_spectral_weight_bank_w.dtype)
    maps = enc.forward_intermediates(image, wavelengths, torch.tensor(gsd, device=device))
    per_image = [[m[i].float().cpu() for m in maps] for i in range(len(cubes))]
    return per_image, [(p.input_size, p.original_size, g) for p, g in zip(prepared, gsd, strict=True)]


def _hyperfree_extract(model: nn.Module, cube: np.ndarray, wavelengths: np.ndarray, gsd_m: float, contract: str
                       ) -> list[torch.Tensor]:
    assert isinstance(model, HyperFree)  # differentiable: callers that do not train wrap it in no_grad
    enc = model.image_encoder
    prepared = prepare(cube, enc.img_size, contract, device=model.device)
    image = prepared.image.to(enc.point_spectral_weight_bank_w.dtype)
    return list(enc.forward_intermediates(image, wavelengths, prepared.effective_gsd(gsd_m)))


register_adapter(BackboneAdapter(
    family=FAMILY_HYPERFREE, default_contract=DEFAULT_CONTRACT, check_contract=check_contract,
    describe_contract=lambda _config, contract: describe(contract), img_size=lambda c: int(c.encoder.img_size),
    load_weights=_hyperfree_load, encode=_hyperfree_encode, extract=_hyperfree_extract,
))


# ------------------------------------------------------------------------------------------------ HyperSIGMA family
HYPERSIGMA_CONTRACT = "hypersigma"
HYPERSIGMA_FUSION = ("DR1", "DR2", "DR3", "DR4", "fc_spec1", "fc_spec2", "fc_spec3", "fc_spec4")
"""The spectral gate and reduction convs: in no pretrained checkpoint (trained per task in the release)."""


def _hypersigma_contract(contract: str) -> str:
    if contract != HYPERSIGMA_CONTRACT:
        raise ValueError(f"preprocessing={contract!r} is not a HyperSIGMA contract; choose {HYPERSIGMA_CONTRACT!r} "
                         "(model/hypersigma/preprocess.py), or leave it unset for the family's default.")
    return contract


def _hypersigma_load(model: nn.Module, path: Path, strict: bool) -> LoadedWeights:
    """A whole HyperSigma state_dict (`spat_encoder.*` / `spec_encoder.*` keys, e.g. a saved backbone) loads as is;
    a spatial or spectral encoder checkpoint (the release's spat-vit / spec-vit files, or a `mae_spatial` /
    `mae_spectral` pretraining checkpoint) loads into its branch, the other branch keeping random weights.
    Encoder files load without the release's load-time edits: every tensor whose shape fits is kept."""
    assert isinstance(model, HyperSigma)
    state = read_state_dict(path) if path.suffix == ".safetensors" else read_released(path)[0]
    sha = file_sha256(path)
    if any(k.startswith(("spat_encoder.", "spec_encoder.")) for k in state):
        result = model.load_state_dict(state, strict=strict)
        return LoadedWeights(sha, {"strict": strict, "kind": "whole backbone", "missing": sorted(result.missing_keys),
                                   "dropped": sorted(result.unexpected_keys)}, tuple(sorted(
                                       {k.split(".")[0] for k in result.missing_keys})))
    branch = checkpoint_branch(state)
    encoder = model.spat_encoder if branch == "spatial" else model.spec_encoder
    report = load_pretrained(encoder, state, released_edits=False, strict=strict)
    other = "spec_encoder" if branch == "spatial" else "spat_encoder"
    return LoadedWeights(sha, {"strict": strict, "kind": f"{branch} encoder", **report.to_dict(), "sha256": sha,
                               "source": str(path)}, (other, *HYPERSIGMA_FUSION))


def _hypersigma_encode(model: nn.Module, cubes: Sequence[np.ndarray], wavelengths: np.ndarray,
                       gsd_m: Sequence[float], contract: str, device: torch.device
                       ) -> tuple[list[list[torch.Tensor]], list[Geometry]]:
    assert isinstance(model, HyperSigma)
    prepared = [prepare_cube(c, model.config, device=device) for c in cubes]
    image = torch.cat([p.image for p in prepared]).to(model.spec_encoder.pos_embed.dtype)
    maps = model.forward_features(image)
    per_image = [[m[i].float().cpu() for m in maps] for i in range(len(cubes))]
    # GSD is no input of HyperSIGMA; the recorded value is the cube's, scaled by the resize.
    geometry = [(p.input_size, p.original_size, float(g) * max(p.original_size) / max(p.input_size))
                for p, g in zip(prepared, gsd_m, strict=True)]
    return per_image, geometry


def _hypersigma_extract(model: nn.Module, cube: np.ndarray, wavelengths: np.ndarray, gsd_m: float, contract: str
                        ) -> list[torch.Tensor]:
    assert isinstance(model, HyperSigma)
    prepared = prepare_cube(cube, model.config, device=model.device)
    return model.forward_features(prepared.image.to(model.spec_encoder.pos_embed.dtype))


register_adapter(BackboneAdapter(
    family=FAMILY_HYPERSIGMA, default_contract=HYPERSIGMA_CONTRACT, check_contract=_hypersigma_contract,
    describe_contract=lambda config, _contract: describe_contract(config), img_size=lambda c: int(c.img_size),
    load_weights=_hypersigma_load, encode=_hypersigma_encode, extract=_hypersigma_extract,
))

