"""The preprocessing contract (model.preprocess): `released` vs `crop_max`, the batch form, GSD, descriptions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model import CONTRACTS, create_model, describe, extract_features, prepare, prepare_batch
from model.hyperfree import HyperFree
from model.preprocess import effective_gsd


def released_predictor_input(cube_hwc: np.ndarray, img_size: int) -> torch.Tensor:
    """The released path written out step by step: the reader (`load_hypervision_matrix`: float32, per-image
    255 * (x - min) / (max - min)), then `HyperVision_Predictor.set_image` (`ResizeLongestSide.apply_image_torch`:
    bilinear antialiased resize of the longest side) and `Sam.preprocess` (x / x.max(), zero pad bottom/right).
    The slow test in test_released.py runs the released functions themselves."""
    img = cube_hwc.astype(np.float32)
    scaled = 255.0 * (img - img.min()) / (img.max() - img.min())
    x = torch.as_tensor(scaled).permute(2, 0, 1).unsqueeze(0).float()
    h, w = x.shape[-2:]
    scale = img_size / max(h, w)
    x = F.interpolate(x, (int(h * scale + 0.5), int(w * scale + 0.5)), mode="bilinear", align_corners=False,
                      antialias=True)
    x = x / x.max()
    return F.pad(x, (0, img_size - x.shape[-1], 0, img_size - x.shape[-2]))


def twelve_bit(height: int = 30, width: int = 40, bands: int = 31, offset: int = 1000) -> np.ndarray:
    """(H, W, C) uint16 12-bit counts over a dark offset."""
    return (offset + np.random.default_rng(0).integers(0, 4096 - offset, (height, width, bands))).astype(np.uint16)


def test_released_contract_matches_the_released_predictor_and_crop_max_does_not() -> None:
    cube = twelve_bit()
    reference = released_predictor_input(cube, 64)
    released, crop_max = prepare(cube, 64, "released"), prepare(cube, 64, "crop_max")
    assert torch.equal(released.image, reference)  # bit for bit
    gap = (crop_max.image - reference).abs().max().item()
    assert gap > 0.2  # the 1000-count offset survives x / max: inputs differ by about 0.24
    assert released.contract == "released" and crop_max.contract == "crop_max"
    # An offset-free cube that reaches 0 is where the two agree (up to float rounding).
    zero_based = cube - cube.min()
    torch.testing.assert_close(prepare(zero_based, 64, "crop_max").image, prepare(zero_based, 64, "released").image)


def test_crop_max_is_resize_then_global_max() -> None:
    rng = np.random.default_rng(0)
    cube = rng.uniform(0, 900, (6, 10, 3)).astype(np.float32)
    prepared = prepare(cube, 16, "crop_max")
    # Longest side 10 -> 16: scale 1.6, height 6 * 1.6 = 9.6 -> 10.
    resized = F.interpolate(torch.from_numpy(cube).permute(2, 0, 1)[None], (10, 16), mode="bilinear",
                            align_corners=False, antialias=True)
    expected = torch.zeros(1, 3, 16, 16)
    expected[..., :10, :16] = resized / resized.max()
    assert prepared.input_size == (10, 16) and prepared.original_size == (6, 10)
    assert torch.equal(prepared.image, expected)
    assert prepared.image.max() == 1.0 and not prepared.image[..., 10:, :].any()
    as_uint16 = prepare((cube * 10).astype(np.uint16), 16, "crop_max").image
    assert as_uint16.dtype == torch.float32 and as_uint16.max() == 1.0


def test_blank_or_nan_cube_is_refused_whole_and_zeroed_as_a_crop() -> None:
    with pytest.raises(ValueError, match="Cannot normalise the cube: its values are constant"):
        prepare(np.full((4, 4, 3), 7.0), 8, "released")
    for contract in CONTRACTS:
        with pytest.raises(ValueError, match="NaN"):
            prepare(np.full((4, 4, 3), np.nan), 8, contract)
    with pytest.raises(ValueError, match="maximum after resizing is 0"):
        prepare(np.zeros((4, 4, 3)), 8, "crop_max")
    batch = prepare_batch(torch.full((1, 3, 8, 8), 5.0), [(8, 8)], 16, torch.tensor([0.1]))
    assert batch.image.shape == (1, 3, 16, 16) and not batch.image.any()


def test_gsd_follows_the_contract() -> None:
    assert effective_gsd(0.01, (300, 400), 512, "released") == 0.01  # as the released predictor takes it
    assert effective_gsd(0.456, (300, 400), 1024, "crop_max") == pytest.approx(0.456 * 400 / 1024)
    assert prepare(twelve_bit(), 64, "crop_max").effective_gsd(0.6) == pytest.approx(0.6 * 40 / 64)
    with pytest.raises(ValueError, match="Unknown preprocessing contract 'raw'"):
        effective_gsd(1.0, (4, 4), 8, "raw")


@pytest.fixture(scope="module")
def tiny() -> HyperFree:
    torch.manual_seed(0)
    return create_model("tiny").eval()


@pytest.mark.parametrize("contract", CONTRACTS)
def test_extract_features_is_prepare_then_the_encoder_with_the_contract_gsd(tiny: HyperFree, contract: str) -> None:
    cube, wl = twelve_bit(20, 32, 25), np.linspace(400, 1000, 25).tolist()
    feats = extract_features(tiny, cube, wl, gsd_m=0.6, contract=contract)
    prepared = prepare(cube, 64, contract)
    with torch.no_grad():
        direct = tiny.image_encoder(prepared.image, wl, effective_gsd(0.6, (20, 32), 64, contract))
    assert [tuple(f.shape) for f in feats] == [(1, 64, 8, 8), (1, 32, 8, 8)]
    assert all(torch.equal(a, b) for a, b in zip(feats, direct, strict=True))
    other = "crop_max" if contract == "released" else "released"
    assert not torch.allclose(feats[-1], extract_features(tiny, cube, wl, 0.6, other)[-1])


@pytest.mark.parametrize("contract", CONTRACTS)
def test_a_full_crop_in_a_batch_is_prepared_as_one_image(contract: str) -> None:
    cube = twelve_bit(16, 16, 5)
    crops = torch.from_numpy(cube.astype(np.float32)).permute(2, 0, 1)
    edge = torch.zeros_like(crops)
    edge[:, :10, :7] = crops[:, :10, :7]  # an image-edge crop: 10 x 7 valid pixels, zero-padded
    batch = prepare_batch(torch.stack([crops, edge]), [(16, 16), (10, 7)], 32, torch.tensor([0.5, 0.5]), contract)
    assert torch.equal(batch.image[:1], prepare(cube, 32, contract).image)
    assert batch.input_sizes == ((32, 32), (20, 14))  # one scale for every crop: 32 / 16
    window = prepare(cube[:10, :7], 20, contract).image[..., :20, :14]  # the valid window alone, same scale
    assert torch.equal(batch.image[1, :, :20, :14], window[0])
    assert not batch.image[1, :, 20:].any() and not batch.image[1, :, :, 14:].any()
    assert batch.gsd.tolist() == [effective_gsd(0.5, (16, 16), 32, contract)] * 2


def test_describe_names_the_contract_and_its_parameters() -> None:
    assert CONTRACTS == ("released", "crop_max")
    d = describe("released")
    assert d["name"] == "released" and d["version"] == "1"
    assert "min-max to [0, 255]" in d["parameters"]["value_range"] and "as given" in d["parameters"]["gsd"]
    assert describe("crop_max")["parameters"]["value_range"] == "as stored (no offset removal)"
    with pytest.raises(ValueError, match=r"choose one of \['released', 'crop_max'\]"):
        describe("minmax")
