"""The research loop's Prefect wiring without a server: the deployments and their trigger as declared, the event a
checkpoint emits, the evaluation config a run's recorded downstream parameters give, and `hvp tensorboard`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


def test_evaluate_is_triggered_by_the_checkpoint_event_and_the_ablation_is_deployed() -> None:
    from pipelines.research import CHECKPOINT_SAVED, RESOURCE_PREFIX, AblationParams, SourceSet

    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    deps = {d["name"]: d for d in spec["deployments"]}
    trigger = deps["evaluate"]["triggers"][0]
    assert trigger["expect"] == [CHECKPOINT_SAVED] and trigger["match"]["prefect.resource.id"] == RESOURCE_PREFIX + "*"
    assert set(trigger["parameters"]) == {"checkpoint", "run", "step", "sha256"}
    assert all("event.payload." in v for v in trigger["parameters"].values())
    assert deps["hypervision-ablation"]["entrypoint"] == "pipelines/research.py:ablation_flow"
    assert [s.value for s in AblationParams().sources] == ["spatial", "spatial+spectral", "spatial+spectral+material"]
    assert list(SourceSet) == AblationParams().sources


def test_a_checkpoint_event_names_run_step_path_and_sha256(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import prefect.events

    from pipelines import research
    from stages.labelling.labeler import file_sha256

    sent: list[dict] = []
    monkeypatch.setattr(prefect.events, "emit_event", lambda **kw: sent.append(kw))
    ckpt = tmp_path / "run" / "snapshots" / "step_0000004"
    ckpt.mkdir(parents=True)
    (ckpt / "model.safetensors").write_bytes(b"weights")
    research.emit_checkpoint(tmp_path / "run", 4, ckpt)
    sha = file_sha256(ckpt / "model.safetensors")
    assert sent[0]["event"] == research.CHECKPOINT_SAVED
    assert sent[0]["resource"]["prefect.resource.id"] == f"hvp.checkpoint.{sha}"
    assert sent[0]["payload"] == {"run": str((tmp_path / "run").resolve()), "step": 4, "checkpoint": str(ckpt),
                                  "sha256": sha}


def test_the_runs_downstream_parameters_make_the_evaluation(tmp_path: Path) -> None:
    from pipelines.params import DownstreamParams, Profile
    from pipelines.research import evaluation_config, record_research

    run = tmp_path / "pretrain-tiny-x"
    ckpt = run / "snapshots" / "step_0000002"
    ckpt.mkdir(parents=True)
    (ckpt / "config.json").write_text(json.dumps({"config": {"model": "tiny"}}))
    downstream = DownstreamParams.model_validate({"tasks": ["segmentation"], "steps": 3, "device": "cpu"})
    recorded = json.loads(record_research(run, Profile.test, "/cat", downstream).read_text())
    assert recorded["profile"] == "test" and recorded["downstream"]["steps"] == 3
    config = evaluation_config(run, str(ckpt), None, Profile.test,
                               DownstreamParams.model_validate(recorded["downstream"]))
    assert config.head_size == "small" and config.steps == 3 and config.device == "cpu"
    assert [(c.task, c.dataset) for c in config.tasks] == [("segmentation", "hsi-drive-v2-0")]
    assert config.run_folder() == run and config.evaluation_folder() == run / "evaluations"


def test_hvp_tensorboard_prints_the_command(tmp_path: Path) -> None:
    from stages.research.tensorboard import EventWriter

    EventWriter(tmp_path / "run" / "tensorboard" / "pretrain").scalars(0, {"pretrain/loss": 1.0})
    out = subprocess.run([sys.executable, "-m", "pipelines.cli", "tensorboard", "--runs", str(tmp_path)], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    assert f"tensorboard --logdir {tmp_path.resolve()}" in out and "1 folder(s)" in out
