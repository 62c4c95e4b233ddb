"""HyperSIGMA as a frozen backbone of the downstream stages: features through run_features, a head through run_heads
(sized from the registry's feature layout), and weights from an encoder checkpoint loaded into its branch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model.hypersigma import create_mae, encoder_state_dict
from model.registry import feature_info
from stages.downstream.features import BackboneSpec, load_backbone
from stages.downstream.runners import BackboneConfig, FeaturesConfig, HeadsConfig, TaskChoice, run_features, run_heads

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_hypersigma_features_and_a_head(labelled_catalog: tuple, tmp_path: Path) -> None:
    cat, _ = labelled_catalog
    backbone = BackboneConfig(model="hypersigma_tiny", seed=711)
    feats = run_features(cat, FeaturesConfig(backbone=backbone, datasets=["hssod"], device="cpu"))
    assert feats.computed == feats.rows[0]["images"] > 0 and "random-init" in feats.weights
    loaded = load_backbone(backbone.to_spec(), "cpu")
    assert loaded.spec.preprocessing == "hypersigma" and loaded.img_size == 32
    assert loaded.descriptor["preprocessing"]["name"] == "hypersigma"
    info = feature_info("hypersigma_tiny")
    assert loaded.layout.channels == tuple(i["num_chs"] for i in info)
    assert loaded.layout.strides == tuple(i["reduction"] for i in info)
    heads = run_heads(cat, HeadsConfig(out_dir=str(tmp_path), backbone=backbone, head_size="small", steps=2,
                                       device="cpu", tasks=[TaskChoice(task="saliency")]), backbone=loaded)
    row = heads.table[0]
    assert row["task"] == "saliency" and row["steps"] == 2 and row["trainable_parameters"] > 0
    assert heads.feature_set == feats.set_id
    assert "random-init" in (tmp_path / "report.md").read_text()


def test_hypersigma_contract_is_the_family_default_and_checked() -> None:
    assert BackboneSpec(model="hypersigma_tiny").preprocessing == "hypersigma"
    assert BackboneSpec(model="tiny").preprocessing == "released"
    with pytest.raises(ValueError, match="HyperSIGMA contract"):
        BackboneSpec(model="hypersigma_tiny", preprocessing="released")


def test_spectral_encoder_checkpoint_loads_into_its_branch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    mae = create_mae("hypersigma_tiny", "spectral")
    path = tmp_path / "spec.pth"
    torch.save({"model": encoder_state_dict(mae)}, path)
    loaded = load_backbone(BackboneSpec(model="hypersigma_tiny", checkpoint=str(path)), "cpu")
    assert torch.equal(loaded.model.spec_encoder.blocks[0].attn.qkv.weight, mae.blocks[0].attn.qkv.weight)
    assert "spat_encoder" in loaded.descriptor["load"]["random_parts"]
    assert "random-init" in loaded.provenance and loaded.weights in loaded.descriptor["load"]["sha256"]
