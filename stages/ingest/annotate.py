"""Labels and splits at ingest: resolve what a spec declares for one image, check it against the cube, store it.

``resolve`` runs before the cube is read and is cheap (it hashes the label file, assigns the split, finds the
frame's place in its sequence), so an unchanged image is skipped on its fingerprint alone. ``attach`` reads the
label, validates it against the cube's size (class ids, box count, boxes inside the frame) and stores it; any
problem is an InputError naming the label file, the field and the fix, raised before anything is written, so a
bad label is quarantined and never damages what is stored.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from base.errors import InputError
from catalog.annotation_store import label_location, write_label_group, write_track_row
from catalog.annotations import AIRBORNE_KINDS, BINARY_KINDS, SCENE_SPLIT, declaration_json, label_attrs, may_pretrain
from catalog.catalog import Catalog
from catalog.cubes.writer import CubeWrite
from catalog.readers.annotations import binary_map, class_ids, read_boxes, read_label_map, read_spectrum, saliency_mask
from catalog.readers.base import BandSubset, SourceItem
from catalog.specs import DatasetSpec
from catalog.storage import now_utc
from stages.ingest.discover import list_items

#: Boxes may overhang the frame by this many pixels (annotation rounding) before they count as outside it.
BOX_TOLERANCE_PX = 1.0


@dataclass(frozen=True)
class FrameInfo:
    """A frame's place in its sequence: frames are the files of one folder, in natural order of their names."""

    sequence_id: str
    frame_index: int
    frame_count: int


@dataclass(frozen=True)
class ItemLabels:
    """What one image's labels resolve to before its cube is read: enough to fingerprint and then store them.

    ``label_sha256`` hashes the spec's label declaration, the label file's bytes, the split and the frame's place;
    it is None when the spec declares nothing about labels, splits or roles (the image is then fingerprinted by
    its source sha256 alone, as before labels existed).
    """

    split: str | None
    pretraining: bool
    label_path: Path | None
    label_file_sha256: str | None
    frame: FrameInfo | None
    label_sha256: str | None


def resolve(spec: DatasetSpec, item: SourceItem) -> ItemLabels:
    """The split, pretraining use, label file and sequence place of one image; InputError if the spec's split
    lists or a required label file are missing."""
    declared = spec.labels is not None or spec.splits is not None or list(spec.roles) != ["pretraining"]
    kind = spec.labels.kind if spec.labels is not None else None
    frame = frame_info(spec, item) if kind == "track" else None
    split = assign_split(spec, item, frame)
    if split is None and kind in AIRBORNE_KINDS:
        split = SCENE_SPLIT[kind]
    pretraining = may_pretrain(list(spec.roles), spec.pretraining_splits, split)
    label_path = find_label_file(spec, item) if spec.labels is not None else None
    file_sha = _file_sha256(label_path) if label_path is not None else None
    companions = companion_files(spec, item) if label_path is not None else []
    if file_sha is not None and companions:  # the spectrum / second cube are part of the label's content
        file_sha = hashlib.sha256("".join([file_sha, *(_file_sha256(p) for p in companions)]).encode()).hexdigest()
    label_sha = None
    if declared:
        h = hashlib.sha256(declaration_json(spec).encode())
        h.update(json.dumps({"split": split, "pretraining": pretraining, "file_sha256": file_sha,
                             "file": label_path.relative_to(item.root).as_posix() if label_path else None,
                             "frame": [frame.frame_index, frame.frame_count] if frame else None}).encode())
        label_sha = h.hexdigest()
    return ItemLabels(split, pretraining, label_path, file_sha, frame, label_sha)


