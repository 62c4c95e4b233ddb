"""The downstream commands and flows on the labelled fixtures: `hvp features`, `hvp heads train/eval/run-all`, and
the features / heads / downstream flows on the temporary Prefect server (reuse of unchanged work, artifacts)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from catalog.errors import InputError
from pipelines.cli import app

runner = CliRunner()


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def prefect_server() -> Iterator[None]:
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_cli_features_heads_train_eval_and_run_all(labelled_catalog: tuple, tmp_path: Path) -> None:
    cat = labelled_catalog[0].uri
    common = ["--catalog", cat, "--seed", "21", "--device", "cpu"]
    res = runner.invoke(app, ["features", "--dataset", "hssod", "--dataset", "hot-2023-vis", *common])
    assert res.exit_code == 0, res.output
    assert "12 image(s) encoded, 0 cache hit(s)" in res.output and "hot-2023-vis: skipped" in res.output
    res = runner.invoke(app, ["features", "--dataset", "hssod", *common])
    assert "0 image(s) encoded, 12 cache hit(s) skipped" in res.output
    res = runner.invoke(app, ["heads", "train", "saliency", "--out", str(tmp_path / "sal"), "--steps", "3", *common])
    assert res.exit_code == 0, res.output
    assert "trainable parameters" in res.output and "saliency" in res.output and "hssod" in res.output
    doc = json.loads((tmp_path / "sal" / "report.json").read_text())
    assert doc["provenance"]["weights"] == "random-init (seed 21)" and set(doc["tasks"]) == {"saliency"}
    res = runner.invoke(app, ["heads", "eval", "--run", str(tmp_path / "sal"), "--catalog", cat, "--device", "cpu"])
    assert res.exit_code == 0, res.output
    evaluated = json.loads((tmp_path / "sal" / "eval-test" / "report.json").read_text())
    assert evaluated["tasks"]["saliency"]["head"] == pytest.approx(doc["tasks"]["saliency"]["head"])
    res = runner.invoke(app, ["heads", "run-all", "--plain", "--out", str(tmp_path / "all"), "--task", "tracking",
                              "--steps", "2", *common])
    assert res.exit_code == 0, res.output
    assert "success_auc" in res.output and str(tmp_path / "all" / "report.json") in res.output
    res = runner.invoke(app, ["features", "--override", "img_size", *common])
    assert isinstance(res.exception, InputError) and "KEY=VALUE" in str(res.exception)


def _artifacts() -> dict[str, list[str]]:
    from prefect.client.orchestration import get_client

    async def read() -> dict[str, list[str]]:
        async with get_client() as client:
            found: dict[str, list[str]] = {}
            for artifact in await client.read_artifacts():
                found.setdefault(str(artifact.key), []).append(str(artifact.data))
            return found

    return asyncio.run(read())


def test_flows_reuse_unchanged_work_and_publish_the_report(prefect_server: None, labelled_catalog: tuple,
                                                           tmp_path: Path) -> None:
    from pipelines.downstream import BackboneParams, FeaturesParams, downstream_flow, features_flow

    cat = labelled_catalog[0].uri
    tasks = {"saliency": "hssod"}  # every head's training is covered by tests/stages; one keeps the flow test short
    first = downstream_flow(catalog=cat, out_dir=str(tmp_path), tasks=tasks, steps=2, seed=31,
                            device="cpu")
    assert Path(first["report"]).is_file() and [r["task"] for r in first["table"]] == ["saliency"]
    assert not any(r["reused"] for r in first["table"])
    artifacts = _artifacts()
    assert {"features-summary", "heads-report", "heads-report-markdown"} <= set(artifacts)
    markdown = artifacts["heads-report-markdown"][-1]
    assert "data:image/png;base64," in markdown and "file://" not in markdown and "random-init" in markdown
    rows = features_flow(FeaturesParams(catalog=cat, backbone=BackboneParams(seed=31), datasets=["hssod"],
                                        device="cpu"))
    assert rows[0]["computed"] == 0 and rows[0]["cached"] == 12 and "unchanged" in rows[0]["note"]
    again = downstream_flow(catalog=cat, out_dir=str(tmp_path), tasks=tasks, steps=2, seed=31,
                            device="cpu")
    assert all(r["reused"] for r in again["table"])
    changed = downstream_flow(catalog=cat, out_dir=str(tmp_path), tasks=tasks, steps=3, seed=31,
                              device="cpu")
    assert changed["table"][0]["steps"] == 3 and not changed["table"][0]["reused"]


def test_deployment_parameters_are_valid_parameter_models() -> None:
    import yaml

    from pipelines.downstream import FeaturesParams, HeadsParams

    spec = yaml.safe_load((Path(__file__).resolve().parents[2] / "prefect.yaml").read_text())
    deployments = {d["name"]: d for d in spec["deployments"]}
    features = FeaturesParams(**deployments["features"]["parameters"]["params"])
    heads = HeadsParams(**deployments["heads"]["parameters"]["params"])
    assert features.backbone.checkpoint == heads.backbone.checkpoint == "random-init"
    assert set(heads.tasks) == {"segmentation", "saliency", "tracking"}
    with pytest.raises(ValueError, match="unknown task"):
        HeadsParams(tasks={"detection": "hssod"})
