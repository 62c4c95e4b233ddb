"""What one head run is: its task spec (task, dataset and splits, head options, training schedule, tracker geometry),
the inputs it reads (`TaskData`) and the fingerprint that decides whether a stored result can be reused."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from stages.downstream.data import LabelInfo
from stages.downstream.tracker import TrackerConfig
from stages.training.device import DEVICES

HEADS_VERSION = "1"
"""Bumped when training or scoring changes, so earlier results are not reused."""
RUNTIME_FIELDS = ("device", "checkpoint_every", "keep_checkpoints")
"""Training settings that do not change what a run computes (left out of its fingerprint)."""


@dataclass(frozen=True)
class HeadTrainConfig:
    """Optimisation settings of one head run."""

    steps: int = 2000
    batch_size: int = 8
    lr: float = 1e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_steps: int = 100
    grad_clip: float = 1.0
    seed: int = 0
    device: str = "auto"
    """"auto" (CUDA when present), "cuda" or "cpu"."""
    checkpoint_every: int = 500
    keep_checkpoints: int = 2

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.checkpoint_every < 1 or self.keep_checkpoints < 1:
            raise ValueError(f"HeadTrainConfig needs steps, batch_size, checkpoint_every and keep_checkpoints >= 1; "
                             f"got {self}.")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"HeadTrainConfig needs 0 <= min_lr <= lr; got min_lr={self.min_lr}, lr={self.lr}.")
        if self.device not in DEVICES:
            raise ValueError(f"HeadTrainConfig.device must be one of {DEVICES}, got {self.device!r}.")


@dataclass(frozen=True)
class TaskSpec:
    """One head run: the task (a name in stages.downstream.tasks.TASKS), the dataset and its splits, the head's
    options, its training and (tracking) the tracker's geometry."""

    task: str
    dataset: str
    train_split: str = "train"
    test_split: str = "test"
    variant: str | None = None
    """A label variant the dataset declares (e.g. HSI Drive's 'hs3bench')."""
    head: dict[str, Any] = field(default_factory=dict)
    train: HeadTrainConfig = field(default_factory=HeadTrainConfig)
    tracker: TrackerConfig = field(default_factory=TrackerConfig)
    pairs_per_sequence: int = 64
    """Tracking: (template, search) training pairs drawn per training sequence."""
    overlays: int = 2
    """Qualitative examples in the report."""
    tune: str = "head"
    """"head": the backbone stays frozen; "full": it is fine-tuned with the head (tasks whose card allows it)."""

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-friendly dict; `from_dict` rebuilds the spec."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TaskSpec:
        """Inverse of `to_dict`."""
        values = dict(data)
        values["train"] = HeadTrainConfig(**values["train"])
        values["tracker"] = TrackerConfig(**values["tracker"])
        return cls(**values)


@dataclass
class TaskData:
    """A task's inputs read from the catalog: its test split and (when training) its train split, as the task's
    items (samples of cached features, or tracking sequences), with the ids they came from."""

    spec: TaskSpec
    train: Sequence[Any] | None
    test: Sequence[Any]
    train_ids: list[str]
    test_ids: list[str]
    info: LabelInfo | None
    """Class names and ignored id of image labels (None for tasks without them)."""
    features_s: float = 0.0
    extras: dict[str, Any] = field(default_factory=dict)
    """What a task's hooks share beyond the splits (e.g. the airborne tasks' input: PCA components, the cube)."""

    @property
    def counts(self) -> dict[str, int]:
        """Items per split (images, or sequences for tracking)."""
        return {"train": len(self.train) if self.train is not None else 0, "test": len(self.test)}


def task_fingerprint(spec: TaskSpec, feature_set: str, labels: str) -> dict[str, Any]:
    """What decides a run's result, and its sha256 under ``fingerprint``: code version, task spec (runtime settings
    aside), the backbone's feature set id and the labels' fingerprint."""
    spec_dict = spec.to_dict()
    spec_dict["train"] = {k: v for k, v in spec_dict["train"].items() if k not in RUNTIME_FIELDS}
    if spec_dict["tune"] == "head":
        del spec_dict["tune"]  # the default: runs made before `tune` existed keep their fingerprint
    inputs = {"version": HEADS_VERSION, "spec": spec_dict, "feature_set": feature_set, "labels": labels}
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()
    return {"fingerprint": digest, **inputs}


def changed_inputs(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Which inputs differ between a recorded run and the current call (for messages)."""
    names = {"version": "code version", "spec": "task parameters", "feature_set": "backbone features (weights, "
             "model, overrides or preprocessing)", "labels": "labels or splits"}
    return [label for key, label in names.items() if recorded.get(key) != current.get(key)]
