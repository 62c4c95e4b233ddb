"""Projected wall time of the paper's pretraining corpus (14,959 images, 26 datasets plus the table's others) on
N devices: the per-image cost of every stage measured on this machine's device at the production model sizes
(SAM 2.1 Hiera-B+ at 1024 px, HyperFree-b, HyperVision-B), scaled by each dataset's image count and band count.

What is measured and what is extrapolated (said again in the output):
- the labellers cost an image encoding plus one decoding per batch of prompt points: each is timed on one image at
  two small point grids (1 and 3 batches) and extrapolated linearly to the production grid (32 x 32 points, 16
  batches); the spectral branch
  is timed at two frame counts and extrapolated linearly to each dataset's frames (bands / 6 at stride 2), its
  seed masks priced at the spatial branch's per-point cost;
- features: one HyperVision-B forward at its 512 px input per image, at two band counts (linear in bands);
- pretraining: one forward and backward pass of HyperVision-B per sample, the production schedule (steps x
  batch) divided over the devices;
- ingest (a cube written to the catalog) and fusion (IoU-NMS of three branches' masks) on the CPU.
Cube sides come from the dataset notes where known, else 512 x 512. Models are random-init (timing only).

    .venv/bin/python bench/corpus.py [--devices 8] [--device auto] [--json]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CORPUS_IMAGES = 14_959
PRODUCTION_POINTS = 32 * 32
#: (height, width) of a dataset's cubes where the dataset notes give them; others are taken as 512 x 512.
SIDES: dict[str, tuple[int, int]] = {
    "CAVE": (512, 512), "HSSOD": (768, 1024), "HyperBlood": (520, 696), "ICVL": (1392, 1300),
    "UM-NS 2002": (748, 820), "UM-NS 2004": (1018, 1339), "HSI Drive v2.0": (216, 409),
    "Hyperspectral City v2": (1422, 1889),
}
DEFAULT_SIDE = (512, 512)


@dataclass(frozen=True)
class Dataset:
    """One row of the pretraining dataset table with its assumed cube size."""

    name: str
    bands: int
    images: int
    height: int
    width: int


def datasets() -> list[Dataset]:
    """The pretraining dataset table (shared reference), with each dataset's cube side."""
    path = Path(os.environ.get("HVP_DATASET_TABLE", "/work/shared/reference/pretraining-datasets.csv"))
    if not path.is_file():
        path = REPO / "bench" / "pretraining-datasets.csv"
    with path.open() as fh:
        rows = list(csv.DictReader(fh))
    return [Dataset(r["name"], int(r["bands"]), int(r["images"]), *SIDES.get(r["name"], DEFAULT_SIDE)) for r in rows]


def timed(fn: Callable[[], Any], sync: Callable[[], None]) -> float:
    """Seconds one call of ``fn`` takes (the device synchronised before and after)."""
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def linear(x0: float, y0: float, x1: float, y1: float) -> tuple[float, float]:
    """Intercept and slope of the line through two timings (the slope kept >= 0: timings are noisy)."""
    slope = max((y1 - y0) / (x1 - x0), 0.0)
    return max(y0 - slope * x0, 0.0), slope


def built(labeler: Any) -> None:
    """Build a labeller's lazily built model now, so that no timing includes the build."""
    for name in ("generator", "models"):
        if isinstance(getattr(type(labeler), name, None), property):
            getattr(labeler, name)


