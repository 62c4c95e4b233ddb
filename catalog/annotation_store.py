"""Annotations in the catalog: how a label map (with its per-chunk checksums, its extras such as a change pair's
second cube or a target spectrum) and a tracking sequence are written, read back and verified. What a spec declares
and the data model live in catalog/annotations.py; `Catalog.annotation` and its siblings call this module."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import pandas as pd
import zarr

from base.errors import CatalogError, CorruptChunkError
from catalog.annotations import TRACK_SCHEMA, AnnotationMap, TrackSequence, apply_variant
from catalog.problems import Problem, VerifyReport
from catalog.storage import member

if TYPE_CHECKING:
    from catalog.storage import Storage


class CatalogView(Protocol):
    """What this module uses of a `catalog.catalog.Catalog` (named here, so that the catalog can import this module
    without this module importing the catalog)."""


    chunk_xy: int
    storage: Storage

    @property
    def uri(self) -> str: ...

    def row(self, image_id: str) -> pd.Series: ...
    def images(self, dataset: str | None = None) -> pd.DataFrame: ...
    def is_complete(self, location: str) -> bool: ...



# ---------------------------------------------------------------------------------------------- storage
def label_location(dataset: str, key: str, label_sha256: str) -> str:
    """Where an image's label group lives (content-addressed by the label sha256)."""
    return f"labels/{dataset}/{key}@{label_sha256[:12]}.zarr"


def chunk_checksums(array: np.ndarray, chunk: int) -> dict[str, str]:
    """sha256 of every ``chunk`` x ``chunk`` tile of a 2-D array (C order), keyed 'j.i' by chunk grid index."""
    out: dict[str, str] = {}
    for j in range(0, max(array.shape[0], 1), chunk):
        for i in range(0, max(array.shape[1], 1), chunk):
            tile = np.ascontiguousarray(array[j:j + chunk, i:i + chunk])
            out[f"{j // chunk}.{i // chunk}"] = hashlib.sha256(tile.tobytes()).hexdigest()
    return out


def write_label_group(catalog: CatalogView, location: str, array: np.ndarray, attrs: dict[str, Any],
                      extras: dict[str, np.ndarray] | None = None) -> None:
    """Store a label map (y, x) with per-chunk checksums at ``location``, and any ``extras`` arrays with their
    sha256; a complete group there is re-used. Written to a leased temporary and renamed (locally), so a reader
    never sees half a label."""
    if catalog.is_complete(location):
        return
    chunk = catalog.chunk_xy
    storage = catalog.storage
    target = storage.temporary(location)
    try:
        group = zarr.open_group(storage.zarr_store(target), mode="w", zarr_format=3)
        group.create_array("label", data=np.ascontiguousarray(array), chunks=(chunk, chunk),
                           dimension_names=("y", "x"))
        extra_sha: dict[str, str] = {}
        for name, value in (extras or {}).items():
            data = np.ascontiguousarray(value)
            group.create_array(name, data=data, chunks=data.shape or (1,))
            extra_sha[name] = hashlib.sha256(data.tobytes()).hexdigest()
        group.update_attributes({**attrs, "chunk": chunk, "chunk_sha256": chunk_checksums(array, chunk),
                                 "extra_sha256": extra_sha, "complete": True})  # one metadata write
        storage.commit_folder(target, location)  # replaces an incomplete leftover of a killed run
    except BaseException:
        storage.discard(target, location)
        raise


def write_track_row(catalog: CatalogView, row: dict[str, Any]) -> None:
    """Record one frame of a sequence (its own part file: concurrent frames lose nothing)."""
    catalog.storage.write_part("tracks", [row], TRACK_SCHEMA)


def compact_tracks(catalog: CatalogView) -> int:
    """Merge the track table's part files; returns the number merged."""
    return catalog.storage.compact_table("tracks", TRACK_SCHEMA)


def ingest_fingerprint(sha256: str, label_sha256: str | None) -> str:
    """What ingest compares to skip an unchanged image: the source sha256, plus the label sha256 if any."""
    return sha256 if not label_sha256 else f"{sha256}+{label_sha256}"


def stored_fingerprints(index: pd.DataFrame) -> dict[str, str]:
    """image id -> the ingest fingerprint of its stored row."""
    if index.empty:
        return {}
    labels = index["label_sha256"] if "label_sha256" in index else pd.Series([None] * len(index))
    return {i: ingest_fingerprint(s, ls if isinstance(ls, str) else None)
            for i, s, ls in zip(index["image_id"], index["sha256"], labels, strict=True)}


