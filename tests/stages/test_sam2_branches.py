"""SAM2 builder (random-init, strict checkpoints, Hydra isolation) and the spatial and spectral labelers, on the
tiny Hiera-T at 128 px with random weights and permissive thresholds."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from PIL import Image
from sam2.sam2_video_predictor import SAM2VideoPredictor

from catalog.masks import MaskSet
from stages.labelling.falsecolor import spectral_sequence
from stages.labelling.labeler import ImageSample
from stages.labelling.sam2_models import (
    SAM2CheckpointError,
    automatic_masks,
    build_sam2_model,
    mask_generator,
    remove_small_regions,
)
from stages.labelling.spatial import SpatialLabeler
from stages.labelling.spectral import InMemoryVideoPredictor, SpectralLabeler

#: Hiera-T at 128 px, as the demo profile runs it (CPU-friendly; the official Hiera-T checkpoint loads into it).
TINY_MODEL_CONFIG: dict[str, Any] = {"config": "configs/sam2.1/sam2.1_hiera_t.yaml", "image_size": 128}
CONFIG, SIZE = TINY_MODEL_CONFIG["config"], TINY_MODEL_CONFIG["image_size"]
#: Random weights score low: keep every mask so the synthetic scenes give at least one.
PERMISSIVE = {"points_per_side": 4, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}
BAND_COUNTS = [16, 25, 31, 128]


def scene(bands: int, h: int = 24, w: int = 32, seed: int = 0) -> ImageSample:
    """Four rectangles with distinct Gaussian spectra on a flat background, 400-1000 nm, slight noise."""
    rng = np.random.default_rng(seed)
    wl = np.linspace(400.0, 1000.0, bands)
    cube = np.full((bands, h, w), 0.2)
    boxes = [(2, 10, 3, 12), (12, 22, 4, 14), (4, 14, 18, 29), (16, 22, 18, 30)]
    for (y0, y1, x0, x1), peak in zip(boxes, (450.0, 550.0, 650.0, 850.0), strict=True):
        cube[:, y0:y1, x0:x1] = np.exp(-0.5 * ((wl - peak) / 60.0) ** 2)[:, None, None]
    cube += rng.normal(0.0, 0.01, cube.shape)
    return ImageSample(image_id=f"scene-{bands}", cube=cube.astype(np.float32), wavelengths=wl)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Two OpenMP threads on a busy 2-core machine stall unpredictably (10-50x slower); one thread is steady."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def spatial() -> SpatialLabeler:
    return SpatialLabeler(TINY_MODEL_CONFIG, None, PERMISSIVE, device="cpu")


@pytest.fixture(scope="module")
def spectral() -> SpectralLabeler:
    return SpectralLabeler(TINY_MODEL_CONFIG, None, {**PERMISSIVE, "stride": 2, "max_objects": 4}, device="cpu")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model's weights saved as sam2 releases them, drawn with another seed than random-init."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    torch.save({"model": build_sam2_model(CONFIG, image_size=SIZE, seed=1).state_dict()}, path)
    return path


def assert_well_formed(ms: MaskSet, shape: tuple[int, int], branch: str) -> None:
    assert ms.masks.dtype == bool and ms.masks.ndim == 3 and ms.masks.shape[1:] == shape
    assert len(ms) >= 1
    assert len(ms.table) == len(ms)
    numeric = ms.table.drop(columns=["branch"]).to_numpy(dtype=float)
    assert np.isfinite(numeric).all()
    assert (ms.table["branch"] == branch).all()
    np.testing.assert_array_equal(ms.table["area"], ms.masks.sum(axis=(1, 2)))
    assert ms.table["score"].between(0, 1).all()


# ---------------------------------------------------------------- builder


def test_checkpoint_round_trip_gives_identical_outputs(checkpoint: Path) -> None:
    source = build_sam2_model(CONFIG, image_size=SIZE, seed=1)
    loaded = build_sam2_model(CONFIG, checkpoint, image_size=SIZE)
    fresh = build_sam2_model(CONFIG, image_size=SIZE)
    assert not torch.equal(source.no_mem_embed, fresh.no_mem_embed)  # the checkpoint replaced random-init
    rgb = spectral_sequence(scene(31).cube, scene(31).wavelengths, 2)[0].rgb
    outs = [automatic_masks(mask_generator(m, PERMISSIVE), rgb) for m in (source, loaded)]
    for a, b in zip(*outs, strict=True):
        np.testing.assert_array_equal(a, b)
    assert len(outs[0][0]) >= 1


def test_random_init_is_reproducible() -> None:
    a, b = (build_sam2_model(CONFIG, image_size=SIZE) for _ in range(2))
    state = torch.get_rng_state()
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is left alone


def test_corrupted_checkpoint_names_the_keys(checkpoint: Path, tmp_path: Path) -> None:
    sd = torch.load(checkpoint, weights_only=True)["model"]
    removed = "sam_mask_decoder.iou_token.weight"
    del sd[removed]
    sd["bogus.weight"] = torch.zeros(1)
    bad = tmp_path / "bad.pt"
    torch.save({"model": sd}, bad)
    with pytest.raises(SAM2CheckpointError, match=r"missing keys 1 \['sam_mask_decoder.iou_token.weight'\]") as e:
        build_sam2_model(CONFIG, bad, image_size=SIZE)
    assert "bogus.weight" in str(e.value) and str(bad) in str(e.value)
    torch.save(sd, bad)  # no "model" entry
    with pytest.raises(SAM2CheckpointError, match="under 'model'"):
        build_sam2_model(CONFIG, bad, image_size=SIZE)


def test_missing_checkpoint_file_raises_with_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        build_sam2_model(CONFIG, missing, image_size=SIZE)


def test_bad_config_or_size_raise() -> None:
    with pytest.raises(ValueError, match="multiple of 32"):
        build_sam2_model(CONFIG, image_size=100)
    with pytest.raises(ValueError, match="sam2.1_hiera_t.yaml"):
        build_sam2_model("configs/sam2.1/hiera_tiny.yaml")


def test_builder_works_inside_and_leaves_a_foreign_hydra_context(tmp_path: Path) -> None:
    """A project that replaces sam2's global Hydra (as the method notes warn) still builds, and keeps its own."""
    (tmp_path / "mine.yaml").write_text("answer: 42\n")
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(tmp_path), version_base="1.2"):
            assert build_sam2_model(CONFIG, image_size=64).image_size == 64
            assert compose(config_name="mine").answer == 42
        assert not GlobalHydra.instance().is_initialized()
        assert build_sam2_model(CONFIG, image_size=64).image_size == 64
        assert not GlobalHydra.instance().is_initialized()
    finally:
        GlobalHydra.instance().clear()
        initialize_config_module("sam2", version_base="1.2")  # what `import sam2` set up, for later tests


