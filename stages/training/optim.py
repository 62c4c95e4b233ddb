"""AdamW with weight decay on matrices only, and the linear warm-up + cosine decay schedule every run uses."""

from __future__ import annotations

import math
from typing import Any, Protocol

import torch
from torch import nn


class ScheduleConfig(Protocol):
    """The fields of a run's config that decide its learning rate."""

    @property
    def steps(self) -> int: ...

    @property
    def warmup_steps(self) -> int: ...

    @property
    def lr(self) -> float: ...

    @property
    def min_lr(self) -> float: ...


def lr_factor(step: int, config: ScheduleConfig) -> float:
    """Linear warm-up to `lr` over `warmup_steps`, then cosine decay to `min_lr` at `steps` (as a factor of lr)."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = min((step - config.warmup_steps) / max(config.steps - config.warmup_steps, 1), 1.0)
    lr = config.min_lr + (config.lr - config.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
    return lr / config.lr


def param_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on matrices and kernels, none on 1-D parameters (biases, norm scales)."""
    params = [p for _, p in sorted(module.named_parameters()) if p.requires_grad]
    return [{"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]


def adamw(module: nn.Module, lr: float, weight_decay: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW over `module`'s trainable parameters (`param_groups`), fused on CUDA."""
    return torch.optim.AdamW(param_groups(module, weight_decay), lr=lr, betas=(0.9, 0.999),
                             fused=True if device.type == "cuda" else None)


def warmup_cosine(optimizer: torch.optim.Optimizer, config: ScheduleConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """The schedule of `lr_factor` (a plain function: the scheduler's saved state holds no callable)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, config))


def rescale_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    """Set every group's lr to its initial lr times `factor` (a resumed run with a longer horizon continues on its
    new schedule)."""
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * factor