# ---------------------------------------------------------------------------------------------- reading
def read_label_array(catalog: CatalogView, image_id: str, location: str) -> tuple[np.ndarray, dict[str, Any]]:
    """The stored label map and its attrs, every chunk checked against its recorded sha256."""
    try:
        group = zarr.open_group(catalog.storage.zarr_store(location), mode="r", zarr_format=3)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError) as exc:
        raise CatalogError(f"{image_id}: its label group {location} is missing. Fix: re-ingest the dataset "
                           "(`hvp ingest`), or run `hvp catalog verify` to list what else is missing") from exc
    attrs = dict(group.attrs)
    try:
        array = np.asarray(member(group, "label")[...])
    except Exception as exc:  # undecodable chunk bytes: report as corruption, with the repair
        raise CorruptChunkError(image_id, "label", (0, 0), catalog.storage.path(location, "label"),
                                f"cannot be decoded ({type(exc).__name__}: {exc})") from exc
    _check_chunks(catalog, image_id, location, array, attrs)
    return array, attrs


def read_label_extras(catalog: CatalogView, image_id: str, location: str, attrs: dict[str, Any]
                      ) -> dict[str, np.ndarray]:
    """The extra arrays of a label group (pixel split, target spectrum, second cube), each checked against its
    recorded sha256."""
    recorded = attrs.get("extra_sha256") or {}
    assert isinstance(recorded, dict)
    if not recorded:
        return {}
    group = zarr.open_group(catalog.storage.zarr_store(location), mode="r", zarr_format=3)
    out: dict[str, np.ndarray] = {}
    for name, sha in recorded.items():
        try:
            value = np.ascontiguousarray(np.asarray(member(group, name)[...]))
        except Exception as exc:  # undecodable bytes: corruption, with the repair
            raise CorruptChunkError(image_id, name, (0, 0), catalog.storage.path(location, name),
                                    f"cannot be decoded ({type(exc).__name__}: {exc})") from exc
        if hashlib.sha256(value.tobytes()).hexdigest() != sha:
            raise CorruptChunkError(image_id, name, (0, 0), catalog.storage.path(location, name),
                                    "its sha256 differs from the one recorded at ingest")
        out[str(name)] = value
    return out


def _check_chunks(catalog: CatalogView, image_id: str, location: str, array: np.ndarray, attrs: dict[str, Any]) -> None:
    recorded = attrs.get("chunk_sha256")
    chunk = int(str(attrs.get("chunk", 0)))
    if not isinstance(recorded, dict) or not chunk:
        raise CorruptChunkError(image_id, "label", (0, 0), catalog.storage.path(location),
                                "no chunk checksums recorded")
    actual = chunk_checksums(array, chunk)
    for key, sha in actual.items():
        if recorded.get(key) != sha:
            grid = tuple(int(v) for v in key.split("."))
            raise CorruptChunkError(image_id, "label", grid, catalog.storage.path(location, "label"),
                                    "its sha256 differs from the one recorded at ingest")


def read_annotation(catalog: CatalogView, image_id: str, variant: str | None = None) -> AnnotationMap:
    """See ``Catalog.annotation``."""
    row = catalog.row(image_id)
    location = row.get("label_location")
    if not isinstance(location, str) or not location:
        seq = row.get("sequence_id")
        hint = (f"; it is frame {row.get('frame_index')} of sequence '{seq}', whose boxes "
                f"`Catalog.sequence('{seq}')` gives" if isinstance(seq, str) and seq else
                "; it was stored without one (its dataset declares none, or its label file was absent and not "
                "required; `Catalog.annotated` lists the labelled images)")
        raise KeyError(f"image '{image_id}' has no label map{hint}")
    array, attrs = read_label_array(catalog, image_id, location)
    kind = str(attrs["kind"])
    names = [str(n) for n in attrs.get("class_names") or []]
    ignore = attrs.get("ignore_index")
    ignore_index = int(str(ignore)) if ignore is not None else None
    if variant is not None:
        variants = attrs.get("variants") or {}
        assert isinstance(variants, dict)
        if variant not in variants:
            raise KeyError(f"image '{image_id}' has no label variant '{variant}' (its dataset declares: "
                           f"{', '.join(variants) or 'none'})")
        assert ignore_index is not None  # a variant needs one (checked in the spec)
        array, names, ignore_index = apply_variant(array, names, ignore_index,
                                                   [str(d) for d in variants[variant]["drop"]])
    extras = read_label_extras(catalog, image_id, location, attrs)
    protocol = attrs.get("pixel_split")
    return AnnotationMap(image_id=image_id, kind=kind, array=array, class_names=names,  # type: ignore[arg-type]
                         ignore_index=ignore_index, source_path=str(attrs.get("source_path", "")), variant=variant,
                         pixel_split=extras.get("pixel_split"), target_spectrum=extras.get("target_spectrum"),
                         second=extras.get("second"), protocol=dict(protocol) if isinstance(protocol, dict) else None)


