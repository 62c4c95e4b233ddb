"""Where training and inference run: the device a ``device`` setting names, and the autocast that goes with it."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

DEVICES = ("auto", "cuda", "cpu")
"""What a ``device`` setting may say: "auto" is CUDA when one is visible, else the CPU."""


def resolve_device(name: str, index: int | None = None, field: str = "device") -> torch.device:
    """The device `name` asks for (CUDA device `index` when given); `field` names the setting in errors."""
    if name not in DEVICES:
        raise ValueError(f"{field} must be one of {DEVICES}, got {name!r}.")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"{field} is 'cuda' but no CUDA device is visible; use 'auto' or 'cpu'.")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", index) if index is not None else torch.device("cuda")


def autocast(device: torch.device) -> AbstractContextManager[Any]:
    """bf16 autocast on CUDA; fp32 (no autocast) on the CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
