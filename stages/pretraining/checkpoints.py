"""Pretraining checkpoints on the shared stack (stages.training.checkpoints): model.safetensors (the student,
loadable by `model.load_checkpoint`) and distill.safetensors (the distillation head), state.pt, config.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from model import load_checkpoint
from model.pretraining import PretrainModule
from stages.pretraining.config import RUNTIME_FIELDS, STAGE_VERSION
from stages.training import checkpoints as ckpt_io

MODEL_FILE, DISTILL_FILE = "model.safetensors", "distill.safetensors"


def save_checkpoint(run_dir: Path, step: int, module: PretrainModule, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, resolved: dict[str, Any], keep: int) -> Path:
    """Write checkpoints/step_<step>/ (model.safetensors, distill.safetensors, state.pt, config.json), then
    point checkpoints/latest at it (the commit point), and drop all but the newest `keep`."""
    meta = {"step": str(step), "student_weights": resolved["student_weights"],
            "teacher_weights": resolved["teacher_weights"], "model": resolved["model_config"]["name"],
            "preprocessing": json.dumps(resolved["preprocessing"], sort_keys=True)}
    return ckpt_io.save_training_checkpoint(
        run_dir, step, {MODEL_FILE: module.student, DISTILL_FILE: module.head}, meta, optimizer, scheduler, resolved,
        keep, rng=ckpt_io.rng_state(), extra_state={"stage_version": STAGE_VERSION})


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The committed checkpoint the `latest` pointer names, or None."""
    return ckpt_io.latest_checkpoint(run_dir, ckpt_io.STATE_FILE)


def load_training_state(ckpt: Path, module: PretrainModule, optimizer: torch.optim.Optimizer,
                        scheduler: torch.optim.lr_scheduler.LRScheduler) -> int:
    """Restore model, head, optimizer, scheduler and RNG from a checkpoint folder; returns the next step."""
    device = next(module.parameters()).device
    load_checkpoint(module.student, ckpt / MODEL_FILE, strict=True)
    module.head.load_state_dict(load_file(str(ckpt / DISTILL_FILE), device=str(device)))
    return ckpt_io.restore_training_state(ckpt_io.read_training_state(ckpt), optimizer, scheduler)


def config_diff(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Fields that differ between a saved config and the current one (compared as JSON), runtime ones aside."""
    current = json.loads(json.dumps(current))
    return sorted(k for k in set(saved) | set(current)
                  if k not in RUNTIME_FIELDS and saved.get(k) != current.get(k))


def checkpoint_to_resume(run_dir: Path, config: dict[str, Any], resume: bool) -> Path | None:
    """The checkpoint a run in ``run_dir`` continues from: the latest one when ``resume`` (its saved config must
    match ``config`` but for runtime fields), None for a fresh run; a fresh run refuses a folder that already holds
    one."""
    ckpt = latest_checkpoint(run_dir)
    if not resume:
        if ckpt is not None:
            raise FileExistsError(f"{run_dir} already holds a run; pass resume=True to continue it or use a new "
                                  "out_dir.")
        return None
    if ckpt is not None:
        saved = json.loads((ckpt / "config.json").read_text())["config"]
        diff = config_diff(saved, config)
        if diff:
            raise ValueError(f"Cannot resume {run_dir}: the config differs from the checkpoint's in {diff}; "
                             "resume with the saved config (checkpoints/latest/config.json) or use a new out_dir.")
    return ckpt
