"""Downstream choices, measured side by side in one run on the labelled fixtures (tiny random-init backbone).

1. Feature cache: encoding every labelled image vs a rerun (all cache hits) vs reading the cached maps back.
2. Stored dtype: the segmentation and saliency heads trained on float16 cached features vs float32 ones (same
   seeds): float16 halves the cache and must not cost head quality.
3. Tracking features: search crops encoded on the fly by the frozen backbone (what the tracker does) vs crops cut
   from cached whole-frame feature maps (roi_align on the maps, same output grid, same tracker, pairs and head):
   success AUC and milliseconds per frame.

    .venv/bin/python bench/downstream.py [--img-size 128] [--steps 100] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch


def benchmarks() -> dict[str, str]:
    """Every registered task's benchmark dataset (task -> slug)."""
    from stages.downstream.tasks import TASKS, ordered_tasks

    return {name: TASKS.get(name).default_dataset for name in ordered_tasks()}


def make_catalog(root: Path) -> Any:
    """The labelled fixtures of the three benchmarks, ingested."""
    from catalog.catalog import Catalog
    from catalog.fixtures import write_dataset
    from catalog.specs import spec_for_folder
    from stages.ingest import ingest_item, plan
    from stages.ingest.discover import item_for

    for slug in benchmarks().values():
        write_dataset(slug, root / "src")
    cat = Catalog(root / "cat").init()
    for w in plan(root / "src", cat).items:
        spec = spec_for_folder(Path(w.folder))
        assert spec is not None
        ingest_item(cat, spec, item_for(Path(w.folder), spec, w.primary), w.known_sha256)
    cat.compact()
    return cat


def cache_timings(cat: Any, img_size: int) -> dict[str, float]:
    """Seconds per image: encode and store, rerun (cache hits), read the stored maps."""
    from catalog.features import FeatureStore
    from stages.downstream.features import BackboneSpec, compute_features, load_backbone
    from stages.downstream.runners import feature_images

    backbone = load_backbone(BackboneSpec(seed=101, overrides={"img_size": img_size}), "cpu")
    ids, _ = feature_images(cat, list(benchmarks().values()))
    first = compute_features(cat, backbone, ids)
    rerun = compute_features(cat, backbone, ids)
    store = FeatureStore(cat)
    t0 = time.perf_counter()
    for i in ids:
        store.read(backbone.set_id, i)
    read = time.perf_counter() - t0
    n = len(ids)
    return {"images": n, "encode": first.seconds / n, "rerun": rerun.seconds / n, "read": read / n}


def dtype_scores(cat: Any, img_size: int, steps: int, out: Path) -> dict[str, dict[str, float]]:
    """Primary metric of the segmentation and saliency heads on float16 vs float32 cached features."""
    from stages.downstream.runners import BackboneConfig, HeadsConfig, TaskChoice, run_heads

    scores: dict[str, dict[str, float]] = {}
    for dtype in ("float16", "float32"):
        config = HeadsConfig(out_dir=str(out / f"heads-{dtype}"), head_size="small", steps=steps, device="cpu",
                             backbone=BackboneConfig(overrides={"img_size": img_size}, dtype=dtype),
                             tasks=[TaskChoice(task="segmentation"), TaskChoice(task="saliency")])
        for outcome in run_heads(cat, config).outcomes:
            scores.setdefault(outcome.report.task, {})[dtype] = outcome.report.head[outcome.report.section.primary]
    return scores


@dataclass(frozen=True)
class CropRef:
    """A search/template crop described by its geometry instead of its pixels (the cached-map variant)."""

    frame: np.ndarray
    cx: float
    cy: float
    side: float


@contextlib.contextmanager
def crops_as_geometry() -> Iterator[None]:
    """Let the real tracker and pair sampler hand the feature function a CropRef instead of resampled pixels."""
    import stages.downstream.tracker as tracker

    real = tracker.crop_square
    tracker.crop_square = lambda frame, cx, cy, side, out_px: CropRef(frame, cx, cy, side)  # type: ignore
    try:
        yield
    finally:
        tracker.crop_square = real


def cached_map_fn(backbone: Any, wavelengths: np.ndarray, gsd: float, grid: int) -> tuple[Any, dict[str, float]]:
    """A feature function over CropRefs: the frame's whole feature maps (encoded once per frame, as the cache would
    hold them) cut and resampled to `grid` cells around the crop with roi_align. Returns it and its time counter."""
    from torchvision.ops import roi_align

    from stages.downstream.features import encode

    frames: dict[int, tuple[list[torch.Tensor], float]] = {}
    spent = {"encode": 0.0, "crop": 0.0, "frames": 0}
    strides = [int(i["reduction"]) for i in backbone.descriptor["feature_info"]]

    def features(ref: CropRef) -> list[torch.Tensor]:
        key = id(ref.frame)
        if key not in frames:
            t0 = time.perf_counter()
            maps, geometry = encode(backbone, [np.asarray(ref.frame)], wavelengths, [gsd])
            scale = backbone.img_size / max(geometry[0][1])  # frame pixels -> input-frame pixels
            frames[key] = (maps[0], scale)
            spent["encode"] += time.perf_counter() - t0
            spent["frames"] += 1
        t0 = time.perf_counter()
        maps, scale = frames[key]
        half = ref.side / 2
        box = torch.tensor([[0.0, ref.cx - half, ref.cy - half, ref.cx + half, ref.cy + half]], dtype=torch.float32)
        out = [roi_align(m[None].float(), box, output_size=grid, spatial_scale=scale / s, sampling_ratio=2,
                         aligned=True)[0] for m, s in zip(maps, strides, strict=True)]
        spent["crop"] += time.perf_counter() - t0
        return out

    return features, spent


