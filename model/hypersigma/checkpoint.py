"""Loading the released HyperSIGMA pretrained encoders (`spat-vit-*`, `spec-vit-*`) with the release's load-time
edits, and a report that names every key: loaded, resized, re-initialised or ignored.

Files are read with `torch.load(weights_only=True)`; the release's `misc.save_model` container
(`{'model', 'optimizer', 'epoch', 'scaler', 'args'}`) pickles `args` as an `argparse.Namespace`, which is
allowed (a plain attribute bag) and nothing else. The container rules are the release's: `state_dict`, `model`
or a raw dict; a `module.` prefix stripped; an `encoder.*` checkpoint reduced to its encoder.

Edits (``released_edits=True``, the default, reproduces the release's `init_weights`):

- spatial: `patch_embed.proj` dropped whenever the encoder takes other than 3 bands (always, for hyperspectral
  inputs: the patch embedding is re-learned); `pos_embed` bicubically resized from its square grid to the
  encoder's when they differ;
- spectral: `spat_map` dropped when the image size is not 64; `pos_embed`: its first token dropped and the other
  N - 1 bicubically resized to the encoder's token count (the release treats one token as a class token, even
  when the counts match);
- both: `sampling_offsets` (SSA; the MAE encoders have none), the spatial fpn convs and the spectral `l1` keep
  the encoder's fresh initialisation; the MAE decoder keys are ignored.

``released_edits=False`` keeps every tensor whose shape fits (the patch embedding when the band count and patch
size match, `spat_map` when the image size matches, `pos_embed` as stored when the token count matches) and
resizes or re-learns only what does not fit.

Strict (the default): a key of the encoder's core (blocks, norm) missing from the file, a core shape that does not
fit, or a file key that is neither the encoder's nor a known leftover of the release (MAE decoder, classifier
heads, the spectral conv_q/k/v) raises an InputError that lists them; e.g. a -L file into a -B encoder.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from torch import nn

from base.errors import InputError
from model.hyperfree import file_sha256, state_dict_sha256
from model.hypersigma.model import HyperSigma
from model.hypersigma.vit import SpatialViT, SpectralViT
from model.safeload import torch_load

logger = logging.getLogger(__name__)

Branch = Literal["spatial", "spectral"]
Source = str | Path | Mapping[str, Any]

RELEASED_CHECKPOINTS: dict[str, tuple[str, Branch]] = {
    **{f"spat-vit-{size}-ultra-checkpoint-1599.pth": (size[0], "spatial") for size in ("base", "large", "huge")},
    **{f"spec-vit-{size}-ultra-checkpoint-1599.pth": (size[0], "spectral") for size in ("base", "large", "huge")},
    "spat-vit-b-checkpoint-1599.pth": ("b", "spatial"),
    "spec-vit-b-checkpoint-1599.pth": ("b", "spectral"),
    "spat-base.pth": ("b", "spatial"),
    "spec-base.pth": ("b", "spectral"),
}
"""Released file names -> (size b/l/h, branch), as the README and the task scripts name them."""

PRETRAINED_IMG_SIZE = 64
"""Image size of the released pretraining (`spat_map` is Linear(64 * 64, D))."""

_DECODER = ("decoder_", "mask_token")
_LEFTOVERS = ("classifier", "cls.", "conv_q.", "conv_k.", "conv_v.", "conv_features.")
"""Keys of the release's fine-tuning encoders that no backbone uses (heads, unused spectral convs)."""
_FRESH = ("sampling_offsets", "fpn", "l1.")
"""Encoder keys never in a pretrained file: initialised fresh, as the release does."""


@dataclass(frozen=True)
class PretrainedLoadReport:
    """What one pretrained-encoder load did; every key of the file and of the encoder appears here once."""

    source: str
    sha256: str
    """Of the file's bytes; for an in-memory state_dict, of its keys, dtypes, shapes and tensor bytes."""
    branch: Branch
    released_edits: bool
    loaded: tuple[str, ...]
    """Encoder keys loaded as stored."""
    resized: Mapping[str, str] = field(default_factory=dict)
    """Encoder keys loaded after interpolation -> how (from and to shapes)."""
    reinitialised: Mapping[str, str] = field(default_factory=dict)
    """Encoder keys keeping their fresh initialisation -> why (absent from the file, or dropped by an edit)."""
    ignored: Mapping[str, str] = field(default_factory=dict)
    """File keys not loaded -> why (MAE decoder, release leftovers, dropped by an edit, unknown)."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (for run records)."""
        return {"source": self.source, "sha256": self.sha256, "branch": self.branch,
                "released_edits": self.released_edits, "loaded": list(self.loaded), "resized": dict(self.resized),
                "reinitialised": dict(self.reinitialised), "ignored": dict(self.ignored)}

    def summary(self) -> str:
        """One line per category with its count and reasons."""
        lines = [f"{self.branch} encoder from {self.source} (sha256 {self.sha256[:12]}): {len(self.loaded)} loaded"]
        for kind, entries in (("resized", self.resized), ("re-initialised", self.reinitialised),
                              ("ignored", self.ignored)):
            reasons: dict[str, int] = {}
            for why in entries.values():
                reasons[why] = reasons.get(why, 0) + 1
            lines += [f"  {kind} {n}: {why}" for why, n in reasons.items()]
        return "\n".join(lines)


