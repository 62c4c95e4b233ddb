"""`hvp compare` on the labelled fixtures (typer's CliRunner), its argument rules, and the compare flow's typed
form and deployment."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipelines.cli import app

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_hvp_compare_writes_one_report(labelled_catalog: tuple, tmp_path: Path) -> None:
    cat, _ = labelled_catalog
    out = tmp_path / "cmp"
    res = runner.invoke(app, ["compare", "--models", "tiny", "hypersigma_tiny", "--tasks", "saliency",
                              "--catalog", cat.uri, "--out", str(out), "--steps", "2", "--seed", "705",
                              "--timing-images", "1", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    doc = json.loads((out / "report.json").read_text())
    ours = [r for r in doc["rows"] if r["source"] == "this run"]
    assert sorted(r["backbone"] for r in ours) == ["hypersigma_tiny (random-init)", "tiny (random-init)"]
    assert {r["task"] for r in doc["rows"]} == {"saliency"}
    assert any(r["source"] == "paper" for r in doc["rows"]) and "random-init" in res.output
    config = json.loads((out / "compare_config.json").read_text())["config"]
    assert config["head_size"] == "small" and config["steps"] == 2


def test_random_init_needs_a_first_model_with_weights(tmp_path: Path) -> None:
    res = runner.invoke(app, ["compare", "--models", "tiny", "random-init", "--catalog", str(tmp_path)])
    assert res.exit_code != 0 and "random-init" in str(res.exception or res.output)
    from pipelines.cli.compare import compare_entries

    entries = compare_entries(["tiny", "random-init"], {"tiny": str(tmp_path / "w.safetensors")})
    assert [e.name for e in entries] == ["tiny", "random-init (tiny)"]
    assert entries[0].backbone.checkpoint == str(tmp_path / "w.safetensors")
    assert entries[1].backbone.checkpoint == "random-init" and entries[1].backbone.model == "tiny"


def test_compare_flow_form_is_typed_and_deployed() -> None:
    import yaml
    from prefect.utilities.callables import parameter_schema

    from pipelines.compare import compare_flow
    from pipelines.params import DownstreamParams
    from pipelines.profiles import resolve

    schema = parameter_schema(compare_flow).model_dump()
    assert {"backbones", "profile", "paths", "downstream"} <= set(schema["properties"])
    entry = schema["definitions"]["CompareBackboneParams"]["properties"]
    assert all(f.get("description") for f in entry.values())
    spec = yaml.safe_load((Path(__file__).resolve().parents[2] / "prefect.yaml").read_text())
    deployment = {d["name"]: d for d in spec["deployments"]}["compare"]
    assert deployment["entrypoint"] == "pipelines/compare.py:compare_flow"
    assert deployment["parameters"] == {"profile": "demo"}
    assert DownstreamParams().backbones == []  # default: today's DAG
    demo = resolve("demo").downstream
    assert [b.model.value for b in demo.backbones] == ["hypersigma_tiny"]


def test_hvp_pretrain_mae_plain_then_its_checkpoint_as_a_compared_backbone(labelled_catalog: tuple,
                                                                            tmp_path: Path) -> None:
    from catalog.catalog import Catalog
    from catalog.fixtures import write_dataset
    from stages.ingest import IngestConfig, run_ingest

    write_dataset("cave", tmp_path / "src")
    cat = Catalog(str(tmp_path / "cat")).init()
    assert not run_ingest(cat, IngestConfig(source_root=str(tmp_path / "src"))).problems
    run = tmp_path / "mae"
    res = runner.invoke(app, ["pretrain", "--plain", "--profile", "test", "--catalog", cat.uri, "--model",
                              "hypersigma_tiny", "--objective", "mae_spectral", "--steps", "2", "--batch-size", "2",
                              "--out", str(run)])
    assert res.exit_code == 0, res.output
    recorded = json.loads((run / "config.json").read_text())
    assert recorded["objective"] == "mae_spectral" and recorded["input"]["bands"].startswith("18 contiguous")

    labelled, _ = labelled_catalog
    out = tmp_path / "cmp"
    res = runner.invoke(app, ["compare", "--models", "hypersigma_tiny", "random-init", "--tasks", "saliency",
                              "--checkpoint", f"hypersigma_tiny={run}", "--catalog", labelled.uri, "--out", str(out),
                              "--steps", "1", "--seed", "706", "--timing-images", "1", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    ours = {r["backbone"]: r for r in json.loads((out / "report.json").read_text())["rows"] if r["source"] ==
            "this run"}
    assert set(ours) == {"hypersigma_tiny", "random-init (hypersigma_tiny)"}
    assert ours["random-init (hypersigma_tiny)"]["random_init"]
    assert "spat_encoder" in ours["hypersigma_tiny"]["weights"]  # the spectral MAE left the spatial branch random
