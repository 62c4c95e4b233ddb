"""Cached frozen-backbone features: per feature set (what produced them) and image, the backbone's multi-scale maps.

Layout under the catalog::

    features/sets/<set_id>.json                         the feature set's descriptor: model, overrides, resolved
                                                        config, weights (sha256 or random-init + seed),
                                                        preprocessing contract, GSD rule, dtype
    features/<set_id>/<image_id>@<sha12>.zarr           group: arrays f0..fN (C, h, w), each chunk with a crc32c
                                                        checksum (zarr's codec: verified on every read); attrs:
                                                        input/original/frame size, GSD, provenance
    features/index/part-*.parquet                       one row per (set, image): the commit point

A set id hashes the descriptor, so other weights, another model, other overrides or another preprocessing contract
give another set; the entry of an image is named by the image's content sha256 as well, so a re-ingested, changed
image is a cache miss. Groups are written under a temporary name and renamed, then the index row is written
(batched: one part file per batch of images); a killed run leaves at most unindexed groups, which the next run
rewrites.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import zarr
from zarr.codecs import Crc32cCodec

from base.errors import CatalogError
from catalog.catalog import Catalog
from catalog.storage import member, now_utc

FEATURE_INDEX_SCHEMA = pa.schema([
    ("feature_set", pa.string()), ("image_id", pa.string()), ("image_sha256", pa.string()),
    ("location", pa.string()), ("maps", pa.int32()), ("dtype", pa.string()),
    ("created_at", pa.timestamp("us", tz="UTC")),
])
CHUNK_XY = 32
"""Spatial chunk edge of stored feature maps (all channels per chunk): a -B map of 32 x 32 cells is one chunk."""
DTYPES = ("float16", "float32")


def feature_set_id(descriptor: dict[str, Any]) -> str:
    """Content id of a feature set: sha256 of its canonical descriptor JSON (first 16 hex digits)."""
    canonical = json.dumps(descriptor, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class CachedFeatures:
    """One image's stored maps, (C, h, w) each in the stored dtype, and the entry's attrs."""

    maps: tuple[np.ndarray, ...]
    attrs: dict[str, Any]


class FeatureCorruptError(CatalogError):
    """A stored feature chunk failed its crc32c checksum: names the image, the map, the file and the fix."""

    def __init__(self, set_id: str, image_id: str, array: str, path: str, problem: str) -> None:
        self.set_id, self.image_id, self.array, self.path = set_id, image_id, array, path
        super().__init__(
            f"{image_id}: feature map '{array}' of feature set {set_id} ({path}) is corrupt: {problem}. Fix: delete "
            f"{path.rsplit('/', 1)[0]} and rerun `hvp features` with the same options (a missing entry is "
            "recomputed; nothing else is)")


class FeatureStore:
    """The feature cache of one catalog (cheap to create; safe beside other writers: one part file per batch)."""

    def __init__(self, catalog: Catalog) -> None:
        self.cat = catalog
        self.storage = catalog.storage
        self._index: pd.DataFrame | None = None
        self._rows: dict[str, dict[str, dict[str, Any]]] = {}  # set id -> image id -> index row

    # ------------------------------------------------------------------ feature sets
    def register(self, set_id: str, descriptor: dict[str, Any]) -> None:
        """Record what a feature set id stands for (idempotent: the id hashes the descriptor)."""
        rel = f"features/sets/{set_id}.json"
        if not self.storage.exists(rel):
            self.storage.put_bytes(rel, json.dumps(descriptor, indent=2, sort_keys=True, default=str).encode())

    def descriptor(self, set_id: str) -> dict[str, Any]:
        """The descriptor a feature set was registered with."""
        rel = f"features/sets/{set_id}.json"
        if not self.storage.exists(rel):
            raise KeyError(f"no feature set {set_id} in the catalog at {self.cat.uri} (run `hvp features`)")
        doc: dict[str, Any] = json.loads(self.storage.read_bytes(rel))
        return doc

    # ------------------------------------------------------------------ index
    def index(self, refresh: bool = False) -> pd.DataFrame:
        """Every committed entry (latest per set and image); read once per store, ``refresh`` re-reads."""
        if self._index is None or refresh:
            df = self.storage.read_table("features/index", FEATURE_INDEX_SCHEMA)[0].to_pandas()
            if not df.empty:
                df = df.sort_values("created_at").drop_duplicates(["feature_set", "image_id"], keep="last")
            self._index = df.reset_index(drop=True)
            self._rows = {}
            for row in self._index.to_dict("records"):
                self._rows.setdefault(str(row["feature_set"]), {})[str(row["image_id"])] = row
        return self._index

    def compact(self) -> int:
        """Remove the temporaries of writers that are gone (a killed run's half-written groups and index parts) and
        merge the index's part files into one; returns the number merged."""
        self.storage.remove_stale_temporaries()
        return self.storage.compact_table("features/index", FEATURE_INDEX_SCHEMA, latest="created_at",
                                          unique=["feature_set", "image_id"])

    def entries(self, set_id: str) -> dict[str, dict[str, Any]]:
        """image id -> its committed index row, for one feature set."""
        self.index()
        return self._rows.get(set_id, {})

    def cached(self, set_id: str, images: dict[str, str], refresh: bool = True) -> set[str]:
        """The image ids among ``images`` (id -> content sha256) whose features are stored for ``set_id``, for the
        same image content, and whose group still exists."""
        self.index(refresh=refresh)
        found = self.entries(set_id)
        return {i for i, sha in images.items() if i in found and found[i]["image_sha256"] == sha
                and self.storage.exists(str(found[i]["location"]))}

    # ------------------------------------------------------------------ entries
    @staticmethod
    def location(set_id: str, image_id: str, image_sha256: str) -> str:
        """Where one image's features of one set live (named by the image's content sha256)."""
        return f"features/{set_id}/{image_id}@{image_sha256[:12]}.zarr"

    def write_group(self, set_id: str, image_id: str, image_sha256: str, maps: Sequence[np.ndarray],
                    attrs: dict[str, Any], dtype: str = "float16") -> dict[str, Any]:
        """Store one image's maps (C, h, w) as ``dtype`` with per-chunk crc32c; returns its index row, which
        ``commit`` makes visible. Written under a temporary name and renamed (locally), so readers never see half
        an entry."""
        if dtype not in DTYPES:
            raise ValueError(f"feature dtype {dtype!r}; choose one of {DTYPES}")
        location = self.location(set_id, image_id, image_sha256)
        target = self.storage.temporary(location)
        try:
            group = zarr.open_group(self.storage.zarr_store(target), mode="w", zarr_format=3)
            for i, arr in enumerate(maps):
                if arr.ndim != 3:
                    raise ValueError(f"{image_id}: feature map {i} has shape {arr.shape}; expected (C, h, w)")
                data = np.ascontiguousarray(arr, dtype=dtype)
                c, h, w = data.shape
                group.create_array(f"f{i}", data=data, chunks=(c, min(h, CHUNK_XY), min(w, CHUNK_XY)),
                                   compressors=Crc32cCodec(), dimension_names=("channel", "y", "x"))
            group.update_attributes({**attrs, "feature_set": set_id, "image_id": image_id,
                                     "image_sha256": image_sha256, "maps": len(maps), "dtype": dtype})
            self.storage.commit_folder(target, location)  # replaces an unindexed leftover of a killed run
        except BaseException:
            self.storage.discard(target, location)
            raise
        return {"feature_set": set_id, "image_id": image_id, "image_sha256": image_sha256, "location": location,
                "maps": len(maps), "dtype": dtype, "created_at": now_utc()}

    def commit(self, rows: list[dict[str, Any]]) -> None:
        """Make written entries visible: one index part file for the batch."""
        if rows:
            self.storage.write_part("features/index", rows, FEATURE_INDEX_SCHEMA)
            if self._index is not None:
                self._index = pd.concat([self._index, pd.DataFrame(rows)], ignore_index=True).drop_duplicates(
                    ["feature_set", "image_id"], keep="last").reset_index(drop=True)
                for row in rows:
                    self._rows.setdefault(str(row["feature_set"]), {})[str(row["image_id"])] = row

    def read(self, set_id: str, image_id: str) -> CachedFeatures:
        """One image's stored maps and attrs; every chunk is checked against its crc32c (FeatureCorruptError).
        The kept index is re-read once when it lacks the image (another process may have written since)."""
        row = self.entries(set_id).get(image_id)
        if row is None:
            self.index(refresh=True)
            row = self.entries(set_id).get(image_id)
        if row is None:
            raise KeyError(f"no features of image '{image_id}' in feature set {set_id} (run `hvp features` with "
                           "the same model, checkpoint and preprocessing)")
        location = str(row["location"])
        try:
            group = zarr.open_group(self.storage.zarr_store(location), mode="r", zarr_format=3)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError) as exc:
            raise CatalogError(f"{image_id}: its features {location} are indexed but missing. Fix: rerun "
                               "`hvp features` with the same options (the entry is recomputed)") from exc
        attrs = dict(group.attrs)
        maps = []
        for i in range(int(str(attrs["maps"]))):
            try:
                maps.append(np.asarray(member(group, f"f{i}")[...]))
            except ValueError as exc:  # zarr's crc32c codec: "Stored and computed checksum do not match"
                raise FeatureCorruptError(set_id, image_id, f"f{i}", self.storage.path(location, f"f{i}"),
                                          str(exc)) from exc
        return CachedFeatures(tuple(maps), attrs)
