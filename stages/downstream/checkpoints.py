"""Head checkpoints on the shared stack (stages.training.checkpoints): weights as head.safetensors (self-describing:
task and head options in the metadata), optimizer, scheduler and torch RNG state in state.pt, config.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from base.errors import InputError
from model.heads import head_from_hparams
from stages.downstream.tasks import TASKS
from stages.training import checkpoints as ckpt_io

HEAD_FILE = "head.safetensors"


def save_head_checkpoint(
    run_dir: Path,
    step: int,
    head: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    resolved: dict[str, Any],
    keep: int,
) -> Path:
    """Write checkpoints/step_<step>/ (head.safetensors, state.pt, config.json), point `latest` at it and keep the
    newest `keep` checkpoints. `resolved` holds task, head, train config and provenance (JSON-friendly)."""
    meta = {"step": str(step), "task": resolved["task"]["name"], "head_hparams": json.dumps(resolved["head"]),
            "weights": resolved["weights"], "preprocessing": resolved["preprocessing"]}
    return ckpt_io.save_training_checkpoint(run_dir, step, {HEAD_FILE: head}, meta, optimizer, scheduler,
                                            {**resolved, "step": step}, keep,
                                            rng=ckpt_io.rng_state(numpy_and_python=False))


def latest_head_checkpoint(run_dir: Path) -> Path | None:
    """The committed checkpoint directory that `latest` names, or None."""
    return ckpt_io.latest_checkpoint(run_dir, HEAD_FILE)


def _head_file(path: Path) -> Path:
    if path.is_file():
        return path
    if (path / HEAD_FILE).is_file():
        return path / HEAD_FILE
    latest = latest_head_checkpoint(path)
    if latest is None:
        raise InputError(path, HEAD_FILE, "no head checkpoint here",
                         "pass a run directory written by train_head, a checkpoint directory or a head.safetensors")
    return latest / HEAD_FILE


def load_head(path: Path) -> tuple[nn.Module, dict[str, str]]:
    """Rebuild a head from a run directory, checkpoint directory or head.safetensors; returns it (eval mode) with
    the file's metadata (task, head_hparams, step, weights, preprocessing). Every key must match."""
    file = _head_file(Path(path))
    with safe_open(str(file), framework="pt") as handle:
        meta = dict(handle.metadata() or {})
    for key in ("task", "head_hparams"):
        if key not in meta:
            raise InputError(file, key, "missing from the safetensors metadata",
                             "load a checkpoint written by stages.downstream.train.train_head")
    head = head_from_hparams(TASKS.get(meta["task"]).head, json.loads(meta["head_hparams"]))
    result = head.load_state_dict(load_file(str(file)), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise InputError(file, "state_dict", f"missing {result.missing_keys}, unexpected {result.unexpected_keys}",
                         "load the checkpoint with the code version that wrote it")
    return head.eval(), meta
