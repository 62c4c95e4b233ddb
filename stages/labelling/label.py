"""Labelling and fusion over the catalog: the stage runners ``run_label`` (one branch) and ``run_fuse``, which
images need work, one image at a time, and the run's report.

Plain functions; pipelines/label.py maps the per-image ones as Prefect tasks between the same ``start_*`` and
``finish_*`` steps the runners take. A labeler labels only the images that lack masks for its current labeler
id, so a changed parameter or checkpoint relabels everything and an unchanged one nothing. Model names, sizes and
checkpoint paths come in the config (a `LabelerSpec` per branch): nothing here reads settings.
"""

from __future__ import annotations

import json
import threading
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import import_module
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from base.registry import Registry
from base.shards import shards as cut_shards
from catalog.catalog import Catalog
from catalog.masks import MaskSet, MaskStore
from stages.labelling import fuse as fusion
from stages.labelling.falsecolor import ensure_falsecolor
from stages.labelling.labeler import ImageSample, Labeler
from stages.registry import record_config, register_stage

BRANCHES = ("spatial", "spectral", "material")
BranchName = Literal["spatial", "spectral", "material"]
_LOCKS: defaultdict[str, threading.Lock] = defaultdict(threading.Lock)


def _lazy(module: str, name: str) -> Callable[[], type[Labeler]]:
    """A labeler class imported on first use (sam2 and segment-anything load only for the branches used)."""
    return lambda: getattr(import_module(module), name)  # type: ignore[no-any-return]


#: The branches' labeler classes, by branch name.
LABELERS: Registry[Callable[[], type[Labeler]]] = Registry("labeler")
LABELERS.add("spatial", _lazy("stages.labelling.spatial", "SpatialLabeler"))
LABELERS.add("spectral", _lazy("stages.labelling.spectral", "SpectralLabeler"))
LABELERS.add("material", _lazy("stages.labelling.material", "MaterialLabeler"))


class LabelerSpec(BaseModel):
    """One branch's labeler: its model config (SAM2 ``{"config", "image_size"}`` or a registry ``{"model"}``), its
    local weights file (None: random-init) and its parameters; the labeler id hashes all three."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: dict[str, Any] = Field(description="the branch model's config")
    checkpoint: str | None = Field(default=None, description="local weights file; None: random-init")
    params: dict[str, Any] = Field(default_factory=dict, description="the labeler's parameters by name")


class LabelConfig(BaseModel):
    """The label stage of one branch: its labeler and, optionally, which datasets."""

    model_config = ConfigDict(extra="forbid")

    branch: BranchName
    labeler: LabelerSpec
    datasets: list[str] | None = Field(default=None, description="only images of these datasets; None: all")


class FuseConfig(BaseModel):
    """The fuse stage: every branch's labeler (the fusion id names them all), tau, overlays and datasets."""

    model_config = ConfigDict(extra="forbid")

    labelers: dict[BranchName, LabelerSpec]
    tau: float = Field(default=0.7, gt=0.0, le=1.0, description="IoU threshold of the global NMS")
    overlays: int = Field(default=4, ge=0, description="overlay previews written with the report")
    datasets: list[str] | None = Field(default=None, description="only images of these datasets; None: all")


def build_labeler(branch: str, spec: LabelerSpec, device: str | None = None) -> Labeler:
    """The labeler of one branch from its spec, its model on ``device`` (None or "auto": CUDA when present; the
    device never changes the labeler id)."""
    kw = {} if device in (None, "auto") else {"device": device}
    return LABELERS.get(branch)()(dict(spec.model), spec.checkpoint, dict(spec.params), **kw)


def cached_labeler(branch: str, spec: LabelerSpec, device: str | None = None) -> Labeler:
    """One labeler per branch, whole spec and device in this process (models are built once, not per image).

    The cache key is the spec itself plus the checkpoint file's size and modification time, so two specs never
    share a labeler and a checkpoint replaced in place is loaded afresh."""
    stamp = None
    if spec.checkpoint and Path(spec.checkpoint).is_file():
        st = Path(spec.checkpoint).stat()
        stamp = (st.st_size, st.st_mtime_ns)
    key = json.dumps({"branch": branch, "spec": spec.model_dump(mode="json"), "checkpoint_stamp": stamp,
                      "device": device}, sort_keys=True, default=str)
    return _labeler_for_key(key)


