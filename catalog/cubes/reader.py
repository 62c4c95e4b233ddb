"""The direct chunk reader: windows, whole arrays and batches of crops from a catalog's cube groups, every chunk's
CRC-32C verified, decoded straight into the caller's buffer (cast on the way) on a pool of threads.

It does not go through zarr-python's asynchronous pipeline, which costs more than the decode for these chunks: it
parses an array's ``zarr.json`` once, reads chunk and shard files through ``FileAccess`` (memory-mapped locally),
and keeps decoded chunks in a byte-bounded ``ChunkCache`` for overlapping crops. Arrays whose codecs it does not
decode are read through zarr-python.

Two paths. Warm (the bytes in the page cache): chunks are read in place from the file's mapping, no copy. Cold (a
large read whose first bytes are not cached): the chunks are sorted by file and offset and coalesced into a few
long ranges, which one I/O thread reads with ``pread`` a few ranges ahead of the decoder, so the disk and the
decode run together and the kernel reads ahead in large folios (faulting a mapping in, or ``MADV_WILLNEED``, costs
a page at a time).
"""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

import google_crc32c
import numcodecs.blosc
import numcodecs.gzip
import numcodecs.zstd
import numpy as np
import zarr

from base.errors import CatalogError, CorruptChunkError
from catalog.cubes.cache import ChunkCache
from catalog.cubes.files import FileAccess, SequentialReads, zarr_store
from catalog.cubes.layout import NO_CHUNK
from catalog.cubes.metadata import ArrayInfo, parse_array_meta
from catalog.cubes.regions import Piece, extent, normalise_region, plan_chunks

Job = tuple[ArrayInfo, tuple[int, ...], list[Piece]]
"""One chunk of one array and the pieces of outputs it fills."""


@dataclass
class Segment:
    """A byte range of one file read in one ``pread`` on the cold path, and the chunks (job, offset, size) in it."""

    path: str
    start: int
    end: int
    chunks: list[tuple[Job, int, int]] = field(default_factory=list)


