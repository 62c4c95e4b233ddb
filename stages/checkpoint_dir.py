"""Checkpoint folders shared by the training stages (pretraining, task heads): each checkpoint is written to a
temporary folder, renamed to ``checkpoints/step_<N>``, then the ``latest`` pointer file is replaced (the commit
point), and all but the newest ``keep`` are dropped. A killed writer leaves at most a stale temporary folder or a
half-dropped old checkpoint, which the next save or a resume (`prune_checkpoints`) removes; a reader follows
``latest`` and never sees half a checkpoint."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path


def save_checkpoint_dir(run_dir: Path, step: int, write: Callable[[Path], None], keep: int) -> Path:
    """Create ``run_dir/checkpoints/step_<step>`` from what ``write(folder)`` puts in a fresh temporary folder,
    point ``latest`` at it and keep the newest ``keep`` checkpoints; returns the committed folder."""
    root = run_dir / "checkpoints"
    final = root / f"step_{step:07d}"
    tmp = root / f".tmp-{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    pointer = root / "latest.tmp"
    pointer.write_text(final.name)
    os.replace(pointer, root / "latest")
    prune_checkpoints(run_dir, keep)
    return final


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Drop every checkpoint folder but the newest ``keep`` (never the one ``latest`` names) and the temporaries
    of a killed save. A resume calls it too: a kill while an old checkpoint was being removed leaves part of its
    folder, and a run resumed at its last step saves nothing more that would remove it."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return
    found = latest_checkpoint_dir(run_dir)
    committed = found[1].name if found else None
    for tmp in root.glob(".tmp-step_*"):
        shutil.rmtree(tmp, ignore_errors=True)
    for old in sorted(p for p in root.glob("step_*") if p.is_dir())[:-keep]:
        if old.name != committed:
            shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint_dir(run_dir: Path) -> tuple[Path, Path] | None:
    """``(pointer file, the folder it names)`` of the committed checkpoint, or None when there is none yet."""
    pointer = run_dir / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    return pointer, run_dir / "checkpoints" / pointer.read_text().strip()