@lru_cache(maxsize=12)
def _labeler_for_key(key: str) -> Labeler:
    spec = json.loads(key)
    return build_labeler(spec["branch"], LabelerSpec.model_validate(spec["spec"]), spec["device"])


def shards(image_ids: list[str], size: int) -> list[list[str]]:
    """``image_ids`` cut into consecutive shards of at most ``size`` (label_batch, HVP_LABEL_BATCH)."""
    return cut_shards(image_ids, size, "label_batch (HVP_LABEL_BATCH)")


def clear_labeler_cache() -> None:
    """Drop every cached labeler (tests and benchmarks that compare model builds)."""
    _labeler_for_key.cache_clear()


# ---------------------------------------------------------------------------------------------- label runner
@dataclass
class LabelPlan:
    """What a label run has to do: its labeler, the images lacking its masks, and how many it looked at."""

    labeler: Labeler
    todo: list[str]
    images: int

    @property
    def skip_reason(self) -> str | None:
        """Why there is nothing to do (None when there is)."""
        return None if self.todo else f"all {self.images} images already have masks of {self.labeler.labeler_id}"


@dataclass
class LabelResult:
    """A label run: one row per image labelled, and the branch's summary (mask count over the catalog)."""

    branch: str
    labeler_id: str
    weights: str
    images: int
    rows: list[dict[str, Any]] = field(default_factory=list)
    masks: int = 0

    def summary(self) -> dict[str, Any]:
        """The branch summary a person reads: labeler id, weights, images seen and labelled, masks."""
        return {"branch": self.branch, "labeler_id": self.labeler_id, "weights": self.weights[:12],
                "images": self.images, "labelled": len(self.rows), "masks": self.masks}


def start_label(catalog: Catalog, config: LabelConfig) -> LabelPlan:
    """The first step of a label run: record the resolved config, build (lazily) the labeler, list the work."""
    record_config(catalog, f"label-{config.branch}", config)
    labeler = cached_labeler(config.branch, config.labeler)
    return LabelPlan(labeler, pending(catalog, labeler.labeler_id, config.datasets),
                     len(image_ids(catalog, config.datasets)))


def label_images(catalog: Catalog, image_ids: list[str], labeler: Labeler) -> list[dict[str, Any]]:
    """Label those of ``image_ids`` still lacking masks of ``labeler`` (a retry redoes only those)."""
    todo = set(pending(catalog, labeler.labeler_id)) & set(image_ids)
    return [label_image(catalog, i, labeler) for i in image_ids if i in todo]


def finish_label(catalog: Catalog, plan: LabelPlan, rows: list[dict[str, Any]]) -> LabelResult:
    """The last step: compact the mask index (clearing a killed writer's temporaries) and count the masks."""
    MaskStore(catalog).compact()
    lab = plan.labeler
    return LabelResult(lab.branch, lab.labeler_id, lab.weights, plan.images, rows,
                       mask_count(catalog, lab.labeler_id))


@register_stage("label", LabelConfig, "one branch's pseudo-labels for every image lacking them")
def run_label(catalog: Catalog, config: LabelConfig) -> LabelResult:
    """Label every image lacking masks for the branch's labeler id, in this process."""
    plan = start_label(catalog, config)
    return finish_label(catalog, plan, label_images(catalog, plan.todo, plan.labeler))


def mask_count(catalog: Catalog, labeler_id: str) -> int:
    """Masks of one labeler over the whole catalog (from the mask index)."""
    index = MaskStore(catalog).index(refresh=True)
    return int(index.loc[index["labeler_id"] == labeler_id, "n"].sum()) if not index.empty else 0


# ---------------------------------------------------------------------------------------------- fuse runner
@dataclass
class FusePlan:
    """What a fuse run has to do: the branches' labeler ids, the fusion id, the images to fuse (those lacking a
    pseudo-target that have branch masks) and every image in scope."""

    labeler_ids: dict[str, str]
    fusion_id: str
    todo: list[str]
    image_ids: list[str]
    waiting: int
    """Images lacking a pseudo-target that have no branch masks yet."""

    @property
    def skip_reason(self) -> str | None:
        """Why there is nothing to do (None when there is)."""
        if self.todo:
            return None
        if not self.waiting:
            return f"all {len(self.image_ids)} images already have pseudo-targets of {self.fusion_id}"
        return f"none of the {self.waiting} images without a pseudo-target has branch masks yet"


