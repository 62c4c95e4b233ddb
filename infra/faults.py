"""Fault injection: ``kill -9`` a stage at a seeded random point, run it again, and check that nothing is damaged.

A *point* is any file-system mutation the stage's process makes (opening a file for writing, each write to it,
rename, remove, mkdir); at the chosen point the process SIGKILLs itself, and a write chosen as the point is cut in
half first (a torn write). The stage then runs again to completion, as a person would after a crash, and the
result must equal a run that was never interrupted:

- ``catalog.verify()`` is healthy, with no temporary left behind;
- every part file reads (no torn rows) and no image or mask set is committed twice;
- the index and every mask set equal the uninterrupted run's (masks complete, byte for byte);
- pretraining resumed from its last committed checkpoint and ends with the uninterrupted run's metrics and
  weights, bit for bit.

The stages run as the CLI's plain path runs them (the same stage functions the flows call). Each killed run is a
child forked from a server process that preloaded the pipeline's modules, so a trial costs the stage's own work.
``tests/faults/`` runs a few points per stage; ``bench/faults.py`` runs 50.
"""

from __future__ import annotations

import builtins
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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

#: The stages under test, in pipeline order (each starts from the previous one's result).
STAGES = ("ingest", "label", "fuse", "pretrain")
#: Fixture datasets the harness ingests (small: every trial re-runs a stage).
DATASETS = ("hot-2024-rednir", "cave")
#: Tiny labeler settings (random-init models, permissive thresholds, few prompts).
LABEL_SETTINGS: dict[str, Any] = {
    "sam2_model": {"config": "configs/sam2.1/sam2.1_hiera_t.yaml", "image_size": 64},
    "spatial_params": {"points_per_side": 2, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0},
    "spectral_params": {"points_per_side": 2, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0, "stride": 7,
                        "max_objects": 2},
    "material_params": {"points_per_side": 2, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0},
}
TAU = 0.7
#: A short pretraining run with a checkpoint every two steps.
PRETRAIN: dict[str, Any] = {"steps": 6, "batch_size": 2, "crop_size": 16, "min_mask_pixels": 2,
                            "checkpoint_every": 2, "device": "cpu"}
PRELOAD = ["infra.faults", "stages.ingest", "stages.labelling.label", "stages.labelling.spatial",
           "stages.labelling.spectral", "stages.labelling.material", "stages.pretraining"]


# ---------------------------------------------------------------------------------------------- the stages
def run_stage(stage: str, catalog: str, run_dir: str, source: str) -> None:
    """Run one stage to completion, as `hvp <stage> --plain` would (idempotent: it does what is left to do)."""
    import torch

    torch.set_num_threads(1)
    if stage == "ingest":
        from catalog.specs import spec_for_folder
        from catalog.store import Catalog
        from stages.ingest import ingest_item, item_for, plan, record_problems

        cat = Catalog(catalog).init()
        work = plan(source, cat)
        record_problems(cat, work.problems)
        for w in work.items:
            spec = spec_for_folder(Path(w.folder))
            assert spec is not None
            ingest_item(cat, spec, item_for(Path(w.folder), spec, w.primary), w.known_sha256)
        cat.compact()
    elif stage == "label":
        from catalog.store import Catalog
        from stages.labelling import label

        cat = Catalog(catalog)
        for labeler in _labelers().values():
            for image_id in label.pending(cat, labeler.labeler_id):
                label.label_image(cat, image_id, labeler)
        cat.mask_store.compact()
    elif stage == "fuse":
        from catalog.store import Catalog
        from stages.labelling import label
        from stages.labelling.fuse import fusion_id

        cat = Catalog(catalog)
        ids = [lab.labeler_id for lab in _labelers().values()]
        for image_id in label.pending(cat, fusion_id(ids, TAU)):
            label.fuse_image(cat, image_id, ids, TAU)
        cat.mask_store.compact()
    elif stage == "pretrain":
        from stages.pretraining import PretrainConfig, train

        train(PretrainConfig.preset("tiny", catalog=catalog, out_dir=run_dir, **PRETRAIN), resume=True)
    else:
        raise ValueError(f"unknown stage {stage!r}: choose from {', '.join(STAGES)}")


@functools.cache
def _labelers() -> dict[str, Any]:
    """The three labelers as LABEL_SETTINGS configure them (built once per process; models load lazily)."""
    from infra.settings import Settings
    from stages.labelling.label import BRANCHES, build_labeler, labeler_config

    settings = Settings(**LABEL_SETTINGS)
    return {b: build_labeler(b, labeler_config(b, settings)) for b in BRANCHES}


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


