"""The zero-shot stage runner: `run_zeroshot(catalog, ZeroShotConfig) -> ZeroShotResult`.

One registered task per HyperFree tuning-free task (`TASKS`), each with the released defaults, the annotation kind
it scores against and its classical baseline. The runner reads the scene and its annotation from the catalog,
gets masks and features (cached), runs the task and the baseline, scores both and writes the report.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from base.registry import Registry
from catalog.catalog import Catalog
from stages.metrics import change_metrics, classification_metrics, detection_auc, one_class_metrics
from stages.registry import register_stage
from stages.zeroshot import baselines, core
from stages.zeroshot.core import MaskFeatures, PromptOutsideMasks, Stack
from stages.zeroshot.encode import (
    Backbone,
    ReleasedDraws,
    load_backbone,
    model_input,
    point_masks,
    scene_features,
    scene_masks,
)
from stages.zeroshot.report import write_report
from stages.zeroshot.results import Scene, TaskOutput

AMG_KEYS = ("pred_iou_thresh", "stability_score_thresh", "points_per_side", "box_nms_thresh")
MAX_RELAX_POINTS = 128
"""The most points per side a relaxed retry asks for (the AMG's cost grows with their square)."""


@dataclass(frozen=True)
class TaskDef:
    """A zero-shot task: its released defaults, the annotation kinds it scores against, its runner."""

    name: str
    defaults: dict[str, Any]
    kinds: tuple[str, ...]
    run: Callable[[Catalog, Backbone, Scene, dict[str, Any], ZeroShotConfig], TaskOutput]
    description: str


TASKS: Registry[TaskDef] = Registry("zero-shot task")


class ZeroShotConfig(BaseModel):
    """One zero-shot run: a task on the annotated scenes of a dataset (or one image) with one backbone.

    ``params`` override the task's released defaults (thresholds, points_per_side, feature_index, ...);
    ``prompts``: classification {class id: [[y, x], ...]} (default: the annotation's train pixels), one-class /
    segment-point [[y, x]] (default: the first train pixel of ``params.positive_class`` / the scene's centre);
    ``relax``: a prompt outside every mask retries with lower thresholds and more points (recorded) instead of
    failing; ``seed`` seeds the released random band draws and the baselines."""

    model_config = ConfigDict(extra="forbid")
    task: str
    dataset: str
    image: str | None = None
    model: str = "tiny"
    checkpoint: str | None = None
    model_overrides: dict[str, Any] = Field(default_factory=dict)
    init_seed: int = 0
    behaviour: Literal["released", "fixed"] = "fixed"
    params: dict[str, Any] = Field(default_factory=dict)
    prompts: dict[str, list[list[int]]] | list[list[int]] | None = None
    relax: bool = False
    relax_steps: int = Field(default=3, ge=1)
    seed: int = 0
    out: str = "zeroshot-reports"
    device: str = "cpu"


@dataclass
class ZeroShotResult:
    """What a run wrote: the report folder, per image the task's and the baseline's scores, random-init or not."""

    out_dir: Path
    rows: list[dict[str, Any]]
    random_init: bool
    report_json: Path


# ------------------------------------------------------------------------------------------------ helpers
def _feature(maps: list[np.ndarray], index: int) -> np.ndarray:
    if not -len(maps) <= index < len(maps):
        raise ValueError(f"feature_index {index}: this model gives {len(maps)} feature maps (block outputs, then "
                         f"the neck); choose 0..{len(maps) - 1} or -1 for the neck")
    return maps[index]


def _thresholds(p: dict[str, Any]) -> dict[str, float]:
    return {k: float(p[k]) for k in AMG_KEYS[:3] if k in p}


def with_relax(cfg: ZeroShotConfig, p: dict[str, Any], attempt: Callable[[dict[str, Any]], TaskOutput]
               ) -> TaskOutput:
    """Run ``attempt`` with the task parameters; with ``relax``, a prompt outside every mask retries with
    pred_iou and stability thresholds 0.1 lower and twice the points per side, each retry recorded."""
    retries: list[dict[str, Any]] = []
    current = dict(p)
    for step in range(cfg.relax_steps + 1):
        try:
            out = attempt(current)
        except PromptOutsideMasks as exc:
            if not cfg.relax or step == cfg.relax_steps:
                raise
            retries.append({"error": str(exc), **_thresholds(current)})
            current = {**current, "pred_iou_thresh": current["pred_iou_thresh"] - 0.1,
                       "stability_score_thresh": current["stability_score_thresh"] - 0.1,
                       "points_per_side": min(int(current["points_per_side"]) * 2, MAX_RELAX_POINTS)}
            continue
        out.notes["relax_retries"] = retries
        out.notes["thresholds_used"] = _thresholds(current)
        return out
    raise AssertionError("unreachable")


def _amg(p: dict[str, Any]) -> dict[str, Any]:
    return {k: p[k] for k in AMG_KEYS}


def _masks_features(catalog: Catalog, bb: Backbone, scene: Scene, p: dict[str, Any], cfg: ZeroShotConfig,
                    released_random_bands: bool = False) -> tuple[np.ndarray, list[np.ndarray]]:
    masks = scene_masks(catalog, bb, scene.image_id, scene.sha, scene.cube, scene.wavelengths, scene.gsd_m,
                        _amg(p), cfg.behaviour)
    draws = (ReleasedDraws(cfg.seed).next(scene.wavelengths)
             if released_random_bands and cfg.behaviour == "released" else None)
    feats = scene_features(catalog, bb, scene.image_id, scene.sha, scene.cube, scene.wavelengths, scene.gsd_m,
                           cfg.behaviour, draws)
    return masks, feats


def _class_prompts(scene: Scene, cfg: ZeroShotConfig) -> tuple[list[int], list[list[tuple[int, int]]]]:
    if isinstance(cfg.prompts, dict):
        ids = sorted(int(k) for k in cfg.prompts)
        return ids, [[(int(y), int(x)) for y, x in cfg.prompts[str(c)]] for c in ids]
    train = scene.annotation.pixels("train")
    ids = sorted(int(c) for c in np.unique(scene.annotation.array[train]))
    return ids, [[(int(y), int(x)) for y, x in np.argwhere(train & (scene.annotation.array == c))] for c in ids]


# ------------------------------------------------------------------------------------------------ tasks
def _classification(catalog: Catalog, bb: Backbone, scene: Scene, p: dict[str, Any], cfg: ZeroShotConfig
                    ) -> TaskOutput:
    ids, prompts = _class_prompts(scene, cfg)
    test = scene.annotation.pixels("test")
    target = np.where(test, scene.annotation.array, 0)

    def attempt(q: dict[str, Any]) -> TaskOutput:
        masks, maps = _masks_features(catalog, bb, scene, q, cfg)
        stack = Stack.of(masks)
        feats = MaskFeatures(_feature(maps, int(q["feature_index"])), stack.shape,
                             gather=cfg.behaviour == "released")
        raw = core.classify(stack, feats, prompts, ids, float(q["open_set_thresh"]), cfg.behaviour, _thresholds(q))
        pred = np.asarray(ids)[raw] if cfg.behaviour == "released" else raw  # released: index j is class ids[j]
        lr = baselines.logistic_regression(scene.cube, prompts, ids, seed=cfg.seed)
        return TaskOutput({"classes": pred}, _flat(classification_metrics(pred, target)), "logistic regression",
                          {"classes": lr}, _flat(classification_metrics(lr, target)),
                          {"prompts": {str(c): [list(px) for px in ps] for c, ps in zip(ids, prompts, strict=True)},
                           "masks": len(stack)})

    return with_relax(cfg, p, attempt)


def _flat(scores: dict[str, Any]) -> dict[str, float]:
    out = {k: float(v) for k, v in scores.items() if k != "per_class"}
    out.update({f"class_{c}": float(v) for c, v in scores.get("per_class", {}).items()})
    return out


def _one_class(catalog: Catalog, bb: Backbone, scene: Scene, p: dict[str, Any], cfg: ZeroShotConfig) -> TaskOutput:
    ann = scene.annotation
    if isinstance(cfg.prompts, list) and cfg.prompts:
        prompt = (int(cfg.prompts[0][0]), int(cfg.prompts[0][1]))
    else:
        ids, prompts = _class_prompts(scene, cfg)
        positive = int(p["positive_class"]) if p.get("positive_class") is not None else ids[0]
        prompt = prompts[ids.index(positive)][0]
    positive_class = int(ann.array[prompt])
    valid = ann.array > 0
    if ann.pixel_split is not None:
        valid &= ann.pixels("test")

    def attempt(q: dict[str, Any]) -> TaskOutput:
        masks, maps = _masks_features(catalog, bb, scene, q, cfg)
        stack = Stack.of(masks)
        feats = MaskFeatures(_feature(maps, int(q["feature_index"])), stack.shape,
                             gather=cfg.behaviour == "released")
        res = core.one_class(stack, feats, prompt, float(q["class_prior"]), cfg.behaviour, _thresholds(q))
        base = baselines.one_class_angle(scene.cube, prompt, float(q["class_prior"]))
        gt = ann.array == positive_class
        return TaskOutput({"one_class": res.map}, one_class_metrics(res.map, gt, valid), "spectral angle + prior",
                          {"one_class": base}, one_class_metrics(base, gt, valid),
                          {"prompt": list(prompt), "positive_class": positive_class, "threshold": res.threshold,
                           "ratios": res.ratios})

    return with_relax(cfg, p, attempt)


def _target(catalog: Catalog, bb: Backbone, scene: Scene, p: dict[str, Any], cfg: ZeroShotConfig) -> TaskOutput:
    spectrum = p.get("target_spectrum")
    spectrum = np.asarray(spectrum if spectrum is not None else scene.annotation.target_spectrum, dtype=np.float64)
    if spectrum.ndim == 0:
        raise ValueError(f"{scene.image_id}: no target spectrum; the dataset gives none (labels.target_spectrum): "
                         "pass params.target_spectrum (one value per band)")
    gt = scene.annotation.array
    values, _ = model_input(scene.cube, cfg.behaviour)
    fed = values if cfg.behaviour == "released" else scene.cube

    def attempt(q: dict[str, Any]) -> TaskOutput:
        masks, maps = _masks_features(catalog, bb, scene, q, cfg, released_random_bands=True)
        stack = Stack.of(masks)
        feats = MaskFeatures(_feature(maps, int(q["feature_index"])), stack.shape,
                             gather=cfg.behaviour == "released")
        det, pixel = core.target_detection(stack, feats, fed, spectrum, float(q["cosine_simi_thresh"]),
                                           int(q["dilate_kernel"]), _thresholds(q))
        base = baselines.ace(scene.cube, spectrum)
        return TaskOutput({"target": det}, detection_auc(det, gt), "ACE", {"target": base},
                          detection_auc(base, gt), {"best_matching_pixel": list(pixel)})

    return with_relax(cfg, p, attempt)


def _anomaly(catalog: Catalog, bb: Backbone, scene: Scene, p: dict[str, Any], cfg: ZeroShotConfig) -> TaskOutput:
    masks = scene_masks(catalog, bb, scene.image_id, scene.sha, scene.cube, scene.wavelengths, scene.gsd_m,
                        _amg(p), cfg.behaviour)
    det = core.anomaly_detection(masks, float(p["area_ratio_threshold"]))
    base = baselines.rx(scene.cube)
    gt = scene.annotation.array
    return TaskOutput({"anomaly": det}, detection_auc(det, gt), "RX", {"anomaly": base}, detection_auc(base, gt),
                      {"masks": int(len(masks)), "thresholds_used": _thresholds(p)})


def _change(catalog: Catalog, bb: Backbone, scene: Scene, p: dict[str, Any], cfg: ZeroShotConfig) -> TaskOutput:
    second = scene.annotation.second
    if second is None:
        raise ValueError(f"{scene.image_id}: no second cube; change detection needs change_pair labels")
    cube2 = np.moveaxis(second, 0, -1)
    sha2 = hashlib.sha256(np.ascontiguousarray(second).tobytes()).hexdigest()  # its own content names its cache
    ids = (scene.image_id, f"{scene.image_id}#t2")
    m1 = scene_masks(catalog, bb, ids[0], scene.sha, scene.cube, scene.wavelengths, scene.gsd_m, _amg(p),
                     cfg.behaviour)
    m2 = scene_masks(catalog, bb, ids[1], sha2, cube2, scene.wavelengths, scene.gsd_m, _amg(p), cfg.behaviour)
    if cfg.behaviour == "released":  # neck features with a random band draw, GSD 1.0, stretched to the scene
        draws = ReleasedDraws(cfg.seed)
        f1 = scene_features(catalog, bb, ids[0], scene.sha, scene.cube, scene.wavelengths, 1.0, "released",
                            draws.next(scene.wavelengths), gsd_as_given=True)[-1]
        f2 = scene_features(catalog, bb, ids[1], sha2, cube2, scene.wavelengths, 1.0, "released",
                            draws.next(scene.wavelengths), gsd_as_given=True)[-1]
    else:
        f1 = scene_features(catalog, bb, ids[0], scene.sha, scene.cube, scene.wavelengths, scene.gsd_m, "fixed")[-1]
        f2 = scene_features(catalog, bb, ids[1], sha2, cube2, scene.wavelengths, scene.gsd_m, "fixed")[-1]
    hw = scene.cube.shape[:2]
    pad_aware = cfg.behaviour == "fixed"
    released = cfg.behaviour == "released"
    det, _ = core.change_detection(Stack.of(m1), Stack.of(m2), MaskFeatures(f1, hw, pad_aware, released),
                                   MaskFeatures(f2, hw, pad_aware, released), float(p["ratio_threshold"]),
                                   cfg.behaviour)
    magnitude, base = baselines.change_vector(scene.cube, cube2)
    gt = scene.annotation.array
    return TaskOutput({"change": det}, change_metrics(det, gt), "change-vector analysis + Otsu",
                      {"change": base, "cva_magnitude": magnitude}, change_metrics(base, gt),
                      {"masks": [int(len(m1)), int(len(m2))]})


def _segment_all(catalog: Catalog, bb: Backbone, scene: Scene, p: dict[str, Any], cfg: ZeroShotConfig
                 ) -> TaskOutput:
    masks = scene_masks(catalog, bb, scene.image_id, scene.sha, scene.cube, scene.wavelengths, scene.gsd_m,
                        _amg(p), cfg.behaviour)
    segments = np.zeros(scene.cube.shape[:2], dtype=np.int64)
    for i, m in enumerate(Stack.of(masks).masks, start=1):
        segments[m] = i
    return TaskOutput({"segments": segments}, {"masks": float(len(masks))}, "none", {}, {},
                      {"masks": int(len(masks))})


def _segment_point(catalog: Catalog, bb: Backbone, scene: Scene, p: dict[str, Any], cfg: ZeroShotConfig
                   ) -> TaskOutput:
    h, w = scene.cube.shape[:2]
    point = ((int(cfg.prompts[0][0]), int(cfg.prompts[0][1])) if isinstance(cfg.prompts, list) and cfg.prompts
             else (h // 2, w // 2))
    masks, iou = point_masks(bb, scene.cube, scene.wavelengths, scene.gsd_m, point, cfg.behaviour)
    maps = {f"prompt_seg_{i + 1}": m.astype(np.uint8) for i, m in enumerate(masks)}
    return TaskOutput(maps, {f"predicted_iou_{i + 1}": float(v) for i, v in enumerate(iou)}, "none", {}, {},
                      {"point": list(point)})


_COMMON = {"points_per_side": 32, "box_nms_thresh": 0.7}
TASKS.add("classification", TaskDef("classification", {
    **_COMMON, "pred_iou_thresh": 0.3, "stability_score_thresh": 0.4, "feature_index": 1, "open_set_thresh": 0.0},
    ("pixel_classes",), _classification, "multi-class map from a few labelled pixels per class"))
TASKS.add("one_class", TaskDef("one_class", {
    **_COMMON, "pred_iou_thresh": 0.6, "stability_score_thresh": 0.7, "feature_index": 1, "class_prior": 0.3769,
    "positive_class": None}, ("pixel_classes",), _one_class, "one-class map from one pixel and a class prior"))
TASKS.add("target", TaskDef("target", {
    "points_per_side": 64, "box_nms_thresh": 0.7, "pred_iou_thresh": 0.6, "stability_score_thresh": 0.5,
    "feature_index": 4,
    "cosine_simi_thresh": 0.94, "dilate_kernel": 7, "target_spectrum": None}, ("target_map",), _target,
    "target map from a target spectrum"))
TASKS.add("anomaly", TaskDef("anomaly", {
    "points_per_side": 96, "box_nms_thresh": 0.7, "pred_iou_thresh": 0.4, "stability_score_thresh": 0.4,
    "area_ratio_threshold": 0.0009},
    ("anomaly_map",), _anomaly, "anomaly map: masks smaller than an area share"))
TASKS.add("change", TaskDef("change", {
    "points_per_side": 64, "box_nms_thresh": 0.7, "pred_iou_thresh": 0.5, "stability_score_thresh": 0.6,
    "ratio_threshold": 0.74},
    ("change_pair",), _change, "change map of a co-registered pair"))
TASKS.add("segment_all", TaskDef("segment_all", {
    **_COMMON, "pred_iou_thresh": 0.6, "stability_score_thresh": 0.6}, (), _segment_all,
    "every mask of the scene (Seg_Any_HSI)"))
TASKS.add("segment_point", TaskDef("segment_point", {}, (), _segment_point,
                                   "three masks from one point prompt (Seg_Any_HSI_given_one_prompt)"))


# ------------------------------------------------------------------------------------------------ runner
def read_scene(catalog: Catalog, image_id: str) -> Scene:
    """A catalogued scene with its annotation (GSD from the cube's attrs; an error if it has none)."""
    da = catalog.open(image_id)
    gsd = da.attrs.get("gsd_m")
    if gsd is None:
        raise ValueError(f"{image_id}: no GSD recorded; HyperFree's position embedding needs it: set gsd_m in the "
                         "dataset spec and re-ingest")
    row = catalog.row(image_id)
    return Scene(image_id, str(row["sha256"]), np.moveaxis(np.asarray(da.values), 0, -1),
                 np.asarray(da["wavelength"].values, dtype=np.float64), float(gsd), catalog.annotation(image_id))


@register_stage("zeroshot", ZeroShotConfig, "HyperFree's tuning-free tasks on airborne scenes, baselines beside")
def run_zeroshot(catalog: Catalog, config: ZeroShotConfig) -> ZeroShotResult:
    """Run one zero-shot task on a dataset's annotated scenes (or one image) and write its report."""
    task = TASKS.get(config.task)
    unknown = sorted(set(config.params) - set(task.defaults))
    if unknown:
        raise ValueError(f"unknown {task.name} parameter(s) {unknown}; valid: {sorted(task.defaults)}")
    params = {**task.defaults, **config.params}
    images = [config.image] if config.image else catalog.annotated(config.dataset)
    if not images:
        raise ValueError(f"no annotated image in dataset {config.dataset!r}; ingest it first (`hvp ingest`)")
    bb = load_backbone(config.model, config.checkpoint, config.model_overrides, config.init_seed, config.device)
    out_dir = Path(config.out) / config.task / config.dataset.replace("/", "_")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps({**config.model_dump(), "resolved_params": params}, indent=2,
                                                    default=str))
    results: list[tuple[Scene, TaskOutput]] = []
    for image_id in images:
        scene = read_scene(catalog, image_id)
        if task.kinds and scene.annotation.kind not in task.kinds:
            raise ValueError(f"{image_id}: its labels are {scene.annotation.kind}; {task.name} scores against "
                             f"{' / '.join(task.kinds)} labels")
        results.append((scene, task.run(catalog, bb, scene, params, config)))
    rows, json_path = write_report(out_dir, task.name, config.dataset, results, params=params,
                                   behaviour=config.behaviour, backbone=bb)
    return ZeroShotResult(out_dir, rows, bb.random_init, json_path)
