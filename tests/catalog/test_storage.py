"""Crash safety of the catalog's file layer and of verify: writer leases tell a dead writer's temporaries from a
live one's, locks die with their holder, verify reports every damaged image without stopping, repair re-ingests
or quarantines, and checksums catch bytes that still decode."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numcodecs
import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from base.errors import CatalogError, CorruptChunkError
from catalog.catalog import INDEX_SCHEMA, Catalog
from catalog.cubes.writer import CubeWrite
from catalog.storage import Lease, Storage
from pipelines.cli import app

REPO = Path(__file__).resolve().parents[2]


def _write(cat: Catalog, image: str, data: np.ndarray, sha: str) -> dict:
    return cat.write_cube(CubeWrite(dataset="ds", image_id=f"ds/{image}", key=image, sha256=sha, data=data,
                                    wavelength_nm=np.linspace(400, 700, data.shape[0]),
                                    attrs={"source_path": f"/src/{image}.npy"}))


def _cube(seed: int, shape: tuple[int, int, int] = (6, 24, 24)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 4000, shape).astype(np.uint16)


def _wait_for(predicate: object, timeout: float = 60.0) -> None:
    t0 = time.monotonic()
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() - t0 < timeout, "timed out"
        time.sleep(0.05)


SLOW_WRITER = textwrap.dedent("""
    import sys, time
    import numpy as np
    from catalog.catalog import Catalog
    from catalog.cubes.writer import CubeWrite

    class Slow:  # a lazy source that takes its time: the write is still going when it is killed
        shape, dtype = (4, 64, 64), np.dtype("uint16")
        def __getitem__(self, key):
            time.sleep(0.5)
            return np.ones(self.shape, self.dtype)[key]

    Catalog.TILE_BYTES = 4 * 8 * 8 * 2
    cat = Catalog(sys.argv[1], chunk_xy=8)
    cat.write_cube(CubeWrite(dataset="ds", image_id="ds/slow", key="slow", sha256="5" * 64, data=Slow(),
                             wavelength_nm=np.linspace(400, 700, 4), attrs={}))
""")


def test_killed_writer_temporaries_are_stale_and_removed_live_ones_kept(tmp_path: Path) -> None:
    cat = Catalog(tmp_path / "cat").init()
    _write(cat, "kept", _cube(0), "a" * 64)
    proc = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, str(tmp_path / "cat")], cwd=REPO)
    try:
        _wait_for(lambda: list((tmp_path / "cat" / "cubes" / "ds").glob("slow@*.zarr.tmp-*")))
        [tmp] = [p.name for p in (tmp_path / "cat" / "cubes" / "ds").glob("slow@*.zarr.tmp-*")]
        report = cat.verify()
        assert report.in_progress == [f"cubes/ds/{tmp}"] and not report.stale and report.healthy
        cat.compact()  # a live writer's temporary survives compaction
        assert (tmp_path / "cat" / "cubes" / "ds" / tmp).is_dir()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    report = cat.verify()
    assert report.stale == [f"cubes/ds/{tmp}"] and not report.in_progress and report.healthy
    cat.compact()
    assert not (tmp_path / "cat" / "cubes" / "ds" / tmp).exists()
    assert os.listdir(tmp_path / "cat" / "leases") == [f"{Lease.current().id}.json"]  # the dead writer's is gone
    after = cat.verify()
    assert after.healthy and not after.stale and after.ok == 1


def test_leases_know_dead_reused_and_remote_writers() -> None:
    me = Lease.current()
    assert me.alive()
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    assert not Lease(int(child.stdout), me.host, me.started).alive()  # that process is gone
    assert not Lease(me.pid, me.host, me.started - 100).alive()  # same pid, another process (reused pid)
    remote = f"{socket.gethostname()}-elsewhere"
    assert Lease(1, remote, 0.0, renewed=time.time()).alive()
    assert not Lease(1, remote, 0.0, renewed=time.time() - 7200).alive()


HOLDER = textwrap.dedent("""
    import sys, time
    from catalog.storage import Storage
    with Storage(sys.argv[1]).lock("ingest/ds/img"):
        print("held", flush=True)
        time.sleep(600)
