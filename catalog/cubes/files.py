"""File access for cube storage: local files memory-mapped (page cache read in place, disk reads started ahead),
any fsspec file system otherwise; vectored writes of new files; the zarr-python store of a folder."""

from __future__ import annotations

import mmap
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np
import zarr


class FileAccess:
    """Byte access to a catalog's files: local files are memory-mapped (the page cache is read in place, no
    copy into a buffer, and ``MADV_WILLNEED`` starts the disk reads of every chunk a request needs at once);
    any fsspec file system otherwise.

    Mappings stay open, least recently used out, so a warm chunk costs no system call or page fault. Catalog
    files are immutable (a re-ingest writes a new folder), so a mapping never sees bytes change; a file truncated
    by hand while mapped would fault (SIGBUS), which is why writers never truncate in place.
    """

    #: Files kept mapped (a 1024 x 1024 image in 64-pixel chunks is 256 files).
    MAPPED_FILES = 4096

    def __init__(self, fs: Any, local: bool) -> None:
        self.fs = fs
        self.local = local
        self._scratch = threading.local()
        self._maps: OrderedDict[str, np.ndarray] = OrderedDict()
        self._map_lock = threading.Lock()

    def scratch(self, name: str, nbytes: int) -> np.ndarray:
        """A per-thread reusable uint8 buffer of at least ``nbytes`` (returned cut to ``nbytes``)."""
        bufs: dict[str, np.ndarray] | None = getattr(self._scratch, "bufs", None)
        if bufs is None:
            bufs = self._scratch.bufs = {}
        buf = bufs.get(name)
        if buf is None or buf.size < nbytes:
            buf = bufs[name] = np.empty(max(nbytes, 1 << 16), dtype=np.uint8)
        return buf[:nbytes]

    @staticmethod
    def _map(path: str) -> np.ndarray | None:
        """The file mapped read-only as uint8 (unmapped when the last view goes); None when it does not exist."""
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            size = os.fstat(fd).st_size
            if size == 0:
                return np.empty(0, dtype=np.uint8)
            mapped = mmap.mmap(fd, size, prot=mmap.PROT_READ)
            # no read-around on faults (the kernel would read megabytes around every cold page of a shard):
            # what a request needs is asked for exactly, with MADV_WILLNEED
            mapped.madvise(mmap.MADV_RANDOM)
            return np.frombuffer(mapped, dtype=np.uint8)
        finally:
            os.close(fd)

    @staticmethod
    def _willneed(view: np.ndarray, start: int, length: int) -> None:
        """Ask the kernel to read a mapped range ahead (asynchronously; a no-op on cached pages)."""
        base: Any = view
        while isinstance(base, np.ndarray):
            base = base.base
        mapped = base.obj if isinstance(base, memoryview) else None
        if isinstance(mapped, mmap.mmap) and length > 0:
            lo = start - start % mmap.PAGESIZE
            mapped.madvise(mmap.MADV_WILLNEED, lo, min(len(mapped), start + length) - lo)

    def _mapped(self, path: str) -> tuple[np.ndarray | None, bool]:
        """The file's cached mapping (mapped now if new; second value True then); None if it does not exist."""
        with self._map_lock:
            view = self._maps.get(path)
            if view is not None:
                self._maps.move_to_end(path)
                return view, False
        view = self._map(path)
        if view is not None:
            with self._map_lock:
                self._maps[path] = view
                while len(self._maps) > self.MAPPED_FILES:
                    self._maps.popitem(last=False)
        return view, True

    def read(self, path: str, into: np.ndarray | None = None) -> np.ndarray | None:
        """A whole file as uint8: a read-only mapped view locally (or a copy in ``into`` when given and large
        enough), the bytes elsewhere; None when it does not exist."""
        return self.read_range(path, 0, -1, into)

    def read_range(self, path: str, start: int, length: int, into: np.ndarray | None = None) -> np.ndarray | None:
        """``length`` bytes (-1: to the end) at ``start`` (negative: from the end) as for ``read``; None when the
        file does not exist."""
        if not self.local:
            try:
                if length < 0:
                    data = self.fs.cat_file(path, start=start or None)
                else:
                    end = start + length if start >= 0 else (None if start + length == 0 else start + length)
                    data = self.fs.cat_file(path, start=start, end=end)
            except FileNotFoundError:
                return None
            return np.frombuffer(data, dtype=np.uint8)
        view, new = self._mapped(path)
        if view is None:
            return None
        if length < 0:
            length = view.size - start
        if start < 0:
            start = max(0, view.size + start)
        if new or view.size > 4 * length:  # a fresh mapping, or a shard read piecewise: start the disk reads
            self._willneed(view, start, length)
        part = view[start: start + length]
        if into is not None and into.size >= part.size:
            into[: part.size] = part
            return into[: part.size]
        return part

    def in_page_cache(self, path: str, offset: int) -> bool:
        """Whether the byte at ``offset`` of a local file is in the page cache (a read that cannot block:
        ``RWF_NOWAIT``). True where it cannot tell (no such flag, another file system, not local), so that the
        caller keeps its mapped path."""
        nowait = getattr(os, "RWF_NOWAIT", None)
        if not self.local or nowait is None:
            return True
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return True
        try:
            os.preadv(fd, [self.scratch("probe", 1).data], max(0, offset), nowait)
            return True
        except BlockingIOError:
            return False
        except OSError:
            return True
        finally:
            os.close(fd)

    def size(self, path: str) -> int | None:
        """A local file's size in bytes, None when it does not exist."""
        try:
            return os.stat(path).st_size
        except FileNotFoundError:
            return None

    def forget(self, prefix: str) -> None:
        """Unmap the files under ``prefix`` (after they were replaced)."""
        with self._map_lock:
            for path in [p for p in self._maps if p.startswith(prefix)]:
                del self._maps[path]

    def write(self, path: str, parts: Sequence[Any]) -> None:
        """Write a new file from buffers (numpy arrays, bytes), without joining them first."""
        if not self.local:
            self.fs.pipe_file(path, b"".join(bytes(memoryview(p).cast("B")) for p in parts))
            return
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            writev_all(fd, parts)
        finally:
            os.close(fd)

    def makedirs(self, path: str) -> None:
        """Create a folder and its parents (a no-op on object stores)."""
        if self.local:
            os.makedirs(path, exist_ok=True)