def _child(stages: tuple[str, ...], catalog: str, run_dir: str, source: str, kill_at: int, count_file: str) -> None:
    """Stages run in a forked child, killed at ``kill_at`` (0: runs to the end and records its point count)."""
    points = _Points(kill_at)
    _install(points)
    for stage in stages:
        run_stage(stage, catalog, run_dir, source)
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
              count_file: str) -> int:
    """Run a stage (or several, in order) in a fresh child killed at ``kill_at`` (0: never); returns the child's
    exit code (-9 when killed)."""
    stages = (stages,) if isinstance(stages, str) else stages
    proc = _context().Process(target=_child, args=(stages, catalog, run_dir, source, kill_at, count_file))
    proc.start()
    proc.join()
    return int(proc.exitcode if proc.exitcode is not None else 1)


# ---------------------------------------------------------------------------------------------- set-up
@dataclass
class Setup:
    """The harness's world: fixture sources, the catalog before each stage and after an uninterrupted run of it
    (the reference), the uninterrupted pretraining run, and how many kill points each stage has."""

    root: str
    source: str
    before: dict[str, str] = field(default_factory=dict)
    after: dict[str, str] = field(default_factory=dict)
    run_dir: str = ""
    points: dict[str, int] = field(default_factory=dict)


def build_setup(root: Path) -> Setup:
    """Write the fixtures and run every stage once, uninterrupted, in a child that counts its points."""
    from catalog.fixtures import write_dataset

    root = Path(root).absolute()
    setup = Setup(root=str(root), source=str(root / "src"))
    for slug in DATASETS:
        write_dataset(slug, root / "src")
    previous = root / "catalog-empty"
    previous.mkdir(parents=True)
    for stage in STAGES:
        after = root / f"catalog-{stage}"
        shutil.copytree(previous, after)
        setup.before[stage], setup.after[stage] = str(previous), str(after)
        run_dir = root / "run-reference"
        count = root / f"points-{stage}.txt"
        code = run_child(stage, str(after), str(run_dir), setup.source, 0, str(count))
        if code != 0:
            raise RuntimeError(f"the uninterrupted {stage} run failed (exit {code}); run it alone to see why")
        setup.points[stage] = int(count.read_text())
        previous = after
    setup.run_dir = str(root / "run-reference")
    return setup


# ---------------------------------------------------------------------------------------------- one trial
@dataclass
class Trial:
    """One kill-and-rerun: where it was killed, whether the kill fired, and every problem found after the rerun."""

    stage: str
    kill_at: int
    points: int
    killed: bool
    problems: list[str]
    resumed_from: int | None = None

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
    code = run_child(stage, str(catalog), str(run_dir), setup.source, kill_at, str(workdir / "count.txt"))
    if code not in (0, -signal.SIGKILL):
        return Trial(stage, kill_at, setup.points[stage], False, [f"the killed run failed on its own (exit {code})"])
    resumed = _latest_step(run_dir) if stage == "pretrain" else None
    problems: list[str] = []
    resumes = _Resumes()
    trainer_log = logging.getLogger("stages.pretraining.trainer")
    level, propagate = trainer_log.level, trainer_log.propagate
    trainer_log.addHandler(resumes)
    trainer_log.setLevel(logging.INFO)
    trainer_log.propagate = False  # heard here, not printed
    try:
        run_stage(stage, str(catalog), str(run_dir), setup.source)
    except Exception as exc:  # the rerun must succeed: its failure is what the trial found
        problems.append(f"the rerun failed: {type(exc).__name__}: {exc}")
    else:
        problems += check(setup, stage, catalog, run_dir)
        if resumed and resumes.steps != [resumed]:
            problems.append(f"the rerun resumed at {resumes.steps or 'no step'}, not at the last checkpoint's "
                            f"step {resumed}")
    finally:
        trainer_log.removeHandler(resumes)
        trainer_log.setLevel(level)
        trainer_log.propagate = propagate
    return Trial(stage, kill_at, setup.points[stage], code == -signal.SIGKILL, problems, resumed)


class _Resumes(logging.Handler):
    """Collects the steps the trainer says it resumed at."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.steps: list[int] = []

    def emit(self, record: logging.LogRecord) -> None:
        if str(record.msg).startswith("Resumed") and isinstance(record.args, tuple):
            self.steps.append(int(str(record.args[1])))


def _latest_step(run_dir: Path) -> int:
    """The step of the run's committed checkpoint (0 without one)."""
    pointer = run_dir / "checkpoints" / "latest"
    return int(pointer.read_text().strip().removeprefix("step_")) if pointer.is_file() else 0


# ---------------------------------------------------------------------------------------------- checks
def check(setup: Setup, stage: str, catalog: Path, run_dir: Path) -> list[str]:
    """Everything wrong with a catalog (and run) after a rerun, compared with the uninterrupted reference."""
    from catalog.masks import MASK_INDEX_SCHEMA
    from catalog.store import INDEX_SCHEMA, Catalog

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
