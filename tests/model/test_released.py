"""The released HyperVision layouts by name: key lists, shapes and parameter counts pinned per layout, and golden
values of a small released-shaped model that the released code computed.

The golden file (`data/released_golden.npz`, a few KB of expected outputs, no weights) was written by the released
code on the seeded state and inputs defined here; with the released repository on disk the slow tests recompute it
from the released code and run the full equivalence (bench/released_equivalence.py):

    HVP_RELEASED_REPO=/path/to/HyperVision .venv/bin/python -m pytest -m slow tests/model/test_released.py

To rewrite the golden file from the released code (only if the inputs or the state rule below change):

    HVP_RELEASED_REPO=/path/to/HyperVision .venv/bin/python -c \
        "import sys; sys.path.insert(0, 'tests/model'); import test_released as t; t.write_golden()"
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from base.errors import InputError
from model import create_model, feature_info, get_config, load_checkpoint
from model.hyperfree import HyperFree
from model.preprocess import extract_features, prepare
from model.registry import ALIASES

REPO = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).parent / "data" / "released_golden.npz"
RELEASED = os.environ.get("HVP_RELEASED_REPO")
needs_released = pytest.mark.skipif(not RELEASED, reason="set HVP_RELEASED_REPO to a released HyperVision checkout")

# name -> (keys, parameters, sha256 of the sorted "key shape" lines), as the released builders make them:
# hypervision_*: HyperVision's build_HyperVision_b/l/h(image_size=512); hyperfree_b: HyperFree's
# build_HyperFree_vit_b(encoder_global_attn_indexes=-1, merge_indexs=None), its tuning-free scripts' layout.
LAYOUTS: dict[str, tuple[int, int, str]] = {
    "hypervision_b": (355, 155_212_720, "8ab017f408b794cb3a05de12c097920460600d8dc1a2ce40e84ae7252c6dd47e"),
    "hypervision_l": (523, 396_221_872, "4f814aa021b2f81e7abbdede8f1974ec0efa4e782c9f165e685c416b97506921"),
    "hypervision_h": (635, 748_574_512, "17aefb1a6ceed3f6a66b352de27e54f269ac26683825bbcb401b2dfcb0beb250"),
    "hyperfree_b": (349, 150_519_216, "f35191a4d7661adb0a0a135f15eb0e0c59c323be2b6df785fae5095df60b8a2a"),
}


def layout_fingerprint(state: dict[str, torch.Tensor]) -> str:
    """sha256 over the sorted "key shape" lines of a state_dict."""
    lines = sorted(f"{k} {tuple(v.shape)}" for k, v in state.items())
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def meta_state(name: str, **overrides: Any) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return create_model(name, **overrides).state_dict()


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_layout_keys_shapes_and_parameter_count_are_pinned(name: str) -> None:
    keys, params, fingerprint = LAYOUTS[name]
    state = meta_state(name)
    assert len(state) == keys
    assert sum(v.numel() for v in state.values()) == params
    assert layout_fingerprint(state) == fingerprint


@pytest.mark.parametrize(("name", "global_blocks", "merges", "dim"), [
    ("hypervision_b", (5, 8, 11), 2, 768),
    ("hypervision_l", (11, 17, 23), 2, 1024),
    ("hypervision_h", (15, 23, 31), 2, 1280),
    ("hyperfree_b", (2, 5, 8, 11), 0, 768),
])
def test_global_attention_and_patch_merging_sit_where_the_release_puts_them(
        name: str, global_blocks: tuple[int, ...], merges: int, dim: int) -> None:
    cfg = get_config(name)
    state = meta_state(name)
    head = dim // cfg.encoder.num_heads
    for i in range(cfg.encoder.depth):
        grid = cfg.encoder.grid_size
        expected = (2 * grid - 1, head) if i in global_blocks else (27, head)  # window 14 -> 27 positions
        assert state[f"image_encoder.blocks.{i}.attn.rel_pos_h"].shape == expected, i
    assert sum(k.endswith("reduction.weight") for k in state) == merges
    assert cfg.encoder.img_size == (1024 if name == "hyperfree_b" else 512)


def test_feature_info_sizes_heads_from_a_name_and_matches_the_maps() -> None:
    assert feature_info("hypervision_b") == [
        {"num_chs": 768, "reduction": 16, "module": "blocks.3"},
        {"num_chs": 768, "reduction": 32, "module": "blocks.5"},
        {"num_chs": 768, "reduction": 32, "module": "blocks.11"},
        {"num_chs": 256, "reduction": 32, "module": "neck"},
    ]
    assert [f["module"] for f in feature_info("hypervision_l")] == ["blocks.6", "blocks.11", "blocks.23", "neck"]
    assert [f["reduction"] for f in feature_info("hyperfree_b")] == [16] * 5
    model = golden_model()
    x = torch.rand(1, 16, 64, 64)
    with torch.no_grad():
        maps = model.image_encoder.forward_intermediates(x, np.linspace(400, 1000, 16).tolist(), 0.5)
    info = model.image_encoder.feature_info
    assert [(m.shape[1], 64 // m.shape[-1]) for m in maps] == [(f["num_chs"], f["reduction"]) for f in info]


def test_aliases_resolve_to_the_layouts_they_always_built(caplog: pytest.LogCaptureFixture) -> None:
    assert ALIASES == {"base": "hyperfree_b", "huge": "hypervision_h"}
    assert get_config("base") == get_config("hyperfree_b")
    assert "'base' is an alias: it builds 'hyperfree_b'" in caplog.text
    with pytest.raises(ValueError, match="'hypervision_l'"):
        get_config("large")


def test_a_state_saved_at_another_image_size_loads_strictly_with_global_rel_pos_resized() -> None:
    narrow = {"embed_dim": 64, "num_heads": 2, "decoder_mlp_dim": 64}  # the -B structure, narrow for the CPU
    torch.manual_seed(0)
    state = create_model("hypervision_b", img_size=1024, **narrow).state_dict()  # the builders' default size
    model = create_model("hypervision_b", **narrow)
    report = load_checkpoint(model, state)
    assert report.loaded == 355 and not (report.missing or report.dropped) and report.strict
    assert report.resized == tuple(f"image_encoder.blocks.{i}.attn.rel_pos_{a}" for i in (5, 8, 11) for a in "hw")
    key = "image_encoder.blocks.5.attn.rel_pos_h"
    assert state[key].shape == (127, 32) and model.state_dict()[key].shape == (63, 32)
    torch.testing.assert_close(model.state_dict()[key], F.interpolate(state[key][None, None], size=(63, 32))[0, 0])


def test_released_b_keys_refused_by_another_layout_name_the_layout_that_fits() -> None:
    state = meta_state("hypervision_b")  # the refusal happens before any tensor is read
    with torch.device("meta"):
        model = create_model("hyperfree_b")
    with pytest.raises(InputError, match=r"unexpected 6: \['image_encoder.multi_scale_convs.0.*shape differs.*"
                                         r"blocks.2.attn.rel_pos_h \(file \(27, 64\), model \(127, 64\)\).*"
                                         r"match layout 'hypervision_b'.*--non-strict"):
        load_checkpoint(model, state)


# ---------------------------------------------------------------- golden values of a small released-shaped model
GOLDEN_LAYOUT: dict[str, Any] = {"img_size": 64, "patch_size": 16, "embed_dim": 32, "depth": 4, "num_heads": 2,
                                 "global_attn_indexes": (1, 2, 3), "merge_indexes": (0, 4)}
"""hypervision_b's structure shrunk: window attention with padding, a global block after a patch merge (its
rel-pos table interpolated at run time), the (merge[0], global[0], global[2]) feature rule, the 256-d neck, and
the SAM decoder at the released sizes."""
GOLDEN_BANDS = (16, 128)  # key bank only / key + grid bank
GOLDEN_GSD = 0.5
GOLDEN_POINT = (18.0, 10.0)  # (x, y) in input pixels


@functools.cache
def golden_model() -> HyperFree:
    """The golden layout with the seeded golden state loaded strictly (shared; never modified)."""
    model = create_model("hypervision_b", **GOLDEN_LAYOUT).eval()
    load_checkpoint(model, golden_state({k: tuple(v.shape) for k, v in model.state_dict().items()}))
    return model


def golden_state(shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """A state for any model with these key shapes, independent of how the model was built: per key (sorted),
    N(0, 0.1) from a generator seeded by the key's position."""
    return {k: torch.randn(shapes[k], generator=torch.Generator().manual_seed(1000 + i)) * 0.1
            for i, k in enumerate(sorted(shapes))}


