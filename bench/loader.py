"""The data path, side by side in one run: catalog reads vs the native files vs a raw (band, y, x) .npy.

1. Layout table: one realistic cube (204 bands, 12-bit counts) stored in every candidate layout (chunk shapes,
   band groups, Zarr v3 sharding, codecs none / lz4 / zstd 1-3 with and without shuffle, checksums on and off);
   per layout its bytes on disk and, as ratios to the raw memory-mapped .npy read at the same positions, warm
   128 px, 512 px, whole-image and batch reads and cold 128 / 512 px reads; then decode threads 1 vs 2 and the
   chunk cache.
2. Format families: the project's readers on the original files (native), the catalog (default layout) and the
   raw .npy, warm and cold, 128 px and 512 px crops, plus bytes on disk against the source files.

Every method returns a new contiguous ``(band, y, x)`` array (what a loader hands on). The two sides of a ratio
read the same positions in alternation (which goes first alternates too), so that load from other processes on
shared cores hits both alike; a ratio is the quotient of the summed times. Warm: after one untimed pass over all
positions, timed by the reading thread's CPU time (both sides read on one thread; wall clock on cores shared with
other processes mostly measures them). Cold: before every single read the files of both sides are evicted from
the page cache (fsync, then ``posix_fadvise(DONTNEED)``; the raw .npy is mapped afresh), as a loader over a
dataset far larger than memory sees them, timed by wall clock. One decode thread and no chunk cache unless a row
says otherwise, so the figures are the decode path's per core. A cold read of 4 MB or more also uses the reader's
one read-ahead thread (it waits on the disk and verifies checksums while the decode thread copies): the CPU each
side spends per cold read, all threads counted, is printed under the table.

Targets: warm 128 px catalog >= native for every family and >= 5x geometric mean; warm 512 px >= 0.5x raw mmap;
cold >= 1x raw .npy reads.

    .venv/bin/python bench/loader.py [--size 512] [--crops 24] [--quick] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import scipy.io

from catalog.catalog import Catalog
from catalog.cubes.layout import CubeLayout
from catalog.cubes.writer import CubeWrite
from catalog.fixtures.synth import scene, to_dtype
from catalog.readers.base import SourceItem
from catalog.specs import parse_spec
from stages.ingest import ingest_item
from stages.ingest.discover import item_for

DEFAULT = CubeLayout()
"""The library's default layout (catalog/cubes/layout.py), chosen from this table; marked * in it."""

BASE = CubeLayout(chunk_xy=64, band_group=0, shard_xy=0, codec="none", checksum=True)
LAYOUTS: list[CubeLayout] = [
    BASE,
    replace(BASE, checksum=False),
    replace(BASE, chunk_xy=32),
    replace(BASE, chunk_xy=128),
    replace(BASE, band_group=51),
    replace(BASE, shard_xy=256),
    replace(BASE, shard_xy=1024),
    replace(BASE, codec="lz4", shuffle="none"),
    replace(BASE, codec="lz4", shuffle="byte"),
    replace(BASE, codec="lz4", shuffle="bit"),
    replace(BASE, codec="zstd", level=1, shuffle="none"),
    replace(BASE, codec="zstd", level=1, shuffle="bit"),
    replace(BASE, codec="zstd", level=2, shuffle="bit"),
    replace(BASE, codec="zstd", level=3, shuffle="bit"),
]
QUICK = [LAYOUTS[i] for i in (0, 1, 6, 7, 9, 11)]
COLD_REPEAT = 3
"""Cold 512 px reads go over the 512 px positions this many times (each read is cold: the disk's noise needs
more samples than a warm read's)."""


# ---------------------------------------------------------------------------------------------- helpers
def evict(paths: list[str] | list[Path]) -> None:
    """Drop files' pages from the page cache (fsync first: dirty pages are not dropped)."""
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def paired(a: Callable[[int, int], Any], b: Callable[[int, int], Any], positions: list[tuple[int, int]],
           cold: Callable[[], None] | None = None, clock: Callable[[], float] | None = None,
           cpu: list[float] | None = None) -> float:
    """Speed of ``a`` relative to ``b`` (> 1: ``a`` is faster) over the same positions read in alternation;
    warm after an untimed pass of both, or with ``cold`` (untimed) before every single read. ``clock``: the
    reading thread's CPU time when warm (both sides single-threaded), wall clock when cold (it waits on I/O).
    ``cpu`` (two zeros) accumulates each side's process CPU time (all its threads)."""
    clock = clock or (time.perf_counter if cold is not None else time.thread_time)
    if cold is None:
        for y, x in positions:
            a(y, x)
            b(y, x)
    spent = [0.0, 0.0]
    for k, (y, x) in enumerate(positions):
        for side in ((0, 1) if k % 2 == 0 else (1, 0)):
            if cold is not None:
                cold()
            fn = a if side == 0 else b
            t0, c0 = clock(), time.process_time()
            fn(y, x)
            spent[side] += clock() - t0
            if cpu is not None:
                cpu[side] += time.process_time() - c0
    return spent[1] / spent[0]


