"""Where a training process runs: device, rank and world size; bf16 autocast on CUDA; the torchrun process group."""

from __future__ import annotations

import os
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from stages.training.device import autocast, resolve_device


@dataclass(frozen=True)
class Runtime:
    """Where this process runs: device, rank and world size (1 without torchrun)."""

    device: torch.device
    rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def autocast(self) -> AbstractContextManager[Any]:
        """bf16 autocast on CUDA; fp32 on the CPU."""
        return autocast(self.device)


def setup_runtime(device: str, collective_timeout_s: float = 600.0) -> Runtime:
    """Pick the device (this rank's GPU under torchrun) and, under torchrun (WORLD_SIZE > 1), join the process
    group (NCCL on CUDA, else gloo) with `collective_timeout_s` as its timeout."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, index=local, field="PretrainConfig.device")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if world > 1 and not dist.is_initialized():
        _join_process_group("nccl" if dev.type == "cuda" else "gloo", timedelta(seconds=collective_timeout_s))
    return Runtime(dev, rank, world)


def _join_process_group(backend: str, timeout: timedelta) -> None:
    """Join torchrun's process group through its store, under a key prefix of this restart round.

    torchrun's agent keeps one store for all rounds: after a rank dies and the ranks restart, the addresses the
    dead round's ranks published are still there under the same keys, and a restarted rank that reads one before
    its peer has overwritten it dials a dead address until the timeout (seen as a hang in setup). A prefix per
    round (TORCHELASTIC_RESTART_COUNT) gives each round keys of its own."""
    store, rank, world = next(dist.rendezvous("env://", timeout=timeout))
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group(backend=backend, store=dist.PrefixStore(f"hvp/round{restart}", store), rank=rank,
                            world_size=world, timeout=timeout)
