"""Labelling and fusion without Prefect: the label and fuse runners, branch agreement."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from catalog.catalog import Catalog
from catalog.fixtures import write_dataset
from catalog.masks import MaskSet, table_from_masks
from stages.ingest import IngestConfig, run_ingest
from stages.labelling.label import (
    FuseConfig,
    LabelConfig,
    LabelerSpec,
    branch_agreement,
    run_fuse,
    run_label,
)
from stages.registry import STAGES


def _set(masks: np.ndarray, branch: str) -> MaskSet:
    return MaskSet(masks, table_from_masks(masks, branch, score=1.0), branch)


def test_branch_agreement_is_mean_best_iou_across_branches() -> None:
    a = np.zeros((1, 8, 8), bool)
    a[0, :4] = True
    half = np.zeros((1, 8, 8), bool)
    half[0, :2] = True  # IoU with a = 0.5
    assert branch_agreement([_set(a, "spatial"), _set(a.copy(), "material")]) == 1.0
    assert branch_agreement([_set(a, "spatial"), _set(half, "material")]) == 0.5
    assert branch_agreement([_set(a, "spatial"), _set(~a, "material")]) == 0.0
    assert branch_agreement([_set(a, "spatial")]) == 0.0  # nothing to agree with


PERMISSIVE = {"points_per_side": 2, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}
LABELERS = {
    "spatial": LabelerSpec(model={"config": "configs/sam2.1/sam2.1_hiera_t.yaml", "image_size": 64},
                           params=PERMISSIVE),
    "spectral": LabelerSpec(model={"config": "configs/sam2.1/sam2.1_hiera_t.yaml", "image_size": 64},
                            params={**PERMISSIVE, "stride": 7, "max_objects": 2}),
    "material": LabelerSpec(model={"model": "tiny"}, params=PERMISSIVE),
}


def test_label_and_fuse_runners_record_their_config_and_do_only_what_is_left(tmp_path: Path) -> None:
    """The runners the flows, the CLI's --plain path and the fault harness share: each branch labels every image
    once, fusion fuses them, each records its resolved config in the catalog, and a rerun does nothing."""
    write_dataset("hot-2024-rednir", tmp_path / "src")
    cat = Catalog(tmp_path / "cat").init()
    run_ingest(cat, IngestConfig(source_root=str(tmp_path / "src")))
    images = sorted(cat.images()["image_id"])
    assert STAGES.get("label").run is run_label and STAGES.get("fuse").config is FuseConfig
    for branch, spec in LABELERS.items():
        config = LabelConfig(branch=branch, labeler=spec)
        result = run_label(cat, config)
        assert sorted(r["image_id"] for r in result.rows) == images and result.masks >= len(images)
        assert result.summary()["labelled"] == len(images) and result.weights == "random-init"
        recorded = json.loads(cat.storage.read_bytes(f"stages/label-{branch}.json"))
        assert recorded["config"] == config.model_dump(mode="json")
        again = run_label(cat, config)
        assert again.rows == [] and again.masks == result.masks
    fuse_config = FuseConfig(labelers=LABELERS, tau=0.7, overlays=1)
    fused = run_fuse(cat, fuse_config)
    assert sorted(r["image_id"] for r in fused.fused) == images and len(fused.overlays) == 1
    assert all(r["fused_masks"] >= 1 for r in fused.report) and fused.random_init == list(sorted(LABELERS))
    for image_id in images:
        assert cat.fused(image_id).labeler_id == fused.fusion_id
    assert json.loads(cat.storage.read_bytes("stages/fuse.json"))["config"]["tau"] == 0.7
    assert run_fuse(cat, fuse_config).fused == [] and cat.verify().healthy
