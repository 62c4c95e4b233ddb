"""The wavelength-annotated catalog: one Zarr v3 group per image, a Parquet index, a quarantine table.

Layout under the catalog URI (a directory or any fsspec URL)::

    catalog.json                               format marker
    cubes/<dataset>/<key>@<sha12>.zarr         group: cube (band, y, x) native dtype, wavelength, [fwhm, rgb, extras/]
    index/part-*.parquet                       one row per image (a part per writer, merged by compact())
    quarantine/part-*.parquet                  one row per rejected source file

Cube paths are content-addressed by the source sha256, so a re-ingest never overwrites a stored cube; the index
row is the commit point (written last, as its own file), so a killed run leaves at most an orphan that
``verify`` reports and the next run re-uses. Two writers never share a file, so no index row is lost.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import xarray as xr
import zarr

from catalog import cubes
from catalog.cubes import CubeLayout, CubeReader, CubeWrite, FileAccess
from catalog.errors import CatalogError

FORMAT = {"format": "hvp-catalog", "version": 1}

INDEX_SCHEMA = pa.schema([
    ("dataset", pa.string()), ("image_id", pa.string()), ("bands", pa.int32()), ("wl_min", pa.float64()),
    ("wl_max", pa.float64()), ("height", pa.int32()), ("width", pa.int32()), ("dtype", pa.string()),
    ("sha256", pa.string()), ("location", pa.string()), ("ingested_at", pa.timestamp("us", tz="UTC")),
    ("source_path", pa.string()), ("has_rgb", pa.bool_()), ("reader", pa.string()),
])
QUARANTINE_SCHEMA = pa.schema([
    ("dataset", pa.string()), ("source_path", pa.string()), ("error_class", pa.string()), ("field", pa.string()),
    ("message", pa.string()), ("fix", pa.string()), ("quarantined_at", pa.timestamp("us", tz="UTC")),
])


def now_utc() -> datetime:
    return datetime.now(UTC)


class Catalog:
    """Read and write access to one catalog. Cheap to create; safe to use from several processes at once.

    ``layout`` is how new cubes are stored (default: from the settings); ``read_threads`` and ``chunk_cache_mb``
    configure this process's chunk reader (catalog/cubes.py).
    """

    def __init__(self, uri: str | os.PathLike[str] | None = None, chunk_xy: int | None = None,
                 compression_level: int | None = None, layout: CubeLayout | None = None,
                 read_threads: int | None = None, chunk_cache_mb: float | None = None) -> None:
        from infra.settings import get_settings

        settings = get_settings()
        self.uri = str(uri if uri is not None else settings.catalog)
        self.fs, self.root = fsspec.core.url_to_fs(self.uri)
        self.local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))
        if self.local:
            self.root = os.path.abspath(self.root)
        self.layout = layout or CubeLayout(
            chunk_xy=chunk_xy or settings.chunk_xy, band_group=settings.cube_band_group,
            shard_xy=settings.cube_shard_xy, codec=settings.cube_codec, shuffle=settings.cube_shuffle,
            level=settings.compression_level if compression_level is None else compression_level)
        self.chunk_xy = self.layout.chunk_xy
        self.read_threads = settings.read_threads if read_threads is None else read_threads
        self.chunk_cache_bytes = int((settings.chunk_cache_mb if chunk_cache_mb is None else chunk_cache_mb)
                                     * 2**20)
        self._files = FileAccess(self.fs, self.local)
        self._reader: CubeReader | None = None
        self._device_readers: dict[str, cubes.DeviceBatchReader] = {}
        self._rows: pd.DataFrame | None = None
        self._mask_store: Any = None
        self._missing: set[str] = set()  # derived arrays looked for and not found

    # ------------------------------------------------------------------ paths and low-level I/O
    def _path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def _zarr_store(self, rel: str) -> Any:
        if self.local:
            return zarr.storage.LocalStore(self._path(rel))
        return zarr.storage.FsspecStore.from_url(self.uri.rstrip("/") + "/" + rel)

    @property
    def cubes(self) -> CubeReader:
        """This process's chunk reader (created on first use; a forked worker builds its own)."""
        if self._reader is None or self._reader.pid != os.getpid():
            self._reader = CubeReader(self._files, self.root, self.read_threads, self.chunk_cache_bytes)
        return self._reader

    def init(self) -> Catalog:
        """Create the catalog's folders and format marker if missing (idempotent)."""
        for sub in ("cubes", "index", "quarantine"):
            self.fs.makedirs(self._path(sub), exist_ok=True)
        marker = self._path("catalog.json")
        if not self.fs.exists(marker):
            self._put_bytes(marker, json.dumps(FORMAT).encode())
        return self

    def _put_bytes(self, path: str, data: bytes) -> None:
        """Write a whole file atomically: temp file + rename locally, one PUT on object stores."""
        if self.local:
            tmp = f"{path}.tmp-{uuid.uuid4().hex}"
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        else:
            self.fs.pipe_file(path, data)

    def _write_part(self, table_dir: str, rows: list[dict[str, Any]], schema: pa.Schema) -> str:
        buf = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), buf)
        name = f"part-{time.time_ns():020d}-{uuid.uuid4().hex[:12]}.parquet"
        path = self._path(table_dir, name)
        self.fs.makedirs(self._path(table_dir), exist_ok=True)
        self._put_bytes(path, buf.getvalue().to_pybytes())
        return path

    def _parts(self, table_dir: str) -> list[str]:
        try:
            found = self.fs.glob(self._path(table_dir, "part-*.parquet"))
        except FileNotFoundError:
            return []
        return sorted(p for p in found if ".tmp-" not in p)

    def _read_table(self, table_dir: str, schema: pa.Schema) -> tuple[pa.Table, list[str]]:
        """All parts of a table; re-lists when a concurrent compaction removes a part mid-read."""
        for _ in range(10):
            parts = self._parts(table_dir)
            try:
                tables = [pq.read_table(self.fs.open(p, "rb"), schema=schema) for p in parts]
            except FileNotFoundError:
                continue
            return (pa.concat_tables(tables) if tables else schema.empty_table()), parts
        raise CatalogError(f"{self._path(table_dir)}: parts keep disappearing while reading; is a compaction stuck?")

    # ------------------------------------------------------------------ tables
    def images(self, dataset: str | None = None) -> pd.DataFrame:
        """The index: one row per image (latest ingest wins), sorted by image id."""
        table, _ = self._read_table("index", INDEX_SCHEMA)
        df = table.to_pandas()
        if not df.empty:
            df = df.sort_values("ingested_at").drop_duplicates("image_id", keep="last")
            df = df.sort_values("image_id").reset_index(drop=True)
        if dataset is not None:
            df = df[df["dataset"] == dataset].reset_index(drop=True)
        return df

    def quarantine(self) -> pd.DataFrame:
        """Rejected source files with the error class, field, message and fix (latest attempt per file)."""
        df = self._read_table("quarantine", QUARANTINE_SCHEMA)[0].to_pandas()
        if not df.empty:
            df = df.sort_values("quarantined_at").drop_duplicates("source_path", keep="last")
            df = df.sort_values(["dataset", "source_path"]).reset_index(drop=True)
        return df

    def row(self, image_id: str) -> pd.Series:
        """One image's index row; the index is read once per Catalog and re-read when an id is not found."""
        for fresh in (False, True):
            if fresh or self._rows is None:
                self._rows = self.images().set_index("image_id", drop=False)
            if image_id in self._rows.index:
                return self._rows.loc[image_id]
        raise KeyError(f"image '{image_id}' is not in the catalog at {self.uri} (see `hvp catalog list`)")

    def add_quarantine(self, dataset: str, source_path: str, error_class: str, field_name: str, message: str,
                       fix: str) -> None:
        """Record one rejected source file (its own part file, so concurrent writers lose nothing)."""
        self._write_part("quarantine", [{
            "dataset": dataset, "source_path": source_path, "error_class": error_class, "field": field_name,
            "message": message, "fix": fix, "quarantined_at": now_utc()}], QUARANTINE_SCHEMA)

    def compact(self) -> int:
        """Merge the index and quarantine parts into one file each; returns the number of parts merged.

        Safe beside writers (their new parts are not listed, so not removed) and beside another compaction
        (duplicates are dropped on read).
        """
        return self.compact_table("index", INDEX_SCHEMA) + self.compact_table("quarantine", QUARANTINE_SCHEMA)

    def compact_table(self, table_dir: str, schema: pa.Schema) -> int:
        """Merge one part-file table (see ``compact``); returns the number of parts merged."""
        try:
            table, parts = self._read_table(table_dir, schema)
        except CatalogError:
            return 0
        if len(parts) < 2:
            return 0
        self._write_part(table_dir, table.to_pylist(), schema)
        for p in parts:
            with contextlib.suppress(FileNotFoundError):  # another compaction removed it first
                self.fs.rm(p)
        return len(parts)

    # ------------------------------------------------------------------ cubes
    def location_for(self, dataset: str, key: str, sha256: str) -> str:
        return f"cubes/{dataset}/{key}@{sha256[:12]}.zarr"

    def is_complete(self, location: str) -> bool:
        try:
            group = zarr.open_group(self._zarr_store(location), mode="r", zarr_format=3)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError, KeyError, ValueError):
            return False
        return bool(group.attrs.get("complete", False))

    def write_cube(self, cw: CubeWrite, on_strip: Any = None) -> dict[str, Any]:
        """Store one image strip by strip (bounded memory) and commit its index row; returns the row.

        The cube goes to a content-addressed location: if a complete group already sits there (a run killed after
        the write but before the commit), it is re-used and only the row is written.
        """
        from catalog.validate import finite_block

        location = self.location_for(cw.dataset, cw.key, cw.sha256)
        b, h, w = (int(s) for s in cw.data.shape)
        dtype = np.dtype(cw.store_dtype if cw.store_dtype is not None else cw.data.dtype)
        if self.is_complete(location):  # stored by an earlier run: its dtype is what the row records
            self.cubes.forget(location)
            info = self.cubes.info(location)
            dtype = info.dtype.newbyteorder("=") if info is not None else dtype
        else:
            target = f"{location}.tmp-{uuid.uuid4().hex[:8]}" if self.local else location
            try:
                content_sha, dtype = cubes.write_group(self._files, self._path(target), cw, self.layout,
                                                       finite_block, on_strip, self.TILE_BYTES)
                if self.local:
                    final = self._path(location)
                    if os.path.exists(final):  # an incomplete leftover of a killed run: replace it
                        self.fs.rm(final, recursive=True)
                    os.makedirs(os.path.dirname(final), exist_ok=True)
                    os.replace(self._path(target), final)
                group = zarr.open_group(self._zarr_store(location), mode="r+", zarr_format=3)
                group.attrs.update({"complete": True, "content_sha256": content_sha})
            except BaseException:
                if self.local and self.fs.exists(self._path(target)):
                    self.fs.rm(self._path(target), recursive=True)
                raise
        row = {
            "dataset": cw.dataset, "image_id": cw.image_id, "bands": b, "wl_min": float(cw.wavelength_nm[0]),
            "wl_max": float(cw.wavelength_nm[-1]), "height": h, "width": w, "dtype": dtype.str.lstrip("<>|="),
            "sha256": cw.sha256, "location": location, "ingested_at": now_utc(),
            "source_path": str(cw.attrs.get("source_path", "")), "has_rgb": cw.rgb is not None,
            "reader": f"{cw.attrs.get('reader', '')}",
        }
        self._write_part("index", [row], INDEX_SCHEMA)
        self._rows = None  # this image's row changed
        return row

    #: Upper bound on one tile in flight: memory stays flat whatever the cube's width and band count.
    TILE_BYTES = 16 * 2**20

    def open(self, image_id: str) -> xr.DataArray:
        """The image as a lazy DataArray ``(band, y, x)`` with coordinate ``wavelength`` (nm) and the group's attrs.

        Only the chunks a selection touches are read, each checked against its checksum (CorruptChunkError).
        ``rgb(image_id)`` gives the aligned RGB, if any.
        """
        return cubes.open_dataarray(self.cubes, self.row(image_id)["location"])

    def read_crop(self, location: str, y: int, x: int, size: int, bands: Sequence[int] | np.ndarray | None = None,
                  dtype: Any = None, out: np.ndarray | None = None) -> np.ndarray:
        """The ``size`` x ``size`` window at (y, x) (clipped at the image edge) of the cube at ``location``: all
        bands or the sorted ``bands``, in ``dtype`` (default: as stored), into ``out`` when given. The fast path
        for training loaders (catalog/cubes.py): checksummed chunks decoded straight into the output."""
        return self.cubes.read(location, (bands, slice(y, y + size), slice(x, x + size)), dtype=dtype, out=out)

    def read_image(self, image_id: str, bands: Sequence[int] | np.ndarray | None = None,
                   dtype: Any = None) -> np.ndarray:
        """The whole cube ``(band, y, x)`` of an image (all or the sorted ``bands``), decoded in parallel."""
        return self.cubes.read(self.row(image_id)["location"], (bands,), dtype=dtype)

    def read_batch(self, crops: Sequence[tuple[str, int, int]], size: int,
                   bands: Sequence[int] | np.ndarray | None = None, dtype: Any = np.float32,
                   out: np.ndarray | None = None, device: Any = None) -> Any:
        """``(N, bands, size, size)`` crops at (location, y, x), zero-padded past the image edge, as numpy in
        ``dtype`` (into ``out``, e.g. a pinned buffer), or as a float32 tensor on ``device`` (on CUDA,
        uncompressed chunks are staged in pinned memory and cut on the GPU; see ``cubes.DeviceBatchReader``)."""
        if device is not None:
            key = str(device)
            if key not in self._device_readers or self._device_readers[key].reader is not self.cubes:
                self._device_readers[key] = cubes.DeviceBatchReader(self.cubes, device)
            return self._device_readers[key].read_batch(crops, size, bands)
        return self.cubes.read_batch(crops, size, bands, dtype, out)

    def read_rgb_crop(self, location: str, y: int, x: int, size: int) -> np.ndarray:
        """The aligned RGB ``(h, w, 3)`` of the same window as ``read_crop`` (only its chunks are read)."""
        return self.cubes.read(location, (slice(y, y + size), slice(x, x + size)), "rgb")

    # ------------------------------------------------------------------ derived false colour
    def falsecolor_location(self, location: str) -> str:
        """Where the false-colour RGB derived from the cube at ``location`` lives (content-addressed with it)."""
        return "derived/falsecolor/" + location.removeprefix("cubes/")

    def write_falsecolor(self, location: str, rgb: np.ndarray, method: str) -> str:
        """Store the whole image's false-colour RGB (y, x, 3) uint8, so crops need not recompute it; idempotent."""
        rel = self.falsecolor_location(location)
        target = f"{rel}.tmp-{uuid.uuid4().hex[:8]}" if self.local else rel
        group = zarr.open_group(self._zarr_store(target), mode="w", zarr_format=3)
        group.create_array("rgb", data=np.ascontiguousarray(rgb, dtype=np.uint8), compressors=self.layout.compressors(),
                           chunks=(self.chunk_xy, self.chunk_xy, 3), dimension_names=("y", "x", "channel"))
        group.attrs.update({"method": method, "source": location})
        self._missing.discard(f"{rel}/rgb")
        self.cubes.forget(rel)
        if self.local:
            final = self._path(rel)
            if os.path.exists(final):
                self.fs.rm(final, recursive=True)
            os.makedirs(os.path.dirname(final), exist_ok=True)
            os.replace(self._path(target), final)
        return rel

    def read_falsecolor_crop(self, location: str, y: int, x: int, size: int) -> np.ndarray | None:
        """The stored false-colour RGB of a window, or None when it was never derived (remembered per Catalog)."""
        rel = self.falsecolor_location(location)
        key = f"{rel}/rgb"
        if key in self._missing:
            return None
        try:
            return self.cubes.read(rel, (slice(y, y + size), slice(x, x + size)), "rgb")
        except FileNotFoundError:
            self._missing.add(key)
            return None

    def rgb(self, image_id: str) -> np.ndarray | None:
        """The aligned RGB ``(y, x, 3)`` uint8 stored beside the cube, or None."""
        try:
            return self.cubes.read(self.row(image_id)["location"], (), "rgb")
        except FileNotFoundError:
            return None

    # ------------------------------------------------------------------ masks
    def masks(self, image_id: str, branch: str | None = None, labeler_id: str | None = None,
              packed: bool = False) -> Any:
        """The pseudo-label masks of one image (a MaskSet, or PackedMasks with ``packed``), by branch or labeler
        id; see catalog/masks.py."""
        if self._mask_store is None:
            from catalog.masks import MaskStore

            self._mask_store = MaskStore(self)  # its index is read once and refreshed on a miss
        read = self._mask_store.read_packed if packed else self._mask_store.read
        return read(image_id, labeler_id=labeler_id, branch=branch)

    def fused(self, image_id: str, packed: bool = False) -> Any:
        """The fused pseudo-target of one image: its retained sub-masks with their prompts (a MaskSet)."""
        return self.masks(image_id, branch="fused", packed=packed)

    # ------------------------------------------------------------------ verification
    def verify(self, checksums: bool = True) -> VerifyReport:
        """Check every indexed cube exists, is complete and (optionally) still hashes to its recorded content sha;
        list orphan groups (stored but not indexed) and partial ones (temporary or incomplete)."""
        report = VerifyReport()
        df = self.images()
        indexed = set(df["location"]) if not df.empty else set()
        for _, row in df.iterrows():
            loc = row["location"]
            try:
                group = zarr.open_group(self._zarr_store(loc), mode="r", zarr_format=3)
            except (FileNotFoundError, zarr.errors.GroupNotFoundError, KeyError, ValueError):
                report.missing.append(row["image_id"])
                continue
            if not group.attrs.get("complete"):
                report.partial.append(loc)
                continue
            if checksums:
                hasher = hashlib.sha256()
                arr = member(group, "cube")
                # catalogs written before tiling hashed whole-width strips of `strip_rows` rows
                tile_shape = group.attrs.get("hash_tile") or [group.attrs.get("strip_rows"), arr.shape[2]]
                assert isinstance(tile_shape, list)
                rows, cols = (int(str(v)) for v in tile_shape)
                for y0 in range(0, arr.shape[1], rows):
                    for x0 in range(0, arr.shape[2], cols):
                        tile = np.ascontiguousarray(arr[:, y0:y0 + rows, x0:x0 + cols])
                        hasher.update(memoryview(tile.data).cast("B"))
                if hasher.hexdigest() != group.attrs.get("content_sha256"):
                    report.corrupt.append(row["image_id"])
                    continue
            report.ok += 1
        for path in self.fs.glob(self._path("cubes", "**", "*.zarr*")):
            rel = path[len(self.root.rstrip("/")) + 1:]
            if ".zarr.tmp-" in rel and rel.split(".tmp-")[1].count("/") == 0:
                report.partial.append(rel)
            elif rel.endswith(".zarr") and rel not in indexed:
                report.orphans.append(rel)
        return report


@dataclass
class VerifyReport:
    """Outcome of ``Catalog.verify``: healthy count and the ids/locations of every problem found."""

    ok: int = 0
    missing: list[str] = field(default_factory=list)
    corrupt: list[str] = field(default_factory=list)
    partial: list[str] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)

    @property
    def healthy(self) -> bool:
        return not (self.missing or self.corrupt or self.partial)

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "missing": self.missing, "corrupt": self.corrupt, "partial": self.partial,
                "orphans": self.orphans, "healthy": self.healthy}


def member(group: zarr.Group, name: str) -> zarr.Array:
    """The array ``name`` of a group (an error if it is a sub-group: the layout is fixed)."""
    arr = group[name]
    if not isinstance(arr, zarr.Array):
        raise CatalogError(f"{group.store_path}/{name} is a group, expected an array: the catalog is damaged")
    return arr