class CubeReader:
    """Reads windows, whole arrays and batches of crops from a catalog's cube groups, verifying each chunk's
    checksum. One per process (each DataLoader worker builds its own); thread-safe.

    ``threads`` decode threads (1: decode in the caller's thread, what a DataLoader worker wants);
    ``cache_bytes`` bounds the chunk cache (0: none).
    """

    #: Below this many bytes of chunks a read stays on the calling thread (thread hand-off costs more).
    PARALLEL_MIN_BYTES = 2 * 2**20
    #: Reads of at least this many bytes whose first chunk is not in the page cache take the cold path, if their
    #: chunks lie in contiguous runs of this many bytes on average (shorter runs, e.g. a 128 px crop's, read faster
    #: with every chunk's disk read started at once on the mapped path).
    COLD_MIN_BYTES = 4 * 2**20
    COLD_RUN_BYTES = 8 * 2**20
    #: The cold path's longest range (whole chunks; a larger chunk is read alone) and ranges read ahead.
    SEGMENT_BYTES = 4 * 2**20
    SEGMENTS_AHEAD = 4
    #: A gap between two chunks of one file up to this many bytes is read rather than split into two reads.
    SEGMENT_GAP = 64 * 2**10

    def __init__(self, files: FileAccess, root: str, threads: int = 1, cache_bytes: int = 0) -> None:
        self.files = files
        self.root = root.rstrip("/")
        self.threads = max(1, threads)
        self.cache = ChunkCache(cache_bytes)
        self._infos: dict[tuple[str, str], ArrayInfo | None] = {}
        self._group_attrs: dict[str, dict[str, Any]] = {}
        self._shard_index: OrderedDict[str, np.ndarray | None] = OrderedDict()
        self._fills: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._pool_pid = 0
        self._io: ThreadPoolExecutor | None = None
        self._io_pid = 0
        self.pid = os.getpid()
        """The process that built this reader (a forked child builds its own: see Catalog.cubes)."""

    # ------------------------------------------------------------------ metadata
    def metadata(self, path: str) -> dict[str, Any]:
        """A Zarr v3 metadata document (``zarr.json``) as a dict; FileNotFoundError when absent."""
        raw = self.files.read(path)
        if raw is None:
            raise FileNotFoundError(path)
        parsed = json.loads(raw.tobytes())
        if not isinstance(parsed, dict):
            raise CatalogError(f"{path}: not a Zarr v3 metadata document; the catalog is damaged")
        return parsed

    def group_attrs(self, location: str) -> dict[str, Any]:
        """The attributes of the group at ``location`` (read once per reader)."""
        attrs = self._group_attrs.get(location)
        if attrs is None:
            attrs = self._group_attrs[location] = dict(self.metadata(f"{self.root}/{location}/zarr.json")
                                                       .get("attributes", {}))
        return attrs

    def info(self, location: str, name: str = "cube") -> ArrayInfo | None:
        """The direct-read description of ``location/name`` (cached), or None if zarr-python must read it;
        FileNotFoundError when the array does not exist."""
        key = (location, name)
        if key not in self._infos:
            path = f"{self.root}/{location}/{name}"
            meta = self.metadata(f"{path}/zarr.json")
            try:
                image_id = str(self.group_attrs(location).get("image_id", location))
            except FileNotFoundError:
                image_id = location
            self._infos[key] = parse_array_meta(meta, path, image_id, name)
        return self._infos[key]

    def forget(self, location: str) -> None:
        """Drop what is cached about ``location`` (after it was rewritten)."""
        prefix = f"{self.root}/{location}/"
        self.files.forget(prefix)
        self.cache.drop(prefix)
        with self._lock:
            for path in [p for p in self._shard_index if p.startswith(prefix)]:
                del self._shard_index[path]
            for key in [k for k in self._infos if k[0] == location]:
                del self._infos[key]
            self._group_attrs.pop(location, None)

    # ------------------------------------------------------------------ chunks
    def _corrupt(self, info: ArrayInfo, idx: tuple[int, ...], path: str, problem: str) -> CorruptChunkError:
        return CorruptChunkError(info.image_id, info.name, idx, path, problem)

    def _shard_entries(self, info: ArrayInfo, shard_idx: tuple[int, ...]) -> tuple[str, np.ndarray | None]:
        """A shard's file and its index ((n_inner, 2) uint64 offsets and sizes), None if the shard is missing."""
        path = info.file_key(shard_idx)
        with self._lock:
            if path in self._shard_index:
                self._shard_index.move_to_end(path)
                return path, self._shard_index[path]
        n_inner = int(np.prod(info.inner_per_shard))
        size = 16 * n_inner + (4 if info.index_checksum else 0)
        raw = self.files.read_range(path, -size if info.index_at_end else 0, size)
        index: np.ndarray | None = None
        if raw is not None:
            raw = raw.copy()
            if raw.size != size:
                raise self._corrupt(info, shard_idx, path, f"shard index is {raw.size} bytes, expected {size}")
            if info.index_checksum:
                stored = int.from_bytes(raw[-4:].tobytes(), "little")
                if google_crc32c.value(raw[:-4]) != stored:
                    raise self._corrupt(info, shard_idx, path, "shard index fails its crc32c checksum")
            index = raw[: 16 * n_inner].view("<u8").reshape(n_inner, 2)
        with self._lock:
            self._shard_index[path] = index
            while len(self._shard_index) > 4096:
                self._shard_index.popitem(last=False)
        return path, index

    def stored_chunk(self, info: ArrayInfo, idx: tuple[int, ...],
                     into: np.ndarray | None = None) -> tuple[str, np.ndarray | None]:
        """The stored bytes of one chunk (encoded, checksum included) and their file; None = never written."""
        if info.shard is None:
            path = info.file_key(idx)
            return path, self.files.read(path, into)
        path, entry = self.inner_entry(info, idx)
        if entry is None:
            return path, None
        offset, nbytes = entry
        raw = self.files.read_range(path, offset, nbytes, into)
        if raw is None or raw.size != nbytes:
            raise self._truncated(info, idx, path, 0 if raw is None else raw.size, nbytes)
        return path, raw

    def inner_entry(self, info: ArrayInfo, idx: tuple[int, ...]) -> tuple[str, tuple[int, int] | None]:
        """A sharded array's chunk: its shard file and its (offset, size) there, None when it was never written."""
        per = info.inner_per_shard
        path, index = self._shard_entries(info, tuple(i // p for i, p in zip(idx, per, strict=True)))
        if index is None:
            return path, None
        offset, nbytes = index[int(np.ravel_multi_index(tuple(i % p for i, p in zip(idx, per, strict=True)), per))]
        if offset == NO_CHUNK and nbytes == NO_CHUNK:
            return path, None
        return path, (int(offset), int(nbytes))

    def _truncated(self, info: ArrayInfo, idx: tuple[int, ...], path: str, got: int, nbytes: int
                   ) -> CorruptChunkError:
        return self._corrupt(info, idx, path, f"the shard holds {got} of the {nbytes} bytes its index promises "
                             "(truncated file)")

    def verify(self, info: ArrayInfo, idx: tuple[int, ...], path: str, raw: np.ndarray) -> np.ndarray:
        """One chunk's stored bytes checked against their CRC-32C (when the array has one): the payload."""
        if not info.checksum:
            return raw
        if raw.size < 4:
            raise self._corrupt(info, idx, path, f"{raw.size} bytes, shorter than its 4-byte checksum")
        payload = raw[:-4]
        stored = int.from_bytes(raw[-4:].tobytes(), "little")
        computed = google_crc32c.value(payload)
        if computed != stored:
            raise self._corrupt(info, idx, path, f"crc32c checksum mismatch (stored {stored:08x}, "
                                f"computed {computed:08x})")
        return payload

    def decode(self, info: ArrayInfo, idx: tuple[int, ...], path: str, raw: np.ndarray,
               verified: bool = False) -> np.ndarray:
        """Verify (unless ``verified``: ``raw`` is then the payload) and decode one chunk's stored bytes into a
        chunk-shaped array (a view of ``raw`` or of this thread's decode buffer: copy it before the thread decodes
        the next chunk)."""
        payload = raw if verified else self.verify(info, idx, path, raw)
        nbytes = info.chunk_nbytes
        if info.compressor is None:
            if payload.size != nbytes:
                raise self._corrupt(info, idx, path, f"{payload.size} bytes where a raw chunk has {nbytes}")
            data = payload
        else:
            data = self.files.scratch("decoded", nbytes)
            try:
                if info.compressor == "blosc":
                    if payload.size < 16:
                        raise ValueError(f"{payload.size} bytes, shorter than a Blosc header")
                    size, cbytes, _ = numcodecs.blosc._cbuffer_sizes(payload)
                    if cbytes != payload.size:
                        raise ValueError(f"its header promises {cbytes} bytes, the file holds {payload.size}")
                    if size != nbytes:
                        raise ValueError(f"it decodes to {size} bytes, expected {nbytes}")
                    numcodecs.blosc.decompress(payload, data)
                elif info.compressor == "zstd":
                    numcodecs.zstd.decompress(payload, data)
                else:
                    data[:] = np.frombuffer(numcodecs.gzip.GZip().decode(payload), dtype=np.uint8)
            except Exception as exc:
                raise self._corrupt(info, idx, path, f"it cannot be decoded ({type(exc).__name__}: {exc})") \
                    from exc
        return data.view(info.dtype).reshape(info.chunks)

    def chunk(self, info: ArrayInfo, idx: tuple[int, ...],
              fetched: tuple[str, np.ndarray | None] | None = None) -> np.ndarray:
        """One verified, decoded chunk (from the cache when there; else a view of the mapped file or of this
        thread's decode buffer). ``fetched`` is the chunk's (file, stored bytes) when already mapped."""
        cache = self.cache.max_bytes > 0
        key = (info.path, idx)
        if cache and (hit := self.cache.get(key)) is not None:
            return hit
        path, raw = fetched if fetched is not None else self.stored_chunk(info, idx)
        if raw is None:
            fills = self._fills.get(info.path)
            if fills is None:
                fills = self._fills[info.path] = info.fill_chunk()
            return fills
        chunk = self.decode(info, idx, path, raw)
        if cache:
            chunk = chunk.copy()
            self.cache.put(key, chunk)
        return chunk

    # ------------------------------------------------------------------ reads
    def executor(self) -> ThreadPoolExecutor:
        """This process's decode thread pool (``threads`` threads; rebuilt after a fork)."""
        if self._pool is None or self._pool_pid != os.getpid():
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="hvp-decode")
            self._pool_pid = os.getpid()
        return self._pool

    def io_executor(self) -> ThreadPoolExecutor:
        """This process's one I/O thread of the cold path (rebuilt after a fork)."""
        if self._io is None or self._io_pid != os.getpid():
            self._io = ThreadPoolExecutor(1, thread_name_prefix="hvp-read-ahead")
            self._io_pid = os.getpid()
        return self._io

    def run(self, jobs: list[Job]) -> None:
        """Decode each job's chunk once and copy it into every piece that needs it, in parallel when large. A large
        cold read in long runs takes the coalesced read-ahead path (``run_cold``); otherwise, locally, every chunk
        file is mapped first, so that their disk reads (if cold) start together."""
        jobs = self.take_cold(jobs)
        if not jobs:
            return
        fetched: list[tuple[str, np.ndarray | None] | None] = [None] * len(jobs)
        if self.files.local and len(jobs) > 1:
            for k, (info, idx, _) in enumerate(jobs):
                if (info.path, idx) not in self.cache:
                    fetched[k] = self.stored_chunk(info, idx)

        def one(k: int) -> None:
            info, idx, pieces = jobs[k]
            chunk = self.chunk(info, idx, fetched[k])
            fetched[k] = None  # unmapped once copied
            for p in pieces:
                _put(p.out, p.dst, chunk, p.src)

        total = sum(j[0].chunk_nbytes for j in jobs)
        if self.threads == 1 or len(jobs) < 2 or total < self.PARALLEL_MIN_BYTES:
            for k in range(len(jobs)):
                one(k)
            return
        for _ in self.executor().map(one, range(len(jobs))):
            pass

    def take_cold(self, jobs: list[Job]) -> list[Job]:
        """Run ``jobs`` on the cold path when they qualify (local, ``COLD_MIN_BYTES`` or more in runs of
        ``COLD_RUN_BYTES`` on average, the first chunk not in the page cache); the jobs left to the mapped path."""
        total = sum(j[0].chunk_nbytes for j in jobs)
        if not self.files.local or len(jobs) < 2 or total < self.COLD_MIN_BYTES:
            return jobs
        segments, rest = self.segments(jobs)
        runs = sum(1 for k, seg in enumerate(segments)
                   if k == 0 or seg.path != segments[k - 1].path or seg.start != segments[k - 1].end)
        if (not segments or total < self.COLD_RUN_BYTES * runs
                or self.files.in_page_cache(segments[0].path, segments[0].start)):
            return jobs
        self.run_cold(segments)
        return rest

    def segments(self, jobs: list[Job]) -> tuple[list[Segment], list[Job]]:
        """The cold path's plan: the jobs' stored chunks sorted by file and offset and coalesced into ranges of at
        most ``SEGMENT_BYTES`` (gaps up to ``SEGMENT_GAP`` read through), and the jobs it leaves to the mapped
        path (cached chunks, chunks never written)."""
        located: list[tuple[str, int, int, Job]] = []
        rest: list[Job] = []
        for job in jobs:
            info, idx, _ = job
            if (info.path, idx) in self.cache:
                rest.append(job)
                continue
            if info.shard is None:
                path = info.file_key(idx)
                size = self.files.size(path)
                if size is None:
                    rest.append(job)
                else:
                    located.append((path, 0, size, job))
                continue
            path, entry = self.inner_entry(info, idx)
            if entry is None:
                rest.append(job)
            else:
                located.append((path, *entry, job))
        located.sort(key=lambda r: (r[0], r[1]))
        segments: list[Segment] = []
        for path, offset, nbytes, job in located:
            last = segments[-1] if segments else None
            if (last is not None and last.path == path and 0 <= offset - last.end <= self.SEGMENT_GAP
                    and offset + nbytes - last.start <= self.SEGMENT_BYTES):
                last.end = max(last.end, offset + nbytes)
            else:
                last = Segment(path, offset, offset + nbytes)
                segments.append(last)
            last.chunks.append((job, offset, nbytes))
        return segments, rest

    def run_cold(self, segments: list[Segment]) -> None:
        """Read ``segments`` in order on the I/O thread, ``SEGMENTS_AHEAD`` ahead of the decode, into this thread's
        buffers (one is read into again only after its chunks were copied out). The I/O thread also checks each
        chunk's CRC-32C while its bytes are in its cache; this thread decodes them into their pieces."""
        ahead = self.SEGMENTS_AHEAD
        buffers = [self.files.scratch(f"segment{k}", max(s.end - s.start for s in segments[k::ahead]))
                   for k in range(min(ahead, len(segments)))]

        def load(k: int) -> list[np.ndarray]:
            seg = segments[k]
            buf = buffers[k % ahead][: seg.end - seg.start]
            data = buf[: reads.read_into(seg.path, seg.start, buf)]
            payloads = []
            for (info, idx, _), offset, nbytes in seg.chunks:
                raw = data[offset - seg.start: offset - seg.start + nbytes]
                if raw.size != nbytes:
                    raise self._truncated(info, idx, seg.path, raw.size, nbytes)
                payloads.append(self.verify(info, idx, seg.path, raw))
            return payloads

        def one(job: Job, path: str, payload: np.ndarray) -> None:
            info, idx, pieces = job
            chunk = self.decode(info, idx, path, payload, verified=True)
            if self.cache.max_bytes > 0:
                chunk = chunk.copy()
                self.cache.put((info.path, idx), chunk)
            for p in pieces:
                _put(p.out, p.dst, chunk, p.src)

        io = self.io_executor()
        with SequentialReads() as reads:
            pending: dict[int, Future[list[np.ndarray]]] = {k: io.submit(load, k) for k in range(len(buffers))}
            try:
                for k, seg in enumerate(segments):
                    payloads = pending.pop(k).result()
                    jobs = [c[0] for c in seg.chunks]
                    if self.threads > 1 and len(jobs) > 1 and seg.end - seg.start >= self.PARALLEL_MIN_BYTES:
                        for _ in self.executor().map(one, jobs, [seg.path] * len(jobs), payloads):
                            pass
                    else:
                        for job, payload in zip(jobs, payloads, strict=True):
                            one(job, seg.path, payload)
                    if k + ahead < len(segments):
                        pending[k + ahead] = io.submit(load, k + ahead)
            finally:  # never return (or raise) while a read still writes into this thread's buffers
                for future in pending.values():
                    future.cancel()
                wait(pending.values())

    def read(self, location: str, region: Sequence[slice | np.ndarray | Sequence[int] | None] = (),
             name: str = "cube", dtype: Any = None, out: np.ndarray | None = None) -> np.ndarray:
        """The ``region`` of ``location/name`` (unit-step slices, band indices on the first axis), decoded in
        ``dtype`` (default: the stored one) into ``out`` when given (its shape must match)."""
        info = self.info(location, name)
        if info is None:
            group = zarr.open_group(zarr_store(self.files, f"{self.root}/{location}"), mode="r", zarr_format=3)
            arr = group[name]
            assert isinstance(arr, zarr.Array)
            key: Any = tuple(slice(None) if s is None else s for s in region)
            data = np.asarray(arr[key])
            return data if out is None else _into(out, data)
        norm = normalise_region(info, region)
        shape = tuple(extent(s) for s in norm)
        if out is None:
            out = np.empty(shape, dtype=np.dtype(dtype) if dtype is not None else info.dtype.newbyteorder("="))
        elif out.shape != shape:
            raise ValueError(f"out has shape {out.shape}, the region {shape}")
        if all(shape):
            self.run([(info, idx, pieces) for idx, pieces in plan_chunks(info, norm, out).items()])
        return out

    def read_batch(self, crops: Sequence[tuple[str, int, int]], size: int,
                   bands: Sequence[int] | np.ndarray | None = None, dtype: Any = np.float32,
                   out: np.ndarray | None = None) -> np.ndarray:
        """``(N, bands, size, size)`` crops at (location, y, x), zero-padded bottom/right where a crop passes
        the image edge; every crop must have the same band count. Chunks shared by crops are decoded once."""
        if not crops:
            raise ValueError("read_batch needs at least one crop")
        infos = []
        for location, _, _ in crops:
            info = self.info(location)
            if info is None:
                raise CatalogError(f"{location}: the cube's codecs need zarr-python; read it with read()")
            infos.append(info)
        nb = len(bands) if bands is not None else infos[0].shape[0]
        if out is None:
            out = np.empty((len(crops), nb, size, size), dtype=np.dtype(dtype))
        elif out.shape != (len(crops), nb, size, size):
            raise ValueError(f"out has shape {out.shape}, the batch {(len(crops), nb, size, size)}")
        jobs: dict[tuple[str, tuple[int, ...]], tuple[ArrayInfo, tuple[int, ...], list[Piece]]] = {}
        for n, ((_, y, x), info) in enumerate(zip(crops, infos, strict=True)):
            region = normalise_region(info, (bands, slice(y, y + size), slice(x, x + size)))
            h, w = extent(region[1]), extent(region[2])
            if extent(region[0]) != nb:
                raise ValueError(f"{info.image_id} has {extent(region[0])} bands, the batch {nb}")
            if (h, w) != (size, size):
                out[n, :, h:, :] = 0
                out[n, :, :h, w:] = 0
            for idx, pieces in plan_chunks(info, region, out[n, :, :h, :w]).items():
                jobs.setdefault((info.path, idx), (info, idx, []))[2].extend(pieces)
        self.run(list(jobs.values()))
        return out

    def chunk_files(self, location: str, name: str = "cube") -> list[str]:
        """Every chunk or shard file of an array that exists (for cache eviction in benchmarks)."""
        info = self.info(location, name)
        if info is None:
            return []
        grid = info.grid()
        if info.shard is not None:
            per = info.inner_per_shard
            grid = tuple(-(-g // p) for g, p in zip(grid, per, strict=True))
        return [info.file_key(idx) for idx in np.ndindex(*grid)]


def _put(out: np.ndarray, dst: tuple[Any, ...], chunk: np.ndarray, src: tuple[Any, ...]) -> None:
    """``out[dst] = chunk[src]``. Without a cast, each row's contiguous run is copied as one opaque element
    (numpy then loops per band, not per row: the chunk's short rows cost as much as a plain copy's long ones)."""
    if out.dtype == chunk.dtype and all(isinstance(s, slice) for s in (*dst, *src)):
        d, s = out[dst], chunk[src]
        run = d.shape[-1] * d.itemsize
        if run >= 16 and d.strides[-1] == d.itemsize and s.strides[-1] == s.itemsize:
            row = np.dtype((np.void, run))
            d.view(row)[...] = s.view(row)
            return
    out[dst] = chunk[src]


def _into(out: np.ndarray, data: np.ndarray) -> np.ndarray:
    """``out[...] = data`` after checking the shapes agree."""
    if out.shape != data.shape:
        raise ValueError(f"out has shape {out.shape}, the region {data.shape}")
    out[...] = data
    return out
