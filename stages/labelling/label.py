"""Labelling and fusion over the catalog: which images need work, one image at a time, and the run's report.

Plain functions; pipelines/label.py maps them as Prefect tasks. A labeler labels only the images that lack masks
for its current labeler id, so a changed parameter or checkpoint relabels everything and an unchanged one nothing.
"""

from __future__ import annotations

import json
import threading
from collections import defaultdict
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from catalog.catalog import Catalog
from catalog.masks import MaskSet, MaskStore
from infra.settings import Settings, get_settings
from stages.labelling import fuse as fusion
from stages.labelling.falsecolor import ensure_falsecolor
from stages.labelling.labeler import ImageSample, Labeler

BRANCHES = ("spatial", "spectral", "material")
_LOCKS: defaultdict[str, threading.Lock] = defaultdict(threading.Lock)


def labeler_config(branch: str, settings: Settings | None = None) -> dict[str, Any]:
    """The branch's configuration as the settings give it: ``{"model_config", "checkpoint", "params"}``, the
    three arguments of its labeler (what a flow's ``production`` profile starts from)."""
    s = settings or get_settings()
    if branch in ("spatial", "spectral"):
        params = s.spatial_params if branch == "spatial" else s.spectral_params
        checkpoint = str(s.sam2_checkpoint) if s.sam2_checkpoint else None
        return {"model_config": dict(s.sam2_model), "checkpoint": checkpoint, "params": dict(params)}
    if branch == "material":
        checkpoint = str(s.hyperfree_checkpoint) if s.hyperfree_checkpoint else None
        return {"model_config": dict(s.hyperfree_model), "checkpoint": checkpoint, "params": dict(s.material_params)}
    raise ValueError(f"unknown branch '{branch}': choose from {', '.join(BRANCHES)}")


def build_labeler(branch: str, config: Mapping[str, Any] | None = None) -> Labeler:
    """The labeler of one branch from its configuration (``labeler_config``'s shape; None: the settings')."""
    c = dict(config) if config is not None else labeler_config(branch)
    unknown = sorted(set(c) - {"model_config", "checkpoint", "params"})
    if unknown:
        raise ValueError(f"labeler configuration of '{branch}' has unknown key(s) {unknown}: give model_config, "
                         "checkpoint and params")
    model_config, checkpoint, params = dict(c.get("model_config") or {}), c.get("checkpoint"), c.get("params") or {}
    if branch == "spatial":
        from stages.labelling.spatial import SpatialLabeler

        return SpatialLabeler(model_config, checkpoint, dict(params))
    if branch == "spectral":
        from stages.labelling.spectral import SpectralLabeler

        return SpectralLabeler(model_config, checkpoint, dict(params))
    if branch == "material":
        from stages.labelling.material import MaterialLabeler

        return MaterialLabeler(model_config, checkpoint, dict(params))
    raise ValueError(f"unknown branch '{branch}': choose from {', '.join(BRANCHES)}")


def cached_labeler(branch: str, config: Mapping[str, Any] | None = None) -> Labeler:
    """One labeler per branch and whole configuration in this process (models are built once, not per image).

    The cache key is the configuration itself plus the checkpoint file's size and modification time, so two
    configurations never share a labeler and a checkpoint replaced in place is loaded afresh."""
    c = dict(config) if config is not None else labeler_config(branch)
    checkpoint = c.get("checkpoint")
    stamp = None
    if checkpoint and Path(checkpoint).is_file():
        st = Path(checkpoint).stat()
        stamp = (st.st_size, st.st_mtime_ns)
    key = json.dumps({"branch": branch, "config": c, "checkpoint_stamp": stamp}, sort_keys=True, default=str)
    return _labeler_for_key(key)


@lru_cache(maxsize=12)
def _labeler_for_key(key: str) -> Labeler:
    spec = json.loads(key)
    return build_labeler(spec["branch"], spec["config"])


def clear_labeler_cache() -> None:
    """Drop every cached labeler (tests and benchmarks that compare model builds)."""
    _labeler_for_key.cache_clear()


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
