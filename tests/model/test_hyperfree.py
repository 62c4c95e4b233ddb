"""Tests of the channel-adaptive HyperFree model: band matching, patch embedding, shapes, counts, loading."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from base.errors import InputError
from model import create_model, get_config, list_models, load_checkpoint
from model.hyperfree import HyperFree, ModelConfig
from model.spectral import (
    GRID_WAVELENGTHS_NM,
    KEY_WAVELENGTHS_NM,
    SpectralPatchEmbed,
    find_corresponding_indices,
    match_bands,
    sample_grid_subset,
)


def first_within(inputs: list[float], bank: list[float], dis: float) -> tuple[list[int], list[int]]:
    """Oracle written from the rule: per bank entry in bank order, the first input band within `dis`."""
    got_in: list[int] = []
    got_bank: list[int] = []
    for b, target in enumerate(bank):
        for i, wl in enumerate(inputs):
            if abs(target - wl) <= dis:
                got_in.append(i)
                got_bank.append(b)
                break
    return got_in, got_bank


def spread(n: int, lo: float = 400.0, hi: float = 1000.0) -> list[float]:
    return np.linspace(lo, hi, n).tolist()


# ---------------------------------------------------------------- band matching


def test_first_input_band_within_tolerance_in_bank_order() -> None:
    # 100 -> 104 (115 is too far), 110 -> 115 (first within 10 in input order), 130 -> 131; 95 is never first.
    assert find_corresponding_indices([115, 104, 95, 131], [100, 110, 130], 10) == ([1, 0, 3], [0, 1, 2])
    # +-10 nm is inclusive; 10.5 nm is out.
    assert find_corresponding_indices([110.0, 89.5], [100], 10) == ([0], [0])
    assert find_corresponding_indices([110.5, 89.5], [100], 10) == ([], [])


def test_one_input_band_serves_several_bank_entries() -> None:
    assert find_corresponding_indices([102], [100, 105, 111], 10) == ([0, 0, 0], [0, 1, 2])
    match = match_bands([1575.2] * 1)
    assert match.key_input == (0, 0)  # the 1575 and 1575.5 key entries share the band
    assert [KEY_WAVELENGTHS_NM[b] for b in match.key_bank] == [1575, 1575.5]


def test_matching_agrees_with_rule_on_random_sets() -> None:
    rng = np.random.default_rng(0)
    for _ in range(50):
        wl = rng.uniform(380, 2520, int(rng.integers(1, 60))).round(1).tolist()
        for bank in (KEY_WAVELENGTHS_NM, GRID_WAVELENGTHS_NM):
            assert find_corresponding_indices(wl, bank, 10) == first_within(wl, list(bank), 10)


def test_grid_bank_excludes_bands_used_by_key_bank() -> None:
    wl = spread(25)
    match = match_bands(wl)
    key_in, key_bank = first_within(wl, list(KEY_WAVELENGTHS_NM), 10)
    grid_in, grid_bank = first_within(wl, list(GRID_WAVELENGTHS_NM), 10)
    kept = [(i, b) for i, b in zip(grid_in, grid_bank, strict=True) if i not in key_in]
    assert (match.key_input, match.key_bank) == (tuple(key_in), tuple(key_bank))
    assert match.grid_input == tuple(i for i, _ in kept) and match.grid_bank == tuple(b for _, b in kept)
    assert match.grid_input and not set(match.grid_input) & set(match.key_input)
    assert len(kept) < len(grid_in)  # some grid matches were dropped for being key-used


def test_fewer_than_20_bands_use_key_bank_only() -> None:
    assert match_bands(spread(19)).grid_input == ()
    assert match_bands(spread(19)).key_input
    assert match_bands(spread(20)).grid_input


def test_out_of_range_band_is_reported_as_unmatched() -> None:
    wl = [377.0, *spread(24)]
    match = match_bands(wl)
    assert match.unmatched == (0,)
    assert match.unmatched_wavelengths_nm == (377.0,)
    assert 0 in match.unused and 0 not in match.key_input + match.grid_input


def test_no_matching_band_raises_clear_error() -> None:
    with pytest.raises(ValueError, match=r"0\.35.*390-2510 nm"):
        match_bands([0.35, 0.45, 0.55])  # micrometres instead of nanometres
    with pytest.raises(ValueError, match="1100"):
        match_bands([1100.0, 1110.0])  # < 20 bands in a gap of the key bank


def test_training_grid_subset_is_seeded_and_excludes_key_bands() -> None:
    match = match_bands(spread(60))
    one = sample_grid_subset(match, 40, torch.Generator().manual_seed(1))
    two = sample_grid_subset(match, 40, torch.Generator().manual_seed(1))
    assert one == two
    assert one.key_input == match.key_input
    assert not set(one.grid_input) & set(match.key_input)
    assert list(one.grid_bank) == sorted(one.grid_bank) and len(one.grid_input) <= 40


# ---------------------------------------------------------------- patch embedding


def test_two_bank_patch_embedding_equals_direct_computation() -> None:
    torch.manual_seed(0)
    embed = SpectralPatchEmbed(embed_dim=5, patch_size=2)
    with torch.no_grad():
        for p in embed.parameters():
            p.normal_()
    wl = [*spread(24), 1575.0]  # the last band serves two key entries
    x = torch.randn(2, 25, 6, 8)
    tokens, match = embed(x, wl)

    key_in, key_bank = first_within(wl, list(KEY_WAVELENGTHS_NM), 10)
    grid_in, grid_bank = first_within(wl, list(GRID_WAVELENGTHS_NM), 10)
    expected = embed.point_spectral_weight_bank_b.view(1, -1, 1, 1) + embed.block_spectral_weight_bank_b.view(
        1, -1, 1, 1
    )
    for i, b in zip(key_in, key_bank, strict=True):
        expected = expected + F.conv2d(
            x[:, i : i + 1], embed.point_spectral_weight_bank_w[:, b : b + 1], stride=2
        )
    for i, b in zip(grid_in, grid_bank, strict=True):
        if i not in key_in:
            expected = expected + F.conv2d(
                x[:, i : i + 1], embed.block_spectral_weight_bank_w[:, b : b + 1], stride=2
            )
    assert tokens.shape == (2, 5, 3, 4)
    assert torch.allclose(tokens, expected, atol=1e-4)
    assert match.key_input.count(24) == 2


def test_patch_embedding_with_few_bands_uses_key_bank_only() -> None:
    embed = SpectralPatchEmbed(embed_dim=3, patch_size=2)
    wl = spread(8)
    x = torch.randn(1, 8, 4, 4)
    key_in, key_bank = first_within(wl, list(KEY_WAVELENGTHS_NM), 10)
    expected = F.conv2d(
        x[:, key_in],
        embed.point_spectral_weight_bank_w[:, key_bank],
        embed.point_spectral_weight_bank_b,
        stride=2,
    )
    assert torch.allclose(embed(x, wl)[0], expected)


def test_band_count_and_wavelength_count_must_agree() -> None:
    with pytest.raises(ValueError, match="31 bands but 30 wavelengths"):
        SpectralPatchEmbed(4, 2)(torch.zeros(1, 31, 4, 4), spread(30))


# ---------------------------------------------------------------- model shapes and counts


@pytest.fixture(scope="module")
def tiny() -> HyperFree:
    torch.manual_seed(0)
    return create_model("tiny").eval()


@pytest.mark.parametrize("bands", [16, 25, 31, 128, 420])
def test_tiny_model_accepts_any_band_count(tiny: HyperFree, bands: int) -> None:
    x = torch.rand(2, bands, 64, 64)
    with torch.no_grad():
        feats = tiny.image_encoder.forward_intermediates(x, spread(bands), gsd=[0.5, 2.0])
        neck = tiny.image_encoder.forward_features(x, spread(bands), gsd=0.5)
    assert [tuple(f.shape) for f in feats] == [(2, 64, 8, 8), (2, 32, 8, 8)]
    assert neck.shape == (2, 32, 8, 8) and torch.isfinite(neck).all()


def test_decode_returns_three_masks_per_prompt(tiny: HyperFree) -> None:
    with torch.no_grad():
        emb = tiny.image_encoder.forward_features(torch.rand(1, 31, 64, 64), spread(31), gsd=1.0)
        low, iou = tiny.decode(emb, torch.tensor([[[10.0, 20.0]], [[40.0, 5.0]]]), torch.ones(2, 1))
        masks = tiny.postprocess_masks(low, (48, 64), (30, 40))
    assert low.shape == (2, 3, 32, 32) and iou.shape == (2, 3)
    assert masks.shape == (2, 3, 30, 40)


def test_grad_checkpointing_gives_the_same_gradients(tiny: HyperFree) -> None:
    x, wl = torch.rand(1, 20, 64, 64), spread(20)
    grads: list[torch.Tensor] = []
    for flag in (False, True):
        model = create_model("tiny", grad_checkpointing=flag).train()
        load_checkpoint(model, tiny.state_dict(), strict=True)
        model.image_encoder.forward_features(x, wl, 1.0).square().mean().backward()
        grad = model.image_encoder.get_parameter("blocks.0.attn.qkv.weight").grad
        assert grad is not None
        grads.append(grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_encoder_input_must_be_padded_to_img_size(tiny: HyperFree) -> None:
    with pytest.raises(ValueError, match="model.preprocess.prepare"):
        tiny.image_encoder(torch.rand(1, 20, 48, 64), spread(20))


def test_patch_merging_config_shapes() -> None:
    model = create_model("tiny", merge_indexes=(0,), feature_indexes=(0, 1)).eval()
    with torch.no_grad():
        feats = model.image_encoder(torch.rand(1, 20, 64, 64), spread(20), gsd=1.0)
        low, _ = model.decode(feats[-1], boxes=torch.tensor([[0.0, 0.0, 30.0, 30.0]]))
    assert [tuple(f.shape) for f in feats] == [(1, 64, 8, 8), (1, 64, 4, 4), (1, 32, 4, 4)]
    assert low.shape == (1, 3, 16, 16)
    assert "image_encoder.multi_scale_convs.0.reduction.weight" in model.state_dict()


@pytest.mark.parametrize("name", ["hyperfree_b", "hypervision_b", "hypervision_l", "hypervision_h"])
def test_configs_on_meta_device_have_the_official_module_tree(name: str) -> None:
    with torch.device("meta"):
        model = create_model(name)
    state = model.state_dict()  # counts and exact key lists: tests/model/test_released.py
    assert {k.split(".")[0] for k in state} == {"image_encoder", "prompt_encoder", "mask_decoder"}
    dim, patch = model.config.encoder.embed_dim, model.config.encoder.patch_size
    assert state["image_encoder.point_spectral_weight_bank_w"].shape == (dim, 85, patch, patch)
    assert state["image_encoder.block_spectral_weight_bank_w"].shape == (dim, 211, patch, patch)
    assert state["image_encoder.point_spectral_weight_bank_b"].shape == (dim,)


def test_hyperfree_b_has_official_rel_pos_shapes() -> None:
    with torch.device("meta"):
        state = create_model("hyperfree_b").state_dict()
    assert state["image_encoder.blocks.0.attn.rel_pos_h"].shape == (27, 64)
    assert state["image_encoder.blocks.2.attn.rel_pos_h"].shape == (127, 64)
    assert state["image_encoder.pos_embed_mlp.layers.1.weight"].shape == (384, 384)


def test_registry_and_config_round_trip() -> None:
    assert list_models(family="hyperfree") == ["hyperfree_b", "hypervision_b", "hypervision_h", "hypervision_l",
                                               "tiny"]
    assert list_models() == sorted(list_models(family="hyperfree") + list_models(family="hypersigma"))
    cfg = get_config("tiny", patch_size=16, decoder_depth=1)
    assert cfg.encoder.patch_size == 16 and cfg.decoder_depth == 1
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    # The official rule with patch merging: (merge[0], global[0], global[2]).
    assert get_config("hypervision_h").encoder.feature_indexes == (8, 15, 31)
    assert get_config("hypervision_b", img_size=1024).encoder.img_size == 1024
    with pytest.raises(ValueError, match="Unknown override"):
        get_config("tiny", embed_dims=32)
    with pytest.raises(ValueError, match="Unknown model"):
        create_model("gigantic")


# ---------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_checkpoint_round_trip(tmp_path: Path, tiny: HyperFree, suffix: str) -> None:
    path = tmp_path / f"tiny{suffix}"
    state = {k: v.contiguous() for k, v in tiny.state_dict().items()}
    if suffix == ".pth":
        torch.save(state, path)
    else:
        save_file(state, str(path))
    torch.manual_seed(123)
    fresh = create_model("tiny").eval()
    report = load_checkpoint(fresh, path, strict=True)
    assert report.is_exact and report.loaded == len(state)
    assert report.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    x, wl = torch.rand(1, 25, 64, 64), spread(25)
    with torch.no_grad():
        for a, b in zip(tiny.image_encoder(x, wl, 0.3), fresh.image_encoder(x, wl, 0.3), strict=True):
            assert torch.equal(a, b)


def test_load_report_lists_missing_and_unexpected_keys(tiny: HyperFree) -> None:
    state = dict(tiny.state_dict())
    removed = "image_encoder.neck.0.weight"
    del state[removed]
    state["image_encoder.not_a_layer.weight"] = torch.zeros(3)
    fresh = create_model("tiny")
    kept = fresh.state_dict()[removed].clone()
    report = load_checkpoint(fresh, state, strict=False)
    assert report.missing == (removed,) and not report.strict
    assert report.unexpected == report.dropped == ("image_encoder.not_a_layer.weight",)
    assert report.resized == () and report.mismatched == ()
    assert len(report.sha256) == 64 and report.source == "<state_dict>"
    assert torch.equal(
        fresh.state_dict()["mask_decoder.iou_token.weight"], state["mask_decoder.iou_token.weight"]
    )
    assert torch.equal(fresh.state_dict()[removed], kept)  # missing keys keep the model's values
    untouched = create_model("tiny")
    before = {k: v.clone() for k, v in untouched.state_dict().items()}
    with pytest.raises(InputError, match=r"missing 1: \['image_encoder.neck.0.weight'\]; unexpected 1: "
                                         r"\['image_encoder.not_a_layer.weight'\].*--non-strict"):
        load_checkpoint(untouched, state)  # strict by default
    assert all(torch.equal(v, before[k]) for k, v in untouched.state_dict().items())  # nothing half-loaded


def test_loader_resizes_banks_and_rel_pos_for_another_patch_size(tiny: HyperFree) -> None:
    with pytest.raises(InputError,
                       match=r"point_spectral_weight_bank_w \(file \(64, 85, 8, 8\), model \(64, 85, 16, 16\)\)"):
        load_checkpoint(create_model("tiny", patch_size=16), tiny.state_dict())
    model = create_model("tiny", patch_size=16)
    report = load_checkpoint(model, tiny.state_dict(), strict=False)
    assert "image_encoder.point_spectral_weight_bank_w" in report.resized
    assert "image_encoder.blocks.1.attn.rel_pos_h" in report.resized  # global block: 15 -> 7 positions
    assert not report.missing and not report.unexpected and not report.mismatched
    expected = F.interpolate(tiny.state_dict()["image_encoder.block_spectral_weight_bank_w"], size=(16, 16))
    assert torch.equal(model.state_dict()["image_encoder.block_spectral_weight_bank_w"], expected)


def test_strict_load_resizes_only_global_rel_pos_for_another_image_size(tiny: HyperFree) -> None:
    model = create_model("tiny", img_size=128)  # global block 1: 2 * 16 - 1 = 31 positions instead of 15
    report = load_checkpoint(model, tiny.state_dict())
    assert report.strict and report.resized == ("image_encoder.blocks.1.attn.rel_pos_h",
                                                "image_encoder.blocks.1.attn.rel_pos_w")
    wider = create_model("tiny", window_size=5)  # windowed block 0: a layout change, not an image size
    with pytest.raises(InputError, match=r"blocks.0.attn.rel_pos_h \(file \(7, 32\), model \(9, 32\)\)"):
        load_checkpoint(wider, tiny.state_dict())


class NotATensor:
    """A pickled object that weights_only=True refuses."""


def test_non_state_dict_checkpoint_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "wrapped.pth"
    torch.save({"model": {"a": torch.zeros(1)}}, path)
    with pytest.raises(InputError, match="raw state_dict"):
        load_checkpoint(create_model("tiny"), path)
    pickled = tmp_path / "pickled.pth"
    torch.save({"image_encoder.neck.0.weight": torch.zeros(1), "extra": NotATensor()}, pickled)
    with pytest.raises(InputError, match=r"pickled.pth: field '<pickle>'.*weights_only=True.*state_dict\(\)"):
        load_checkpoint(create_model("tiny"), pickled)
