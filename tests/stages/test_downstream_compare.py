"""Backbones compared side by side on the labelled fixtures: one report with a row per backbone and task, the
baseline's and the paper's rows, parameters and feature time; features cached per backbone."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from stages.downstream.compare import CompareConfig, CompareEntry, run_compare
from stages.downstream.runners import BackboneConfig, TaskChoice
from stages.registry import STAGES

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _config(out: Path, *entries: CompareEntry) -> CompareConfig:
    return CompareConfig(out_dir=str(out), backbones=list(entries), head_size="small", steps=2, device="cpu",
                         timing_images=1, tasks=[TaskChoice(task="segmentation"), TaskChoice(task="saliency")])


def test_compare_report_has_a_row_per_backbone_and_task(labelled_catalog: tuple, tmp_path: Path) -> None:
    cat, _ = labelled_catalog
    assert STAGES.get("compare").run is run_compare
    tiny = CompareEntry(backbone=BackboneConfig(model="tiny", seed=721))
    sigma = CompareEntry(backbone=BackboneConfig(model="hypersigma_tiny", seed=721))
    result = run_compare(cat, _config(tmp_path, tiny, sigma))
    frame = pd.read_parquet(result.parquet)
    ours = frame[frame["source"] == "this run"]
    assert sorted(zip(ours["backbone"], ours["task"], strict=True)) == sorted(
        (b, t) for b in ("tiny (random-init)", "hypersigma_tiny (random-init)") for t in ("segmentation", "saliency"))
    assert ours["random_init"].all() and ours["weights"].str.contains("random-init").all()
    assert (ours["trainable_parameters"] > 0).all() and (ours["feature_ms_per_image"] > 0).all()
    assert ours.groupby("backbone")["backbone_parameters"].first().nunique() == 2
    paper = frame[frame["source"] == "paper"]
    assert "HyperVision (head-only)" in set(paper["backbone"]) and set(paper["task"]) == {"segmentation", "saliency"}
    assert len(frame[frame["source"] == "baseline"]) == 2
    seg = paper[(paper["task"] == "segmentation") & (paper["backbone"] == "HyperVision (head-only)")].iloc[0]
    assert seg["mIoU %"] == 83.51 and seg["value"] == pytest.approx(0.8351)
    doc = json.loads(result.json.read_text())
    assert set(doc["random_init"]) == {"tiny (random-init)", "hypersigma_tiny (random-init)"}
    md = result.markdown.read_text()
    assert "random-init" in md and "## segmentation on hsi-drive-v2-0" in md and "hypersigma_tiny" in md
    assert all(p.is_file() for p in result.heads_reports.values())

    # adding a backbone encodes only its own features; the others' heads are reused
    third = CompareEntry(label="tiny seed 722", backbone=BackboneConfig(model="tiny", seed=722))
    again = run_compare(cat, _config(tmp_path, tiny, sigma, third))
    table = pd.read_parquet(again.parquet)
    ours = table[table["source"] == "this run"]
    assert len(ours) == 6
    assert dict(ours.groupby("backbone")["reused"].all()) == {"tiny (random-init)": True,
                                                                "hypersigma_tiny (random-init)": True,
                                                                "tiny seed 722": False}


def test_compare_refuses_the_same_backbone_twice(labelled_catalog: tuple, tmp_path: Path) -> None:
    cat, _ = labelled_catalog
    entry = BackboneConfig(model="tiny", seed=721)
    with pytest.raises(ValueError, match="same backbone"):
        run_compare(cat, _config(tmp_path, CompareEntry(label="a", backbone=entry),
                                 CompareEntry(label="b", backbone=entry)))
    with pytest.raises(ValueError, match="labels must differ"):
        _config(tmp_path, CompareEntry(backbone=entry), CompareEntry(backbone=entry))
