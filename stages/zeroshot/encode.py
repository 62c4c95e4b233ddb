"""The model side of the zero-shot tasks: a HyperFree-family backbone, its automatic masks and multi-stage features
of a scene, each computed once per (image, model, weights, parameters) and cached in the catalog (masks in the mask
store under a labeler id, features in the feature cache under a feature-set id), so a rerun with other prompts or
thresholds runs no encoder pass.

Input scaling per behaviour: ``released`` feeds what HyperFree's task scripts feed (the cube as stored when its
maximum exceeds 500, else a global min-max to uint8; then the predictor's resize and division by the maximum, the
``crop_max`` contract, GSD rescaled to the 1024 frame); ``fixed`` feeds the ``released`` preprocessing contract of
model.preprocess (a per-image float min-max, no units-dependent switch, no 8-bit quantisation).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from catalog.catalog import Catalog
from catalog.features import FeatureStore, feature_set_id
from catalog.masks import MaskSet, MaskStore, table_from_masks
from model import create_model, get_config, load_checkpoint
from model.hyperfree import file_sha256
from model.preprocess import prepare
from model.registry import FAMILY_HYPERFREE, model_entry
from model.spectral import GRID_WAVELENGTHS_NM, MATCH_TOLERANCE_NM, find_corresponding_indices
from stages.downstream.features import resolve_checkpoint
from stages.labelling.material import AMG_DEFAULTS, HyperFreeAutomaticMaskGenerator, HyperFreePredictor
from stages.zeroshot.core import Behaviour

STAGE_VERSION = "1"
CONTRACT: dict[str, str] = {"released": "crop_max", "fixed": "released"}
"""The model.preprocess contract each behaviour encodes with."""
RELEASED_BAND_DRAWS = 40
"""Grid bands HyperFree's encoder draws (with replacement) when its task scripts encode with test_mode=False."""


@dataclass
class Backbone:
    """A HyperFree-family model with its provenance (``weights``: the checkpoint's sha256 or "random-init")."""

    name: str
    model: Any
    weights: str
    descriptor: dict[str, Any]

    @property
    def random_init(self) -> bool:
        return self.weights == "random-init"


def load_backbone(name: str, checkpoint: str | None, overrides: dict[str, Any], init_seed: int,
                  device: str = "cpu") -> Backbone:
    """Build a registry model that has HyperFree's mask decoder, from a checkpoint (strict) or random-init."""
    entry = model_entry(name)
    if entry.family != FAMILY_HYPERFREE:
        raise ValueError(f"model {name!r} has no HyperFree mask decoder (family {entry.family}); the zero-shot "
                         "tasks need one: hyperfree_b, hypervision_b/l/h or tiny")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        model = create_model(name, **overrides)
    weights = "random-init"
    if checkpoint is not None:
        weights_file = resolve_checkpoint(checkpoint)  # a file, a pretraining checkpoint or run folder
        load_checkpoint(model, weights_file, strict=True)
        weights = file_sha256(weights_file)
    descriptor = {"model": name, "overrides": overrides, "config": get_config(name, **overrides).to_dict(),
                  "weights": weights, "init_seed": init_seed if weights == "random-init" else None}
    return Backbone(name, model.eval().to(device), weights, descriptor)


def released_values(cube_hwc: np.ndarray) -> np.ndarray:
    """HyperFree's task scripts' value step: the cube as stored if its maximum exceeds 500, else a global min-max
    to [0, 255] cast to uint8."""
    if float(cube_hwc.max()) > 500:
        return cube_hwc
    low, high = float(cube_hwc.min()), float(cube_hwc.max())
    return (255 * ((cube_hwc - low) / (high - low))).astype(np.uint8)


def model_input(cube_hwc: np.ndarray, behaviour: Behaviour) -> tuple[np.ndarray, str]:
    """The cube as the model receives it under ``behaviour`` and the preprocessing contract that follows."""
    return (released_values(cube_hwc) if behaviour == "released" else cube_hwc), CONTRACT[behaviour]


