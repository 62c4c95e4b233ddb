"""The zero-shot report: per scene the task's and the baseline's maps as PNG images (with the ground truth and a
mask overlay), a metrics table with HyperFree's reported figure in a "paper" row, results.parquet and report.json
in the heads' report shape (per task: dataset, ``head`` (here the zero-shot method's scores, averaged over the
scenes) and ``baseline`` scores, primary metric and its sense; the backbone's provenance).
A random-init backbone is named in every file: its figures measure the plumbing, not the method.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import yaml
from PIL import Image

from stages.zeroshot.encode import CONTRACT
from stages.zeroshot.results import Scene, TaskOutput

if TYPE_CHECKING:
    from stages.zeroshot.encode import Backbone

PRIMARY = {"classification": "oa", "one_class": "f1", "target": "auc_pd_pf", "anomaly": "auc_pd_pf",
           "change": "f1", "segment_all": "masks", "segment_point": "predicted_iou_1"}
RANDOM_INIT_NOTE = "random-init weights: these figures measure the plumbing, not the method"


def paper_figures() -> dict[str, dict[str, dict[str, Any]]]:
    """HyperFree's reported figures per task and dataset slug (stages/zeroshot/paper.yaml)."""
    doc: dict[str, dict[str, dict[str, Any]]] = yaml.safe_load(
        resources.files("stages.zeroshot").joinpath("paper.yaml").read_text())
    return doc


def _palette(n: int) -> np.ndarray:
    rng = np.random.default_rng(12345)
    colours = rng.integers(40, 256, size=(max(n, 1) + 1, 3)).astype(np.uint8)
    colours[0] = 0
    return colours


def map_png(path: Path, array: np.ndarray) -> Path:
    """A map as PNG: binary / score maps in grey (scaled to 0-255), class or segment ids in fixed colours."""
    a = np.asarray(array)
    if a.dtype.kind == "f" and a.size and float(a.max()) <= 1.0:
        img = Image.fromarray(np.round(np.clip(a, 0, 1) * 255).astype(np.uint8), mode="L")
    else:
        ids = a.astype(np.int64)
        img = Image.fromarray(_palette(int(ids.max(initial=0)))[np.clip(ids, 0, None)], mode="RGB")
    img.save(path)
    return path


def overlay_png(path: Path, cube_hwc: np.ndarray, array: np.ndarray) -> Path:
    """The map's non-zero pixels in colour over a grey rendering of the scene (its band mean)."""
    grey = cube_hwc.astype(np.float64).mean(axis=-1)
    grey = (grey - grey.min()) / max(float(np.ptp(grey)), 1e-12)
    base = np.repeat((grey * 200)[..., None], 3, axis=-1)
    ids = np.asarray(array)
    ids = (ids > 0.5).astype(np.int64) if ids.dtype.kind == "f" else ids.astype(np.int64)
    colours = _palette(int(ids.max(initial=0))).astype(np.float64)
    out = np.where(ids[..., None] > 0, 0.45 * base + 0.55 * colours[np.clip(ids, 0, None)], base)
    Image.fromarray(np.round(out).astype(np.uint8), mode="RGB").save(path)
    return path


