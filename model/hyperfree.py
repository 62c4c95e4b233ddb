"""HyperFree: channel-adaptive image encoder + SAM prompt encoder and mask decoder; checkpoint loading.

One implementation serves the material pseudo-labeller (HyperFree-b weights) and the HyperVision backbone
(the released B/L/H layouts, see model.registry). Preprocessing lives in model.preprocess. The loader applies the
released `load_and_resize_params` interpolation rules, but is strict by default and reports every key that did not
load as stored instead of hiding it.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from segment_anything.modeling.mask_decoder import MaskDecoder
from segment_anything.modeling.prompt_encoder import PromptEncoder
from segment_anything.modeling.transformer import TwoWayTransformer
from torch import nn

from base.errors import InputError
from model.encoder import EncoderConfig, HyperFreeImageEncoder
from model.registry import FAMILY_HYPERFREE, fitting_layouts
from model.safeload import torch_load

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelConfig:
    """Resolved config of a whole HyperFree model (encoder + SAM prompt encoder and mask decoder)."""

    name: str
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    mask_in_chans: int = 16
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    num_multimask_outputs: int = 3

    def to_dict(self) -> dict[str, Any]:
        """Plain (JSON-friendly) dict, saved beside runs; `from_dict` rebuilds the same config."""
        out = asdict(self)
        out["encoder"] = self.encoder.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelConfig:
        """Inverse of `to_dict`."""
        values = dict(data)
        values["encoder"] = EncoderConfig(**values.get("encoder", {}))
        return cls(**values)


class HyperFree(nn.Module):
    """SAM-style container with the official attribute names (`image_encoder`, `prompt_encoder`,
    `mask_decoder`), so the HyperFree checkpoint's key prefixes match."""

    mask_threshold: float = 0.0

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        enc = config.encoder
        # The official builder sizes the prompt grid as img_size // patch_size, which breaks decoding when
        # patch merging runs; the prompt encoder has no grid-shaped weights, so use the neck's grid instead.
        out_grid = enc.output_grid_size
        self.image_encoder = HyperFreeImageEncoder(enc)
        self.prompt_encoder = PromptEncoder(
            embed_dim=enc.out_chans,
            image_embedding_size=(out_grid, out_grid),
            input_image_size=(enc.img_size, enc.img_size),
            mask_in_chans=config.mask_in_chans,
        )
        self.mask_decoder = MaskDecoder(
            num_multimask_outputs=config.num_multimask_outputs,
            transformer=TwoWayTransformer(
                depth=config.decoder_depth,
                embedding_dim=enc.out_chans,
                mlp_dim=config.decoder_mlp_dim,
                num_heads=config.decoder_num_heads,
            ),
            transformer_dim=enc.out_chans,
            iou_head_depth=config.iou_head_depth,
            iou_head_hidden_dim=config.iou_head_hidden_dim,
        )

    @property
    def device(self) -> torch.device:
        """Device of the weights."""
        return self.image_encoder.point_spectral_weight_bank_w.device

    def decode(
        self,
        image_embedding: torch.Tensor,
        point_coords: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        multimask_output: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Masks for N prompts on ONE image: `image_embedding` (1, C, h, w) from `forward_features`.

        Prompts are in the padded input frame (pixels of the img_size square): points (N, K, 2) xy with labels
        (N, K), boxes (N, 4) xyxy, mask_input (N, 1, 4h, 4w). Returns low-res logits (N, M, 4h, 4w) and
        predicted IoU (N, M), M = 3 with `multimask_output` else 1.
        """
        if image_embedding.shape[0] != 1:
            raise ValueError(
                f"decode takes one image embedding (1, C, h, w), got {tuple(image_embedding.shape)}."
            )
        points = None if point_coords is None else (point_coords, point_labels)
        sparse, dense = self.prompt_encoder(points=points, boxes=boxes, masks=mask_input)
        return self.mask_decoder(
            image_embeddings=image_embedding,
            image_pe=self.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask_output,
        )

    def postprocess_masks(
        self, masks: torch.Tensor, input_size: tuple[int, int], original_size: tuple[int, int]
    ) -> torch.Tensor:
        """Low-res logits -> logits at the original image size (upscale, crop the padding, resize), as SAM."""
        size = self.config.encoder.img_size
        masks = F.interpolate(masks, (size, size), mode="bilinear", align_corners=False)
        masks = masks[..., : input_size[0], : input_size[1]]
        return F.interpolate(masks, original_size, mode="bilinear", align_corners=False)


@dataclass(frozen=True)
class LoadReport:
    """What a checkpoint load did; every key that did not load as stored appears here."""

    source: str
    sha256: str
    """Of the file's bytes; for an in-memory state_dict, of its keys, dtypes, shapes and tensor bytes."""
    loaded: int
    missing: tuple[str, ...]
    """Model keys the checkpoint lacks (they keep the model's own values; non-strict loads only)."""
    unexpected: tuple[str, ...]
    """Checkpoint keys the model lacks (dropped; non-strict loads only)."""
    resized: tuple[str, ...]
    """Keys interpolated to the model's shape as the released loader does (strict: relative positions only)."""
    mismatched: tuple[str, ...]
    """Keys dropped because their shape differs and no interpolation rule applies (non-strict loads only)."""
    strict: bool = True

    @property
    def is_exact(self) -> bool:
        """True when every key loaded with its stored shape."""
        return not (self.missing or self.unexpected or self.resized or self.mismatched)

    @property
    def dropped(self) -> tuple[str, ...]:
        """Checkpoint keys that did not load: unexpected or with a shape no rule could fit."""
        return self.unexpected + self.mismatched


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def state_dict_sha256(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Hex sha256 over sorted keys, dtypes, shapes and tensor bytes: a content hash for in-memory weights."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Raw state_dict from a .safetensors file or a torch .pth/.pt file, read with weights_only=True.

    A pickle that needs more than tensors and plain containers (a whole pickled module, an optimizer with custom
    classes) is refused: unpickling it would run code from the file.
    """
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    state = torch_load(path)
    if not isinstance(state, Mapping) or not all(torch.is_tensor(v) for v in state.values()):
        keys = list(state)[:5] if isinstance(state, Mapping) else type(state).__name__
        raise InputError(
            path, "<top level>", f"expected a raw state_dict (name -> tensor) like the released checkpoints; "
            f"found {keys}", "if the weights sit under a key such as 'model', save that inner dict")
    return dict(state)


def _resize(key: str, value: torch.Tensor, shape: torch.Size) -> torch.Tensor | None:
    """The released loader's interpolation for a shape mismatch, or None when no rule applies."""
    if "pos_embed" in key and value.ndim == 4 and value.shape[::3] == shape[::3]:
        out = F.interpolate(value.permute(0, 3, 1, 2), size=(shape[1], shape[2]), mode="nearest")
        return out.permute(0, 2, 3, 1)
    if "rel_pos" in key and value.ndim == 2 and len(shape) == 2:
        return F.interpolate(value[None, None], size=(shape[0], shape[1]))[0, 0]
    if "weight_bank" in key and value.ndim == 4 and value.shape[:2] == shape[:2]:
        return F.interpolate(value, size=(shape[2], shape[3]), mode="nearest")
    return None


def image_size_dependent(model: nn.Module, key: str, stored: Sequence[int]) -> bool:
    """True for the relative-position table of a global-attention block whose stored table is not window-sized:
    its length is 2 * grid - 1, so it differs whenever the image size does (an override every layout allows), and
    a strict load may resize it as the released loader does. Windowed blocks' tables never depend on the size."""
    if ".attn.rel_pos_" not in key:
        return False
    block = model.get_submodule(key.split(".attn.")[0])
    window = getattr(getattr(getattr(model, "config", None), "encoder", None), "window_size", None)
    return getattr(block, "window_size", None) == 0 and stored[0] != (2 * window - 1 if window else -1)


def _listed(keys: Sequence[str], limit: int = 12) -> str:
    """At most `limit` keys, then how many more."""
    more = f" ... ({len(keys) - limit} more)" if len(keys) > limit else ""
    return f"{list(keys[:limit])}{more}"


def matching_layouts(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Registered HyperFree-family layouts that load the checkpoint strictly (at some image size): same keys, same
    shapes except the global blocks' relative-position tables."""
    return fitting_layouts({k: tuple(v.shape) for k, v in state.items()}, FAMILY_HYPERFREE)


def load_checkpoint(
    model: nn.Module, path_or_state_dict: str | Path | Mapping[str, torch.Tensor], strict: bool = True
) -> LoadReport:
    """Load a raw state_dict (.pth/.pt or .safetensors path, or a mapping) into `model` and report every key.

    Strict (the default): every key must exist on both sides with the same shape; only the global blocks'
    relative-position tables may differ, interpolated as the released loader does when the image size differs from
    the checkpoint's (reported in `resized`). Anything else raises an InputError that lists the keys, names the
    registered layouts the checkpoint matches, and says how to load it anyway. Non-strict: loads what matches,
    interpolates pos_embed, rel_pos and weight banks where the released loader does, keeps the model's own values
    for missing keys, and logs what was dropped or resized.
    """
    if isinstance(path_or_state_dict, Mapping):
        state, source = dict(path_or_state_dict), "<state_dict>"
    else:
        path = Path(path_or_state_dict)
        if not path.is_file():
            raise FileNotFoundError(f"Checkpoint {path} does not exist; check the path (or the setting naming it).")
        state, source = read_state_dict(path), str(path)
    own = model.state_dict()
    to_load: dict[str, torch.Tensor] = {}
    resized: list[str] = []
    mismatched: list[str] = []
    for key, value in state.items():
        if key not in own:
            continue
        if value.shape != own[key].shape:
            allowed = not strict or image_size_dependent(model, key, value.shape)
            new = _resize(key, value, own[key].shape) if allowed else None
            if new is None:
                mismatched.append(key)
                continue
            resized.append(key)
            value = new
        to_load[key] = value
    unexpected = tuple(k for k in state if k not in own)
    missing = tuple(k for k in own if k not in state)
    name = getattr(getattr(model, "config", None), "name", type(model).__name__)
    if strict and (missing or unexpected or mismatched):
        shapes = [f"{k} (file {tuple(state[k].shape)}, model {tuple(own[k].shape)})" for k in mismatched]
        problem = "; ".join(f"{kind} {len(keys)}: {_listed(keys)}" for kind, keys in (
            ("missing", missing), ("unexpected", unexpected), ("shape differs", shapes),
        ) if keys)
        layouts = [n for n in matching_layouts(state) if n != name]
        hint = (f"the checkpoint's keys and shapes match layout {' / '.join(repr(n) for n in layouts)}: build that "
                "(create_model(name), --model name)") if layouts else "build the layout the checkpoint was saved from"
        raise InputError(source, "state_dict", f"does not match model {name!r} key for key ({problem})",
                         f"{hint}; or load non-strictly (strict=False, --non-strict) to keep what matches and list "
                         "what is dropped or resized")
    model.load_state_dict(to_load, strict=False)
    sha = state_dict_sha256(state) if source == "<state_dict>" else file_sha256(Path(source))
    report = LoadReport(source=source, sha256=sha, loaded=len(to_load), missing=missing, unexpected=unexpected,
                        resized=tuple(resized), mismatched=tuple(mismatched), strict=strict)
    for kind, keys in (("missing (model values kept)", missing), ("dropped: unexpected", unexpected),
                       ("dropped: shape differs", tuple(mismatched))):
        if keys:
            logger.warning("Checkpoint %s into %r: %d %s keys: %s", source, name, len(keys), kind, list(keys))
    if resized:
        logger.log(logging.WARNING if not strict else logging.INFO, "Checkpoint %s into %r: %d keys resized as the "
                   "released loader does: %s", source, name, len(resized), resized)
    logger.info("Loaded %d tensors from %s into %r (sha256 %s)", len(to_load), source, name, sha)
    return report
