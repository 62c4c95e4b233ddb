"""Restartable checkpoint folders shared by the training stages (pretraining, task heads).

Each checkpoint is written to a temporary folder, renamed to ``checkpoints/step_<N>``, then the ``latest`` pointer
file is replaced (the commit point), and all but the newest ``keep`` are dropped. A killed writer leaves at most a
stale temporary folder or a half-dropped old checkpoint, which the next save or a resume (`prune_checkpoints`)
removes; a reader follows ``latest`` and never sees half a checkpoint.

A training checkpoint holds weights as safetensors (with string metadata), ``state.pt`` (step, optimizer,
scheduler, RNG states: plain types and tensors only, read back with weights_only=True) and ``config.json``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from base.errors import InputError
from model.safeload import torch_load

STATE_FILE = "state.pt"
CONFIG_FILE = "config.json"


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


def latest_checkpoint(run_dir: Path, required: str) -> Path | None:
    """The committed checkpoint folder ``latest`` names, or None; an InputError when it lacks `required`."""
    found = latest_checkpoint_dir(run_dir)
    if found is None:
        return None
    pointer, path = found
    if not (path / required).is_file():
        raise InputError(pointer, "latest", f"names {path.name}, which has no {required}",
                         "delete the checkpoints folder to start over, or point latest at an intact step_* folder")
    return path


def state_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """A module's state dict as contiguous CPU tensors (what safetensors stores)."""
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def rng_state(numpy_and_python: bool = True) -> dict[str, Any]:
    """Global RNG states as tensors and plain types (loadable with weights_only=True): torch and CUDA, and unless
    told otherwise numpy's and Python's."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "cuda": [s.cpu() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
    }
    if numpy_and_python:
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        version, py_state, gauss = random.getstate()
        state["numpy"] = {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                          "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)}
        state["python"] = {"version": int(version), "state": torch.tensor(py_state, dtype=torch.int64),
                           "gauss": gauss}
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of `rng_state` (restores the generators the state holds)."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        n = state["numpy"]
        np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    if "python" in state:
        p = state["python"]
        random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss"]))


def save_training_checkpoint(run_dir: Path, step: int, weights: Mapping[str, nn.Module], metadata: Mapping[str, str],
                             optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
                             config: Mapping[str, Any], keep: int, *, rng: dict[str, Any],
                             extra_state: Mapping[str, Any] | None = None) -> Path:
    """Write checkpoints/step_<step>/ with one safetensors file per entry of `weights` (file name -> module, each
    with `metadata`), state.pt (step, optimizer, scheduler, `rng`, `extra_state`) and config.json (`config`);
    commit it and keep the newest `keep`."""
    tensors = {name: state_tensors(module) for name, module in weights.items()}

    def write(folder: Path) -> None:
        for name, values in tensors.items():
            save_file(values, str(folder / name), metadata=dict(metadata))
        torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "rng": rng, **(extra_state or {})}, folder / STATE_FILE)
        (folder / CONFIG_FILE).write_text(json.dumps(dict(config), indent=2, default=str))

    return save_checkpoint_dir(run_dir, step, write, keep)


def read_training_state(checkpoint: Path) -> dict[str, Any]:
    """state.pt of a checkpoint folder: step, optimizer, scheduler and RNG state (weights_only load)."""
    state: dict[str, Any] = torch_load(checkpoint / STATE_FILE)
    return state


def restore_training_state(state: dict[str, Any], optimizer: torch.optim.Optimizer,
                           scheduler: torch.optim.lr_scheduler.LRScheduler) -> int:
    """Put back optimizer, scheduler and RNG state read by `read_training_state`; returns the next step."""
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return int(state["step"])
