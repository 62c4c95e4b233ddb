"""The downstream commands and flows on the labelled fixtures: `hvp features`, `hvp heads train/eval/run-all`, and
the features / heads / downstream flows on the temporary Prefect server (reuse of unchanged work, artifacts)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from base.errors import InputError
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
    from pipelines.downstream import downstream_flow, features_flow
    from pipelines.params import BackboneParams, Device, DownstreamParams, PathParams, Profile, Task

    cat = labelled_catalog[0].uri
    # every head's training is covered by tests/stages; one keeps the flow test short
    paths = PathParams(catalog=cat)
    backbone = BackboneParams(seed=31, model="tiny")

    def saliency(steps: int) -> DownstreamParams:
        return DownstreamParams(tasks=[Task.saliency], steps=steps, device=Device.cpu)

    first = downstream_flow(Profile.production, paths, backbone, saliency(2), out_dir=str(tmp_path), seed=31)
    assert Path(first["report"]).is_file() and [r["task"] for r in first["table"]] == ["saliency"]
    assert not any(r["reused"] for r in first["table"])
    artifacts = _artifacts()
    assert {"features-summary", "heads-report", "heads-report-markdown"} <= set(artifacts)
    markdown = artifacts["heads-report-markdown"][-1]
    assert "data:image/png;base64," in markdown and "file://" not in markdown and "random-init" in markdown
    assert "| this run |" in markdown  # the weights are said once above the tables, which then fit the UI
    state = features_flow(Profile.demo, PathParams(catalog=cat, datasets=["hssod"]), BackboneParams(seed=31),
                          saliency(2), return_state=True)
    rows = state.result()
    assert state.name == "Skipped"
    assert rows[0]["computed"] == 0 and rows[0]["cached"] == 12 and "unchanged" in rows[0]["note"]
    again = downstream_flow(Profile.production, paths, backbone, saliency(2), out_dir=str(tmp_path), seed=31)
    assert all(r["reused"] for r in again["table"])
    changed = downstream_flow(Profile.production, paths, backbone, saliency(3), out_dir=str(tmp_path), seed=31)
    assert changed["table"][0]["steps"] == 3 and not changed["table"][0]["reused"]


def test_deployments_name_the_demo_profile_and_forms_are_typed() -> None:
    import yaml
    from prefect.utilities.callables import parameter_schema

    from pipelines.downstream import features_flow, heads_flow

    spec = yaml.safe_load((Path(__file__).resolve().parents[2] / "prefect.yaml").read_text())
    deployments = {d["name"]: d for d in spec["deployments"]}
    assert deployments["features"]["parameters"] == deployments["heads"]["parameters"] == {"profile": "demo"}
    for flow in (features_flow, heads_flow):
        schema = parameter_schema(flow).model_dump()
        top = schema["properties"]
        assert {"profile", "paths", "backbone", "downstream"} <= set(top) and all(p.get("description") for p in
                                                                                  top.values()), flow.name
        backbone = schema["definitions"]["BackboneParams"]["properties"]
        assert all(f.get("description") for f in backbone.values())
        assert schema["definitions"]["ModelName"]["enum"] and schema["definitions"]["Device"]["enum"]
    heads = parameter_schema(heads_flow).model_dump()["definitions"]
    assert heads["Task"]["enum"] == ["segmentation", "saliency", "tracking", "airborne_classification",
                                     "airborne_change", "airborne_target", "airborne_anomaly"]  # report order


def test_empty_fields_resolve_to_the_latest_pretraining_run_and_absolute_paths(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from pipelines.downstream import resolve_backbone
    from pipelines.params import BackboneParams, DownstreamParams, Profile, Task

    runs = tmp_path / "runs"
    spec, origin = resolve_backbone(Profile.demo, BackboneParams(), str(runs))
    assert spec.model == "tiny" and spec.random_init and "no finished pretraining run" in origin
    for name, age in (("pretrain-tiny-old", 100), ("pretrain-tiny-new", 10), ("pretrain-hyperfree_b-x", 0)):
        checkpoint = runs / name / "checkpoints" / "step_6"
        checkpoint.mkdir(parents=True)
        key = runs / name / "inputs-key.json"
        key.write_text(json.dumps({"key": "k", "result": {"checkpoint": str(checkpoint)}}))
        os.utime(key, (key.stat().st_mtime - age,) * 2)
    (runs / "pretrain-tiny-unfinished").mkdir()
    spec, origin = resolve_backbone(Profile.demo, BackboneParams(), str(runs))
    assert spec.checkpoint == str(runs / "pretrain-tiny-new" / "checkpoints" / "step_6") and "latest" in origin
    monkeypatch.chdir(tmp_path)
    spec, _ = resolve_backbone(Profile.demo, BackboneParams(checkpoint="runs/pretrain-tiny-old"), str(runs))
    assert spec.checkpoint == str(runs / "pretrain-tiny-old")
    spec, _ = resolve_backbone(Profile.production, BackboneParams(checkpoint="random-init"), str(runs))
    assert spec.random_init and spec.model == "hypervision_b"
    chosen = DownstreamParams(tasks=[Task.tracking, Task.segmentation],
                              benchmarks={Task.segmentation: "hyperspectral-city-v2"})
    assert chosen.task_datasets() == {"tracking": "hot-2023-vis", "segmentation": "hyperspectral-city-v2"}
