"""SAM2 models for the spatial and spectral branches: random-init or strict checkpoint loading, any image size.

sam2's configs are Hydra files inside the installed package. ``build_sam2_model`` composes them in a scoped Hydra
context (the caller's own Hydra state, if any, is restored afterwards), resizes the model consistently when
``image_size`` is given, and loads a checkpoint strictly, naming every missing or unexpected key.

Model names and sizes are configuration (the caller's profile: the demo runs the unchanged Hiera-T architecture
at a 128-pixel input, production Hiera-B+ at its native 1024 px). A model's parameters do not depend on the input
size, so an official checkpoint (e.g. ``sam2.1_hiera_tiny.pt``) loads at any size. Measured on 2 CPU cores (best of
several runs; other jobs shared the cores): automatic masks with points_per_side 4 take about 0.05 s per image at
128 px (0.08 s on one thread), 0.17 s at 256 px and 2.4 s at the native 1024 px; video propagation at 128 px takes
about 0.07 s per frame for one object, 0.13 s for four.
"""

from __future__ import annotations

import logging
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import OmegaConf
from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator
from sam2.modeling.sam2_base import SAM2Base
from sam2.sam2_video_predictor import SAM2VideoPredictor
from sam2.utils.amg import batched_mask_to_box
from scipy import ndimage
from torchvision.ops import nms

from model.safeload import UnsafeCheckpointError, torch_load

log = logging.getLogger(__name__)

#: The Hiera trunk downsamples by 4 * 2**3: input sizes must be multiples of this for the feature pyramids to align.
TRUNK_STRIDE = 32
#: Feature-map strides SAM2 keeps after dropping the coarsest level (``scalp: 1``): high-res 4 and 8, embedding 16.
FEATURE_STRIDES = (4, 8, 16)
#: Seed of random-init weights, so that a random-init labeler id always stands for the same weights.
RANDOM_INIT_SEED = 0
#: The automatic mask generator's parameters a labeler may set, with SAM2's defaults (``point_grids`` and
#: ``output_mode`` are fixed: a regular grid of ``points_per_side`` and binary masks).
AMG_DEFAULTS: dict[str, Any] = {
    "points_per_side": 32, "points_per_batch": 64, "pred_iou_thresh": 0.8, "stability_score_thresh": 0.95,
    "stability_score_offset": 1.0, "mask_threshold": 0.0, "box_nms_thresh": 0.7, "crop_n_layers": 0,
    "crop_nms_thresh": 0.7, "crop_overlap_ratio": 512 / 1500, "crop_n_points_downscale_factor": 1,
    "min_mask_region_area": 0, "use_m2m": False, "multimask_output": True,
}
#: Post-processing overrides sam2's own builders apply (dynamic multimask fallback on unstable single masks).
_POSTPROCESSING = [
    "++model.sam_mask_decoder_extra_args.dynamic_multimask_via_stability=true",
    "++model.sam_mask_decoder_extra_args.dynamic_multimask_stability_delta=0.05",
    "++model.sam_mask_decoder_extra_args.dynamic_multimask_stability_thresh=0.98",
]
_HYDRA_LOCK = threading.Lock()  # Hydra's state is process-global; builds may run in worker threads


class SAM2CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not match the configured architecture."""


def default_device() -> str:
    """CUDA when present, else the CPU (the device never changes a labeler id)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def available_configs() -> list[str]:
    """Config names sam2 ships (what ``config_name`` may be)."""
    root = resources.files("sam2")
    names = [f"{sub}/{p.name}" for sub in ("configs/sam2", "configs/sam2.1")
             for p in root.joinpath(sub).iterdir() if p.name.endswith(".yaml")]
    return sorted(names)


_HYDRA = threading.RLock()
"""Hydra's configuration is one process-wide singleton: labelers built at once in threads (the label branches run
concurrently) take turns, or one would compose its model from the other's half-swapped state."""


@contextmanager
def sam2_hydra() -> Iterator[None]:
    """Hydra initialised on sam2's config module for the duration, whatever the caller had set up globally (one
    thread at a time)."""
    with _HYDRA:
        previous = GlobalHydra.instance().hydra
        GlobalHydra.instance().clear()
        try:
            with initialize_config_module("sam2", version_base="1.2"):
                yield
        finally:
            # initialize_config_module restores the cleared singleton on exit; put the caller's Hydra back into it.
            GlobalHydra.instance().hydra = previous


