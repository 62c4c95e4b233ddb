"""Head inputs from the catalog: a split's labelled images as samples (cached features + labels), its tracking
sequences as frames + boxes, and the fingerprint of its labels (what a rerun compares to skip)."""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, overload

import torch

from base.errors import InputError
from catalog.annotations import AnnotationMap
from catalog.catalog import Catalog
from catalog.features import FeatureStore
from stages.downstream.features import CubeInfo, cube_info, read_cube, read_features
from stages.downstream.samples import TrackingSequence

SampleBuilder = Callable[[tuple[torch.Tensor, ...], AnnotationMap, dict[str, Any]], Any]
"""(cached feature maps, the image's annotation, geometry: input_size, image_id, frame_size) -> one sample."""


def check_label_kind(catalog: Catalog, dataset: str, kind: str) -> None:
    """An InputError unless the dataset is catalogued with labels of `kind` (segmentation, saliency, track)."""
    df = catalog.images(dataset)
    kinds = sorted({str(k) for k in df["label_kind"].dropna()}) if not df.empty else []
    if kind not in kinds:
        found = f"its labels are {', '.join(kinds)}" if kinds else "it has no labelled images (is it ingested?)"
        raise InputError(catalog.uri, "dataset", f"'{dataset}' has no {kind} labels: {found}",
                         f"pass a dataset with {kind} labels (`hvp datasets` lists the labelled ones)")


def split_images(catalog: Catalog, dataset: str, split: str) -> list[str]:
    """The labelled image ids of one split; an InputError naming the splits the dataset has when it is empty."""
    ids = catalog.annotated(dataset, split)
    if not ids:
        raise InputError(catalog.uri, "split", f"dataset '{dataset}' has no labelled images in split '{split}'",
                         f"pass one of its splits: {_splits(catalog, dataset) or 'none; is it ingested?'}")
    return ids


def _splits(catalog: Catalog, dataset: str) -> list[str]:
    df = catalog.images(dataset)
    return sorted({str(s) for s in df["split"].dropna()}) if not df.empty else []


@dataclass(frozen=True)
class LabelInfo:
    """What a head's output means: class names and the ignored id (segmentation), from a split's first label."""

    kind: str
    class_names: tuple[str, ...]
    ignore_index: int | None

    @property
    def num_classes(self) -> int:
        """Logit channels of a segmentation head."""
        return len(self.class_names)


class CatalogSamples(Sequence[Any]):
    """The samples of a list of images with `kind` annotations, built on access by `build` from the feature cache
    and the catalog's annotations and kept in memory up to `cache_bytes` (oldest dropped first), so a large split
    trains without holding every feature map at once. Supports the indexing and slicing the trainer and evaluators
    use."""

    def __init__(self, catalog: Catalog, set_id: str, image_ids: Sequence[str], variant: str | None = None, *,
                 kind: str, build: SampleBuilder, cache_bytes: int = 2 << 30) -> None:
        if not image_ids:
            raise ValueError("CatalogSamples: no images given")
        self.catalog = catalog
        self.store = FeatureStore(catalog)
        self.set_id = set_id
        self.image_ids = list(image_ids)
        self.variant = variant
        self.build = build
        self.cache_bytes = cache_bytes
        self._cache: OrderedDict[int, Any] = OrderedDict()
        self._bytes = 0
        first = self.label(0)
        self.info = LabelInfo(first.kind, tuple(first.class_names), first.ignore_index)
        if first.kind != kind:
            raise ValueError(f"image '{self.image_ids[0]}' has a {first.kind} label; these samples need {kind} "
                             "labels")

    def label(self, index: int) -> AnnotationMap:
        """The label map of image `index` (read from the catalog, checksums verified)."""
        return self.catalog.annotation(self.image_ids[index], self.variant)

    def __len__(self) -> int:
        return len(self.image_ids)

    def _build(self, index: int) -> Any:
        image_id = self.image_ids[index]
        features, attrs = read_features(self.store, self.set_id, image_id)
        label = self.label(index)
        if label.kind != self.info.kind:
            raise ValueError(f"image '{image_id}' has a {label.kind} label, the split's first image a "
                             f"{self.info.kind} one; a split holds one label kind")
        geometry: dict[str, Any] = {"input_size": tuple(attrs["input_size"]), "image_id": image_id,
                                    "frame_size": int(attrs["frame_size"])}
        return self.build(features, label, geometry)

    def _get(self, index: int) -> Any:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} of {len(self)}")
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        sample = self._build(index)
        size = sum(f.numel() * f.element_size() for f in sample.features)
        self._cache[index] = sample
        self._bytes += size
        while self._bytes > self.cache_bytes and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._bytes -= sum(f.numel() * f.element_size() for f in old.features)
        return sample

    @overload
    def __getitem__(self, index: int) -> Any: ...

    @overload
    def __getitem__(self, index: slice) -> list[Any]: ...

    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            return [self._get(i) for i in range(*index.indices(len(self)))]
        return self._get(index)

    def __iter__(self) -> Iterator[Any]:
        return (self._get(i) for i in range(len(self)))


@dataclass(frozen=True)
class CatalogSequence:
    """One catalogued tracking sequence: its frames (H, W, C) in the stored dtype with one box per frame, and what
    the encoder needs of its sensor (wavelengths, GSD)."""

    sequence: TrackingSequence
    sensor: CubeInfo
    seq_id: str


def split_sequences(catalog: Catalog, dataset: str, split: str, default_gsd_m: float) -> list[CatalogSequence]:
    """The complete tracking sequences of one split, frames read from the catalog; a ValueError when none."""
    seq_ids = catalog.sequences(dataset, split)
    if not seq_ids:
        raise InputError(catalog.uri, "split", f"dataset '{dataset}' has no complete tracking sequence in split "
                         f"'{split}'", f"pass one of its splits: {_splits(catalog, dataset) or 'none'}")
    out = []
    for seq_id in seq_ids:
        track = catalog.sequence(seq_id)
        frames = [read_cube(catalog, f) for f in track.frames]
        out.append(CatalogSequence(TrackingSequence(frames, track.boxes, name=seq_id),
                                   cube_info(catalog, track.frames[0], default_gsd_m), seq_id))
    return out


def labels_fingerprint(catalog: Catalog, dataset: str, splits: Sequence[str]) -> str:
    """sha256 over the (image id, content sha256, label sha256, split) of a dataset's labelled images in `splits`:
    it changes when an image, a label, a box file or a split assignment changes."""
    df = catalog.images(dataset)
    if not df.empty:
        df = df[df["label_kind"].notna() & df["split"].isin(list(splits))]
    rows = sorted(zip(df["image_id"], df["sha256"], df["label_sha256"], df["split"], strict=True)) \
        if not df.empty else []
    return hashlib.sha256(json.dumps([[str(v) for v in r] for r in rows]).encode()).hexdigest()
