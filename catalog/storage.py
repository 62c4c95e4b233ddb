"""The file-system layer every catalog store builds on: paths, atomic writes, part tables, writer leases, locks.

A ``Storage`` is one catalog root on a file system (a local directory or any fsspec URL). The cube store
(``catalog.catalog``) and the mask store (``catalog.masks``) both write through it and never reach into each other.

Writers never expose half-written files: a local write goes to a temporary beside its target
(``<target>.tmp-<lease id>-<random>``) and is renamed into place; an object store receives whole objects. Every
process that creates temporaries first records a *lease* (``leases/<id>.json``: pid, host, process start time),
so a temporary can be told apart as a live writer's (leave it) or a dead writer's (remove it, see
``remove_stale_temporaries``). Per-name locks (``lock``) serialise writers of the same item: on a local catalog
they are ``flock`` locks, released by the kernel when their holder dies, even by ``kill -9``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import zarr

from base.errors import CatalogError

#: Marker of a temporary in a file or folder name; what follows is ``<lease id>-<random>``.
TMP = ".tmp-"
#: A lease from another host counts as alive this long after its last renewal (pids cannot be checked there).
REMOTE_LEASE_TTL_S = 3600.0
#: Named locks are spread over this many lock files (bounded, whatever the number of names).
LOCK_SHARDS = 1024


def now_utc() -> datetime:
    """The current time, timezone-aware (UTC): every table timestamp uses it."""
    return datetime.now(UTC)


def _process_started(pid: int) -> float | None:
    """Start time (epoch seconds) of a local process, or None when no such process exists."""
    import psutil

    try:
        return float(psutil.Process(pid).create_time())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None


@dataclass(frozen=True)
class Lease:
    """Who writes: a process identified by host, pid and start time (a reused pid has another start time)."""

    pid: int
    host: str
    started: float
    renewed: float = 0.0

    @property
    def id(self) -> str:
        """A short stable id of the writer, used in temporary names."""
        return hashlib.sha256(f"{self.host}|{self.pid}|{self.started:.3f}".encode()).hexdigest()[:16]

    def alive(self, now: float | None = None) -> bool:
        """Whether the writer may still be running: on this host its pid still runs with the same start time;
        on another host it renewed the lease within REMOTE_LEASE_TTL_S."""
        if self.host != socket.gethostname():
            return (now or time.time()) - self.renewed < REMOTE_LEASE_TTL_S
        started = _process_started(self.pid)
        return started is not None and abs(started - self.started) < 1.0

    @classmethod
    def current(cls) -> Lease:
        """This process's lease (recomputed after a fork: the child is another writer)."""
        pid = os.getpid()
        started = _process_started(pid)
        assert started is not None
        return cls(pid=pid, host=socket.gethostname(), started=started, renewed=time.time())


_OWN: dict[int, Lease] = {}  # pid -> that process's lease (a forked child is another writer)
_LEASES: set[tuple[int, str]] = set()  # (pid, catalog root) where that process recorded its lease
_LEASE_LOCK = threading.Lock()
_THREAD_LOCKS: dict[tuple[str, int], threading.Lock] = {}


@dataclass(frozen=True)
class Temporary:
    """A temporary found in the catalog and what is known of its writer."""

    rel: str
    lease_id: str
    alive: bool


