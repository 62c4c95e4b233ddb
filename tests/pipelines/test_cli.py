"""The `hvp` command line on fixtures: make, ingest (plain), list, show, verify, quarantine."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from pipelines.cli import app

runner = CliRunner()


def test_cli_round_trip(tmp_path: Path) -> None:
    src, cat = tmp_path / "src", str(tmp_path / "cat")
    res = runner.invoke(app, ["fixtures", "make", str(src)])
    assert res.exit_code == 0, res.output
    assert len([p for p in src.iterdir() if p.is_dir()]) == 47  # 45 built-in datasets (11 airborne), 2 user examples
    res = runner.invoke(app, ["ingest", str(src), "--catalog", cat, "--plain", "--dataset", "cave",
                              "--dataset", "my-lab-camera", "--dataset", "my-lab-labels"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["catalog", "list", "--catalog", cat, "--json"])
    rows = json.loads(res.output)
    assert sorted({r["dataset"] for r in rows}) == ["cave", "my-lab-camera", "my-lab-labels"] and len(rows) == 10
    labelled = [r for r in rows if r["dataset"] == "my-lab-labels"]
    assert sorted(r["split"] for r in labelled) == ["test"] * 2 + ["train"] * 4
    assert {r["label_kind"] for r in labelled} == {"segmentation"}
    rows = [r for r in rows if r["dataset"] != "my-lab-labels"]
    res = runner.invoke(app, ["catalog", "show", rows[0]["image_id"], "--catalog", cat])
    assert res.exit_code == 0 and '"wavelength_nm"' in res.output and rows[0]["image_id"] in res.output
    res = runner.invoke(app, ["catalog", "verify", "--catalog", cat, "--json"])
    assert res.exit_code == 0 and json.loads(res.output)["healthy"] is True
    res = runner.invoke(app, ["catalog", "show", "cave/nothing", "--catalog", cat])
    assert res.exit_code == 1 and "hvp catalog list" in res.output


def test_cli_broken_set_goes_to_quarantine(tmp_path: Path) -> None:
    src, cat = tmp_path / "broken", str(tmp_path / "cat")
    assert runner.invoke(app, ["fixtures", "make", str(src), "--broken"]).exit_code == 0
    res = runner.invoke(app, ["ingest", str(src), "--catalog", cat, "--plain"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["catalog", "quarantine", "--catalog", cat])
    assert "quarantined" in res.output and "wavelength" in res.output


def test_datasets_lists_31_and_the_evaluation_only_ones() -> None:
    res = runner.invoke(app, ["datasets"])
    assert res.exit_code == 0 and "hot-2024-rednir" in res.output and "virginia-tech-tree" in res.output
    assert "hot-2023-vis" in res.output and "evaluation" in res.output and "segmentation" in res.output


def test_bad_input_is_one_clear_line_and_exit_2(tmp_path: Path) -> None:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "pipelines.cli", "ingest", str(tmp_path / "missing"), "--plain",
                          "--catalog", str(tmp_path / "cat")], capture_output=True, text=True, check=False)
    assert out.returncode == 2
    assert "SOURCE_DIR" in out.stdout and "Traceback" not in out.stdout + out.stderr


def test_plain_stage_runners_through_the_cli(tmp_path: Path) -> None:
    """`--plain` runs each stage's runner with the profile's configuration (here the test profile): label one
    branch, fuse, pretrain two steps; each run leaves its resolved config beside its outputs."""
    from catalog.fixtures import write_dataset

    src, cat = tmp_path / "src", str(tmp_path / "cat")
    write_dataset("hot-2024-rednir", src)
    assert runner.invoke(app, ["ingest", str(src), "--catalog", cat, "--plain"]).exit_code == 0
    res = runner.invoke(app, ["label", "--catalog", cat, "--plain", "--profile", "test", "--branch", "material"])
    assert res.exit_code == 0, res.output
    assert "label-material" in res.output and "labelled 2 images" in res.output
    assert json.loads((tmp_path / "cat" / "stages" / "label-material.json").read_text())["config"]["branch"] == \
        "material"
    assert not (tmp_path / "cat" / "stages" / "label-spatial.json").exists()
    res = runner.invoke(app, ["fuse", "--catalog", cat, "--plain", "--profile", "test"])
    assert res.exit_code == 0 and "fused 2 images" in res.output, res.output
    out = tmp_path / "run"
    res = runner.invoke(app, ["pretrain", "--catalog", cat, "--plain", "--profile", "test", "--steps", "2",
                              "--batch-size", "2", "--out", str(out)])
    assert res.exit_code == 0 and "pretrained 2 steps" in res.output, res.output
    recorded = json.loads((out / "stage-config.json").read_text())["config"]
    assert recorded["device"] == "cpu" and recorded["crop_size"] == 16 and recorded["steps"] == 2  # profile + options
