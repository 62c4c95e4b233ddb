"""`hvp ui`: a local Prefect server with the pipeline's deployments, a worker and the dataset-arrival watcher.

It starts `prefect server start --host 127.0.0.1`, creates the `local` process work pool and one concurrency limit
of one slot per GPU (`gpu:<host>:<index>`), registers every deployment of prefect.yaml without questions, creates
the automation that marks flow runs without heartbeats Crashed (pipelines.automations), makes the fixture sources
when the source root is empty, starts a worker and the watcher, prints the URL, and on Ctrl-C or SIGTERM stops
everything it started (each child runs in its own process group, so the server's own children go with it). Killed
outright (``kill -9``), it cannot stop them itself: each child gets SIGTERM from the kernel then (Linux's parent-
death signal) and stops its own children.

Paths and the server credential come from the settings (``HVP_SOURCE_ROOT``, ``HVP_CATALOG``, ``HVP_SERVER_AUTH``).
With a credential the server requires Prefect's basic authentication and the worker, the watcher and the prefect
commands send it; without one it binds loopback only.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from infra.settings import Settings, get_settings

#: The repository root: where prefect.yaml lives and where deployments run.
PROJECT_ROOT = Path(__file__).resolve().parents[1]


class Stop(Exception):
    """Raised in the main thread by SIGTERM/SIGINT: time to stop the children."""


@dataclass
class Children:
    """Processes started by `hvp ui`, each the leader of its own process group."""

    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    logs: dict[str, Path] = field(default_factory=dict)

    def start(self, name: str, cmd: Sequence[str], env: dict[str, str], log: Path, cwd: Path) -> None:
        """Start ``cmd`` in a new session (its own process group), output to ``log``."""
        from infra.prefect_server import die_with_parent

        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as fh:  # SIGTERM reaches the child even when `hvp ui` itself is killed with kill -9
            self.procs[name] = subprocess.Popen(list(cmd), env=env, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL, start_new_session=True,
                                                preexec_fn=die_with_parent())
        self.logs[name] = log

    def dead(self) -> list[str]:
        """Names of children that exited."""
        return [n for n, p in self.procs.items() if p.poll() is not None]

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM every child's process group (last started first), then SIGKILL what is left after ``timeout``."""
        for name, proc in reversed(list(self.procs.items())):
            _signal_group(proc, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                print(f"{name} did not stop within {timeout:.0f} s: killing it", flush=True)
            _signal_group(proc, signal.SIGKILL)  # whatever of the group is left (uvicorn children, runs)
            proc.wait()
            print(f"stopped {name}", flush=True)
        self.procs.clear()


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise Stop(signal.Signals(signum).name)


def port_free(host: str, port: int) -> bool:
    """Whether ``host:port`` can be bound as a server binds it (nothing else listens there; connections of a
    stopped server lingering in TIME_WAIT do not count)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def wait_healthy(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 180.0) -> None:
    """Wait until the server answers ``<url>/api/health``; a server that exits or never answers is an error that
    names its log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the Prefect server exited with {proc.returncode}; see {log}")
        try:
            with urllib.request.urlopen(f"{url}/api/health", timeout=2) as r:  # noqa: S310 (loopback only)
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the Prefect server did not answer on {url} within {timeout:.0f} s; see {log}")


def prefect_cmd(*args: str) -> list[str]:
    """The `prefect` command line of this interpreter."""
    return [sys.executable, "-m", "prefect", *args]


def run_prefect(args: Sequence[str], env: dict[str, str], cwd: Path, log: Path) -> None:
    """Run one `prefect ...` command to completion (printed; output appended to ``log``); failure names the log."""
    print("$ prefect " + " ".join(args), flush=True)
    with log.open("ab") as fh:
        proc = subprocess.run(prefect_cmd(*args), env=env, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"`prefect {' '.join(args)}` exited with {proc.returncode}; see {log}")


def ui_env(url: str, prefect_home: Path, source_root: Path, catalog: str,
           settings: Settings | None = None) -> dict[str, str]:
    """Environment of the server, worker and prefect commands: this server, this Prefect home, no analytics,
    the pipeline's paths as absolute settings (what runs resolve their empty paths to), and the credential when
    one is configured (the server requires it, the others send it)."""
    from infra.prefect_server import auth_env

    env = dict(os.environ)
    env.update(PREFECT_API_URL=f"{url}/api", PREFECT_UI_URL=url, PREFECT_HOME=str(prefect_home),
               PREFECT_SERVER_ANALYTICS_ENABLED="false", HVP_SOURCE_ROOT=str(source_root), HVP_CATALOG=catalog,
               HVP_PROJECT_ROOT=str(PROJECT_ROOT), PYTHONUNBUFFERED="1",
               PWD=str(PROJECT_ROOT))  # prefect.yaml's pull step: runs start in the repository root
    env.update(auth_env(settings))
    return env


def serve_ui(workdir: Path, port: int = 4200, watch_interval: float = 5.0, host: str = "127.0.0.1",
             extra_env: dict[str, str] | None = None, ready: threading.Event | None = None,
             stop: threading.Event | None = None, settings: Settings | None = None) -> int:
    """Start everything, wait for Ctrl-C/SIGTERM (or ``stop``), stop everything; returns the exit status.
    ``ready`` is set once the URL is printed (tests). The source root and the catalog are the settings' when set
    there, else ``sources`` and ``catalog`` under ``workdir``; a ``host`` beyond loopback needs a credential."""
    from infra.prefect_server import credential, is_loopback, refresh_prefect_settings

    conf = settings or get_settings()
    workdir = workdir.resolve()
    source_root = (conf.source_root if "source_root" in conf.model_fields_set else workdir / "sources").resolve()
    catalog = conf.catalog if "catalog" in conf.model_fields_set else str(workdir / "catalog")
    catalog = catalog if "://" in catalog else str(Path(catalog).resolve())
    url = f"http://{host}:{port}"
    authenticated = credential(conf) is not None
    if not authenticated and not is_loopback(host):
        print(f"error: refusing to serve on {host}, beyond this machine, without authentication: set HVP_SERVER_AUTH "
              "to a 'user:password' credential (every client then needs it too), or bind 127.0.0.1", flush=True)
        return 2
    if not port_free(host, port):
        print(f"error: {host}:{port} is in use (another Prefect server?): stop it or pass --port", flush=True)
        return 2
    logs = workdir / "logs"
    env = ui_env(url, workdir / "prefect", source_root, catalog, conf)
    env.update(extra_env or {})
    # this process's own clients (the watcher) use the same server, home and credential
    os.environ.update({k: env[k] for k in ("PREFECT_API_URL", "PREFECT_HOME", "PREFECT_SERVER_ANALYTICS_ENABLED",
                                           "PREFECT_API_AUTH_STRING") if k in env})
    refresh_prefect_settings()
    children = Children()
    old = {s: signal.signal(s, _raise_stop) for s in (signal.SIGTERM, signal.SIGINT)}
    watcher_stop = threading.Event()
    try:
        print(f"starting the Prefect server on {url} "
              f"({'basic authentication' if authenticated else 'no authentication: loopback only'}; "
              f"log: {logs / 'server.log'})", flush=True)
        children.start("server", prefect_cmd("server", "start", "--host", host, "--port", str(port)), env,
                       logs / "server.log", workdir)
        wait_healthy(url, children.procs["server"], logs / "server.log")
        setup = logs / "setup.log"
        run_prefect(["work-pool", "create", "local", "--type", "process", "--overwrite"], env, PROJECT_ROOT, setup)
        _ensure_gpu_limit(env, setup)
        _ensure_sources(source_root)
        run_prefect(["--no-prompt", "deploy", "--all"], env, PROJECT_ROOT, setup)
        from pipelines.automations import ensure_crashed_runs_automation

        heartbeat = env.get("PREFECT_FLOWS_HEARTBEAT_FREQUENCY")
        done = ensure_crashed_runs_automation(conf.crashed_after_s, float(heartbeat) if heartbeat else None)
        print(f"automation: flow runs without a heartbeat for {conf.crashed_after_s} s are marked Crashed ({done})",
              flush=True)
        print(f"starting a worker on pool `local` (log: {logs / 'worker.log'})", flush=True)
        # niced: flow runs (model work) inherit it, so the server answers promptly and its SQLite transactions stay
        # short while labelling and training load the CPU
        children.start("worker", ["nice", "-n", "10", *prefect_cmd("worker", "start", "--pool", "local")], env,
                       logs / "worker.log", PROJECT_ROOT)
        from pipelines.watch import ARRIVED, ArrivalWatcher

        watcher = ArrivalWatcher(source_root, watch_interval)
        threading.Thread(target=watcher.run, args=(watcher_stop,), name="arrival-watcher", daemon=True).start()
        print(f"watching {source_root} for new dataset folders (event {ARRIVED} -> deployment relabel-new)",
              flush=True)
        print(f"\nPrefect UI: {url}\n  Deployments -> hypervision -> Run -> Quick run: the whole pipeline on "
              f"{source_root}\n  catalog {catalog}; logs in {logs}\nCtrl-C stops the server, the worker and the "
              "watcher.\n", flush=True)
        if ready is not None:
            ready.set()
        while not (stop is not None and stop.is_set()):
            dead = children.dead()
            if dead:
                name = dead[0]
                print(f"error: the {name} exited with {children.procs[name].returncode}; see {children.logs[name]}",
                      flush=True)
                return 1
            time.sleep(0.5)
        return 0
    except Stop as sig:
        print(f"\n{sig.args[0]}: stopping", flush=True)
        return 0
    except (RuntimeError, ValueError) as exc:
        print(f"error: {exc}", flush=True)
        return 1
    finally:
        watcher_stop.set()
        for s, handler in old.items():
            signal.signal(s, handler)
        children.stop()


def _ensure_gpu_limit(env: dict[str, str], log: Path) -> None:
    """Create one concurrency limit of one slot per visible GPU (`gpu:<host>:<index>`) unless it exists."""
    from infra.cluster import local_devices
    from pipelines.wiring import device_limit

    for device in local_devices():
        name = device_limit(device)
        if name is None:
            continue
        with log.open("ab") as fh:
            exists = subprocess.run(prefect_cmd("gcl", "inspect", name), env=env, stdout=fh,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, check=False).returncode == 0
        if not exists:
            run_prefect(["gcl", "create", name, "--limit", "1"], env, PROJECT_ROOT, log)


def _ensure_sources(source_root: Path) -> None:
    """Fixture sources of every built-in dataset when the source root is empty or missing (saying so)."""
    if source_root.is_dir() and any(source_root.iterdir()):
        print(f"source root {source_root}: {sum(1 for p in source_root.iterdir() if p.is_dir())} dataset folders",
              flush=True)
        return
    from catalog.fixtures import make_fixtures

    written = make_fixtures(source_root)
    print(f"source root {source_root} was empty: wrote fixtures of {len(written)} datasets "
          f"({sum(map(len, written.values()))} images) there", flush=True)