def paired_once(a: Callable[[], Any], b: Callable[[], Any], repeat: int = 3,
                clock: Callable[[], float] | None = None) -> float:
    """As ``paired`` (warm) for a whole-image or batch read repeated ``repeat`` times."""
    return paired(lambda y, x: a(), lambda y, x: b(), [(0, 0)] * repeat, clock=clock)


def gm(values: list[float]) -> float:
    """Geometric mean."""
    return float(np.exp(np.mean(np.log(values))))


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


class Raw:
    """The raw baseline: a (band, y, x) .npy memory-mapped, crops copied out contiguous."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.mm = np.load(path, mmap_mode="r")

    def remap(self) -> None:
        """Evict the file and map it afresh (pages mapped by this process would not be dropped)."""
        del self.mm
        evict([self.path])
        self.mm = np.load(self.path, mmap_mode="r")

    def crop(self, y: int, x: int, size: int) -> np.ndarray:
        return np.array(self.mm[:, y:y + size, x:x + size])  # always a copy, even of the whole image


def positions(rng: np.random.Generator, side: int, size: int, n: int) -> list[tuple[int, int]]:
    return [(int(rng.integers(0, side - size + 1)), int(rng.integers(0, side - size + 1))) for _ in range(n)]


# ---------------------------------------------------------------------------------------------- 1. layouts
def measure_layout(root: Path, layout: CubeLayout, cube: np.ndarray, wl: np.ndarray, raw: Raw,
                   p128: list[tuple[int, int]], p512: list[tuple[int, int]], s512: int,
                   batch: list[tuple[int, int]]) -> dict[str, float]:
    """One row of the layout table: the cube stored in ``layout``, read against the raw .npy."""
    cat = Catalog(root / f"cat-{abs(hash(layout))}", layout=layout, read_threads=1, chunk_cache_mb=0).init()
    t0 = time.perf_counter()
    row = cat.write_cube(CubeWrite(dataset="bench", image_id="bench/layout", key="layout", sha256="0" * 64,
                                   data=cube, wavelength_nm=wl, attrs={"source_path": str(raw.path)}))
    r = {"write_s": time.perf_counter() - t0}
    loc = row["location"]
    files = cat.cubes.chunk_files(loc)
    r["disk"] = dir_bytes(Path(cat.root) / loc / "cube") / cube.nbytes

    def crop(y: int, x: int, size: int) -> np.ndarray:
        return cat.read_crop(loc, y, x, size)

    def both_cold() -> None:
        cat.cubes.forget(loc)  # unmapped first: mapped pages are not evicted
        evict(files)
        raw.remap()

    r["w128"] = paired(lambda y, x: crop(y, x, 128), lambda y, x: raw.crop(y, x, 128), p128)
    r["w512"] = paired(lambda y, x: crop(y, x, s512), lambda y, x: raw.crop(y, x, s512), p512)
    r["image"] = paired_once(lambda: cat.read_image("bench/layout"), lambda: np.array(raw.mm))
    r["batch"] = paired_once(lambda: cat.read_batch([(loc, y, x) for y, x in batch], 128, dtype=cube.dtype),
                             lambda: np.stack([raw.crop(y, x, 128) for y, x in batch]))
    r["c128"] = paired(lambda y, x: crop(y, x, 128), lambda y, x: raw.crop(y, x, 128), p128[: len(p128) // 2],
                       both_cold)
    cpu = [0.0, 0.0]
    r["c512"] = paired(lambda y, x: crop(y, x, s512), lambda y, x: raw.crop(y, x, s512), p512 * COLD_REPEAT,
                       both_cold, cpu=cpu)
    r["c512_cpu"], r["c512_cpu_raw"] = (c / len(p512) / COLD_REPEAT * 1e3 for c in cpu)
    t0 = time.perf_counter()
    for y, x in p512:
        crop(y, x, s512)
    r["mbs"] = len(p512) * cube.shape[0] * s512 * s512 * cube.itemsize / 2**20 / (time.perf_counter() - t0)
    cat.storage.fs.rm(cat.root, recursive=True)
    return r


def layout_table(root: Path, side: int, crops: int, layouts: list[CubeLayout], figures: dict[str, float]) -> None:
    rng = np.random.default_rng(1)
    wl = np.linspace(400, 1000, 204)
    cube = to_dtype(scene(rng, wl, side, side, objects=12, noise=0.02), "uint16", 4095)
    np.save(root / "layout.raw.npy", cube)
    raw = Raw(root / "layout.raw.npy")
    s512 = min(512, side)
    p128, p512 = positions(rng, side, 128, crops), positions(rng, side, s512, max(3, crops // 6))
    batch = positions(rng, side, 128, 16)
    print(f"\n1. Layout table: one {cube.shape[0]}-band {side}x{side} uint16 cube (12-bit counts, synthetic scene "
          f"with sensor noise), {cube.nbytes / 2**20:.0f} MB raw, one decode thread, no chunk cache. Ratios are "
          "catalog speed / raw .npy speed at the same positions: w = warm (page cache), c = cold (both evicted "
          "before each read); image = whole image; batch = 16 crops of 128 px in one read_batch vs stacked crops; "
          f"MB/s = warm {s512} px crops")
    print(f"{'layout':30s} {'disk/raw':>8s} {'write s':>7s} {'w128':>6s} {f'w{s512}':>6s} {'image':>6s} "
          f"{'batch':>6s} {'c128':>6s} {f'c{s512}':>6s} {'MB/s':>6s}")
    results: dict[str, dict[str, float]] = {}
    for layout in layouts:
        r = results[layout.label()] = measure_layout(root, layout, cube, wl, raw, p128, p512, s512, batch)
        mark = "*" if layout == DEFAULT else " "
        print(f"{layout.label() + mark:30s} {r['disk']:8.3f} {r['write_s']:7.2f} {r['w128']:6.2f} {r['w512']:6.2f} "
              f"{r['image']:6.2f} {r['batch']:6.2f} {r['c128']:6.2f} {r['c512']:6.2f} {r['mbs']:6.0f}")
    if DEFAULT.label() in results:
        d = results[DEFAULT.label()]
        print(f"cold {s512} px reads, CPU per read, all threads (default layout): catalog {d['c512_cpu']:.0f} ms "
              f"(decode thread + read-ahead thread), raw .npy {d['c512_cpu_raw']:.0f} ms")
    off = results.get(replace(BASE, checksum=False).label())
    if off is not None:
        on = results[BASE.label()]
        print(f"checksum cost (default layout, crc32c on / off): warm 128 px {on['w128'] / off['w128']:.2f}x, "
              f"warm {s512} px {on['w512'] / off['w512']:.2f}x, whole image {on['image'] / off['image']:.2f}x")
    # decode threads and the chunk cache on the default layout
    two = Catalog(root / "cat-threads", layout=DEFAULT, read_threads=2, chunk_cache_mb=0).init()
    print(f"default layout (*): {DEFAULT.label()}")
    loc = two.write_cube(CubeWrite(dataset="bench", image_id="bench/t", key="t", sha256="1" * 64, data=cube,
                                   wavelength_nm=wl, attrs={}))["location"]
    one = Catalog(two.uri, read_threads=1, chunk_cache_mb=0)
    wall = time.perf_counter  # two threads: CPU time would not show the gain
    image = paired_once(lambda: two.read_image("bench/t"), lambda: one.read_image("bench/t"), clock=wall)
    crops2 = paired(lambda y, x: two.read_crop(loc, y, x, s512), lambda y, x: one.read_crop(loc, y, x, s512), p512,
                    clock=wall)
    print(f"decode threads 2 vs 1 ({os.cpu_count()} cores, shared): whole image {image:.2f}x, "
          f"{s512} px crops {crops2:.2f}x")
    cached = Catalog(two.uri, read_threads=1, chunk_cache_mb=512)
    near = [(min(y + d, side - s512), x) for y, x in p512[:2] for d in (0, 8, 16, 24)]
    hit = paired(lambda y, x: cached.read_crop(loc, y, x, s512), lambda y, x: one.read_crop(loc, y, x, s512), near)
    print(f"chunk cache (512 MB) on overlapping {s512} px crops: {hit:.2f}x the uncached reads")
    if DEFAULT.label() in results:
        default = results[DEFAULT.label()]
        figures[f"warm {s512} px crops of a {side} px image: catalog / raw mmap (default layout)"] = default["w512"]
        figures[f"cold {s512} px crops of a {side} px image: catalog / raw npy (default layout)"] = default["c512"]


# ---------------------------------------------------------------------------------------------- 2. families
def _specs() -> dict[str, dict]:
    return {
        "envi-bil": {"name": "envi-bil", "format": "envi", "files": "*.hdr", "wavelengths_from": "file"},
        "mat-v5": {"name": "mat-v5", "format": "matlab", "files": "*.mat", "options": {"key": "cube", "axes": "yxb"},
                   "wavelengths_nm": {"start": 400, "stop": 700, "count": 31}},
        "mat-v5-dbl": {"name": "mat-v5-dbl", "format": "matlab", "files": "*.mat",
                       "options": {"key": "cube", "axes": "yxb"},
                       "wavelengths_nm": {"start": 400, "stop": 2500, "count": 200}},
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
    (root / "mat-v5-dbl").mkdir()  # AVIRIS Indian Pines style: MATLAB doubles holding integer counts
    scipy.io.savemat(root / "mat-v5-dbl" / "scene.mat",
                     {"cube": realistic(rng, 200, size, "uint16", 9604).astype(np.float64).transpose(1, 2, 0)})
    (root / "mat-v73").mkdir()
    with h5py.File(root / "mat-v73" / "scene.mat", "w", userblock_size=512) as f:
        f.create_dataset("cube", data=realistic(rng, 128, size, "uint16", 4095).transpose(0, 2, 1))
    with open(root / "mat-v73" / "scene.mat", "r+b") as fh:
        fh.write(b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: bench HDF5 schema 1.00 .".ljust(116))
    (root / "npy-hwc").mkdir()
    np.save(root / "npy-hwc" / "scene.npy", realistic(rng, 64, size, "uint16", 65535).transpose(1, 2, 0))


def families(root: Path, side: int, crops: int, figures: dict[str, float]) -> None:
    rng = np.random.default_rng(0)
    write_sources(root / "src", side, rng)
    cat = Catalog(root / "catalog", layout=DEFAULT, read_threads=1, chunk_cache_mb=0).init()
    s512 = min(512, side)
    p128, p512 = positions(rng, side, 128, crops), positions(rng, side, s512, max(3, crops // 6))
    print(f"\n2. Format families, {side}x{side} images ({s512} px crops"
          f"{' are whole images' if s512 == side else ''}), catalog layout {DEFAULT.label()}, one decode thread; "
          "native = the project's readers on the original files, opened per crop as a loader without the "
          "catalog does; ratios are speeds, side by side as in the table above")
    print(f"{'family':10s} {'bands':>5s} {'dtype src>cat':>14s} {'disk/src':>8s} {'w128 cat/nat':>12s} "
          f"{'w128 cat/mmap':>13s} {f'w{s512} cat/mmap':>13s} {'c128 cat/npy':>12s} {f'c{s512} cat/npy':>12s}")
    w128_native, w512, c128, c512 = [], [], [], []
    for name, raw_spec in _specs().items():
        spec = parse_spec(raw_spec, f"<bench {name}>")
        folder = root / "src" / name
        item: SourceItem = item_for(folder, spec, next(p.name for p in folder.iterdir()
                                                      if p.suffix in (".hdr", ".mat", ".npy")))
        res = ingest_item(cat, spec, item)
        assert res.status == "ingested", res.message
        row = cat.row(res.image_id)
        loc = row["location"]
        options = spec.reader_options()
        src_dtype = np.dtype(spec.reader.read(item, options).data.dtype)

        def native(y: int, x: int, size: int, item: SourceItem = item, spec: Any = spec,
                   options: Any = options) -> np.ndarray:
            data = spec.reader.read(item, options).data  # a loader without the catalog opens per sample
            return np.ascontiguousarray(data[:, y:y + size, x:x + size])

        full = cat.read_image(res.image_id)
        np.save(root / f"{name}.raw.npy", full)
        raw = Raw(root / f"{name}.raw.npy")
        bands = full.shape[0]
        del full
        source_files = [str(p) for p in item.files]
        files = cat.cubes.chunk_files(loc)

        def cold(files: list[str] = files, raw: Raw = raw, loc: str = loc) -> None:
            cat.cubes.forget(loc)  # unmapped first: mapped pages are not evicted
            evict(files)
            raw.remap()

        def cat_crop(y: int, x: int, size: int, loc: str = loc) -> np.ndarray:
            return cat.read_crop(loc, y, x, size)

        def raw_crop(y: int, x: int, size: int, raw: Raw = raw) -> np.ndarray:
            return raw.crop(y, x, size)

        nat = paired(lambda y, x: cat_crop(y, x, 128), lambda y, x: native(y, x, 128), p128[: max(4, crops // 4)])
        k128 = paired(lambda y, x: cat_crop(y, x, 128), lambda y, x: raw_crop(y, x, 128), p128)
        k512 = paired(lambda y, x: cat_crop(y, x, s512), lambda y, x: raw_crop(y, x, s512), p512)
        ck128 = paired(lambda y, x: cat_crop(y, x, 128), lambda y, x: raw_crop(y, x, 128), p128[: len(p128) // 2],
                       cold)
        ck512 = paired(lambda y, x: cat_crop(y, x, s512), lambda y, x: raw_crop(y, x, s512), p512 * COLD_REPEAT,
                       cold)
        disk = dir_bytes(Path(cat.root) / loc / "cube") / sum(Path(p).stat().st_size for p in source_files)
        w128_native.append(nat)
        w512.append(k512)
        c128.append(ck128)
        c512.append(ck512)
        figures[f"warm 128 px {name}: catalog / native"] = nat
        dtypes = f"{src_dtype.str[1:]}>{row['dtype']}"
        print(f"{name:10s} {bands:5d} {dtypes:>14s} {disk:8.2f} {nat:12.2f} {k128:13.2f} {k512:13.2f} {ck128:12.2f} "
              f"{ck512:12.2f}")
        del raw
    figures["warm 128 px: catalog / native, geometric mean"] = gm(w128_native)
    what = "whole images" if s512 == side else "crops"
    figures[f"warm {s512} px {what}: catalog / raw mmap, families geometric mean"] = gm(w512)
    figures["cold 128 px crops: catalog / raw npy, families geometric mean"] = gm(c128)
    figures[f"cold {s512} px {what}: catalog / raw npy, families geometric mean"] = gm(c512)
    print(f"geometric means: warm 128 px catalog/native {gm(w128_native):.2f}x (target >= 5, and >= 1 for every "
          f"family); warm {s512} px catalog/raw mmap {gm(w512):.2f}x (target >= 0.5); cold catalog/raw npy "
          f"128 px {gm(c128):.2f}x, {s512} px {gm(c512):.2f}x (target >= 1)")


def target_of(name: str) -> tuple[str, bool] | None:
    """The target of a figure (the issue's: warm 128 px >= native per family and >= 5x geometric mean, warm 512 px
    >= 0.5x raw mmap, cold >= 1x raw .npy), or None for a figure without one."""
    if name.startswith("warm 128 px") and "geometric mean" in name:
        return ">= 5", 5.0
    if name.startswith("warm 128 px"):
        return ">= 1", 1.0
    if name.startswith("warm"):
        return ">= 0.5", 0.5
    if name.startswith("cold"):
        return ">= 1", 1.0
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--size", type=int, default=512, help="image side (px)")
    ap.add_argument("--crops", type=int, default=24, help="warm 128 px crops per ratio (cold: half; 512 px: "
                    "a sixth)")
    ap.add_argument("--quick", action="store_true", help="fewer layouts in the table")
    ap.add_argument("--json", action="store_true", help="end with the figures as one JSON line")
    args = ap.parse_args()
    figures: dict[str, float] = {}
    print(f"load average at start: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory(dir=os.environ.get("HVP_BENCH_TMP")) as tmp:
        layout_table(Path(tmp), args.size + 128, args.crops, QUICK if args.quick else LAYOUTS, figures)
        families(Path(tmp), args.size, args.crops, figures)
    print(f"load average at end: {os.getloadavg()[0]:.2f}")
    if args.json:
        out = []
        for name, value in figures.items():
            target = target_of(name)
            if target is not None:
                out.append({"name": name, "value": round(value, 3), "target": target[0],
                            "met": bool(value >= target[1])})
        print(json.dumps({"figures": out}))


if __name__ == "__main__":
    main()
