"""HyperFree: channel-adaptive image encoder + SAM prompt encoder and mask decoder; checkpoint loading.

One implementation serves the material pseudo-labeller (HyperFree-b weights) and the HyperVision backbone.
Preprocessing follows the official `HyperFree_Predictor.set_image`; the loader follows the official
`load_and_resize_params` but reports the missing, unexpected and skipped keys instead of hiding them.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.modeling.mask_decoder import MaskDecoder
from segment_anything.modeling.prompt_encoder import PromptEncoder
from segment_anything.modeling.transformer import TwoWayTransformer
from torch import nn

from model.encoder import EncoderConfig, HyperFreeImageEncoder
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
class PreparedCube:
    """A cube in the model's input frame, with the sizes needed to map prompts and masks back."""

    image: torch.Tensor
    """(1, C, img_size, img_size) float: resized, divided by its global max, zero-padded bottom/right."""
    input_size: tuple[int, int]
    """(h, w) after the resize, before padding."""
    original_size: tuple[int, int]
    """(H, W) of the cube as given."""


def preprocess_shape(height: int, width: int, long_side: int) -> tuple[int, int]:
    """Size after resizing the longest side to `long_side` (SAM `ResizeLongestSide.get_preprocess_shape`)."""
    scale = long_side * 1.0 / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def prepare_cube(
    cube_hwc: np.ndarray | torch.Tensor, img_size: int, device: torch.device | str = "cpu"
) -> PreparedCube:
    """Official predictor preprocessing: HWC -> (1, C, H, W) float; bilinear antialiased resize of the longest
    side to `img_size`; x / x.max() (one global max); zero-pad bottom/right to img_size x img_size."""
    if cube_hwc.ndim != 3:
        raise ValueError(f"Expected an (H, W, C) cube, got shape {tuple(cube_hwc.shape)}.")
    x = torch.as_tensor(cube_hwc, device=device).permute(2, 0, 1).unsqueeze(0).float()
    original_size = (int(x.shape[-2]), int(x.shape[-1]))
    target = preprocess_shape(*original_size, img_size)
    x = F.interpolate(x, target, mode="bilinear", align_corners=False, antialias=True)
    peak = x.max()
    if not torch.isfinite(peak) or peak <= 0:
        raise ValueError(
            f"Cannot normalise the cube by its global max ({peak.item()}): it must be finite and positive; "
            "fill NaN/inf values and check the cube is not empty before labelling."
        )
    x = x / peak
    x = F.pad(x, (0, img_size - target[1], 0, img_size - target[0]))
    return PreparedCube(image=x, input_size=target, original_size=original_size)


def effective_gsd(gsd_m: float, height: int, width: int, img_size: int) -> float:
    """GSD of the resized image, as the official scripts: GSD * max(H, W) / img_size."""
    return gsd_m * max(height, width) / img_size


@torch.no_grad()
def extract_features(
    model: HyperFree,
    cube_hwc: np.ndarray | torch.Tensor,
    wavelengths_nm: Sequence[float] | np.ndarray,
    gsd_m: float,
) -> list[torch.Tensor]:
    """Multi-stage backbone features of one cube, the official feature-extraction use
    (`predictor.set_image(...)` then `predictor.multi_scale_features`).

    Preprocesses as the official predictor, rescales the GSD to the resized image, and runs the deterministic
    inference path (all matched bands). Returns the `feature_indexes` block outputs (1, D, h, w) followed by
    the neck output (1, out_chans, h, w).
    """
    enc = model.image_encoder
    prepared = prepare_cube(cube_hwc, enc.img_size, device=model.device)
    gsd = effective_gsd(gsd_m, *prepared.original_size, enc.img_size)
    image = prepared.image.to(enc.point_spectral_weight_bank_w.dtype)
    return enc.forward_intermediates(image, wavelengths_nm, gsd)


