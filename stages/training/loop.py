"""Pieces of a training loop shared by the stages: seeded batch order and one optimisation step."""

from __future__ import annotations

import torch
from torch import nn


def batch_indices(step: int, n: int, batch_size: int, seed: int) -> list[int]:
    """Sample indices of `step`'s batch: consecutive slices of one seeded permutation of `n` items per epoch (a
    function of the seed and the step, so a resumed run draws the batches an uninterrupted one would)."""
    out = []
    for k in range(step * batch_size, (step + 1) * batch_size):
        epoch, pos = divmod(k, n)
        gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        out.append(int(torch.randperm(n, generator=gen)[pos]))
    return out


def optimizer_step(loss: torch.Tensor, module: nn.Module, optimizer: torch.optim.Optimizer,
                   scheduler: torch.optim.lr_scheduler.LRScheduler, grad_clip: float
                   ) -> tuple[torch.Tensor | None, float]:
    """Backward, clip the gradient norm to `grad_clip` (none when 0), step optimizer and schedule; returns the
    gradient norm before clipping (None without clipping) and the lr the step used."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(module.parameters(), grad_clip) if grad_clip > 0 else None
    lr = float(optimizer.param_groups[0]["lr"])
    optimizer.step()
    scheduler.step()
    return grad_norm, lr


def checkpoint_due(done: int, every: int, end: int) -> bool:
    """Whether a checkpoint is written after `done` steps: every `every` steps and at the end."""
    return done % every == 0 or done == end
