"""Mask artifacts: per image and labeler id, a bit-packed ``(n, y, x)`` stack chunked along n plus a per-mask table.

Layout under the catalog::

    labelers/<labeler_id>.json                         what produced the masks (config, weights sha or random-init)
    masks/<labeler_id>/<image_id>@<n>.zarr             group: bits (n, y, ceil(x/8)) uint8, attrs; table.parquet
    masks/index/part-*.parquet                         one row per (image, labeler): the commit point

The index row is written last, so a killed run leaves an unindexed group that the next run rewrites; mask groups
are never modified once indexed. Fused pseudo-targets use the same store with their fusion id as labeler id.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import zarr
from zarr.codecs import BloscCodec, BloscShuffle

from catalog.storage import Storage, member, now_utc

MASK_INDEX_SCHEMA = pa.schema([
    ("image_id", pa.string()), ("labeler_id", pa.string()), ("branch", pa.string()), ("n", pa.int32()),
    ("location", pa.string()), ("random_init", pa.bool_()), ("created_at", pa.timestamp("us", tz="UTC")),
])
#: Per-mask fields every labeler fills (bbox is x0, y0, x1, y1 in pixels, inclusive-exclusive).
MASK_FIELDS = ["score", "predicted_iou", "stability", "area", "bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1",
               "branch", "prompt_x", "prompt_y"]
CHUNK_N = 16


@dataclass
class MaskSet:
    """Boolean masks ``(n, y, x)`` with one table row per mask (MASK_FIELDS, plus any extra columns)."""

    masks: np.ndarray
    table: pd.DataFrame
    labeler_id: str = ""
    attrs: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.masks.ndim != 3 or self.masks.dtype != bool:
            raise ValueError(f"masks must be a boolean (n, y, x) array, got {self.masks.dtype} {self.masks.shape}")
        if len(self.table) != self.masks.shape[0]:
            raise ValueError(f"{len(self.table)} table rows for {self.masks.shape[0]} masks")
        missing = [f for f in MASK_FIELDS if f not in self.table.columns]
        if missing:
            raise ValueError(f"mask table lacks fields {missing}")

    def __len__(self) -> int:
        return int(self.masks.shape[0])


@dataclass
class PackedMasks:
    """A mask set as stored: bits packed along x, ``(n, y, ceil(x / 8))``; windows unpack only what they cover
    (8x smaller in memory than a MaskSet, and cheap to cut crops from)."""

    bits: np.ndarray
    width: int
    table: pd.DataFrame
    labeler_id: str = ""
    attrs: dict[str, Any] | None = None

    @property
    def nbytes(self) -> int:
        return int(self.bits.nbytes)

    def window(self, y0: int, y1: int, x0: int, x1: int, index: np.ndarray | None = None) -> np.ndarray:
        """Boolean masks ``(n, y1 - y0, x1 - x0)`` of a window (clipped to the image), optionally of some masks."""
        y1, x1 = min(y1, self.bits.shape[1]), min(x1, self.width)
        b0 = x0 // 8
        bits = self.bits if index is None else self.bits[index]
        rows = np.unpackbits(bits[:, y0:y1, b0:(x1 + 7) // 8], axis=-1)
        return rows[:, :, x0 - 8 * b0:x1 - 8 * b0].astype(bool)

    def unpack(self) -> MaskSet:
        masks = np.unpackbits(self.bits, axis=-1, count=self.width).astype(bool)
        return MaskSet(masks=masks, table=self.table, labeler_id=self.labeler_id, attrs=self.attrs)


def table_from_masks(masks: np.ndarray, branch: str, **columns: Any) -> pd.DataFrame:
    """A mask table whose area, bbox and prompt (a point deep inside each mask) are computed from the masks;
    ``columns`` give the model's fields (score, predicted_iou, stability) as arrays or scalars."""
    from scipy import ndimage

    rows = []
    for m in masks:
        ys, xs = np.nonzero(m)
        if ys.size:
            dist = ndimage.distance_transform_edt(np.pad(m, 1))[1:-1, 1:-1]
            py, px = (int(v) for v in np.unravel_index(int(np.argmax(dist)), m.shape))
            box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
        else:
            py = px = -1
            box = (0, 0, 0, 0)
        rows.append({"area": int(ys.size), "bbox_x0": box[0], "bbox_y0": box[1], "bbox_x1": box[2],
                     "bbox_y1": box[3], "prompt_x": int(px), "prompt_y": int(py)})
    table = pd.DataFrame(rows, columns=["area", "bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1", "prompt_x",
                                        "prompt_y"])
    for name in ("score", "predicted_iou", "stability"):
        table[name] = np.broadcast_to(np.asarray(columns.pop(name, np.nan), dtype=np.float64), (len(masks),))
    table["branch"] = branch
    for name, value in columns.items():
        table[name] = value
    return table


