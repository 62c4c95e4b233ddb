"""Labels of downstream datasets: what a spec declares, how labels are stored, and how they are read back.

Kinds: ``segmentation`` (a class map aligned with the cube, with class names and an ignore index), ``saliency``
(a binary mask) and ``track`` (a sequence of frames, one box per frame); and for airborne scenes, which are single
images split by pixels: ``pixel_classes`` (a class map, 0 = unlabelled, with a per-pixel split drawn with a recorded
seed: N labelled pixels per class, or a fraction, the rest test), ``target_map`` / ``anomaly_map`` (a binary map;
a target map may name a target spectrum file) and ``change_pair`` (a second co-registered cube of the scene and a
binary change map). Split membership is data: the index row of every image carries its ``split`` (an airborne
scene without split rules: ``pixels`` for pixel classes, else ``test``) and whether pretraining may use it.

Layout under the catalog (beside ``cubes/``)::

    labels/<dataset>/<key>@<label_sha12>.zarr   group: array ``label`` (y, x), chunked like the cube, one sha256
                                                per chunk in the attrs; kind, class names, ignore index, source;
                                                airborne extras beside it (``pixel_split`` (y, x) 0 unlabelled /
                                                1 train / 2 test, ``target_spectrum`` (band,), ``second`` (band,
                                                y, x)), each with its sha256 in the attrs
    tracks/part-*.parquet                       one row per frame of a sequence: its index and box (0-based
                                                x, y, w, h in pixels of the stored cube)

Label groups are content-addressed by the label sha256 (label file + declaration + split), so a changed label
never overwrites a stored one; the image's index row names its label and is, as for the cube, the commit point.
A track row is written before its frame's index row; a sequence is served only when every frame's current row
agrees with it.

Roles: a spec's ``roles`` says whether a dataset serves ``pretraining``, ``evaluation`` or both. When it serves
both, only images whose split is in ``pretraining_splits`` (default: ``train``) or that have no split enter
pretraining, so evaluation images stay out of it; an evaluation-only dataset never enters pretraining.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np
import pandas as pd
import pyarrow as pa
import zarr
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from catalog.problems import Problem, VerifyReport
from catalog.storage import member
from infra.errors import CatalogError, CorruptChunkError

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

AnnotationKind = Literal["segmentation", "saliency", "track", "pixel_classes", "target_map", "anomaly_map",
                         "change_pair"]
AIRBORNE_KINDS = ("pixel_classes", "target_map", "anomaly_map", "change_pair")
"""Kinds of single-scene airborne benchmarks (split by pixels, not by images)."""
BINARY_KINDS = ("saliency", "target_map", "anomaly_map", "change_pair")
"""Kinds whose map is binary (0 background, 1 positive)."""
SCENE_SPLIT = {"pixel_classes": "pixels", "target_map": "test", "anomaly_map": "test", "change_pair": "test"}
"""The split of an airborne scene that no split rule names."""
PIXEL_TRAIN, PIXEL_TEST = 1, 2
"""Values of a stored per-pixel split (0: unlabelled)."""
Role = Literal["pretraining", "evaluation"]
SALIENCY_CLASSES = ["background", "salient"]

#: Columns of the catalog index that this module fills (null in rows written before labels existed).
INDEX_FIELDS = [
    ("split", pa.string()), ("pretraining", pa.bool_()), ("label_kind", pa.string()),
    ("label_location", pa.string()), ("label_sha256", pa.string()), ("sequence_id", pa.string()),
    ("frame_index", pa.int32()),
]
TRACK_SCHEMA = pa.schema([
    ("dataset", pa.string()), ("sequence_id", pa.string()), ("frame_index", pa.int32()),
    ("frame_count", pa.int32()), ("image_id", pa.string()), ("label_sha256", pa.string()),
    ("sequence_sha256", pa.string()), ("x", pa.float32()), ("y", pa.float32()), ("w", pa.float32()),
    ("h", pa.float32()), ("split", pa.string()), ("source_path", pa.string()),
    ("ingested_at", pa.timestamp("us", tz="UTC")),
])


# ---------------------------------------------------------------------------------------------- declarations
class LabelReadOptions(BaseModel):
    """How to read a label file: ``key`` (the array's name in a .mat/.npz; None: the only 2-D numeric array),
    ``transpose`` (the map is stored x-by-y), ``threshold`` (saliency: values at or above are salient; default
    half the mask's maximum, at least 1), ``one_based`` (track: boxes count pixels from 1, as MATLAB/OTB do),
    ``clip_boxes`` (track: clip boxes overhanging the frame instead of rejecting them)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    key: str | None = None
    transpose: bool = False
    threshold: float | None = Field(default=None, gt=0)
    one_based: bool = True
    clip_boxes: bool = False
    spectrum_key: str | None = None
    second_key: str | None = None


class PixelSplit(BaseModel):
    """How a pixel-class scene is split: ``per_class`` labelled (train) pixels per class, or a ``fraction`` of each
    class's pixels (at least one), drawn with ``seed``; every other labelled pixel is test."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    per_class: int | None = Field(default=None, gt=0)
    fraction: float | None = Field(default=None, gt=0, lt=1)
    seed: int = 0

    @model_validator(mode="after")
    def _one(self) -> PixelSplit:
        if (self.per_class is None) == (self.fraction is None):
            raise ValueError("give one of 'per_class' (labelled pixels per class) or 'fraction'")
        return self

    def draw(self, class_map: np.ndarray) -> np.ndarray:
        """The split map (y, x) uint8: 0 unlabelled, 1 train, 2 test; classes in ascending id order, each drawing
        from its pixels in row-major order with one generator seeded by ``seed``."""
        rng = np.random.default_rng(self.seed)
        out = np.where(class_map > 0, PIXEL_TEST, 0).astype(np.uint8)
        flat = out.reshape(-1)
        for c in np.unique(class_map[class_map > 0]):
            idx = np.flatnonzero(class_map.reshape(-1) == c)
            n = self.per_class if self.per_class is not None else max(1, round(self.fraction * idx.size))  # type: ignore[operator]
            flat[rng.choice(idx, size=min(n, idx.size), replace=False)] = PIXEL_TRAIN
        return out


class LabelVariant(BaseModel):
    """A named relabelling chosen when labels are read: ``drop`` folds these classes into the ignore index and
    renumbers the remaining classes in order (e.g. HS3-Bench's HSI Drive without water)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    drop: list[str] = Field(min_length=1)


class AnnotationSpec(BaseModel):
    """The labels of a dataset: their kind, where each image's label file is, how to read it, what ids mean.

    ``files``: path templates relative to the dataset folder ({dir} {parent} {stem} {base} {path} expand, globs
    allowed); the first that exists is the image's label file (for ``track``, the sequence's box file).
    ``format``: ``image`` (PNG/BMP/TIFF/JPEG), ``npy`` (.npy/.npz), ``mat`` (v5 or v7.3), ``boxes`` (text, one
    ``x y w h`` per line); ``auto`` tells it by the extension. ``required``: an image without a label file is
    quarantined (else it is stored without a label).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: AnnotationKind
    files: list[str] = Field(min_length=1)
    format: Literal["auto", "image", "npy", "mat", "boxes"] = "auto"
    options: LabelReadOptions = Field(default_factory=LabelReadOptions)
    class_names: list[str] | None = None
    ignore_index: int | None = Field(default=None, ge=0)
    variants: dict[str, LabelVariant] = Field(default_factory=dict)
    required: bool = True
    pixel_split: PixelSplit | None = None
    target_spectrum: str | None = None
    second: str | None = None

    @field_validator("files", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @model_validator(mode="after")
    def _check(self) -> AnnotationSpec:
        self._check_airborne()
        if self.kind in ("segmentation", "pixel_classes"):
            if not self.class_names or len(self.class_names) < 2:
                raise ValueError("segmentation labels need 'class_names' (at least 2; list position = class id)")
        elif self.class_names is not None and (self.kind == "track" or self.class_names != SALIENCY_CLASSES):
            raise ValueError(f"'class_names' is for segmentation labels; {self.kind} labels have none to set")
        if self.class_names is not None and len(set(self.class_names)) != len(self.class_names):
            raise ValueError("'class_names' has duplicates; give each class id its own name")
        if self.kind == "pixel_classes":
            return self
        if self.kind != "segmentation" and (self.ignore_index is not None or self.variants):
            raise ValueError(f"'ignore_index' and 'variants' are for segmentation labels, not {self.kind}")
        if self.kind == "track" and self.format not in ("auto", "boxes"):
            raise ValueError("track labels are box files: set 'format: boxes' (or leave it out)")
        if self.kind != "track" and self.format == "boxes":
            raise ValueError(f"'format: boxes' is for track labels; {self.kind} labels are images, npy or mat")
        names = self.class_names or []
        for name, variant in self.variants.items():
            unknown = [c for c in variant.drop if c not in names]
            if unknown:
                raise ValueError(f"variant '{name}' drops {unknown}, which are not in 'class_names'")
            if self.ignore_index is None:
                raise ValueError(f"variant '{name}' folds classes into the ignore index: set 'ignore_index'")
            if self.ignore_index < len(names) and names[self.ignore_index] in variant.drop:
                raise ValueError(f"variant '{name}' drops the ignored class itself")
        return self

    def _check_airborne(self) -> None:
        """Rules of the airborne kinds: which of pixel_split / target_spectrum / second each needs or refuses."""
        if (self.kind == "pixel_classes") != (self.pixel_split is not None):
            raise ValueError("'pixel_split' (labelled pixels per class, seeded) is needed by pixel_classes labels "
                             f"and only by them (kind is {self.kind})")
        if self.kind == "pixel_classes" and (self.ignore_index not in (None, 0) or self.variants):
            raise ValueError("pixel_classes labels use 0 for unlabelled pixels: remove 'ignore_index' and 'variants'")
        if self.kind == "pixel_classes" and self.class_names and self.class_names[0] != "unlabelled":
            raise ValueError("pixel_classes labels reserve id 0 for unlabelled pixels: make 'unlabelled' the first "
                             "of 'class_names'")
        if self.target_spectrum is not None and self.kind != "target_map":
            raise ValueError(f"'target_spectrum' is for target_map labels, not {self.kind}")
        if (self.kind == "change_pair") != (self.second is not None):
            raise ValueError("'second' (path template of the second date's cube) is needed by change_pair labels "
                             f"and only by them (kind is {self.kind})")
        if self.kind in AIRBORNE_KINDS[1:] and self.class_names is not None:
            raise ValueError(f"{self.kind} labels are binary: remove 'class_names'")

    def names(self) -> list[str]:
        """The class names of the stored labels (binary maps: background and the positive class; track: none)."""
        if self.kind == "saliency":
            return list(SALIENCY_CLASSES)
        if self.kind in AIRBORNE_KINDS[1:]:
            return ["background", {"target_map": "target", "anomaly_map": "anomaly", "change_pair": "change"}[
                self.kind]]
        return list(self.class_names or [])


class SplitSpec(BaseModel):
    """Which split each image belongs to, as data: give one of ``lists`` (split -> a text file in the dataset
    folder naming one image per line: its file name, stem, path, or its sequence folder), ``globs`` (split ->
    patterns on the image's path in the dataset folder) or ``ordered`` (split -> fraction of the images taken in
    file-name order, e.g. {train: 0.8, test: 0.2}); ``default`` is the split of images that no rule names
    (none: they have no split)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    lists: dict[str, str] | None = None
    globs: dict[str, list[str]] | None = None
    ordered: dict[str, float] | None = None
    default: str | None = None

    @field_validator("globs", mode="before")
    @classmethod
    def _globs_one_or_many(cls, v: Any) -> Any:
        return {k: [p] if isinstance(p, str) else p for k, p in v.items()} if isinstance(v, dict) else v

    @model_validator(mode="after")
    def _check(self) -> SplitSpec:
        given = [n for n in ("lists", "globs", "ordered") if getattr(self, n) is not None]
        if len(given) > 1:
            raise ValueError(f"give one of 'lists', 'globs' or 'ordered', not {' and '.join(given)}")
        if not given and self.default is None:
            raise ValueError("give 'lists', 'globs', 'ordered' or at least 'default'")
        if self.ordered is not None:
            if any(f <= 0 for f in self.ordered.values()):
                raise ValueError("'ordered' fractions must be positive")
            if abs(sum(self.ordered.values()) - 1.0) > 1e-6:
                raise ValueError(f"'ordered' fractions sum to {sum(self.ordered.values()):g}, not 1")
        return self

    def names(self) -> list[str]:
        """Every split name the declaration can assign."""
        rules = self.lists or self.globs or self.ordered or {}
        return [*rules, *([self.default] if self.default and self.default not in rules else [])]


def check_dataset_labels(spec: Any) -> None:
    """Rules across a DatasetSpec's label fields (called by its validator); ValueError names the field."""
    roles = list(spec.roles)
    if len(set(roles)) != len(roles):
        raise ValueError("'roles' lists a role twice")
    airborne = spec.labels is not None and spec.labels.kind in AIRBORNE_KINDS
    if "evaluation" in roles and (spec.labels is None or (spec.splits is None and not airborne)):
        raise ValueError("a dataset with the 'evaluation' role needs 'labels' and 'splits' (which images "
                         "train a head and which evaluate it)")
    if spec.labels is not None and spec.labels.kind == "track" and spec.sample_every != 1:
        raise ValueError("track labels need every frame of a sequence: remove 'sample_every'")
    if set(roles) == {"pretraining", "evaluation"} and spec.splits is not None and "pretraining_splits" in \
            spec.model_fields_set:  # the default (train) may name no split: then only unsplit images pretrain
        unknown = [s for s in spec.pretraining_splits if s not in spec.splits.names()]
        if unknown:
            raise ValueError(f"'pretraining_splits' names {unknown}, which 'splits' never assigns "
                             f"({', '.join(spec.splits.names())}): list the splits pretraining may use")


def default_roles() -> list[Role]:
    """What a spec that says nothing about roles serves: pretraining only."""
    return ["pretraining"]


def may_pretrain(roles: list[str], pretraining_splits: list[str], split: str | None) -> bool:
    """Whether pretraining may use an image: its dataset serves pretraining and, if it also serves evaluation,
    the image has no split or one of ``pretraining_splits``."""
    if "pretraining" not in roles:
        return False
    return "evaluation" not in roles or split is None or split in pretraining_splits


# ---------------------------------------------------------------------------------------------- data model
@dataclass
class AnnotationMap:
    """One image's label: ``array`` (H, W) integer class ids (saliency: 0 background, 1 salient), aligned with
    the cube; ``class_names[i]`` names id i; pixels equal to ``ignore_index`` carry no label."""

    image_id: str
    kind: AnnotationKind
    array: np.ndarray
    class_names: list[str]
    ignore_index: int | None
    source_path: str
    variant: str | None = None
    pixel_split: np.ndarray | None = None
    """pixel_classes: (H, W) uint8, 0 unlabelled, 1 train (prompt), 2 test."""
    target_spectrum: np.ndarray | None = None
    """target_map: the target spectrum (band,), if the dataset gives one."""
    second: np.ndarray | None = None
    """change_pair: the second date's cube (band, H, W), co-registered with the image's cube."""
    protocol: dict[str, Any] | None = None
    """pixel_classes: the split protocol that drew ``pixel_split`` (per_class or fraction, seed)."""

    def pixels(self, split: str) -> np.ndarray:
        """(H, W) bool: the labelled pixels of ``split`` ('train' or 'test') of a pixel-class scene."""
        if self.pixel_split is None:
            raise KeyError(f"image '{self.image_id}' has no per-pixel split (its labels are {self.kind})")
        codes = {"train": PIXEL_TRAIN, "test": PIXEL_TEST}
        if split not in codes:
            raise KeyError(f"per-pixel split '{split}'; choose train or test")
        return self.pixel_split == codes[split]

    @property
    def num_classes(self) -> int:
        """How many class ids a head predicts (the ignored id included when it is one of the names)."""
        return len(self.class_names)


@dataclass
class TrackSequence:
    """A tracking sequence: its frames' image ids in order and one box per frame, ``boxes[i] = (x, y, w, h)``
    float32 in 0-based pixel coordinates of the stored cube (x right, y down; the file's 1-based x, y minus 1)."""

    seq_id: str
    dataset: str
    frames: list[str]
    boxes: np.ndarray
    split: str | None
    source_path: str

    def __len__(self) -> int:
        return len(self.frames)


def apply_variant(array: np.ndarray, class_names: list[str], ignore_index: int, drop: list[str]
                  ) -> tuple[np.ndarray, list[str], int]:
    """Fold the ``drop`` classes into the ignore index and renumber the kept classes consecutively; returns the
    new map, class names and ignore index (a named ignored class keeps its place among the kept ones)."""
    kept = [i for i, name in enumerate(class_names) if name not in drop]
    new_ignore = kept.index(ignore_index) if ignore_index < len(class_names) else ignore_index
    lut = np.full(max(len(class_names), ignore_index + 1, int(array.max(initial=0)) + 1), new_ignore, np.int64)
    lut[kept] = np.arange(len(kept))
    return lut[array].astype(array.dtype), [class_names[i] for i in kept], new_ignore


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


def label_attrs(spec_labels: AnnotationSpec, image_id: str, dataset: str, source_path: str, source_sha256: str,
                label_sha256: str) -> dict[str, Any]:
    """The attrs stored with a label map: everything ``Catalog.annotation`` needs without the spec."""
    ignore = 0 if spec_labels.kind == "pixel_classes" else spec_labels.ignore_index
    split = spec_labels.pixel_split.model_dump() if spec_labels.pixel_split is not None else None
    return {"kind": spec_labels.kind, "class_names": spec_labels.names(), "ignore_index": ignore,
            "pixel_split": split,
            "variants": {k: v.model_dump() for k, v in spec_labels.variants.items()}, "image_id": image_id,
            "dataset": dataset, "source_path": source_path, "source_sha256": source_sha256,
            "label_sha256": label_sha256}


def declaration_json(spec: Any) -> str:
    """Canonical JSON of the label-related fields of a DatasetSpec (part of every label sha256)."""
    return json.dumps({"labels": spec.labels.model_dump(mode="json") if spec.labels else None,
                       "splits": spec.splits.model_dump(mode="json") if spec.splits else None,
                       "roles": sorted(spec.roles), "pretraining_splits": sorted(spec.pretraining_splits)},
                      sort_keys=True)