def test_remove_small_regions() -> None:
    mask = np.zeros((10, 10), bool)
    mask[1:8, 1:8] = True
    mask[4, 4] = False  # a 1-pixel hole
    mask[9, 9] = True  # a 1-pixel island
    out, changed = remove_small_regions(mask, 4)
    assert changed and out[4, 4] and not out[9, 9] and out[1:8, 1:8].all()
    only_small = np.zeros((10, 10), bool)
    only_small[0, 0] = only_small[5, 5:7] = True
    out, _ = remove_small_regions(only_small, 4)
    assert out.sum() == 2 and out[5, 5:7].all()  # every island small: the largest stays


def test_min_mask_region_area_cleans_generated_masks(spatial: SpatialLabeler) -> None:
    rgb = spectral_sequence(scene(31).cube, scene(31).wavelengths, 2)[2].rgb
    raw, _, _ = automatic_masks(spatial.generator, rgb)
    cleaned, iou, stability = automatic_masks(spatial.generator, rgb, min_mask_region_area=40)
    assert 1 <= len(cleaned) <= len(raw) and len(iou) == len(stability) == len(cleaned)
    for m in cleaned:
        assert np.array_equal(m, remove_small_regions(m, 40)[0])  # nothing small left to remove


# ---------------------------------------------------------------- labelers


@pytest.mark.parametrize("bands", BAND_COUNTS)
def test_spatial_labeler_masks(spatial: SpatialLabeler, bands: int) -> None:
    ms = spatial.label(scene(bands))
    assert_well_formed(ms, (24, 32), "spatial")
    assert ms.attrs is not None and ms.attrs["rgb_method"] == "cie1931"
    assert ms.labeler_id == spatial.labeler_id


def test_spatial_labeler_uses_the_native_rgb(spatial: SpatialLabeler) -> None:
    sample = scene(16)
    sample.rgb = np.zeros((24, 32, 3), np.uint8)
    sample.rgb[4:20, 6:26] = (200, 40, 40)
    ms = spatial.label(sample)
    assert ms.attrs is not None and ms.attrs["rgb_method"] == "native"
    assert_well_formed(ms, (24, 32), "spatial")


@pytest.mark.parametrize("bands", BAND_COUNTS)
def test_spectral_labeler_masks(spectral: SpectralLabeler, bands: int) -> None:
    sample = scene(bands)
    ms = spectral.label(sample)
    assert_well_formed(ms, (24, 32), "spectral")
    frames = spectral_sequence(sample.cube, sample.wavelengths, 2)
    assert ms.attrs is not None and ms.attrs["seed_frame"] == len(frames) // 2
    assert ms.table["frames_present"].between(1, len(frames)).all()


