"""Pretraining throughput, measured side by side in one run (random-init student and teacher).

1. Steps/s of the tiny model fed by the real catalog loader (DataLoader over PretrainDataset) vs the same batches
   held in memory, in alternating blocks on one trainer so that load drifts cancel (target >= 0.95x: loading must
   not be the bottleneck). On the CPU the training gets the cores the loader workers leave (one each on 2 cores),
   as on a GPU node where the model does not compete with the workers for cores.
2. The loader alone (PretrainDataset samples, no model) at the released input sizes, 512 and 1024 px with all
   204 bands: samples/s and MB/s of float32 samples on one core, and with the DataLoader's workers.
3. Tokens/s and peak memory of one forward+backward of the encoder per model size on this device (CPU here; on a
   CUDA machine the same script runs in bf16 autocast and also reports MFU against --peak-tflops, and the fraction
   of step time spent waiting for data with the catalog loader).

    .venv/bin/python bench/pretrain.py [--steps 4] [--blocks 4] [--workers 1] [--sizes tiny,base,large] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def make_catalog(root: Path, images: int = 8, size: int = 96, bands: int = 31, name: str = "bench") -> str:
    """A catalog of ``images`` cubes with synthetic fused masks (rectangles) standing in for labels and the
    stored false colour that labelling leaves."""
    from catalog.catalog import Catalog
    from catalog.fixtures.synth import scene, to_dtype
    from catalog.masks import MaskSet, MaskStore, table_from_masks
    from catalog.specs import parse_spec
    from stages.ingest import ingest_item
    from stages.ingest.discover import item_for
    from stages.labelling.falsecolor import ensure_falsecolor

    rng = np.random.default_rng(0)
    folder = root / "src" / name
    folder.mkdir(parents=True)
    wl = np.linspace(400, 700 if bands <= 31 else 1000, bands)
    for i in range(images):
        np.save(folder / f"img_{i}.npy", to_dtype(scene(rng, wl, size, size, objects=5), "uint16", 4095)
                .transpose(1, 2, 0))
    spec = parse_spec({"name": name, "format": "npy", "files": "*.npy", "options": {"axes": "yxb"},
                       "wavelengths_nm": [float(w) for w in wl]}, "<bench>")
    cat = Catalog(root / "cat").init()
    store = MaskStore(cat)
    side = max(8, size // 4)
    for i in range(images):
        res = ingest_item(cat, spec, item_for(folder, spec, f"img_{i}.npy"))
        masks = np.zeros((4, size, size), bool)
        for k in range(4):
            y, x = rng.integers(0, size - side, 2)
            masks[k, y:y + side, x:x + side] = True
        store.write(res.image_id, "fused-bench", "fused", MaskSet(masks, table_from_masks(masks, "fused", score=1.0)),
                    random_init=True)
        ensure_falsecolor(cat, res.image_id)  # as the spatial labelling stage leaves it
    return cat.uri


def loader_vs_memory(catalog: str, steps: int, blocks: int, workers: int, device: str) -> dict[str, float]:
    """Steps/s with the catalog loader vs in-memory batches on one trainer, in ``blocks`` alternating blocks of
    ``steps`` timed steps per side (load spikes from other processes hit both sides alike). One DataLoader serves
    every loader block; each block starts with two untimed steps, which also drain what its workers prefetched
    while the in-memory block ran."""
    import torch
    from torch.utils.data import DataLoader

    from catalog.catalog import Catalog
    from stages.pretraining import PretrainConfig
    from stages.pretraining.data import BandSignatureBatchSampler, PretrainDataset, collate, scan_catalog
    from stages.pretraining.runtime import setup_runtime
    from stages.pretraining.trainer import Trainer

    per_side = blocks * (steps + 2)
    config = PretrainConfig.preset("tiny", catalog=catalog, steps=4 * per_side, batch_size=4, crop_size=64,
                                   device=device)
    rt = setup_runtime(device)
    images = scan_catalog(Catalog(catalog))
    dataset = PretrainDataset(catalog, 64, images, seed=0)

    def loader(start: int, n: int) -> DataLoader:
        sampler = BandSignatureBatchSampler(dataset.signatures, config.batch_size, start + n, 0, start)
        return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=workers,
                          pin_memory=rt.cuda, multiprocessing_context="spawn" if workers else None,
                          persistent_workers=False)

    trainer = Trainer.build(config, rt)
    in_memory = [b.to(rt.device) for b in loader(0, steps + 2)]
    it = iter(loader(per_side, per_side))
    step = 0
    mem_s = load_s = wait_s = 0.0

    def sync() -> None:
        if rt.cuda:
            torch.cuda.synchronize()

    for _ in range(blocks):
        for s in range(2):
            trainer.step(step, in_memory[s])
            step += 1
        sync()
        t0 = time.perf_counter()
        for s in range(2, steps + 2):
            trainer.step(step, in_memory[s])
            step += 1
        sync()
        mem_s += time.perf_counter() - t0
        for _ in range(2):
            trainer.step(step, next(it).to(rt.device))
            step += 1
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            w0 = time.perf_counter()
            batch = next(it).to(rt.device)
            wait_s += time.perf_counter() - w0
            trainer.step(step, batch)
            step += 1
        sync()
        load_s += time.perf_counter() - t0
    del it
    ratio = mem_s / load_s
    n = blocks * steps
    print(f"tiny model, batch 4, crop 64, {torch.get_num_threads()} torch thread(s), {workers} loader worker(s), "
          f"{rt.device}, {blocks} alternating blocks of {steps} steps: catalog loader {n / load_s:.2f} steps/s, "
          f"in-memory {n / mem_s:.2f} steps/s -> {ratio:.2f}x (target >= 0.95); waiting for data: "
          f"{wait_s / load_s:.1%} of the loader's time")
    return {"ratio": ratio, "wait": wait_s / load_s}


def big_catalog(root: Path, side: int = 1024, bands: int = 204) -> str:
    """One ``side`` x ``side`` image of ``bands`` bands, generated strip by strip (never whole in memory as
    floats), with fused masks and a stored false colour standing in for what labelling leaves."""
    from catalog.catalog import Catalog
    from catalog.fixtures.synth import scene, to_dtype
    from catalog.masks import MaskSet, MaskStore, table_from_masks
    from catalog.specs import parse_spec
    from stages.ingest import ingest_item
    from stages.ingest.discover import item_for

    rng = np.random.default_rng(1)
    folder = root / "src" / "alone"
    folder.mkdir(parents=True)
    wl = np.linspace(400, 1000, bands)
    mm = np.lib.format.open_memmap(folder / "big.npy", mode="w+", dtype=np.uint16, shape=(side, side, bands))
    for y0 in range(0, side, 256):
        mm[y0:y0 + 256] = to_dtype(scene(rng, wl, 256, side, objects=6), "uint16", 4095).transpose(1, 2, 0)
    mm.flush()
    rgb = np.ascontiguousarray((mm[:, :, [bands * 3 // 4, bands // 2, bands // 4]] >> 4).astype(np.uint8))
    del mm
    spec = parse_spec({"name": "alone", "format": "npy", "files": "*.npy", "options": {"axes": "yxb"},
                       "wavelengths_nm": [float(w) for w in wl]}, "<bench>")
    cat = Catalog(root / "cat-alone").init()
    res = ingest_item(cat, spec, item_for(folder, spec, "big.npy"))
    masks = np.zeros((4, side, side), bool)
    for k in range(4):
        y, x = rng.integers(0, side - 200, 2)
        masks[k, y:y + 200, x:x + 200] = True
    MaskStore(cat).write(res.image_id, "fused-bench", "fused", MaskSet(masks, table_from_masks(masks, "fused",
                                                                                               score=1.0)),
                         random_init=True)
    cat.write_falsecolor(cat.row(res.image_id)["location"], rgb, "band-pick")
    (folder / "big.npy").unlink()
    return cat.uri


def loader_alone(root: Path, workers: int) -> None:
    """Samples/s of PretrainDataset alone at 512 and 1024 px, all 204 bands: on one core (in process, one
    decode thread), and at 512 px with ``workers`` DataLoader workers."""
    from torch.utils.data import DataLoader

    from catalog.catalog import Catalog
    from stages.pretraining.data import PretrainDataset, scan_catalog

    uri = big_catalog(root)
    images = scan_catalog(Catalog(uri))
    print(f"loader alone (PretrainDataset samples: cube read as float32 + normalise, masks, prompts, RGB), one "
          f"{images[0].height}x{images[0].width} px image of {images[0].wavelengths.size} bands:")
    for size in (512, 1024):
        ds = PretrainDataset(uri, size, images, seed=0, read_threads=1)
        s = ds[(0, 0)]
        n, t0 = 0, time.perf_counter()
        while n < 3 or time.perf_counter() - t0 < 2.0:
            s = ds[(0, n + 1)]
            n += 1
        per_core = n / (time.perf_counter() - t0)
        mb = s.cube.numel() * 4 / 2**20
        line = f"  {size:4d} px: {per_core:6.2f} samples/s on one core ({per_core * mb:5.0f} MB/s of float32 samples)"
        if workers and size == 512:
            keys = [(0, k) for k in range(8 * workers)]
            it = iter(DataLoader(ds, batch_size=None, sampler=keys, num_workers=workers,
                                 multiprocessing_context="spawn", prefetch_factor=1))
            for _ in range(2 * workers):  # every worker started and warm
                next(it)
            t0 = time.perf_counter()
            got = sum(1 for _ in it)
            line += f"; {got / (time.perf_counter() - t0):6.2f} samples/s with {workers} workers"
        print(line)


CHILD = """
import json, resource, sys, time, torch
from model import create_model
name, img, bands = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
cuda = torch.cuda.is_available()
dev = torch.device("cuda" if cuda else "cpu")
model = create_model(name, img_size=img).to(dev)
enc = model.image_encoder
x = torch.rand(1, bands, img, img, device=dev)
wl = torch.linspace(400, 1000, bands)
params = sum(p.numel() for p in enc.parameters())
def step():
    with torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False):
        out = enc.forward_features(x, wl, torch.tensor([0.01], device=dev))
    out.float().mean().backward()