def read_released(source: Source) -> tuple[dict[str, torch.Tensor], str, str]:
    """(encoder state_dict, source name, sha256) of a released checkpoint file or an in-memory dict, with the
    release's container rules (`state_dict` / `model` / raw; `module.` stripped; `encoder.*` kept)."""
    if isinstance(source, Mapping):
        raw: Any = dict(source)
        name = "<state_dict>"
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"Checkpoint {path} does not exist; check the path (or the setting naming it).")
        with torch.serialization.safe_globals([argparse.Namespace]):
            raw = torch_load(path)
        name = str(path)
    state = raw.get("state_dict", raw.get("model", raw)) if isinstance(raw, Mapping) else raw
    if not isinstance(state, Mapping) or not state or not all(torch.is_tensor(v) for v in state.values()):
        found = list(state)[:5] if isinstance(state, Mapping) else type(state).__name__
        raise InputError(name, "<top level>", f"expected a state_dict (name -> tensor), or one under 'model' or "
                         f"'state_dict' as the release saves it; found {found}",
                         "save the encoder's weights as a dict of tensors (e.g. model.hypersigma.mae.save_released)")
    out = {str(k): v for k, v in state.items()}
    if next(iter(out)).startswith("module."):
        out = {k.removeprefix("module."): v for k, v in out.items()}
    if sorted(out)[0].startswith("encoder"):
        out = {k.removeprefix("encoder."): v for k, v in out.items() if k.startswith("encoder.")}
    sha = state_dict_sha256(out) if name == "<state_dict>" else file_sha256(Path(name))
    return out, name, sha


def checkpoint_branch(state: Mapping[str, torch.Tensor]) -> Branch:
    """Which encoder a pretrained state_dict is for: spectral if it has `spat_map`, else spatial."""
    return "spectral" if any(k.startswith("spat_map.") for k in state) else "spatial"


def released_name_info(source: Source) -> tuple[str, Branch] | None:
    """(size, branch) when the file name is one the release publishes, else None."""
    return None if isinstance(source, Mapping) else RELEASED_CHECKPOINTS.get(Path(source).name)


def _resize_spatial_pos(value: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(1, N0, D) on a square grid -> (1, Hp * Wp, D), bicubic, align_corners=False (the release's rule)."""
    side = int(value.shape[1] ** 0.5)
    maps = value.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    maps = F.interpolate(maps.float(), size=grid, mode="bicubic", align_corners=False).to(value.dtype)
    return maps.permute(0, 2, 3, 1).flatten(1, 2)


def _resize_tokens(value: torch.Tensor, tokens: int) -> torch.Tensor:
    """(1, N, D) -> (1, tokens, D): bicubic along the token axis, as a (N x 1) image (the release's rule)."""
    maps = value.reshape(1, value.shape[1], 1, -1).permute(0, 3, 1, 2)
    maps = F.interpolate(maps.float(), size=(tokens, 1), mode="bicubic", align_corners=False).to(value.dtype)
    return maps.permute(0, 2, 3, 1).flatten(1, 2)


def _edit(encoder: SpatialViT | SpectralViT, state: dict[str, torch.Tensor], released_edits: bool,
          ) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, str]]:
    """Apply the load-time edits: (tensors to load, resized key -> how, dropped file key -> why)."""
    own = encoder.state_dict()
    resized: dict[str, str] = {}
    dropped: dict[str, str] = {}
    out = dict(state)
    spectral = isinstance(encoder, SpectralViT)
    if spectral:
        spat_keys = [k for k in out if k.startswith("spat_map.")]
        if released_edits and encoder.img_size != PRETRAINED_IMG_SIZE:
            why = f"the release drops spat_map when img_size != {PRETRAINED_IMG_SIZE} (here {encoder.img_size})"
        elif any(out[k].shape != own[k].shape for k in spat_keys):
            why = f"image size differs (spat_map maps a whole image: file {tuple(out['spat_map.weight'].shape)})"
        else:
            why = ""
        for key in spat_keys if why else ():
            dropped[key] = why
            del out[key]
    else:
        patch_keys = [k for k in out if k.startswith("patch_embed.proj.")]
        bands = cast(nn.Conv2d, encoder.get_submodule("patch_embed.proj")).in_channels
        if released_edits and bands != 3:
            why = "the release drops the patch embedding whenever in_chans != 3 (re-learned)"
        elif any(out[k].shape != own[k].shape for k in patch_keys):
            why = f"band count or patch size differs (file {tuple(out['patch_embed.proj.weight'].shape)})"
        else:
            why = ""
        for key in patch_keys if why else ():
            dropped[key] = why
            del out[key]
    if "pos_embed" in out:
        value, target = out["pos_embed"], own["pos_embed"].shape
        if spectral and released_edits:
            out["pos_embed"] = _resize_tokens(value[:, 1:], int(target[1]))
            resized["pos_embed"] = (f"{tuple(value.shape)} -> {tuple(target)}: first token dropped, the other "
                                    f"{value.shape[1] - 1} bicubic-resized (the release's spectral rule)")
        elif value.shape != target:
            out["pos_embed"] = (_resize_tokens(value, int(target[1])) if spectral
                                else _resize_spatial_pos(value, encoder.grid))
            resized["pos_embed"] = f"{tuple(value.shape)} -> {tuple(target)}: bicubic"
    return out, resized, dropped


