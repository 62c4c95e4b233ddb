"""Frozen features: the backbone's multi-scale maps of catalogued images, computed once and cached in the catalog.

A feature set is everything that decides the numbers: the model name and its overrides (the resolved config), the
weights (a checkpoint's sha256, or "random-init" plus the seed), the preprocessing contract
(`model.preprocess.describe`), the GSD rule and the stored dtype. Its id hashes that descriptor, so a head trained on
cached features always knows what produced them, and a rerun with the same inputs computes nothing.

Compute path: cubes are read from the catalog, prepared one by one under the contract (`model.preprocess.prepare`),
batched (images of one band set and GSD per forward pass), encoded with no autograd and the backbone frozen (bf16
autocast on CUDA, fp32 on the CPU) and stored as float16 with per-chunk crc32c checksums (catalog/features.py).
float16 storage was measured against float32 (bench/downstream.py, tiny at 128 px, 100 head steps, same seeds):
segmentation mIoU 0.3342 vs 0.3346, saliency CC 0.8468 vs 0.8468; half the bytes, no loss that matters.

Tracking does not read this cache: the online tracker encodes each search crop on the fly (stages/downstream/tasks/
tracking.py says why, with the measurement), so its datasets are skipped (TaskDef.cached_features).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from base.errors import InputError
from catalog.catalog import Catalog
from catalog.features import DTYPES, FeatureStore, feature_set_id
from catalog.storage import member
from model import create_model, get_config
from model.heads import FeatureLayout, layout_from_info
from model.registry import model_entry, resolve_name
from stages.downstream.adapters import ADAPTERS, BackboneAdapter
from stages.downstream.backbone import freeze
from stages.downstream.samples import Features
from stages.pretraining.data import DEFAULT_GSD_M
from stages.training.device import autocast, resolve_device

logger = logging.getLogger(__name__)

RANDOM_INIT = "random-init"
STAGE_VERSION = "1"
"""Bumped when the feature computation changes, so cached features are recomputed."""

DEFAULT_OVERRIDES: dict[str, dict[str, Any]] = {"tiny": {"img_size": 128}}
"""Model overrides used when none are given. The tiny layout's own 64 px frame gives an 8 x 8 grid of stride-8
cells, about 6 source pixels per cell on the 32 x 48 fixture scenes: thin classes (road marks, poles, people)
vanish. Measured on the HSI Drive fixture with a random-init tiny backbone (100 head steps): mIoU 0.27 at 64 px,
0.33 at 128 px, 0.44 at 256 px, against 0.21 for the per-pixel spectral classifier; 128 px keeps a head run at a
few seconds on one CPU core. Released layouts keep their own size (512; HyperSIGMA's 64, its pretraining frame,
and hypersigma_tiny's 32, the tiny MAE's crop, so its pretrained spectral `spat_map` loads as is)."""


@dataclass(frozen=True)
class BackboneSpec:
    """What produces a feature set: a registry layout, its weights and the input contract."""

    model: str = "tiny"
    checkpoint: str | None = None
    """A weights file (.safetensors/.pth/.pt), a pretraining checkpoint folder (step_N) or run folder (its latest
    checkpoint); None or "random-init": random weights seeded by `seed`."""
    seed: int = 0
    overrides: Mapping[str, Any] | None = None
    """create_model overrides (e.g. img_size); None: DEFAULT_OVERRIDES of the model."""
    preprocessing: str | None = None
    """The family's preprocessing contract (None: the family's default, "released" for HyperFree layouts,
    "hypersigma" for HyperSIGMA ones)."""
    strict: bool = True
    default_gsd_m: float = DEFAULT_GSD_M
    """GSD (m/pixel) for images whose GSD the catalog does not know (HyperVision's example value for ground scenes)."""
    dtype: str = "float16"

    def __post_init__(self) -> None:
        adapter = self.adapter
        object.__setattr__(self, "preprocessing", adapter.check_contract(self.preprocessing or
                                                                        adapter.default_contract))
        if self.dtype not in DTYPES:
            raise ValueError(f"BackboneSpec.dtype={self.dtype!r}; choose one of {DTYPES}.")
        if self.checkpoint == RANDOM_INIT:
            object.__setattr__(self, "checkpoint", None)

    @property
    def adapter(self) -> BackboneAdapter:
        """How the layout's family is built, loaded and encoded (stages.downstream.adapters)."""
        return ADAPTERS.get(model_entry(self.model).family)

    @property
    def contract(self) -> str:
        """The resolved preprocessing contract."""
        assert self.preprocessing is not None  # resolved in __post_init__
        return self.preprocessing

    @property
    def random_init(self) -> bool:
        """True when no checkpoint is given."""
        return self.checkpoint is None

    def resolved_overrides(self) -> dict[str, Any]:
        """The overrides applied: the given ones, else the model's defaults."""
        if self.overrides is not None:
            return dict(self.overrides)
        return dict(DEFAULT_OVERRIDES.get(resolve_name(self.model), {}))


@dataclass
class Backbone:
    """A loaded, frozen backbone with what a feature artifact records about it."""

    model: nn.Module
    spec: BackboneSpec
    weights: str
    """The checkpoint's sha256, or "random-init"."""
    descriptor: dict[str, Any]
    set_id: str
    layout: FeatureLayout
    device: torch.device
    img_size: int
    """Side of the square input frame."""

    @property
    def provenance(self) -> str:
        """Weights as reports show them: "random-init (seed N)", the checkpoint's sha256, and for a pretraining
        checkpoint whose run started from random weights "<sha256> (random-init student pretrained N steps)"."""
        if self.spec.random_init:
            return f"{RANDOM_INIT} (seed {self.spec.seed})"
        parts = (self.descriptor.get("load") or {}).get("random_parts")
        if parts:
            return f"{self.weights[:12]} ({RANDOM_INIT} {', '.join(parts)})"
        origin = self.descriptor.get("origin") or {}
        if RANDOM_INIT in (origin.get("student_weights"), origin.get("teacher_weights")):
            who = " and ".join(k.split("_")[0] for k in ("student_weights", "teacher_weights")
                               if origin.get(k) == RANDOM_INIT)
            return f"{self.weights[:12]} ({RANDOM_INIT} {who} pretrained {origin.get('step', '?')} steps)"
        return self.weights


def resolve_checkpoint(path: str | Path) -> Path:
    """The weights file a checkpoint argument names: the file itself, ``model.safetensors`` in a pretraining
    checkpoint folder, or that of a pretraining run's latest checkpoint."""
    p = Path(path)
    if p.is_file():
        return p
    if (p / "model.safetensors").is_file():
        return p / "model.safetensors"
    pointer = p / "checkpoints" / "latest"
    if pointer.is_file() and (p / "checkpoints" / pointer.read_text().strip() / "model.safetensors").is_file():
        return p / "checkpoints" / pointer.read_text().strip() / "model.safetensors"
    raise InputError(p, "checkpoint", "is neither a weights file nor a pretraining checkpoint or run folder",
                     "pass a .safetensors/.pth file, a pretraining checkpoint folder (checkpoints/step_N), a "
                     "pretraining run folder (its latest checkpoint is used), or random-init")


def checkpoint_origin(path: Path) -> dict[str, str]:
    """What a pretraining checkpoint's safetensors metadata says of its origin (step, student and teacher
    weights at the start of the run); empty for other files."""
    if path.suffix != ".safetensors":
        return {}
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
    return {k: meta[k] for k in ("step", "student_weights", "teacher_weights", "model") if k in meta}


_LOADED: dict[str, Backbone] = {}


def cached_backbone(spec: BackboneSpec, device: str = "auto") -> Backbone:
    """`load_backbone`, once per process for a given spec and device (the flows' tasks share it)."""
    key = json.dumps([dataclasses.asdict(spec), device], sort_keys=True, default=str)
    if key not in _LOADED:
        _LOADED.clear()  # one backbone in memory at a time
        _LOADED[key] = load_backbone(spec, device)
    return _LOADED[key]


def load_backbone(spec: BackboneSpec, device: str = "auto") -> Backbone:
    """Build the layout, load the weights with its family's loader (strict unless the spec says otherwise), freeze
    it and describe it."""
    adapter = spec.adapter
    name = resolve_name(spec.model)
    overrides = spec.resolved_overrides()
    config = get_config(name, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = create_model(name, **overrides)
    load: dict[str, Any] | None = None
    source = None
    origin: dict[str, str] = {}
    if spec.random_init:
        weights = RANDOM_INIT
        logger.warning("features: no checkpoint given; the %s backbone has random-init weights (seed %d): results "
                       "show the plumbing, not quality", name, spec.seed)
    else:
        assert spec.checkpoint is not None
        path = resolve_checkpoint(spec.checkpoint)
        loaded = adapter.load_weights(model, path, spec.strict)
        weights, source = loaded.sha256, str(path)
        load = {**loaded.load, "random_parts": list(loaded.random_parts)} if loaded.random_parts else loaded.load
        origin = checkpoint_origin(path)
    dev = resolve_device(device, field="device")
    freeze(model).to(dev)
    descriptor = {
        "stage": "features", "version": STAGE_VERSION, "model": name, "overrides": overrides,
        "resolved_config": config.to_dict(), "weights": weights, "seed": spec.seed if spec.random_init else None,
        "load": load, "preprocessing": adapter.describe_contract(config, spec.contract),
        "gsd": {"rule": "the image's gsd_m attribute, else default_gsd_m", "default_gsd_m": spec.default_gsd_m},
        "dtype": spec.dtype, "feature_info": model_entry(name).feature_info(config),
    }
    set_id = feature_set_id(descriptor)
    return Backbone(model=model, spec=spec, weights=weights, descriptor={**descriptor, "source": source,
                                                                         "origin": origin},
                    set_id=set_id, layout=layout_from_info(descriptor["feature_info"]), device=dev,
                    img_size=adapter.img_size(config))


@dataclass(frozen=True)
class CubeInfo:
    """What the encoder needs of a catalogued image besides its pixels."""

    image_id: str
    sha256: str
    wavelengths: np.ndarray
    gsd_m: float
    gsd_source: str


def cube_info(catalog: Catalog, image_id: str, default_gsd_m: float) -> CubeInfo:
    """Wavelengths, GSD (the image's, else the default) and content sha256 of one catalogued image."""
    import zarr

    row = catalog.row(image_id)
    group = zarr.open_group(catalog.storage.zarr_store(row["location"]), mode="r", zarr_format=3)
    wavelengths = np.asarray(member(group, "wavelength")[...], dtype=np.float64)
    gsd = group.attrs.get("gsd_m")
    known = isinstance(gsd, int | float) and float(gsd) > 0
    return CubeInfo(image_id, str(row["sha256"]), wavelengths, float(str(gsd)) if known else default_gsd_m,
                    "image" if known else "default")


def read_cube(catalog: Catalog, image_id: str) -> np.ndarray:
    """The stored cube as (H, W, C) in its native dtype."""
    return np.asarray(catalog.open(image_id).values).transpose(1, 2, 0)


@torch.no_grad()
def encode(backbone: Backbone, cubes: Sequence[np.ndarray], wavelengths: np.ndarray, gsd_m: Sequence[float]
           ) -> tuple[list[list[torch.Tensor]], list[tuple[tuple[int, int], tuple[int, int], float]]]:
    """Features of cubes (H, W, C) sharing one band set: each prepared under the family's contract, one batched
    forward pass without autograd (the family's adapter). Returns per cube its maps (C, h, w) on the CPU in float32,
    and (input_size, original_size, effective GSD)."""
    with autocast(backbone.device):
        return backbone.spec.adapter.encode(backbone.model, cubes, wavelengths, gsd_m, backbone.spec.contract,
                                            backbone.device)


@dataclass(frozen=True)
class FeatureRun:
    """What a `compute_features` call did."""

    set_id: str
    computed: tuple[str, ...]
    cached: tuple[str, ...]
    seconds: float
    weights: str
    model: str
    descriptor: dict[str, Any] = field(repr=False)


def compute_features(catalog: Catalog, backbone: Backbone, image_ids: Sequence[str], batch_size: int = 8,
                     on_progress: Callable[[int], None] | None = None) -> FeatureRun:
    """Compute and cache the features of `image_ids` that the catalog does not hold yet for this backbone's feature
    set (cache hits are skipped and counted); `on_progress(n)` is called after each batch with the images done."""
    if batch_size < 1:
        raise ValueError(f"compute_features: batch_size={batch_size} must be at least 1.")
    start = time.perf_counter()
    store = FeatureStore(catalog)
    store.register(backbone.set_id, backbone.descriptor)
    index = catalog.images()
    known = set(index["image_id"]) if not index.empty else set()
    unknown = [i for i in image_ids if i not in known]
    if unknown:
        raise KeyError(f"compute_features: {len(unknown)} image(s) are not in the catalog at {catalog.uri}, e.g. "
                       f"{unknown[:3]} (see `hvp catalog list`)")
    shas = dict(zip(index["image_id"], index["sha256"], strict=True))
    wanted = {i: str(shas[i]) for i in dict.fromkeys(image_ids)}
    cached = store.cached(backbone.set_id, wanted)
    todo = [i for i in wanted if i not in cached]
    if cached and on_progress is not None:
        on_progress(len(cached))
    common = {"model": backbone.descriptor["model"], "overrides": backbone.descriptor["overrides"],
              "weights": backbone.weights, "seed": backbone.descriptor["seed"],
              "preprocessing": backbone.descriptor["preprocessing"], "frame_size": backbone.img_size,
              "feature_info": backbone.descriptor["feature_info"]}
    for k in range(0, len(todo), batch_size):
        infos = [cube_info(catalog, i, backbone.spec.default_gsd_m) for i in todo[k:k + batch_size]]
        groups: dict[tuple[float, ...], list[CubeInfo]] = {}
        for info in infos:
            groups.setdefault(tuple(np.round(info.wavelengths, 6)), []).append(info)
        rows = []
        for members in groups.values():
            cubes = [read_cube(catalog, m.image_id) for m in members]
            try:
                maps, geometry = encode(backbone, cubes, members[0].wavelengths, [m.gsd_m for m in members])
            except ValueError as exc:
                raise ValueError(f"features of {[m.image_id for m in members]}: {exc}") from exc
            for m, fmaps, (input_size, original_size, eff_gsd) in zip(members, maps, geometry, strict=True):
                attrs = {**common, "input_size": list(input_size), "original_size": list(original_size),
                         "gsd_m": m.gsd_m, "gsd_source": m.gsd_source, "effective_gsd_m": eff_gsd,
                         "shapes": [list(f.shape) for f in fmaps]}
                rows.append(store.write_group(backbone.set_id, m.image_id, m.sha256, [f.numpy() for f in fmaps],
                                              attrs, backbone.spec.dtype))
        store.commit(rows)
        if on_progress is not None:
            on_progress(len(infos))
    store.compact()  # also when nothing was computed: a killed run's temporaries and parts are cleaned up
    seconds = time.perf_counter() - start
    logger.info("features %s: %d computed, %d cached (skipped) in %.1f s", backbone.set_id, len(todo), len(cached),
                seconds)
    return FeatureRun(set_id=backbone.set_id, computed=tuple(todo), cached=tuple(i for i in wanted if i in cached),
                      seconds=seconds, weights=backbone.weights, model=backbone.descriptor["model"],
                      descriptor=backbone.descriptor)


def read_features(store: FeatureStore, set_id: str, image_id: str) -> tuple[Features, dict[str, Any]]:
    """One image's cached maps as (C, h, w) tensors in the stored dtype, and the entry's attrs."""
    cached = store.read(set_id, image_id)
    return tuple(torch.from_numpy(m) for m in cached.maps), cached.attrs
