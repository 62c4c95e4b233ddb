"""HyperSIGMA's masked-autoencoder objectives through the pretraining runner: crops of contiguous bands from the
catalog, a few steps with resume, and checkpoints that load into the encoder key for key and as a frozen backbone."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from base.errors import InputError
from catalog.catalog import Catalog
from catalog.fixtures import write_dataset
from model.hypersigma import HyperSigmaConfig, create_mae, encoder_state_dict, load_pretrained
from model.registry import get_config
from stages.downstream.features import BackboneSpec, load_backbone
from stages.ingest import IngestConfig, run_ingest
from stages.pretraining import PretrainStageConfig, run_pretrain, train
from stages.pretraining.config import MAESettings
from stages.pretraining.mae import MAECropDataset, scan_mae_images
from stages.pretraining.run import run_folder

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> Catalog:
    """CAVE (31 bands) and HOT-2024 RedNIR (15 bands): the tiny MAE's 18-band crops fit only CAVE."""
    root = tmp_path_factory.mktemp("mae")
    for slug in ("cave", "hot-2024-rednir"):
        write_dataset(slug, root / "src")
    cat = Catalog(str(root / "cat")).init()
    assert not run_ingest(cat, IngestConfig(source_root=str(root / "src"))).problems
    return cat


def _config(tmp_path: Path, objective: str, steps: int, **fields: object) -> PretrainStageConfig:
    return PretrainStageConfig(model="hypersigma_tiny", objective=objective, steps=steps, batch_size=2,
                               checkpoint_every=1, device="cpu", out_dir=str(tmp_path / objective), **fields)


def test_crops_are_contiguous_bands_and_narrow_cubes_are_left_out(catalog: Catalog) -> None:
    images, left_out = scan_mae_images(catalog, 18)
    assert images and all(i.bands >= 18 for i in images)
    assert left_out and all("15 bands < 18" in why for why in left_out.values())
    settings = MAESettings.tiny()
    crop = MAECropDataset(catalog.uri, images, settings)[(0, 3)]
    assert crop.shape == (18, 32, 32) and crop.dtype == torch.float32
    assert torch.equal(crop, MAECropDataset(catalog.uri, images, settings)[(0, 3)])
    with pytest.raises(InputError, match="mae.bands"):
        scan_mae_images(catalog, 10_000)


@pytest.mark.parametrize("objective", ["mae_spatial", "mae_spectral"])
def test_mae_runs_resumes_and_loads_into_the_encoder(catalog: Catalog, tmp_path: Path, objective: str) -> None:
    whole = run_pretrain(catalog, _config(tmp_path / "whole", objective, 3))
    config = _config(tmp_path, objective, 3)
    part = train(run_folder(catalog, config)[0], until_step=2)  # a run cut off after two steps
    assert part.steps_done == 2
    resumed = run_pretrain(catalog, config.model_copy(update={"resume": True}))
    assert whole.steps_done == resumed.steps_done == 3
    assert resumed.final["loss"] == pytest.approx(whole.final["loss"], rel=1e-5)
    rows = list(csv.DictReader(Path(resumed.metrics_csv).read_text().splitlines()))
    assert [int(r["step"]) for r in rows] == [0, 1, 2]
    recorded = json.loads((Path(resumed.out_dir) / "config.json").read_text())
    assert recorded["objective"] == objective and recorded["input"]["mask_ratio"] == 0.75
    assert recorded["input"]["scale"].startswith("raw values / ") and recorded["left_out"]
    assert recorded["config"]["mae"]["bands"] == 18

    state = load_file(str(Path(resumed.checkpoint) / "model.safetensors"))
    kind = objective.removeprefix("mae_")
    reference = create_mae("hypersigma_tiny", kind, img_size=32, in_chans=18, patch_size=4)  # type: ignore[arg-type]
    assert set(state) == set(reference.state_dict())  # the whole MAE in the release's layout
    base: HyperSigmaConfig = get_config("hypersigma_tiny")
    encoder = base.spatial_encoder() if kind == "spatial" else base.spectral_encoder()
    report = load_pretrained(encoder, state, released_edits=False, strict=True)
    assert set(report.loaded) == set(encoder_state_dict(reference)) and not report.resized
    assert all(torch.equal(encoder.state_dict()[k], state[k]) for k in report.loaded)

    backbone = load_backbone(BackboneSpec(model="hypersigma_tiny", checkpoint=resumed.out_dir), "cpu")
    branch = backbone.model.spat_encoder if kind == "spatial" else backbone.model.spec_encoder
    assert torch.equal(branch.blocks[0].attn.qkv.weight, state["blocks.0.attn.qkv.weight"])
    assert "random-init" in backbone.provenance


def test_hypervision_models_are_refused_by_the_mae_objectives(catalog: Catalog, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a HyperSIGMA layout"):
        run_pretrain(catalog, PretrainStageConfig(model="tiny", objective="mae_spatial", steps=1, device="cpu",
                                                  out_dir=str(tmp_path / "x")))
    with pytest.raises(ValueError, match="pretraining objective"):
        PretrainStageConfig(objective="mae")
