"""The temporary Prefect server of a CLI run dies with the CLI, even when the CLI is killed with ``kill -9``.

With no ``PREFECT_API_URL`` configured, Prefect starts a temporary local server (a uvicorn subprocess) and stops
it at interpreter exit; a killed CLI never reaches that, so the server lived on. Here the server is started from
the main thread with Linux's parent-death signal set (``PR_SET_PDEATHSIG``): the kernel kills it when the CLI
goes, however it goes. Prefect's own client then finds it running and uses it, and so do worker processes (a local
Dask cluster), which inherit its address. Elsewhere than Linux the server is Prefect's as before.

Authentication: with a credential configured (``HVP_SERVER_AUTH``, a secret ``user:password``), every server this
project starts requires Prefect's basic authentication (``PREFECT_SERVER_API_AUTH_STRING``) and every client it
starts or runs sends it (``PREFECT_API_AUTH_STRING``); no server is bound beyond loopback without one.
"""

from __future__ import annotations

import ctypes
import ipaddress
import os
import signal
import subprocess
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from infra.settings import Settings

PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int, sig: int = signal.SIGKILL) -> None:
    """In the forked child, before exec: ask for ``sig`` when the parent dies (and die now if it already has)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, sig)
    if os.getppid() != parent:
        os._exit(1)


def die_with_parent(sig: int = signal.SIGTERM) -> Any:
    """A ``preexec_fn`` for subprocess.Popen that delivers ``sig`` to the child when this process dies, however it
    dies (``kill -9`` included; SIGTERM lets the child stop its own children). None elsewhere than Linux. The
    signal fires when the thread that started the child exits: start children from the main thread."""
    if not sys.platform.startswith("linux"):
        return None
    parent = os.getpid()
    return lambda: _die_with_parent(parent, sig)


def credential(settings: Settings | None = None) -> str | None:
    """The configured server credential (``HVP_SERVER_AUTH``), or None. Callers pass it on in environments only:
    it is never printed or logged."""
    from infra.settings import get_settings

    secret = (settings or get_settings()).server_auth
    value = secret.get_secret_value() if secret is not None else ""
    return value or None


def auth_env(settings: Settings | None = None) -> dict[str, str]:
    """Environment of a server and its clients under the configured credential: the server requires it, clients
    send it (empty when none is configured)."""
    secret = credential(settings)
    return {"PREFECT_SERVER_API_AUTH_STRING": secret, "PREFECT_API_AUTH_STRING": secret} if secret else {}


def configure_client_auth(settings: Settings | None = None) -> bool:
    """Make this process's Prefect clients (and the processes it starts) send the configured credential; returns
    whether one is configured. Call it once at start-up, before any client is used (the `hvp` entry point)."""
    secret = credential(settings)
    if secret is None:
        return False
    os.environ["PREFECT_API_AUTH_STRING"] = secret
    refresh_prefect_settings()
    return True


def refresh_prefect_settings() -> None:
    """Let Prefect see environment changes made after it was imported (its settings are read at import)."""
    if "prefect.context" in sys.modules:
        from prefect.context import refresh_global_settings_context

        refresh_global_settings_context()


def is_loopback(host: str) -> bool:
    """Whether a bind address only reaches this machine (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any interface


def start_temporary_server() -> str | None:
    """Start the temporary server now, bound to this process's life, unless a server is configured; returns its
    API URL (None when PREFECT_API_URL is set or the platform has no parent-death signal). With a credential
    configured the server requires it and this process's clients send it."""
    configure_client_auth()
    from prefect.settings import PREFECT_API_URL
    from prefect.settings import get_current_settings as current

    if PREFECT_API_URL.value() or not sys.platform.startswith("linux"):
        return None
    import prefect
    from prefect.server.api.server import SubprocessASGIServer

    class BoundServer(SubprocessASGIServer):
        """Prefect's temporary server, its process tied to the CLI's."""

        def _run_uvicorn_command(self) -> subprocess.Popen[Any]:
            parent = os.getpid()
            env = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false",  # nothing to send it to from a local run
                   **os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
                   "PREFECT__SERVER_FINAL": "1", **current().to_environment_variables(exclude_unset=True),
                   **auth_env()}
            return subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent), "--factory",
                 "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(self.port),
                 "--log-level", "error", "--lifespan", "on"],
                env=env, preexec_fn=lambda: _die_with_parent(parent))

    server = SubprocessASGIServer._instances.get(None)
    if server is None:  # Prefect's client asks for the instance without a port: this one
        server = BoundServer()
    server.start()
    # Worker processes started from here on (a local Dask cluster) inherit the address: without it each would
    # start a temporary server of its own, all of them on one SQLite database.
    os.environ["PREFECT_API_URL"] = server.api_url
    return server.api_url