def write_report(out_dir: Path, task: str, dataset: str, results: Sequence[tuple[Scene, TaskOutput]], *,
                 params: dict[str, Any], behaviour: str, backbone: Backbone) -> tuple[list[dict[str, Any]], Path]:
    """Write the maps, results.parquet, report.md and report.json; returns the table rows and report.json's path."""
    weights = backbone.weights
    rows: list[dict[str, Any]] = []
    scenes: list[dict[str, Any]] = []
    for scene, output in results:
        stem = scene.image_id.replace("/", "__")
        images = [str(map_png(out_dir / f"{stem}.gt.png", scene.annotation.array))]
        for side, maps in (("zeroshot", output.maps), ("baseline", output.baseline_maps)):
            for name, array in maps.items():
                images.append(str(map_png(out_dir / f"{stem}.{side}.{name}.png", array)))
                images.append(str(overlay_png(out_dir / f"{stem}.{side}.{name}.overlay.png", scene.cube, array)))
        for method, scores in ((f"HyperFree zero-shot ({behaviour})", output.metrics),
                               (f"baseline: {output.baseline}", output.baseline_metrics)):
            for metric, value in scores.items():
                rows.append({"task": task, "dataset": dataset, "image_id": scene.image_id, "method": method,
                             "metric": metric, "value": float(value), "primary": metric == PRIMARY[task],
                             "weights": weights, "random_init": backbone.random_init, "behaviour": behaviour})
        scenes.append({"image_id": scene.image_id, "zeroshot": output.metrics, "baseline": output.baseline_metrics,
                       "baseline_method": output.baseline, "notes": output.notes, "images": images})
    paper = paper_figures().get(task, {}).get(dataset)
    if paper is not None:
        rows.append({"task": task, "dataset": dataset, "image_id": "", "method": "paper (HyperFree README)",
                     "metric": paper["metric"], "value": float(paper["hyperfree"]) / float(paper["scale"]),
                     "primary": True, "weights": "HyperFree-b", "random_init": False, "behaviour": "released"})
    table = pd.DataFrame(rows)
    table.to_parquet(out_dir / "results.parquet", index=False)
    primary = PRIMARY[task]

    def means(side: str) -> dict[str, float]:
        keys = dict.fromkeys(k for scene in scenes for k in scene[side])
        return {k: float(np.mean([scene[side][k] for scene in scenes if k in scene[side]])) for k in keys}

    contract = CONTRACT[behaviour]
    provenance = {"weights": weights, "preprocessing": contract, "model": backbone.name, "behaviour": behaviour,
                  "random_init": backbone.random_init, "backbone": backbone.descriptor}
    doc: dict[str, Any] = {
        "tasks": {task: {"dataset": dataset, "head": means("zeroshot"), "baseline": means("baseline"),
                         "primary": primary, "higher_is_better": True,
                         "method": f"HyperFree zero-shot ({behaviour})",
                         "baseline_method": scenes[0]["baseline_method"] if scenes else "", "paper": paper,
                         "params": params, "scenes": scenes}},
        "provenance": provenance}
    if backbone.random_init:
        doc["note"] = RANDOM_INIT_NOTE
    json_path = out_dir / "report.json"
    json_path.write_text(json.dumps(doc, indent=2, default=_jsonable))
    (out_dir / "report.md").write_text(markdown(task, dataset, scenes, paper, backbone, behaviour))
    return rows, json_path


def markdown(task: str, dataset: str, scenes: list[dict[str, Any]], paper: dict[str, Any] | None,
             backbone: Backbone, behaviour: str) -> str:
    """report.md: per scene a table of metrics with a column each for the zero-shot result, the baseline and the
    paper (HyperFree's reported figure, on its metric's row)."""
    lines = [f"# Zero-shot {task} on {dataset}", "",
             f"Backbone: {backbone.name}, weights {backbone.weights}; behaviour {behaviour}."]
    if backbone.random_init:
        lines += ["", f"**{RANDOM_INIT_NOTE}.**"]
    for scene in scenes:
        lines += ["", f"## {scene['image_id']}", "",
                  f"| metric | HyperFree zero-shot | baseline ({scene['baseline_method']}) | paper |",
                  "|---|---|---|---|"]
        for metric in dict.fromkeys([*scene["zeroshot"], *scene["baseline"]]):
            mine, base = scene["zeroshot"].get(metric), scene["baseline"].get(metric)
            ref = (float(paper["hyperfree"]) / float(paper["scale"])
                   if paper is not None and paper["metric"] == metric else None)
            lines.append(f"| {metric} | {_fmt(mine)} | {_fmt(base)} | {_fmt(ref)} |")
    if paper is not None:
        lines += ["", f"Paper: HyperFree's reported {paper['hyperfree']} (previous best {paper['previous_sota']}) as "
                  f"{paper['metric']}{' (presumed metric)' if paper.get('presumed') else ''}"
                  f"{'; ' + paper['note'] if paper.get('note') else ''}."]
    return "\n".join(lines) + "\n"


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.4f}"


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)
