"""Long runs on a real `prefect server start` (through `hvp ui`): a flow run whose process is killed with kill -9 is
marked Crashed by the automation `hvp ui` creates once its heartbeats stop, and a live flow run that lasts more than
one window is never touched and completes."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest

from catalog.fixtures import write_dataset
from tests.pipelines.test_server import _free_port, _owned_pids, _wait_for, start_hvp_ui

REPO = Path(__file__).resolve().parents[2]
WINDOW_S = 70  # HVP_CRASHED_AFTER_S: more than twice the heartbeat period, as hvp ui requires
HEARTBEAT_S = 30  # PREFECT_FLOWS_HEARTBEAT_FREQUENCY: Prefect's minimum

# A flow that prints its run id, then waits: what a long pretraining run looks like to the server.
FLOW = """
import sys, time
from prefect import flow
from prefect.runtime import flow_run

@flow(name="hvp-heartbeat-probe")
def probe(seconds: float) -> float:
    print("flow run id", flow_run.id, flush=True)
    time.sleep(seconds)
    return seconds

probe(float(sys.argv[1]))
"""


def _start_flow(seconds: float, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as fh:
        return subprocess.Popen([sys.executable, "-c", FLOW, str(seconds)], cwd=REPO, env=env, stdout=fh,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _run_id(log: Path) -> UUID | None:
    for line in log.read_text().splitlines():
        if line.startswith("flow run id "):
            return UUID(line.split()[-1])
    return None


def _states(run_id: UUID) -> list[Any]:
    from prefect.client.orchestration import get_client

    async def read() -> list[Any]:
        async with get_client() as client:
            return await client.read_flow_run_states(run_id)

    return asyncio.run(read())


@pytest.mark.integration
@pytest.mark.slow
def test_a_dead_run_is_marked_crashed_and_a_live_long_run_is_not(tmp_path: Path) -> None:
    from prefect.automations import Automation
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from pipelines.automations import CRASHED_RUNS

    work, port = tmp_path / "hvp", _free_port()
    write_dataset("hsi-road", work / "sources")
    env = {**os.environ, "HVP_CRASHED_AFTER_S": str(WINDOW_S), "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_S)}
    env.pop("PREFECT_API_URL", None)
    log = tmp_path / "hvp-ui.log"
    ui = start_hvp_ui(work, port, log, env)
    url = f"http://127.0.0.1:{port}"
    flows: list[subprocess.Popen[bytes]] = []
    try:
        assert ui.poll() is None, log.read_text()
        assert f"without a heartbeat for {WINDOW_S} s are marked Crashed (created)" in log.read_text()
        flow_env = {**env, "PREFECT_API_URL": f"{url}/api", "PREFECT_HOME": str(work / "prefect")}
        live_s = 1.6 * WINDOW_S  # outlives a window only if its later heartbeats renew it
        live_log, dead_log = tmp_path / "live.log", tmp_path / "dead.log"
        flows = [_start_flow(live_s, flow_env, live_log), _start_flow(3600, flow_env, dead_log)]
        live, dead = flows
        dead_id = _wait_for(lambda: _run_id(dead_log), 120, "the doomed run to start", dead_log)
        live_id = _wait_for(lambda: _run_id(live_log), 120, "the live run to start", live_log)
        with temporary_settings(updates={PREFECT_API_URL: f"{url}/api"}):
            automation = Automation.read(name=CRASHED_RUNS)
            assert automation.trigger.within.total_seconds() == WINDOW_S  # type: ignore[attr-defined]
            time.sleep(3)  # its first heartbeat has been sent (the heartbeat thread starts with the run)
            os.killpg(dead.pid, signal.SIGKILL)  # the machine dies: no state is reported
            killed_at = time.monotonic()
            crashed = _wait_for(lambda: [s for s in _states(dead_id) if s.type.value == "CRASHED"], WINDOW_S + 120,
                                "the killed run to be marked Crashed", log)
            waited = time.monotonic() - killed_at
            assert "no heartbeat for" in (crashed[0].message or "")
            assert waited <= WINDOW_S + 60, waited  # at most the window after its last heartbeat, and the tick

            assert live.wait(timeout=live_s + 240) == 0, live_log.read_text()
            live_states = [s.type.value for s in _states(live_id)]
            assert live_states[-1] == "COMPLETED" and "CRASHED" not in live_states, live_states
    finally:
        for proc in flows:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        if ui.poll() is None:
            os.kill(ui.pid, signal.SIGTERM)
        ui.wait(120)
    _wait_for(lambda: not _owned_pids(work / "prefect"), 120, "the server and the worker to stop", log)


def test_a_window_shorter_than_two_heartbeats_is_refused() -> None:
    from pipelines.automations import check_window

    check_window(600, None)  # Prefect's default period, 180 s
    check_window(60, 30)
    with pytest.raises(ValueError, match="HVP_CRASHED_AFTER_S=300 .* at least 360"):
        check_window(300, None)


def test_the_automation_crashes_flow_runs_silent_for_the_window() -> None:
    from pipelines.automations import crashed_runs_automation

    auto: Any = crashed_runs_automation(90)
    trigger = auto.trigger
    assert trigger.posture.value == "Proactive" and trigger.within.total_seconds() == 90
    assert trigger.after == {"prefect.flow-run.heartbeat"} and "prefect.flow-run.Completed" in trigger.expect
    assert trigger.for_each == {"prefect.resource.id"}  # one window per flow run
    assert auto.actions[0].state.value == "CRASHED"


def test_hvp_automations_needs_a_server_and_a_safe_window(monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from infra.settings import get_settings
    from pipelines.cli import app

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    res = CliRunner().invoke(app, ["automations"])
    assert res.exit_code == 2 and "PREFECT_API_URL is not set" in res.output
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # nothing is asked of it: the window is wrong
    monkeypatch.setenv("HVP_CRASHED_AFTER_S", "100")
    get_settings.cache_clear()
    try:
        res = CliRunner().invoke(app, ["automations"])
    finally:
        get_settings.cache_clear()
    assert res.exit_code == 2 and "HVP_CRASHED_AFTER_S=100" in res.output and "at least 360" in res.output
