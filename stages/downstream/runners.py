"""The downstream stages' runners: `run_features` (cache the frozen backbone's features of labelled datasets) and
`run_heads` (one head per task, scored against its baseline, one report), each with its typed config, registered in
stages.registry. Flows, the CLI, the benches, the fault harness and the tests call these."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from catalog.catalog import Catalog
from stages.downstream.features import RANDOM_INIT, Backbone, BackboneSpec, compute_features, load_backbone
from stages.downstream.heads import train_task
from stages.downstream.outcomes import TaskOutcome, summarise, write_json
from stages.downstream.report import ReportPaths
from stages.downstream.spec import TaskSpec
from stages.downstream.tasks import TASKS, ordered_tasks
from stages.pretraining.data import DEFAULT_GSD_M
from stages.registry import register_stage

Device = Literal["auto", "cuda", "cpu"]
HEADS_CONFIG_FILE = "heads_config.json"
FEATURES_CONFIG_DIR = "features/runs"
"""Catalog folder of the features runs' resolved configs, one per feature set (the latest run's)."""


class BackboneConfig(BaseModel):
    """The frozen backbone: a registry layout, its weights and the input contract."""

    model_config = ConfigDict(extra="forbid")

    model: str = "tiny"
    checkpoint: str | None = RANDOM_INIT
    """A weights file, a pretraining checkpoint or run folder; "random-init" or None: random weights (`seed`)."""
    seed: int = 0
    """Seed of random-init weights."""
    overrides: dict[str, Any] | None = None
    """create_model overrides; None: the layout's downstream defaults (img_size=128 for tiny)."""
    preprocessing: str | None = None
    """The preprocessing contract; None: the model family's ("released" for HyperFree layouts, "hypersigma" for
    HyperSIGMA ones)."""
    strict: bool = True
    """Load the checkpoint strictly (every key and shape must match the layout)."""
    default_gsd_m: float = DEFAULT_GSD_M
    """GSD (m/pixel) of images whose GSD the catalog does not know."""
    dtype: str = "float16"
    """Stored dtype of cached features."""

    @classmethod
    def from_spec(cls, spec: BackboneSpec) -> BackboneConfig:
        """The fields of a BackboneSpec."""
        return cls.model_validate({**dataclasses.asdict(spec), "overrides": spec.overrides and dict(spec.overrides)})

    def to_spec(self) -> BackboneSpec:
        """The BackboneSpec these fields describe."""
        return BackboneSpec(**self.model_dump())


def _backbone(config: BackboneConfig, device: str, given: Backbone | None) -> Backbone:
    """The backbone a runner uses: the one given (a caller's loaded copy of the same spec) or a fresh load."""
    return given if given is not None else load_backbone(config.to_spec(), device)


# ------------------------------------------------------------------------------------------------ features
class FeaturesConfig(BaseModel):
    """Which labelled datasets' features to cache, for which frozen backbone."""

    model_config = ConfigDict(extra="forbid")

    backbone: BackboneConfig = Field(default_factory=BackboneConfig)
    datasets: list[str] = Field(default_factory=list)
    """Labelled datasets (slugs); empty: the benchmark of every task that reads cached features."""
    splits: list[str] | None = None
    """Only images of these splits; None: all."""
    batch_size: int = Field(default=8, ge=1)
    device: Device = "auto"
    images: list[str] | None = None
    """Only these image ids (one shard of a fanned-out run, which records no run file: its flow records the merged
    one with ``record_features``); None: all of the datasets'."""


@dataclass
class FeaturesResult:
    """What a features run did: one row per dataset (images, computed, cached, seconds, note) and the feature set."""

    set_id: str
    weights: str
    """The backbone's provenance (a checkpoint sha256 or random-init)."""
    rows: list[dict[str, Any]]
    config_path: str
    resolved: dict[str, Any] = field(default_factory=dict)
    """The run record (config, feature set, weights, descriptor, rows) written, or for a shard to be merged."""

    @property
    def computed(self) -> int:
        """Images encoded by this run."""
        return sum(int(r["computed"]) for r in self.rows)

    @property
    def cached(self) -> int:
        """Images whose features were cached already (skipped)."""
        return sum(int(r["cached"]) for r in self.rows)


def feature_datasets() -> list[str]:
    """The benchmarks of the tasks that read cached whole-image features (what an empty `datasets` means)."""
    return [TASKS.get(n).default_dataset for n in ordered_tasks() if TASKS.get(n).cached_features]