def attach(catalog: Catalog, spec: DatasetSpec, item: SourceItem, labels: ItemLabels, cw: CubeWrite) -> None:
    """Validate the image's label against its cube, store it, and fill the index row's label columns."""
    fields: dict[str, Any] = {"split": labels.split, "pretraining": labels.pretraining,
                              "label_sha256": labels.label_sha256}
    if spec.labels is not None and labels.label_path is not None:
        assert labels.label_sha256 is not None and labels.label_file_sha256 is not None
        _, height, width = (int(s) for s in cw.data.shape)
        path = labels.label_path
        if spec.labels.kind == "track":
            assert labels.frame is not None
            box = frame_box(path, spec, labels.frame, height, width)
            write_track_row(catalog, {
                "dataset": spec.slug, "sequence_id": labels.frame.sequence_id,
                "frame_index": labels.frame.frame_index, "frame_count": labels.frame.frame_count,
                "image_id": cw.image_id, "label_sha256": labels.label_sha256,
                "sequence_sha256": hashlib.sha256(f"{labels.label_file_sha256}:{labels.frame.frame_count}"
                                                  .encode()).hexdigest(),
                "x": box[0], "y": box[1], "w": box[2], "h": box[3], "split": labels.split,
                "source_path": str(path), "ingested_at": now_utc()})
            fields.update(label_kind="track", sequence_id=labels.frame.sequence_id,
                          frame_index=labels.frame.frame_index)
        else:
            stored = label_array(path, spec, height, width)
            extras = airborne_extras(spec, item, stored, cw)
            location = label_location(spec.slug, item.key, labels.label_sha256)
            write_label_group(catalog, location, stored, label_attrs(
                spec.labels, cw.image_id, spec.slug, str(path), labels.label_file_sha256, labels.label_sha256),
                extras)
            fields.update(label_kind=spec.labels.kind, label_location=location)
    cw.index_fields = fields


# ---------------------------------------------------------------------------------------------- label maps
def label_array(path: Path, spec: DatasetSpec, height: int, width: int) -> np.ndarray:
    """The label map to store: checked to have the cube's size and (segmentation) only declared class ids."""
    labels = spec.labels
    assert labels is not None
    raw = read_label_map(path, labels)
    if raw.shape != (height, width):
        transposed = raw.shape == (width, height) and height != width
        raise InputError(path, "labels.shape", f"the label map is {raw.shape[0]}x{raw.shape[1]} (rows x columns) "
                         f"but the cube is {height}x{width}",
                         "set labels.options.transpose: true (the map is stored x-by-y)" if transposed else
                         "check that 'labels.files' points at this image's label, or re-export it at the cube's "
                         "size")
    if labels.kind == "saliency":
        return saliency_mask(raw, labels.options.threshold)
    if labels.kind in BINARY_KINDS:
        return binary_map(path, raw, labels.kind)
    ids = class_ids(path, raw)
    names = labels.names()
    known = np.zeros(max(len(names), int(ids.max(initial=0)) + 1, (labels.ignore_index or 0) + 1), dtype=bool)
    known[: len(names)] = True
    if labels.ignore_index is not None:
        known[labels.ignore_index] = True
    bad = ~known[ids]
    if bad.any():
        values, counts = np.unique(ids[bad], return_counts=True)
        listing = ", ".join(f"{v} ({c} px)" for v, c in zip(values[:8], counts[:8], strict=True))
        raise InputError(path, "labels.class_names", f"class ids {listing} are neither in labels.class_names "
                         f"(ids 0-{len(names) - 1}) nor the ignore index ({labels.ignore_index})",
                         "add the missing classes to labels.class_names (list position = id), or set "
                         "labels.ignore_index to the id of unlabelled pixels")
    top = max(int(ids.max(initial=0)), labels.ignore_index or 0)
    return ids.astype(np.uint8 if top <= np.iinfo(np.uint8).max else np.uint16 if top <= np.iinfo(np.uint16).max
                      else np.int32)


# ---------------------------------------------------------------------------------------------- airborne
def companion_files(spec: DatasetSpec, item: SourceItem) -> list[Path]:
    """The label's other files: a target spectrum file and a change pair's second cube (InputError if declared
    and missing)."""
    labels = spec.labels
    assert labels is not None
    out = []
    for field, template in (("labels.target_spectrum", labels.target_spectrum), ("labels.second", labels.second)):
        if template is None:
            continue
        found = item.resolve(template)
        if found is None:
            raise InputError(item.primary, field, f"no file matches {template.format(**item.template_vars())!r}",
                             f"put the file there or fix '{field}' in the dataset spec")
        out.append(found)
    return out


