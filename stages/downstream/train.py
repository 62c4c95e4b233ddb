"""Head-only training on frozen features, on the shared training stack (stages.training): AdamW, linear warm-up then
cosine decay, periodic checkpoints, resume.

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
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from base.errors import InputError
from model.heads import count_trainable_parameters
from stages.downstream.checkpoints import latest_head_checkpoint, load_head, save_head_checkpoint
from stages.downstream.losses import HeadLoss
from stages.downstream.spec import HeadTrainConfig
from stages.training.checkpoints import CONFIG_FILE, prune_checkpoints, read_training_state, restore_training_state
from stages.training.device import autocast, resolve_device
from stages.training.loop import batch_indices, checkpoint_due, optimizer_step
from stages.training.optim import adamw, lr_factor, rescale_lr, warmup_cosine

logger = logging.getLogger(__name__)

LOG_FILE = "train_log.csv"


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
    task: HeadLoss,
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
    device = resolve_device(config.device, field="HeadTrainConfig.device")
    head.to(device).train()
    resolved = {"task": dataclasses.asdict(task),  # type: ignore[call-overload]
                "head": getattr(head, "hparams", {}), "train": dataclasses.asdict(config), "weights": weights,
                "preprocessing": preprocessing, "trainable_parameters": count_trainable_parameters(head)}
    logger.info("%s head: %d trainable parameters; backbone weights %s", task.name,
                resolved["trainable_parameters"], weights)
    optimizer = adamw(head, config.lr, config.weight_decay, device)
    scheduler = warmup_cosine(optimizer, config)
    start = 0
    latest = latest_head_checkpoint(run_dir) if resume else None
    if latest is not None:
        prune_checkpoints(run_dir, config.keep_checkpoints)
        _check_resume(latest, resolved)
        restored, _ = load_head(latest)
        head.load_state_dict(restored.state_dict())
        start = restore_training_state(read_training_state(latest), optimizer, scheduler)
        rescale_lr(optimizer, lr_factor(start, config))  # a longer run continues on its own (new) cosine horizon
    else:
        torch.manual_seed(config.seed)
    resumed_from = start
    losses: list[float] = []
    rows: list[tuple[int, float, float]] = []
    checkpoint = latest
    for step in range(start, config.steps):
        batch = [samples[i] for i in batch_indices(step, len(samples), config.batch_size, config.seed)]
        with autocast(device):
            loss = task.loss(head, batch, device)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"train_head: {task.name} loss is {loss.item()} at step {step}; lower the lr "
                                     f"(now {config.lr}) or check the labels.")
        _, lr = optimizer_step(loss, head, optimizer, scheduler, config.grad_clip)
        losses.append(float(loss.item()))
        rows.append((step, losses[-1], lr))
        if on_step is not None:
            on_step(step, losses[-1])
        if checkpoint_due(step + 1, config.checkpoint_every, config.steps):
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