step()
if cuda:
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
n, t0 = 0, time.perf_counter()
while n < 3 or time.perf_counter() - t0 < 2.0:
    step(); n += 1
if cuda:
    torch.cuda.synchronize()
dt = (time.perf_counter() - t0) / n
tokens = (img // enc.config.patch_size) ** 2
flops = 6 * params * tokens  # forward + backward, dense-layer estimate
peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"params_m": params / 1e6, "tokens_per_s": tokens / dt, "peak_mb": peak, "s_per_step": dt,
                  "tflops": flops / dt / 1e12, "device": str(dev)}))
"""


def by_size(sizes: list[str], img: int, bands: int, peak_tflops: float | None) -> dict[str, float]:
    print(f"encoder forward+backward, batch 1, {img}x{img} px, {bands} bands (peak = GPU allocated on CUDA, "
          "else process RSS)")
    print(f"{'model':13s} {'params M':>9s} {'tokens/s':>9s} {'peak MB':>8s} {'TFLOP/s':>8s}")
    mfus: dict[str, float] = {}
    for name in sizes:
        out = subprocess.run([sys.executable, "-c", CHILD, name, str(img), str(bands)], capture_output=True,
                             text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, check=False)
        if out.returncode != 0:
            print(f"{name:13s} failed: {out.stderr.strip().splitlines()[-1:]}")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        mfu = f"  MFU {r['tflops'] / peak_tflops:.1%}" if peak_tflops else ""
        if peak_tflops and r["device"].startswith("cuda"):
            mfus[name] = r["tflops"] / peak_tflops
        print(f"{name:13s} {r['params_m']:9.1f} {r['tokens_per_s']:9.0f} {r['peak_mb']:8.0f} {r['tflops']:8.3f}{mfu}")
    return mfus


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--steps", type=int, default=4, help="timed steps per block")
    ap.add_argument("--blocks", type=int, default=4, help="alternating blocks per side")
    ap.add_argument("--workers", type=int, default=1, help="DataLoader workers")
    ap.add_argument("--torch-threads", type=int, default=None,
                    help="training threads on the CPU (default: the cores the workers leave, at least 1)")
    ap.add_argument("--sizes", default="tiny,hypervision_b,hypervision_l")
    ap.add_argument("--img", type=int, default=256, help="encoder input side for the size sweep")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="the device's dense bf16 peak (e.g. 989 for an H100 SXM) to print MFU")
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda")
    ap.add_argument("--json", action="store_true", help="end with the figures as one JSON line")
    args = ap.parse_args()
    import torch

    print(f"load average at start: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    if not torch.cuda.is_available() or args.device == "cpu":
        # on the CPU the model and the loader share the cores: give each its own, as a GPU node does
        torch.set_num_threads(args.torch_threads or max(1, (os.cpu_count() or 1) - args.workers))
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else \
        ("cpu" if args.device == "auto" else args.device)
    with tempfile.TemporaryDirectory(dir=os.environ.get("HVP_BENCH_TMP")) as tmp:
        catalog = make_catalog(Path(tmp))
        lm = loader_vs_memory(catalog, args.steps, args.blocks, args.workers, device)
        loader_alone(Path(tmp), max(2, args.workers))
    mfu = by_size(args.sizes.split(","), args.img, 31, args.peak_tflops)
    print(f"load average at end: {os.getloadavg()[0]:.2f}")
    if args.json:
        figures = [{"name": "pretraining steps/s, catalog loader / in-memory", "value": round(lm["ratio"], 3),
                    "target": ">= 0.95", "met": lm["ratio"] >= 0.95}]
        if device == "cuda":
            figures.append({"name": "fraction of step time waiting for data (CUDA)", "value": round(lm["wait"], 4),
                            "target": "<= 0.02", "met": lm["wait"] <= 0.02})
            if "base" in mfu:
                figures.append({"name": "MFU of the -B layout, bf16", "value": round(mfu["base"], 3),
                                "target": ">= 0.40", "met": mfu["base"] >= 0.40})
        print(json.dumps({"figures": figures}))


if __name__ == "__main__":
    main()
