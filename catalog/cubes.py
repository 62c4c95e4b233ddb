"""Cube chunk storage: how an image's arrays lie on disk, how ingest writes them and how loaders read them back.

Every image is a Zarr v3 group (see catalog/catalog.py); its ``cube`` array is ``(band, y, x)`` in the smallest
lossless dtype, cut into chunks of ``band_group`` bands x ``chunk_xy`` x ``chunk_xy`` pixels, each chunk encoded as
little-endian bytes, optionally compressed with Blosc, and closed by a CRC-32C (Zarr v3's ``crc32c`` codec), so
any Zarr v3 reader can read the catalog and every chunk is verified whenever it is read. The layout is recorded in
each group (``layout_version``, ``layout``); groups without it are layout 1 (all bands x 64 x 64, Blosc lz4 +
bitshuffle, no checksum) and still read, without a checksum to verify.

The default (chosen from ``bench/loader.py``'s layout table; catalog/README.md has the table and the reasoning):
all bands x 64 x 64 px chunks in 1024 x 1024 px shards, raw bytes (no compressor), CRC-32C per chunk.

- **No compression**: noisy 12-16-bit sensor data barely compresses with codecs fast enough to feed a GPU
  (bit-shuffle + zstd reads 2-7x slower for 0.6-0.7x the bytes); disk is saved by the dtype instead (integer-valued
  floats are stored as integers).
- **All bands x 64 px**: a training crop needs every band of a window; 64 px keeps a 128 px crop at 9 chunks and a
  512 px crop at 1.27x over-read.
- **1024 px shards**: reads cost the same as with a file per chunk, and an image is one file instead of hundreds.
- **CRC-32C**: > 10 GB/s per core, and it catches a flipped byte that would still decode.

The read path (``CubeReader``) does not go through zarr-python's asynchronous pipeline, which costs more than
the decode for these chunks: it parses the array's ``zarr.json`` once, memory-maps chunk and shard files locally
(fsspec elsewhere), verifies each chunk's checksum, decodes it if compressed and copies the window straight into
the caller's output buffer, casting on the way (e.g. to float32), on a pool of threads. A per-process,
byte-bounded chunk cache serves overlapping crops. ``DeviceBatchReader`` reads uncompressed chunks straight into
pinned memory and cuts crops out of them on the GPU, with the CPU path as the fallback.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from queue import Empty, Queue
from typing import Any, Literal

import google_crc32c
import numcodecs.blosc
import numcodecs.gzip
import numcodecs.zstd
import numpy as np
import xarray as xr
import zarr
from xarray.backends import BackendArray
from xarray.core import indexing
from zarr.codecs import BloscCodec, BloscShuffle, BytesCodec, Crc32cCodec

from infra.errors import CatalogError, CorruptChunkError

LAYOUT_VERSION = 2
"""Recorded as ``layout_version`` in every cube group written; a group without it is layout 1."""

Codec = Literal["none", "lz4", "zstd"]
Shuffle = Literal["none", "byte", "bit"]
_SHUFFLES: dict[str, BloscShuffle] = {"none": BloscShuffle.noshuffle, "byte": BloscShuffle.shuffle,
                                      "bit": BloscShuffle.bitshuffle}
_BLOSC_SHUFFLE = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}
_NO_CHUNK = np.uint64(2**64 - 1)  # a shard index entry for an inner chunk that was never written


# ---------------------------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class CubeLayout:
    """How a cube is chunked and encoded: ``band_group`` bands (0 = all) x ``chunk_xy`` x ``chunk_xy`` pixels per
    chunk, ``shard_xy`` pixels per shard edge (0 = one file per chunk), a Blosc ``codec`` ("none" = raw bytes)
    with its ``level`` and ``shuffle``, and a CRC-32C per chunk when ``checksum``."""

    chunk_xy: int = 64
    band_group: int = 0
    shard_xy: int = 1024
    codec: Codec = "none"
    level: int = 1
    shuffle: Shuffle = "none"
    checksum: bool = True

    def __post_init__(self) -> None:
        if self.chunk_xy < 1 or self.band_group < 0 or self.shard_xy < 0:
            raise ValueError(f"{self}: chunk_xy must be >= 1, band_group and shard_xy >= 0")
        if self.shard_xy % self.chunk_xy:  # whole chunks per shard: round the shard edge up
            object.__setattr__(self, "shard_xy", -(-self.shard_xy // self.chunk_xy) * self.chunk_xy)
        if self.codec not in ("none", "lz4", "zstd") or self.shuffle not in _SHUFFLES:
            raise ValueError(f"unknown codec '{self.codec}' or shuffle '{self.shuffle}'")

    def chunk_shape(self, bands: int) -> tuple[int, int, int]:
        """The chunk shape of a cube with ``bands`` bands."""
        return (min(self.band_group, bands) if self.band_group else bands, self.chunk_xy, self.chunk_xy)

    def shard_shape(self, bands: int) -> tuple[int, int, int] | None:
        """The shard shape (all bands, in whole band groups, x ``shard_xy``^2), or None when chunks are files of
        their own."""
        g = self.chunk_shape(bands)[0]
        return (-(-bands // g) * g, self.shard_xy, self.shard_xy) if self.shard_xy else None

    def compressors(self) -> list[Any]:
        """The bytes-to-bytes codecs of a chunk, in Zarr v3 terms (what other Zarr readers see)."""
        out: list[Any] = []
        if self.codec != "none":
            out.append(BloscCodec(cname=self.codec, clevel=self.level, shuffle=_SHUFFLES[self.shuffle]))
        if self.checksum:
            out.append(Crc32cCodec())
        return out

    def describe(self) -> dict[str, Any]:
        """The layout as JSON-able fields (recorded in each group)."""
        return {"chunk_xy": self.chunk_xy, "band_group": self.band_group, "shard_xy": self.shard_xy,
                "codec": self.codec, "level": self.level, "shuffle": self.shuffle, "checksum": self.checksum}

    def label(self) -> str:
        """A short human name, e.g. ``64px allb none+crc``."""
        bands = f"{self.band_group}b" if self.band_group else "allb"
        codec = self.codec if self.codec == "none" else f"{self.codec}{self.level}" + (
            "" if self.shuffle == "none" else f"+{self.shuffle}sh")
        shard = f" shard{self.shard_xy}" if self.shard_xy else ""
        return f"{self.chunk_xy}px {bands}{shard} {codec}{'+crc' if self.checksum else ''}"


# ---------------------------------------------------------------------------------------------- file access
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
            _writev_all(fd, parts)
        finally:
            os.close(fd)

    def makedirs(self, path: str) -> None:
        """Create a folder and its parents (a no-op on object stores)."""
        if self.local:
            os.makedirs(path, exist_ok=True)


def _writev_all(fd: int, parts: Sequence[Any]) -> int:
    views = [memoryview(p).cast("B") for p in parts]
    total = sum(v.nbytes for v in views)
    done = 0
    while views:
        n = os.writev(fd, views)
        done += n
        while views and n >= views[0].nbytes:
            n -= views[0].nbytes
            views.pop(0)
        if views and n:
            views[0] = views[0][n:]
    return total


# ---------------------------------------------------------------------------------------------- array metadata
@dataclass(frozen=True)
class ArrayInfo:
    """What the direct reader needs to know about one Zarr v3 array, parsed from its ``zarr.json``."""

    path: str
    image_id: str
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    chunks: tuple[int, ...]
    shard: tuple[int, ...] | None
    compressor: str | None  # "blosc", "zstd", "gzip" or None (raw bytes)
    checksum: bool
    index_checksum: bool
    index_at_end: bool
    fill_value: Any
    key_prefix: str
    separator: str

    @property
    def chunk_nbytes(self) -> int:
        return int(np.prod(self.chunks)) * self.dtype.itemsize

    @property
    def inner_per_shard(self) -> tuple[int, ...]:
        assert self.shard is not None
        return tuple(s // c for s, c in zip(self.shard, self.chunks, strict=True))

    def file_key(self, grid_index: Sequence[int]) -> str:
        """The path of the chunk (or shard) file at ``grid_index`` of the file grid."""
        return self.path + "/" + self.key_prefix + self.separator.join(str(int(i)) for i in grid_index)

    def grid(self) -> tuple[int, ...]:
        """Chunks per dimension."""
        return tuple(-(-s // c) for s, c in zip(self.shape, self.chunks, strict=True))

    def fill_chunk(self) -> np.ndarray:
        """A chunk that was never written: the fill value everywhere (read-only)."""
        out = np.full(self.chunks, self.fill_value, dtype=self.dtype)
        out.flags.writeable = False
        return out


_NAMED_FILLS = {"NaN": np.nan, "Infinity": np.inf, "-Infinity": -np.inf}


def parse_array_meta(meta: dict[str, Any], path: str, image_id: str, name: str) -> ArrayInfo | None:
    """The direct-read description of an array, or None when its codecs are not ones the direct reader decodes
    (then zarr-python reads it)."""
    if meta.get("zarr_format") != 3 or meta.get("storage_transformers"):
        return None
    grid = meta.get("chunk_grid", {})
    if grid.get("name") != "regular" or not isinstance(meta.get("data_type"), str):
        return None
    try:
        dtype = np.dtype(meta["data_type"])
    except TypeError:
        return None
    if dtype.kind not in "biuf":
        return None
    chunks = tuple(int(c) for c in grid["configuration"]["chunk_shape"])
    codecs = meta.get("codecs", [])
    shard: tuple[int, ...] | None = None
    index_checksum, index_at_end = False, True
    if len(codecs) == 1 and codecs[0].get("name") == "sharding_indexed":
        conf = codecs[0]["configuration"]
        shard, chunks = chunks, tuple(int(c) for c in conf["chunk_shape"])
        index_codecs = [c.get("name") for c in conf.get("index_codecs", [])]
        if index_codecs not in (["bytes"], ["bytes", "crc32c"]):
            return None
        if any(c.get("configuration", {}).get("endian", "little") != "little" for c in conf["index_codecs"]):
            return None
        index_checksum = index_codecs[-1] == "crc32c"
        index_at_end = conf.get("index_location", "end") == "end"
        codecs = conf["codecs"]
    names = [c.get("name") for c in codecs]
    if not names or names[0] != "bytes":
        return None
    endian = codecs[0].get("configuration", {}).get("endian", "little")
    dtype = dtype.newbyteorder("<" if endian == "little" else ">") if dtype.itemsize > 1 else dtype
    rest = names[1:]
    checksum = bool(rest) and rest[-1] == "crc32c"
    if checksum:
        rest = rest[:-1]
    if len(rest) > 1 or (rest and rest[0] not in ("blosc", "zstd", "gzip")):
        return None
    enc = meta.get("chunk_key_encoding", {"name": "default"})
    separator = enc.get("configuration", {}).get("separator", "/" if enc.get("name") == "default" else ".")
    prefix = "c" + separator if enc.get("name") == "default" else ""
    fill = meta.get("fill_value", 0)
    fill = _NAMED_FILLS.get(fill, fill) if isinstance(fill, str) else fill
    return ArrayInfo(path=path, image_id=image_id, name=name, shape=tuple(int(s) for s in meta["shape"]),
                     dtype=dtype, chunks=chunks, shard=shard, compressor=rest[0] if rest else None,
                     checksum=checksum, index_checksum=index_checksum, index_at_end=index_at_end,
                     fill_value=fill, key_prefix=prefix, separator=separator)


# ---------------------------------------------------------------------------------------------- chunk cache
class ChunkCache:
    """Decoded, verified chunks of one process, least recently used first out, bounded in bytes (overlapping
    crops of one image read each chunk once). Thread-safe; 0 bytes disables it."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.nbytes = 0
        self.hits = 0
        self.misses = 0
        self._items: OrderedDict[tuple[str, tuple[int, ...]], np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, tuple[int, ...]]) -> np.ndarray | None:
        """The cached chunk or None (counted as a hit or a miss)."""
        with self._lock:
            chunk = self._items.get(key)
            if chunk is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return chunk

    def __contains__(self, key: tuple[str, tuple[int, ...]]) -> bool:
        return key in self._items

    def drop(self, prefix: str) -> None:
        """Forget the chunks of arrays whose path starts with ``prefix`` (their files were rewritten)."""
        with self._lock:
            for key in [k for k in self._items if k[0].startswith(prefix)]:
                self.nbytes -= self._items.pop(key).nbytes

    def put(self, key: tuple[str, tuple[int, ...]], chunk: np.ndarray) -> None:
        """Keep a (read-only) chunk, evicting the least recently used ones beyond ``max_bytes``."""
        if chunk.nbytes > self.max_bytes:
            return
        chunk.flags.writeable = False
        with self._lock:
            old = self._items.pop(key, None)
            self.nbytes += chunk.nbytes - (old.nbytes if old is not None else 0)
            self._items[key] = chunk
            while self.nbytes > self.max_bytes:
                self.nbytes -= self._items.popitem(last=False)[1].nbytes