def golden_cube(bands: int) -> tuple[np.ndarray, np.ndarray]:
    """(20, 28, bands) uint16 12-bit counts over a dark offset of 1000, and wavelengths over 400-1000 nm."""
    rng = np.random.default_rng(bands)
    return (1000 + rng.integers(0, 3096, (20, 28, bands))).astype(np.uint16), np.linspace(400, 1000, bands)


def our_outputs(model: HyperFree) -> dict[str, np.ndarray]:
    """Feature maps and the decoder's answer to one point, per golden band count, as arrays."""
    out: dict[str, np.ndarray] = {}
    point = torch.tensor([[GOLDEN_POINT]])
    for bands in GOLDEN_BANDS:
        cube, wl = golden_cube(bands)
        feats = extract_features(model, cube, wl, GOLDEN_GSD, "released")
        with torch.no_grad():
            low, iou = model.decode(feats[-1], point, torch.ones(1, 1))
        for i, f in enumerate(feats):
            out[f"{bands}/map{i}"] = f[0].numpy()
        out[f"{bands}/low_res"], out[f"{bands}/iou"] = low[0].numpy(), iou[0].numpy()
    return out


def released_outputs(pkg: types.ModuleType) -> dict[str, np.ndarray]:
    """The same outputs from the released code: its builder, the released reader's min-max, its predictor."""
    cfg = get_config("hypervision_b", **GOLDEN_LAYOUT).encoder
    model = pkg._build_HyperVision(encoder_embed_dim=cfg.embed_dim, encoder_depth=cfg.depth,
                                   encoder_num_heads=cfg.num_heads,
                                   encoder_global_attn_indexes=list(cfg.global_attn_indexes),
                                   merge_indexs=list(cfg.merge_indexes), vit_patch_size=cfg.patch_size,
                                   image_size=cfg.img_size).eval()
    model.load_state_dict(golden_state({k: tuple(v.shape) for k, v in model.state_dict().items()}), strict=True)
    model.prompt_encoder.image_embedding_size = (cfg.output_grid_size,) * 2  # see bench/released_equivalence.py
    out: dict[str, np.ndarray] = {}
    for bands in GOLDEN_BANDS:
        cube, wl = golden_cube(bands)
        img = cube.astype(np.float32)
        scaled = 255.0 * (img - img.min()) / (img.max() - img.min())  # the released reader's min-max
        predictor = pkg.HyperVision_Predictor(model)
        with torch.no_grad():
            predictor.set_image(scaled, test_mode=True, spectral_lengths=wl.tolist(), GSD=[GOLDEN_GSD])
            _, iou, low = predictor.predict_torch(torch.tensor([[GOLDEN_POINT]]), torch.ones(1, 1),
                                                  return_logits=True)
        for i, f in enumerate(predictor.multi_scale_features):
            out[f"{bands}/map{i}"] = f[0].numpy()
        out[f"{bands}/low_res"], out[f"{bands}/iou"] = low[0].numpy(), iou[0].numpy()
    return out


