"""The streaming cube writer: one image's group (cube, band coordinates, rgb, extras) written tile by tile in
bounded memory, each chunk cast to the storage dtype (widened and written again if a chunk does not round-trip),
encoded per the layout and written to its chunk file or appended to its shard, with the content sha256 computed
on the way. The caller writes into a leased temporary folder and commits it (catalog/catalog.py)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from queue import Empty, Queue
from typing import Any

import google_crc32c
import numpy as np
import zarr
from zarr.codecs import BytesCodec

from base.errors import CatalogError
from catalog.cubes.dtypes import INT_DTYPES, wider
from catalog.cubes.files import FileAccess, writev_all, zarr_store
from catalog.cubes.layout import LAYOUT_VERSION, NO_CHUNK, CubeLayout
from catalog.cubes.metadata import BAND_COORDINATES, ArrayInfo, coordinates_attr, jsonable, parse_array_meta


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
            index = np.full((int(np.prod(per)), 2), NO_CHUNK, dtype="<u8")
            entry = self._shards[sidx] = (handle, index, [0])
        handle, index, offset = entry
        if self.files.local:
            n = writev_all(handle, parts)
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
                    writev_all(handle, tail)
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
                       dimension_names=("band", "y", "x"),
                       attributes={"source_dtype": source.str, **coordinates_attr(list(_band_coordinates(cw)))})
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
                raise _Widen(wider(dtype, np.asarray(part), source))
            parts = layout.encode(buf)
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
    for _ in range(len(INT_DTYPES) + 2):
        group = zarr.open_group(zarr_store(files, group_path), mode="w", zarr_format=3)
        for coord, values in _band_coordinates(cw).items():
            group.create_array(coord, data=np.asarray(values, dtype=np.float64), dimension_names=("band",),
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


def _band_coordinates(cw: CubeWrite) -> dict[str, np.ndarray]:
    """The band coordinates an image has (``wavelength``, and ``fwhm`` when known), in the group's order."""
    values = {"wavelength": cw.wavelength_nm, "fwhm": cw.fwhm_nm}
    return {name: v for name in BAND_COORDINATES if (v := values[name]) is not None}