def size_overrides(image_size: int) -> list[str]:
    """Hydra overrides that resize a SAM2 model consistently: the input size and the memory attention's RoPE grid
    (prompt encoder and mask decoder sizes follow from ``image_size`` inside SAM2Base)."""
    if image_size <= 0 or image_size % TRUNK_STRIDE:
        raise ValueError(f"image_size must be a positive multiple of {TRUNK_STRIDE} (the Hiera trunk's stride), "
                         f"got {image_size}: use e.g. 128, 256 or 1024")
    grid = image_size // FEATURE_STRIDES[-1]
    return [f"++model.image_size={image_size}",
            f"++model.memory_attention.layer.self_attention.feat_sizes=[{grid},{grid}]",
            f"++model.memory_attention.layer.cross_attention.feat_sizes=[{grid},{grid}]"]


def feature_sizes(image_size: int) -> list[tuple[int, int]]:
    """Backbone feature-map sizes at ``image_size`` (SAM2ImagePredictor hard-codes those of 1024 px)."""
    return [(image_size // s, image_size // s) for s in FEATURE_STRIDES]


def build_sam2_model(config_name: str, checkpoint: str | Path | None = None, device: str | torch.device = "cpu",
                     image_size: int | None = None, *, video_class: type[SAM2VideoPredictor] | None = None,
                     seed: int = RANDOM_INIT_SEED) -> SAM2Base:
    """A SAM2 model in eval mode: the image model, or ``video_class`` (a SAM2VideoPredictor subclass) with the
    video post-processing of sam2's video builder except hole filling (``fill_hole_area = 0``: it needs sam2's
    CUDA extension, which is not built here, and outputs must not depend on the machine). Random weights are
    drawn under ``seed`` without touching the global RNG; a ``checkpoint`` ({"model": state_dict}) then replaces
    all of them, strictly."""
    if config_name not in available_configs():
        raise ValueError(f"unknown SAM2 config '{config_name}': choose from {', '.join(available_configs())}")
    overrides = list(_POSTPROCESSING)
    if image_size is not None:
        overrides += size_overrides(image_size)
    if video_class is not None:
        if not issubclass(video_class, SAM2VideoPredictor):
            raise TypeError(f"video_class must subclass SAM2VideoPredictor, got {video_class!r}")
        overrides += [f"++model._target_={video_class.__module__}.{video_class.__qualname__}",
                      "++model.binarize_mask_from_pts_for_mem_enc=true", "++model.fill_hole_area=0"]
    with _HYDRA_LOCK, sam2_hydra():
        cfg = compose(config_name=config_name, overrides=overrides)
    OmegaConf.resolve(cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model: SAM2Base = instantiate(cfg.model, _recursive_=True)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    return model.to(device).eval()


def load_checkpoint(model: torch.nn.Module, checkpoint: str | Path, limit: int = 20) -> None:
    """Load the checkpoint's ``"model"`` state dict (weights only) strictly; on a mismatch the error lists the
    missing and unexpected keys (the first ``limit`` of each, all of them in the log)."""
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"SAM2 checkpoint {path} does not exist: fix the path in settings "
                                "(HVP_SAM2_CHECKPOINT) or leave it unset for random-init weights")
    try:
        blob = torch_load(path)
    except UnsafeCheckpointError as e:
        raise SAM2CheckpointError(str(e)) from None
    except Exception as e:  # unpickling errors come in many classes; all mean the same to the user
        raise SAM2CheckpointError(f"cannot read SAM2 checkpoint {path} with torch.load(weights_only=True): {e}") \
            from e
    if not isinstance(blob, dict) or "model" not in blob:
        keys = list(blob)[:10] if isinstance(blob, dict) else type(blob).__name__
        raise SAM2CheckpointError(f"SAM2 checkpoint {path} must be a dict with the state dict under 'model' "
                                  f"(as sam2's releases are), found {keys}")
    try:
        result = model.load_state_dict(blob["model"], strict=False)
    except RuntimeError as e:  # shape mismatches raise even when strict=False
        raise SAM2CheckpointError(f"SAM2 checkpoint {path} does not fit the configured model: {e}") from e
    if result.missing_keys or result.unexpected_keys:
        log.error("SAM2 checkpoint %s: missing keys %s; unexpected keys %s", path, result.missing_keys,
                  result.unexpected_keys)

        def shown(keys: list[str]) -> str:
            more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
            return f"{len(keys)} {keys[:limit]}{more}"

        raise SAM2CheckpointError(f"SAM2 checkpoint {path} does not match the configured model: missing keys "
                                  f"{shown(result.missing_keys)}; unexpected keys {shown(result.unexpected_keys)}. "
                                  "Use the checkpoint released for this config (e.g. sam2.1_hiera_tiny.pt for "
                                  "sam2.1_hiera_t.yaml)")
    log.info("loaded SAM2 checkpoint %s", path)


def model_spec(model_config: dict[str, Any]) -> tuple[str, int]:
    """The (sam2 config name, image size) of a labeler's model config ``{"config": ..., "image_size": ...}``."""
    unknown = sorted(set(model_config) - {"config", "image_size"})
    if unknown or "config" not in model_config or "image_size" not in model_config:
        raise ValueError(f"a SAM2 model config needs exactly the keys 'config' and 'image_size' (e.g. "
                         "{'config': 'configs/sam2.1/sam2.1_hiera_b+.yaml', 'image_size': 1024}), got "
                         f"{sorted(model_config)}")
    size = model_config["image_size"]
    if not isinstance(size, int) or isinstance(size, bool):
        raise ValueError(f"model config 'image_size' must be an integer, got {size!r}")
    size_overrides(size)
    return str(model_config["config"]), size


def amg_params(params: dict[str, Any], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """``params`` completed with the defaults (AMG_DEFAULTS plus a branch's ``extra`` ones); unknown keys are an
    error naming the allowed ones."""
    defaults = {**AMG_DEFAULTS, **(extra or {})}
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise ValueError(f"unknown labeler parameters {unknown}: allowed are {sorted(defaults)}")
    return {**defaults, **params}


def mask_generator(model: SAM2Base, params: dict[str, Any]) -> SAM2AutomaticMaskGenerator:
    """SAM2's automatic mask generator for ``model`` at its own image size; ``min_mask_region_area`` is left to
    ``automatic_masks`` (sam2 would need its CUDA extension for it and silently skip it without)."""
    amg_kw = {k: v for k, v in params.items() if k in AMG_DEFAULTS}
    with warnings.catch_warnings():  # sam2's transforms use torch.jit.script, deprecated in recent torch
        warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
        amg = SAM2AutomaticMaskGenerator(model, **{**amg_kw, "min_mask_region_area": 0})
    # SAM2ImagePredictor assumes 1024-pixel feature maps; other sizes would be reshaped silently wrong.
    amg.predictor._bb_feat_sizes = feature_sizes(model.image_size)
    return amg


def automatic_masks(amg: SAM2AutomaticMaskGenerator, rgb: np.ndarray,
                    min_mask_region_area: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Automatic masks of one (y, x, 3) uint8 image: bool (n, y, x), predicted IoU and stability score, by
    decreasing predicted IoU. With ``min_mask_region_area`` > 0, holes and islands below that many pixels are
    removed as in SAM's post-processing (8-connected), then boxes NMS-ed again preferring unchanged masks."""
    records = sorted(amg.generate(rgb), key=lambda r: -r["predicted_iou"])
    masks = np.zeros((len(records), *rgb.shape[:2]), bool)
    for i, r in enumerate(records):
        masks[i] = r["segmentation"]
    iou = np.array([r["predicted_iou"] for r in records], np.float64)
    stability = np.array([r["stability_score"] for r in records], np.float64)
    if min_mask_region_area > 0 and len(records):
        unchanged = np.ones(len(records))
        for i in range(len(records)):
            masks[i], changed = remove_small_regions(masks[i], min_mask_region_area)
            unchanged[i] = not changed
        keep = np.flatnonzero(masks.any(axis=(1, 2)))
        boxes = batched_mask_to_box(torch.from_numpy(masks[keep])).float()
        order = nms(boxes, torch.from_numpy(unchanged[keep] + 0.5 * iou[keep]).float(), amg.box_nms_thresh)
        keep = np.sort(keep[order.numpy()])
        masks, iou, stability = masks[keep], iou[keep], stability[keep]
    return masks, iou, stability


def remove_small_regions(mask: np.ndarray, min_area: int) -> tuple[np.ndarray, bool]:
    """Fill holes, then drop islands, smaller than ``min_area`` pixels (8-connected; if every island is small the
    largest stays), as sam2's OpenCV helper does; returns the mask and whether it changed."""
    out, changed = mask.copy(), False
    for holes in (True, False):
        labels, n = ndimage.label(~out if holes else out, structure=np.ones((3, 3), bool))
        sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
        small = sizes < min_area
        if not small.any():
            continue
        if holes:
            out |= np.isin(labels, 1 + np.flatnonzero(small))
        else:
            if small.all():
                small[np.argmax(sizes)] = False
            out &= ~np.isin(labels, 1 + np.flatnonzero(small))
        changed = True
    return out, changed
