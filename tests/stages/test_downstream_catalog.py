"""Heads from the catalog on the labelled fixtures: cached frozen features, each head against its trivial baseline,
a backbone that stays frozen through the whole path, checkpoints the tests save themselves, reruns that reuse."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from base.errors import InputError
from catalog.catalog import Catalog
from catalog.features import FeatureStore
from model import describe, extract_features
from stages.downstream.features import (
    BackboneSpec,
    cached_backbone,
    compute_features,
    cube_info,
    load_backbone,
    read_cube,
    resolve_checkpoint,
)
from stages.downstream.heads import evaluate_run, held_benchmarks, task_spec, train_task
from stages.downstream.outcomes import summarise
from stages.downstream.runners import BackboneConfig, HeadsConfig, TaskChoice, feature_images, run_heads
from stages.downstream.spec import TaskSpec
from stages.downstream.tasks import TASKS, ordered_tasks

TASK_DATASETS = {name: TASKS.get(name).default_dataset for name in ordered_tasks()
                 if TASKS.get(name).default_dataset in ("hsi-drive-v2-0", "hssod", "hot-2023-vis")}
"""The tasks whose benchmark the labelled fixture catalog holds (tests/conftest.py; the airborne tasks have their
own, tests/stages/test_downstream_airborne.py)."""


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _quick(task: str, img_size: int, steps: int = 2) -> TaskSpec:
    return task_spec(task, "small", img_size, dataset=TASK_DATASETS[task], steps=steps, pairs_per_sequence=2,
                     device="cpu")


def test_features_are_computed_once_and_equal_the_contract(labelled_catalog: tuple) -> None:
    cat, _ = labelled_catalog
    ids, skipped = feature_images(cat, ["hsi-drive-v2-0", "hssod", "hot-2023-vis", "nope"])
    assert set(skipped) == {"hot-2023-vis", "nope"} and "on the fly" in skipped["hot-2023-vis"]
    assert len(ids) == 24 and ids == sorted(ids[:12]) + sorted(ids[12:])
    backbone = load_backbone(BackboneSpec(seed=11), device="cpu")
    assert backbone.img_size == 128 and backbone.weights == "random-init"
    first = compute_features(cat, backbone, ids, batch_size=5)
    assert len(first.computed) == 24 and first.cached == ()
    stale = Path(cat.storage.path("features", backbone.set_id, "x@000000000000.zarr.tmp-0000000000000000-dead"))
    stale.mkdir()  # a killed writer's half-written group (its lease is gone)
    again = compute_features(cat, backbone, ids)
    assert again.computed == () and len(again.cached) == 24  # a rerun computes nothing
    assert not stale.exists()  # ... but cleans up after a killed run
    other = load_backbone(BackboneSpec(seed=12, overrides={"img_size": 64}), device="cpu")
    assert other.set_id != backbone.set_id
    store = FeatureStore(cat)
    descriptor = store.descriptor(backbone.set_id)
    assert descriptor["weights"] == "random-init" and descriptor["seed"] == 11
    assert descriptor["preprocessing"] == describe("released") and descriptor["overrides"] == {"img_size": 128}
    image_id = ids[13]  # a 12-bit HSSOD cube, batched with others
    cached = store.read(backbone.set_id, image_id)
    assert cached.attrs["weights"] == "random-init" and cached.attrs["preprocessing"]["name"] == "released"
    assert cached.attrs["original_size"] == [32, 40] and cached.attrs["input_size"] == [102, 128]
    info = cube_info(cat, image_id, backbone.spec.default_gsd_m)
    direct = extract_features(backbone.model, read_cube(cat, image_id), info.wavelengths, info.gsd_m)
    for got, want in zip(cached.maps, direct, strict=True):
        assert got.dtype == np.float16 and got.shape == tuple(want.shape[1:])
        np.testing.assert_allclose(got.astype(np.float32), want[0].numpy(), rtol=2e-2, atol=2e-2)


def test_the_backbone_stays_frozen_through_the_catalog_path(labelled_catalog: tuple, tmp_path: Path) -> None:
    """Features, every head's training (tracking: crops encoded on the fly) and evaluation into one report: no
    backbone pass runs with autograd and no backbone tensor changes; a rerun reuses every head."""
    cat, _ = labelled_catalog
    spec = BackboneSpec(seed=13)
    backbone = cached_backbone(spec, device="cpu")  # the one the heads' calls below share
    model = backbone.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grad_modes: list[bool] = []
    hook = model.image_encoder.blocks[0].register_forward_hook(lambda *_: grad_modes.append(torch.is_grad_enabled()))
    specs = [_quick(task, backbone.img_size) for task in TASK_DATASETS]
    try:
        outcomes = [train_task(cat, backbone, s, tmp_path / s.task) for s in specs]
    finally:
        hook.remove()
    assert len(grad_modes) > 20 and not any(grad_modes)  # every backbone pass ran without autograd
    assert not model.training and all(not p.requires_grad and p.grad is None for p in model.parameters())
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    result = summarise(tmp_path, outcomes, backbone)
    doc = json.loads(result.report.json.read_text())
    assert set(doc["tasks"]) == set(TASK_DATASETS) and doc["tasks"]["tracking"]["dataset"] == "hot-2023-vis"
    assert doc["provenance"] == {"weights": "random-init (seed 13)", "preprocessing": "released",
                                 "model": "tiny (img_size=128)"}
    assert all(r["trainable_parameters"] > 1000 and not r["reused"] for r in result.table)
    markdown = result.report.markdown.read_text()
    assert "random-init" in markdown and "| paper |" in markdown and "trainable parameters" in markdown
    config = HeadsConfig(out_dir=str(tmp_path), backbone=BackboneConfig.from_spec(spec), head_size="small", steps=2,
                         pairs_per_sequence=2, device="cpu", tasks=[TaskChoice(task=t) for t in TASK_DATASETS])
    again = run_heads(cat, config, backbone=backbone)
    assert all(r["reused"] for r in again.table) and again.specs == specs  # the runner resolves the same specs
    resolved = json.loads(again.config_path.read_text())
    assert resolved["config"]["head_size"] == "small" and [s["task"] for s in resolved["specs"]] == list(TASK_DATASETS)
    assert json.loads(again.report.json.read_text())["tasks"] == doc["tasks"]


def test_a_run_killed_while_reporting_reports_on_the_rerun(labelled_catalog: tuple, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """result.json is the commit point: a run killed while writing its report is not taken as finished (the rerun
    reused the result and the report never appeared when result.json was written first)."""
    import stages.downstream.heads as run_module

    cat, _ = labelled_catalog
    backbone = cached_backbone(BackboneSpec(seed=17), device="cpu")
    spec = _quick("saliency", backbone.img_size)

    def killed(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(run_module, "write_task_report", killed)
    with pytest.raises(KeyboardInterrupt):
        train_task(cat, backbone, spec, tmp_path)
    monkeypatch.undo()
    assert not (tmp_path / "result.json").exists()
    again = train_task(cat, backbone, spec, tmp_path)
    assert not again.skipped and again.report.head
    assert json.loads((tmp_path / "report.json").read_text())["tasks"]["saliency"]["head"] == again.report.head
    assert (tmp_path / "report.md").is_file()


# The done-when: the tiny random-init backbone at its downstream defaults (128 px frame, 100 head steps), each head
# against its trivial baseline on the labelled fixtures, by a margin.
def _default_run(cat: Catalog, task: str, tmp_path: Path) -> dict[str, dict[str, float]]:
    backbone = cached_backbone(BackboneSpec(), device="cpu")
    spec = task_spec(task, "small", 128, dataset=TASK_DATASETS[task], device="cpu")
    outcome = train_task(cat, backbone, spec, tmp_path)
    assert outcome.steps == 100 and outcome.report.dataset == TASK_DATASETS[task]
    return {"head": outcome.report.head, "baseline": outcome.report.baseline}


def test_segmentation_head_beats_the_spectral_classifier(labelled_catalog: tuple, tmp_path: Path) -> None:
    scores = _default_run(labelled_catalog[0], "segmentation", tmp_path)
    assert scores["head"]["miou"] > scores["baseline"]["miou"] + 0.08
    assert scores["head"]["oa"] > scores["baseline"]["oa"] + 0.15


def test_saliency_head_beats_the_centre_prior(labelled_catalog: tuple, tmp_path: Path) -> None:
    scores = _default_run(labelled_catalog[0], "saliency", tmp_path)
    assert scores["head"]["cc"] > scores["baseline"]["cc"] + 0.4
    assert scores["head"]["mae"] < scores["baseline"]["mae"] - 0.2


def test_tracking_head_beats_the_held_first_box(labelled_catalog: tuple, tmp_path: Path) -> None:
    scores = _default_run(labelled_catalog[0], "tracking", tmp_path)
    assert scores["head"]["success_auc"] > scores["baseline"]["success_auc"] + 0.15


def test_a_saved_checkpoint_is_the_provenance_and_eval_repeats_the_scores(labelled_catalog: tuple,
                                                                         tmp_path: Path) -> None:
    from safetensors.torch import save_file

    cat, _ = labelled_catalog
    weights = load_backbone(BackboneSpec(seed=14), device="cpu").model.state_dict()
    run = tmp_path / "pretrain" / "checkpoints"
    (run / "step_0000003").mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(run / "step_0000003" / "model.safetensors"))
    (run / "latest").write_text("step_0000003")
    assert resolve_checkpoint(tmp_path / "pretrain") == run / "step_0000003" / "model.safetensors"
    backbone = load_backbone(BackboneSpec(checkpoint=str(tmp_path / "pretrain")), device="cpu")
    random = load_backbone(BackboneSpec(seed=14), device="cpu")
    assert len(backbone.weights) == 64 and backbone.provenance == backbone.weights
    assert backbone.set_id != random.set_id  # same numbers, other provenance: its own feature set
    outcome = train_task(cat, backbone, _quick("saliency", 128, steps=3), tmp_path / "sal")
    recorded = json.loads((tmp_path / "sal" / "run.json").read_text())
    assert recorded["backbone"]["checkpoint"] == str((tmp_path / "pretrain").resolve())
    assert json.loads((tmp_path / "sal" / "report.json").read_text())["provenance"]["weights"] == backbone.weights
    again, paths = evaluate_run(cat, tmp_path / "sal", device="cpu")
    assert again.report.head == pytest.approx(outcome.report.head)
    assert paths.json == tmp_path / "sal" / "eval-test" / "report.json"
    with pytest.raises(InputError, match="checkpoint"):
        resolve_checkpoint(tmp_path / "nothing-here")


def test_a_run_folder_is_reused_refused_or_replaced(labelled_catalog: tuple, tmp_path: Path) -> None:
    cat, _ = labelled_catalog
    backbone = load_backbone(BackboneSpec(), device="cpu")
    spec = _quick("saliency", 128)
    first = train_task(cat, backbone, spec, tmp_path)
    assert not first.skipped and (tmp_path / "checkpoints").is_dir()
    assert train_task(cat, backbone, spec, tmp_path).skipped
    longer = dataclasses.replace(spec, train=dataclasses.replace(spec.train, steps=3))
    with pytest.raises(InputError, match="task parameters"):
        train_task(cat, backbone, longer, tmp_path)
    replaced = train_task(cat, backbone, longer, tmp_path, replace=True)
    assert not replaced.skipped and replaced.steps == 3


def test_a_wrong_dataset_or_split_names_the_field_and_the_fix(labelled_catalog: tuple, tmp_path: Path) -> None:
    cat, _ = labelled_catalog
    backbone = cached_backbone(BackboneSpec(), device="cpu")
    wrong_kind = task_spec("segmentation", "small", 128, dataset="hot-2023-vis", device="cpu")
    with pytest.raises(InputError, match=r"field 'dataset'.*no segmentation labels: its labels are track"):
        train_task(cat, backbone, wrong_kind, tmp_path)
    no_split = task_spec("saliency", "small", 128, dataset="hssod", test_split="val", device="cpu")
    with pytest.raises(InputError, match=r"field 'split'.*pass one of its splits: \['test', 'train'\]"):
        train_task(cat, backbone, no_split, tmp_path)
    assert not (tmp_path / "run.json").exists()  # nothing was recorded for runs that never started


@pytest.mark.integration
def test_the_released_b_layout_runs_every_head_at_the_paper_sizes(labelled_catalog: tuple, tmp_path: Path) -> None:
    """hypervision_b at its released 512 px frame through the same path: paper-sized heads (about 15.7 M, 4.1 M and
    25.9 M trainable parameters), one step each; the CUDA path (bf16) is the same code."""
    cat, _ = labelled_catalog
    backbone = load_backbone(BackboneSpec(model="hypervision_b"), device="cpu")
    assert backbone.img_size == 512 and backbone.layout.strides == (16, 32, 32, 32)
    sizes = {"segmentation": (15.5e6, 16.0e6), "saliency": (4.0e6, 4.3e6), "tracking": (25.4e6, 26.0e6)}
    for task, (low, high) in sizes.items():
        spec = task_spec(task, "paper", backbone.img_size, dataset=TASK_DATASETS[task], steps=1,
                         device="cpu", pairs_per_sequence=1)
        assert spec.train.batch_size == 8 and spec.tracker.crop_px == 512
        outcome = train_task(cat, backbone, spec, tmp_path / task)
        assert low < outcome.trainable_parameters < high, task
        assert json.loads((tmp_path / task / "report.json").read_text())["provenance"]["model"] == "hypervision_b"


def test_held_benchmarks_leaves_out_tasks_whose_dataset_the_catalog_lacks(labelled_catalog: tuple) -> None:
    cat = labelled_catalog[0]
    held, missing = held_benchmarks(cat, {**TASK_DATASETS, "segmentation": "hyperspectral-city-v2"})
    assert held == {"saliency": "hssod", "tracking": "hot-2023-vis"}
    assert missing == ["segmentation needs hyperspectral-city-v2, which the catalog does not hold"]
