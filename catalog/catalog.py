"""The wavelength-annotated catalog: one Zarr v3 group per image, a Parquet index, a quarantine table.

Layout under the catalog URI (a directory or any fsspec URL)::

    catalog.json                               format marker
    cubes/<dataset>/<key>@<sha12>.zarr         group: cube (band, y, x) native dtype, wavelength, [fwhm, rgb, extras/]
    index/part-*.parquet                       one row per image (a part per writer, merged by compact())
    quarantine/part-*.parquet                  one row per rejected source file
    labels/..., tracks/...                     labels of downstream datasets (see catalog/annotations.py)
    leases/<id>.json, locks/                   writer leases and lock files (see catalog/storage.py)

Cube paths are content-addressed by the source sha256, so a re-ingest never overwrites a stored cube; the index
row is the commit point (written last, as its own file), so a killed run leaves at most an orphan that
``verify`` reports and the next run re-uses, or a temporary of a dead writer that ``compact`` removes. Two writers
never share a file, so no index row is lost. File-system details live in ``catalog.storage``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import xarray as xr
import zarr

from catalog import annotation_store
from catalog.annotations import INDEX_FIELDS, AnnotationMap, TrackSequence
from catalog.cubes.files import FileAccess
from catalog.cubes.layout import CubeLayout
from catalog.cubes.reader import CubeReader
from catalog.cubes.writer import CubeWrite, write_group
from catalog.cubes.xarray_view import open_dataarray
from catalog.masks import MaskStore
from catalog.problems import Problem, VerifyReport
from catalog.storage import TMP, Storage, member, now_utc

FORMAT = {"format": "hvp-catalog", "version": 1}
#: Chunk-reader defaults; the CLI and flows pass the settings' values (HVP_READ_THREADS, HVP_CHUNK_CACHE_MB).
DEFAULT_READ_THREADS = 2
DEFAULT_CHUNK_CACHE_MB = 256.0

INDEX_SCHEMA = pa.schema([
    ("dataset", pa.string()), ("image_id", pa.string()), ("bands", pa.int32()), ("wl_min", pa.float64()),
    ("wl_max", pa.float64()), ("height", pa.int32()), ("width", pa.int32()), ("dtype", pa.string()),
    ("sha256", pa.string()), ("location", pa.string()), ("ingested_at", pa.timestamp("us", tz="UTC")),
    ("source_path", pa.string()), ("has_rgb", pa.bool_()), ("reader", pa.string()),
    *INDEX_FIELDS,  # split, pretraining, label and sequence columns (catalog/annotations.py)
])
QUARANTINE_SCHEMA = pa.schema([
    ("dataset", pa.string()), ("source_path", pa.string()), ("error_class", pa.string()), ("field", pa.string()),
    ("message", pa.string()), ("fix", pa.string()), ("quarantined_at", pa.timestamp("us", tz="UTC")),
])




class Catalog:
    """Read and write access to one catalog. Cheap to create; safe to use from several processes at once.

    Its options come as arguments (the CLI and flows read them from the settings, ``infra.settings.cube_options``):
    ``layout`` is how new cubes are stored (catalog/cubes/layout.py; ``chunk_xy`` alone gives the default layout with
    that chunk edge); ``read_threads`` and ``chunk_cache_mb`` configure this process's chunk reader.
    """

    def __init__(self, uri: str | os.PathLike[str], chunk_xy: int | None = None,
                 layout: CubeLayout | Mapping[str, Any] | None = None, read_threads: int = DEFAULT_READ_THREADS,
                 chunk_cache_mb: float = DEFAULT_CHUNK_CACHE_MB) -> None:
        self.storage = Storage(uri)
        if isinstance(layout, Mapping):
            layout = CubeLayout(**layout)
        self.layout = layout or (CubeLayout(chunk_xy=chunk_xy) if chunk_xy else CubeLayout())
        self.chunk_xy = self.layout.chunk_xy
        self.read_threads = read_threads
        self.chunk_cache_bytes = int(chunk_cache_mb * 2**20)
        self._files = FileAccess(self.storage.fs, self.storage.local)
        self._reader: CubeReader | None = None
        self._rows: pd.DataFrame | None = None
        self._mask_store: MaskStore | None = None
        self._missing: set[str] = set()  # derived arrays looked for and not found

    @property
    def uri(self) -> str:
        """The catalog's URI as given (a directory or an fsspec URL)."""
        return self.storage.uri

    @property
    def root(self) -> str:
        """The catalog's root path on its file system (absolute for a local catalog)."""
        return self.storage.root

    @property
    def local(self) -> bool:
        """True for a catalog on the local file system."""
        return self.storage.local

    @property
    def cubes(self) -> CubeReader:
        """This process's chunk reader (created on first use; a forked worker builds its own)."""
        if self._reader is None or self._reader.pid != os.getpid():
            self._reader = CubeReader(self._files, self.root, self.read_threads, self.chunk_cache_bytes)
        return self._reader

    def init(self) -> Catalog:
        """Create the catalog's folders and format marker if missing (idempotent)."""
        for sub in ("cubes", "index", "quarantine"):
            self.storage.fs.makedirs(self.storage.path(sub), exist_ok=True)
        if not self.storage.exists("catalog.json"):
            self.storage.put_bytes("catalog.json", json.dumps(FORMAT).encode())
        return self

    # ------------------------------------------------------------------ tables
    def images(self, dataset: str | None = None) -> pd.DataFrame:
        """The index: one row per image (latest ingest wins), sorted by image id. Besides the cube's facts it
        says each image's ``split`` (None: none declared), whether ``pretraining`` may use it, its label
        (``label_kind``, ``label_location``) and, for frames of a sequence, ``sequence_id`` / ``frame_index``."""
        df = _latest(self.storage.read_table("index", INDEX_SCHEMA)[0].to_pandas())
        df["pretraining"] = df["pretraining"].astype(object).fillna(True).astype(bool)  # rows from before roles
        df["frame_index"] = df["frame_index"].astype("Int64")
        if dataset is not None:
            df = df[df["dataset"] == dataset].reset_index(drop=True)
        return df

    def quarantine(self) -> pd.DataFrame:
        """Rejected source files with the error class, field, message and fix (latest attempt per file)."""
        df = self.storage.read_table("quarantine", QUARANTINE_SCHEMA)[0].to_pandas()
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
        self.storage.write_part("quarantine", [{
            "dataset": dataset, "source_path": source_path, "error_class": error_class, "field": field_name,
            "message": message, "fix": fix, "quarantined_at": now_utc()}], QUARANTINE_SCHEMA)

    def has_cube(self, dataset: str, key: str) -> bool:
        """Whether any version of an image's cube is stored (complete or not, indexed or not): one folder listing,
        not an index read."""
        prefix = f"{key.rsplit('/', 1)[-1]}@"
        folder = os.path.dirname(self.location_for(dataset, key, ""))
        try:
            names = self.storage.fs.ls(self.storage.path(folder), detail=False)
        except FileNotFoundError:
            return False
        return any(os.path.basename(str(n).rstrip("/")).startswith(prefix) and TMP not in os.path.basename(str(n))
                   for n in names)

    def indexed(self, image_id: str, sha256: str, label_sha256: str | None = None) -> bool:
        """Whether the index (read afresh) already holds ``image_id`` at this source sha256 (and label sha256) as
        its latest row."""
        df = self.images()
        rows = df[df["image_id"] == image_id] if not df.empty else df
        if not len(rows) or rows.iloc[0]["sha256"] != sha256:
            return False
        stored = rows.iloc[0].get("label_sha256")
        return (stored if isinstance(stored, str) and stored else None) == (label_sha256 or None)

    def compact(self) -> int:
        """Merge the index, quarantine and mask-index parts into one file each (rows committed twice are kept
        once) and remove the temporaries of writers that are gone; returns the number of parts merged.

        Safe beside writers (their new parts are not listed, so not removed; their temporaries are alive) and
        beside another compaction (duplicates are dropped on read).
        """
        return (self.mask_store.compact()  # first: it also removes the stale temporaries
                + self.storage.compact_table("index", INDEX_SCHEMA, latest="ingested_at",
                                             unique=["image_id", "sha256", "location", "label_sha256"])
                + self.storage.compact_table("quarantine", QUARANTINE_SCHEMA)
                + annotation_store.compact_tracks(self))

    def drop_images(self, image_ids: list[str]) -> None:
        """Remove images' rows from the index for good (their cubes become orphans); used by repair."""
        ids = pa.array(sorted(set(image_ids)), pa.string())
        self.storage.compact_table("index", INDEX_SCHEMA, drop=lambda t: pc.is_in(t["image_id"], value_set=ids))
        self._rows = None

    # ------------------------------------------------------------------ cubes
    def location_for(self, dataset: str, key: str, sha256: str) -> str:
        """Where the cube of one source version lives (content-addressed by the source sha256)."""
        return f"cubes/{dataset}/{key}@{sha256[:12]}.zarr"

    def is_complete(self, location: str) -> bool:
        """Whether a finished cube group sits at ``location``."""
        try:
            group = zarr.open_group(self.storage.zarr_store(location), mode="r", zarr_format=3)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError, KeyError, ValueError):
            return False
        return bool(group.attrs.get("complete", False))

    def write_cube(self, cw: CubeWrite, on_strip: Any = None, commit: bool = True,
                   source_sha256: Callable[[], str] | None = None) -> dict[str, Any]:
        """Store one image strip by strip (bounded memory) and commit its index row; returns the row.

        The cube goes to a content-addressed location: if a complete group already sits there (a run killed after
        the write but before the commit), it is re-used and only the row is written. ``commit=False`` writes no
        row (a repair rewrites a cube its row already names).

        ``source_sha256``, on a local catalog, is how to get the source hash that ``cw.sha256`` then lacks (e.g.
        the result of a hash running on another thread): the cube is written to a temporary first and the hash is
        asked for only when it is needed to name the content-addressed location, so hashing overlaps the write.
        """
        from catalog.validate import finite_block

        if source_sha256 is not None and self.storage.local:
            return self._write_then_address(cw, on_strip, commit, source_sha256)
        location = self.location_for(cw.dataset, cw.key, cw.sha256)
        dtype = np.dtype(cw.store_dtype if cw.store_dtype is not None else cw.data.dtype)
        if self.is_complete(location):  # stored by an earlier run: its dtype is what the row records
            self.cubes.forget(location)
            info = self.cubes.info(location)
            dtype = info.dtype.newbyteorder("=") if info is not None else dtype
        else:
            target = self.storage.temporary(location)
            try:
                content_sha, dtype = write_group(self._files, self.storage.path(target), cw, self.layout,
                                                 finite_block, on_strip, self.TILE_BYTES)
                self.storage.commit_folder(target, location)  # replaces an incomplete leftover of a killed run
                self.cubes.forget(location)
                group = zarr.open_group(self.storage.zarr_store(location), mode="r+", zarr_format=3)
                group.attrs.update({"complete": True, "content_sha256": content_sha})
            except BaseException:
                self.storage.discard(target, location)
                raise
        return self._commit_row(cw, location, dtype, commit)

    def _write_then_address(self, cw: CubeWrite, on_strip: Any, commit: bool,
                            source_sha256: Callable[[], str]) -> dict[str, Any]:
        """`write_cube` for a cube whose source hash is still being computed: write it to a temporary, then move
        it to the location the hash names (replacing a leftover there, complete or not: it holds the same
        source)."""
        from catalog.validate import finite_block

        target = self.storage.temporary(f"cubes/{cw.dataset}/{cw.key}@pending.zarr")
        try:
            content_sha, dtype = write_group(self._files, self.storage.path(target), cw, self.layout,
                                             finite_block, on_strip, self.TILE_BYTES)
            cw.sha256 = source_sha256()
            location = self.location_for(cw.dataset, cw.key, cw.sha256)
            self.storage.commit_folder(target, location)
            self.cubes.forget(location)
            group = zarr.open_group(self.storage.zarr_store(location), mode="r+", zarr_format=3)
            group.attrs.update({"complete": True, "content_sha256": content_sha, "source_sha256": cw.sha256})
        except BaseException:
            self.storage.remove(target)
            raise
        return self._commit_row(cw, location, dtype, commit)

    def _commit_row(self, cw: CubeWrite, location: str, dtype: np.dtype, commit: bool) -> dict[str, Any]:
        """The index row of a stored cube, written (the commit point) unless ``commit`` is False."""
        b, h, w = (int(s) for s in cw.data.shape)
        row = {
            "dataset": cw.dataset, "image_id": cw.image_id, "bands": b, "wl_min": float(cw.wavelength_nm[0]),
            "wl_max": float(cw.wavelength_nm[-1]), "height": h, "width": w, "dtype": dtype.str.lstrip("<>|="),
            "sha256": cw.sha256, "location": location, "ingested_at": now_utc(),
            "source_path": str(cw.attrs.get("source_path", "")), "has_rgb": cw.rgb is not None,
            "reader": f"{cw.attrs.get('reader', '')}", **cw.index_fields,
        }
        if commit:
            self.storage.write_part("index", [row], INDEX_SCHEMA)
        self._rows = None  # this image's row changed
        return row

    #: Upper bound on one tile in flight: memory stays flat whatever the cube's width and band count.
    TILE_BYTES = 16 * 2**20

    def open(self, image_id: str) -> xr.DataArray:
        """The image as a lazy DataArray ``(band, y, x)`` with coordinate ``wavelength`` (nm) and the group's attrs.

        Only the chunks a selection touches are read, each checked against its checksum (CorruptChunkError).
        ``rgb(image_id)`` gives the aligned RGB, if any.
        """
        return open_dataarray(self.cubes, self.row(image_id)["location"])

    def read_crop(self, location: str, y: int, x: int, size: int, bands: Sequence[int] | np.ndarray | None = None,
                  dtype: Any = None, out: np.ndarray | None = None) -> np.ndarray:
        """The ``size`` x ``size`` window at (y, x) (clipped at the image edge) of the cube at ``location``: all
        bands or the sorted ``bands``, in ``dtype`` (default: as stored), into ``out`` when given. The fast path
        for training loaders (catalog/cubes/reader.py): checksummed chunks decoded straight into the output."""
        return self.cubes.read(location, (bands, slice(y, y + size), slice(x, x + size)), dtype=dtype, out=out)

    def read_image(self, image_id: str, bands: Sequence[int] | np.ndarray | None = None,
                   dtype: Any = None) -> np.ndarray:
        """The whole cube ``(band, y, x)`` of an image (all or the sorted ``bands``), decoded in parallel."""
        return self.cubes.read(self.row(image_id)["location"], (bands,), dtype=dtype)

    def read_batch(self, crops: Sequence[tuple[str, int, int]], size: int,
                   bands: Sequence[int] | np.ndarray | None = None, dtype: Any = np.float32,
                   out: np.ndarray | None = None) -> np.ndarray:
        """``(N, bands, size, size)`` crops at (location, y, x), zero-padded past the image edge, in ``dtype``
        (into ``out``, e.g. a pinned buffer). Batches on a GPU: stages/pretraining/device_batches.py."""
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
        target = self.storage.temporary(rel)
        group = zarr.open_group(self.storage.zarr_store(target), mode="w", zarr_format=3)
        group.create_array("rgb", data=np.ascontiguousarray(rgb, dtype=np.uint8), compressors=self.layout.compressors(),
                           chunks=(self.chunk_xy, self.chunk_xy, 3), dimension_names=("y", "x", "channel"))
        group.attrs.update({"method": method, "source": location})
        self._missing.discard(f"{rel}/rgb")
        self.storage.commit_folder(target, rel)
        self.cubes.forget(rel)
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

    # ------------------------------------------------------------------ annotations (catalog/annotations.py)
    def annotation(self, image_id: str, variant: str | None = None) -> AnnotationMap:
        """The segmentation class map or saliency mask of one image, aligned with its cube; ``variant`` applies a
        relabelling its dataset declares (e.g. HSI Drive's 'hs3bench'). KeyError naming the image if it has none;
        every chunk is checked against its ingest checksum."""
        return annotation_store.read_annotation(self, image_id, variant)

    def sequence(self, seq_id: str) -> TrackSequence:
        """One tracking sequence: its frames' image ids in order and one (x, y, w, h) box per frame in 0-based
        pixels of the stored cube. KeyError if unknown; CatalogError if some frame is not catalogued."""
        return annotation_store.read_sequence(self, seq_id)

    def sequences(self, dataset: str | None = None, split: str | None = None) -> list[str]:
        """Ids of the complete tracking sequences (optionally of one dataset and split), sorted."""
        return annotation_store.list_sequences(self, dataset, split)

    def annotated(self, dataset: str, split: str | None = None) -> list[str]:
        """Ids of a dataset's labelled images (optionally of one split; track frames included), sorted."""
        return annotation_store.annotated_images(self, dataset, split)

    # ------------------------------------------------------------------ masks
    @property
    def mask_store(self) -> MaskStore:
        """The catalog's mask store (one per Catalog: its index is read once and refreshed on a miss)."""
        if self._mask_store is None:
            self._mask_store = MaskStore(self.storage)
        return self._mask_store

    def masks(self, image_id: str, branch: str | None = None, labeler_id: str | None = None,
              packed: bool = False) -> Any:
        """The pseudo-label masks of one image (a MaskSet, or PackedMasks with ``packed``), by branch or labeler
        id; see catalog/masks.py."""
        store = self.mask_store
        read = store.read_packed if packed else store.read
        return read(image_id, labeler_id=labeler_id, branch=branch)

    def fused(self, image_id: str, packed: bool = False) -> Any:
        """The fused pseudo-target of one image: its retained sub-masks with their prompts (a MaskSet)."""
        return self.masks(image_id, branch="fused", packed=packed)

    # ------------------------------------------------------------------ verification
    def verify(self, checksums: bool = True) -> VerifyReport:
        """Check every indexed cube: it exists, is complete and (optionally) still hashes to its recorded content
        sha. Never raises for one image: whatever goes wrong reading it (a chunk that fails its checksum or to
        decode, a missing file) becomes a problem naming the image, and the check goes on. Also lists orphan
        groups (stored, not indexed) and temporaries, stale (writer gone) or in progress."""
        report = VerifyReport()
        bad_parts: list[tuple[str, Exception]] = []
        table, _ = self.storage.read_table("index", INDEX_SCHEMA, on_bad_part=lambda p, e: bad_parts.append((p, e)))
        for part, exc in bad_parts:
            report.problems.append(Problem("", "index", self.storage.rel(part), f"{type(exc).__name__}: {exc}"))
        df = _latest(table.to_pandas())
        for row in df.to_dict("records"):
            try:
                problem = self._check_cube(row["image_id"], row["location"], checksums)
            except Exception as exc:  # any failure to read one image is that image's problem, reported
                problem = Problem(row["image_id"], "corrupt", row["location"], f"{type(exc).__name__}: {exc}")
            if problem is None:
                report.ok += 1
            else:
                report.problems.append(problem)
        masks = self.mask_store.index(refresh=True)
        for row in masks.to_dict("records"):
            try:
                message = self.mask_store.check(row)
            except Exception as exc:  # reported like any other failure to read
                message = f"{type(exc).__name__}: {exc}"
            if message is not None:
                report.problems.append(Problem(row["image_id"], "masks", row["location"], message))
        indexed = set(df["location"]) if not df.empty else set()
        report.orphans = [g for g in self.storage.groups("cubes") if g not in indexed]
        for tmp in self.storage.temporaries():
            (report.in_progress if tmp.alive else report.stale).append(tmp.rel)
        annotation_store.verify_labels(self, df, report)
        return report

    def _check_cube(self, image_id: str, location: str, checksums: bool) -> Problem | None:
        """One indexed cube's problem, or None when it is sound (exceptions are the caller's to report)."""
        try:
            group = zarr.open_group(self.storage.zarr_store(location), mode="r", zarr_format=3)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError):
            return Problem(image_id, "missing", location, "the cube group is not in the catalog")
        if not group.attrs.get("complete"):
            return Problem(image_id, "partial", location, "the cube group was never completed")
        if checksums:  # every chunk's own checksum is verified as it is read (CorruptChunkError names the chunk)
            hasher = hashlib.sha256()
            _, height, width = member(group, "cube").shape
            # catalogs written before tiling hashed whole-width strips of `strip_rows` rows
            tile_shape = group.attrs.get("hash_tile") or [group.attrs.get("strip_rows"), width]
            assert isinstance(tile_shape, list)
            rows, cols = (int(str(v)) for v in tile_shape)
            self.cubes.forget(location)
            for y0 in range(0, height, rows):
                for x0 in range(0, width, cols):
                    tile = self.cubes.read(location, (None, slice(y0, y0 + rows), slice(x0, x0 + cols)))
                    hasher.update(np.ascontiguousarray(tile).data.cast("B"))
            if hasher.hexdigest() != group.attrs.get("content_sha256"):
                return Problem(image_id, "corrupt", location, "the cube's content no longer hashes to the "
                               "content_sha256 recorded when it was written")
        return None


def _latest(df: pd.DataFrame) -> pd.DataFrame:
    """Index rows, latest ingest per image, sorted by image id."""
    if df.empty:
        return df
    df = df.sort_values("ingested_at").drop_duplicates("image_id", keep="last")
    return df.sort_values("image_id").reset_index(drop=True)


