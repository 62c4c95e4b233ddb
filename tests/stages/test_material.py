"""Tests of the material branch: HyperFree predictor, automatic masks and the material labeler (tiny model, CPU)."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from base.errors import InputError
from catalog.catalog import Catalog
from catalog.fixtures.synth import scene
from catalog.masks import MASK_FIELDS, MaskSet, MaskStore
from model import create_model, describe, extract_features
from model.hyperfree import file_sha256
from stages.labelling.labeler import RANDOM_INIT, ImageSample
from stages.labelling.material import (
    DEFAULT_GSD_M,
    HyperFreeAutomaticMaskGenerator,
    HyperFreePredictor,
    MaterialLabeler,
    hyperfree_automatic_masks,
    material_features,
)

# Random weights predict low IoU and unstable masks: disable both filters and keep the point grid small.
TEST_PARAMS = {"points_per_side": 4, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}
HEIGHT, WIDTH = 40, 48


def make_sample(bands: int, image_id: str = "synth/0", seed: int = 0, gsd_m: float | None = None) -> ImageSample:
    """A seeded scene (three objects with distinct spectra) with `bands` bands over 400-1000 nm."""
    wl = np.linspace(400.0, 1000.0, bands)
    cube = scene(np.random.default_rng(seed), wl, HEIGHT, WIDTH, objects=3).astype(np.float32)
    return ImageSample(image_id=image_id, cube=cube, wavelengths=wl, gsd_m=gsd_m)


def tiny_labeler(checkpoint: str | Path | None = None, **params: object) -> MaterialLabeler:
    return MaterialLabeler({"model": "tiny"}, checkpoint, {**TEST_PARAMS, **params}, device="cpu")


def seeded_state_dict(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return create_model("tiny").state_dict()


# ---------------------------------------------------------------- predictor


def test_predictor_embedding_is_extract_features_neck_and_predict_works() -> None:
    model = create_model("tiny").eval()
    sample = make_sample(31)
    cube_hwc = np.moveaxis(sample.cube, 0, -1)
    predictor = HyperFreePredictor(model)
    predictor.set_image(cube_hwc, sample.wavelengths, 0.3)
    neck = extract_features(model, cube_hwc, sample.wavelengths, 0.3)[-1]
    torch.testing.assert_close(predictor.get_image_embedding(), neck, rtol=0, atol=0)
    assert predictor.original_size == (HEIGHT, WIDTH)
    assert predictor.input_size == (53, 64)  # longest side 48 -> 64 (tiny img_size), 40 * 64 / 48 = 53.3

    masks, iou, low_res = predictor.predict(point_coords=np.array([[20.0, 10.0]]), point_labels=np.array([1]))
    assert masks.shape == (3, HEIGHT, WIDTH) and masks.dtype == bool
    assert iou.shape == (3,) and low_res.shape == (3, 32, 32)  # 4x the 8x8 token grid

    # The GSD reaches the encoder (scale-aware position embedding): another GSD, another embedding.
    predictor.set_image(cube_hwc, sample.wavelengths, 30.0)
    assert not torch.allclose(predictor.get_image_embedding(), neck)


def test_predictor_needs_wavelengths_and_gsd() -> None:
    predictor = HyperFreePredictor(create_model("tiny").eval())
    cube_hwc = np.moveaxis(make_sample(16).cube, 0, -1)
    with pytest.raises(ValueError, match="wavelengths"):
        predictor.set_image(cube_hwc)
    with predictor.sensor(np.linspace(400.0, 1000.0, 16), 0.5):
        predictor.set_image(cube_hwc)
    assert predictor.is_image_set
    with pytest.raises(NotImplementedError, match="set_image"):
        predictor.set_torch_image(torch.zeros(1, 3, 64, 64), (64, 64))


# ---------------------------------------------------------------- automatic masks


def test_automatic_mask_generator_uses_seg_any_hsi_defaults() -> None:
    gen = HyperFreeAutomaticMaskGenerator(create_model("tiny").eval())
    assert (gen.pred_iou_thresh, gen.stability_score_thresh) == (0.6, 0.6)
    assert (gen.points_per_batch, gen.box_nms_thresh, gen.crop_n_layers) == (64, 0.7, 0)
    assert gen.point_grids[0].shape == (32 * 32, 2)
    assert isinstance(gen.predictor, HyperFreePredictor)


def test_hyperfree_automatic_masks_returns_sam_records_at_image_size() -> None:
    sample = make_sample(25)
    records = hyperfree_automatic_masks(
        create_model("tiny").eval(), np.moveaxis(sample.cube, 0, -1), sample.wavelengths, 0.5, **TEST_PARAMS
    )
    assert len(records) >= 1
    for r in records:
        assert r["segmentation"].shape == (HEIGHT, WIDTH)
        assert r["area"] == int(r["segmentation"].sum())
        assert {"predicted_iou", "stability_score", "point_coords", "bbox"} <= set(r)


# ---------------------------------------------------------------- labeler


@pytest.mark.parametrize("bands", [16, 25, 31, 150])
def test_labeler_gives_well_formed_masksets(bands: int) -> None:
    labeler = tiny_labeler()
    sample = make_sample(bands)
    out = labeler.label(sample)
    assert isinstance(out, MaskSet)
    assert len(out) >= 1
    assert out.masks.shape == (len(out), HEIGHT, WIDTH) and out.masks.dtype == bool
    table = out.table
    assert set(MASK_FIELDS) <= set(table.columns)
    assert (table["branch"] == "material").all()
    np.testing.assert_array_equal(table["area"], out.masks.reshape(len(out), -1).sum(axis=1))
    assert (table["area"] > 0).all()
    np.testing.assert_array_equal(table["score"], table["predicted_iou"])
    assert table["stability"].notna().all()
    for row, mask in zip(table.itertuples(), out.masks, strict=True):
        assert mask[row.prompt_y, row.prompt_x]
        ys, xs = np.nonzero(mask)
        assert (row.bbox_x0, row.bbox_y0, row.bbox_x1, row.bbox_y1) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    assert out.labeler_id == labeler.labeler_id and out.labeler_id.startswith("material-")
    assert out.attrs is not None
    assert out.attrs["random_init"] is True and out.attrs["weights"] == RANDOM_INIT
    assert (out.attrs["gsd_m"], out.attrs["gsd_source"]) == (DEFAULT_GSD_M, "default")
    assert out.attrs["bands"] == bands


def test_random_init_is_seeded_and_gsd_comes_from_the_sample() -> None:
    sample = make_sample(31, gsd_m=0.002)
    one, two = tiny_labeler(), tiny_labeler()
    for key, value in one.model.state_dict().items():
        torch.testing.assert_close(two.model.state_dict()[key], value, rtol=0, atol=0)
    assert not torch.equal(
        tiny_labeler(init_seed=1).model.mask_decoder.output_upscaling[0].weight,
        one.model.mask_decoder.output_upscaling[0].weight,
    )
    first, second = one.label(sample), two.label(sample)
    np.testing.assert_array_equal(first.masks, second.masks)
    assert first.attrs is not None and (first.attrs["gsd_m"], first.attrs["gsd_source"]) == (0.002, "sample")


def test_labeler_id_changes_with_params_and_checkpoint(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    state = seeded_state_dict(1)
    pth, st = tmp_path / "hf.pth", tmp_path / "hf.safetensors"
    torch.save(state, pth)
    save_file(state, str(st))

    base = tiny_labeler()
    assert base.descriptor()["weights"] == RANDOM_INIT and base.random_init
    assert tiny_labeler().labeler_id == base.labeler_id
    assert tiny_labeler(points_per_side=5).labeler_id != base.labeler_id
    assert tiny_labeler(default_gsd_m=1.0).labeler_id != base.labeler_id

    caplog.set_level(logging.INFO, logger="stages.labelling.material")
    from_pth, from_st = tiny_labeler(pth), tiny_labeler(st)
    assert len({base.labeler_id, from_pth.labeler_id, from_st.labeler_id}) == 3
    assert from_pth.descriptor()["weights"] == file_sha256(pth)
    assert from_st.descriptor()["weights"] == file_sha256(st)
    assert not from_pth.random_init
    load = from_pth.descriptor()["checkpoint_load"]
    assert (load["loaded"], load["missing"], load["unexpected"]) == (len(state), 0, 0)
    assert f"loaded {len(state)} tensors from {pth}" in caplog.text
    for key, value in state.items():
        torch.testing.assert_close(from_st.model.state_dict()[key], value, rtol=0, atol=0)

    sample = make_sample(31)
    a, b = from_pth.label(sample), from_st.label(sample)
    assert len(a) >= 1
    np.testing.assert_array_equal(a.masks, b.masks)
    np.testing.assert_array_equal(a.table["predicted_iou"], b.table["predicted_iou"])
    assert a.attrs is not None and a.attrs["random_init"] is False and a.attrs["weights"] == file_sha256(pth)


def test_missing_and_unexpected_keys_are_refused_unless_non_strict(tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    state = seeded_state_dict(2)
    dropped = "mask_decoder.iou_prediction_head.layers.0.weight"
    del state[dropped]
    state["image_encoder.extra_head.weight"] = torch.zeros(2)
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    with pytest.raises(InputError, match=r"missing 1: \['mask_decoder.iou_prediction_head.*unexpected 1"):
        tiny_labeler(path)
    caplog.set_level(logging.WARNING)
    labeler = MaterialLabeler({"model": "tiny", "strict": False}, path, TEST_PARAMS, device="cpu")
    assert labeler.load_report is not None and not labeler.load_report.strict
    assert labeler.load_report.missing == (dropped,)
    assert labeler.load_report.unexpected == ("image_encoder.extra_head.weight",)
    load = labeler.descriptor()["checkpoint_load"]
    assert (load["missing"], load["unexpected"]) == (1, 1)
    assert load["missing_keys"] == [dropped]
    assert "1 missing, 1 unexpected" in caplog.text and dropped in caplog.text


def test_material_features_is_extract_features_with_the_sample_gsd() -> None:
    model = create_model("tiny").eval()
    sample = make_sample(25, gsd_m=0.2)
    feats = material_features(model, sample)
    expected = extract_features(model, np.moveaxis(sample.cube, 0, -1), sample.wavelengths, 0.2)
    assert len(feats) == len(expected) == 2  # tiny: one global block output + the neck
    for got, want in zip(feats, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    unknown = material_features(model, make_sample(25))
    default = extract_features(model, np.moveaxis(sample.cube, 0, -1), sample.wavelengths, DEFAULT_GSD_M)
    torch.testing.assert_close(unknown[-1], default[-1], rtol=0, atol=0)


def test_preprocessing_contract_is_a_parameter_recorded_in_the_labeler_id() -> None:
    released, crop_max = tiny_labeler(), tiny_labeler(preprocessing="crop_max")
    assert released.params["preprocessing"] == "released"
    assert released.descriptor()["preprocessing"] == describe("released")
    assert crop_max.descriptor()["preprocessing"] == describe("crop_max")
    assert released.labeler_id != crop_max.labeler_id
    sample = make_sample(31, gsd_m=0.3)
    sample.cube = sample.cube * 4095 + 1000  # 12-bit counts over a dark offset
    cube_hwc = np.moveaxis(sample.cube, 0, -1)
    for labeler, contract in ((released, "released"), (crop_max, "crop_max")):
        labeler.generator.predictor.set_image(cube_hwc, sample.wavelengths, 0.3)
        expected = extract_features(labeler.model, cube_hwc, sample.wavelengths, 0.3, contract)[-1]
        torch.testing.assert_close(labeler.generator.predictor.get_image_embedding(), expected, rtol=0, atol=0)
    assert labeler.label(sample).attrs["preprocessing"] == "crop_max"  # type: ignore[index]
    with pytest.raises(ValueError, match="Unknown preprocessing contract 'raw'"):
        tiny_labeler(preprocessing="raw")


def test_any_registered_layout_labels_including_patch_merging() -> None:
    # A hypervision_b-shaped layout (global attention and patch merging as released) shrunk to CPU size: the mask
    # decoder reads the merged 4 x 4 neck grid.
    small = {"img_size": 64, "patch_size": 8, "embed_dim": 32, "depth": 4, "num_heads": 2, "window_size": 3,
             "global_attn_indexes": (1, 2, 3), "merge_indexes": (0, 4), "decoder_mlp_dim": 64}
    labeler = MaterialLabeler({"model": "hypervision_b", **small}, None, TEST_PARAMS, device="cpu")
    assert labeler.resolved_config.name == "hypervision_b"
    assert labeler.resolved_config.encoder.output_grid_size == 4
    out = labeler.label(make_sample(31))
    assert out.masks.shape[1:] == (HEIGHT, WIDTH) and len(out) >= 1


# ---------------------------------------------------------------- bad input


def test_nan_or_inf_cube_is_rejected_with_the_image_id() -> None:
    labeler = tiny_labeler()
    sample = make_sample(16, image_id="cave/broken")
    sample.cube[3, 5, 5] = np.nan
    sample.cube[4, 0, 0] = np.inf
    with pytest.raises(ValueError, match=r"'cave/broken'.*1 NaN and 1 Inf.*bands \[3, 4\]"):
        labeler.label(sample)
    with pytest.raises(ValueError, match="NaN"):
        material_features(labeler.model, sample)


def test_unmatched_wavelengths_error_names_the_image() -> None:
    labeler = tiny_labeler()
    sample = make_sample(16, image_id="swir/far")
    sample.wavelengths = np.linspace(2600.0, 3000.0, 16)
    with pytest.raises(ValueError, match=r"image 'swir/far': No input band lies within 10 nm"):
        labeler.label(sample)


def test_missing_checkpoint_and_bad_config_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        tiny_labeler(missing)
    with pytest.raises(ValueError, match="points_per_sid"):
        tiny_labeler(points_per_sid=4)
    with pytest.raises(ValueError, match="lacks 'model'"):
        MaterialLabeler({}, None, TEST_PARAMS)


@pytest.mark.skipif(importlib.util.find_spec("cv2") is not None, reason="OpenCV is installed here")
def test_small_region_cleanup_without_opencv_says_how_to_fix() -> None:
    with pytest.raises(ModuleNotFoundError, match="min_mask_region_area=10 needs OpenCV"):
        tiny_labeler(min_mask_region_area=10)


# ---------------------------------------------------------------- through the catalog


def test_labels_a_catalogued_image_into_the_mask_store(tmp_path: Path) -> None:
    from catalog.fixtures import write_dataset
    from catalog.specs import spec_for_folder
    from stages.ingest import ingest_item, plan
    from stages.ingest.discover import item_for
    from stages.labelling.label import label_image

    write_dataset("cave", tmp_path / "src")
    cat = Catalog(str(tmp_path / "cat"))
    work = plan(tmp_path / "src", cat).items[0]
    spec = spec_for_folder(Path(work.folder))
    assert spec is not None
    ingest_item(cat, spec, item_for(Path(work.folder), spec, work.primary))
    image_id = str(cat.images()["image_id"].iloc[0])

    labeler = tiny_labeler()
    row = label_image(cat, image_id, labeler)
    stored = MaskStore(cat).read(image_id, labeler_id=labeler.labeler_id)
    da = cat.open(image_id)
    assert row["weights"] == RANDOM_INIT and row["masks"] == len(stored) >= 1
    assert stored.masks.shape[1:] == da.shape[1:]
    assert stored.attrs is not None and stored.attrs["random_init"] is True
    assert (stored.table["branch"] == "material").all()
