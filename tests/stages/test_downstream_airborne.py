"""HyperSIGMA's airborne fine-tuning tasks through run_heads on tiny fixture scenes: pixel classification with PCA
input on the frozen or fine-tuned backbone (tune=head|full), scored against direct computation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal, cast

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from catalog.catalog import Catalog
from stages.downstream.checkpoints import load_head
from stages.downstream.features import BackboneSpec, load_backbone, read_cube
from stages.downstream.heads import evaluate_run
from stages.downstream.pixels import PixelSplit, Scene, pca
from stages.downstream.runners import BackboneConfig, HeadsConfig, TaskChoice, run_heads
from stages.downstream.spec import TaskSpec, task_fingerprint
from stages.downstream.tasks import TASKS
from stages.metrics import classification_metrics

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

TASK = "airborne_classification"


@pytest.fixture(scope="module")
def airborne(tmp_path_factory: pytest.TempPathFactory) -> Catalog:
    """The Indian Pines fixture scene ingested (its seeded per-pixel split)."""
    from catalog.fixtures import write_dataset
    from stages.ingest import IngestConfig, run_ingest

    root = tmp_path_factory.mktemp("airborne-sources")
    write_dataset("indian-pines", root)
    cat = Catalog(tmp_path_factory.mktemp("airborne") / "catalog").init()
    assert not run_ingest(cat, IngestConfig(source_root=str(root))).problems
    return cat


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _run(cat: Catalog, out: Path, model: str, tune: Literal["head", "full"], steps: int = 15) -> tuple:
    backbone = load_backbone(BackboneSpec(model=model, seed=3), "cpu")
    before = _state(backbone.model)
    result = run_heads(cat, HeadsConfig(out_dir=str(out), backbone=BackboneConfig(model=model, seed=3),
                                        head_size="small", steps=steps, device="cpu", tune=tune,
                                        tasks=[TaskChoice(task=TASK, dataset="indian-pines")]), backbone=backbone)
    return result, backbone, before


def test_classification_on_hypersigma_head_only(airborne: Catalog, tmp_path: Path) -> None:
    result, backbone, before = _run(airborne, tmp_path, "hypersigma_tiny", "head")
    row, outcome = result.table[0], result.outcomes[0]
    ann = airborne.annotation(airborne.images("indian-pines")["image_id"].iloc[0])
    assert row["train_items"] == int((ann.pixels("train") & (ann.array > 0)).sum())
    assert row["test_items"] == int((ann.pixels("test") & (ann.array > 0)).sum())
    head, base = outcome.report.head, outcome.report.baseline
    # the PCA input is recorded: the card's 30 components (fewer bands: all of them)
    bands = airborne.open(ann.image_id)["wavelength"].size
    assert head["pca_components"] == min(30, bands) and 0 < head["pca_variance_kept"] <= 1
    # OA / AA / kappa agree with the confusion matrix the head's predictions gave
    cm = outcome.report.confusion
    assert head["oa"] == pytest.approx(np.trace(cm) / cm.sum())
    assert head["aa"] == pytest.approx(np.mean(np.diag(cm) / cm.sum(1)))
    assert {"oa", "aa", "kappa"} <= set(base) and 0 <= base["oa"] <= 1
    # the frozen backbone did not move; the head is the MLP only
    assert all(torch.equal(before[k], v) for k, v in backbone.model.state_dict().items())
    trained, _ = load_head(tmp_path / TASK)
    assert trained.backbone is None and row["trainable_parameters"] == sum(p.numel() for p in trained.parameters())
    run = json.loads((tmp_path / TASK / "run.json").read_text())
    assert run["spec"]["tune"] == "head"
    report = (tmp_path / "report.md").read_text()
    assert "tune=head: frozen backbone" in report and "random-init" in report and "92.42" in report


def test_full_tuning_changes_the_backbone_copy_and_is_fingerprinted(airborne: Catalog, tmp_path: Path) -> None:
    result, backbone, before = _run(airborne, tmp_path, "hypersigma_tiny", "full")
    tuned, _ = load_head(tmp_path / TASK)
    assert isinstance(tuned.backbone, torch.nn.Module)
    moved = [k for k, v in tuned.backbone.state_dict().items() if not torch.equal(v, before[k])]
    assert moved, "tune=full left every backbone weight as loaded"
    # the loaded (frozen) backbone itself is untouched: the head tunes its own copy
    assert all(torch.equal(before[k], v) for k, v in backbone.model.state_dict().items())
    assert result.table[0]["trainable_parameters"] == sum(p.numel() for p in tuned.parameters())
    assert "tune=full: fine-tuned backbone" in (tmp_path / "report.md").read_text()
    # scoring again from the run folder rebuilds the head with its tuned backbone and gives the same scores
    again, _ = evaluate_run(airborne, tmp_path / TASK, device="cpu")
    assert again.report.head["oa"] == pytest.approx(result.outcomes[0].report.head["oa"])


def test_tune_is_in_the_fingerprint_and_head_keeps_earlier_ones() -> None:
    head = TASKS.get(TASK).spec("small", 32, tune="head")
    full = TASKS.get(TASK).spec("small", 32, tune="full")
    a, b = task_fingerprint(head, "set", "labels"), task_fingerprint(full, "set", "labels")
    assert a["fingerprint"] != b["fingerprint"] and "tune" not in a["spec"] and b["spec"]["tune"] == "full"
    assert TaskSpec.from_dict(full.to_dict()).tune == "full"


def test_head_only_tasks_refuse_full_tuning(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="segmentation.*tune='head'"):
        HeadsConfig(out_dir=str(tmp_path), tune="full", tasks=[TaskChoice(task="segmentation")])
    with pytest.raises(ValueError, match="supports tune=\\['head'\\]"):
        TASKS.get("tracking").spec("small", 32, tune="full")


def test_classification_on_hyperfree_tiny(airborne: Catalog, tmp_path: Path) -> None:
    result, _, _ = _run(airborne, tmp_path, "tiny", "head", steps=10)
    head = result.outcomes[0].report.head
    assert 0 <= head["oa"] <= 1 and head["kappa"] <= 1 and any(k.startswith("class_") for k in head)


def test_pca_is_whitened_and_pixels_are_sampled_at_their_centres() -> None:
    rng = np.random.default_rng(0)
    cube = rng.normal(size=(12, 10, 6)) @ rng.normal(size=(6, 6))
    reduced, kept = pca(cube, 4)
    flat = reduced.reshape(-1, 4).astype(np.float64)
    assert np.allclose(np.cov(flat.T), np.eye(4), atol=1e-4) and 0 < kept < 1
    assert pca(cube, 30)[0].shape[-1] == 6 and pca(cube, 30)[1] == pytest.approx(1.0)
    # a map at the frame's resolution (stride 1), a square cube filling the frame: the pixel's own cell
    scene = Scene(np.zeros((8, 8, 1)), np.zeros(1), 1.0, "x", lambda *a: [], 8)
    fmap = torch.arange(2 * 64, dtype=torch.float32).view(1, 2, 8, 8)
    rows, cols = np.array([0, 3, 7]), np.array([5, 2, 7])
    assert torch.equal(scene.at([fmap], rows, cols), fmap[0][:, rows, cols].T)


def test_baseline_metrics_match_a_direct_computation(airborne: Catalog) -> None:
    from stages.downstream.heads import load_task_data

    backbone = load_backbone(BackboneSpec(model="hypersigma_tiny", seed=3), "cpu")
    task = TASKS.get(TASK)
    data = load_task_data(airborne, backbone, task.spec("small", backbone.img_size, dataset="indian-pines"))
    scores = task.baseline(airborne, data)
    test = cast(PixelSplit, data.test)
    direct = classification_metrics(scores.predictions[0][test.rows, test.cols], test.ids, ignore_index=None)
    assert scores.metrics["oa"] == pytest.approx(direct["oa"]) and scores.metrics["kappa"] == pytest.approx(
        direct["kappa"])


def test_cli_run_all_with_a_benchmark_and_tune(airborne: Catalog, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from pipelines.cli import app

    args = ["heads", "run-all", "--plain", "--out", str(tmp_path), "--task", TASK, "--benchmark",
            f"{TASK}=indian-pines", "--model", "hypersigma_tiny", "--steps", "3", "--tune", "full", "--catalog",
            airborne.uri, "--device", "cpu"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "report.json").read_text())
    assert set(doc["tasks"]) == {TASK} and json.loads((tmp_path / TASK / "run.json").read_text())["spec"]["tune"] \
        == "full"
    res = CliRunner().invoke(app, [*args[:4], str(tmp_path / "seg"), "--task", "segmentation", "--tune", "full",
                                   "--catalog", airborne.uri])
    assert res.exit_code != 0 and "tune='head'" in str(res.exception)


@pytest.fixture(scope="module")
def detection(tmp_path_factory: pytest.TempPathFactory) -> Catalog:
    """The change pair (Hermiston), target (AVIRIS) and anomaly (ABU beach) fixture scenes ingested."""
    from catalog.fixtures import write_dataset
    from stages.ingest import IngestConfig, run_ingest

    root = tmp_path_factory.mktemp("detection-sources")
    for slug in ("hermiston", "aviris-targets", "abu-beach"):
        write_dataset(slug, root)
    cat = Catalog(tmp_path_factory.mktemp("detection") / "catalog").init()
    assert not run_ingest(cat, IngestConfig(source_root=str(root))).problems
    return cat


DETECTION = {"airborne_change": "hermiston", "airborne_target": "aviris-targets", "airborne_anomaly": "abu-beach"}


def test_change_target_and_anomaly_through_run_heads(detection: Catalog, tmp_path: Path) -> None:
    result = run_heads(detection, HeadsConfig(
        out_dir=str(tmp_path), backbone=BackboneConfig(model="hypersigma_tiny", seed=5), head_size="small", steps=10,
        device="cpu", tasks=[TaskChoice(task=t, dataset=d) for t, d in DETECTION.items()]))
    reports = {o.report.task: o.report for o in result.outcomes}
    assert set(reports) == set(DETECTION)
    change = reports["airborne_change"]
    assert {"oa", "kappa", "f1", "precision", "recall"} <= set(change.head) and 0 <= change.head["f1"] <= 1
    for task in ("airborne_target", "airborne_anomaly"):
        auc = reports[task].head
        assert set(auc) == {"auc_pd_pf", "auc_tau_pd", "auc_tau_pf", "auc_oa", "auc_snpr"}
        assert auc["auc_oa"] == pytest.approx(auc["auc_pd_pf"] + auc["auc_tau_pd"] - auc["auc_tau_pf"])
    report = (tmp_path / "report.md").read_text()
    assert "change vectors + Otsu" in report and "RX (the coarse detector)" in report and "91.74" in report


def test_pseudo_labels_take_the_lowest_30_and_the_top_0_15_percent() -> None:
    from stages.downstream.tasks.airborne_detection import pseudo_labels

    scores = np.random.default_rng(1).permutation(10_000).reshape(100, 100) / 10_000
    labels = pseudo_labels(scores)
    assert (labels == 0).sum() == 3000 and (labels == 1).sum() == 15 and (labels == -1).sum() == 10_000 - 3015
    assert scores[labels == 0].max() < scores[labels == -1].min() < scores[labels == -1].max() < \
        scores[labels == 1].min()


def test_detection_and_change_scores_match_direct_computation(detection: Catalog) -> None:
    from stages.downstream.heads import load_task_data, new_head
    from stages.metrics import change_metrics, detection_auc
    from stages.zeroshot.baselines import change_vector, rx

    backbone = load_backbone(BackboneSpec(model="hypersigma_tiny", seed=5), "cpu")
    anomaly = TASKS.get("airborne_anomaly")
    data = load_task_data(detection, backbone, anomaly.spec("small", backbone.img_size, dataset="abu-beach"))
    image = data.test_ids[0]
    gt = detection.annotation(image).array > 0
    raw = read_cube(detection, image)
    base = anomaly.baseline(detection, data)
    direct = detection_auc(rx(raw), gt)
    assert base.metrics == pytest.approx(direct)
    head = new_head(data.spec, backbone, data)
    scored = anomaly.evaluate(detection, head, backbone, data, torch.device("cpu"))
    assert scored.metrics == pytest.approx(detection_auc(scored.predictions[0], gt))
    change = TASKS.get("airborne_change")
    data = load_task_data(detection, backbone, change.spec("small", backbone.img_size, dataset="hermiston"))
    test, image = cast(PixelSplit, data.test), data.test_ids[0]
    ann = detection.annotation(image)
    assert ann.second is not None
    _, binary = change_vector(read_cube(detection, image), np.moveaxis(ann.second, 0, -1))
    direct = change_metrics(binary[test.rows, test.cols], ann.array[test.rows, test.cols] > 0)
    assert change.baseline(detection, data).metrics == pytest.approx(direct)
    assert len(test) + int(data.extras["train_mask"].sum()) == ann.array.size


def test_full_tuning_of_the_siamese_change_head(detection: Catalog, tmp_path: Path) -> None:
    backbone = load_backbone(BackboneSpec(model="hypersigma_tiny", seed=5), "cpu")
    before = _state(backbone.model)
    run_heads(detection, HeadsConfig(out_dir=str(tmp_path), backbone=BackboneConfig(model="hypersigma_tiny", seed=5),
                                     head_size="small", steps=3, device="cpu", tune="full",
                                     tasks=[TaskChoice(task="airborne_change", dataset="hermiston")]),
              backbone=backbone)
    tuned, _ = load_head(tmp_path / "airborne_change")
    assert isinstance(tuned.backbone, torch.nn.Module)
    assert any(not torch.equal(v, before[k]) for k, v in tuned.backbone.state_dict().items())