def feature_images(catalog: Catalog, datasets: Sequence[str], splits: Sequence[str] | None = None
                   ) -> tuple[list[str], dict[str, str]]:
    """The labelled images of `datasets` (of `splits`, if given) whose whole-image features heads read, and the
    datasets left out with the reason (datasets of tasks that encode their inputs on the fly; unknown ones)."""
    uncached = {t.annotation: t.uncached_reason for t in map(TASKS.get, TASKS.names()) if not t.cached_features}
    index = catalog.images()
    ids: list[str] = []
    skipped: dict[str, str] = {}
    for dataset in datasets:
        rows = index[(index["dataset"] == dataset) & index["label_kind"].notna()] if not index.empty else index
        if rows.empty:
            skipped[dataset] = "no labelled images in the catalog (ingest it first; `hvp datasets` lists slugs)"
            continue
        kinds = set(rows["label_kind"])
        if kinds <= set(uncached):
            skipped[dataset] = "; ".join(uncached[k] for k in sorted(kinds))
            continue
        if splits:
            rows = rows[rows["split"].isin(list(splits))]
        ids += sorted(rows["image_id"])
    return ids, skipped


@register_stage("features", FeaturesConfig, "Cache the frozen backbone's multi-scale features of labelled images")
def run_features(catalog: Catalog, config: FeaturesConfig, *, backbone: Backbone | None = None,
                 on_progress: Callable[[int], None] | None = None) -> FeaturesResult:
    """Compute and cache the features of the chosen datasets' labelled images that the catalog lacks for this
    backbone (cache hits are skipped and counted); the resolved config goes to the catalog's
    features/runs/<feature set>.json."""
    loaded = _backbone(config.backbone, config.device, backbone)
    rows = []
    for dataset in config.datasets or feature_datasets():
        ids, left_out = feature_images(catalog, [dataset], config.splits)
        if config.images is not None:
            ids = [i for i in ids if i in set(config.images)]
        row: dict[str, Any] = {"dataset": dataset, "feature_set": loaded.set_id, "weights": loaded.provenance,
                               "images": len(ids), "computed": 0, "cached": 0, "seconds": 0.0,
                               "note": left_out.get(dataset, "")}
        if not left_out:
            run = compute_features(catalog, loaded, ids, config.batch_size, on_progress=on_progress)
            row.update(computed=len(run.computed), cached=len(run.cached), seconds=round(run.seconds, 2),
                       note="" if run.computed else "unchanged: nothing to compute")
        rows.append(row)
    resolved = {"config": config.model_dump(mode="json", exclude={"images"}), "feature_set": loaded.set_id,
                "weights": loaded.provenance, "descriptor": loaded.descriptor, "rows": rows}
    path = record_features(catalog, resolved) if config.images is None else ""
    return FeaturesResult(loaded.set_id, loaded.provenance, rows, path, resolved)


def record_features(catalog: Catalog, resolved: dict[str, Any]) -> str:
    """Write a features run's record (its resolved config and rows) to features/runs/<feature set>.json; returns
    its URI."""
    rel = f"{FEATURES_CONFIG_DIR}/{resolved['feature_set']}.json"
    catalog.storage.put_bytes(rel, json.dumps(resolved, indent=2, default=str).encode())
    return f"{catalog.uri}/{rel}"


def merge_feature_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Shard rows of a fanned-out features run merged into one row per dataset (counts and seconds summed), in the
    order the datasets first appear."""
    merged: dict[str, dict[str, Any]] = {}
    for row in rows:
        if row["dataset"] not in merged:
            merged[row["dataset"]] = dict(row)
            continue
        into = merged[row["dataset"]]
        for key in ("images", "computed", "cached"):
            into[key] += row[key]
        into["seconds"] = round(into["seconds"] + row["seconds"], 2)
        into["note"] = "" if into["computed"] else into["note"] or row["note"]
    return list(merged.values())


# ------------------------------------------------------------------------------------------------ heads
class TaskChoice(BaseModel):
    """One task of a heads run: the task (a registered name), its labelled dataset and splits."""

    model_config = ConfigDict(extra="forbid")

    task: str
    dataset: str | None = None
    """Labelled dataset (slug); None: the task's benchmark."""
    train_split: str = "train"
    test_split: str = "test"
    variant: str | None = None
    """A label variant the dataset declares (e.g. HSI Drive's 'hs3bench')."""

    @field_validator("task")
    @classmethod
    def _known(cls, task: str) -> str:
        TASKS.get(task)
        return task


