"""Random 128x128 all-band crops: catalog vs the native files vs raw memory-mapped .npy, side by side in one run.

Targets: catalog >= 5x native, catalog >= 0.5x raw mmap. The same crop positions are read by every method,
each method gets a warm-up pass so all three read from the page cache (the steady state of a training loader).
Native = what a loader without the catalog does: the project's own readers on the original files.

    .venv/bin/python bench/loader.py [--size 512] [--crops 60]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import scipy.io

from catalog.fixtures.synth import scene, to_dtype
from catalog.readers.base import SourceItem
from catalog.specs import parse_spec
from catalog.store import Catalog
from stages.ingest import ingest_item, item_for

CROP = 128


def _specs() -> dict[str, dict]:
    return {
        "envi-bil": {"name": "envi-bil", "format": "envi", "files": "*.hdr", "wavelengths_from": "file"},
        "mat-v5": {"name": "mat-v5", "format": "matlab", "files": "*.mat", "options": {"key": "cube", "axes": "yxb"},
                   "wavelengths_nm": {"start": 400, "stop": 700, "count": 31}},
        "mat-v73": {"name": "mat-v73", "format": "matlab", "files": "*.mat", "options": {"key": "cube", "axes": "yxb"},
                    "wavelengths_nm": {"start": 400, "stop": 1000, "count": 128}},
        "npy-hwc": {"name": "npy-hwc", "format": "npy", "files": "*.npy", "options": {"axes": "yxb"},
                    "wavelengths_nm": {"start": 450, "stop": 950, "count": 64}},
    }


def realistic(rng: np.random.Generator, bands: int, size: int, dtype: str, top: float) -> np.ndarray:
    """A (band, y, x) scene with objects, smooth spectra and sensor noise (compresses like real data)."""
    cube = scene(rng, np.linspace(400, 1000, bands), size, size, objects=12, noise=0.02)
    return to_dtype(cube, dtype, top)


def write_sources(root: Path, size: int, rng: np.random.Generator) -> None:
    """One image per format family that matters for throughput, ``size`` x ``size`` pixels."""
    (root / "envi-bil").mkdir(parents=True)
    cube = np.ascontiguousarray(realistic(rng, 204, size, "uint16", 4095).transpose(1, 0, 2))  # BIL: line, band, x
    cube.tofile(root / "envi-bil" / "scene.bin")
    wl = ", ".join(f"{w:.2f}" for w in np.linspace(400, 1000, 204))
    (root / "envi-bil" / "scene.hdr").write_text(
        f"ENVI\nsamples = {size}\nlines = {size}\nbands = 204\nheader offset = 0\nfile type = ENVI Standard\n"
        f"data type = 12\ninterleave = bil\nbyte order = 0\nwavelength units = Nanometers\nwavelength = {{{wl}}}\n")
    (root / "mat-v5").mkdir()
    scipy.io.savemat(root / "mat-v5" / "scene.mat",
                     {"cube": realistic(rng, 31, size, "float32", 1.0).transpose(1, 2, 0)})
    (root / "mat-v73").mkdir()
    with h5py.File(root / "mat-v73" / "scene.mat", "w", userblock_size=512) as f:
        f.create_dataset("cube", data=realistic(rng, 128, size, "uint16", 4095).transpose(0, 2, 1))
    with open(root / "mat-v73" / "scene.mat", "r+b") as fh:
        fh.write(b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: bench HDF5 schema 1.00 .".ljust(116))
    (root / "npy-hwc").mkdir()
    np.save(root / "npy-hwc" / "scene.npy", realistic(rng, 64, size, "uint16", 65535).transpose(1, 2, 0))


def timed(fn: Callable[[int, int], np.ndarray], positions: list[tuple[int, int]]) -> float:
    """Crops per second over ``positions`` after one warm-up pass."""
    for y, x in positions[:3]:
        fn(y, x)
    t0 = time.perf_counter()
    for y, x in positions:
        out = fn(y, x)
        assert out.shape[1:] == (CROP, CROP)
    return len(positions) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--crops", type=int, default=60)
    ap.add_argument("--chunk", type=int, default=None, help="spatial chunk edge (default: settings, 64)")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_sources(root / "src", args.size, rng)
        cat = Catalog(root / "catalog", chunk_xy=args.chunk).init()
        positions = [(int(rng.integers(0, args.size - CROP)), int(rng.integers(0, args.size - CROP)))
                     for _ in range(args.crops)]
        print(f"{args.crops} random {CROP}x{CROP} all-band crops per method, images {args.size}x{args.size}, "
              f"chunks {cat.chunk_xy}x{cat.chunk_xy}x(all bands), codec {cat.codec_name}-{cat.compression_level}")
        c = cat.chunk_xy
        aligned = [(y // c * c, x // c * c) for y, x in positions]
        print(f"{'dataset':10s} {'bands':>5s} {'native/s':>9s} {'catalog/s':>10s} {'raw mmap/s':>11s} "
              f"{'cat/native':>10s} {'cat/mmap':>9s} {'aligned cat/mmap':>17s}")
        ratios_native, ratios_mmap = [], []
        for name, raw_spec in _specs().items():
            spec = parse_spec(raw_spec, f"<bench {name}>")
            folder = root / "src" / name
            item: SourceItem = item_for(folder, spec, next(p.name for p in folder.iterdir()
                                                          if p.suffix in (".hdr", ".mat", ".npy")))
            res = ingest_item(cat, spec, item)
            assert res.status == "ingested", res.message
            location = cat.row(res.image_id)["location"]
            options = spec.reader_options()

            def native(y: int, x: int, item: SourceItem = item, spec=spec, options=options) -> np.ndarray:
                data = spec.reader.read(item, options).data  # a loader without the catalog opens per sample
                return np.asarray(data[:, y:y + CROP, x:x + CROP])

            full = np.asarray(cat.open(res.image_id).values)
            npy = root / f"{name}.raw.npy"
            np.save(npy, full)
            mm = np.load(npy, mmap_mode="r")
            bands = full.shape[0]
            del full

            def raw(y: int, x: int, mm: np.ndarray = mm) -> np.ndarray:
                return np.ascontiguousarray(mm[:, y:y + CROP, x:x + CROP])

            def catalog(y: int, x: int, location: str = location) -> np.ndarray:
                return cat.read_crop(location, y, x, CROP)

            n, k, r = timed(native, positions), timed(catalog, positions), timed(raw, positions)
            ka, ra = timed(catalog, aligned), timed(raw, aligned)  # crops on the chunk grid: no chunk over-read
            ratios_native.append(k / n)
            ratios_mmap.append(k / r)
            print(f"{name:10s} {bands:5d} {n:9.1f} {k:10.1f} {r:11.1f} {k / n:10.2f} {k / r:9.2f} {ka / ra:17.2f}")
        gm = lambda v: float(np.exp(np.mean(np.log(v))))  # noqa: E731
        print(f"geometric mean: catalog/native = {gm(ratios_native):.2f}x (target >= 5), "
              f"catalog/raw mmap = {gm(ratios_mmap):.2f}x (target >= 0.5)")


if __name__ == "__main__":
    main()