def full_batches(cost: dict[str, Any]) -> int:
    """Decoder batches of the production point grid."""
    return -(-PRODUCTION_POINTS // int(cost["points_per_batch"]))


def sample(bands: int, side: int, seed: int = 0) -> Any:
    """A sensor-like uint16 cube of ``bands`` x ``side`` x ``side`` with wavelengths over 400-1000 nm."""
    from catalog.fixtures.synth import scene, to_dtype
    from stages.labelling.labeler import ImageSample

    wl = np.linspace(400, 1000, bands)
    cube = to_dtype(scene(np.random.default_rng(seed), wl, side, side, objects=8), "uint16", 4095)
    return ImageSample(f"bench/{bands}b", cube, wl)


def say(message: str) -> None:
    """Progress on stderr (the figures stay the last line of stdout)."""
    print(message, file=sys.stderr, flush=True)


def measure(device: str, side: int, quick_points: tuple[int, int]) -> dict[str, Any]:
    """Per-image costs on ``device``: each model stage's fitted cost model (seconds) and the CPU stages'. On a GPU
    each call is warmed up first; on the CPU the first call is timed (its one-off cost is small beside the work)."""
    import torch

    from pipelines.profiles import resolve
    from stages.labelling.falsecolor import sequence_bands
    from stages.labelling.label import build_labeler

    gpu = device.startswith("cuda")
    sync = (lambda: torch.cuda.synchronize()) if gpu else (lambda: None)
    specs = resolve("production").label.labelers
    out: dict[str, Any] = {}
    img = sample(128, side)
    p0, p1 = quick_points
    # spatial and material: encode + decode per batch of prompt points, at two grids
    for branch in ("spatial", "material"):
        times, batches = [], []
        for pps in (p0, p1):
            spec = specs[branch].model_copy(update={"params": {**specs[branch].params, "points_per_side": pps}})
            lab = build_labeler(branch, spec, device)
            built(lab)
            per_batch = int(lab.params.get("points_per_batch", 64))
            if gpu:
                lab.label(img)  # warm
            times.append(timed(lambda lab=lab: lab.label(img), sync))
            batches.append(-(-pps * pps // per_batch))
            say(f"{branch}: {pps * pps} points in {batches[-1]} batch(es) {times[-1]:.1f} s")
        base, per_batch_s = linear(batches[0], times[0], batches[1], times[1])
        out[branch] = {"encode_s": base, "per_batch_s": per_batch_s, "points_per_batch": per_batch,
                       "measured_s": times, "batches": batches}
    # spectral: per frame, at two frame counts (seed grid at the small size; the rest priced by the spatial fit)
    frames, times = [], []
    spec = specs["spectral"].model_copy(update={"params": {**specs["spectral"].params, "points_per_side": p0}})
    lab = build_labeler("spectral", spec, device)
    built(lab)
    for bands in (9, 15):
        cube = sample(bands, side)
        if gpu:
            lab.label(cube)
        frames.append(len(sequence_bands(bands, int(lab.params["stride"]))))
        times.append(timed(lambda c=cube: lab.label(c), sync))
        say(f"spectral: {frames[-1]} frames {times[-1]:.1f} s")
    base, per_frame = linear(frames[0], times[0], frames[1], times[1])
    out["spectral"] = {"base_s": base, "per_frame_s": per_frame, "stride": int(lab.params["stride"]),
                       "seed_points_s": out["spatial"]["per_batch_s"] * (full_batches(out["spatial"])
                                                                          - out["spatial"]["batches"][0]),
                       "measured_s": times, "frames": frames}
    # features and pretraining: HyperVision-B on its 512 px input, at two band counts
    from model.registry import create_model

    enc = create_model("hypervision_b").image_encoder.to(device)
    size = int(enc.img_size)
    fwd, train = [], []
    for bands in (32, 128):
        x = torch.rand(1, bands, size, size, device=device)
        wl = np.linspace(400, 1000, bands)
        with torch.no_grad():
            if gpu:
                enc.forward_features(x, wl)
            fwd.append(timed(lambda x=x, wl=wl: enc.forward_features(x, wl), sync))
        train.append(timed(lambda x=x, wl=wl: enc.forward_features(x, wl).float().square().mean().backward(), sync))
        say(f"hypervision_b, {bands} bands: forward {fwd[-1]:.1f} s, forward+backward {train[-1]:.1f} s")
    out["features"] = dict(zip(("base_s", "per_band_s"), linear(32, fwd[0], 128, fwd[1]), strict=True))
    out["features"].update(measured_s=fwd, bands=[32, 128], img_size=size)
    out["pretrain"] = dict(zip(("base_s", "per_band_s"), linear(32, train[0], 128, train[1]), strict=True))
    out["pretrain"].update(measured_s=train, bands=[32, 128], img_size=size)
    out.update(cpu_stages(side))
    return out


def cpu_stages(side: int) -> dict[str, Any]:
    """Ingest (a 128-band cube, per byte) and fusion (three branches' masks, per pixel) on the CPU."""
    from catalog.catalog import Catalog
    from catalog.masks import MaskSet, table_from_masks
    from stages.labelling import fuse as fusion

    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="hvp-corpus-") as tmp:
        folder = Path(tmp) / "src" / "corpus-cam"
        folder.mkdir(parents=True)
        cube = sample(128, side).cube
        np.save(folder / "cube.npy", np.ascontiguousarray(cube.transpose(1, 2, 0)))
        (folder / "dataset.yaml").write_text(json.dumps({
            "name": "corpus-cam", "format": "npy", "files": "*.npy", "options": {"axes": "yxb"},
            "wavelengths_nm": {"start": 400, "stop": 1000, "count": 128}}))
        from stages import ingest as stage
        from stages.ingest import IngestConfig

        cat = Catalog(str(Path(tmp) / "cat"))
        t0 = time.perf_counter()
        stage.run_ingest(cat, IngestConfig(source_root=str(Path(tmp) / "src")))
        out["ingest"] = {"per_byte_s": (time.perf_counter() - t0) / cube.nbytes, "bytes": int(cube.nbytes)}
    rng = np.random.default_rng(0)
    sets = []
    for branch in ("spatial", "spectral", "material"):
        yy, xx = np.mgrid[:side, :side]
        masks = np.stack([(yy - rng.integers(side)) ** 2 + (xx - rng.integers(side)) ** 2 < rng.integers(9, side // 3)
                          ** 2 for _ in range(60)])
        sets.append(MaskSet(masks, table_from_masks(masks, branch, score=1.0)))
    t0 = time.perf_counter()
    fusion.fuse(sets, 0.7)
    out["fuse"] = {"per_pixel_s": (time.perf_counter() - t0) / side**2, "masks": 180}
    return out


def project(costs: dict[str, Any], table: list[Dataset], devices: int, cpu_workers: int,
            steps: int, batch: int) -> dict[str, Any]:
    """Seconds and bytes of every stage over the corpus: model stages divided over ``devices``, CPU stages over
    ``cpu_workers``, pretraining the production schedule over ``devices``."""
    sp, sc, ma = costs["spatial"], costs["spectral"], costs["material"]
    stages: dict[str, dict[str, float]] = {k: {"seconds": 0.0, "bytes": 0.0} for k in
                                           ("ingest", "label-spatial", "label-spectral", "label-material", "fuse",
                                            "features")}
    from stages.labelling.falsecolor import sequence_bands

    for d in table:
        cube = d.bands * d.height * d.width * 2
        px = d.height * d.width
        frames = len(sequence_bands(d.bands, sc["stride"]))
        per = {
            "ingest": (costs["ingest"]["per_byte_s"] * cube, 2 * cube),  # source read + cube written
            "label-spatial": (sp["encode_s"] + sp["per_batch_s"] * full_batches(sp), cube + 60 * px / 8),
            "label-spectral": (sc["base_s"] + sc["per_frame_s"] * frames + sc["seed_points_s"], cube + 60 * px / 8),
            "label-material": (ma["encode_s"] + ma["per_batch_s"] * full_batches(ma), cube + 60 * px / 8),
            "fuse": (costs["fuse"]["per_pixel_s"] * px, 3 * 60 * px / 8 + 60 * px / 8),
            "features": (costs["features"]["base_s"] + costs["features"]["per_band_s"] * d.bands,
                         cube + 256 * 32 * 32 * 4),
        }
        for name, (seconds, moved) in per.items():
            stages[name]["seconds"] += seconds * d.images
            stages[name]["bytes"] += moved * d.images
    mean_bands = sum(d.bands * d.images for d in table) / sum(d.images for d in table)
    step = (costs["pretrain"]["base_s"] + costs["pretrain"]["per_band_s"] * mean_bands) * batch
    size = costs["pretrain"]["img_size"]
    stages["pretrain"] = {"seconds": step * steps, "bytes": steps * batch * mean_bands * size * size * 2}
    wall = {k: v["seconds"] / (cpu_workers if k in ("ingest", "fuse") else devices) for k, v in stages.items()}
    return {"stages": stages, "wall_s": wall, "total_wall_s": sum(wall.values()),
            "bound": max(wall, key=lambda k: wall[k]), "mean_bands": mean_bands}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=8, help="devices (GPUs) the projection divides model work over")
    ap.add_argument("--cpu-workers", type=int, default=32, help="CPU workers for ingest and fusion")
    ap.add_argument("--device", default="auto", help="device to measure on: auto, cpu, cuda:0")
    ap.add_argument("--side", type=int, default=512, help="side of the timed cubes")
    ap.add_argument("--points", default="8,12", help="two small point grids (per side) the labellers are timed at")
    ap.add_argument("--steps", type=int, default=None, help="pretraining steps (default: the production profile's)")
    ap.add_argument("--json", action="store_true", help="print the measurements and projection as JSON")
    args = ap.parse_args()
    import torch

    from pipelines.profiles import resolve

    device = ("cuda:0" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cpu":
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    table = datasets()
    prod = resolve("production").pretrain
    steps, batch = args.steps or prod.steps, prod.batch_size or 4
    p0, p1 = (int(v) for v in args.points.split(","))
    load0, t0 = os.getloadavg()[0], time.perf_counter()
    costs = measure(device, args.side, (p0, p1))
    seconds = time.perf_counter() - t0
    proj = {n: project(costs, table, n, args.cpu_workers, steps, batch) for n in sorted({1, args.devices})}
    main_proj = proj[args.devices]
    images = sum(d.images for d in table)
    print(f"measured on {device} ({torch.get_num_threads()} threads) in {seconds:.0f} s, load average "
          f"{load0:.1f} / {os.getloadavg()[0]:.1f}; random-init production models; {len(table)} datasets, "
          f"{images} images (the paper's corpus: {CORPUS_IMAGES}), mean {main_proj['mean_bands']:.0f} bands")
    print("extrapolated, not run: labellers from grids of "
          f"{p0 * p0} and {p1 * p1} points to {PRODUCTION_POINTS} (in decoder batches); spectral from "
          f"{costs['spectral']['frames']} frames to each dataset's; features and pretraining from 32 and 128 bands "
          f"to each dataset's; pretraining {steps} steps x batch {batch}")
    print(f"{'stage':16s} {'per image s':>12s} {'1 device h':>11s} {f'{args.devices} devices h':>12s} {'GB moved':>9s}")
    for name, s in main_proj["stages"].items():
        per = s["seconds"] / (steps * batch if name == "pretrain" else images)
        print(f"{name:16s} {per:12.3f} {proj[1]['wall_s'][name] / 3600:11.1f} "
              f"{main_proj['wall_s'][name] / 3600:12.1f} {s['bytes'] / 1e9:9.1f}")
    print(f"projected wall time on {args.devices} devices ({args.cpu_workers} CPU workers for ingest and fusion), "
          f"stages one after another: {main_proj['total_wall_s'] / 3600:.1f} h; bound by {main_proj['bound']}")
    if args.json:
        print(json.dumps({"device": device, "costs": costs, "projection": proj, "measure_s": seconds}))
    figures = [
        {"name": f"corpus_wall_h_{args.devices}_devices", "value": round(main_proj["total_wall_s"] / 3600, 1),
         "target": None, "met": True},
        {"name": "bounding_stage", "value": main_proj["bound"], "target": None, "met": True},
        {"name": "measure_s", "value": round(seconds, 1), "target": 300, "met": seconds <= 300},
    ]
    print(json.dumps({"figures": figures}))


if __name__ == "__main__":
    main()