class HeadsConfig(BaseModel):
    """A heads run: the frozen backbone, the tasks with their datasets, the heads' size and schedule, where the run
    folders and the report go."""

    model_config = ConfigDict(extra="forbid")

    out_dir: str
    """Report folder, with one run folder per task (`folder_per_task`), or the one task's run folder."""
    backbone: BackboneConfig = Field(default_factory=BackboneConfig)
    tasks: list[TaskChoice] = Field(default_factory=list)
    """Empty: every registered task on its benchmark, in report order."""
    head_size: Literal["small", "paper"] = "paper"
    """The tasks' head options and schedules: "small" (CPU-sized layouts such as tiny) or the paper's."""
    steps: int | None = Field(default=None, ge=1)
    """Training steps per head; None: the head size's schedule."""
    checkpoint_every: int | None = Field(default=None, ge=1)
    pairs_per_sequence: int | None = Field(default=None, ge=1)
    overlays: int | None = Field(default=None, ge=0)
    seed: int = 0
    """Seed of head training."""
    tune: Literal["head", "full"] = "head"
    """"head": the backbone stays frozen; "full": it is fine-tuned with the head (tasks whose card lists it, e.g.
    airborne_classification; the other tasks refuse it). Recorded in each run's spec and fingerprint."""
    device: Device = "auto"
    replace: bool = False
    """Start over a run folder holding a run of other inputs (else that is an error)."""
    folder_per_task: bool = True
    """False (one task only): `out_dir` is the task's run folder itself."""

    @model_validator(mode="after")
    def _one_task_without_folders(self) -> HeadsConfig:
        if not self.folder_per_task and len(self.task_choices()) != 1:
            raise ValueError("HeadsConfig.folder_per_task=False needs exactly one task in `tasks`")
        if len({c.task for c in self.task_choices()}) != len(self.task_choices()):
            raise ValueError("HeadsConfig.tasks: one entry per task (the report holds one result per task)")
        refuse = [c.task for c in self.task_choices() if self.tune not in TASKS.get(c.task).tune]
        if refuse:
            raise ValueError(f"HeadsConfig.tune={self.tune!r}: task(s) {refuse} train heads on the frozen backbone "
                             "only; run them with tune='head', or choose tasks that support full tuning (e.g. "
                             "airborne_classification)")
        return self

    def task_choices(self) -> list[TaskChoice]:
        """The tasks given, or every registered task on its benchmark."""
        return self.tasks or [TaskChoice(task=n) for n in ordered_tasks()]


@dataclass
class HeadsResult:
    """A heads run: the report, one summary row per task, the runs, and the resolved config's path."""

    report: ReportPaths
    table: list[dict[str, Any]]
    outcomes: list[TaskOutcome]
    specs: list[TaskSpec]
    weights: str
    feature_set: str
    config_path: Path


def heads_specs(config: HeadsConfig, img_size: int) -> list[TaskSpec]:
    """The task specs a heads config resolves to at the backbone's frame size."""
    extra = {k: v for k, v in (("pairs_per_sequence", config.pairs_per_sequence), ("overlays", config.overlays))
             if v is not None}
    specs = []
    for c in config.task_choices():
        spec = TASKS.get(c.task).spec(config.head_size, img_size, dataset=c.dataset, steps=config.steps,
                                      seed=config.seed, device=config.device, train_split=c.train_split,
                                      test_split=c.test_split, variant=c.variant, tune=config.tune, **extra)
        if config.checkpoint_every is not None:
            spec = dataclasses.replace(spec, train=dataclasses.replace(spec.train,
                                                                       checkpoint_every=config.checkpoint_every))
        specs.append(spec)
    return specs


@register_stage("heads", HeadsConfig, "Train one head per task on the frozen backbone, score it against its "
                "trivial baseline and write the report")
def run_heads(catalog: Catalog, config: HeadsConfig, *, backbone: Backbone | None = None,
              on_step: Callable[[TaskSpec, int, float], None] | None = None) -> HeadsResult:
    """Every head of the config on one frozen backbone into one report: a run folder per task under `out_dir` (or
    `out_dir` itself for one task), reused when its inputs did not change; report.json / report.md /
    results.parquet / plots and heads_config.json (the resolved config and task specs) in `out_dir`."""
    loaded = _backbone(config.backbone, config.device, backbone)
    out = Path(config.out_dir)
    specs = heads_specs(config, loaded.img_size)
    outcomes = []
    for spec in specs:
        step_fn = None if on_step is None else (lambda step, loss, s=spec: on_step(s, step, loss))
        outcomes.append(train_task(catalog, loaded, spec, out / spec.task if config.folder_per_task else out,
                                   replace=config.replace, on_step=step_fn))
    summary = summarise(out, outcomes, loaded)
    config_path = out / HEADS_CONFIG_FILE
    write_json(config_path, {"config": config.model_dump(mode="json"), "specs": [s.to_dict() for s in specs],
                             "feature_set": loaded.set_id, "weights": loaded.provenance, "catalog": catalog.uri})
    return HeadsResult(summary.report, summary.table, summary.outcomes, specs, loaded.provenance, loaded.set_id,
                       config_path)
