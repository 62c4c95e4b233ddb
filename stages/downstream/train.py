"""Head-only training on frozen features: AdamW, linear warm-up then cosine decay, periodic checkpoints, resume.

The backbone never enters this loop: samples carry detached features (see samples.py), so no gradient can reach
it. On CUDA the forward pass runs under bf16 autocast; on the CPU it is fp32 and, for a given seed, deterministic
(batch order is a function of the seed and the step, the dropout RNG is saved with every checkpoint), so a run
resumed from a checkpoint ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from infra.errors import InputError
from model.heads import count_trainable_parameters
from stages.checkpoint_dir import prune_checkpoints
from stages.downstream.checkpoints import (
    CONFIG_FILE,
    latest_head_checkpoint,
    load_head,
    read_training_state,
    restore_rng,
    save_head_checkpoint,
)
from stages.downstream.tasks import HeadTask

logger = logging.getLogger(__name__)

LOG_FILE = "train_log.csv"


@dataclass(frozen=True)
class HeadTrainConfig:
    """Optimisation settings of one head run."""

    steps: int = 2000
    batch_size: int = 8
    lr: float = 1e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_steps: int = 100
    grad_clip: float = 1.0
    seed: int = 0
    device: str = "auto"
    """"auto" (CUDA when present), "cuda" or "cpu"."""
    checkpoint_every: int = 500
    keep_checkpoints: int = 2

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.checkpoint_every < 1 or self.keep_checkpoints < 1:
            raise ValueError(f"HeadTrainConfig needs steps, batch_size, checkpoint_every and keep_checkpoints >= 1; "
                             f"got {self}.")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"HeadTrainConfig needs 0 <= min_lr <= lr; got min_lr={self.min_lr}, lr={self.lr}.")
        if self.device not in ("auto", "cuda", "cpu"):
            raise ValueError(f"HeadTrainConfig.device must be 'auto', 'cuda' or 'cpu', got {self.device!r}.")


RESUME_FREE = frozenset({"steps", "device", "checkpoint_every", "keep_checkpoints"})
"""Settings a resumed run may change (a longer `steps` extends the run: the cosine decay continues towards the new
end); any other difference would make the resumed run a different run."""


@dataclass(frozen=True)
class TrainResult:
    """What a training call did."""

    task: str
    steps: int
    resumed_from: int
    losses: tuple[float, ...]
    """Loss of every step run by this call (empty when the run was already complete)."""
    checkpoint: Path
    trainable_parameters: int


def resolve_device(name: str) -> torch.device:
    """The device a head trains on: CUDA for "auto" when present."""
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("HeadTrainConfig.device is 'cuda' but no CUDA device is visible; use 'auto' or 'cpu'.")
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


def autocast(device: torch.device) -> AbstractContextManager[Any]:
    """bf16 autocast on CUDA; fp32 on the CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def lr_factor(step: int, config: HeadTrainConfig) -> float:
    """Linear warm-up over `warmup_steps`, then cosine decay from lr to min_lr at `steps` (a factor of lr)."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = min((step - config.warmup_steps) / max(config.steps - config.warmup_steps, 1), 1.0)
    return (config.min_lr + (config.lr - config.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))) / config.lr


def batch_indices(step: int, n: int, config: HeadTrainConfig) -> list[int]:
    """Sample indices of `step`'s batch: consecutive slices of one seeded permutation per epoch."""
    out = []
    for k in range(step * config.batch_size, (step + 1) * config.batch_size):
        epoch, pos = divmod(k, n)
        gen = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)
        out.append(int(torch.randperm(n, generator=gen)[pos]))
    return out


