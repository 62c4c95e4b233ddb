"""Head-only adaptation from the catalog: train a task head on a dataset's train split over the frozen backbone's
features, score it on the test split beside its trivial baseline, and write the report.

Run folder of one head (`train_task`)::

    run.json        the inputs: fingerprint, task spec, backbone spec and feature set, catalog, label fingerprint
    checkpoints/ train_log.csv      the head's training (stages.downstream.train)
    result.json     head and baseline scores, confusion matrix or curves, trainable parameters, timings
    overlays.npz    the qualitative examples of the report
    report.json report.md results.parquet plots/      the one-task report

A rerun whose inputs (feature set: weights sha256 or random-init + seed, model, overrides, preprocessing; the
split's labels; the task's parameters) did not change reuses the result and says so; a run killed mid-training
resumes from its latest checkpoint. result.json is written last, atomically: a folder without it is unfinished
(a run killed while scoring or reporting scores and reports again).

Tracking features come from the frozen backbone on the fly, one forward pass per search crop, rather than from
crops of cached whole-frame feature maps. The tracker cuts a square of about twice the target's context size around
the last box and resamples it to the backbone's whole input frame, so the search region always spans img_size /
stride cells (16 for tiny at 128 px, 32 for -B) whatever the target's size (SiamFC's scale normalisation); a crop of
a frame map spans only side x img_size / (frame side x stride) cells: a 100 px search region of a 512 px wide HOT VIS
frame is about 6 cells at -B instead of 32. Measured with bench/downstream.py (tiny, random-init, HOT-2023 VIS
fixture, whose 32 px frames are magnified 4x, the case most favourable to frame maps): success AUC 0.50 on the fly
vs 0.43 from cached frame maps (held first box 0.10), at 20 ms vs 0.6 ms per frame on one CPU core; one encoder pass
per frame is milliseconds for -B in bf16 on a GPU, cheap for a one-pass evaluation.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from catalog.catalog import Catalog
from infra.errors import InputError
from model.heads import build_head, count_trainable_parameters
from stages.downstream.backbone import backbone_feature_fn
from stages.downstream.baselines import evaluate_centre_prior, evaluate_first_box, fit_spectral_classifier
from stages.downstream.checkpoints import load_head
from stages.downstream.data import (
    CatalogSamples,
    CatalogSequence,
    LabelInfo,
    check_label_kind,
    labels_fingerprint,
    split_images,
    split_sequences,
)
from stages.downstream.evaluate import evaluate_saliency, predict_segmentation, score_tracks
from stages.downstream.features import (
    Backbone,
    BackboneSpec,
    compute_features,
    load_backbone,
    read_cube,
)
from stages.downstream.report import PRIMARY, Overlay, ReportPaths, TaskReport, write_report
from stages.downstream.samples import SaliencySample, SegmentationSample
from stages.downstream.tasks import SaliencyTask, SegmentationTask, TrackingTask
from stages.downstream.tracker import TrackerConfig, make_tracking_pairs, track_sequence
from stages.downstream.train import HeadTrainConfig, TrainResult, resolve_device, train_head
from stages.metrics import TrackingCurves, confusion_matrix, scores_from_confusion

logger = logging.getLogger(__name__)

HEADS_VERSION = "1"
"""Bumped when training or scoring changes, so earlier results are not reused."""
TASKS = ("segmentation", "saliency", "tracking")
LABEL_KINDS = {"segmentation": "segmentation", "saliency": "saliency", "tracking": "track"}
DEFAULT_DATASETS = {"segmentation": "hsi-drive-v2-0", "saliency": "hssod", "tracking": "hot-2023-vis"}
"""The paper's benchmarks (Hyperspectral City v2 is the other segmentation one)."""
SMALL_MODELS = frozenset({"tiny"})
"""Layouts whose heads and schedules are sized for the CPU (fixtures train in seconds)."""
SMALL_HEADS: dict[str, dict[str, Any]] = {
    "segmentation": {"widths": [64, 32, 16], "dropout": 0.1},
    "saliency": {"dim": 32, "depth": 2, "num_heads": 2, "mlp_dim": 64},
    "tracking": {"hidden": 32, "tower_depth": 2, "groups": 8},
}
"""Head options for small layouts; released layouts use the heads' defaults (the paper's sizes)."""
SMALL_TRAIN: dict[str, dict[str, Any]] = {
    "segmentation": {"steps": 100, "batch_size": 4, "lr": 3e-3, "warmup_steps": 10},
    "saliency": {"steps": 100, "batch_size": 4, "lr": 3e-3, "warmup_steps": 10},
    "tracking": {"steps": 100, "batch_size": 4, "lr": 3e-3, "warmup_steps": 10},
}
"""Schedules for small layouts (100 steps: a few seconds per head on one CPU core)."""
RUN_FILE, RESULT_FILE, OVERLAYS_FILE = "run.json", "result.json", "overlays.npz"
RUNTIME_FIELDS = ("device", "checkpoint_every", "keep_checkpoints")
"""Training settings that do not change what a run computes (left out of its fingerprint)."""