def test_spectral_predictor_receives_exactly_the_sequence(spectral: SpectralLabeler,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[np.ndarray]] = []
    original = InMemoryVideoPredictor.load_frames

    def spy(self: InMemoryVideoPredictor, frames: list[np.ndarray]) -> tuple[torch.Tensor, int, int]:
        seen.append(list(frames))
        return original(self, frames)

    monkeypatch.setattr(InMemoryVideoPredictor, "load_frames", spy)
    sample = scene(31)
    spectral.label(sample)
    expected = spectral_sequence(sample.cube, sample.wavelengths, 2)
    assert len(seen) == 1 and len(seen[0]) == len(expected) == 5
    for got, want in zip(seen[0], expected, strict=True):
        np.testing.assert_array_equal(got, want.rgb)


def test_in_memory_state_matches_sam2s_jpeg_state(spectral: SpectralLabeler, tmp_path: Path) -> None:
    """The overridden init_state builds the state sam2's own builds from a JPEG folder (guards sam2 upgrades)."""
    predictor = spectral.models[0]
    frames = [f.rgb for f in spectral_sequence(scene(16).cube, scene(16).wavelengths, 1)]
    for i, rgb in enumerate(frames):
        Image.fromarray(rgb).save(tmp_path / f"{i}.jpg", quality=100)
    ours = predictor.init_state(frames)
    theirs = SAM2VideoPredictor.init_state(predictor, str(tmp_path))
    assert ours.keys() == theirs.keys()
    for key in ("num_frames", "video_height", "video_width", "offload_video_to_cpu", "storage_device"):
        assert ours[key] == theirs[key]
    assert ours["images"].shape == theirs["images"].shape == (len(frames), 3, SIZE, SIZE)
    assert (ours["images"] - theirs["images"]).abs().mean() < 0.1  # JPEG and resampling differ slightly
    # ... while the seed generator sees exactly the video's frame (same resize and normalisation)
    torch.testing.assert_close(ours["images"][0], spectral.models[1].predictor._transforms(frames[0]))


@pytest.mark.parametrize("labeler_class", [SpatialLabeler, SpectralLabeler])
def test_labeler_ids(labeler_class: type[SpatialLabeler] | type[SpectralLabeler], checkpoint: Path) -> None:
    base = labeler_class(TINY_MODEL_CONFIG, None, PERMISSIVE)
    assert labeler_class(dict(TINY_MODEL_CONFIG), None, dict(PERMISSIVE)).labeler_id == base.labeler_id
    assert labeler_class(TINY_MODEL_CONFIG, "", {**PERMISSIVE, "box_nms_thresh": 0.7}).labeler_id == base.labeler_id
    assert base.labeler_id.startswith(labeler_class.branch + "-") and base.random_init
    changed = [
        labeler_class(TINY_MODEL_CONFIG, None, {**PERMISSIVE, "points_per_side": 8}),
        labeler_class({**TINY_MODEL_CONFIG, "image_size": 256}, None, PERMISSIVE),
        labeler_class(TINY_MODEL_CONFIG, checkpoint, PERMISSIVE),
    ]
    ids = {base.labeler_id} | {lab.labeler_id for lab in changed}
    assert len(ids) == 4
    assert labeler_class(TINY_MODEL_CONFIG, checkpoint, PERMISSIVE).labeler_id == changed[-1].labeler_id


def test_spectral_stride_changes_the_id() -> None:
    a = SpectralLabeler(TINY_MODEL_CONFIG, None, {"stride": 1})
    b = SpectralLabeler(TINY_MODEL_CONFIG, None, {"stride": 2})
    assert a.labeler_id != b.labeler_id


def test_labeler_configuration_errors() -> None:
    with pytest.raises(ValueError, match="unknown labeler parameters \\['points'\\]"):
        SpatialLabeler(TINY_MODEL_CONFIG, None, {"points": 4})
    with pytest.raises(ValueError, match="'config' and 'image_size'"):
        SpatialLabeler({"config": CONFIG}, None, {})
    with pytest.raises(ValueError, match="vote"):
        SpectralLabeler(TINY_MODEL_CONFIG, None, {"vote": 1.0})
    with pytest.raises(FileNotFoundError):
        SpectralLabeler(TINY_MODEL_CONFIG, "/nonexistent/sam2.pt", {})


@pytest.mark.parametrize("labeler_name", ["spatial", "spectral"])
def test_nan_and_single_band_cubes_raise(labeler_name: str, request: pytest.FixtureRequest) -> None:
    labeler = request.getfixturevalue(labeler_name)
    sample = scene(16)
    sample.cube[2, 3, 4] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        labeler.label(sample)
    one_band = ImageSample("one", np.ones((1, 24, 32), np.float32), np.array([550.0]))
    with pytest.raises(ValueError, match="at least 3 bands"):
        labeler.label(one_band)