# ---------------------------------------------------------------------------------------------- regions
Region = tuple[slice | np.ndarray, ...]
"""A read request per dimension: a unit-step slice, or (first dimension only) a sorted array of band indices."""


@dataclass
class _Piece:
    """One chunk's share of one output: which part of the chunk goes where in ``out``."""

    out: np.ndarray
    dst: tuple[Any, ...]
    src: tuple[Any, ...]


def _plan(info: ArrayInfo, region: Region, out: np.ndarray) -> dict[tuple[int, ...], list[_Piece]]:
    """Chunk grid index -> the pieces of ``out`` it fills, for one region of one array."""
    axes: list[list[tuple[int, Any, Any]]] = []  # per dim: (chunk index, src selector, dst selector)
    for d, (sel, c, n) in enumerate(zip(region, info.chunks, info.shape, strict=True)):
        entries: list[tuple[int, Any, Any]] = []
        if isinstance(sel, slice):
            lo, hi = sel.start or 0, n if sel.stop is None else sel.stop
            for k in range(lo // c, (hi - 1) // c + 1 if hi > lo else lo // c):
                a, b = max(lo, k * c), min(hi, (k + 1) * c)
                entries.append((k, slice(a - k * c, b - k * c), slice(a - lo, b - lo)))
        else:
            if d != 0:
                raise ValueError("index arrays are supported on the band axis only")
            idx = np.asarray(sel, dtype=np.int64)
            for k in np.unique(idx // c):
                pos = np.flatnonzero(idx // c == k)
                local = idx[pos] - k * c
                if local.size and np.all(np.diff(local) == 1) and np.all(np.diff(pos) == 1):
                    entries.append((int(k), slice(int(local[0]), int(local[-1]) + 1),
                                    slice(int(pos[0]), int(pos[-1]) + 1)))
                else:
                    entries.append((int(k), local, pos))
        axes.append(entries)
    plan: dict[tuple[int, ...], list[_Piece]] = {}
    for combo in _product(axes):
        grid_index: tuple[int, ...] = tuple(int(e[0]) for e in combo)
        plan.setdefault(grid_index, []).append(_Piece(out, tuple(e[2] for e in combo), tuple(e[1] for e in combo)))
    return plan


def _product(axes: list[list[Any]]) -> Iterator[tuple[Any, ...]]:
    if not axes:
        yield ()
        return
    for head in axes[0]:
        for tail in _product(axes[1:]):
            yield (head, *tail)


def _normalise_region(info: ArrayInfo, region: Sequence[slice | np.ndarray | Sequence[int] | None]) -> Region:
    """Clip slices to the array, turn band lists into sorted unique index arrays; missing trailing dims = all."""
    out: list[slice | np.ndarray] = []
    full = list(region) + [None] * (len(info.shape) - len(region))
    for d, (sel, n) in enumerate(zip(full, info.shape, strict=True)):
        if sel is None:
            out.append(slice(0, n))
        elif isinstance(sel, slice):
            lo, hi, step = sel.indices(n)
            if step != 1:
                raise ValueError("the direct reader takes unit-step slices; slice the result for strides")
            out.append(slice(lo, max(lo, hi)))
        else:
            idx = np.asarray(sel, dtype=np.int64).ravel()
            if d != 0:
                raise ValueError("index arrays are supported on the band axis only")
            if idx.size and (np.any(np.diff(idx) <= 0) or idx[0] < 0 or idx[-1] >= n):
                raise ValueError(f"band indices must be increasing, unique and within 0..{n - 1}")
            out.append(idx)
    return tuple(out)


def _extent(sel: slice | np.ndarray) -> int:
    return sel.stop - sel.start if isinstance(sel, slice) else int(sel.size)


# ---------------------------------------------------------------------------------------------- reader
class CubeReader:
    """Reads windows, whole arrays and batches of crops from a catalog's cube groups, verifying each chunk's
    checksum. One per process (each DataLoader worker builds its own); thread-safe.

    ``threads`` decode threads (1: decode in the caller's thread, what a DataLoader worker wants);
    ``cache_bytes`` bounds the chunk cache (0: none).
    """

    #: Below this many bytes of chunks a read stays on the calling thread (thread hand-off costs more).
    PARALLEL_MIN_BYTES = 2 * 2**20

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
        per = info.inner_per_shard
        path, index = self._shard_entries(info, tuple(i // p for i, p in zip(idx, per, strict=True)))
        if index is None:
            return path, None
        flat = int(np.ravel_multi_index(tuple(i % p for i, p in zip(idx, per, strict=True)), per))
        offset, nbytes = index[flat]
        if offset == _NO_CHUNK and nbytes == _NO_CHUNK:
            return path, None
        raw = self.files.read_range(path, int(offset), int(nbytes), into)
        if raw is None or raw.size != int(nbytes):
            raise self._corrupt(info, idx, path, f"the shard holds {0 if raw is None else raw.size} of the "
                                f"{int(nbytes)} bytes its index promises (truncated file)")
        return path, raw

    def decode(self, info: ArrayInfo, idx: tuple[int, ...], path: str, raw: np.ndarray) -> np.ndarray:
        """Verify and decode one chunk's stored bytes into a chunk-shaped array (a view of ``raw`` or of this
        thread's decode buffer: copy it before the thread decodes the next chunk)."""
        payload = raw
        if info.checksum:
            if raw.size < 4:
                raise self._corrupt(info, idx, path, f"{raw.size} bytes, shorter than its 4-byte checksum")
            payload = raw[:-4]
            stored = int.from_bytes(raw[-4:].tobytes(), "little")
            computed = google_crc32c.value(payload)
            if computed != stored:
                raise self._corrupt(info, idx, path, f"crc32c checksum mismatch (stored {stored:08x}, "
                                    f"computed {computed:08x})")
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

    def run(self, jobs: list[tuple[ArrayInfo, tuple[int, ...], list[_Piece]]]) -> None:
        """Decode each job's chunk once and copy it into every piece that needs it, in parallel when large.
        Locally every chunk file is mapped first, so that their disk reads (if cold) start together."""
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

    def read(self, location: str, region: Sequence[slice | np.ndarray | Sequence[int] | None] = (),
             name: str = "cube", dtype: Any = None, out: np.ndarray | None = None) -> np.ndarray:
        """The ``region`` of ``location/name`` (unit-step slices, band indices on the first axis), decoded in
        ``dtype`` (default: the stored one) into ``out`` when given (its shape must match)."""
        info = self.info(location, name)
        if info is None:
            group = zarr.open_group(_zarr_store(self.files, f"{self.root}/{location}"), mode="r", zarr_format=3)
            arr = group[name]
            assert isinstance(arr, zarr.Array)
            key: Any = tuple(slice(None) if s is None else s for s in region)
            data = np.asarray(arr[key])
            return data if out is None else _into(out, data)
        norm = _normalise_region(info, region)
        shape = tuple(_extent(s) for s in norm)
        if out is None:
            out = np.empty(shape, dtype=np.dtype(dtype) if dtype is not None else info.dtype.newbyteorder("="))
        elif out.shape != shape:
            raise ValueError(f"out has shape {out.shape}, the region {shape}")
        if all(shape):
            self.run([(info, idx, pieces) for idx, pieces in _plan(info, norm, out).items()])
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
        jobs: dict[tuple[str, tuple[int, ...]], tuple[ArrayInfo, tuple[int, ...], list[_Piece]]] = {}
        for n, ((_, y, x), info) in enumerate(zip(crops, infos, strict=True)):
            region = _normalise_region(info, (bands, slice(y, y + size), slice(x, x + size)))
            h, w = _extent(region[1]), _extent(region[2])
            if _extent(region[0]) != nb:
                raise ValueError(f"{info.image_id} has {_extent(region[0])} bands, the batch {nb}")
            if (h, w) != (size, size):
                out[n, :, h:, :] = 0
                out[n, :, :h, w:] = 0
            for idx, pieces in _plan(info, region, out[n, :, :h, :w]).items():
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
    if out.shape != data.shape:
        raise ValueError(f"out has shape {out.shape}, the region {data.shape}")
    out[...] = data
    return out


def _zarr_store(files: FileAccess, path: str) -> Any:
    """The zarr-python store of a folder (local, or an fsspec URL built from the file system's protocol)."""
    if files.local:
        return zarr.storage.LocalStore(path)
    return zarr.storage.FsspecStore.from_url(files.fs.unstrip_protocol(path))


# ---------------------------------------------------------------------------------------------- writing
@dataclass
class CubeWrite:
    """Everything needed to store one image; ``data`` is a lazy (band, y, x) array read tile by tile.

    ``store_dtype`` is the dtype to store (None: the source's); ingest picks the smallest lossless one from a
    sample, and the writer checks every chunk, widening and starting over if a chunk would not round-trip.
    """

    dataset: str
    image_id: str
    key: str
    sha256: str
    data: Any
    wavelength_nm: np.ndarray
    attrs: dict[str, Any]
    fwhm_nm: np.ndarray | None = None
    rgb: np.ndarray | None = None
    extras: dict[str, np.ndarray] = field(default_factory=dict)
    store_dtype: np.dtype | None = None
    index_fields: dict[str, Any] = field(default_factory=dict)
    """Split, pretraining, label and sequence columns of the index row (see catalog/annotations.py)."""


class _Widen(Exception):
    """A chunk does not round-trip through the storage dtype: write again with ``dtype``."""

    def __init__(self, dtype: np.dtype) -> None:
        super().__init__(f"widen to {dtype}")
        self.dtype = dtype


_INTS = [np.dtype(t) for t in ("uint8", "int8", "uint16", "int16", "uint32", "int32", "int64")]


def smallest_int(lo: float, hi: float) -> np.dtype | None:
    """The smallest integer dtype holding [lo, hi] (None when none does)."""
    for t in _INTS:
        info = np.iinfo(t)
        if info.min <= lo and hi <= info.max:
            return t
    return None


def lossless_dtype(sample: np.ndarray, source: np.dtype) -> np.dtype:
    """The smallest dtype that stores ``sample`` (drawn from a cube of dtype ``source``) exactly: integers for
    integer-valued data (floats included: MATLAB doubles that hold counts), float32 for float64 values that
    round-trip, else the source dtype. Never wider than the source."""
    source = np.dtype(source)
    if sample.size == 0 or source.kind not in "uif":
        return source
    if source.kind == "f" and not np.all(np.isfinite(sample)):
        return source
    lo, hi = float(sample.min()), float(sample.max())
    if source.kind in "ui" or np.array_equal(sample, np.round(sample)):
        cand = smallest_int(lo, hi)
        if cand is not None and cand.itemsize <= source.itemsize and (
                source.kind in "ui" or (abs(lo) < 2**53 and abs(hi) < 2**53)):
            return cand
    if source == np.float64 and np.array_equal(sample.astype(np.float32), sample):
        return np.dtype(np.float32)
    return source


def dtype_sample(data: Any, rows: int = 16) -> np.ndarray:
    """Values to guess the storage dtype from: an in-memory cube whole, a lazy one's top, middle and bottom
    ``rows`` rows (all bands and columns)."""
    if isinstance(data, np.ndarray):
        return data
    h = int(data.shape[1])
    starts = sorted({0, max(0, h // 2 - rows // 2), max(0, h - rows)})
    return np.concatenate([np.asarray(data[:, y:y + rows, :]).reshape(-1) for y in starts])


def _wider(current: np.dtype, block: np.ndarray, source: np.dtype) -> np.dtype:
    """The storage dtype after ``block`` failed to round-trip through ``current``."""
    if block.dtype.kind == "f" and not np.all(np.isfinite(block)):
        return source
    lo, hi = float(block.min()), float(block.max())
    if current.kind in "ui" and (block.dtype.kind in "ui" or np.array_equal(block, np.round(block))):
        cur = np.iinfo(current)
        cand = smallest_int(min(lo, cur.min), max(hi, cur.max))
        if cand is not None and cand.itemsize <= source.itemsize and cand != current:
            return cand
    if source == np.float64 and current != np.float32 and (current.kind == "f" or current.itemsize <= 2) \
            and np.array_equal(block.astype(np.float32), block):
        return np.dtype(np.float32)
    return source


class _ChunkSink:
    """Where encoded chunks go: one file each, or appended to shard files whose index is written on close."""

    def __init__(self, files: FileAccess, info: ArrayInfo) -> None:
        self.files = files
        self.info = info
        self._dirs: set[str] = set()
        self._shards: dict[tuple[int, ...], tuple[Any, np.ndarray, list[int]]] = {}

    def put_file(self, idx: tuple[int, ...], parts: Sequence[Any]) -> None:
        """Write one unsharded chunk file (thread-safe: each chunk has its own file)."""
        path = self.info.file_key(idx)
        folder = path.rsplit("/", 1)[0]
        if folder not in self._dirs:
            self.files.makedirs(folder)
            self._dirs.add(folder)
        self.files.write(path, parts)

    def put_inner(self, idx: tuple[int, ...], parts: Sequence[Any]) -> None:
        """Append one inner chunk to its shard (called in order from one thread)."""
        per = self.info.inner_per_shard
        sidx = tuple(i // p for i, p in zip(idx, per, strict=True))
        entry = self._shards.get(sidx)
        if entry is None:
            path = self.info.file_key(sidx)
            self.files.makedirs(path.rsplit("/", 1)[0])
            # streamed: locally appended, elsewhere through fsspec's buffered (multipart) writer
            handle: Any = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644) if self.files.local \
                else self.files.fs.open(path, "wb")
            index = np.full((int(np.prod(per)), 2), _NO_CHUNK, dtype="<u8")
            entry = self._shards[sidx] = (handle, index, [0])
        handle, index, offset = entry
        if self.files.local:
            n = _writev_all(handle, parts)
        else:
            n = sum(handle.write(memoryview(p).cast("B")) or 0 for p in parts)
        index[int(np.ravel_multi_index(tuple(i % p for i, p in zip(idx, per, strict=True)), per))] = (offset[0], n)
        offset[0] += n

    def finish_shards(self, rows_done: int | None = None) -> None:
        """Write the index of every open shard whose rows all lie before chunk row ``rows_done`` (all: None)."""
        per_y = self.info.inner_per_shard[1] if self.info.shard else 1
        for sidx in sorted(self._shards):
            if rows_done is not None and (sidx[1] + 1) * per_y > rows_done:
                continue
            handle, index, _ = self._shards.pop(sidx)
            tail = [index] + ([np.uint32(google_crc32c.value(index.view(np.uint8).ravel())).reshape(1)
                               .astype("<u4")] if self.info.index_checksum else [])
            if self.files.local:
                try:
                    _writev_all(handle, tail)
                finally:
                    os.close(handle)
            else:
                with handle:
                    for part in tail:
                        handle.write(part.tobytes())

    def abort(self) -> None:
        """Close open shard files after a failure (the caller removes the folder)."""
        for handle, _, _ in self._shards.values():
            if self.files.local:
                os.close(handle)
            else:
                handle.close()
        self._shards.clear()


def _encode(layout: CubeLayout, buf: np.ndarray) -> list[Any]:
    """A chunk's stored parts: the (compressed) bytes and the CRC-32C over them."""
    parts: list[Any] = [buf]
    if layout.codec != "none":
        parts = [numcodecs.blosc.compress(buf, layout.codec.encode(), layout.level,
                                          _BLOSC_SHUFFLE[_SHUFFLES[layout.shuffle].value], 0)]
    if layout.checksum:
        body = parts[0] if isinstance(parts[0], np.ndarray) else np.frombuffer(parts[0], dtype=np.uint8)
        parts.append(int(google_crc32c.value(body.reshape(-1).view(np.uint8))).to_bytes(4, "little"))
    return parts


def write_cube_array(files: FileAccess, group: zarr.Group, group_path: str, cw: CubeWrite, dtype: np.dtype,
                     layout: CubeLayout, check: Callable[[np.ndarray, Any, int], None],
                     on_strip: Callable[[int], None] | None, tile_bytes: int, threads: int = 2) -> str:
    """Create the group's ``cube`` array and stream the source into it tile by tile; returns the content sha256.

    Chunk-row tiles (at most ``tile_bytes``) are read one ahead on their own thread; each 64-pixel column of a
    tile is transposed, cast, checked to round-trip, encoded and written on ``threads`` threads; the content
    hash runs in order on the calling thread (hashing, copies, compression and writes release the GIL). The
    hash covers every all-band chunk column (clipped at the edges) in row-major order, so ``hash_tile`` is the
    chunk edge. Raises ``_Widen`` when a chunk does not fit ``dtype``.
    """
    b, h, w = (int(s) for s in cw.data.shape)
    source = np.dtype(cw.data.dtype)
    chunk = layout.chunk_shape(b)
    shard = layout.shard_shape(b)
    group.create_array("cube", shape=(b, h, w), chunks=chunk, shards=shard, dtype=dtype,
                       serializer=BytesCodec(endian="little"), compressors=layout.compressors(), fill_value=0,
                       dimension_names=("band", "y", "x"), attributes={"source_dtype": source.str})
    info = parse_array_meta(json.loads(files.read(f"{group_path}/cube/zarr.json").tobytes()),  # type: ignore
                            f"{group_path}/cube", cw.image_id, "cube")
    assert info is not None, "the writer's own layout must be directly readable"
    sink = _ChunkSink(files, info)
    cxy, g = layout.chunk_xy, chunk[0]
    narrowing = dtype != source
    src_path = cw.attrs.get("source_path", group_path)

    def encode_column(block: np.ndarray, j: int, i: int, xs: int) -> list[tuple[tuple[int, ...], list[Any],
                                                                                  np.ndarray]]:
        col = block[:, :, xs:xs + cxy]
        rows, cols = col.shape[1], col.shape[2]
        out: list[tuple[tuple[int, ...], list[Any], np.ndarray]] = []
        for k in range(0, b, g):
            buf = np.empty(chunk, dtype=dtype) if (rows, cols) == (cxy, cxy) and k + g <= b else \
                np.zeros(chunk, dtype=dtype)
            part = col[k:k + g]
            view = buf[: part.shape[0], :rows, :cols]
            np.copyto(view, part, casting="unsafe")
            if narrowing and not np.array_equal(view, part):
                raise _Widen(_wider(dtype, np.asarray(part), source))
            parts = _encode(layout, buf)
            if shard is None:
                sink.put_file((k // g, j, i), parts)
            out.append(((k // g, j, i), parts, view))
        return out

    hasher = hashlib.sha256()
    cols = _tile_cols(b, dtype, cxy, w, tile_bytes)
    try:
        with ThreadPoolExecutor(max(1, threads), thread_name_prefix="hvp-encode") as pool:
            for y0, x0, block in _prefetch(_tiles(cw.data, (b, h, w), cxy, cols)):
                check(block, src_path, y0)
                futures: list[Future[list[tuple[tuple[int, ...], list[Any], np.ndarray]]]] = [
                    pool.submit(encode_column, block, y0 // cxy, (x0 + xs) // cxy, xs)
                    for xs in range(0, block.shape[2], cxy)]
                try:
                    for fut in futures:
                        for idx, parts, view in fut.result():
                            hasher.update(np.ascontiguousarray(view).data)
                            if shard is not None:
                                sink.put_inner(idx, parts)
                finally:
                    for fut in futures:
                        fut.cancel()
                if x0 + block.shape[2] == w:
                    if shard is not None:
                        sink.finish_shards(y0 // cxy + 1)
                    if on_strip is not None:
                        on_strip(block.shape[1])
            sink.finish_shards()
    except BaseException:
        sink.abort()
        raise
    return hasher.hexdigest()


def _tile_cols(bands: int, dtype: np.dtype, cxy: int, width: int, tile_bytes: int) -> int:
    """Tile width: whole chunks, as many as fit ``tile_bytes`` (at least one)."""
    per_chunk_col = bands * cxy * cxy * dtype.itemsize
    return min(width, max(1, tile_bytes // per_chunk_col) * cxy)


def _tiles(data: Any, shape: tuple[int, int, int], rows: int, cols: int) -> Iterator[tuple[int, int, np.ndarray]]:
    """(y0, x0, block) tiles of ``rows`` x ``cols`` over all bands, row-major, in the source's dtype and memory
    order (a reader's lazy view is read here; memory-mapped sources are read by the encoding threads)."""
    _, h, w = shape
    for y0 in range(0, h, rows):
        for x0 in range(0, w, cols):
            yield y0, x0, np.asarray(data[:, y0:y0 + rows, x0:x0 + cols])


def _prefetch(items: Iterator[Any], depth: int = 1) -> Iterator[Any]:
    """Yield ``items`` while a background thread already produces the next ``depth`` of them (errors re-raised)."""
    queue: Queue[Any] = Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                queue.put(item)
            queue.put(done)
        except BaseException as exc:  # handed to the consumer, which re-raises it
            queue.put(exc)

    thread = threading.Thread(target=produce, name="hvp-prefetch", daemon=True)
    thread.start()
    try:
        while (item := queue.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue, then let it finish
            with contextlib.suppress(Empty):
                queue.get_nowait()
            thread.join(0.01)


def write_group(files: FileAccess, group_path: str, cw: CubeWrite, layout: CubeLayout,
                check: Callable[[np.ndarray, Any, int], None], on_strip: Callable[[int], None] | None,
                tile_bytes: int) -> tuple[str, np.dtype]:
    """Write one image's group (cube, wavelength, fwhm, rgb, extras) at ``group_path``; returns the content
    sha256 and the dtype stored. Starts over with a wider dtype when a chunk does not fit the chosen one."""
    dtype = np.dtype(cw.store_dtype if cw.store_dtype is not None else cw.data.dtype)
    for _ in range(len(_INTS) + 2):
        group = zarr.open_group(_zarr_store(files, group_path), mode="w", zarr_format=3)
        group.create_array("wavelength", data=np.asarray(cw.wavelength_nm, dtype=np.float64),
                           dimension_names=("band",), attributes={"units": "nm"})
        if cw.fwhm_nm is not None:
            group.create_array("fwhm", data=np.asarray(cw.fwhm_nm, dtype=np.float64), dimension_names=("band",),
                               attributes={"units": "nm"})
        if cw.rgb is not None:
            rgb = group.create_array("rgb", shape=cw.rgb.shape, dtype=np.uint8,
                                     chunks=(layout.chunk_xy, layout.chunk_xy, 3),
                                     dimension_names=("y", "x", "channel"), compressors=layout.compressors())
            rgb[...] = np.ascontiguousarray(cw.rgb, dtype=np.uint8)
        if cw.extras:
            extras = group.create_group("extras")
            for name, arr in cw.extras.items():
                extras.create_array(name, data=np.ascontiguousarray(arr))
        try:
            sha = write_cube_array(files, group, group_path, cw, dtype, layout, check, on_strip, tile_bytes)
        except _Widen as widen:
            dtype = widen.dtype
            continue
        group.attrs.update({**jsonable(cw.attrs), "dataset": cw.dataset, "image_id": cw.image_id,
                            "source_sha256": cw.sha256, "hash_tile": [layout.chunk_xy, layout.chunk_xy],
                            "layout_version": LAYOUT_VERSION, "layout": layout.describe(),
                            "source_dtype": np.dtype(cw.data.dtype).str, "complete": False})
        return sha, dtype
    raise CatalogError(f"{cw.image_id}: no storage dtype round-trips the data (a bug: the source dtype always does)")


def jsonable(attrs: dict[str, Any]) -> dict[str, Any]:
    """Zarr attrs must be JSON: numpy scalars and arrays become Python values."""
    out: dict[str, Any] = {}
    for k, v in attrs.items():
        if isinstance(v, np.generic):
            v = v.item()
        elif isinstance(v, np.ndarray):
            v = v.tolist()
        elif isinstance(v, os.PathLike):
            v = os.fspath(v)
        out[k] = v
    return out


# ---------------------------------------------------------------------------------------------- xarray view
class _LazyCube(BackendArray):
    """An array of a catalog group as xarray's lazy backend array: every selection goes through CubeReader
    (checksummed, only the chunks it touches)."""

    def __init__(self, reader: CubeReader, location: str, name: str, shape: tuple[int, ...], dtype: np.dtype):
        self.reader, self.location, self.name = reader, location, name
        self.shape = shape
        self.dtype = dtype

    def __getitem__(self, key: indexing.ExplicitIndexer) -> np.ndarray:
        return indexing.explicit_indexing_adapter(key, self.shape, indexing.IndexingSupport.BASIC, self._get)

    def _get(self, key: tuple[Any, ...]) -> np.ndarray:
        region: list[slice] = []
        after: list[int | np.ndarray | None] = []
        for k, n in zip(key, self.shape, strict=True):
            if isinstance(k, int | np.integer):
                i = int(k) + (n if int(k) < 0 else 0)
                region.append(slice(i, i + 1))
                after.append(0)
                continue
            picked = np.arange(n)[k]
            if picked.size == 0:
                region.append(slice(0, 0))
                after.append(None)
            elif k.step in (None, 1):
                region.append(slice(int(picked[0]), int(picked[-1]) + 1))
                after.append(None)
            else:
                lo = int(picked.min())
                region.append(slice(lo, int(picked.max()) + 1))
                after.append(picked - lo)
        data = self.reader.read(self.location, tuple(region), self.name)
        for axis in reversed(range(len(after))):
            sel = after[axis]
            if sel is not None:
                data = np.take(data, sel, axis=axis)
        return data


def open_dataarray(reader: CubeReader, location: str, name: str = "cube") -> xr.DataArray:
    """The array ``location/name`` as a lazy DataArray with its dimension names, the group's ``wavelength`` and
    ``fwhm`` as coordinates along the first dimension, and the group's and array's attributes."""
    meta = reader.metadata(f"{reader.root}/{location}/{name}/zarr.json")
    shape = tuple(int(s) for s in meta["shape"])
    dims = tuple(meta.get("dimension_names") or (f"dim_{i}" for i in range(len(shape))))
    info = reader.info(location, name)
    dtype = info.dtype.newbyteorder("=") if info is not None else np.dtype(meta["data_type"])
    var = xr.Variable(dims, indexing.LazilyIndexedArray(_LazyCube(reader, location, name, shape, dtype)))
    coords = {}
    for coord in ("wavelength", "fwhm"):
        with contextlib.suppress(FileNotFoundError):
            values = reader.read(location, (), coord)
            coords[coord] = xr.Variable((dims[0],), values, attrs=dict(
                reader.metadata(f"{reader.root}/{location}/{coord}/zarr.json").get("attributes", {})))
    da = xr.DataArray(var, coords=coords, name=name)
    da.attrs = {**reader.group_attrs(location), **meta.get("attributes", {})}
    return da


# ---------------------------------------------------------------------------------------------- device batches
_TORCH_DTYPES = {"u1": "uint8", "i1": "int8", "u2": "uint16", "i2": "int16", "u4": "uint32", "i4": "int32",
                 "i8": "int64", "f4": "float32", "f8": "float64"}


def cuda_available() -> bool:
    """True when torch sees a CUDA device (torch is imported only here and on the device path)."""
    import torch

    return bool(torch.cuda.is_available())


def pinned_empty(shape: tuple[int, ...], dtype: Any) -> tuple[Any, np.ndarray]:
    """A page-locked host tensor when CUDA is present (else an ordinary one) and its numpy view, so a batch read
    lands where the host-to-device copy reads it."""
    import torch

    tensor = torch.empty(shape, dtype=getattr(torch, np.dtype(dtype).name), pin_memory=cuda_available())
    return tensor, tensor.numpy()


class DeviceBatchReader:
    """Batches of crops as float32 tensors on ``device``, behind the same request as ``CubeReader.read_batch``.

    Staged path (CUDA, uncompressed chunks, or ``staged=True``): every chunk the batch touches is read straight
    into one page-locked staging buffer and its checksum verified there, the buffer goes to the device in one
    transfer, and the crops are cut out and cast to float32 on the device; the CPU only reads and checks.
    Otherwise the CPU decodes into a pinned batch that is copied over asynchronously (the fallback).
    """

    SLOT_ALIGN = 64

    def __init__(self, reader: CubeReader, device: Any, staged: bool | None = None) -> None:
        import torch

        self.reader = reader
        self.device = torch.device(device)
        self.staged = self.device.type == "cuda" if staged is None else staged
        self._staging: Any = None
        self._in_flight: Any = None  # CUDA event of the last transfer out of the staging buffer

    def read_batch(self, crops: Sequence[tuple[str, int, int]], size: int,
                   bands: Sequence[int] | np.ndarray | None = None) -> Any:
        """``(N, bands, size, size)`` float32 crops on the device, zero-padded past the image edge."""
        infos = [self.reader.info(location) for location, _, _ in crops]
        if self.staged and all(i is not None and i.compressor is None and i.dtype.str[1:] in _TORCH_DTYPES
                               and i.dtype.byteorder in "<|=" for i in infos):
            return self._staged(crops, [i for i in infos if i is not None], size, bands)
        tensor, view = pinned_empty((len(crops), len(bands) if bands is not None else infos[0].shape[0]
                                     if infos[0] else 0, size, size), np.float32)
        self.reader.read_batch(crops, size, bands, np.float32, out=view)
        return tensor.to(self.device, non_blocking=True)

    def _buffer(self, nbytes: int) -> Any:
        import torch

        if self._in_flight is not None:
            self._in_flight.synchronize()  # the previous batch has left the staging buffer
            self._in_flight = None
        if self._staging is None or self._staging.numel() < nbytes:
            pin = self.device.type == "cuda"
            self._staging = torch.empty(max(nbytes, 1 << 20), dtype=torch.uint8, pin_memory=pin)
        return self._staging

    def _staged(self, crops: Sequence[tuple[str, int, int]], infos: list[ArrayInfo], size: int,
                bands: Sequence[int] | np.ndarray | None) -> Any:
        import torch

        nb = len(bands) if bands is not None else infos[0].shape[0]
        placeholder = np.empty(0)
        slots: dict[tuple[str, tuple[int, ...]], tuple[ArrayInfo, tuple[int, ...], int]] = {}
        plans: list[tuple[ArrayInfo, dict[tuple[int, ...], list[_Piece]], int, int]] = []
        offset = 0
        for (_, y, x), info in zip(crops, infos, strict=True):
            region = _normalise_region(info, (bands, slice(y, y + size), slice(x, x + size)))
            if _extent(region[0]) != nb:
                raise ValueError(f"{info.image_id} has {_extent(region[0])} bands, the batch {nb}")
            plan = _plan(info, region, placeholder)
            for idx in plan:
                if (info.path, idx) not in slots:
                    slots[(info.path, idx)] = (info, idx, offset)
                    offset += -(-(info.chunk_nbytes + 4) // self.SLOT_ALIGN) * self.SLOT_ALIGN
            plans.append((info, plan, _extent(region[1]), _extent(region[2])))
        staging = self._buffer(offset)
        host = staging.numpy()

        def fetch(slot: tuple[ArrayInfo, tuple[int, ...], int]) -> None:
            info, idx, off = slot
            room = host[off: off + info.chunk_nbytes + 4]
            path, raw = self.reader.stored_chunk(info, idx, into=room)
            if raw is None:
                room[: info.chunk_nbytes] = info.fill_chunk().view(np.uint8).ravel()
                return
            chunk = self.reader.decode(info, idx, path, raw)  # verifies the checksum in place
            if not np.shares_memory(chunk, room):
                room[: info.chunk_nbytes] = chunk.view(np.uint8).ravel()

        jobs = list(slots.values())
        if self.reader.threads > 1 and len(jobs) > 1:
            for _ in self.reader.executor().map(fetch, jobs):
                pass
        else:
            for job in jobs:
                fetch(job)
        on_device = staging[:offset].to(self.device, non_blocking=True)
        if self.device.type == "cuda":
            self._in_flight = torch.cuda.Event()
            self._in_flight.record()
        out = torch.zeros((len(crops), nb, size, size), dtype=torch.float32, device=self.device)
        for n, (info, plan, h, w) in enumerate(plans):
            tdtype = getattr(torch, _TORCH_DTYPES[info.dtype.str[1:]])
            dest = out[n, :, :h, :w]
            for idx, pieces in plan.items():
                _, _, off = slots[(info.path, idx)]
                chunk = on_device[off: off + info.chunk_nbytes].view(tdtype).view(info.chunks)
                for p in pieces:
                    dest[_torch_index(p.dst, self.device)] = chunk[_torch_index(p.src, self.device)].to(torch.float32)
        return out


def _torch_index(sel: tuple[Any, ...], device: Any) -> tuple[Any, ...]:
    import torch

    return tuple(torch.as_tensor(s, device=device) if isinstance(s, np.ndarray) else s for s in sel)
