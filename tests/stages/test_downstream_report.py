"""The downstream report: report.json schema, Parquet table, paper-style markdown, plots, provenance."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from stages.downstream.report import Overlay, TaskReport, write_report
from stages.downstream.tasks import TASKS
from stages.metrics import confusion_matrix, saliency_metrics, segmentation_metrics, tracking_curves, tracking_metrics


def _tasks() -> list[TaskReport]:
    rng = np.random.default_rng(0)
    target = rng.integers(0, 3, (12, 16))
    head_pred = np.where(rng.random(target.shape) < 0.8, target, 0)
    base_pred = rng.integers(0, 3, target.shape)
    mask = np.zeros((12, 16))
    mask[3:8, 4:10] = 1
    head_map = np.clip(mask * 0.7 + rng.random(mask.shape) * 0.3, 0, 1)
    gt = np.array([[10, 10, 20, 20], [14, 12, 20, 20], [18, 14, 20, 20]], float)
    held = np.repeat(gt[:1], 3, axis=0)
    image = rng.random((12, 16, 3))
    seg, sal, track = (TASKS.get(name).report for name in ("segmentation", "saliency", "tracking"))
    return [
        TaskReport(seg, "HSI Drive v2.0", segmentation_metrics(head_pred, target, 3, 255),
                   segmentation_metrics(base_pred, target, 3, 255),
                   confusion=confusion_matrix(head_pred, target, 3, 255), class_names=["road", "sky", "tree"],
                   overlays=[Overlay(image, "img0", target, head_pred)]),
        TaskReport(sal, "HSSOD", saliency_metrics(head_map, mask), saliency_metrics(np.full_like(mask, 0.5) +
                   np.linspace(0, 0.1, 16)[None], mask), overlays=[Overlay(image, "img1", mask, head_map)]),
        TaskReport(track, "HOT-2023-VIS", tracking_metrics(gt + 1, gt), tracking_metrics(held, gt),
                   head_curves=tracking_curves(gt + 1, gt), baseline_curves=tracking_curves(held, gt),
                   overlays=[Overlay(np.zeros((40, 40, 3)), "frame 2", boxes={"truth": gt[2], "head": gt[2] + 1})]),
    ]


def test_report_json_has_exactly_the_documented_schema(tmp_path: Path) -> None:
    tasks = _tasks()
    paths = write_report(tmp_path, tasks, weights="random-init", preprocessing="released", model="tiny")
    doc = json.loads(paths.json.read_text())
    assert set(doc) == {"tasks", "provenance"}
    assert doc["provenance"] == {"weights": "random-init", "preprocessing": "released", "model": "tiny"}
    assert set(doc["tasks"]) == {"segmentation", "saliency", "tracking"}
    for entry in doc["tasks"].values():
        assert set(entry) == {"dataset", "head", "baseline", "primary", "higher_is_better"}
        assert entry["primary"] in entry["head"] and entry["primary"] in entry["baseline"]
        assert entry["higher_is_better"] is True
        assert all(isinstance(v, float) for v in entry["head"].values())
    assert doc["tasks"]["segmentation"]["primary"] == "miou"
    assert doc["tasks"]["tracking"]["dataset"] == "HOT-2023-VIS"
    assert doc["tasks"]["segmentation"]["head"] == pytest.approx(tasks[0].head)
    assert set(doc["tasks"]["saliency"]["head"]) == {"mae", "max_f", "auc", "cc", "s_measure", "e_measure"}
    assert set(doc["tasks"]["tracking"]["head"]) == {"success_auc", "precision_20"}


def test_parquet_markdown_and_plots_record_the_run(tmp_path: Path) -> None:
    tasks = _tasks()
    paths = write_report(tmp_path, tasks, weights="random-init", preprocessing="released", model="tiny")
    table = pd.read_parquet(paths.parquet)
    assert len(table) == sum(len(t.head) + len(t.baseline) for t in tasks)
    assert set(table["weights"]) == {"random-init"} and set(table["preprocessing"]) == {"released"}
    row = table[(table.task == "segmentation") & (table.method == "head") & (table.metric == "miou")]
    assert row["value"].item() == pytest.approx(tasks[0].head["miou"]) and bool(row["primary"].item())
    md = paths.markdown.read_text()
    assert "random-init" in md and "not comparable to the paper" in md
    assert "| HyperVision (head-only) | paper | 97.44 | 89.67 | 90.70 | 83.51 |" in md
    assert f"| {tasks[0].head['miou'] * 100:.2f} |" in md
    assert "| HyperVision | paper | 0.571 | 0.785 |" in md
    assert "| HyperVision | paper | 0.959 | 0.762 | 0.049 | 0.742 | — | — | — |" in md
    names = {p.name for p in paths.plots}
    assert names == {"segmentation_confusion.png", "segmentation_examples.png", "saliency_examples.png",
                     "tracking_success.png", "tracking_precision.png", "tracking_examples.png"}
    for path in paths.plots:
        with Image.open(path) as image:
            assert image.format == "PNG" and min(image.size) > 100


def test_a_trained_backbone_is_not_called_random_init(tmp_path: Path) -> None:
    paths = write_report(tmp_path, _tasks()[:1], weights="ab" * 32, preprocessing="released", model="hypervision_b")
    assert "random-init" not in paths.markdown.read_text()
    assert json.loads(paths.json.read_text())["provenance"]["weights"] == "ab" * 32


def _paper_key(task: str, dataset: str) -> str | None:
    table = TASKS.get(task).report.paper_table(dataset)
    return None if table is None else table.key


def test_paper_dataset_names() -> None:
    assert _paper_key("segmentation", "HSI Drive v2.0") == "hsidrive"
    assert _paper_key("segmentation", "Hyperspectral City v2") == "hcity"
    assert _paper_key("tracking", "HOT-2023-NIR") == "hot2023"
    assert _paper_key("tracking", "HOT-2024-VIS") is None
    assert _paper_key("saliency", "HSSOD") == "hssod"
    assert _paper_key("saliency", "HSI Drive v2.0") is None


def test_a_task_report_needs_its_primary_metric() -> None:
    with pytest.raises(ValueError, match="primary metric 'miou'"):
        TaskReport(TASKS.get("segmentation").report, "x", {"oa": 1.0}, {"miou": 0.5})
