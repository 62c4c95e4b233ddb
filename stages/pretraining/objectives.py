"""Pretraining objectives, registered by name: what `PretrainConfig.objective` selects. Each trains a run folder
with the shared stack (stages.training: AdamW, warmup-cosine, checkpoints, resume) under the same runtime (one
process or DDP under torchrun), and returns a PretrainResult.

Registered: ``hypervision`` (stages.pretraining.trainer) and ``mae_spatial`` / ``mae_spectral``
(stages.pretraining.mae).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from base.registry import Registry
from stages.pretraining.config import PretrainConfig, PretrainResult
from stages.pretraining.runtime import Runtime

OnCheckpoint = Callable[[int, Path], None]
"""Called on the main rank after each committed checkpoint with (step, checkpoint folder)."""
TrainFn = Callable[[PretrainConfig, Runtime, bool, int | None, OnCheckpoint | None], PretrainResult]
"""(config, runtime, resume, until_step, on_checkpoint) -> result."""


@dataclass(frozen=True)
class Objective:
    """One pretraining objective: its trainer and what its inputs are."""

    name: str
    train: TrainFn
    needs_masks: bool
    """Whether it trains on the fused pseudo-masks (else on every pretraining image's pixels)."""
    uses_contract: bool
    """Whether its crops are prepared under `PretrainConfig.preprocessing` (a model.preprocess contract the
    downstream stages keep); else the objective scales its inputs itself and records how."""
    description: str


OBJECTIVES: Registry[Objective] = Registry("pretraining objective")


def register_objective(objective: Objective) -> Objective:
    """Add an objective (called by the module that defines its trainer)."""
    return OBJECTIVES.add(objective.name, objective)