""")


def test_a_lock_dies_with_its_killed_holder(tmp_path: Path) -> None:
    storage = Storage(tmp_path / "cat")
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / "cat")], cwd=REPO, stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        with pytest.raises(CatalogError, match="still held"), storage.lock("ingest/ds/img", timeout=0.3):
            pass
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with storage.lock("ingest/ds/img", timeout=5) as waited:
        assert waited < 5


def _chunk_files(root: Path, location: str) -> list[Path]:
    return sorted(p for p in (root / location / "cube").rglob("*") if p.is_file() and p.name != "zarr.json")


def test_verify_reports_every_damaged_image_and_goes_on(tmp_path: Path) -> None:
    cat = Catalog(tmp_path / "cat", chunk_xy=8).init()
    rows = {name: _write(cat, name, _cube(i), str(i) * 64) for i, name in enumerate(["a", "b", "c", "d"])}
    root = tmp_path / "cat"
    _chunk_files(root, rows["b"]["location"])[0].write_bytes(b"\x02\x01garbage, not a blosc frame")
    _chunk_files(root, rows["c"]["location"])[0].unlink()
    import shutil

    shutil.rmtree(root / rows["d"]["location"])
    report = cat.verify()
    assert report.ok == 1 and not report.healthy
    by_id = {p.image_id: p for p in report.problems}
    assert set(by_id) == {"ds/b", "ds/c", "ds/d"}
    assert by_id["ds/b"].kind == "corrupt" and by_id["ds/c"].kind == "corrupt" and by_id["ds/d"].kind == "missing"
    assert by_id["ds/b"].message  # what the decoder said, in one line
    res = CliRunner().invoke(app, ["catalog", "verify", "--catalog", str(root), "--json"])
    assert res.exit_code == 1, res.output
    out = json.loads(res.output)
    assert out["corrupt"] == ["ds/b", "ds/c"] and out["missing"] == ["ds/d"] and out["ok"] == 1
    human = CliRunner().invoke(app, ["catalog", "verify", "--catalog", str(root)])
    assert human.exit_code == 1 and "ds/b" in human.output and "Traceback" not in human.output


def test_verify_repair_reingests_unchanged_sources_and_quarantines_changed_ones(tmp_path: Path) -> None:
    src = tmp_path / "src" / "cam"
    src.mkdir(parents=True)
    (src / "dataset.yaml").write_text(yaml.safe_dump({"name": "cam", "format": "npy", "files": "*.npy",
                                                      "options": {"axes": "byx"},
                                                      "wavelengths_nm": [450.0, 500.0, 550.0, 600.0, 650.0, 700.0]}))
    for i in range(3):
        np.save(src / f"c{i}.npy", _cube(i))
    catalog = str(tmp_path / "cat")
    runner = CliRunner()
    assert runner.invoke(app, ["ingest", str(tmp_path / "src"), "--catalog", catalog, "--plain"]).exit_code == 0
    cat = Catalog(catalog)
    for image in ("cam/c0", "cam/c1"):  # damage two cubes
        chunk = _chunk_files(Path(catalog), cat.row(image)["location"])[0]
        chunk.write_bytes(chunk.read_bytes()[:10])
    np.save(src / "c1.npy", _cube(9))  # and change the source of one of them
    res = runner.invoke(app, ["catalog", "verify", "--catalog", catalog, "--repair", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["before"]["corrupt"] == ["cam/c0", "cam/c1"] and out["after"]["healthy"]
    actions = {r["image_id"]: r["action"] for r in out["repairs"]}
    assert actions == {"cam/c0": "reingested", "cam/c1": "quarantined"}
    cat = Catalog(catalog)
    np.testing.assert_array_equal(cat.open("cam/c0").values, _cube(0))
    raw = cat.storage.read_table("index", INDEX_SCHEMA)[0].to_pandas()
    assert sorted(raw["image_id"]) == ["cam/c0", "cam/c2"]  # no second row for the repaired image
    q = cat.quarantine()
    assert list(q["source_path"]) == [str(src / "c1.npy")] and "changed" in q.iloc[0]["message"]
    again = runner.invoke(app, ["ingest", str(tmp_path / "src"), "--catalog", catalog, "--plain"])
    assert again.exit_code == 0 and np.array_equal(Catalog(catalog).open("cam/c1").values, _cube(9))


def _flip_a_byte_that_still_decodes(chunk: Path) -> None:
    """Change one value of a chunk and re-encode it with its own framing, so a decoder alone cannot tell."""
    raw = chunk.read_bytes()
    try:
        values = np.frombuffer(numcodecs.Blosc().decode(raw), dtype=np.uint16).copy()  # a Blosc frame
    except Exception:  # plain bytes: any flipped byte decodes
        flipped = bytearray(raw)
        flipped[len(raw) // 2] ^= 0x10
        chunk.write_bytes(bytes(flipped))
        return
    values[values.size // 2] ^= 0x10
    chunk.write_bytes(numcodecs.Blosc(cname="lz4", clevel=5, shuffle=numcodecs.Blosc.BITSHUFFLE).encode(values))


def test_a_flipped_byte_that_still_decodes_is_caught(tmp_path: Path) -> None:
    cat = Catalog(tmp_path / "cat", chunk_xy=8).init()
    data = _cube(0)
    row = _write(cat, "img", data, "a" * 64)
    chunk = _chunk_files(tmp_path / "cat", row["location"])[0]
    _flip_a_byte_that_still_decodes(chunk)
    with pytest.raises(CorruptChunkError) as err:
        Catalog(tmp_path / "cat").open("ds/img").values  # noqa: B018  (the read is the point)
    assert err.value.image_id == "ds/img"
    with pytest.raises(CorruptChunkError):
        Catalog(tmp_path / "cat").read_crop(row["location"], 0, 0, 8)
