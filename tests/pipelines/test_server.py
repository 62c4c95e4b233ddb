"""`hvp ui` against a real `prefect server start` on loopback: a scheduled run and an event-triggered run of
`relabel-new` are created and complete, the server log holds no error, and SIGTERM leaves no process behind."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from catalog.catalog import Catalog
from catalog.fixtures import write_dataset

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for(predicate: Any, timeout: float, what: str, log: Path) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; hvp ui log:\n{log.read_text()[-4000:]}")


def _owned_pids(prefect_home: Path) -> list[int]:
    """Processes whose environment names this test's Prefect home (the server, the worker, their children)."""
    out = []
    for env in Path("/proc").glob("[0-9]*/environ"):
        try:
            if f"PREFECT_HOME={prefect_home}".encode() in env.read_bytes().split(b"\0"):
                out.append(int(env.parent.name))
        except OSError:
            continue
    return [p for p in out if p != os.getpid()]


def start_hvp_ui(work: Path, port: int, log: Path, env: dict[str, str], *args: str) -> subprocess.Popen[bytes]:
    """`hvp ui` on ``work`` and ``port`` in its own session, its output in ``log``; returns once it printed the URL
    (or failed: the caller asserts it runs)."""
    with log.open("wb") as fh:
        ui = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "ui", "--workdir", str(work), "--port",
                               str(port), *args], cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT,
                              start_new_session=True)
    _wait_for(lambda: "Prefect UI:" in log.read_text() or ui.poll() is not None, 600, "hvp ui to start", log)
    return ui


@pytest.mark.integration
def test_schedule_and_arrival_trigger_fire_on_a_real_server(tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
    from prefect.client.schemas.schedules import IntervalSchedule
    from prefect.settings import PREFECT_API_URL, temporary_settings

    work, port = tmp_path / "hvp", _free_port()
    sources = work / "sources"
    write_dataset("hsi-road", sources)  # present at start: the schedule picks it up, the watcher does not
    env = {**os.environ, "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2", "PREFECT_WORKER_QUERY_SECONDS": "2",
           "PREFECT_WORKER_PREFETCH_SECONDS": "5", "PREFECT_LOGGING_LEVEL": "INFO"}
    env.pop("PREFECT_API_URL", None)
    log = tmp_path / "hvp-ui.log"
    with log.open("wb") as fh:
        ui = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "ui", "--workdir", str(work), "--port",
                               str(port), "--watch-interval", "1"], cwd=REPO, env=env, stdout=fh,
                              stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_for(lambda: "Prefect UI:" in log.read_text() or ui.poll() is not None, 600, "hvp ui to start", log)
        assert ui.poll() is None, log.read_text()

        async def relabel_runs() -> list[Any]:
            async with get_client() as client:
                return await client.read_flow_runs(deployment_filter=DeploymentFilter(
                    name=DeploymentFilterName(any_=["relabel-new"])))

        async def add_schedule() -> tuple[Any, Any]:
            async with get_client() as client:
                dep = await client.read_deployment_by_name("relabel-new/relabel-new")
                sched = await client.create_deployment_schedules(
                    dep.id, [(IntervalSchedule(interval=timedelta(seconds=10)), True)], max_scheduled_runs=1)
                return dep.id, sched[0].id

        async def pause_schedule(dep_id: Any, sched_id: Any) -> None:
            async with get_client() as client:
                await client.update_deployment_schedule(dep_id, sched_id, active=False)

        def run_state(kind: str) -> Any:
            runs = asyncio.run(relabel_runs())
            if kind == "scheduled":
                runs = [r for r in runs if "auto-scheduled" in r.tags]
            else:
                runs = [r for r in runs if r.created_by is not None and r.created_by.type == "AUTOMATION"]
            done = [r for r in runs if r.state is not None and r.state.is_final()]
            return done[0] if done else None

        with temporary_settings(updates={PREFECT_API_URL: f"{url}/api"}):
            dep_id, sched_id = asyncio.run(add_schedule())
            scheduled = _wait_for(lambda: run_state("scheduled"), 900, "a scheduled relabel-new run to finish", log)
            asyncio.run(pause_schedule(dep_id, sched_id))
            assert scheduled.state.is_completed(), scheduled.state
            cat = Catalog(str(work / "catalog"))
            assert set(cat.images()["dataset"]) == {"hsi-road"}

            write_dataset("cave", sources)  # arrives: the watcher emits hvp.dataset.arrived, the trigger fires
            triggered = _wait_for(lambda: run_state("triggered"), 900, "a triggered relabel-new run to finish", log)
            assert triggered.state.is_completed(), triggered.state
            assert "dataset arrived" in log.read_text()
            assert set(Catalog(str(work / "catalog")).images()["dataset"]) == {"hsi-road", "cave"}
            for image_id in Catalog(str(work / "catalog")).images("cave")["image_id"]:
                assert len(cat.fused(image_id)) >= 1
    finally:
        if ui.poll() is None:
            os.kill(ui.pid, signal.SIGTERM)
        ui.wait(120)
    text = log.read_text()
    assert "SIGTERM: stopping" in text and "stopped server" in text and "stopped worker" in text
    server_log = (work / "logs" / "server.log").read_text()
    errors = [line for line in server_log.splitlines() if re.search(r"\bERROR\b|Traceback|Exception", line)]
    assert not errors, "\n".join(errors[:20])
    assert not _owned_pids(work / "prefect"), "hvp ui left processes behind"
    from pipelines.ui import port_free

    assert port_free("127.0.0.1", port)  # nothing listens on the server's port any more


@pytest.mark.integration
def test_hvp_ui_killed_with_kill_9_leaves_no_server_or_worker(tmp_path: Path) -> None:
    work, port = tmp_path / "hvp", _free_port()
    write_dataset("hsi-road", work / "sources")
    env = {**os.environ}
    env.pop("PREFECT_API_URL", None)
    log = tmp_path / "hvp-ui.log"
    ui = start_hvp_ui(work, port, log, env)
    try:
        assert ui.poll() is None, log.read_text()
        assert len(_owned_pids(work / "prefect")) >= 2  # the server and the worker run
    finally:
        os.kill(ui.pid, signal.SIGKILL)  # no chance to stop its children itself
        ui.wait(30)
    _wait_for(lambda: not _owned_pids(work / "prefect"), 120, "the server and the worker to stop", log)
    from pipelines.ui import port_free

    _wait_for(lambda: port_free("127.0.0.1", port), 60, "the server's port to be free", log)
