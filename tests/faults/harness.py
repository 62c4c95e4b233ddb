"""Fault injection: ``kill -9`` a stage at a seeded random point, run it again, and check that nothing is damaged.

A *point* is any file-system mutation the stage's process makes (opening a file for writing, each write to it,
rename, remove, mkdir); at the chosen point the process SIGKILLs itself, and a write chosen as the point is cut in
half first (a torn write). The stage then runs again to completion, as a person would after a crash, and the
result must equal a run that was never interrupted:

- ``catalog.verify()`` is healthy, with no temporary left behind;
- every part file reads (no torn rows) and no image or mask set is committed twice;
- the index and every mask set equal the uninterrupted run's (masks complete, byte for byte);
- pretraining resumed from its last committed checkpoint and ends with the uninterrupted run's metrics and
  weights, bit for bit;
- the feature cache (``features``, and read by ``heads``) has one index row per entry, every entry reads back
  through its checksums and equals the uninterrupted run's byte for byte, and no group is stored unindexed;
- every head resumed from its latest checkpoint, and its training log, final weights, result and report equal the
  uninterrupted run's; the run folder holds the same files (no temporary, no half-pruned checkpoint).

``features`` and ``heads`` are two stages, as in the DAG (the heads stage finds every feature cached and trains):
the features stage's points are all feature-cache writes, the heads stage's are checkpoints, logs, results and
reports, so each is hit as often as the other instead of one drowning the other's points. Both start from the
catalog the pretraining left with the labelled benchmark fixtures ingested (uninterrupted, in the set-up) and
use the uninterrupted pretraining run's checkpoint as the frozen backbone, as the DAG does.

The stages run as the CLI's plain path runs them: each stage's runner (ingest, label per branch, fuse, pretrain)
with the test profile's configuration (pipelines/profiles/test.yaml: tiny random-init models, permissive
thresholds, a checkpoint every two steps). Each killed run is a child forked from a server process that preloaded
the pipeline's modules, so a trial costs the stage's own work. ``tests/faults/`` runs a few points per stage;
``bench/faults.py`` runs 50.
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import functools
import io
import json
import logging
import multiprocessing as mp
import os
import shutil
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

#: The stages under test, in pipeline order (each starts from the previous one's result).
STAGES = ("ingest", "label", "fuse", "pretrain", "features", "heads")
#: Fixture datasets the harness ingests (small: every trial re-runs a stage).
DATASETS = ("hot-2024-rednir", "cave")
#: Labelled benchmark fixtures, ingested before the features stage: one dataset per head task.
HEAD_DATASETS = {"segmentation": "hsi-drive-v2-0", "saliency": "hssod", "tracking": "hot-2023-vis"}
"""The registered tasks' benchmark fixtures (test_faults checks this equals the task registry's defaults)."""
#: Short head runs: a checkpoint every two steps, two tracking pairs per sequence, one example per report (the head
#: steps are the test profile's).
HEADS: dict[str, Any] = {"checkpoint_every": 2, "pairs_per_sequence": 2, "overlays": 1, "head_size": "small",
                         "device": "cpu", "replace": True}
PRELOAD = ["tests.faults.harness", "pipelines.profiles", "stages.ingest", "stages.labelling.label",
           "stages.labelling.spatial", "stages.labelling.spectral", "stages.labelling.material", "stages.pretraining",
           "stages.downstream.runners"]


@functools.cache
def profile() -> Any:
    """The test profile, resolved (a pipelines.profiles.RunConfig; its paths are filled per stage below)."""
    from pipelines.profiles import resolve

    return resolve("test")


# ---------------------------------------------------------------------------------------------- the stages
def run_stage(stage: str, catalog: str, run_dir: str, source: str, backbone: str = "") -> None:
    """Run one stage to completion, as `hvp <stage> --plain` would (idempotent: it does what is left to do).
    ``run_dir`` is the pretraining run (pretrain) or the heads' report folder (heads); ``backbone`` the pretraining
    run whose checkpoint the features and heads stages freeze."""
    import torch

    from catalog.catalog import Catalog

    torch.set_num_threads(1)
    run = profile()
    if stage == "ingest":
        from stages.ingest import IngestConfig, run_ingest

        run_ingest(Catalog(catalog).init(), IngestConfig(source_root=source))
    elif stage == "label":
        from stages.labelling.label import run_label

        for branch in run.label.branches:
            run_label(Catalog(catalog), run.label_config(branch))
    elif stage == "fuse":
        from stages.labelling.label import run_fuse

        run_fuse(Catalog(catalog), run.fuse)
    elif stage == "pretrain":
        from stages.pretraining import run_pretrain

        run_pretrain(Catalog(catalog), run.pretrain.model_copy(update={"out_dir": run_dir, "resume": True}))
    elif stage == "features":
        from stages.downstream.runners import BackboneConfig, FeaturesConfig, run_features

        run_features(Catalog(catalog), FeaturesConfig(backbone=BackboneConfig(checkpoint=backbone), device="cpu"))
    elif stage == "heads":
        from stages.downstream.runners import BackboneConfig, HeadsConfig, TaskChoice, run_heads

        tasks = [TaskChoice(task=t, dataset=d) for t, d in HEAD_DATASETS.items()]
        run_heads(Catalog(catalog), HeadsConfig(out_dir=run_dir, backbone=BackboneConfig(checkpoint=backbone),
                                                tasks=tasks, steps=run.downstream.steps, **HEADS))
    else:
        raise ValueError(f"unknown stage {stage!r}: choose from {', '.join(STAGES)}")


# ---------------------------------------------------------------------------------------------- kill points
class _Points:
    """Counts file-system mutations; at point ``kill_at`` (0: never) the process kills itself."""

    def __init__(self, kill_at: int) -> None:
        self.kill_at = kill_at
        self.count = 0
        self._lock = threading.Lock()

    def hit(self) -> bool:
        """Count one point; True when it is the one to die at (the caller cuts its write, then calls die)."""
        with self._lock:
            self.count += 1
            return self.count == self.kill_at

    @staticmethod
    def die() -> None:
        os.kill(os.getpid(), signal.SIGKILL)


class _TornFile:
    """A file opened for writing whose write at the kill point writes only half its data before the kill."""

    def __init__(self, raw: Any, points: _Points) -> None:
        self._raw, self._points = raw, points

    def write(self, data: Any) -> Any:
        if self._points.hit():
            self._raw.write(data[: len(data) // 2])
            self._raw.flush()
            self._points.die()
        return self._raw.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)

    def __iter__(self) -> Any:
        return iter(self._raw)

    def __enter__(self) -> _TornFile:
        self._raw.__enter__()
        return self

    def __exit__(self, *exc: Any) -> Any:
        return self._raw.__exit__(*exc)


def _install(points: _Points) -> None:
    """Route this process's file-system mutations through ``points`` (the child only)."""
    real_open = io.open

    def guarded_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if not any(c in mode for c in "wax+"):
            return real_open(file, mode, *args, **kwargs)
        if points.hit():
            points.die()
        return _TornFile(real_open(file, mode, *args, **kwargs), points)

    def point(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def inner(*args: Any, **kwargs: Any) -> Any:
            if points.hit():
                points.die()
            return fn(*args, **kwargs)
        return inner

    io.open = builtins.open = guarded_open  # type: ignore[assignment]
    for name in ("replace", "rename", "remove", "unlink", "rmdir", "mkdir"):
        setattr(os, name, point(getattr(os, name)))


def _child(stages: tuple[str, ...], catalog: str, run_dir: str, source: str, kill_at: int, count_file: str,
           backbone: str) -> None:
    """Stages run in a forked child, killed at ``kill_at`` (0: runs to the end and records its point count)."""
    points = _Points(kill_at)
    _install(points)
    for stage in stages:
        run_stage(stage, catalog, run_dir, source, backbone)
    with open(count_file, "w") as fh:
        fh.write(str(points.count))


_CONTEXT: Any = None


def _context() -> Any:
    """A forkserver context whose server preloaded the pipeline (children start in milliseconds, threadless)."""
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = mp.get_context("forkserver")
        _CONTEXT.set_forkserver_preload(PRELOAD)
    return _CONTEXT


def run_child(stages: str | tuple[str, ...], catalog: str, run_dir: str, source: str, kill_at: int,
              count_file: str, backbone: str = "") -> int:
    """Run a stage (or several, in order) in a fresh child killed at ``kill_at`` (0: never); returns the child's
    exit code (-9 when killed)."""
    stages = (stages,) if isinstance(stages, str) else stages
    proc = _context().Process(target=_child, args=(stages, catalog, run_dir, source, kill_at, count_file, backbone))
    proc.start()
    proc.join()
    return int(proc.exitcode if proc.exitcode is not None else 1)


# ---------------------------------------------------------------------------------------------- set-up
@dataclass
class Setup:
    """The harness's world: fixture sources, the catalog before each stage and after an uninterrupted run of it
    (the reference), the uninterrupted pretraining run (also the downstream stages' frozen backbone) and heads'
    report folder, and how many kill points each stage has."""

    root: str
    source: str
    before: dict[str, str] = field(default_factory=dict)
    after: dict[str, str] = field(default_factory=dict)
    run_dir: str = ""
    heads_dir: str = ""
    points: dict[str, int] = field(default_factory=dict)


def build_setup(root: Path) -> Setup:
    """Write the fixtures and run every stage once, uninterrupted, in a child that counts its points (the labelled
    benchmark fixtures are ingested, uninterrupted too, before the features stage)."""
    from catalog.fixtures import write_dataset

    root = Path(root).absolute()
    setup = Setup(root=str(root), source=str(root / "src"), run_dir=str(root / "run-reference"),
                  heads_dir=str(root / "heads-reference"))
    for slug in DATASETS:
        write_dataset(slug, root / "src")
    for slug in HEAD_DATASETS.values():
        write_dataset(slug, root / "labelled-src")
    previous = root / "catalog-empty"
    previous.mkdir(parents=True)
    for stage in STAGES:
        if stage == "features":
            labelled = root / "catalog-labelled"
            shutil.copytree(previous, labelled)
            _uninterrupted("ingest", labelled, "", str(root / "labelled-src"), root / "points-labelled.txt", "")
            previous = labelled
        after = root / f"catalog-{stage}"
        shutil.copytree(previous, after)
        setup.before[stage], setup.after[stage] = str(previous), str(after)
        count = root / f"points-{stage}.txt"
        _uninterrupted(stage, after, setup.heads_dir if stage == "heads" else setup.run_dir, setup.source, count,
                       setup.run_dir)
        setup.points[stage] = int(count.read_text())
        previous = after
    return setup


def _uninterrupted(stage: str, catalog: Path, run_dir: str, source: str, count: Path, backbone: str) -> None:
    code = run_child(stage, str(catalog), run_dir, source, 0, str(count), backbone)
    if code != 0:
        raise RuntimeError(f"the uninterrupted {stage} run failed (exit {code}); run it alone to see why")


# ---------------------------------------------------------------------------------------------- one trial
@dataclass
class Trial:
    """One kill-and-rerun: where it was killed, whether the kill fired, the checkpoint step each training run had
    committed when killed (pretrain, or a head's task) and every problem found after the rerun."""

    stage: str
    kill_at: int
    points: int
    killed: bool
    problems: list[str]
    resumed_from: dict[str, int] = field(default_factory=dict)

    @property
    def survived(self) -> bool:
        """True when the rerun left everything as an uninterrupted run does."""
        return not self.problems


def kill_points(setup: Setup, stage: str, n: int, seed: int) -> list[int]:
    """``n`` seeded random kill points of a stage (distinct where the stage has enough)."""
    rng = np.random.default_rng([seed, STAGES.index(stage)])
    total = setup.points[stage]
    picks = rng.choice(np.arange(1, total + 1), size=min(n, total), replace=False)
    return sorted(int(p) for p in picks) + [int(p) for p in rng.integers(1, total + 1, size=max(0, n - total))]


def trial(setup: Setup, stage: str, kill_at: int, workdir: Path) -> Trial:
    """Kill ``stage`` at point ``kill_at``, run it again to the end, and check the result against the reference."""
    workdir = Path(workdir)
    shutil.rmtree(workdir, ignore_errors=True)
    catalog = workdir / "catalog"
    shutil.copytree(setup.before[stage], catalog)
    run_dir = workdir / "run"
    code = run_child(stage, str(catalog), str(run_dir), setup.source, kill_at, str(workdir / "count.txt"),
                     setup.run_dir)
    if code not in (0, -signal.SIGKILL):
        return Trial(stage, kill_at, setup.points[stage], False, [f"the killed run failed on its own (exit {code})"])
    committed = _committed_steps(stage, run_dir)
    problems: list[str] = []
    resumes = _Resumes()
    try:
        with resumes.listening():
            run_stage(stage, str(catalog), str(run_dir), setup.source, setup.run_dir)
    except Exception as exc:  # the rerun must succeed: its failure is what the trial found
        problems.append(f"the rerun failed: {type(exc).__name__}: {exc}")
    else:
        problems += check(setup, stage, catalog, run_dir)
        if resumes.steps != committed:
            problems.append(f"the rerun resumed at {resumes.steps or 'no step'}, not at the last committed "
                            f"checkpoints {committed or '(none)'}")
    return Trial(stage, kill_at, setup.points[stage], code == -signal.SIGKILL, problems, committed)


class _Resumes(logging.Handler):
    """Collects the steps the trainers say they resumed at: pretraining's ("Resumed <run> at step N") and each
    head's ("resuming the <task> head from <checkpoint> (step N)"), by run."""

    LOGGERS = ("stages.pretraining.trainer", "stages.downstream.train")

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.steps: dict[str, int] = {}

    def emit(self, record: logging.LogRecord) -> None:
        args = record.args if isinstance(record.args, tuple) else ()
        if str(record.msg).startswith("Resumed") and len(args) > 1:
            self.steps["pretrain"] = int(str(args[1]))
        elif str(record.msg).startswith("resuming the") and len(args) > 2:
            self.steps[str(args[0])] = int(str(args[2]))

    @contextlib.contextmanager
    def listening(self) -> Iterator[None]:
        """Hear the trainers' INFO records while the block runs (heard here, not printed)."""
        saved = []
        for name in self.LOGGERS:
            log = logging.getLogger(name)
            saved.append((log, log.level, log.propagate))
            log.addHandler(self)
            log.setLevel(logging.INFO)
            log.propagate = False
        try:
            yield
        finally:
            for log, level, propagate in saved:
                log.removeHandler(self)
                log.setLevel(level)
                log.propagate = propagate


def _committed_steps(stage: str, run_dir: Path) -> dict[str, int]:
    """The step of each training run's committed checkpoint that a rerun must resume from: the pretraining run's,
    or each head's whose result is not yet written."""
    if stage == "pretrain":
        step = _latest_step(run_dir / "checkpoints")
        return {"pretrain": step} if step else {}
    if stage == "heads":
        steps = {task: _latest_step(run_dir / task / "checkpoints") for task in HEAD_DATASETS
                 if not (run_dir / task / "result.json").is_file()}
        return {task: step for task, step in steps.items() if step}
    return {}


def _latest_step(checkpoints: Path) -> int:
    """The step of the checkpoint a ``latest`` pointer names (0 without one)."""
    pointer = checkpoints / "latest"
    return int(pointer.read_text().strip().removeprefix("step_")) if pointer.is_file() else 0


# ---------------------------------------------------------------------------------------------- checks
def check(setup: Setup, stage: str, catalog: Path, run_dir: Path) -> list[str]:
    """Everything wrong with a catalog (and run) after a rerun, compared with the uninterrupted reference."""
    from catalog.catalog import INDEX_SCHEMA, Catalog
    from catalog.masks import MASK_INDEX_SCHEMA

    cat, ref = Catalog(str(catalog)), Catalog(setup.after[stage])
    report = cat.verify()
    problems = [f"verify: {p.kind} {p.image_id or p.location}: {p.message}" for p in report.problems]
    problems += [f"temporary left behind: {t}" for t in report.stale + report.in_progress]
    try:  # every part file reads: no torn rows
        index = cat.storage.read_table("index", INDEX_SCHEMA)[0].to_pandas()
        masks = cat.storage.read_table("masks/index", MASK_INDEX_SCHEMA)[0].to_pandas()
    except Exception as exc:
        return [*problems, f"a part file does not read: {exc}"]
    problems += [f"image committed twice: {i}" for i in index.loc[index.duplicated(["image_id", "sha256"]),
                                                                   "image_id"]]
    problems += [f"mask set committed twice: {i} {lid}" for i, lid in masks.loc[
        masks.duplicated(["image_id", "labeler_id"]), ["image_id", "labeler_id"]].itertuples(index=False)]
    problems += _same_index(cat, ref)
    problems += _same_masks(cat, ref)
    if stage == "pretrain":
        problems += _same_run(Path(setup.run_dir), run_dir)
    if stage in ("features", "heads"):
        problems += _same_features(cat, ref)
    if stage == "heads":
        problems += _same_heads(Path(setup.heads_dir), run_dir)
    return problems


def _same_index(cat: Any, ref: Any) -> list[str]:
    """The index equals the reference's, timestamps aside."""
    a, b = (c.images().drop(columns=["ingested_at"]).to_dict("records") for c in (cat, ref))
    return [] if a == b else [f"index differs from the uninterrupted run's ({len(a)} rows vs {len(b)})"]


def _same_masks(cat: Any, ref: Any) -> list[str]:
    """Every mask set of the reference is committed here too, with the same bits and table."""
    out = []
    mine, theirs = cat.mask_store, ref.mask_store
    for row in theirs.index().to_dict("records"):
        try:
            got = mine.read_packed(row["image_id"], labeler_id=row["labeler_id"])
        except KeyError:
            out.append(f"masks missing: {row['image_id']} {row['labeler_id']}")
            continue
        want = theirs.read_packed(row["image_id"], labeler_id=row["labeler_id"])
        if not (np.array_equal(got.bits, want.bits) and got.table.equals(want.table)):
            out.append(f"masks differ: {row['image_id']} {row['labeler_id']}")
    extra = len(mine.index()) - len(theirs.index())
    return out + ([f"{extra} mask set(s) more than the uninterrupted run"] if extra > 0 else [])


def _same_run(ref_dir: Path, run_dir: Path) -> list[str]:
    """The run reproduced the uninterrupted run's metrics (each step once) and final weights, bit for bit."""
    import csv

    from safetensors.torch import load_file

    out = []
    with (run_dir / "metrics.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    with (ref_dir / "metrics.csv").open(newline="") as fh:
        want = list(csv.DictReader(fh))
    keys = ("step", "loss", "seg", "distill", "lr", "grad_norm")
    if [[r[k] for k in keys] for r in rows] != [[r[k] for k in keys] for r in want]:
        out.append("metrics differ from the uninterrupted run's (steps lost, repeated or changed)")
    result = json.loads((run_dir / "result.json").read_text())
    a = load_file(str(Path(result["checkpoint"]) / "model.safetensors"))
    b = load_file(str(ref_dir / "checkpoints" / (ref_dir / "checkpoints" / "latest").read_text().strip()
                      / "model.safetensors"))
    if a.keys() != b.keys() or any(not bool((a[k] == b[k]).all()) for k in a):
        out.append("final weights differ from the uninterrupted run's")
    return out


def _same_features(cat: Any, ref: Any) -> list[str]:
    """The feature cache holds each entry once, every entry reads back through its checksums with the uninterrupted
    run's bytes and attrs, every feature set's descriptor is the same, and no group is stored unindexed."""
    from catalog.features import FEATURE_INDEX_SCHEMA, FeatureStore

    try:  # every part file reads: no torn rows
        raw = cat.storage.read_table("features/index", FEATURE_INDEX_SCHEMA)[0].to_pandas()
    except Exception as exc:
        return [f"a feature index part does not read: {exc}"]
    keys = ["feature_set", "image_id"]
    out = [f"feature entry committed twice: {s} {i}" for s, i in raw.loc[raw.duplicated(keys), keys].itertuples(
        index=False)]
    mine, theirs = FeatureStore(cat), FeatureStore(ref)
    columns = [*keys, "image_sha256", "location", "maps", "dtype"]
    rows, want = (sorted(map(tuple, store.index()[columns].itertuples(index=False))) for store in (mine, theirs))
    if rows != want:
        out.append(f"feature index differs from the uninterrupted run's ({len(rows)} entries vs {len(want)})")
    for set_id in sorted(set(theirs.index()["feature_set"])):
        try:
            if mine.descriptor(set_id) != theirs.descriptor(set_id):
                out.append(f"feature set {set_id}: descriptor differs from the uninterrupted run's")
        except KeyError:
            out.append(f"feature set {set_id}: descriptor missing")
    for row in theirs.index().to_dict("records"):
        set_id, image_id = str(row["feature_set"]), str(row["image_id"])
        try:
            got = mine.read(set_id, image_id)
        except Exception as exc:  # missing, or a chunk that fails its checksum
            out.append(f"features of {image_id} do not read: {type(exc).__name__}: {exc}")
            continue
        expected = theirs.read(set_id, image_id)
        same = len(got.maps) == len(expected.maps) and all(
            a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
            for a, b in zip(got.maps, expected.maps, strict=False))
        if not same or got.attrs != expected.attrs:
            out.append(f"features of {image_id} differ from the uninterrupted run's")
    indexed = set(mine.index()["location"])
    out += [f"feature group stored but not indexed: {g}" for g in cat.storage.groups("features") if g not in indexed]
    return out


def _same_heads(ref_dir: Path, run_dir: Path) -> list[str]:
    """Every head's training log (each step once), final weights, result (timings aside), examples and report, and
    the combined report, equal the uninterrupted run's; the folder holds the same files (no temporary left, no
    half-pruned checkpoint)."""
    import pandas as pd
    from safetensors.torch import load_file

    def files(root: Path) -> list[str]:
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.is_dir() else []

    mine, theirs = files(run_dir), files(ref_dir)
    out = [f"heads' run folder: {name} {what}" for names, what in (
        (sorted(set(mine) - set(theirs)), "is left over"), (sorted(set(theirs) - set(mine)), "is missing"))
        for name in names]

    def same(name: str, read: Callable[[Path], Any], what: str = "") -> None:
        try:
            a, b = read(run_dir / name), read(ref_dir / name)
        except Exception as exc:  # missing or torn
            out.append(f"{name}{what} does not read: {type(exc).__name__}: {exc}")
            return
        if not (a.equals(b) if isinstance(a, pd.DataFrame) else a == b):
            out.append(f"{name}{what} differs from the uninterrupted run's")

    def weights(checkpoints: Path) -> dict[str, bytes]:
        latest = checkpoints / (checkpoints / "latest").read_text().strip()
        return {k: v.numpy().tobytes() for k, v in load_file(str(latest / "head.safetensors")).items()}

    def result(path: Path) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(path.read_text())
        doc.pop("timings")
        return doc

    def examples(path: Path) -> dict[str, bytes]:
        with np.load(path) as arrays:
            return {k: arrays[k].tobytes() for k in arrays.files}

    def report_md(path: Path) -> str:  # the appendix holds the timings
        return path.read_text().split("## Runs")[0]

    for task in HEAD_DATASETS:
        same(f"{task}/train_log.csv", lambda p: p.read_text())
        same(f"{task}/checkpoints", weights, " (the final head weights)")
        same(f"{task}/result.json", result)
        same(f"{task}/overlays.npz", examples)
    for folder in ("", *HEAD_DATASETS):
        prefix = f"{folder}/" if folder else ""
        same(f"{prefix}report.json", lambda p: json.loads(p.read_text()))
        same(f"{prefix}results.parquet", pd.read_parquet)
        same(f"{prefix}report.md", report_md)
    return out


def summary(trials: list[Trial]) -> list[dict[str, Any]]:
    """Per stage: trials, kills that fired, survivors and the survival rate."""
    rows = []
    for stage in STAGES:
        mine = [t for t in trials if t.stage == stage]
        if mine:
            ok = sum(t.survived for t in mine)
            rows.append({"stage": stage, "trials": len(mine), "killed": sum(t.killed for t in mine),
                         "survived": ok, "rate": round(ok / len(mine), 3)})
    return rows


def as_dict(t: Trial) -> dict[str, Any]:
    """JSON-ready form of a trial."""
    return dataclasses.asdict(t)
