"""Restartable checkpoints: model and head as safetensors, optimizer/scheduler/RNG state read with weights_only=True."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from model import load_checkpoint
from model.pretraining import PretrainModule
from model.safeload import torch_load
from stages.checkpoint_dir import latest_checkpoint_dir, save_checkpoint_dir
from stages.pretraining.config import RUNTIME_FIELDS, STAGE_VERSION


def rng_state() -> dict[str, Any]:
    """Global RNG states as tensors and plain types (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": [s.cpu() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": {"version": int(version), "state": torch.tensor(py_state, dtype=torch.int64), "gauss": gauss},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of `rng_state`."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss"]))


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def save_checkpoint(run_dir: Path, step: int, module: PretrainModule, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, resolved: dict[str, Any], keep: int) -> Path:
    """Write checkpoints/step_<step>/ (model.safetensors, distill.safetensors, state.pt, config.json), then
    point checkpoints/latest at it (the commit point), and drop all but the newest `keep`."""
    meta = {"step": str(step), "student_weights": resolved["student_weights"],
            "teacher_weights": resolved["teacher_weights"], "model": resolved["model_config"]["name"],
            "preprocessing": json.dumps(resolved["preprocessing"], sort_keys=True)}

    def write(folder: Path) -> None:
        save_file(_tensors(module.student), str(folder / "model.safetensors"), metadata=meta)
        save_file(_tensors(module.head), str(folder / "distill.safetensors"), metadata=meta)
        torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "rng": rng_state(), "stage_version": STAGE_VERSION}, folder / "state.pt")
        (folder / "config.json").write_text(json.dumps(resolved, indent=2, default=str))

    return save_checkpoint_dir(run_dir, step, write, keep)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The committed checkpoint the `latest` pointer names, or None."""
    found = latest_checkpoint_dir(run_dir)
    if found is None:
        return None
    pointer, path = found
    if not (path / "state.pt").is_file():
        raise FileNotFoundError(f"{pointer} names {path}, which has no state.pt; delete the pointer to restart, "
                                "or point it at an intact step_* folder.")
    return path


def load_training_state(ckpt: Path, module: PretrainModule, optimizer: torch.optim.Optimizer,
                        scheduler: torch.optim.lr_scheduler.LRScheduler) -> int:
    """Restore model, head, optimizer, scheduler and RNG from a checkpoint folder; returns the next step."""
    device = next(module.parameters()).device
    load_checkpoint(module.student, ckpt / "model.safetensors", strict=True)
    module.head.load_state_dict(load_file(str(ckpt / "distill.safetensors"), device=str(device)))
    state = torch_load(ckpt / "state.pt")
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return int(state["step"])


def config_diff(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Fields that differ between a saved config and the current one (compared as JSON), runtime ones aside."""
    current = json.loads(json.dumps(current))
    return sorted(k for k in set(saved) | set(current)
                  if k not in RUNTIME_FIELDS and saved.get(k) != current.get(k))