class Storage:
    """One catalog root: path arithmetic, atomic whole-file writes, append-only part tables, temporaries under a
    lease, and named locks. Cheap to create; safe to use from several threads and processes at once."""

    def __init__(self, uri: str | os.PathLike[str]) -> None:
        self.uri = os.fspath(uri)
        self.fs, root = fsspec.core.url_to_fs(self.uri)
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        self.local = "file" in protocols or "local" in protocols
        self.root: str = os.path.abspath(root) if self.local else root.rstrip("/")

    # ------------------------------------------------------------------ paths
    def path(self, *parts: str) -> str:
        """The absolute path (or object key) of a catalog-relative path."""
        return "/".join([self.root.rstrip("/"), *parts])

    def rel(self, path: str) -> str:
        """The catalog-relative form of a path under the root."""
        return path[len(self.root.rstrip("/")) + 1:]

    def zarr_store(self, rel: str) -> Any:
        """A Zarr store rooted at a catalog-relative path."""
        if self.local:
            return zarr.storage.LocalStore(self.path(rel))
        protocol = self.uri.split("://", 1)[0]
        return zarr.storage.FsspecStore.from_url(f"{protocol}://{self.path(rel)}")

    def exists(self, rel: str) -> bool:
        """Whether a catalog-relative file or folder exists."""
        return bool(self.fs.exists(self.path(rel)))

    def read_bytes(self, rel: str) -> bytes:
        """A whole file's bytes."""
        with self.fs.open(self.path(rel), "rb") as fh:
            return bytes(fh.read())

    def remove(self, rel: str) -> None:
        """Remove a file or a whole folder (absent is fine)."""
        path = self.path(rel)
        if self.local:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
        elif self.fs.exists(path):
            self.fs.rm(path, recursive=True)

    def groups(self, prefix: str) -> list[str]:
        """Catalog-relative paths of the Zarr groups (``*.zarr`` folders) under ``prefix``, sorted; their insides
        are not walked (they hold the chunks)."""
        found: list[str] = []
        if self.local:
            for top, dirs, _ in os.walk(self.path(prefix)):
                found += [self.rel(os.path.join(top, d)) for d in dirs if d.endswith(".zarr")]
                dirs[:] = [d for d in dirs if TMP not in d and not d.endswith(".zarr")]
        else:
            found = [self.rel(p) for p in self.fs.glob(self.path(prefix, "**", "*.zarr")) if TMP not in p]
        return sorted(found)

    # ------------------------------------------------------------------ atomic writes
    def put_bytes(self, rel: str, data: bytes) -> None:
        """Write a whole file atomically: a leased temporary renamed into place locally, one PUT elsewhere."""
        path = self.path(rel)
        if not self.local:
            self.fs.pipe_file(path, data)
            return
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = self.path(self.temporary(rel))
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)

    def temporary(self, rel: str) -> str:
        """A fresh temporary name beside ``rel`` (catalog-relative), under this process's lease; locally only
        (object stores write whole objects, so they need none)."""
        if not self.local:
            return rel
        return f"{rel}{TMP}{self._lease().id}-{uuid.uuid4().hex[:8]}"

    def commit_folder(self, tmp: str, rel: str) -> None:
        """Move a finished temporary folder to ``rel``, replacing what is there (an incomplete leftover); a no-op
        on object stores, where the folder was written in place."""
        if not self.local or tmp == rel:
            return
        final = self.path(rel)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.makedirs(os.path.dirname(final), exist_ok=True)
        os.replace(self.path(tmp), final)

    def discard(self, tmp: str, rel: str) -> None:
        """Remove a temporary after a failed write (nothing to do when it was the target itself)."""
        if tmp != rel:
            self.remove(tmp)

    # ------------------------------------------------------------------ leases
    def _lease(self) -> Lease:
        """This process's lease, recorded under ``leases/`` before its first temporary there, then renewed by a
        background thread every quarter of REMOTE_LEASE_TTL_S while the process lives (so that readers on other
        hosts, which cannot check its pid, see it alive)."""
        pid = os.getpid()
        with _LEASE_LOCK:
            lease = _OWN.get(pid) or _OWN.setdefault(pid, Lease.current())
            if (pid, self.root) not in _LEASES:
                self._record(lease)
                _LEASES.add((pid, self.root))
                threading.Thread(target=self._renew, args=(lease,), name="hvp-lease", daemon=True).start()
        return lease

    def _record(self, lease: Lease) -> None:
        """Write (or renew) a lease file, atomically."""
        path = self.path("leases", f"{lease.id}.json")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}{TMP}{lease.id}-{uuid.uuid4().hex[:8]}"
        with open(tmp, "w") as fh:
            json.dump({"id": lease.id, **asdict(lease), "renewed": time.time()}, fh)
        os.replace(tmp, path)

    def _renew(self, lease: Lease) -> None:
        """Renew the lease until the process ends (or the catalog goes away)."""
        while True:
            time.sleep(REMOTE_LEASE_TTL_S / 4)
            try:
                self._record(lease)
            except OSError:
                return

    def lease(self, lease_id: str) -> Lease | None:
        """The recorded lease of a writer id, or None when there is none (its writer is gone)."""
        try:
            data = json.loads(self.read_bytes(f"leases/{lease_id}.json"))
            return Lease(pid=int(data["pid"]), host=str(data["host"]), started=float(data["started"]),
                         renewed=float(data.get("renewed", 0.0)))
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return None

    def temporaries(self) -> list[Temporary]:
        """Every temporary in the catalog with whether its writer still runs. A temporary without a recorded
        lease (its writer is gone, or it predates leases) counts as dead. Zarr groups are not descended into."""
        if not self.local or not os.path.isdir(self.root):
            return []
        found: list[Temporary] = []
        alive: dict[str, bool] = {}
        for top, dirs, files in os.walk(self.root):
            names = [*files, *dirs]
            dirs[:] = [d for d in dirs if TMP not in d and not d.endswith(".zarr")]
            for name in names:
                if TMP not in name:
                    continue
                lease_id = name.rsplit(TMP, 1)[1].split("-", 1)[0]
                if lease_id not in alive:
                    lease = self.lease(lease_id)
                    alive[lease_id] = lease is not None and lease.alive()
                found.append(Temporary(self.rel(os.path.join(top, name)), lease_id, alive[lease_id]))
        return sorted(found, key=lambda t: t.rel)

    def remove_stale_temporaries(self) -> list[str]:
        """Remove the temporaries of writers that are gone, then their leases; returns what was removed."""
        removed = []
        for tmp in self.temporaries():
            if not tmp.alive:
                self.remove(tmp.rel)
                removed.append(tmp.rel)
        leases = self.path("leases")
        if self.local and os.path.isdir(leases):
            live = {t.lease_id for t in self.temporaries()}
            for name in os.listdir(leases):
                lease_id = name.removesuffix(".json")
                lease = self.lease(lease_id) if name.endswith(".json") else None
                if lease_id not in live and (lease is None or not lease.alive()):
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(os.path.join(leases, name))
        return removed

    # ------------------------------------------------------------------ locks
    @contextlib.contextmanager
    def lock(self, name: str, timeout: float = 3600.0) -> Iterator[float]:
        """Hold the lock ``name`` (e.g. an image id) while the block runs; yields the seconds spent waiting for
        another holder. Locally an ``flock`` on one of LOCK_SHARDS files, so a killed holder never leaves it
        held; across processes on an object store there is no lock (writers there must tolerate duplicates)."""
        shard = int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) % LOCK_SHARDS
        with _LEASE_LOCK:
            thread_lock = _THREAD_LOCKS.setdefault((self.root, shard), threading.Lock())
        t0 = time.monotonic()
        if not thread_lock.acquire(timeout=timeout):
            raise CatalogError(f"{self.uri}: lock '{name}' still held by another thread after {timeout:.0f} s")
        try:
            if not self.local:
                yield time.monotonic() - t0
                return
            path = self.path("locks", f"{shard:04d}.lock")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "a+") as fh:
                while True:
                    try:
                        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if time.monotonic() - t0 > timeout:
                            raise CatalogError(f"{path}: lock '{name}' still held after {timeout:.0f} s by a "
                                               "live writer; wait for it, or stop it") from None
                        time.sleep(0.05)
                try:
                    yield time.monotonic() - t0
                finally:
                    fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
        finally:
            thread_lock.release()

    # ------------------------------------------------------------------ part tables
    def write_part(self, table_dir: str, rows: list[dict[str, Any]], schema: pa.Schema) -> str:
        """Append rows to a table as a new part file of its own (so concurrent writers never lose a row)."""
        buf = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), buf)
        rel = f"{table_dir}/part-{time.time_ns():020d}-{uuid.uuid4().hex[:12]}.parquet"
        if not self.local:
            self.fs.makedirs(self.path(table_dir), exist_ok=True)
        self.put_bytes(rel, buf.getvalue().to_pybytes())
        return self.path(rel)

    def parts(self, table_dir: str) -> list[str]:
        """The committed part files of a table, oldest first (temporaries are not parts)."""
        try:
            found = self.fs.glob(self.path(table_dir, "part-*.parquet"))
        except FileNotFoundError:
            return []
        return sorted(p for p in found if TMP not in p)

    def read_table(self, table_dir: str, schema: pa.Schema,
                   on_bad_part: Callable[[str, Exception], None] | None = None) -> tuple[pa.Table, list[str]]:
        """All parts of a table; re-lists when a concurrent compaction removes a part mid-read. A part that
        cannot be read raises, unless ``on_bad_part`` takes it (then it is left out)."""
        for _ in range(10):
            parts = self.parts(table_dir)
            tables = []
            try:
                for p in parts:
                    try:
                        tables.append(pq.read_table(self.fs.open(p, "rb"), schema=schema))
                    except FileNotFoundError:
                        raise
                    except Exception as exc:
                        if on_bad_part is None:
                            raise CatalogError(f"{p}: part file of '{table_dir}' cannot be read ({exc}); "
                                               "run `hvp catalog verify` to list damage") from exc
                        on_bad_part(p, exc)
            except FileNotFoundError:
                continue
            return (pa.concat_tables(tables) if tables else schema.empty_table()), parts
        raise CatalogError(f"{self.path(table_dir)}: parts keep disappearing while reading; is a compaction stuck?")

    def compact_table(self, table_dir: str, schema: pa.Schema, unique: list[str] | None = None,
                      drop: Callable[[pa.Table], Any] | None = None, latest: str | None = None) -> int:
        """Merge a table's parts into one; returns the number of parts merged. Rows equal on ``unique`` are kept
        once (the latest by the ``latest`` column when given, else the first read); ``drop`` (a table -> boolean
        mask) removes rows for good.

        Safe beside writers (their new parts are not listed, so not removed) and beside another compaction
        (duplicates are dropped on read).
        """
        try:
            table, parts = self.read_table(table_dir, schema)
        except CatalogError:
            return 0
        if len(parts) < 2 and drop is None and not (unique and _has_duplicates(table, unique)):
            return 0
        if drop is not None:
            table = table.filter(pc.invert(drop(table)))
        if unique:
            df = table.to_pandas()
            if latest is not None:
                df = df.sort_values(latest, kind="stable")
            df = df.drop_duplicates(unique, keep="last" if latest is not None else "first")
            table = pa.Table.from_pandas(df, schema=schema, preserve_index=False)
        self.write_part(table_dir, table.to_pylist(), schema)
        for p in parts:
            with contextlib.suppress(FileNotFoundError):  # another compaction removed it first
                self.fs.rm(p)
        return len(parts)


def _has_duplicates(table: pa.Table, unique: list[str]) -> bool:
    return bool(table.num_rows) and bool(table.select(unique).to_pandas().duplicated().any())


def member(group: zarr.Group, name: str) -> zarr.Array:
    """The array ``name`` of a group (an error if it is a sub-group: the layout is fixed)."""
    arr = group[name]
    if not isinstance(arr, zarr.Array):
        raise CatalogError(f"{group.store_path}/{name} is a group, expected an array: the catalog is damaged")
    return arr
