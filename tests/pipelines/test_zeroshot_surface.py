"""HyperFree's tuning-free tasks from the CLI (plain and as the `zeroshot` flow), in the DAG's form and as a
deployment."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from pipelines.cli import app

runner = CliRunner()
REPO = Path(__file__).resolve().parents[2]
OPEN = ["--set", "points_per_side=8", "--set", "pred_iou_thresh=-100", "--set", "stability_score_thresh=-100",
        "--set", "box_nms_thresh=1.0"]
"""Thresholds that keep a random-init model's masks (its predicted IoUs mean nothing)."""


@pytest.fixture(scope="module")
def anomaly_catalog(tmp_path_factory: pytest.TempPathFactory) -> str:
    from catalog.fixtures import write_dataset

    root = tmp_path_factory.mktemp("zeroshot")
    write_dataset("abu-beach", root / "src")
    cat = str(root / "cat")
    res = runner.invoke(app, ["ingest", str(root / "src"), "--catalog", cat, "--plain", "--dataset", "abu-beach"])
    assert res.exit_code == 0, res.output
    return cat


def test_cli_runs_a_task_plain_and_reports_random_init(anomaly_catalog: str, tmp_path: Path) -> None:
    res = runner.invoke(app, ["zeroshot", "anomaly", "--catalog", anomaly_catalog, "--plain", "--out",
                              str(tmp_path), *OPEN])
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "anomaly" / "abu-beach" / "report.json").read_text())
    assert doc["provenance"]["weights"] == "random-init" and "plumbing" in doc["note"]
    assert "RX" in res.output and "auc_pd_pf" in res.output


def test_cli_names_a_dataset_without_the_annotation_kind(anomaly_catalog: str, tmp_path: Path) -> None:
    res = runner.invoke(app, ["zeroshot", "classification", "--catalog", anomaly_catalog, "--plain", "--out",
                              str(tmp_path)])
    assert res.exit_code == 2 and "pixel_classes" in res.output


def test_the_dag_form_and_the_deployment_offer_the_zero_shot_tasks() -> None:
    from prefect.utilities.callables import parameter_schema

    from pipelines.hypervision import hypervision_flow
    from stages.zeroshot.run import TASKS

    schema = parameter_schema(hypervision_flow.fn).model_dump()
    assert "zeroshot" in schema["properties"]
    enum = schema["definitions"]["ZeroShotTask"]["enum"]
    assert sorted(enum) == TASKS.names()
    deployments = {d["name"]: d for d in yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]}
    assert deployments["zeroshot"]["entrypoint"] == "pipelines/zeroshot.py:zeroshot_flow"


@pytest.fixture(scope="module")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_the_flow_runs_the_task_and_publishes_its_table(prefect_server: None, anomaly_catalog: str,
                                                        tmp_path: Path) -> None:
    res = runner.invoke(app, ["zeroshot", "anomaly", "--catalog", anomaly_catalog, "--out", str(tmp_path), *OPEN])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "anomaly" / "abu-beach" / "results.parquet").is_file()
    from prefect.artifacts import Artifact

    artifact = Artifact.get("zeroshot-report")
    assert artifact is not None and "random-init" in (artifact.description or "")