class ReleasedDraws:
    """HyperFree's random band draws with test_mode=False (Python's `random.randint(0, n - 1)`, 40 times, sorted),
    replayed from a seeded generator: the task scripts seed Python's generator, then encode in a fixed order."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def next(self, wavelengths_nm: Sequence[float] | np.ndarray) -> list[int]:
        """The next draw for a cube of these wavelengths (indices into its grid-bank matches)."""
        n = len(find_corresponding_indices(np.asarray(wavelengths_nm, dtype=np.float64), GRID_WAVELENGTHS_NM,
                                           MATCH_TOLERANCE_NM)[0])
        return sorted(self.rng.randint(0, n - 1) for _ in range(RELEASED_BAND_DRAWS))


def _key(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def generate_masks(model: Any, cube_hwc: np.ndarray, wavelengths: np.ndarray, gsd_m: float, amg: dict[str, Any],
                   behaviour: Behaviour) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """The automatic masks (n, H, W) bool of a cube, in the generator's order, and the generator's records."""
    values, contract = model_input(cube_hwc, behaviour)
    records = HyperFreeAutomaticMaskGenerator(model, contract, **{**AMG_DEFAULTS, **amg}).generate(
        values, wavelengths, gsd_m)
    h, w = cube_hwc.shape[:2]
    masks = (np.stack([r["segmentation"] for r in records]).astype(bool) if records
             else np.zeros((0, h, w), dtype=bool))
    return masks, records


def encode_features(model: Any, cube_hwc: np.ndarray, wavelengths: np.ndarray, gsd_m: float, behaviour: Behaviour,
                    band_draws: Sequence[int] | None = None, gsd_as_given: bool = False) -> list[np.ndarray]:
    """A cube's multi-stage features (block outputs, then the neck), each (C, h, w) float32; see scene_features."""
    values, contract = model_input(cube_hwc, behaviour)
    enc = model.image_encoder
    prepared = prepare(values, enc.img_size, contract, device=next(model.parameters()).device)
    gsd = gsd_m if gsd_as_given else prepared.effective_gsd(gsd_m)
    with torch.no_grad():
        maps = enc.forward_intermediates(prepared.image, wavelengths, gsd, band_draws=band_draws)
    return [m[0].float().cpu().numpy() for m in maps]


def scene_masks(catalog: Catalog, backbone: Backbone, image_id: str, image_sha: str, cube_hwc: np.ndarray,
                wavelengths: np.ndarray, gsd_m: float, amg: dict[str, Any], behaviour: Behaviour) -> np.ndarray:
    """The scene's automatic masks (n, H, W) bool in the generator's order, from the mask store when this
    (image, model, weights, parameters, behaviour) was segmented before."""
    params = {**AMG_DEFAULTS, **amg}
    descriptor = {"stage": "zeroshot", "version": STAGE_VERSION, "backbone": backbone.descriptor, "amg": params,
                  "behaviour": behaviour, "gsd_m": gsd_m}
    labeler_id = f"zeroshot-{_key(descriptor)}"
    store = MaskStore(catalog)
    cache_id = f"{image_id}@{image_sha[:12]}"
    if not store.missing(labeler_id, [cache_id]):
        return store.read(cache_id, labeler_id=labeler_id).masks
    masks, records = generate_masks(backbone.model, cube_hwc, wavelengths, gsd_m, params, behaviour)
    iou = np.array([r["predicted_iou"] for r in records], dtype=np.float64)
    table = table_from_masks(masks, "zeroshot", score=iou, predicted_iou=iou,
                             stability=np.array([r["stability_score"] for r in records], dtype=np.float64))
    store.register_labeler(labeler_id, descriptor)
    store.write(cache_id, labeler_id, "zeroshot", MaskSet(masks=masks, table=table), backbone.random_init,
                {"behaviour": behaviour})
    return masks


def scene_features(catalog: Catalog, backbone: Backbone, image_id: str, image_sha: str, cube_hwc: np.ndarray,
                   wavelengths: np.ndarray, gsd_m: float, behaviour: Behaviour,
                   band_draws: Sequence[int] | None = None, gsd_as_given: bool = False) -> list[np.ndarray]:
    """The scene's multi-stage features (block outputs, then the neck), each (C, h, w) float32, from the feature
    cache when computed before. ``band_draws`` replays a released random band draw; ``gsd_as_given`` passes
    ``gsd_m`` to the encoder unscaled (the released change detection encodes with GSD 1.0)."""
    contract = CONTRACT[behaviour]
    descriptor = {"stage": "zeroshot", "version": STAGE_VERSION, "backbone": backbone.descriptor,
                  "contract": contract, "behaviour": behaviour, "gsd_m": gsd_m, "gsd_as_given": gsd_as_given,
                  "band_draws": list(band_draws) if band_draws is not None else None}
    set_id = feature_set_id(descriptor)
    store = FeatureStore(catalog)
    if store.cached(set_id, {image_id: image_sha}):
        return [m.astype(np.float32) for m in store.read(set_id, image_id).maps]
    arrays = encode_features(backbone.model, cube_hwc, wavelengths, gsd_m, behaviour, band_draws, gsd_as_given)
    store.register(set_id, descriptor)
    store.commit([store.write_group(set_id, image_id, image_sha, arrays, {"weights": backbone.weights},
                                    dtype="float32")])
    return arrays


def point_masks(backbone: Backbone, cube_hwc: np.ndarray, wavelengths: np.ndarray, gsd_m: float,
                point: tuple[int, int], behaviour: Behaviour) -> tuple[np.ndarray, np.ndarray]:
    """Segment-anything from one point (y, x): the decoder's three masks (3, H, W) and their predicted IoUs."""
    values, contract = model_input(cube_hwc, behaviour)
    predictor = HyperFreePredictor(backbone.model, contract)
    predictor.set_image(values, wavelengths, gsd_m)
    masks, iou, _ = predictor.predict(point_coords=np.array([[point[1], point[0]]]), point_labels=np.array([1]),
                                      multimask_output=True)
    return masks.astype(bool), iou