def load_released() -> types.ModuleType:
    """The released package via bench/released_equivalence.import_released."""
    spec = importlib.util.spec_from_file_location("released_equivalence", REPO / "bench" / "released_equivalence.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench.import_released(RELEASED or "")


def write_golden() -> None:
    """Rewrite the golden file from the released code (see the module docstring)."""
    GOLDEN.parent.mkdir(exist_ok=True)
    np.savez_compressed(GOLDEN, **released_outputs(load_released()))


def test_golden_values_of_the_released_code_are_reproduced() -> None:
    expected = np.load(GOLDEN)
    got = our_outputs(golden_model())
    assert sorted(got) == sorted(expected.files)
    shapes = {k: got[k].shape for k in got if k.startswith("16/")}
    assert shapes == {"16/map0": (32, 4, 4), "16/map1": (32, 2, 2), "16/map2": (32, 2, 2), "16/map3": (256, 2, 2),
                      "16/low_res": (3, 8, 8), "16/iou": (3,)}
    for key in expected.files:
        # float32 through a ViT stack: summation order differs between CPU kernels and thread counts (measured
        # up to 1.5e-5 here); a wrong weight or layout differs by 0.4 or more (see the crop_max control below)
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-4, atol=1e-4, err_msg=key)
    assert not np.allclose(got["16/map3"], got["128/map3"])  # band count changes the embedding


def test_golden_state_is_not_the_default_init() -> None:
    model = golden_model()
    rel_pos = model.state_dict()["image_encoder.blocks.2.attn.rel_pos_h"]
    assert rel_pos.abs().sum() > 0  # zero-initialised in the released builder; exercised here


# ---------------------------------------------------------------- against the released code (opt-in)
@pytest.mark.integration
@needs_released
def test_released_code_writes_the_golden_values() -> None:
    expected = np.load(GOLDEN)
    got = released_outputs(load_released())
    for key in expected.files:
        # float32 through a ViT stack: summation order differs between CPU kernels and thread counts (measured
        # up to 1.5e-5 here); a wrong weight or layout differs by 0.4 or more (see the crop_max control below)
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-4, atol=1e-4, err_msg=key)


@pytest.mark.integration
@needs_released
def test_released_preprocessing_is_the_released_contract() -> None:
    pkg = load_released()
    cube, _ = golden_cube(31)
    img = cube.astype(np.float32)
    scaled = 255.0 * (img - img.min()) / (img.max() - img.min())
    model = pkg.build_HyperVision_b(image_size=64)  # only its transform and preprocess are used
    predictor = pkg.HyperVision_Predictor(model)
    x = torch.as_tensor(scaled).permute(2, 0, 1).unsqueeze(0).float()
    theirs = model.preprocess(predictor.transform.apply_image_torch(x))
    assert torch.equal(prepare(cube, 64, "released").image, theirs)
    assert (prepare(cube, 64, "crop_max").image - theirs).abs().max() > 0.1


@pytest.mark.integration
@needs_released
def test_released_b_equivalence_on_every_output() -> None:
    spec = importlib.util.spec_from_file_location("released_equivalence", REPO / "bench" / "released_equivalence.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    pkg = bench.import_released(RELEASED or "")
    rows = bench.compare_layout(pkg, "b", 512, (16, 31, 128), (0.5,), (120, 160))
    worst = {r["output"]: 0.0 for r in rows}
    for r in rows:
        worst[r["output"]] = max(worst[r["output"]], r["max_abs_diff"])
    assert worst.pop("control: crop_max neck") > 1e-3
    assert all(v <= 1e-4 for v in worst.values()), worst
    keys = bench.compare_keys(pkg, "h", 512)
    assert keys["differing"] == [] and keys["keys"] == 635
