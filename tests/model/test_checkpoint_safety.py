"""Hostile checkpoints: a pickle that needs more than tensors is refused without running, with the fix; a checkpoint
of the wrong shapes names every key that does not fit, with both shapes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from base.errors import InputError
from model import create_model, load_checkpoint
from model.hyperfree import read_state_dict
from model.safeload import UnsafeCheckpointError, torch_load
from stages.labelling.sam2_models import SAM2CheckpointError
from stages.labelling.sam2_models import load_checkpoint as load_sam2


class _Payload:
    """Unpickling this object would create a file: proof that the checkpoint's code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (Path.write_text, (str(self.marker), "ran"))  # type: ignore[return-value]


def _hostile(tmp_path: Path, blob_of: object) -> Path:
    path = tmp_path / "weights.pt"
    torch.save(blob_of, path)
    return path


def test_a_pickle_needing_more_than_tensors_is_refused_with_the_fix(tmp_path: Path) -> None:
    marker = tmp_path / "ran.txt"
    path = _hostile(tmp_path, {"w": torch.zeros(2), "x": _Payload(marker)})
    for load in (torch_load, read_state_dict):
        with pytest.raises(UnsafeCheckpointError) as err:
            load(path)
        message = str(err.value)
        assert str(path) in message and "refused" in message and "state_dict" in message
        assert "weights_only=False" in message and "never" in message  # the fix, not the unsafe workaround
    with pytest.raises(SAM2CheckpointError, match="refused"):
        load_sam2(nn.Linear(2, 2), _hostile(tmp_path, {"model": _Payload(marker)}))
    assert not marker.exists()
    assert torch_load(_hostile(tmp_path, {"w": torch.ones(3)}))["w"].sum() == 3  # plain tensors load


def test_wrong_shapes_list_every_key_with_both_shapes(tmp_path: Path) -> None:
    model = create_model("tiny")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    bad = [k for k, v in state.items() if v.ndim == 2 and "pos_embed" not in k and "rel_pos" not in k][:2]
    for k in bad:
        state[k] = torch.zeros(state[k].shape[0] + 1, state[k].shape[1])
    with pytest.raises(InputError) as err:
        load_checkpoint(create_model("tiny"), state, strict=True)
    for k in bad:
        own = tuple(model.state_dict()[k].shape)
        assert f"{k} (file {(own[0] + 1, own[1])}, model {own})" in str(err.value)
    assert "Fix:" in str(err.value)
    assert set(load_checkpoint(create_model("tiny"), state, strict=False).mismatched) == set(bad)
