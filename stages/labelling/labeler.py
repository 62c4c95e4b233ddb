"""The labeler contract shared by the three pseudo-labelling branches (spatial, spectral, material).

A labeler turns one catalogued image into a MaskSet. Its *labeler id* hashes everything that changes its output:
the branch, the model config, the checkpoint's sha256 (or "random-init"), the parameters and the stage version.
Relabelling is then "label every image that lacks masks for the current labeler id".
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from catalog.catalog import Catalog
from catalog.masks import MaskSet

RANDOM_INIT = "random-init"


@dataclass
class ImageSample:
    """What a labeler sees of one image: the cube ``(band, y, x)`` (native dtype), its wavelengths in nm, the
    aligned RGB ``(y, x, 3)`` uint8 where the dataset has one, and the GSD in metres if known."""

    image_id: str
    cube: np.ndarray
    wavelengths: np.ndarray
    rgb: np.ndarray | None = None
    gsd_m: float | None = None
    attrs: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_catalog(cls, catalog: Catalog, image_id: str) -> ImageSample:
        da = catalog.open(image_id)
        return cls(image_id=image_id, cube=np.asarray(da.values), wavelengths=np.asarray(da["wavelength"].values),
                   rgb=catalog.rgb(image_id), gsd_m=da.attrs.get("gsd_m"), attrs=dict(da.attrs))


def file_sha256(path: str | Path) -> str:
    """Streaming sha256 of a checkpoint file (part of the labeler id)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def checkpoint_identity(path: str | Path | None) -> str:
    """The checkpoint's sha256, or "random-init" when none is configured; a configured path that does not exist
    is an error (silently falling back to random weights would mislabel every artifact)."""
    if path is None or str(path) == "":
        return RANDOM_INIT
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint file {p} does not exist: fix the path in settings (HVP_*_CHECKPOINT) "
                                "or unset it to run with random-init weights")
    return file_sha256(p)


class Labeler(ABC):
    """One pseudo-labelling branch. Subclasses set ``branch`` and ``stage_version`` and implement ``label``."""

    branch: str
    stage_version: str

    def __init__(self, model_config: dict[str, Any], checkpoint: str | Path | None, params: dict[str, Any]) -> None:
        self.model_config = dict(model_config)
        self.checkpoint = None if checkpoint in (None, "") else str(checkpoint)
        self.weights = checkpoint_identity(self.checkpoint)
        self.params = dict(params)

    @property
    def random_init(self) -> bool:
        return self.weights == RANDOM_INIT

    def descriptor(self) -> dict[str, Any]:
        """Everything that determines this labeler's output (hashed into the id, stored beside the masks)."""
        return {"branch": self.branch, "model_config": self.model_config, "weights": self.weights,
                "params": self.params, "stage_version": self.stage_version}

    @property
    def labeler_id(self) -> str:
        blob = json.dumps(self.descriptor(), sort_keys=True, default=str).encode()
        return f"{self.branch}-{hashlib.sha256(blob).hexdigest()[:16]}"

    @abstractmethod
    def label(self, sample: ImageSample) -> MaskSet:
        """Masks of one image with the per-mask table (see catalog.masks.table_from_masks)."""