class SequentialReads:
    """``pread`` on local files into the caller's buffers, each file's descriptor kept open for the whole
    sequence and marked sequential, so that the kernel reads ahead of the next range (in large folios) while the
    caller works on this one. Close it when done (a context manager)."""

    def __init__(self) -> None:
        self._fds: dict[str, int] = {}

    def read_into(self, path: str, offset: int, buf: np.ndarray) -> int:
        """Read ``path``'s bytes at ``offset`` into ``buf`` (uint8); returns how many it read (fewer at the end of
        the file, 0 when the file does not exist)."""
        fd = self._fds.get(path)
        if fd is None:
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                return 0
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            self._fds[path] = fd
        got = 0
        while got < buf.size:
            n = os.preadv(fd, [buf[got:].data], offset + got)
            if n == 0:
                break
            got += n
        return got

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> SequentialReads:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def writev_all(fd: int, parts: Sequence[Any]) -> int:
    """Write buffers to a file descriptor in order, resuming after short writes; returns the bytes written."""
    views = [memoryview(p).cast("B") for p in parts]
    total = sum(v.nbytes for v in views)
    while views:
        n = os.writev(fd, views)
        while views and n >= views[0].nbytes:
            n -= views[0].nbytes
            views.pop(0)
        if views and n:
            views[0] = views[0][n:]
    return total


def zarr_store(files: FileAccess, path: str) -> Any:
    """The zarr-python store of a folder (local, or an fsspec URL built from the file system's protocol)."""
    if files.local:
        return zarr.storage.LocalStore(path)
    return zarr.storage.FsspecStore.from_url(files.fs.unstrip_protocol(path))
