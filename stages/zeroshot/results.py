"""What a zero-shot task reads and returns: the scene with its annotation, and the task's maps and scores beside
its baseline's (shared by the runner and the report)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from catalog.annotations import AnnotationMap


@dataclass
class Scene:
    """One catalogued scene as a task reads it: cube (H, W, C), wavelengths, GSD and its annotation."""

    image_id: str
    sha: str
    cube: np.ndarray
    wavelengths: np.ndarray
    gsd_m: float
    annotation: AnnotationMap


@dataclass
class TaskOutput:
    """A task's maps and scores, its baseline's, and what the run recorded on the way (retries, chosen values)."""

    maps: dict[str, np.ndarray]
    metrics: dict[str, float]
    baseline: str
    baseline_maps: dict[str, np.ndarray]
    baseline_metrics: dict[str, float]
    notes: dict[str, Any] = field(default_factory=dict)
