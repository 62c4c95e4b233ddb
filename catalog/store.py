"""The wavelength-annotated catalog: one Zarr v3 group per image, a Parquet index, a quarantine table.

Layout under the catalog URI (a directory or any fsspec URL)::

    catalog.json                               format marker
    cubes/<dataset>/<key>@<sha12>.zarr         group: cube (band, y, x) native dtype, wavelength, [fwhm, rgb, extras/]
    index/part-*.parquet                       one row per image (a part per writer, merged by compact())
    quarantine/part-*.parquet                  one row per rejected source file
    labels/..., tracks/...                     labels of downstream datasets (see catalog/labels.py)

Cube paths are content-addressed by the source sha256, so a re-ingest never overwrites a stored cube; the index
row is the commit point (written last, as its own file), so a killed run leaves at most an orphan that
``verify`` reports and the next run re-uses. Two writers never share a file, so no index row is lost.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from queue import Empty, Queue
from typing import Any

import fsspec
import numcodecs.blosc
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import xarray as xr
import zarr
from zarr.codecs import BloscCodec, BloscShuffle, BytesCodec
from zarr.codecs.bytes import Endian

from catalog import labels as label_store
from catalog.errors import CatalogError

FORMAT = {"format": "hvp-catalog", "version": 1}

INDEX_SCHEMA = pa.schema([
    ("dataset", pa.string()), ("image_id", pa.string()), ("bands", pa.int32()), ("wl_min", pa.float64()),
    ("wl_max", pa.float64()), ("height", pa.int32()), ("width", pa.int32()), ("dtype", pa.string()),
    ("sha256", pa.string()), ("location", pa.string()), ("ingested_at", pa.timestamp("us", tz="UTC")),
    ("source_path", pa.string()), ("has_rgb", pa.bool_()), ("reader", pa.string()),
    *label_store.INDEX_FIELDS,  # split, pretraining, label and sequence columns (catalog/labels.py)
])
QUARANTINE_SCHEMA = pa.schema([
    ("dataset", pa.string()), ("source_path", pa.string()), ("error_class", pa.string()), ("field", pa.string()),
    ("message", pa.string()), ("fix", pa.string()), ("quarantined_at", pa.timestamp("us", tz="UTC")),
])


def now_utc() -> datetime:
    return datetime.now(UTC)


@dataclass
class CubeWrite:
    """Everything needed to store one image; ``data`` is a lazy (band, y, x) array read strip by strip."""

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
    index_fields: dict[str, Any] = field(default_factory=dict)
    """Split, pretraining, label and sequence columns of the index row (see catalog/labels.py)."""


class Catalog:
    """Read and write access to one catalog. Cheap to create; safe to use from several processes at once."""

    def __init__(self, uri: str | os.PathLike[str] | None = None, chunk_xy: int | None = None,
                 compression_level: int | None = None) -> None:
        from infra.settings import get_settings

        settings = get_settings()
        self.uri = str(uri if uri is not None else settings.catalog)
        self.fs, self.root = fsspec.core.url_to_fs(self.uri)
        self.local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))
        if self.local:
            self.root = os.path.abspath(self.root)
        self.chunk_xy = chunk_xy or settings.chunk_xy
        self.compression_level = settings.compression_level if compression_level is None else compression_level
        self.codec_name = settings.cube_codec
        self._arrays: dict[str, zarr.Array] = {}
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
        """The index: one row per image (latest ingest wins), sorted by image id. Besides the cube's facts it
        says each image's ``split`` (None: none declared), whether ``pretraining`` may use it, its label
        (``label_kind``, ``label_location``) and, for frames of a sequence, ``sequence_id`` / ``frame_index``."""
        table, _ = self._read_table("index", INDEX_SCHEMA)
        df = table.to_pandas()
        if not df.empty:
            df = df.sort_values("ingested_at").drop_duplicates("image_id", keep="last")
            df = df.sort_values("image_id").reset_index(drop=True)
        df["pretraining"] = df["pretraining"].astype(object).fillna(True).astype(bool)  # rows from before roles
        df["frame_index"] = df["frame_index"].astype("Int64")
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
        return (self.compact_table("index", INDEX_SCHEMA) + self.compact_table("quarantine", QUARANTINE_SCHEMA)
                + label_store.compact_tracks(self))

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
        dtype = np.dtype(cw.data.dtype)
        if not self.is_complete(location):
            target = f"{location}.tmp-{uuid.uuid4().hex[:8]}" if self.local else location
            try:
                content_sha = self._write_group(target, cw, (b, h, w), dtype, finite_block, on_strip)
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
            "reader": f"{cw.attrs.get('reader', '')}", **cw.index_fields,
        }
        self._write_part("index", [row], INDEX_SCHEMA)
        self._rows = None  # this image's row changed
        return row

    def _write_group(self, rel: str, cw: CubeWrite, shape: tuple[int, int, int], dtype: np.dtype,
                     check: Any, on_strip: Any) -> str:
        b, h, w = shape
        c = self.chunk_xy
        group = zarr.open_group(self._zarr_store(rel), mode="w", zarr_format=3)
        codec = BloscCodec(cname=self.codec_name, clevel=self.compression_level, shuffle=BloscShuffle.bitshuffle)
        cube = group.create_array("cube", shape=(b, h, w), chunks=(b, c, c), dtype=dtype, compressors=codec,
                                  dimension_names=("band", "y", "x"), fill_value=0)
        group.create_array("wavelength", data=np.asarray(cw.wavelength_nm, dtype=np.float64),
                           dimension_names=("band",), attributes={"units": "nm"})
        if cw.fwhm_nm is not None:
            group.create_array("fwhm", data=np.asarray(cw.fwhm_nm, dtype=np.float64), dimension_names=("band",),
                               attributes={"units": "nm"})
        if cw.rgb is not None:
            group.create_array("rgb", data=np.ascontiguousarray(cw.rgb, dtype=np.uint8), chunks=(c, c, 3),
                               dimension_names=("y", "x", "channel"), compressors=codec)
        if cw.extras:
            extras = group.create_group("extras")
            for name, arr in cw.extras.items():
                extras.create_array(name, data=np.ascontiguousarray(arr))
        hasher = hashlib.sha256()
        # Three stages overlap on separate threads (numpy copies, hashing and Blosc release the GIL): reading and
        # transposing the next tile, hashing the current one, compressing and writing it.
        cols = self._tile_cols(shape, dtype)
        with ThreadPoolExecutor(1, thread_name_prefix="hvp-hash") as hashing:
            hashed: Future[None] | None = None
            for y0, x0, block in _prefetch(self._tiles(cw.data, shape, dtype, cols)):
                check(block, cw.attrs.get("source_path", rel), y0)
                if hashed is not None:
                    hashed.result()
                hashed = hashing.submit(hasher.update, memoryview(block).cast("B"))
                cube[:, y0:y0 + block.shape[1], x0:x0 + block.shape[2]] = block
                if on_strip is not None and x0 + block.shape[2] == w:
                    on_strip(block.shape[1])
            if hashed is not None:
                hashed.result()
        group.attrs.update({**_jsonable(cw.attrs), "dataset": cw.dataset, "image_id": cw.image_id,
                            "source_sha256": cw.sha256, "hash_tile": [c, cols], "complete": False})
        return hasher.hexdigest()

    #: Upper bound on one tile in flight: memory stays flat whatever the cube's width and band count.
    TILE_BYTES = 16 * 2**20

    def _tile_cols(self, shape: tuple[int, int, int], dtype: np.dtype) -> int:
        """Tile width: whole chunks, as many as fit TILE_BYTES (at least one)."""
        b, _, w = shape
        per_chunk_col = b * self.chunk_xy * self.chunk_xy * dtype.itemsize
        return min(w, max(1, self.TILE_BYTES // per_chunk_col) * self.chunk_xy)

    def _tiles(self, data: Any, shape: tuple[int, int, int], dtype: np.dtype,
               cols: int) -> Iterator[tuple[int, int, np.ndarray]]:
        """(y0, x0, block) tiles of ``chunk_xy`` rows by ``cols`` columns over all bands, row-major, native dtype;
        chunk-aligned, so each write fills whole chunks."""
        _, h, w = shape
        for y0 in range(0, h, self.chunk_xy):
            for x0 in range(0, w, cols):
                yield y0, x0, np.ascontiguousarray(np.asarray(data[:, y0:y0 + self.chunk_xy, x0:x0 + cols]), dtype)

    def _array(self, location: str, name: str = "cube") -> zarr.Array:
        key = f"{location}/{name}"
        arr = self._arrays.get(key)
        if arr is None:
            group = zarr.open_group(self._zarr_store(location), mode="r", zarr_format=3)
            arr = self._arrays[key] = member(group, name)
        return arr

    def open(self, image_id: str) -> xr.DataArray:
        """The image as a lazy DataArray ``(band, y, x)`` with coordinate ``wavelength`` (nm) and the group's attrs.

        Only the chunks a selection touches are read. ``rgb(image_id)`` gives the aligned RGB, if any.
        """
        row = self.row(image_id)
        ds = xr.open_dataset(self._zarr_store(row["location"]), engine="zarr", consolidated=False, chunks=None,
                             zarr_format=3)
        coords = [n for n in ("wavelength", "fwhm") if n in ds]
        da = ds.set_coords(coords)["cube"]
        da.attrs = {**ds.attrs, **da.attrs}
        return da

    def read_crop(self, location: str, y: int, x: int, size: int) -> np.ndarray:
        """All bands of a ``size`` x ``size`` window at (y, x): the fast path for training loaders.

        On a local catalog the chunk files the window touches are read and Blosc-decoded directly (zarr-python's
        async pipeline costs more than the decode for these all-band chunks); elsewhere zarr reads them.
        """
        arr = self._array(location)
        if not self.local or not _direct_readable(arr):
            return np.asarray(arr[:, y:y + size, x:x + size])
        b, h, w = arr.shape
        y1, x1 = min(y + size, h), min(x + size, w)
        _, cy, cx = arr.chunks
        out = np.empty((b, y1 - y, x1 - x), dtype=arr.dtype)
        root = self._path(location, "cube")
        for j in range(y // cy, (y1 - 1) // cy + 1):
            for i in range(x // cx, (x1 - 1) // cx + 1):
                y0, x0 = j * cy, i * cx
                try:
                    with open(os.path.join(root, arr.metadata.encode_chunk_key((0, j, i))), "rb") as fh:
                        raw = fh.read()
                except FileNotFoundError:  # never written: the fill value
                    chunk = np.full((b, cy, cx), arr.fill_value, dtype=arr.dtype)
                else:
                    data = numcodecs.blosc.decompress(raw) if arr.compressors else raw
                    chunk = np.frombuffer(data, dtype=arr.dtype.newbyteorder("<")).reshape(b, cy, cx)
                ys, ye, xs, xe = max(y, y0), min(y1, y0 + cy), max(x, x0), min(x1, x0 + cx)
                out[:, ys - y:ye - y, xs - x:xe - x] = chunk[:, ys - y0:ye - y0, xs - x0:xe - x0]
        return out

    def read_rgb_crop(self, location: str, y: int, x: int, size: int) -> np.ndarray:
        """The aligned RGB ``(h, w, 3)`` of the same window as ``read_crop`` (only its chunks are read)."""
        return np.asarray(self._array(location, "rgb")[y:y + size, x:x + size])

    # ------------------------------------------------------------------ derived false colour
    def falsecolor_location(self, location: str) -> str:
        """Where the false-colour RGB derived from the cube at ``location`` lives (content-addressed with it)."""
        return "derived/falsecolor/" + location.removeprefix("cubes/")

    def write_falsecolor(self, location: str, rgb: np.ndarray, method: str) -> str:
        """Store the whole image's false-colour RGB (y, x, 3) uint8, so crops need not recompute it; idempotent."""
        rel = self.falsecolor_location(location)
        target = f"{rel}.tmp-{uuid.uuid4().hex[:8]}" if self.local else rel
        group = zarr.open_group(self._zarr_store(target), mode="w", zarr_format=3)
        group.create_array("rgb", data=np.ascontiguousarray(rgb, dtype=np.uint8),
                           chunks=(self.chunk_xy, self.chunk_xy, 3), dimension_names=("y", "x", "channel"))
        group.attrs.update({"method": method, "source": location})
        self._missing.discard(f"{rel}/rgb")
        if self.local:
            final = self._path(rel)
            if os.path.exists(final):
                self.fs.rm(final, recursive=True)
            os.makedirs(os.path.dirname(final), exist_ok=True)
            os.replace(self._path(target), final)
        return rel

    def read_falsecolor_crop(self, location: str, y: int, x: int, size: int) -> np.ndarray | None:
        """The stored false-colour RGB of a window, or None when it was never derived (remembered per Catalog)."""
        key = f"{self.falsecolor_location(location)}/rgb"
        if key in self._missing:
            return None
        if key not in self._arrays:
            try:
                group = zarr.open_group(self._zarr_store(self.falsecolor_location(location)), mode="r",
                                        zarr_format=3)
            except (FileNotFoundError, zarr.errors.GroupNotFoundError):
                self._missing.add(key)
                return None
            self._arrays[key] = member(group, "rgb")
        return np.asarray(self._arrays[key][y:y + size, x:x + size])

    def rgb(self, image_id: str) -> np.ndarray | None:
        """The aligned RGB ``(y, x, 3)`` uint8 stored beside the cube, or None."""
        row = self.row(image_id)
        group = zarr.open_group(self._zarr_store(row["location"]), mode="r", zarr_format=3)
        return np.asarray(member(group, "rgb")[...]) if "rgb" in group else None

    # ------------------------------------------------------------------ labels (catalog/labels.py)
    def labels(self, image_id: str, variant: str | None = None) -> label_store.LabelMap:
        """The segmentation class map or saliency mask of one image, aligned with its cube; ``variant`` applies a
        relabelling its dataset declares (e.g. HSI Drive's 'hs3bench'). KeyError naming the image if it has none;
        every chunk is checked against its ingest checksum."""
        return label_store.read_labels(self, image_id, variant)

    def sequence(self, seq_id: str) -> label_store.TrackSequence:
        """One tracking sequence: its frames' image ids in order and one (x, y, w, h) box per frame in 0-based
        pixels of the stored cube. KeyError if unknown; CatalogError if some frame is not catalogued."""
        return label_store.read_sequence(self, seq_id)

    def sequences(self, dataset: str | None = None, split: str | None = None) -> list[str]:
        """Ids of the complete tracking sequences (optionally of one dataset and split), sorted."""
        return label_store.list_sequences(self, dataset, split)

    def labelled(self, dataset: str, split: str | None = None) -> list[str]:
        """Ids of a dataset's labelled images (optionally of one split; track frames included), sorted."""
        return label_store.labelled_images(self, dataset, split)

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
        label_store.verify_labels(self, df, report)
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


def member(group: zarr.Group, name: str) -> zarr.Array:
    """The array ``name`` of a group (an error if it is a sub-group: the layout is fixed)."""
    arr = group[name]
    if not isinstance(arr, zarr.Array):
        raise CatalogError(f"{group.store_path}/{name} is a group, expected an array: the catalog is damaged")
    return arr


def _direct_readable(arr: zarr.Array) -> bool:
    """True when the array's chunks are plain little-endian bytes, optionally Blosc-compressed, one file each."""
    return (len(arr.compressors) <= 1 and all(isinstance(c, BloscCodec) for c in arr.compressors)
            and not arr.filters and isinstance(arr.serializer, BytesCodec)
            and arr.serializer.endian in (None, Endian.little) and arr.shards is None)


def _jsonable(attrs: dict[str, Any]) -> dict[str, Any]:
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
