"""Ingest throughput vs a raw copy of the same bytes, and peak memory for cubes of growing size, in one run.

Both sides end with ``os.sync()`` inside their timing (the bytes are on disk, not only in the page cache); the
ingest side also reports its CPU seconds (user + system), which bound it when the cores are shared.

Targets: ingest >= 0.5x the raw copy's throughput; peak anonymous memory flat in the cube size (ingest streams tile
by tile), and a cube larger than the memory the process may allocate still ingests.

    .venv/bin/python bench/ingest.py [--mb 256] [--sizes 64,256,1024] [--limit-mb 384] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def write_npy(path: Path, megabytes: int, bands: int = 128, seed: int = 0) -> None:
    """A (y, x, band) uint16 cube of about ``megabytes``, written in row blocks (never whole in memory)."""
    side = int(np.sqrt(megabytes * 2**20 / (bands * 2)))
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint16, shape=(side, side, bands))
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 4096, (64, side, bands), dtype=np.uint16)
    for y0 in range(0, side, 64):
        rows = min(64, side - y0)
        mm[y0:y0 + rows] = base[:rows] + np.uint16(y0 % 7)
    mm.flush()
    del mm


def source(root: Path, name: str, megabytes: int) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    write_npy(folder / "cube.npy", megabytes)
    (folder / "dataset.yaml").write_text(json.dumps({
        "name": name, "format": "npy", "files": "*.npy", "options": {"axes": "yxb"},
        "wavelengths_nm": {"start": 400, "stop": 1000, "count": 128}}))
    return folder


CHILD = """
import json, os, resource, sys, threading, time
from pathlib import Path

peak = [0]
def sample():  # anonymous RSS: the process's own memory, not the page cache it maps (memmaps, mapped files)
    while True:
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                peak[0] = max(peak[0], int(line.split()[1]))
        time.sleep(0.005)
threading.Thread(target=sample, daemon=True).start()
from catalog.specs import spec_for_folder
from catalog.catalog import Catalog
from stages.ingest import ingest_item
from stages.ingest.discover import item_for
folder, catalog = Path(sys.argv[1]), sys.argv[2]
spec = spec_for_folder(folder)
t0 = time.perf_counter()
c0 = resource.getrusage(resource.RUSAGE_SELF)
res = ingest_item(Catalog(catalog).init(), spec, item_for(folder, spec, "cube.npy"))
os.sync()
dt = time.perf_counter() - t0
c1 = resource.getrusage(resource.RUSAGE_SELF)
cpu = c1.ru_utime - c0.ru_utime + c1.ru_stime - c0.ru_stime
print(json.dumps({"status": res.status, "message": res.message, "seconds": dt, "peak_anon_mb": peak[0] / 1024,
                  "peak_rss_mb": c1.ru_maxrss / 1024, "cpu_s": cpu}))
"""


def run_child(folder: Path, catalog: Path, limit_mb: int | None) -> dict:
    """Ingest one folder in a fresh process (optionally with RLIMIT_DATA) and return its timing and peak RSS."""

    def limit() -> None:
        if limit_mb:
            resource.setrlimit(resource.RLIMIT_DATA, (limit_mb * 2**20, limit_mb * 2**20))

    env = {**os.environ, "PYTHONPATH": str(REPO), "MALLOC_ARENA_MAX": "2"}
    out = subprocess.run([sys.executable, "-c", CHILD, str(folder), str(catalog)], capture_output=True, text=True,
                         env=env, preexec_fn=limit, check=False)
    if out.returncode != 0:
        return {"status": "failed", "message": out.stderr.strip().splitlines()[-1:], "seconds": float("nan"),
                "peak_anon_mb": float("nan"), "peak_rss_mb": float("nan"), "cpu_s": float("nan")}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=256, help="cube size for the throughput comparison")
    ap.add_argument("--sizes", default="64,256,1024", help="cube sizes (MB) for the memory curve")
    ap.add_argument("--limit-mb", type=int, default=384, help="RLIMIT_DATA for the larger-than-memory run")
    ap.add_argument("--json", action="store_true", help="end with the figures as one JSON line")
    args = ap.parse_args()
    print(f"load average at start: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory(dir=os.environ.get("HVP_BENCH_TMP")) as tmp:
        root = Path(tmp)
        folder = source(root / "src", "throughput", args.mb)
        nbytes = (folder / "cube.npy").stat().st_size
        (folder / "cube.npy").read_bytes()  # warm the page cache for both sides
        t0 = time.perf_counter()
        shutil.copyfile(folder / "cube.npy", root / "copy.npy")
        os.sync()
        copy_s = time.perf_counter() - t0
        res = run_child(folder, root / "cat-throughput", None)
        ingest_mb_s = nbytes / 2**20 / res["seconds"]
        copy_mb_s = nbytes / 2**20 / copy_s
        ratio = ingest_mb_s / copy_mb_s
        print(f"throughput on a {nbytes / 2**20:.0f} MB cube: ingest {ingest_mb_s:.0f} MB/s, raw copy "
              f"{copy_mb_s:.0f} MB/s -> ratio {ratio:.2f}x (target >= 0.5); ingest used {res['cpu_s']:.2f} CPU-s "
              f"= {nbytes / 2**20 / res['cpu_s']:.0f} MB per CPU-second (source hash, read + transpose, content "
              "hash, checksums, writes)")

        print(f"{'cube MB':>8s} {'peak anon MB':>13s} {'peak RSS MB':>12s} {'s':>7s}   "
              "(anon = the process's own memory; RSS also counts mapped page cache)")
        peaks = []
        sizes = [int(s) for s in args.sizes.split(",")]
        for mb in sizes:
            f = source(root / "src", f"size{mb}", mb)
            r = run_child(f, root / f"cat-{mb}", None)
            peaks.append(r["peak_anon_mb"])
            print(f"{mb:8d} {r['peak_anon_mb']:13.0f} {r['peak_rss_mb']:12.0f} {r['seconds']:7.2f}")
            shutil.rmtree(f)
        flat = peaks[-1] / peaks[0]
        print(f"peak anonymous memory, largest vs smallest cube: {flat:.2f}x "
              f"(flat = 1.0; the cube grew {sizes[-1] / sizes[0]:.0f}x)")

        big = max(int(s) for s in args.sizes.split(","))
        f = source(root / "src", "over-limit", big)
        r = run_child(f, root / "cat-limit", args.limit_mb)
        print(f"{big} MB cube with the process limited to {args.limit_mb} MB of data memory: {r['status']}"
              + (f" ({r['message']})" if r["status"] != "ingested" else f" in {r['seconds']:.1f} s"))
    print(f"load average at end: {os.getloadavg()[0]:.2f}")
    if args.json:
        print(json.dumps({"figures": [
            {"name": "ingest / raw copy throughput", "value": round(ratio, 3), "target": ">= 0.5",
             "met": ratio >= 0.5},
            {"name": "peak anonymous memory, largest / smallest cube", "value": round(flat, 3), "target": "<= 1.5",
             "met": flat <= 1.5},
            {"name": f"{big} MB cube ingests under a {args.limit_mb} MB data limit",
             "value": 1 if r["status"] == "ingested" else 0, "target": 1, "met": r["status"] == "ingested"},
        ]}))


if __name__ == "__main__":
    main()