def _tracks(catalog: CatalogView) -> pd.DataFrame:
    """Track rows that agree with their frame's current index row, latest sequence version only."""
    tracks = catalog.storage.read_table("tracks", TRACK_SCHEMA)[0].to_pandas()
    if tracks.empty:
        return tracks
    index = catalog.images()
    current = index[index["label_kind"] == "track"][["image_id", "label_sha256", "sequence_id"]]
    tracks = tracks.merge(current, on=["image_id", "label_sha256", "sequence_id"], how="inner")
    tracks = tracks.sort_values("ingested_at").drop_duplicates(["sequence_id", "frame_index"], keep="last")
    newest = tracks.groupby("sequence_id")["sequence_sha256"].last()  # the box file most recently ingested
    tracks = tracks[tracks["sequence_sha256"] == tracks["sequence_id"].map(newest)]
    return tracks.sort_values(["sequence_id", "frame_index"]).reset_index(drop=True)


def _complete(rows: pd.DataFrame) -> bool:
    count = int(rows["frame_count"].iloc[0])
    return len(rows) == count and list(rows["frame_index"]) == list(range(count))


def read_sequence(catalog: CatalogView, seq_id: str) -> TrackSequence:
    """See ``Catalog.sequence``."""
    tracks = _tracks(catalog)
    rows = tracks[tracks["sequence_id"] == seq_id] if not tracks.empty else tracks
    if rows.empty:
        raise KeyError(f"no sequence '{seq_id}' in the catalog at {catalog.uri} (see `Catalog.sequences()`)")
    if not _complete(rows):
        count = int(rows["frame_count"].iloc[0])
        missing = sorted(set(range(count)) - set(rows["frame_index"]))
        raise CatalogError(f"sequence '{seq_id}' is incomplete: {len(rows)} of {count} frames are catalogued "
                           f"(missing frame indices {missing[:10]}{' ...' if len(missing) > 10 else ''}). Fix: "
                           "see `hvp catalog quarantine` for the rejected frames, repair them and re-run ingest")
    boxes = rows[["x", "y", "w", "h"]].to_numpy(dtype=np.float32)
    split = rows["split"].iloc[0]
    return TrackSequence(seq_id=seq_id, dataset=str(rows["dataset"].iloc[0]), frames=list(rows["image_id"]),
                         boxes=boxes, split=split if isinstance(split, str) else None,
                         source_path=str(rows["source_path"].iloc[0]))


def list_sequences(catalog: CatalogView, dataset: str | None = None, split: str | None = None) -> list[str]:
    """See ``Catalog.sequences``."""
    tracks = _tracks(catalog)
    if tracks.empty:
        return []
    if dataset is not None:
        tracks = tracks[tracks["dataset"] == dataset]
    if split is not None:
        tracks = tracks[tracks["split"] == split]
    return sorted(seq for seq, rows in tracks.groupby("sequence_id") if _complete(rows))


def annotated_images(catalog: CatalogView, dataset: str, split: str | None = None) -> list[str]:
    """See ``Catalog.annotated``."""
    df = catalog.images(dataset)
    if df.empty:
        return []
    df = df[df["label_kind"].notna()]
    if split is not None:
        df = df[df["split"] == split]
    return sorted(df["image_id"])


def verify_labels(catalog: CatalogView, index: pd.DataFrame, report: VerifyReport) -> None:
    """Add label problems to a verify report: a missing, partial or corrupt label group is a problem of its image
    (re-ingesting the image repairs it); label groups no index row names are orphans."""
    named: set[str] = set()
    if not index.empty and "label_location" in index:
        for image_id, location in zip(index["image_id"], index["label_location"], strict=True):
            if not isinstance(location, str) or not location:
                continue
            named.add(location)
            if not catalog.storage.exists(location):
                report.problems.append(Problem(image_id, "missing", location, "its label group is gone"))
            elif not catalog.is_complete(location):
                report.problems.append(Problem(image_id, "partial", location, "its label group was never completed"))
            else:
                try:
                    _, attrs = read_label_array(catalog, image_id, location)
                    read_label_extras(catalog, image_id, location, attrs)
                except Exception as exc:  # any failure to read a label is that image's problem, reported
                    report.problems.append(Problem(image_id, "corrupt", location, f"{type(exc).__name__}: {exc}"))
    report.orphans += [g for g in catalog.storage.groups("labels") if g not in named]