@dataclass
class FuseResult:
    """A fuse run: the fused images' rows, the report (a row per image in scope), the overlay PNGs and the
    branches whose weights were random-init."""

    fusion_id: str
    fused: list[dict[str, Any]]
    report: list[dict[str, Any]]
    overlays: dict[str, Path]
    random_init: list[str]


def start_fuse(catalog: Catalog, config: FuseConfig) -> FusePlan:
    """The first step of a fuse run: record the resolved config and list the images to fuse."""
    record_config(catalog, "fuse", config)
    ids: dict[str, str] = {b: cached_labeler(b, spec).labeler_id for b, spec in config.labelers.items()}
    fid = fusion.fusion_id(list(ids.values()), config.tau)
    todo = pending(catalog, fid, config.datasets)
    index = MaskStore(catalog).index()
    has_masks = set(index.loc[index["labeler_id"].isin(list(ids.values())), "image_id"]) if not index.empty else set()
    labelled = [i for i in todo if i in has_masks]
    return FusePlan(ids, fid, labelled, image_ids(catalog, config.datasets), len(todo) - len(labelled))


def finish_fuse(catalog: Catalog, config: FuseConfig, plan: FusePlan, fused: list[dict[str, Any]]) -> FuseResult:
    """The last step: compact the mask index, then the report and the overlay previews of the images in scope."""
    MaskStore(catalog).compact()
    rows = report(catalog, plan.image_ids, plan.labeler_ids, config.tau)
    pngs = write_overlays(catalog, plan.image_ids, plan.labeler_ids, config.tau, config.overlays)
    random_init = sorted(str(b) for b, spec in config.labelers.items() if cached_labeler(b, spec).random_init)
    return FuseResult(plan.fusion_id, fused, rows, pngs, random_init)


@register_stage("fuse", FuseConfig, "global IoU-NMS over the branches' masks -> pseudo-targets, with the report")
def run_fuse(catalog: Catalog, config: FuseConfig) -> FuseResult:
    """Fuse every image lacking a pseudo-target that has branch masks, in this process, then report."""
    plan = start_fuse(catalog, config)
    ids = list(plan.labeler_ids.values())
    return finish_fuse(catalog, config, plan, [fuse_image(catalog, i, ids, config.tau) for i in plan.todo])


def pending(catalog: Catalog, labeler_id: str, datasets: list[str] | None = None) -> list[str]:
    """Image ids with no committed masks for ``labeler_id`` (optionally only of some datasets)."""
    return MaskStore(catalog).missing(labeler_id, image_ids(catalog, datasets))


def label_image(catalog: Catalog, image_id: str, labeler: Labeler) -> dict[str, Any]:
    """Label one image and commit its masks; returns a summary row."""
    store = MaskStore(catalog)
    store.register_labeler(labeler.labeler_id, labeler.descriptor())
    sample = ImageSample.from_catalog(catalog, image_id)
    with _LOCKS[labeler.labeler_id]:  # predictors keep per-image state: one image at a time per labeler
        masks = labeler.label(sample)
    if labeler.branch == "spatial":  # keep the RGB SAM2 saw: pretraining's teacher reads crops of it
        ensure_falsecolor(catalog, image_id)
    store.write(image_id, labeler.labeler_id, labeler.branch, masks, labeler.random_init,
                attrs={**(masks.attrs or {}), "descriptor": labeler.descriptor()})
    return {"image_id": image_id, "branch": labeler.branch, "labeler_id": labeler.labeler_id, "masks": len(masks),
            "weights": labeler.weights if not labeler.random_init else "random-init"}


def fuse_image(catalog: Catalog, image_id: str, labeler_ids: list[str], tau: float) -> dict[str, Any]:
    """Fuse the given labelers' masks of one image (those present) and commit the pseudo-target."""
    store = MaskStore(catalog)
    sets = [store.read(image_id, labeler_id=lid) for lid in labeler_ids if _has(store, image_id, lid)]
    if not sets:
        raise KeyError(f"image '{image_id}' has no masks from {labeler_ids}: run `hvp label` first")
    fused = fusion.fuse(sets, tau)
    fid = fusion.fusion_id(labeler_ids, tau)  # versioned by the configured inputs, present or not
    random_init = any(bool(s.attrs and s.attrs.get("random_init")) for s in sets)
    store.register_labeler(fid, {"branch": "fused", "inputs": sorted(labeler_ids), "tau": tau,
                                 "stage_version": fusion.STAGE_VERSION, "random_init": random_init})
    store.write(image_id, fid, "fused", fused, random_init, attrs={"inputs": [s.labeler_id for s in sets],
                                                                   "tau": tau})
    return {"image_id": image_id, "fusion_id": fid, "inputs": len(sets), "sub_masks": len(fused),
            "coverage": float(fusion.pseudo_target(fused).mean()) if len(fused) else 0.0}


