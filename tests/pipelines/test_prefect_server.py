"""The temporary Prefect server of a CLI run does not outlive the CLI, even when the CLI is killed with kill -9."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from catalog.fixtures import write_dataset

REPO = Path(__file__).resolve().parents[2]


LINUX = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")

PARENT = """
import os, subprocess, sys, time
from infra.prefect_server import _die_with_parent
parent = os.getpid()
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                         preexec_fn=lambda: _die_with_parent(parent))
print(child.pid, flush=True)
time.sleep(600)
"""


@LINUX
def test_a_bound_child_dies_with_its_killed_parent() -> None:
    parent = subprocess.Popen([sys.executable, "-c", PARENT], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    child = psutil.Process(int(parent.stdout.readline()))
    try:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        gone, _ = psutil.wait_procs([child], timeout=10)
        assert gone, "the child outlived its killed parent"
    finally:
        if child.is_running():
            child.kill()


def _cmdline(proc: psutil.Process) -> str:
    """A process's command line, or "" for one that ended (or is a zombie) while the children were listed."""
    try:
        return " ".join(proc.cmdline())
    except (psutil.ZombieProcess, psutil.NoSuchProcess, psutil.AccessDenied):
        return ""


@LINUX
@pytest.mark.integration
def test_killed_cli_takes_its_temporary_server_along(tmp_path: Path) -> None:
    for slug in ("cave", "harvard", "hyperspectral-city-v2"):
        write_dataset(slug, tmp_path / "src")
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / "prefect")
    cli = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "ingest", str(tmp_path / "src"), "--catalog",
                            str(tmp_path / "cat")], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    server: psutil.Process | None = None
    try:
        t0 = time.monotonic()
        while server is None and time.monotonic() - t0 < 120 and cli.poll() is None:
            server = next((p for p in psutil.Process(cli.pid).children(recursive=True)
                           if "uvicorn" in _cmdline(p)), None)
            time.sleep(0.1)
        assert server is not None, "the CLI started no temporary server"
        assert cli.poll() is None, "the CLI finished before it could be killed"
        cli.send_signal(signal.SIGKILL)
        cli.wait()
        gone, _ = psutil.wait_procs([server], timeout=15)
        assert gone, f"temporary server {server.pid} outlived the killed CLI"
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()
        if server is not None and server.is_running():
            server.kill()
