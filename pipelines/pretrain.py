"""Prefect wiring of the pretraining stage: one task runs the trainer (in-process, or torchrun with several
devices), then the loss plot and the final metrics are published as artifacts. Logic lives in
stages.pretraining."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from infra.settings import get_settings
from stages import pretraining as stage


# The run directory is the cache: `resume` continues a stopped run from its latest checkpoint.
@task(name="pretrain", cache_policy=NO_CACHE, task_run_name="pretrain {model} x{nproc}")
def run_training(config: dict[str, Any], model: str, nproc: int, resume: bool) -> dict[str, Any]:
    """Train with `stage.launch` (torchrun subprocess when nproc > 1); returns the result as a plain dict."""
    result = stage.launch(stage.PretrainConfig.from_dict(config), nproc=nproc, resume=resume)
    return dataclasses.asdict(result)


@flow(name="pretrain", log_prints=True)
def pretrain_flow(
    catalog: str | None = None,
    model: str = "tiny",
    steps: int = 1000,
    out: str = "./hvp-data/runs/pretrain",
    batch_size: int = 4,
    lr: float | None = None,
    crop_size: int | None = None,
    lambda_distill: float = 1.0,
    teacher_checkpoint: str | None = None,
    student_checkpoint: str | None = None,
    init_strict: bool = True,
    preprocessing: str = "released",
    checkpoint_every: int | None = None,
    nproc: int | None = None,
    resume: bool = False,
    device: str = "auto",
) -> dict[str, Any]:
    """Pretrain the HyperVision backbone on the catalog's fused pseudo-labels; publishes the loss plot and the
    final metrics. `nproc` defaults to the number of visible GPUs (1 on the CPU); `resume` continues the run in
    `out` from its latest checkpoint; `student_checkpoint` (`--init`) starts from released or compatible weights,
    loaded strictly unless `init_strict` is off."""
    overrides: dict[str, Any] = {
        "catalog": catalog or get_settings().catalog, "out_dir": out, "steps": steps, "batch_size": batch_size,
        "crop_size": crop_size, "lambda_distill": lambda_distill, "student_checkpoint": student_checkpoint,
        "init_strict": init_strict, "preprocessing": preprocessing, "device": device,
    }
    if lr is not None:
        overrides["lr"] = lr
    if checkpoint_every is not None:
        overrides["checkpoint_every"] = checkpoint_every
    config = stage.PretrainConfig.preset(model, **overrides)
    if teacher_checkpoint:
        config = dataclasses.replace(config, teacher=dataclasses.replace(config.teacher, checkpoint=teacher_checkpoint))
    procs = nproc or (torch.cuda.device_count() if device != "cpu" and torch.cuda.is_available() else 1)
    result = run_training(config.to_dict(), model, procs, resume)
    weights = f"student `{result['student_weights']}`, teacher `{result['teacher_weights']}`"
    note = "random-init: " if stage.RANDOM_INIT in (result["student_weights"], result["teacher_weights"]) else ""
    png = Path(result["plot_png"]).resolve()
    create_markdown_artifact(
        key="pretrain-loss",
        markdown=(f"## HyperVision-{model} pretraining loss ({note}{weights})\n\n"
                  f"![loss curves]({png.as_uri()})\n\nPlot: `{png}`  \nMetrics: `{result['metrics_csv']}`  \n"
                  f"Checkpoint: `{result['checkpoint']}`\n"),
        description=f"{note}loss curves of the pretraining run in {result['out_dir']}",
    )
    rows = [{"metric": k, "value": v} for k, v in result["final"].items()]
    rows += [{"metric": "steps_done", "value": result["steps_done"]},
             {"metric": "steps_per_s", "value": result["steps_per_s"]},
             {"metric": "world_size", "value": result["world_size"]},
             {"metric": "student_weights", "value": result["student_weights"]},
             {"metric": "teacher_weights", "value": result["teacher_weights"]}]
    create_table_artifact(key="pretrain-metrics", table=rows,
                          description=f"{note}final metrics of the pretraining run in {result['out_dir']} "
                                      f"({weights})")
    return result
