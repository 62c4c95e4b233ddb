"""Checkpoint inspection reads names, shapes and dtypes without running anything from the file: safetensors from
the header, torch zip files through an unpickler that imports nothing, legacy files with weights_only."""

from __future__ import annotations

import hashlib
import io
import struct
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from base.errors import InputError
from model import create_model
from model.inspect import inspect_checkpoint
from model.registry import fitting_layouts, list_models
from model.safeload import UnsafeCheckpointError


def _expected(state: dict[str, torch.Tensor]) -> list[tuple[str, tuple[int, ...], str]]:
    return [(k, tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in state.items()]


@pytest.fixture(scope="module")
def tiny_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {k: v.clone().contiguous() for k, v in create_model("tiny").state_dict().items()}


@pytest.mark.parametrize("kind", ["safetensors", "zip", "legacy"])
def test_a_saved_tiny_model_is_described_and_fits_the_tiny_layout(tmp_path: Path, tiny_state: dict, kind: str
                                                                  ) -> None:
    path = tmp_path / ("w.safetensors" if kind == "safetensors" else "w.pth")
    if kind == "safetensors":
        save_file(tiny_state, str(path), metadata={"format": "pt", "note": "random-init"})
    else:
        torch.save(tiny_state, path, _use_new_zipfile_serialization=kind == "zip")
    info = inspect_checkpoint(path)
    assert info.format == {"safetensors": "safetensors", "zip": "torch-zip", "legacy": "torch-legacy"}[kind]
    assert info.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert info.size_bytes == path.stat().st_size
    got = sorted((t.name, t.shape, t.dtype) for t in info.tensors)
    assert got == sorted(_expected(tiny_state))
    assert info.parameters == sum(v.numel() for v in tiny_state.values())
    assert info.dtypes == {"float32": len(tiny_state)}
    assert info.layouts == ("tiny",)
    if kind == "safetensors":
        assert info.metadata == {"format": "pt", "note": "random-init"}
    assert info.as_dict()["tensor_count"] == len(tiny_state)


def test_a_nested_training_checkpoint_names_where_its_state_dict_sits(tmp_path: Path, tiny_state: dict) -> None:
    path = tmp_path / "ckpt.pt"
    state = dict(tiny_state)
    state["mask_decoder.extra"] = torch.zeros(3, dtype=torch.bfloat16)  # one key too many: no layout fits
    torch.save({"model": tiny_state, "optimizer_step": 7, "head": state}, path)
    info = inspect_checkpoint(path)
    assert info.state_prefix == "head." and info.layouts == ()  # the largest inner state dict is taken
    assert info.other == {"optimizer_step": "int"}
    assert ("head.mask_decoder.extra", (3,), "bfloat16") in {(t.name, t.shape, t.dtype) for t in info.tensors}
    torch.save({"model": tiny_state, "optimizer_step": 7}, path)
    info = inspect_checkpoint(path)
    assert info.state_prefix == "model." and info.layouts == ("tiny",)


def test_layouts_are_matched_over_the_whole_registry_by_shape(tiny_state: dict) -> None:
    shapes = {k: tuple(v.shape) for k, v in tiny_state.items()}
    assert fitting_layouts(shapes) == ["tiny"]
    assert set(list_models()) > {"tiny"}  # the others were tried and do not fit
    key = next(k for k, s in shapes.items() if len(s) == 2 and "rel_pos" not in k)
    assert fitting_layouts({**shapes, key: (shapes[key][0] + 1, shapes[key][1])}) == []
    assert fitting_layouts({k: s for k, s in shapes.items() if k != key}) == []


class _Payload:
    """Unpickling this object would create a file: proof that the checkpoint's code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (Path.write_text, (str(self.marker), "ran"))  # type: ignore[return-value]


def test_a_malicious_pickle_is_refused_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "ran.txt"
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(2), "x": _Payload(marker)}, path)
    with pytest.raises(UnsafeCheckpointError, match="refused: the pickle asks for the Python object"):
        inspect_checkpoint(path)
    # a hand-made archive whose data.pkl calls os.system
    shell = tmp_path / "shell.pt"
    command = f"touch {marker}"
    with zipfile.ZipFile(shell, "w") as zf:
        zf.writestr("shell/data.pkl", b"cos\nsystem\n(V" + command.encode() + b"\ntR.")
        zf.writestr("shell/version", "3\n")
    with pytest.raises(UnsafeCheckpointError, match="os.system"):
        inspect_checkpoint(shell)
    assert not marker.exists()


def test_a_damaged_safetensors_header_names_the_field(tmp_path: Path, tiny_state: dict) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", 10**9) + b"{}")
    with pytest.raises(InputError, match="header claims"):
        inspect_checkpoint(path)
    good = io.BytesIO()
    save_file({"a": torch.zeros(4)}, str(tmp_path / "good.safetensors"))
    data = (tmp_path / "good.safetensors").read_bytes()
    good.write(data[:-8])  # the tensor's data cut short
    path.write_bytes(good.getvalue())
    with pytest.raises(InputError, match="'a'.*outside"):
        inspect_checkpoint(path)
