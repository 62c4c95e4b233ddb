"""An authenticated Prefect server: with HVP_SERVER_AUTH set, the servers this project starts refuse requests without
the credential and its clients (CLI flows, the worker, the watcher, the prefect commands) send it; without one,
nothing binds beyond loopback. The credential never appears in output or logs."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from catalog.fixtures import write_dataset
from infra.prefect_server import auth_env, is_loopback
from infra.settings import Settings
from pipelines.ui import serve_ui, ui_env

REPO = Path(__file__).resolve().parents[2]
SECRET = "hvp:s3cret-for-tests"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _status(url: str, auth: str | None = None, body: Any = None) -> tuple[int, Any]:
    """(HTTP status, decoded JSON or None) of a GET (no body) or a POST of ``body``."""
    headers = {"Content-Type": "application/json"}
    if auth is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers=headers, method="GET" if body is None else "POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as r:  # noqa: S310 (loopback)
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, None


def test_a_credential_is_a_secret_and_reaches_server_and_clients() -> None:
    settings = Settings(server_auth=SECRET)
    assert "s3cret" not in repr(settings) and "s3cret" not in str(settings.model_dump())
    env = ui_env("http://127.0.0.1:4200", Path("/tmp/home"), Path("/tmp/src"), "/tmp/cat", settings)
    assert env["PREFECT_SERVER_API_AUTH_STRING"] == env["PREFECT_API_AUTH_STRING"] == SECRET
    assert auth_env(Settings(server_auth=None)) == {} and auth_env(Settings(server_auth="")) == {}


@pytest.mark.parametrize(("host", "loopback"), [("127.0.0.1", True), ("127.8.0.1", True), ("::1", True),
                                                ("[::1]", True), ("localhost", True), ("0.0.0.0", False),
                                                ("::", False), ("10.1.2.3", False), ("gpu-box.lan", False)])
def test_loopback_addresses(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_ui_refuses_to_bind_beyond_loopback_without_a_credential(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    status = serve_ui(tmp_path, port=_free_port(), host="0.0.0.0", settings=Settings(server_auth=None))
    assert status == 2
    out = capsys.readouterr().out
    assert "refusing to serve on 0.0.0.0" in out and "HVP_SERVER_AUTH" in out
    assert not (tmp_path / "logs").exists()  # nothing was started


TEMPORARY = """
import json, sys
from infra.prefect_server import start_temporary_server
api = start_temporary_server()
from prefect import flow
from prefect.client.orchestration import get_client

@flow
def add(a: int, b: int) -> int:
    return a + b

result = add(2, 3)
with get_client(sync_client=True) as client:
    runs = [(r.name, r.state.type.value) for r in client.read_flow_runs()]
print(json.dumps({"api": api, "result": result, "runs": runs}), flush=True)
sys.stdin.readline()  # the server lives until the test has probed it
"""


@pytest.mark.integration
def test_a_temporary_server_refuses_strangers_and_runs_an_authenticated_flow(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "PREFECT_SERVER_API"))}
    env.update(HVP_SERVER_AUTH=SECRET, PREFECT_HOME=str(tmp_path / "prefect"), PYTHONPATH=str(REPO),
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="300")  # a fresh database migrates first
    proc = subprocess.Popen([sys.executable, "-c", TEMPORARY], cwd=REPO, env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        line = proc.stdout.readline()
        assert line, proc.stderr.read() if proc.stderr else ""
        out = json.loads(line)
        assert out["result"] == 5 and [state for _, state in out["runs"]] == ["COMPLETED"]
        api = out["api"]
        assert _status(f"{api}/flows/filter", body={})[0] == 401
        assert _status(f"{api}/flows/filter", auth="hvp:wrong", body={})[0] == 401
        status, flows = _status(f"{api}/flows/filter", auth=SECRET, body={})
        assert status == 200 and [f["name"] for f in flows] == ["add"]
        assert _status(f"{api}/health")[0] == 200  # probes stay open
    finally:
        proc.stdin.close()
        proc.wait(60)
        stderr = proc.stderr.read() if proc.stderr else ""
    assert proc.returncode == 0, stderr
    assert "s3cret" not in line + stderr


@pytest.mark.integration
def test_hvp_ui_with_a_credential_serves_only_authenticated_clients(tmp_path: Path) -> None:
    work, port = tmp_path / "hvp", _free_port()
    write_dataset("hsi-road", work / "sources")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "PREFECT_SERVER_API"))}
    env["HVP_SERVER_AUTH"] = SECRET
    log = tmp_path / "hvp-ui.log"
    with log.open("wb") as fh:
        ui = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "ui", "--workdir", str(work), "--port",
                               str(port), "--watch-interval", "1"], cwd=REPO, env=env, stdout=fh,
                              stderr=subprocess.STDOUT, start_new_session=True)
    api = f"http://127.0.0.1:{port}/api"

    def wait_for(predicate: Any, timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if value := predicate():
                return value
            time.sleep(2)
        raise AssertionError(f"timed out waiting for {what}; hvp ui log:\n{log.read_text()[-4000:]}")

    try:
        wait_for(lambda: "Prefect UI:" in log.read_text() or ui.poll() is not None, 600, "hvp ui to start")
        assert ui.poll() is None, log.read_text()
        assert "basic authentication" in log.read_text()
        assert _status(f"{api}/deployments/filter", body={})[0] == 401
        status, deployments = _status(f"{api}/deployments/filter", auth=SECRET, body={})
        assert status == 200 and {"hypervision", "relabel-new"} <= {d["name"] for d in deployments}  # prefect deploy
        workers = wait_for(lambda: _status(f"{api}/work_pools/local/workers/filter", auth=SECRET, body={})[1],
                           120, "the worker's heartbeat")
        assert workers  # the worker reached the server with the credential
        write_dataset("cave", work / "sources")  # arrives: the watcher emits its event, with the credential

        def arrivals() -> list[Any]:
            _, page = _status(f"{api}/events/filter", auth=SECRET,
                              body={"filter": {"event": {"name": ["hvp.dataset.arrived"]}}})
            return (page or {}).get("events", [])

        (event,) = wait_for(arrivals, 120, "the watcher's event")
        assert event["payload"]["dataset"] == "cave"
    finally:
        if ui.poll() is None:
            os.kill(ui.pid, signal.SIGTERM)
        ui.wait(120)
    texts = [log.read_text(), *(p.read_text(errors="replace") for p in (work / "logs").glob("*.log"))]
    assert not any("s3cret" in t for t in texts), "the credential was written to a log"
