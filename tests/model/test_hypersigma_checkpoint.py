"""Loading pretrained HyperSIGMA encoders: checkpoints the tests save in the released key layout (the release's
`misc.save_model` container, argparse args included), the release's load-time edits, and a report naming every
key. All weights are random-init."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from base.errors import InputError
from model import create_model
from model.hypersigma import HyperSigma
from model.hypersigma.checkpoint import load_pretrained, load_released, read_released
from model.hypersigma.mae import create_mae, encoder_state_dict, released_state_dict
from model.safeload import UnsafeCheckpointError

TINY = "hypersigma_tiny"


def released_file(tmp_path: Path, kind: str, name: str = "ckpt.pth", seed: int = 0, **overrides: object) -> Path:
    """A pretraining checkpoint as the release writes it: {'model', 'optimizer', 'epoch', 'scaler', 'args'}."""
    torch.manual_seed(seed)
    mae = create_mae(TINY, kind, **overrides)  # type: ignore[arg-type]
    path = tmp_path / name
    torch.save({"model": released_state_dict(mae), "optimizer": {"state": {}, "param_groups": []}, "epoch": 1599,
                "scaler": {"scale": 65536.0}, "args": argparse.Namespace(lr=1.5e-4, mask_ratio=0.75)}, path)
    return path


def model(**overrides: object) -> HyperSigma:
    torch.manual_seed(1)
    return create_model(TINY, **overrides).eval()


def test_spatial_checkpoint_loads_with_the_released_edits(tmp_path: Path) -> None:
    path = released_file(tmp_path, "spatial")
    stored = read_released(path)[0]
    net = model()
    report = load_released(net, spatial=path)["spatial"]
    enc = net.spat_encoder.state_dict()
    # The release drops the patch embedding whenever in_chans != 3; sampling offsets are fresh.
    assert set(report.reinitialised) == {k for k in enc if k.startswith("patch_embed.") or "sampling_offsets" in k}
    assert set(report.ignored) == {k for k in stored if k.startswith(("decoder_", "mask_token", "patch_embed."))}
    assert set(report.loaded) == set(enc) - set(report.reinitialised) and not report.resized
    for key in report.loaded:
        assert torch.equal(enc[key], stored[key]), key
    assert "in_chans != 3" in report.reinitialised["patch_embed.proj.weight"]
    assert len(report.sha256) == 64 and "re-initialised 2: the release drops the patch embedding" in report.summary()


def test_without_released_edits_everything_that_fits_loads(tmp_path: Path) -> None:
    path = released_file(tmp_path, "spatial")
    net = model()
    report = load_pretrained(net.spat_encoder, path, released_edits=False)
    assert "patch_embed.proj.weight" in report.loaded
    assert set(report.reinitialised) == {k for k in net.spat_encoder.state_dict() if "sampling_offsets" in k}
    assert torch.equal(net.spat_encoder.patch_embed.proj.weight, read_released(path)[0]["patch_embed.proj.weight"])


def test_spatial_pos_embed_is_interpolated_bicubically_when_the_grid_differs(tmp_path: Path) -> None:
    path = released_file(tmp_path, "spatial")
    stored = read_released(path)[0]["pos_embed"]  # 8 x 8 grid
    net = model(img_size=64)  # 16 x 16 grid
    report = load_pretrained(net.spat_encoder, path)
    expected = F.interpolate(stored.reshape(1, 8, 8, -1).permute(0, 3, 1, 2), size=(16, 16), mode="bicubic",
                             align_corners=False).permute(0, 2, 3, 1).flatten(1, 2)
    assert "pos_embed" in report.resized
    assert torch.allclose(net.spat_encoder.pos_embed, expected)


def test_spectral_checkpoint_edits_spat_map_and_pos_embed_as_the_release(tmp_path: Path) -> None:
    path = released_file(tmp_path, "spectral")
    stored = read_released(path)[0]
    net = model(img_size=64)  # spat_map no longer fits; the release drops it for any img_size != 64
    report = load_released(net, spectral=path)["spectral"]
    assert set(report.reinitialised) == {k for k in net.spec_encoder.state_dict()
                                         if k.startswith(("spat_map.", "l1.")) or "sampling_offsets" in k}
    assert {"spat_map.weight", "spat_map.bias"} <= set(report.ignored)
    # pos_embed: the first token dropped, the other N - 1 resized back to N (the release's spectral rule).
    pos = stored["pos_embed"][:, 1:]
    expected = F.interpolate(pos.reshape(1, 8, 1, -1).permute(0, 3, 1, 2), size=(9, 1), mode="bicubic",
                             align_corners=False).permute(0, 2, 3, 1).flatten(1, 2)
    assert torch.allclose(net.spec_encoder.pos_embed, expected)
    exact = model()
    plain = load_pretrained(exact.spec_encoder, path, released_edits=False)
    assert "pos_embed" in plain.loaded and "spat_map.weight" in plain.loaded
    assert torch.equal(exact.spec_encoder.pos_embed, stored["pos_embed"])


def test_mae_encoder_state_loads_strictly_into_our_encoders(tmp_path: Path) -> None:
    for kind, attr in (("spatial", "spat_encoder"), ("spectral", "spec_encoder")):
        torch.manual_seed(2)
        mae = create_mae(TINY, kind)  # type: ignore[arg-type]
        net = model()
        encoder = getattr(net, attr)
        report = load_pretrained(encoder, encoder_state_dict(mae), released_edits=False, strict=True)
        fresh = {k for k in encoder.state_dict() if "sampling_offsets" in k or k.startswith("l1.")}
        assert set(report.reinitialised) == fresh and not report.ignored and not report.resized
        missing, unexpected = encoder.load_state_dict(encoder_state_dict(mae), strict=False)
        assert set(missing) == fresh and not unexpected


def test_container_prefixes_are_stripped(tmp_path: Path) -> None:
    torch.manual_seed(0)
    state = encoder_state_dict(create_mae(TINY, "spatial"))
    for wrapped in ({"state_dict": {f"module.{k}": v for k, v in state.items()}},
                    {f"encoder.{k}": v for k, v in state.items()} | {"head.weight": torch.zeros(1)}):
        assert read_released(wrapped)[0].keys() == state.keys()


def test_a_checkpoint_that_does_not_fit_is_refused_with_every_key(tmp_path: Path) -> None:
    deeper = released_file(tmp_path, "spatial", depth=5)
    with pytest.raises(InputError, match=r"unexpected blocks\.4\.") as err:
        load_released(model(), spatial=deeper)
    assert "strict=False" in str(err.value)
    report = load_pretrained(model().spat_encoder, deeper, strict=False)
    assert report.ignored["blocks.4.norm1.weight"] == "unknown to this encoder"
    shallow = released_file(tmp_path, "spatial", name="shallow.pth", depth=3)
    with pytest.raises(InputError, match=r"missing blocks\.3\."):
        load_released(model(), spatial=shallow)
    wider = released_file(tmp_path, "spatial", name="wider.pth", embed_dim=48)
    with pytest.raises(InputError, match=r"blocks\.0\.norm1\.weight \(file \(48,\), model \(32,\)\)"):
        load_released(model(), spatial=wider)


def test_branch_and_file_name_mistakes_are_named(tmp_path: Path) -> None:
    spectral = released_file(tmp_path, "spectral")
    with pytest.raises(InputError, match="spectral encoder checkpoint.*spatial encoder"):
        load_released(model(), spatial=spectral)
    named = released_file(tmp_path, "spatial", name="spat-vit-large-ultra-checkpoint-1599.pth")
    with torch.device("meta"):
        base = create_model("hypersigma_b")
    with pytest.raises(InputError, match="-L spatial encoder.*build hypersigma_l"):
        load_released(base, spatial=named)


class _Payload:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("ran",))


def test_a_pickle_needing_code_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "hostile.pth"
    torch.save({"model": {"pos_embed": torch.zeros(1)}, "args": _Payload()}, path)
    with pytest.raises(UnsafeCheckpointError):
        read_released(path)


def test_a_whole_hypersigma_state_round_trips_strictly_through_the_house_loader(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from model import load_checkpoint

    source = model(gate_position="after_reduction")
    for path in (tmp_path / "w.pth", tmp_path / "w.safetensors"):
        state = {k: v.contiguous() for k, v in source.state_dict().items()}
        torch.save(state, path) if path.suffix == ".pth" else save_file(state, str(path))
        torch.manual_seed(9)
        target = create_model(TINY, gate_position="after_reduction")
        report = load_checkpoint(target, path, strict=True)
        assert report.is_exact and report.loaded == len(state)
        assert all(torch.equal(target.state_dict()[k], v) for k, v in state.items())
    with pytest.raises(InputError, match="shape differs"):
        load_checkpoint(create_model(TINY), tmp_path / "w.pth", strict=True)  # gate widths differ