def param_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay on kernels and matrices, none on biases and norm scales."""
    params = [p for _, p in sorted(module.named_parameters()) if p.requires_grad]
    return [{"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]


def _check_resume(checkpoint: Path, resolved: dict[str, Any]) -> None:
    """Refuse to continue a run whose task, head, provenance or (resume-relevant) settings differ."""
    config = json.loads((checkpoint / CONFIG_FILE).read_text())
    for key in ("task", "head", "weights", "preprocessing"):
        if config.get(key) != resolved[key]:
            raise InputError(checkpoint / CONFIG_FILE, key,
                             f"the run was started with {config.get(key)!r}, this call asks for {resolved[key]!r}",
                             "use a new output directory for a different run, or pass resume=False to start over")
    for key, value in resolved["train"].items():
        if key not in RESUME_FREE and config["train"].get(key) != value:
            raise InputError(checkpoint / CONFIG_FILE, f"train.{key}",
                             f"the run was started with {config['train'].get(key)!r}, this call asks for {value!r}",
                             "use a new output directory for a different run, or pass resume=False to start over")
    logger.info("resuming the %s head from %s (step %s)", config["task"]["name"], checkpoint, config["step"])


def _write_log(run_dir: Path, rows: list[tuple[int, float, float]], start: int) -> None:
    """Rewrite the training log as its rows before `start` (those of the committed checkpoints; later ones are
    from a killed attempt, run again since) followed by `rows`; atomically, so a kill never tears it."""
    path = run_dir / LOG_FILE
    kept: list[list[str]] = []
    if start and path.is_file():
        with path.open() as handle:
            kept = [r for r in list(csv.reader(handle))[1:] if int(r[0]) < start]
    tmp = path.with_name(f".{LOG_FILE}.tmp")
    with tmp.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["step", "loss", "lr"])
        writer.writerows(kept)
        writer.writerows(rows)
    os.replace(tmp, path)


def train_head(
    head: nn.Module,
    task: HeadTask,
    samples: Sequence[Any],
    config: HeadTrainConfig,
    run_dir: Path,
    *,
    weights: str,
    preprocessing: str,
    resume: bool = True,
    on_step: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Train `head` on `samples` (SegmentationSample, SaliencySample or TrackingPair, matching `task`) for
    `config.steps` steps, checkpointing into `run_dir`; continue from its latest checkpoint when `resume`.

    `weights` is the backbone's provenance (a checkpoint sha256 or "random-init") and `preprocessing` the input
    contract's name; both are recorded in every checkpoint. `on_step(step, loss)` is called after each step.
    """
    if not samples:
        raise ValueError(f"train_head: no {task.name} samples to train on; check the dataset split.")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(config.device)
    head.to(device).train()
    resolved = {"task": dataclasses.asdict(task),  # type: ignore[call-overload]
                "head": getattr(head, "hparams", {}), "train": dataclasses.asdict(config), "weights": weights,
                "preprocessing": preprocessing, "trainable_parameters": count_trainable_parameters(head)}
    logger.info("%s head: %d trainable parameters; backbone weights %s", task.name,
                resolved["trainable_parameters"], weights)
    optimizer = torch.optim.AdamW(param_groups(head, config.weight_decay), lr=config.lr,
                                  fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, config))
    start = 0
    latest = latest_head_checkpoint(run_dir) if resume else None
    if latest is not None:
        prune_checkpoints(run_dir, config.keep_checkpoints)
        _check_resume(latest, resolved)
        state = read_training_state(latest)
        restored, _ = load_head(latest)
        head.load_state_dict(restored.state_dict())
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        restore_rng(state["rng"])
        start = int(state["step"])
        for group in optimizer.param_groups:  # a longer run continues on its own (new) cosine horizon
            group["lr"] = group["initial_lr"] * lr_factor(start, config)
    else:
        torch.manual_seed(config.seed)
    resumed_from = start
    losses: list[float] = []
    rows: list[tuple[int, float, float]] = []
    checkpoint = latest
    for step in range(start, config.steps):
        batch = [samples[i] for i in batch_indices(step, len(samples), config)]
        with autocast(device):
            loss = task.loss(head, batch, device)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"train_head: {task.name} loss is {loss.item()} at step {step}; lower the lr "
                                     f"(now {config.lr}) or check the labels.")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(head.parameters(), config.grad_clip)
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        losses.append(float(loss.item()))
        rows.append((step, losses[-1], lr))
        if on_step is not None:
            on_step(step, losses[-1])
        if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps:
            _write_log(run_dir, rows, start)  # first: a committed checkpoint always has its steps logged
            checkpoint = save_head_checkpoint(run_dir, step + 1, head, optimizer, scheduler, resolved,
                                              config.keep_checkpoints)
            start, rows = step + 1, []
    if checkpoint is None:
        raise RuntimeError(f"train_head: nothing was trained or found in {run_dir}.")
    head.eval()
    return TrainResult(task=task.name, steps=config.steps, resumed_from=resumed_from,
                       losses=tuple(losses), checkpoint=checkpoint,
                       trainable_parameters=resolved["trainable_parameters"])