def load_pretrained(encoder: SpatialViT | SpectralViT, source: Source, *, released_edits: bool = True,
                    strict: bool = True) -> PretrainedLoadReport:
    """Load a released (or our MAE's) pretrained encoder checkpoint into one encoder, with the load-time edits,
    and report every key. Strict: anything beyond the expected edits raises an InputError (see the module)."""
    state, name, sha = read_released(source)
    branch: Branch = "spectral" if isinstance(encoder, SpectralViT) else "spatial"
    found = checkpoint_branch(state)
    if found != branch:
        has = "has" if found == "spectral" else "lacks"
        raise InputError(name, "state_dict", f"is a {found} encoder checkpoint (it {has} spat_map), loaded into "
                         f"the {branch} encoder",
                         f"pass it as the {found} checkpoint (spat-vit-* files are spatial, spec-vit-* spectral)")
    to_load, resized, ignored = _edit(encoder, state, released_edits)
    own = encoder.state_dict()
    reinitialised: dict[str, str] = {}
    problems: list[str] = []
    for key in list(to_load):
        if key not in own:
            del to_load[key]
            if key.startswith(_DECODER):
                ignored[key] = "MAE decoder (pretraining only)"
            elif key.startswith(_LEFTOVERS):
                ignored[key] = "a head or unused module of the release, not part of the encoder"
            else:
                ignored[key] = "unknown to this encoder"
                problems.append(f"unexpected {key}")
        elif to_load[key].shape != own[key].shape:
            problems.append(f"{key} (file {tuple(to_load[key].shape)}, model {tuple(own[key].shape)})")
            ignored[key] = f"shape differs: file {tuple(to_load[key].shape)}, model {tuple(own[key].shape)}"
            del to_load[key]
    for key in own:
        if key in to_load:
            continue
        if key.startswith(("patch_embed.", "spat_map.")) and (key in ignored or key not in state):
            reinitialised[key] = ignored.get(key, "not in the file") + "; fresh initialisation"
        elif any(part in key for part in _FRESH):
            reinitialised[key] = "not in pretrained checkpoints (fine-tuning module); fresh initialisation"
        else:
            reinitialised[key] = "missing from the file; fresh initialisation"
            problems.append(f"missing {key}")
    if strict and problems:
        shown = problems[:12] + ([f"... ({len(problems) - 12} more)"] if len(problems) > 12 else [])
        info = released_name_info(source)
        hint = f" The file name says -{info[0].upper()} {info[1]}." if info else ""
        raise InputError(name, "state_dict", f"does not fit the {branch} encoder beyond the release's load-time "
                         f"edits: {shown}.{hint}",
                         "build the layout of the checkpoint's size (hypersigma_b/l/h), or pass strict=False to load "
                         "what fits (every other key is then listed in the report)")
    result = encoder.load_state_dict(to_load, strict=False)
    if set(result.missing_keys) != set(reinitialised) or result.unexpected_keys:
        raise RuntimeError(f"load bookkeeping disagrees with torch: {result}")  # a bug here, not in the file
    report = PretrainedLoadReport(source=name, sha256=sha, branch=branch, released_edits=released_edits,
                                  loaded=tuple(k for k in to_load if k not in resized), resized=resized,
                                  reinitialised=reinitialised, ignored=ignored)
    logger.info("%s", report.summary())
    if problems:
        logger.warning("Non-strict load of %s: %s", name, problems)
    return report


def load_released(model: HyperSigma, spatial: Source | None = None, spectral: Source | None = None, *,
                  released_edits: bool = True, strict: bool = True) -> dict[Branch, PretrainedLoadReport]:
    """Load released `spat-vit-*` / `spec-vit-*` checkpoints (paths or dicts) into a HyperSIGMA model's two
    encoders. A released file name of another size than the model raises before any tensor is read."""
    size = model.config.name.removeprefix("hypersigma_")
    reports: dict[Branch, PretrainedLoadReport] = {}
    pairs: tuple[tuple[Branch, Source | None, SpatialViT | SpectralViT], ...] = (
        ("spatial", spatial, model.spat_encoder), ("spectral", spectral, model.spec_encoder))
    for branch, source, encoder in pairs:
        if source is None:
            continue
        info = released_name_info(source)
        if info is not None and (info[1] != branch or (size in ("b", "l", "h") and info[0] != size)):
            raise InputError(str(source), "file name", f"names the -{info[0].upper()} {info[1]} encoder, given as the "
                             f"{branch} checkpoint of {model.config.name!r}",
                             f"build hypersigma_{info[0]} and pass it as the {info[1]} checkpoint")
        reports[branch] = load_pretrained(encoder, source, released_edits=released_edits, strict=strict)
    return reports