@dataclass(frozen=True)
class LoadReport:
    """What a checkpoint load did; every key that did not load as is appears here."""

    source: str
    sha256: str
    """Of the file's bytes; for an in-memory state_dict, of its keys, dtypes, shapes and tensor bytes."""
    loaded: int
    missing: tuple[str, ...]
    unexpected: tuple[str, ...]
    resized: tuple[str, ...]
    """Keys interpolated to the model's shape (pos_embed, rel_pos, weight banks) as the official loader."""
    mismatched: tuple[str, ...]
    """Keys skipped because their shape differs and no interpolation rule applies."""

    @property
    def is_exact(self) -> bool:
        """True when every key loaded with its stored shape."""
        return not (self.missing or self.unexpected or self.resized or self.mismatched)


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
    """Raw state_dict from a .safetensors file or a torch .pth/.pt file (weights_only)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    state = torch_load(path)
    if not isinstance(state, Mapping) or not all(torch.is_tensor(v) for v in state.values()):
        keys = list(state)[:5] if isinstance(state, Mapping) else type(state).__name__
        raise ValueError(
            f"{path}: expected a raw state_dict (name -> tensor) like HyperFree checkpoints; found {keys}. "
            "If the weights sit under a key such as 'model', save that inner dict."
        )
    return dict(state)


def _resize(key: str, value: torch.Tensor, shape: torch.Size) -> torch.Tensor | None:
    """The official loader's interpolation for a shape mismatch, or None when no rule applies."""
    if "pos_embed" in key and value.ndim == 4 and value.shape[::3] == shape[::3]:
        out = F.interpolate(value.permute(0, 3, 1, 2), size=(shape[1], shape[2]), mode="nearest")
        return out.permute(0, 2, 3, 1)
    if "rel_pos" in key and value.ndim == 2 and len(shape) == 2:
        return F.interpolate(value[None, None], size=(shape[0], shape[1]))[0, 0]
    if "weight_bank" in key and value.ndim == 4 and value.shape[:2] == shape[:2]:
        return F.interpolate(value, size=(shape[2], shape[3]), mode="nearest")
    return None


def load_checkpoint(
    model: nn.Module, path_or_state_dict: str | Path | Mapping[str, torch.Tensor], strict: bool = False
) -> LoadReport:
    """Load a raw state_dict (.pth/.pt or .safetensors path, or a mapping) into `model` and report every key.

    Keys absent from the model are not loaded (unexpected); shape mismatches are interpolated where the
    official loader does (pos_embed, rel_pos, weight banks), else skipped (mismatched). With `strict`, any
    missing, unexpected or mismatched key raises; otherwise they are logged as warnings and returned.
    """
    if isinstance(path_or_state_dict, Mapping):
        state, source, sha = dict(path_or_state_dict), "<state_dict>", state_dict_sha256(path_or_state_dict)
    else:
        path = Path(path_or_state_dict)
        if not path.is_file():
            raise FileNotFoundError(
                f"Checkpoint {path} does not exist; set the checkpoint path in the settings."
            )
        state, source, sha = read_state_dict(path), str(path), file_sha256(path)
    own = model.state_dict()
    to_load: dict[str, torch.Tensor] = {}
    resized: list[str] = []
    mismatched: list[str] = []
    for key, value in state.items():
        if key not in own:
            continue
        if value.shape != own[key].shape:
            new = _resize(key, value, own[key].shape)
            if new is None:
                mismatched.append(key)
                continue
            resized.append(key)
            value = new
        to_load[key] = value
    unexpected = tuple(k for k in state if k not in own)
    missing = tuple(k for k in own if k not in state)
    report = LoadReport(
        source=source,
        sha256=sha,
        loaded=len(to_load),
        missing=missing,
        unexpected=unexpected,
        resized=tuple(resized),
        mismatched=tuple(mismatched),
    )
    problems = {"missing": missing, "unexpected": unexpected, "mismatched": tuple(mismatched)}
    if strict and any(problems.values()):
        shapes = {k: f"{k} (file {tuple(state[k].shape)}, model {tuple(own[k].shape)})" for k in mismatched}
        raise RuntimeError(
            f"Strict load of {source} failed: "
            + "; ".join(f"{k}: {[shapes.get(key, key) for key in v]}" for k, v in problems.items() if v)
            + ". Fix: load a checkpoint of the same model (name and size) as the one built"
        )
    model.load_state_dict(to_load, strict=False)
    for kind, keys in {**problems, "resized": tuple(resized)}.items():
        if keys:
            logger.warning("Checkpoint %s: %d %s keys: %s", source, len(keys), kind, list(keys))
    logger.info("Loaded %d tensors from %s (sha256 %s)", len(to_load), source, sha)
    return report
