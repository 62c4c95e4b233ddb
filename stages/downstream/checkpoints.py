"""Head checkpoints: weights as safetensors (self-describing: task and head options in the metadata), optimizer,
scheduler and RNG state in state.pt (read with weights_only=True), a `latest` pointer as the commit point."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from infra.errors import InputError
from model.heads import head_from_hparams
from model.safeload import torch_load
from stages.checkpoint_dir import latest_checkpoint_dir, save_checkpoint_dir

HEAD_FILE = "head.safetensors"
STATE_FILE = "state.pt"
CONFIG_FILE = "config.json"


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
    tensors = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    rng = {"torch": torch.get_rng_state(),
           "cuda": [s.cpu() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else []}

    def write(folder: Path) -> None:
        save_file(tensors, str(folder / HEAD_FILE), metadata=meta)
        torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "rng": rng}, folder / STATE_FILE)
        (folder / CONFIG_FILE).write_text(json.dumps({**resolved, "step": step}, indent=2))

    return save_checkpoint_dir(run_dir, step, write, keep)


def latest_head_checkpoint(run_dir: Path) -> Path | None:
    """The committed checkpoint directory that `latest` names, or None."""
    found = latest_checkpoint_dir(run_dir)
    if found is None:
        return None
    pointer, path = found
    if not (path / HEAD_FILE).is_file():
        raise InputError(pointer, "latest", f"names {path.name}, which has no {HEAD_FILE}",
                         "delete the checkpoints folder to start over, or restore the named checkpoint")
    return path


def read_training_state(checkpoint: Path) -> dict[str, Any]:
    """Optimizer, scheduler, RNG state and step of a checkpoint directory."""
    state: dict[str, Any] = torch_load(checkpoint / STATE_FILE)
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Put back the RNG state saved with a checkpoint (dropout streams continue where they stopped)."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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
    head = head_from_hparams(meta["task"], json.loads(meta["head_hparams"]))
    result = head.load_state_dict(load_file(str(file)), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise InputError(file, "state_dict", f"missing {result.missing_keys}, unexpected {result.unexpected_keys}",
                         "load the checkpoint with the code version that wrote it")
    return head.eval(), meta
