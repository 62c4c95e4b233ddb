"""Pretraining throughput, measured side by side in one run (random-init student and teacher).

1. Steps/s of the tiny model fed by the real catalog loader (DataLoader over PretrainDataset) vs the same batches
   held in memory (target >= 0.9x: loading must not be the bottleneck).
2. Tokens/s and peak memory of one forward+backward of the encoder per model size on this device (CPU here; on a
   CUDA machine the same script runs in bf16 autocast and also reports MFU).

    .venv/bin/python bench/pretrain.py [--steps 20] [--workers 2] [--sizes tiny,base]
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


def make_catalog(root: Path, images: int = 8, size: int = 96) -> str:
    """A catalog of ``images`` 31-band cubes with synthetic fused masks (rectangles) standing in for labels and
    the stored false colour that labelling leaves."""
    from catalog.fixtures.synth import scene, to_dtype
    from catalog.masks import MaskSet, MaskStore, table_from_masks
    from catalog.specs import parse_spec
    from catalog.store import Catalog
    from stages.ingest import ingest_item, item_for
    from stages.labelling.falsecolor import ensure_falsecolor

    rng = np.random.default_rng(0)
    folder = root / "src" / "bench"
    folder.mkdir(parents=True)
    wl = np.linspace(400, 700, 31)
    for i in range(images):
        np.save(folder / f"img_{i}.npy", to_dtype(scene(rng, wl, size, size, objects=5), "uint16", 4095)
                .transpose(1, 2, 0))
    spec = parse_spec({"name": "bench", "format": "npy", "files": "*.npy", "options": {"axes": "yxb"},
                       "wavelengths_nm": [float(w) for w in wl]}, "<bench>")
    cat = Catalog(root / "cat").init()
    store = MaskStore(cat)
    for i in range(images):
        res = ingest_item(cat, spec, item_for(folder, spec, f"img_{i}.npy"))
        masks = np.zeros((4, size, size), bool)
        for k in range(4):
            y, x = rng.integers(0, size - 24, 2)
            masks[k, y:y + 24, x:x + 24] = True
        store.write(res.image_id, "fused-bench", "fused", MaskSet(masks, table_from_masks(masks, "fused", score=1.0)),
                    random_init=True)
        ensure_falsecolor(cat, res.image_id)  # as the spatial labelling stage leaves it
    return cat.uri


def loader_vs_memory(catalog: str, steps: int, workers: int) -> None:
    import torch
    from torch.utils.data import DataLoader

    from catalog.store import Catalog
    from stages.pretraining import PretrainConfig
    from stages.pretraining.data import BandSignatureBatchSampler, PretrainDataset, collate, scan_catalog
    from stages.pretraining.runtime import setup_runtime
    from stages.pretraining.trainer import Trainer

    config = PretrainConfig.preset("tiny", catalog=catalog, steps=steps + 2, batch_size=4, crop_size=64,
                                   device="cpu")
    rt = setup_runtime("cpu")
    images = scan_catalog(Catalog(catalog))
    dataset = PretrainDataset(catalog, 64, images, seed=0)

    def batches() -> DataLoader:
        sampler = BandSignatureBatchSampler(dataset.signatures, config.batch_size, steps + 2, 0)
        return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=workers,
                          multiprocessing_context="spawn" if workers else None, persistent_workers=False)

    def run(source: list | DataLoader) -> float:
        trainer = Trainer.build(config, rt)
        it = iter(source)
        for s in range(2):  # warm-up steps (and worker start) outside the timing
            trainer.step(s, next(it).to(rt.device))
        t0 = time.perf_counter()
        for s in range(2, steps + 2):
            trainer.step(s, next(it).to(rt.device))
        return steps / (time.perf_counter() - t0)

    in_memory = list(batches())
    mem = run(in_memory)
    real = run(batches())
    print(f"tiny model, batch 4, crop 64, {torch.get_num_threads()} torch threads, {workers} loader workers: "
          f"catalog loader {real:.2f} steps/s, in-memory {mem:.2f} steps/s -> {real / mem:.2f}x (target >= 0.9)")


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


def by_size(sizes: list[str], img: int, bands: int, peak_tflops: float | None) -> None:
    print(f"encoder forward+backward, batch 1, {img}x{img} px, {bands} bands (peak = GPU allocated on CUDA, "
          "else process RSS)")
    print(f"{'model':13s} {'params M':>9s} {'tokens/s':>9s} {'peak MB':>8s} {'TFLOP/s':>8s}")
    for name in sizes:
        out = subprocess.run([sys.executable, "-c", CHILD, name, str(img), str(bands)], capture_output=True,
                             text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, check=False)
        if out.returncode != 0:
            print(f"{name:13s} failed: {out.stderr.strip().splitlines()[-1:]}")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        mfu = f"  MFU {r['tflops'] / peak_tflops:.1%}" if peak_tflops else ""
        print(f"{name:13s} {r['params_m']:9.1f} {r['tokens_per_s']:9.0f} {r['peak_mb']:8.0f} {r['tflops']:8.3f}{mfu}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--sizes", default="tiny,hypervision_b,hypervision_l")
    ap.add_argument("--img", type=int, default=256, help="encoder input side for the size sweep")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="the device's dense bf16 peak (e.g. 989 for an H100 SXM) to print MFU")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        catalog = make_catalog(Path(tmp))
        loader_vs_memory(catalog, args.steps, args.workers)
    by_size(args.sizes.split(","), args.img, 31, args.peak_tflops)


if __name__ == "__main__":
    main()