def tracking_variants(cat: Any, img_size: int, steps: int, out: Path) -> dict[str, dict[str, float]]:
    """Success AUC and ms per frame of the tracker with on-the-fly crop features vs crops of cached frame maps."""
    import stages.downstream.tasks.tracking as tracking
    from stages.downstream.features import load_backbone
    from stages.downstream.runners import BackboneConfig, HeadsConfig, TaskChoice, run_heads

    config = HeadsConfig(out_dir=str(out / "track-live"), head_size="small", steps=steps, device="cpu",
                         backbone=BackboneConfig(overrides={"img_size": img_size}),
                         tasks=[TaskChoice(task="tracking")], folder_per_task=False)
    backbone = load_backbone(config.backbone.to_spec(), "cpu")
    dataset = tracking.TASK.default_dataset
    results: dict[str, dict[str, float]] = {}
    live = run_heads(cat, config, backbone=backbone).outcomes[0]
    frames = sum(len(s.frames) - 1 for s in (cat.sequence(q) for q in cat.sequences(dataset, "test")))
    results["on the fly"] = {"auc": live.report.head["success_auc"],
                             "ms_per_frame": 1000 * live.timings["eval_s"] / frames}
    grid = img_size // int(backbone.descriptor["feature_info"][-1]["reduction"])
    counters: list[dict[str, float]] = []

    def feature_fn(_: Any, seq: Any) -> Any:
        fn, spent = cached_map_fn(backbone, seq.sensor.wavelengths, seq.sensor.gsd_m, grid)
        counters.append(spent)
        return fn

    real = tracking.feature_fn
    tracking.feature_fn = feature_fn  # type: ignore[assignment]
    try:
        with crops_as_geometry():
            cached_config = config.model_copy(update={"out_dir": str(out / "track-cached")})
            cached = run_heads(cat, cached_config, backbone=backbone).outcomes[0]
    finally:
        tracking.feature_fn = real  # type: ignore[assignment]
    tested = counters[-len(cat.sequences(dataset, "test")):]  # the evaluation's feature functions
    results["cached frame maps"] = {
        "auc": cached.report.head["success_auc"],
        "ms_per_frame": 1000 * sum(c["crop"] for c in tested) / frames,  # serving crops from cached maps
        "encode_ms_per_frame": 1000 * sum(c["encode"] for c in tested) / max(sum(c["frames"] for c in tested), 1)}
    results["first box held"] = {"auc": live.report.baseline["success_auc"], "ms_per_frame": 0.0}
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--img-size", type=int, default=128, help="tiny backbone's input frame (its downstream default)")
    ap.add_argument("--steps", type=int, default=100, help="head training steps")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--json", action="store_true", help="also print every measurement as one JSON object")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    figures: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        cat = make_catalog(Path(tmp))
        cache = cache_timings(cat, args.img_size)
        print(f"\n1. feature cache, tiny random-init at {args.img_size} px, {cache['images']} labelled images, "
              f"{args.threads} thread(s)")
        print(f"{'':28s} {'ms/image':>9s} {'vs encode':>10s}")
        for name in ("encode", "rerun", "read"):
            print(f"{name:28s} {1000 * cache[name]:9.2f} {cache['encode'] / max(cache[name], 1e-9):9.1f}x")
        figures.append({"name": "feature rerun speed-up over encoding (all cache hits)",
                        "value": round(cache["encode"] / max(cache["rerun"], 1e-9), 1), "target": 10,
                        "met": cache["encode"] / max(cache["rerun"], 1e-9) >= 10})
        dtypes = dtype_scores(cat, args.img_size, args.steps, Path(tmp) / "runs")
        print(f"\n2. stored dtype: head scores after {args.steps} steps (same seeds)")
        print(f"{'head (metric)':28s} {'float16':>9s} {'float32':>9s} {'delta':>9s}")
        from stages.downstream.tasks import TASKS

        for task in dtypes:
            metric = TASKS.get(task).report.primary
            half, full = dtypes[task]["float16"], dtypes[task]["float32"]
            print(f"{f'{task} ({metric})':28s} {half:9.4f} {full:9.4f} {half - full:+9.4f}")
            figures.append({"name": f"{task} {metric}: float16 minus float32 cached features",
                            "value": round(half - full, 4), "target": -0.02, "met": half - full >= -0.02})
        tracks = tracking_variants(cat, args.img_size, args.steps, Path(tmp) / "runs")
        print(f"\n3. tracking features ({args.steps} steps, same pairs and seeds)")
        print(f"{'features':28s} {'AUC':>9s} {'ms/frame':>9s}   (tracking time per frame)")
        for name, r in tracks.items():
            print(f"{name:28s} {r['auc']:9.3f} {r['ms_per_frame']:9.1f}")
        print(f"(cached frame maps: filling the cache costs {tracks['cached frame maps']['encode_ms_per_frame']:.1f} "
              "ms per frame once; on-the-fly time includes the tracker's head and decoding)")
        gain = tracks["on the fly"]["auc"] - tracks["cached frame maps"]["auc"]
        figures.append({"name": "tracking success AUC: on-the-fly crops minus cached frame-map crops",
                        "value": round(gain, 3), "target": 0.0, "met": gain > 0})
    if args.json:
        print(json.dumps({"cache": cache, "dtype": dtypes, "tracking": tracks}))
    print(json.dumps({"figures": figures}))


if __name__ == "__main__":
    main()
