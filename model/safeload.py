"""Loading torch-pickled files without ever running code from them.

``torch.load(..., weights_only=True)`` refuses any object beyond tensors and plain containers; this wraps it so the
refusal says what the file asked for and how to fix the file, instead of suggesting to load it unsafely.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch

from base.errors import InputError


class UnsafeCheckpointError(InputError):
    """A checkpoint that needs arbitrary Python objects to load: refused, never unpickled."""


def torch_load(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load`` with ``weights_only=True``; a pickle that needs more than tensors and plain containers
    raises UnsafeCheckpointError naming the file, what it needs and the fix."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        needs = f"the Python object '{found.group(1)}'" if found else "Python objects beyond tensors"
        raise UnsafeCheckpointError(
            path, "<pickle>",
            f"refused: loading it needs {needs}, which torch.load(weights_only=True) will not unpickle (that would "
            "run code from the file)",
            "from a trusted environment, re-save only the tensors, e.g. torch.save(model.state_dict(), path) or "
            "safetensors.torch.save_file(state_dict, path); never load untrusted files with weights_only=False",
        ) from None