def airborne_extras(spec: DatasetSpec, item: SourceItem, stored: np.ndarray, cw: CubeWrite) -> dict[str, np.ndarray]:
    """What an airborne label stores beside its map: the per-pixel split, the target spectrum (one value per band
    of the cube) or the second date's cube (the first's shape); InputError naming the file and field otherwise."""
    labels = spec.labels
    assert labels is not None
    bands, height, width = (int(s) for s in cw.data.shape)
    out: dict[str, np.ndarray] = {}
    if labels.pixel_split is not None:
        split = labels.pixel_split
        if split.per_class is not None:
            ids, counts = np.unique(stored[stored > 0], return_counts=True)
            short = [f"{int(i)} ({int(c)} px)" for i, c in zip(ids, counts, strict=True) if c <= split.per_class]
            if short:
                raise InputError(item.primary, "labels.pixel_split.per_class", f"classes {', '.join(short)} have no "
                                 f"pixel left to test after drawing {split.per_class} labelled pixels",
                                 "lower per_class, or split by 'fraction'")
        out["pixel_split"] = split.draw(stored)
    spectrum_path, second_path = None, None
    for path in companion_files(spec, item):
        if labels.target_spectrum is not None and spectrum_path is None:
            spectrum_path = path
        else:
            second_path = path
    if spectrum_path is not None:
        spectrum = read_spectrum(spectrum_path, labels.options.spectrum_key)
        if spectrum.size != bands:
            raise InputError(spectrum_path, "labels.target_spectrum", f"{spectrum.size} values for a {bands}-band "
                             "cube", "give one value per band of the stored cube (after band_range)")
        out["target_spectrum"] = spectrum
    if second_path is not None:
        second_item = SourceItem(dataset=spec.slug, root=item.root, primary=second_path, files=(second_path,),
                                 key=item.key, stem_suffix=spec.stem_suffix)
        options = spec.reader_options(second_path)
        if labels.options.second_key is not None:  # the second date's variable has its own name (e.g. River)
            options = options.model_copy(update={"key": labels.options.second_key})
        data = spec.reader.read(second_item, options).data
        if spec.band_range is not None:
            data = BandSubset(data, spec.band_range.start, spec.band_range.stop)
        if tuple(int(s) for s in data.shape) != (bands, height, width):
            raise InputError(second_path, "labels.second", f"the second cube is {tuple(data.shape)} (band, y, x) but "
                             f"the first is {(bands, height, width)}",
                             "pair co-registered cubes of one scene with the same bands")
        out["second"] = np.asarray(data[:, :, :])
    return out


# ---------------------------------------------------------------------------------------------- tracks
def frame_box(path: Path, spec: DatasetSpec, frame: FrameInfo, height: int, width: int) -> tuple[float, ...]:
    """This frame's box (x, y, w, h) in 0-based pixels of the cube, after checking the whole box file: one box
    per frame, every box finite, of positive size and inside the frame (or clipped to it with clip_boxes).

    Conversion: a 1-based file box (MATLAB/OTB convention, ``one_based``) has its x and y reduced by 1; width and
    height are unchanged. The whole sequence is checked at every frame, so a bad box file rejects every frame of
    the sequence and no half-labelled sequence enters the catalog.
    """
    labels = spec.labels
    assert labels is not None
    boxes = read_boxes(path)
    if len(boxes) != frame.frame_count:
        raise InputError(path, "labels.boxes", f"{len(boxes)} boxes for the {frame.frame_count} frames of "
                         f"sequence '{frame.sequence_id}'",
                         "give one 'x y w h' line per frame, in frame order (or remove the frames without a box)")
    if labels.options.one_based:
        boxes = boxes - np.array([1.0, 1.0, 0.0, 0.0])
    for i, (x, y, w, h) in enumerate(boxes):
        if not np.all(np.isfinite([x, y, w, h])) or w <= 0 or h <= 0:
            raise InputError(path, "labels.boxes", f"line {i + 1}: box ({x:g}, {y:g}, {w:g}, {h:g}) has no area",
                             "give a box of positive width and height for every frame")
        inside = (x >= -BOX_TOLERANCE_PX and y >= -BOX_TOLERANCE_PX and x + w <= width + BOX_TOLERANCE_PX
                  and y + h <= height + BOX_TOLERANCE_PX)
        overlaps = x < width and y < height and x + w > 0 and y + h > 0
        if not inside and not (labels.options.clip_boxes and overlaps):
            raise InputError(path, "labels.boxes", f"line {i + 1}: box x={x:g} y={y:g} w={w:g} h={h:g} "
                             f"({'1' if labels.options.one_based else '0'}-based file values converted to 0-based) "
                             f"lies outside the {width}x{height} frame",
                             "correct the box (x, y count from the top-left pixel), set labels.options.one_based "
                             "to match the file, or set labels.options.clip_boxes: true to clip overhanging boxes")
    x, y, w, h = boxes[frame.frame_index]
    if labels.options.clip_boxes:
        x0, y0 = max(x, 0.0), max(y, 0.0)
        x, y, w, h = x0, y0, min(x + w, width) - x0, min(y + h, height) - y0
    return float(x), float(y), float(w), float(h)


