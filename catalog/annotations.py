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

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

if TYPE_CHECKING:
    pass


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