class HasStorage(Protocol):
    """Anything that sits on a catalog's storage (a Catalog)."""

    @property
    def storage(self) -> Storage: ...


class MaskStore:
    """Mask artifacts of one catalog, given as its Storage or as anything holding one (a Catalog)."""

    def __init__(self, catalog: Storage | HasStorage) -> None:
        self.storage = catalog if isinstance(catalog, Storage) else catalog.storage
        self._index: pd.DataFrame | None = None  # read once per store; writes through this store append to it
        self._lookup: dict[tuple[str, str, str], dict[str, Any]] = {}

    def register_labeler(self, labeler_id: str, descriptor: dict[str, Any]) -> None:
        """Record what a labeler id stands for (idempotent; the id already hashes the descriptor)."""
        rel = f"labelers/{labeler_id}.json"
        if not self.storage.exists(rel):
            self.storage.fs.makedirs(self.storage.path("labelers"), exist_ok=True)
            self.storage.put_bytes(rel, json.dumps(descriptor, indent=2, sort_keys=True, default=str).encode())

    def labeler(self, labeler_id: str) -> dict[str, Any]:
        """What a labeler id stands for, as registered."""
        data: dict[str, Any] = json.loads(self.storage.read_bytes(f"labelers/{labeler_id}.json"))
        return data

    def index(self, refresh: bool = False) -> pd.DataFrame:
        """Every committed mask set (latest per image and labeler); read once, then kept (``refresh`` re-reads)."""
        if self._index is None or refresh:
            df = self.storage.read_table("masks/index", MASK_INDEX_SCHEMA)[0].to_pandas()
            if not df.empty:
                df = df.sort_values("created_at").drop_duplicates(["image_id", "labeler_id"], keep="last")
            self._index = df.reset_index(drop=True)
            self._lookup = {}
            for row in self._index.to_dict("records"):  # in created_at order: the latest per branch wins
                self._remember(row)
        return self._index

    def _remember(self, row: dict[str, Any]) -> None:
        """Index one row for O(1) reads by (image, labeler) and by (image, branch)."""
        self._lookup[(row["image_id"], "labeler", row["labeler_id"])] = row
        self._lookup[(row["image_id"], "branch", row["branch"])] = row
        self._lookup[(row["image_id"], "any", "")] = row

    def _find(self, image_id: str, labeler_id: str | None, branch: str | None) -> dict[str, Any] | None:
        if labeler_id is not None:
            row = self._lookup.get((image_id, "labeler", labeler_id))
            return row if row is not None and branch in (None, row["branch"]) else None
        if branch is not None:
            return self._lookup.get((image_id, "branch", branch))
        return self._lookup.get((image_id, "any", ""))

    def compact(self) -> int:
        """Merge the mask index's part files (one per committed mask set) into one, each (image, labeler, location)
        kept once, and remove the temporaries of writers that are gone; returns the number of parts merged."""
        self.storage.remove_stale_temporaries()
        return self.storage.compact_table("masks/index", MASK_INDEX_SCHEMA,
                                          unique=["image_id", "labeler_id", "location"])

    def check(self, row: dict[str, Any]) -> str | None:
        """What is wrong with one committed mask set (an index row), or None: the group and its table must read
        back with ``n`` masks of the recorded size."""
        group = zarr.open_group(self.storage.zarr_store(row["location"]), mode="r", zarr_format=3)
        bits = np.asarray(member(group, "bits")[...])
        with self.storage.fs.open(self.storage.path(row["location"], "table.parquet"), "rb") as fh:
            rows = pq.read_metadata(fh).num_rows
        n = int(row["n"])
        if bits.shape[0] != n or rows != n or bits.shape[2] != (int(str(group.attrs["width"])) + 7) // 8:
            return f"{bits.shape[0]} masks and {rows} table rows stored for the {n} the index records"
        return None

    def drop(self, pairs: list[tuple[str, str]]) -> None:
        """Forget the committed masks of (image id, labeler id) pairs, so the label stage makes them again."""
        keys = pa.array(sorted({f"{i}\0{lid}" for i, lid in pairs}), pa.string())
        self.storage.compact_table("masks/index", MASK_INDEX_SCHEMA, drop=lambda t: pc.is_in(
            pc.binary_join_element_wise(t["image_id"], t["labeler_id"], "\0"), value_set=keys))
        self._index = None

    def missing(self, labeler_id: str, image_ids: list[str]) -> list[str]:
        """The images among ``image_ids`` that have no committed masks for ``labeler_id``."""
        df = self.index()
        done = set(df.loc[df["labeler_id"] == labeler_id, "image_id"]) if not df.empty else set()
        return [i for i in image_ids if i not in done]

    def write(self, image_id: str, labeler_id: str, branch: str, masks: MaskSet, random_init: bool,
              attrs: dict[str, Any] | None = None) -> str:
        """Store one image's masks for one labeler and commit the index row; returns the location."""
        n, h, w = masks.masks.shape
        location = f"masks/{labeler_id}/{image_id}@{n}.zarr"
        tmp = self.storage.temporary(location)
        group = zarr.open_group(self.storage.zarr_store(tmp), mode="w", zarr_format=3)
        packed = np.packbits(masks.masks, axis=-1) if n else np.zeros((0, h, (w + 7) // 8), np.uint8)
        group.create_array("bits", data=packed, chunks=(max(1, min(CHUNK_N, n)), h, packed.shape[-1]),
                           dimension_names=("mask", "y", "xbyte"),
                           compressors=BloscCodec(cname="zstd", clevel=3, shuffle=BloscShuffle.bitshuffle))
        buf = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pandas(masks.table.reset_index(drop=True), preserve_index=False), buf)
        self.storage.put_bytes(f"{tmp}/table.parquet", buf.getvalue().to_pybytes())
        group.attrs.update({**(attrs or {}), "image_id": image_id, "labeler_id": labeler_id, "branch": branch,
                            "n": int(n), "height": int(h), "width": int(w), "random_init": bool(random_init),
                            "weights": "random-init" if random_init else "checkpoint"})
        self.storage.commit_folder(tmp, location)
        row = {"image_id": image_id, "labeler_id": labeler_id, "branch": branch, "n": int(n), "location": location,
               "random_init": bool(random_init), "created_at": now_utc()}
        self.storage.write_part("masks/index", [row], MASK_INDEX_SCHEMA)
        if self._index is not None:
            self._index = pd.concat([self._index, pd.DataFrame([row])], ignore_index=True).drop_duplicates(
                ["image_id", "labeler_id"], keep="last").reset_index(drop=True)
            self._remember(row)
        return location

    def read(self, image_id: str, labeler_id: str | None = None, branch: str | None = None) -> MaskSet:
        """The masks of one image, by labeler id or by branch (the latest labeler of that branch)."""
        return self.read_packed(image_id, labeler_id, branch).unpack()

    def read_packed(self, image_id: str, labeler_id: str | None = None, branch: str | None = None) -> PackedMasks:
        """The masks of one image, by labeler id or by branch (the latest labeler of that branch); the kept index
        is re-read once when it has nothing for the image (another process may have written since)."""
        row = None
        for refresh in (False, True):
            self.index(refresh=refresh)
            if (row := self._find(image_id, labeler_id, branch)) is not None:
                break
        if row is None:
            raise KeyError(f"no masks for image '{image_id}'" + (f" from labeler {labeler_id}" if labeler_id else "")
                           + (f" of branch '{branch}'" if branch else "") + " (run `hvp label`)")
        group = zarr.open_group(self.storage.zarr_store(row["location"]), mode="r", zarr_format=3)
        attrs = dict(group.attrs)
        packed = np.asarray(member(group, "bits")[...])
        with self.storage.fs.open(self.storage.path(row["location"], "table.parquet"), "rb") as fh:
            table = pq.read_table(fh).to_pandas()
        return PackedMasks(bits=packed, width=int(str(attrs["width"])), table=table,
                           labeler_id=str(row["labeler_id"]), attrs=attrs)