def natural_key(name: str) -> list[Any]:
    """Sort key that orders '2.png' before '10.png'."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _matches(rel: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatch(rel, p) or fnmatch.fnmatch(rel, p.removeprefix("**/")) for p in patterns)


def frame_info(spec: DatasetSpec, item: SourceItem) -> FrameInfo:
    """The frame's sequence (its folder) and index among the folder's frames (the spec's files, natural order)."""
    folder = item.primary.parent
    frames = sorted((p for p in folder.iterdir() if p.is_file()
                     and _matches(p.relative_to(item.root).as_posix(), spec.files)
                     and not _matches(p.relative_to(item.root).as_posix(), spec.exclude)),
                    key=lambda p: natural_key(p.name))
    rel_dir = folder.relative_to(item.root).as_posix()
    seq_id = spec.slug if rel_dir == "." else f"{spec.slug}/{rel_dir}"
    return FrameInfo(seq_id, frames.index(item.primary), len(frames))


# ---------------------------------------------------------------------------------------------- files, splits
def find_label_file(spec: DatasetSpec, item: SourceItem) -> Path | None:
    """The image's label file: the first of ``labels.files`` that exists; InputError if required and none does."""
    labels = spec.labels
    assert labels is not None
    for template in labels.files:
        found = item.resolve(template)
        if found is not None:
            return found
    if not labels.required:
        return None
    tried = ", ".join(t.format(**item.template_vars()) for t in labels.files)
    raise InputError(item.primary, "labels.files", f"no label file for this image (looked for {tried})",
                     "add the label file, fix the 'labels.files' template, or set labels.required: false to "
                     "store images without labels")


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _identifiers(item: SourceItem, frame: FrameInfo | None) -> set[str]:
    """The names a split list may use for an image: path, key, file name, stem, base; a frame's folder too."""
    v = item.template_vars()
    names = {v["path"], item.key, item.primary.name, v["stem"], v["base"]}
    if frame is not None:
        names |= {v["dir"], v["parent"]}
    return names


def read_split_list(path: Path, split: str) -> set[str]:
    """The entries of a split list (one per line, '#' comments), each also without its extension."""
    if not path.is_file():
        raise InputError(path, f"splits.lists.{split}", "the split list does not exist",
                         "put the list there (one image per line: its file name, stem or path), or fix "
                         "'splits.lists' in the dataset spec")
    entries: set[str] = set()
    for line in path.read_text().splitlines():
        entry = line.split("#", 1)[0].strip().replace("\\", "/").removeprefix("./")
        if entry:
            entries |= {entry, entry.rsplit(".", 1)[0] if "." in entry.rsplit("/", 1)[-1] else entry}
    return entries


def assign_split(spec: DatasetSpec, item: SourceItem, frame: FrameInfo | None) -> str | None:
    """The image's split by the spec's lists, globs or ordered fractions (else ``default``); an image that two
    splits claim is an InputError."""
    splits = spec.splits
    if splits is None:
        return None
    rel = item.primary.relative_to(item.root).as_posix()
    if splits.lists is not None:
        names = _identifiers(item, frame)
        hits = [s for s, f in splits.lists.items() if names & read_split_list(item.root / f, s)]
    elif splits.globs is not None:
        hits = [s for s, patterns in splits.globs.items() if _matches(rel, patterns)]
    elif splits.ordered is not None:
        hits = [ordered_split(spec, item, splits.ordered)]
    else:
        hits = []
    if len(hits) > 1:
        raise InputError(item.primary, "splits", f"the image is in more than one split ({', '.join(hits)})",
                         "name each image in one split only (check the split lists or globs)")
    return hits[0] if hits else splits.default


def ordered_split(spec: DatasetSpec, item: SourceItem, fractions: dict[str, float]) -> str:
    """The split of an image by its rank among the dataset's images in path order: the first ``fraction`` of
    them go to the first split, and so on (boundaries rounded to whole images)."""
    keys = [it.key for it in list_items(item.root, spec)[0]]
    rank, total, cumulative = keys.index(item.key), len(keys), 0.0
    for split, fraction in fractions.items():
        cumulative += fraction
        if rank < round(cumulative * total):
            return split
    return list(fractions)[-1]