@dataclass(frozen=True)
class TaskSpec:
    """One head run: the task, the dataset and its splits, the head's options, its training and (tracking) the
    tracker's geometry."""

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

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"Unknown task {self.task!r}; choose one of {TASKS}.")

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


def held_benchmarks(catalog: Catalog, tasks: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """The tasks (task -> labelled dataset) whose dataset the catalog holds with labels, and a note for each task
    whose dataset it lacks."""
    images = catalog.images()
    held = set(images.loc[images["label_kind"].notna(), "dataset"]) if not images.empty else set()
    missing = [f"{t} needs {d}, which the catalog does not hold" for t, d in tasks.items() if d not in held]
    return {t: d for t, d in tasks.items() if d in held}, missing


def task_spec(task: str, model: str, img_size: int, dataset: str | None = None, steps: int | None = None,
              seed: int = 0, device: str = "auto", **fields: Any) -> TaskSpec:
    """A task's spec with the defaults for the backbone's size: small heads and short schedules for small layouts,
    the paper's head sizes and `HeadTrainConfig`'s schedule otherwise; the tracker's crops at the backbone's frame
    size. `fields` override any other TaskSpec field."""
    small = model in SMALL_MODELS
    train = {**(SMALL_TRAIN[task] if small else {}), "seed": seed, "device": device}
    if steps is not None:
        train["steps"] = steps
    if small:  # one checkpoint at the end: these runs take seconds
        train["checkpoint_every"] = train["steps"]
    tracker = fields.pop("tracker", None) or TrackerConfig(crop_px=img_size)
    head = {**(SMALL_HEADS[task] if small else {}), **fields.pop("head", {})}
    pairs = fields.pop("pairs_per_sequence", 32 if small else 64)
    return TaskSpec(task=task, dataset=dataset or DEFAULT_DATASETS[task], head=head, train=HeadTrainConfig(**train),
                    tracker=tracker, pairs_per_sequence=pairs, **fields)


def task_fingerprint(spec: TaskSpec, feature_set: str, labels: str) -> dict[str, Any]:
    """What decides a run's result, and its sha256 under ``fingerprint``: code version, task spec (runtime settings
    aside), the backbone's feature set id and the labels' fingerprint."""
    spec_dict = spec.to_dict()
    spec_dict["train"] = {k: v for k, v in spec_dict["train"].items() if k not in RUNTIME_FIELDS}
    inputs = {"version": HEADS_VERSION, "spec": spec_dict, "feature_set": feature_set, "labels": labels}
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()
    return {"fingerprint": digest, **inputs}


def changed_inputs(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Which inputs differ between a recorded run and the current call (for messages)."""
    names = {"version": "code version", "spec": "task parameters", "feature_set": "backbone features (weights, "
             "model, overrides or preprocessing)", "labels": "labels or splits"}
    return [label for key, label in names.items() if recorded.get(key) != current.get(key)]


# ------------------------------------------------------------------------------------------------ task inputs
@dataclass
class TaskData:
    """A task's inputs read from the catalog: samples (segmentation, saliency) or sequences (tracking)."""

    spec: TaskSpec
    train: CatalogSamples | list[CatalogSequence] | None
    test: CatalogSamples | list[CatalogSequence]
    train_ids: list[str]
    test_ids: list[str]
    info: LabelInfo | None
    features_s: float

    @property
    def counts(self) -> dict[str, int]:
        """Items per split (images, or sequences for tracking)."""
        return {"train": len(self.train) if self.train is not None else 0, "test": len(self.test)}


def load_task_data(catalog: Catalog, backbone: Backbone, spec: TaskSpec, with_train: bool = True,
                   on_progress: Callable[[int], None] | None = None) -> TaskData:
    """Gather a task's splits from the catalog; for segmentation and saliency, compute the features the cache lacks
    (cache hits are skipped). `with_train=False` reads the test split only (plus the train ids the segmentation
    baseline fits on)."""
    start = time.perf_counter()
    check_label_kind(catalog, spec.dataset, LABEL_KINDS[spec.task])
    if spec.task == "tracking":
        gsd = backbone.spec.default_gsd_m
        test_seqs = split_sequences(catalog, spec.dataset, spec.test_split, gsd)
        train_seqs = split_sequences(catalog, spec.dataset, spec.train_split, gsd) if with_train else None
        return TaskData(spec, train_seqs, test_seqs, [s.seq_id for s in train_seqs or []],
                        [s.seq_id for s in test_seqs], None, time.perf_counter() - start)
    test_ids = split_images(catalog, spec.dataset, spec.test_split)
    train_ids = split_images(catalog, spec.dataset, spec.train_split) if with_train or spec.task == "segmentation" \
        else []
    needed = test_ids + (train_ids if with_train else [])
    compute_features(catalog, backbone, needed, on_progress=on_progress)
    test = CatalogSamples(catalog, backbone.set_id, test_ids, spec.variant)
    train = CatalogSamples(catalog, backbone.set_id, train_ids, spec.variant) if with_train else None
    return TaskData(spec, train, test, train_ids, test_ids, test.info, time.perf_counter() - start)


def new_head(spec: TaskSpec, backbone: Backbone, info: LabelInfo | None) -> nn.Module:
    """A freshly initialised head (seeded by the training seed) sized from the backbone's feature layout."""
    options = dict(spec.head)
    if spec.task == "segmentation":
        assert info is not None
        options["num_classes"] = info.num_classes
    if spec.task == "tracking":
        options["template_fraction"] = spec.tracker.template_fraction
    torch.manual_seed(spec.train.seed)
    return build_head(spec.task, backbone.layout, **options)


def _feature_fn(backbone: Backbone, seq: CatalogSequence) -> Any:
    return backbone_feature_fn(backbone.model, seq.sensor.wavelengths, seq.sensor.gsd_m, backbone.spec.preprocessing)


def fit_head(head: nn.Module, data: TaskData, backbone: Backbone, run_dir: Path,
             on_step: Callable[[int, float], None] | None = None) -> TrainResult:
    """Train the head on the train split (tracking: on seeded template/search pairs encoded on the fly)."""
    spec = data.spec
    assert data.train is not None
    task: Any
    samples: Sequence[Any]
    if spec.task == "tracking":
        assert isinstance(data.train, list)
        samples = []
        for k, seq in enumerate(data.train):
            samples += make_tracking_pairs([seq.sequence], _feature_fn(backbone, seq), spec.tracker,
                                           spec.pairs_per_sequence, seed=spec.train.seed + k)
        task = TrackingTask()
    else:
        assert isinstance(data.train, CatalogSamples) and data.info is not None
        samples = data.train
        task = SegmentationTask(data.info.num_classes, data.info.ignore_index) if spec.task == "segmentation" \
            else SaliencyTask()
    return train_head(head, task, samples, spec.train, run_dir, weights=backbone.provenance,
                      preprocessing=backbone.spec.preprocessing, on_step=on_step)


# ------------------------------------------------------------------------------------------------ scoring
def _rgb(catalog: Catalog, image_id: str, cube_hwc: np.ndarray, wavelengths: np.ndarray) -> np.ndarray:
    """An image to show: the aligned RGB or a false colour (stages.labelling.falsecolor), in [0, 1]."""
    from stages.labelling.falsecolor import percentile_stretch, to_rgb

    try:
        rgb, _ = to_rgb(cube_hwc.transpose(2, 0, 1), wavelengths, catalog.rgb(image_id))
    except ValueError:  # too few bands for a false colour: the band mean in grey
        grey = percentile_stretch(cube_hwc.astype(np.float64).mean(axis=-1))
        rgb = np.repeat(grey[..., None], 3, axis=-1)
    return rgb.astype(np.float64) / 255.0


def _wavelengths(catalog: Catalog, image_id: str) -> np.ndarray:
    return np.asarray(catalog.open(image_id)["wavelength"].values, dtype=np.float64)


def _segmentation_report(catalog: Catalog, head: nn.Module, data: TaskData, device: torch.device
                         ) -> tuple[TaskReport, float]:
    spec, info, test = data.spec, data.info, data.test
    assert isinstance(test, CatalogSamples) and info is not None
    k, ignore = info.num_classes, info.ignore_index
    confusion = np.zeros((k, k), dtype=np.int64)
    kept: list[np.ndarray] = []
    for start in range(0, len(test), 8):  # pooled confusion: predictions are not all held at once
        chunk = cast(list[SegmentationSample], test[start:start + 8])
        predictions = predict_segmentation(head, chunk, device)
        confusion += confusion_matrix(predictions, [s.target.numpy() for s in chunk], k, ignore)
        kept += predictions[:max(0, spec.overlays - len(kept))]
    t0 = time.perf_counter()
    per_image = max(1, 200_000 // len(data.train_ids))
    model = fit_spectral_classifier((read_cube(catalog, i) for i in data.train_ids),
                                    (catalog.annotation(i, spec.variant).array for i in data.train_ids), k, ignore,
                                    seed=spec.train.seed, pixels_per_image=per_image)
    base = np.zeros_like(confusion)
    for i in data.test_ids:
        base += confusion_matrix([model.predict(read_cube(catalog, i))], [catalog.annotation(i, spec.variant).array],
                                 k, ignore)
    baseline_s = time.perf_counter() - t0
    overlays = []
    for image_id, prediction in zip(data.test_ids, kept, strict=False):
        rgb = _rgb(catalog, image_id, read_cube(catalog, image_id), _wavelengths(catalog, image_id))
        target = catalog.annotation(image_id, spec.variant).array.astype(np.int64)
        if ignore is not None:
            target[target == ignore] = -1  # drawn black, as the report draws unlabelled pixels
        overlays.append(Overlay(rgb, image_id.split("/")[-1], target, prediction))
    report = TaskReport("segmentation", spec.dataset, scores_from_confusion(confusion), scores_from_confusion(base),
                        confusion=confusion, class_names=info.class_names, overlays=overlays)
    return report, baseline_s


def _saliency_report(catalog: Catalog, head: nn.Module, data: TaskData, device: torch.device
                     ) -> tuple[TaskReport, float]:
    spec, test = data.spec, data.test
    assert isinstance(test, CatalogSamples)
    samples = cast(list[SaliencySample], list(test))
    scored = evaluate_saliency(head, samples, device)
    t0 = time.perf_counter()
    baseline = evaluate_centre_prior([s.mask.numpy() for s in samples])
    baseline_s = time.perf_counter() - t0
    overlays = []
    for image_id, sample, prediction in list(zip(data.test_ids, samples, scored.predictions, strict=True))[
            :spec.overlays]:
        rgb = _rgb(catalog, image_id, read_cube(catalog, image_id), _wavelengths(catalog, image_id))
        overlays.append(Overlay(rgb, image_id.split("/")[-1], sample.mask.numpy(), prediction))
    return TaskReport("saliency", spec.dataset, scored.metrics, baseline.metrics, overlays=overlays), baseline_s


def _tracking_report(catalog: Catalog, head: nn.Module, backbone: Backbone, data: TaskData, device: torch.device
                     ) -> tuple[TaskReport, float]:
    spec, test = data.spec, data.test
    assert isinstance(test, list)
    boxes = [track_sequence(head, s.sequence, _feature_fn(backbone, s), spec.tracker, device)  # type: ignore[arg-type]
             for s in test]
    sequences = [s.sequence for s in test]
    scored = score_tracks(boxes, sequences)
    t0 = time.perf_counter()
    baseline = evaluate_first_box(sequences)
    baseline_s = time.perf_counter() - t0
    overlays = []
    for s, predicted, held in list(zip(test, boxes, baseline.boxes, strict=True))[:spec.overlays]:
        t = len(s.sequence.frames) // 2
        rgb = _rgb(catalog, catalog.sequence(s.seq_id).frames[t], np.asarray(s.sequence.frames[t]),
                   s.sensor.wavelengths)
        overlays.append(Overlay(rgb, f"{s.seq_id.split('/')[-1]} frame {t + 1}",
                                boxes={"truth": s.sequence.boxes[t], "head": predicted[t], "first box": held[t]}))
    report = TaskReport("tracking", spec.dataset, scored.metrics, baseline.metrics, head_curves=scored.curves,
                        baseline_curves=baseline.curves, overlays=overlays)
    return report, baseline_s


def evaluate_head(catalog: Catalog, head: nn.Module, backbone: Backbone, data: TaskData
                  ) -> tuple[TaskReport, dict[str, float]]:
    """Score the head on the test split and its trivial baseline beside it (the spectral classifier fits on the
    train split); returns the task's report and the seconds each part took."""
    device = resolve_device(data.spec.train.device)
    head.to(device).eval()
    start = time.perf_counter()
    if data.spec.task == "segmentation":
        report, baseline_s = _segmentation_report(catalog, head, data, device)
    elif data.spec.task == "saliency":
        report, baseline_s = _saliency_report(catalog, head, data, device)
    else:
        report, baseline_s = _tracking_report(catalog, head, backbone, data, device)
    return report, {"eval_s": time.perf_counter() - start - baseline_s, "baseline_s": baseline_s}


# ------------------------------------------------------------------------------------------------ outcomes
@dataclass
class TaskOutcome:
    """A head run's result: its report entry, where it lives, and what it cost."""

    report: TaskReport
    run_dir: Path
    fingerprint: str
    trainable_parameters: int
    steps: int
    counts: dict[str, int]
    timings: dict[str, float]
    skipped: bool = False
    """True when the inputs had not changed and the stored result was reused."""

    def summary(self) -> dict[str, Any]:
        """One table row: primary metric of head and baseline, the margin, the size and the time."""
        metric, higher = PRIMARY[self.report.task]
        head, base = self.report.head[metric], self.report.baseline[metric]
        return {"task": self.report.task, "dataset": self.report.dataset, "metric": metric,
                "head": round(head, 4), "baseline": round(base, 4),
                "margin": round((head - base) if higher else (base - head), 4),
                "trainable_parameters": self.trainable_parameters, "steps": self.steps,
                "train_items": self.counts.get("train", 0), "test_items": self.counts.get("test", 0),
                "seconds": round(sum(self.timings.values()), 2), "reused": self.skipped}


def _curves_json(curves: TrackingCurves | None) -> dict[str, list[float]] | None:
    return None if curves is None else {k: np.asarray(v).tolist() for k, v in dataclasses.asdict(curves).items()}


def _curves(data: dict[str, list[float]] | None) -> TrackingCurves | None:
    return None if data is None else TrackingCurves(**{k: np.asarray(v) for k, v in data.items()})


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=2, default=str))
    os.replace(tmp, path)


def save_outcome(outcome: TaskOutcome, out_dir: Path) -> None:
    """Write overlays.npz, then result.json atomically (enough to rebuild the report without recomputing anything).
    result.json marks a finished run folder: write it after everything else the run writes."""
    r = outcome.report
    arrays: dict[str, np.ndarray] = {}
    overlays = []
    for k, o in enumerate(r.overlays):
        arrays[f"image_{k}"] = np.asarray(o.image, dtype=np.float32)
        for name in ("target", "prediction"):
            value = getattr(o, name)
            if value is not None:
                arrays[f"{name}_{k}"] = np.asarray(value)
        overlays.append({"title": o.title, "boxes": {n: np.asarray(b).tolist() for n, b in o.boxes.items()}})
    np.savez_compressed(out_dir / OVERLAYS_FILE, **arrays)  # type: ignore[arg-type]  # numpy's stub types **kwds
    _write_json(out_dir / RESULT_FILE, {
        "fingerprint": outcome.fingerprint, "task": r.task, "dataset": r.dataset, "head": r.head,
        "baseline": r.baseline, "confusion": None if r.confusion is None else np.asarray(r.confusion).tolist(),
        "class_names": list(r.class_names), "head_curves": _curves_json(r.head_curves),
        "baseline_curves": _curves_json(r.baseline_curves), "overlays": overlays,
        "trainable_parameters": outcome.trainable_parameters, "steps": outcome.steps, "counts": outcome.counts,
        "timings": outcome.timings})


def load_outcome(out_dir: Path, skipped: bool = True) -> TaskOutcome:
    """Rebuild a stored outcome (see `save_outcome`)."""
    doc = json.loads((out_dir / RESULT_FILE).read_text())
    with np.load(out_dir / OVERLAYS_FILE) as arrays:
        overlays = [Overlay(arrays[f"image_{k}"], o["title"],
                            arrays.get(f"target_{k}"), arrays.get(f"prediction_{k}"),
                            {n: np.asarray(b) for n, b in o["boxes"].items()})
                    for k, o in enumerate(doc["overlays"])]
    report = TaskReport(doc["task"], doc["dataset"], doc["head"], doc["baseline"],
                        confusion=None if doc["confusion"] is None else np.asarray(doc["confusion"]),
                        class_names=doc["class_names"], head_curves=_curves(doc["head_curves"]),
                        baseline_curves=_curves(doc["baseline_curves"]), overlays=overlays)
    return TaskOutcome(report, out_dir, doc["fingerprint"], doc["trainable_parameters"], doc["steps"],
                       doc["counts"], doc["timings"], skipped=skipped)


def model_label(backbone: Backbone) -> str:
    """The backbone as reports name it: registry name and overrides."""
    overrides = backbone.descriptor["overrides"]
    extra = ", ".join(f"{k}={v}" for k, v in sorted(overrides.items()))
    return f"{backbone.descriptor['model']} ({extra})" if extra else str(backbone.descriptor["model"])


def runs_markdown(outcomes: Sequence[TaskOutcome], feature_set: str) -> str:
    """The report's appendix: per head its trainable parameters, steps, split sizes, timings and run folder."""
    lines = ["## Runs", "", f"Feature set `{feature_set}` (catalog `features/sets/{feature_set}.json`).", "",
             "| task | dataset | trainable parameters | steps | train / test items | features s | train s | "
             "eval s | baseline s | reused |", "|---|---|---|---|---|---|---|---|---|---|"]
    for o in outcomes:
        t = o.timings
        lines.append(f"| {o.report.task} | {o.report.dataset} | {o.trainable_parameters:,} | {o.steps} | "
                     f"{o.counts.get('train', 0)} / {o.counts.get('test', 0)} | {t.get('features_s', 0):.1f} | "
                     f"{t.get('train_s', 0):.1f} | {t.get('eval_s', 0):.1f} | {t.get('baseline_s', 0):.1f} | "
                     f"{'yes' if o.skipped else 'no'} |")
    return "\n".join(lines)


def write_task_report(out_dir: Path, outcomes: Sequence[TaskOutcome], backbone: Backbone) -> ReportPaths:
    """The report of one or more head runs (write_report plus the runs appendix), provenance from the backbone."""
    return write_report(out_dir, [o.report for o in outcomes], weights=backbone.provenance,
                        preprocessing=backbone.spec.preprocessing, model=model_label(backbone),
                        appendix=runs_markdown(outcomes, backbone.set_id))


# ------------------------------------------------------------------------------------------------ entry points
def backbone_record(spec: BackboneSpec) -> dict[str, Any]:
    """A BackboneSpec as run.json stores it (checkpoint as an absolute path)."""
    record = dataclasses.asdict(spec)
    record["overrides"] = spec.resolved_overrides()
    if spec.checkpoint is not None:
        record["checkpoint"] = str(Path(spec.checkpoint).resolve())
    return record


def train_task(catalog: Catalog, backbone: Backbone, spec: TaskSpec, run_dir: Path, *, replace: bool = False,
               on_step: Callable[[int, float], None] | None = None,
               on_progress: Callable[[int], None] | None = None) -> TaskOutcome:
    """Train the head of `spec` on the frozen backbone, score it and its baseline, write the run folder and its
    report. Unchanged inputs reuse the stored result (``skipped``); a folder holding a run of other inputs is an
    error unless `replace`, which starts it over."""
    run_dir = Path(run_dir)
    labels = labels_fingerprint(catalog, spec.dataset, [spec.train_split, spec.test_split])
    inputs = task_fingerprint(spec, backbone.set_id, labels)
    run_file = run_dir / RUN_FILE
    if run_file.is_file():
        recorded = json.loads(run_file.read_text())
        if recorded.get("fingerprint") != inputs["fingerprint"]:
            what = ", ".join(changed_inputs(recorded, inputs)) or "inputs"
            if not replace:
                raise InputError(run_file, "fingerprint", f"the run in {run_dir} was made from other {what}",
                                 "pass another output folder, or replace the run (--replace) to start it over")
            logger.info("%s: %s changed since the run in %s; starting it over", spec.task, what, run_dir)
            shutil.rmtree(run_dir)
        elif (run_dir / RESULT_FILE).is_file():
            logger.info("%s: inputs unchanged (fingerprint %s); reusing the result in %s", spec.task,
                        inputs["fingerprint"][:12], run_dir)
            return load_outcome(run_dir, skipped=True)
    data = load_task_data(catalog, backbone, spec, on_progress=on_progress)
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_json(run_file, {**inputs, "catalog": catalog.uri, "backbone": backbone_record(backbone.spec),
                           "backbone_descriptor": backbone.descriptor, "spec": spec.to_dict()})
    head = new_head(spec, backbone, data.info)
    t0 = time.perf_counter()
    result = fit_head(head, data, backbone, run_dir, on_step)
    train_s = time.perf_counter() - t0
    logger.info("%s head: %d trainable parameters, %d steps in %.1f s", spec.task, result.trainable_parameters,
                result.steps, train_s)
    report, timings = evaluate_head(catalog, head, backbone, data)
    outcome = TaskOutcome(report, run_dir, inputs["fingerprint"], result.trainable_parameters, result.steps,
                          data.counts, {"features_s": data.features_s, "train_s": train_s, **timings})
    write_task_report(run_dir, [outcome], backbone)
    save_outcome(outcome, run_dir)  # last: result.json is the commit point a rerun reuses
    return outcome


def evaluate_run(catalog: Catalog, run_dir: Path, split: str | None = None, out_dir: Path | None = None,
                 device: str = "auto") -> tuple[TaskOutcome, ReportPaths]:
    """Score a trained head again from its run folder (its latest checkpoint, the backbone it was trained on) on
    `split` (default: its test split), with the baseline beside it; writes the report to `out_dir` (default:
    <run>/eval-<split>)."""
    run_dir = Path(run_dir)
    run_file = run_dir / RUN_FILE
    if not run_file.is_file():
        raise InputError(run_dir, RUN_FILE, "is not a head run folder (no run.json)",
                         "pass the --out folder of `hvp heads train` (or a task folder of `hvp heads run-all`)")
    recorded = json.loads(run_file.read_text())
    spec = TaskSpec.from_dict(recorded["spec"])
    spec = dataclasses.replace(spec, test_split=split or spec.test_split,
                               train=dataclasses.replace(spec.train, device=device))
    backbone = load_backbone(BackboneSpec(**recorded["backbone"]), device)
    if backbone.set_id != recorded["feature_set"]:
        raise InputError(run_file, "feature_set", f"the recorded backbone now gives feature set {backbone.set_id}, "
                         f"the head was trained on {recorded['feature_set']} (was the checkpoint file changed?)",
                         "restore the checkpoint the head was trained on, or train a new head")
    head, meta = load_head(run_dir)
    data = load_task_data(catalog, backbone, spec, with_train=False)
    report, timings = evaluate_head(catalog, head, backbone, data)
    outcome = TaskOutcome(report, run_dir, recorded["fingerprint"], count_trainable_parameters(head),
                          int(meta.get("step", 0)), data.counts, {"features_s": data.features_s, **timings})
    target = Path(out_dir) if out_dir is not None else run_dir / f"eval-{spec.test_split}"
    target.mkdir(parents=True, exist_ok=True)
    return outcome, write_task_report(target, [outcome], backbone)


@dataclass
class DownstreamResult:
    """All heads of one backbone: the combined report, one summary row per task, and the runs."""

    report: ReportPaths
    table: list[dict[str, Any]]
    outcomes: list[TaskOutcome]


def summarise(out_dir: Path, outcomes: Sequence[TaskOutcome], backbone: Backbone) -> DownstreamResult:
    """Write the combined report of several head runs under `out_dir`."""
    paths = write_task_report(Path(out_dir), outcomes, backbone)
    return DownstreamResult(paths, [o.summary() for o in outcomes], list(outcomes))


def run_downstream(catalog: Catalog, backbone_spec: BackboneSpec, specs: Sequence[TaskSpec], out_dir: Path, *,
                   device: str = "auto", on_step: Callable[[int, float], None] | None = None) -> DownstreamResult:
    """Every head of `specs` on one frozen backbone into one report: a run folder per task under `out_dir`
    (replaced when its inputs changed, reused when not), report.json / report.md / results.parquet / plots beside
    them."""
    if len({s.task for s in specs}) != len(specs):
        raise ValueError("run_downstream: one spec per task (the report holds one result per task)")
    backbone = load_backbone(backbone_spec, device)
    outcomes = [train_task(catalog, backbone, s, Path(out_dir) / s.task, replace=True, on_step=on_step)
                for s in specs]
    return summarise(Path(out_dir), outcomes, backbone)
