"""The shared training stack: device selection, the warm-up + cosine schedule, the optimisation step, training
checkpoints that resume a run exactly."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from base.errors import InputError
from stages.training.checkpoints import (
    latest_checkpoint,
    read_training_state,
    restore_training_state,
    rng_state,
    save_training_checkpoint,
)
from stages.training.device import autocast, resolve_device
from stages.training.loop import batch_indices, checkpoint_due, optimizer_step
from stages.training.optim import adamw, lr_factor, warmup_cosine


@dataclass(frozen=True)
class Schedule:
    steps: int = 20
    warmup_steps: int = 4
    lr: float = 1e-2
    min_lr: float = 1e-4


def test_devices_resolve_and_refuse_what_is_not_there() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="PretrainConfig.device must be one of"):
        resolve_device("gpu", field="PretrainConfig.device")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="HeadTrainConfig.device is 'cuda'"):
            resolve_device("cuda", field="HeadTrainConfig.device")
    with autocast(torch.device("cpu")):  # fp32 on the CPU
        assert not torch.is_autocast_enabled("cpu") and not torch.is_autocast_enabled("cuda")


def test_schedule_warms_up_then_decays_to_min_lr() -> None:
    config = Schedule()
    lrs = [config.lr * lr_factor(s, config) for s in range(config.steps + 5)]
    assert lrs[0] == pytest.approx(config.lr / 4) and lrs[3] == pytest.approx(config.lr)
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:], strict=False))
    assert lrs[config.steps] == pytest.approx(config.min_lr) and lrs[-1] == pytest.approx(config.min_lr)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Dropout(0.5), nn.Linear(8, 1))


def _train(model: nn.Module, steps: range, optimizer: torch.optim.Optimizer,
           scheduler: torch.optim.lr_scheduler.LRScheduler) -> list[float]:
    data = torch.arange(64, dtype=torch.float32).reshape(16, 4) / 64
    losses = []
    for step in steps:
        batch = data[batch_indices(step, len(data), 4, seed=3)]
        loss = (model(batch) - batch.sum(1, keepdim=True)).pow(2).mean()
        norm, lr = optimizer_step(loss, model, optimizer, scheduler, grad_clip=1.0)
        assert norm is not None and lr == pytest.approx(optimizer.defaults["lr"] * lr_factor(step, Schedule()))
        losses.append(float(loss.detach()))
    return losses


def test_a_checkpoint_resumes_the_run_bit_for_bit(tmp_path: Path) -> None:
    config = Schedule()
    straight = _model()
    opt = adamw(straight, config.lr, 0.05, torch.device("cpu"))
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]  # no decay on biases and norm scales
    full = _train(straight, range(10), opt, warmup_cosine(opt, config))

    model = _model()
    opt = adamw(model, config.lr, 0.05, torch.device("cpu"))
    sched = warmup_cosine(opt, config)
    first = _train(model, range(6), opt, sched)
    assert checkpoint_due(6, 3, 10) and not checkpoint_due(7, 3, 10) and checkpoint_due(10, 3, 10)
    folder = save_training_checkpoint(tmp_path, 6, {"model.safetensors": model}, {"step": "6"}, opt, sched,
                                      {"run": "x"}, keep=2, rng=rng_state(), extra_state={"stage_version": "1"})
    assert latest_checkpoint(tmp_path, "model.safetensors") == folder
    with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
        assert handle.metadata() == {"step": "6"}
    assert json.loads((folder / "config.json").read_text()) == {"run": "x"}
    _ = (torch.rand(3), np.random.rand())  # disturb the generators: the checkpoint restores them

    resumed = _model()
    opt = adamw(resumed, config.lr, 0.05, torch.device("cpu"))
    sched = warmup_cosine(opt, config)
    resumed.load_state_dict(load_file(str(folder / "model.safetensors")))
    state = read_training_state(folder)
    assert state["stage_version"] == "1" and set(state["rng"]) == {"torch", "cuda", "numpy", "python"}
    start = restore_training_state(state, opt, sched)
    rest = _train(resumed, range(start, 10), opt, sched)
    assert first + rest == full
    for a, b in zip(resumed.parameters(), straight.parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_latest_pointer_to_a_broken_folder_names_the_fix(tmp_path: Path) -> None:
    (tmp_path / "checkpoints" / "step_0000002").mkdir(parents=True)
    (tmp_path / "checkpoints" / "latest").write_text("step_0000002")
    with pytest.raises(InputError, match="has no head.safetensors"):
        latest_checkpoint(tmp_path, "head.safetensors")
    assert latest_checkpoint(tmp_path / "elsewhere", "head.safetensors") is None
    assert set(rng_state(numpy_and_python=False)) == {"torch", "cuda"}
