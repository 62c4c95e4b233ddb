"""Pretraining across processes and nodes: each rank reads a disjoint shard of the catalog per epoch; torchrun
with a c10d rendezvous of two "nodes" over loopback (gloo); a killed rank is restarted and resumes from the last
checkpoint."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from pathlib import Path

import pytest

from stages.pretraining.data import BandSignatureBatchSampler
from stages.pretraining.launch import torchrun_command
from tests.stages.test_pretrain import _rows, catalog_uri, one_thread, tiny_config  # noqa: F401 (fixtures)

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("sizes", "world", "batch"), [((8, 4, 12), 2, 2), ((5, 3, 9), 2, 2), ((7,), 3, 1)])
def test_ranks_read_disjoint_shards_covering_the_catalog_each_epoch(sizes: tuple[int, ...], world: int,
                                                                   batch: int) -> None:
    sigs = [f"sig{g}" for g, n in enumerate(sizes) for _ in range(n)]
    ranks = [BandSignatureBatchSampler(sigs, batch, 10_000, seed=3, rank=r, world_size=world) for r in range(world)]
    spe = ranks[0].steps_per_epoch
    need = world * batch
    assert spe == sum(-(-n // need) for n in sizes)
    for epoch in range(3):
        per_rank = [[i for s in range(epoch * spe, (epoch + 1) * spe) for i, _ in r.batch(s)] for r in ranks]
        read = [i for images in per_rank for i in images]
        assert sorted(set(read)) == list(range(len(sigs)))  # none missed
        padding = sum(-n % need for n in sizes)
        assert len(read) - len(set(read)) == padding  # none twice, but DistributedSampler's padding
        if not padding:
            assert all(not set(a) & set(b) for k, a in enumerate(per_rank) for b in per_rank[k + 1:])  # disjoint
    first = [ranks[0].batch(s) for s in range(spe)]
    assert first != [ranks[0].batch(s) for s in range(spe, 2 * spe)]  # a fresh order each epoch


def test_torchrun_command_names_a_rendezvous_for_several_nodes(tmp_path: Path) -> None:
    one = torchrun_command(tmp_path / "c.json", 4)
    assert "--standalone" in one and "--rdzv-endpoint" not in one
    two = torchrun_command(tmp_path / "c.json", 8, nnodes=2, rdzv_endpoint="node0:29400", max_restarts=3)
    assert "--standalone" not in two
    assert two[two.index("--rdzv-endpoint") + 1] == "node0:29400" and two[two.index("--nnodes") + 1] == "2"
    assert two[two.index("--rdzv-backend") + 1] == "c10d" and two[two.index("--max-restarts") + 1] == "3"
    with pytest.raises(ValueError, match="rendezvous endpoint"):
        torchrun_command(tmp_path / "c.json", 8, nnodes=2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _config_file(catalog: str, out: Path, **kw: object) -> Path:
    out.mkdir(parents=True)
    path = out.parent / f"{out.name}.json"
    path.write_text(json.dumps(tiny_config(catalog, out, **kw).to_dict()))
    return path


@pytest.mark.slow
@pytest.mark.integration
def test_two_nodes_meet_at_a_c10d_rendezvous_over_loopback(catalog_uri: str, tmp_path: Path) -> None:  # noqa: F811
    out = tmp_path / "run"
    cfg = _config_file(catalog_uri, out, steps=4)
    cmd = torchrun_command(cfg, 1, nnodes=2, rdzv_endpoint=f"127.0.0.1:{_free_port()}", rdzv_id="test-2n")
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}
    nodes = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]  # two "machines": one torchrun each, one rank each
    logs = [p.communicate(timeout=600)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], logs
    result = json.loads((out / "result.json").read_text())
    assert result["world_size"] == 2 and result["steps_done"] == 4
    assert [r["step"] for r in _rows(out)] == [str(s) for s in range(4)]  # rank 0 alone writes


@pytest.mark.slow
@pytest.mark.integration
def test_a_killed_rank_is_restarted_and_resumes_from_the_last_checkpoint(catalog_uri: str,  # noqa: F811
                                                                         tmp_path: Path) -> None:
    import psutil

    out = tmp_path / "run"
    steps = 40
    cfg = _config_file(catalog_uri, out, steps=steps, checkpoint_every=2)
    # more than one restart allowed: on a loaded machine the first restart may miss its gloo connect window
    cmd = torchrun_command(cfg, 2, max_restarts=3)
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}
    log = tmp_path / "torchrun.log"
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while not (out / "checkpoints" / "latest").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        ranks = [c for c in psutil.Process(proc.pid).children(recursive=True)
                 if "stages.pretraining.launch" in " ".join(c.cmdline())]
        assert len(ranks) == 2 and proc.poll() is None, log.read_text()
        ranks[-1].kill()  # SIGKILL one rank mid-run
        try:
            code = proc.wait(timeout=420)
        except subprocess.TimeoutExpired:
            for p in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
                p.kill()
            pytest.fail(f"torchrun did not end within 420 s of the kill:\n{log.read_text()[-6000:]}")
        assert code == 0, log.read_text()
    text = log.read_text()
    assert "resuming from the last checkpoint" in text and "Resumed" in text
    result = json.loads((out / "result.json").read_text())
    assert result["world_size"] == 2 and result["steps_done"] == steps
    assert [r["step"] for r in _rows(out)] == [str(s) for s in range(steps)]  # each step logged once, in order