def _has(store: MaskStore, image_id: str, labeler_id: str) -> bool:
    return not store.missing(labeler_id, [image_id])


def report(catalog: Catalog, image_ids: list[str], labeler_ids: dict[str, str], tau: float) -> list[dict[str, Any]]:
    """Per image: masks per branch, fused sub-masks, coverage of the pseudo-target, and branch agreement (mean
    best-IoU of each branch's masks against the other branches', a rough consistency signal)."""
    rows = []
    store = MaskStore(catalog)
    for image_id in image_ids:
        sets = {b: store.read(image_id, labeler_id=lid) for b, lid in labeler_ids.items()
                if _has(store, image_id, lid)}
        row: dict[str, Any] = {"image_id": image_id}
        row.update({f"{b}_masks": len(s) for b, s in sets.items()})
        fid = fusion.fusion_id(list(labeler_ids.values()), tau)
        if _has(store, image_id, fid):
            fused = store.read(image_id, labeler_id=fid)
            row["fused_masks"] = len(fused)
            row["coverage"] = round(float(fusion.pseudo_target(fused).mean()) if len(fused) else 0.0, 3)
        row["agreement"] = round(branch_agreement(list(sets.values())), 3)
        rows.append(row)
    return rows


def branch_agreement(sets: list[MaskSet]) -> float:
    """Mean over masks of the best IoU with any mask of another branch (0 when fewer than two branches)."""
    scores = []
    for i, a in enumerate(sets):
        others = [m for j, s in enumerate(sets) if j != i for m in s.masks]
        if not others or not len(a):
            continue
        o = np.stack(others).reshape(len(others), -1)
        for m in a.masks.reshape(len(a), -1):
            inter = (o & m).sum(axis=1)
            union = (o | m).sum(axis=1)
            scores.append(float(np.max(np.where(union > 0, inter / np.maximum(union, 1), 0.0))))
    return float(np.mean(scores)) if scores else 0.0


def image_ids(catalog: Catalog, datasets: list[str] | None = None) -> list[str]:
    """The catalogued image ids pretraining may use (evaluation images get no pseudo-labels), optionally of some
    datasets only."""
    df = catalog.images()
    df = df[df["pretraining"]]
    return list(df[df["dataset"].isin(datasets)]["image_id"] if datasets else df["image_id"])


def write_overlays(catalog: Catalog, image_ids: list[str], labeler_ids: dict[str, str], tau: float,
                   count: int) -> dict[str, Path]:
    """Overlay PNGs of ``count`` images spread over ``image_ids``, under <catalog>/reports/overlays (local
    catalogs only); returns image id -> PNG path."""
    if not (catalog.local and image_ids and count):
        return {}
    out_dir = Path(catalog.root) / "reports" / "overlays"
    picked = image_ids[:: max(1, len(image_ids) // count)][:count]
    return {i: overlay_png(catalog, i, labeler_ids, tau, out_dir / f"{i.replace('/', '__')}.png") for i in picked}


def overlay_png(catalog: Catalog, image_id: str, labeler_ids: dict[str, str], tau: float, path: str | Path) -> Path:
    """A PNG panel of the image's RGB with each branch's masks and the fused pseudo-target side by side."""
    from stages.labelling.falsecolor import to_rgb
    from stages.labelling.overlay import save_panel

    sample = ImageSample.from_catalog(catalog, image_id)
    rgb, method = to_rgb(sample.cube, sample.wavelengths, sample.rgb)
    store = MaskStore(catalog)
    sets = {b: store.read(image_id, labeler_id=lid) for b, lid in labeler_ids.items()
            if _has(store, image_id, lid)}
    fid = fusion.fusion_id(list(labeler_ids.values()), tau)
    if _has(store, image_id, fid):
        sets["fused"] = store.read(image_id, labeler_id=fid)
    random_init = any(bool(s.attrs and s.attrs.get("random_init")) for s in sets.values())
    note = f"{image_id} | rgb: {method}" + (" | random-init weights" if random_init else "")
    return save_panel(rgb, sets, path, note)
