"""The task registry: every registered task is complete (card + hooks), a card of another annotation kind (a dense
regression, lower is better) builds a TaskDef, broken cards name the field, and the runners' configs refuse what no
task or field means."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from base.errors import InputError
from base.markdown import escape_markdown
from model.heads import HEADS
from stages.downstream.outcomes import TaskOutcome
from stages.downstream.registry import HEAD_SIZES, TaskDef, load_card
from stages.downstream.report import TaskReport, markdown_table
from stages.downstream.runners import HeadsConfig, TaskChoice, heads_specs
from stages.downstream.tasks import TASKS, ordered_tasks

REPO = Path(__file__).resolve().parents[2]

REGRESSION_CARD = """
name: reflectance
order: 9
annotation: target_map
datasets: [some-airborne-scene]
head: runet
report:
  primary: rmse
  higher_is_better: false
  head_name: dense regression head
  baseline_name: per-band mean
  columns:
    - {label: RMSE, metric: rmse}
    - {label: SAM °, metric: sam}
sizes:
  small: {head: {widths: [8]}, train: {steps: 5}, checkpoint_once: true}
  paper: {}
"""


def test_the_paper_tasks_are_registered_whole() -> None:
    assert ordered_tasks() == ["segmentation", "saliency", "tracking", "airborne_classification", "airborne_change",
                              "airborne_target", "airborne_anomaly"]
    for name in TASKS:
        task = TASKS.get(name)
        assert task.name == name and task.head in HEADS and set(task.sizes) == set(HEAD_SIZES)
        metrics = [c.metric for c in task.report.columns]
        assert task.report.primary in metrics, name
        assert all(len(f) <= len(metrics) for t in task.report.paper for f in t.rows.values())
        small = task.spec("small", 128)
        assert small.dataset == task.default_dataset and small.train.checkpoint_every == small.train.steps == 100
        assert small.head == task.sizes["small"].head and small.tracker.crop_px == 128
        assert task.spec("paper", 512, steps=7).train.steps == 7
    assert TASKS.get("tracking").annotation == "track" and not TASKS.get("tracking").cached_features
    assert TASKS.get("segmentation").report.paper_table("hyperspectral-city-v2") is not None


def _hooks() -> dict[str, Any]:
    def unused(*args: Any) -> Any:
        raise AssertionError("not called")

    return {k: unused for k in ("read", "head_options", "samples", "loss", "evaluate", "baseline", "overlays")}


def test_a_dense_regression_card_of_another_annotation_kind_builds_a_task(tmp_path: Path) -> None:
    card = tmp_path / "reflectance.yaml"
    card.write_text(REGRESSION_CARD)
    task = TaskDef(**load_card(card), **_hooks())
    assert task.annotation == "target_map" and task.cached_features and task.report.overlay == "map"
    spec = task.spec("small", 64, steps=3)
    assert spec.task == "reflectance" and spec.head == {"widths": [8]} and spec.train.checkpoint_every == 3
    report = TaskReport(task.report, "some-airborne-scene", {"rmse": 0.1, "sam": 4.0}, {"rmse": 0.3, "sam": 9.0})
    outcome = TaskOutcome(report, tmp_path, "f", 10, 3, {}, {})
    assert outcome.summary()["margin"] == pytest.approx(0.2)  # lower is better: the baseline's excess
    table = markdown_table(report, "random-init")
    assert "| dense regression head | this run (random-init) | 0.100 | 4.000 |" in table
    assert f"The paper reports no figures for {escape_markdown('some-airborne-scene')}." in table  # shown as text


@pytest.mark.parametrize(("old", "new", "field"), [
    ("head: runet\n", "", "head"),
    ("  paper: {}\n", "", "sizes"),
    ("sizes:", "  paper:\n    - {key: x, name: X, aliases: [x], rows: {A: [1, 2, 3]}}\nsizes:", "report.paper.x"),
])
def test_a_broken_card_names_the_field(tmp_path: Path, old: str, new: str, field: str) -> None:
    card = tmp_path / "broken.yaml"
    card.write_text(REGRESSION_CARD.replace(old, new))
    with pytest.raises(InputError, match=re.escape(f"field '{field}'")):
        load_card(card)


def test_heads_config_refuses_unknown_tasks_fields_and_folder_clashes() -> None:
    with pytest.raises(ValidationError, match="Unknown task 'depth'"):
        TaskChoice(task="depth")
    with pytest.raises(ValidationError, match="extra"):
        HeadsConfig.model_validate({"out_dir": "x", "stepz": 3})
    with pytest.raises(ValidationError, match="exactly one task"):
        HeadsConfig(out_dir="x", folder_per_task=False)
    with pytest.raises(ValidationError, match="one entry per task"):
        HeadsConfig(out_dir="x", tasks=[TaskChoice(task="saliency"), TaskChoice(task="saliency")])
    config = HeadsConfig(out_dir="x", head_size="small", steps=4, checkpoint_every=2, overlays=1,
                         tasks=[TaskChoice(task="tracking", dataset="hot-2023-nir", variant="v")])
    (spec,) = heads_specs(config, 64)
    assert (spec.dataset, spec.variant, spec.train.steps, spec.train.checkpoint_every, spec.overlays) == \
        ("hot-2023-nir", "v", 4, 2, 1)
    assert [s.task for s in heads_specs(HeadsConfig(out_dir="x"), 512)] == ordered_tasks()


def test_no_stage_or_model_module_branches_on_a_task_name() -> None:
    pattern = re.compile(r"task ==|task==|\.task in\b")
    found = [f"{p.relative_to(REPO)}:{n}" for root in ("stages", "model") for p in sorted((REPO / root).rglob("*.py"))
             for n, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert found == []
