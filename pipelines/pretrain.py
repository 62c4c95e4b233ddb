"""Prefect wiring of the pretraining stage: one task runs the stage's runner (`stages.pretraining.run_pretrain`:
in-process, or torchrun with several devices) holding a `gpu` slot, then the loss plot and the final metrics are
published as artifacts. Logic lives in stages.pretraining.

A run is keyed on its inputs (the catalog's image sha256s and fused-mask ids, the resolved config, the student
and teacher checkpoints' sha256): a finished run with the same key is found in its folder and the stage skips.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.states import State

from pipelines.catalogs import open_catalog
from pipelines.params import (
    DEFAULT_DOWNSTREAM,
    DEFAULT_PATHS,
    DEFAULT_PRETRAIN,
    DownstreamParams,
    PathParams,
    PretrainParams,
    Profile,
)
from pipelines.profiles import resolve
from pipelines.research import emit_checkpoint, record_research, tensorboard_command
from pipelines.wiring import gpu_slot, png_data_uri, publish_markdown, publish_table, retry_on_io, skipped
from stages import pretraining as stage
from stages.pretraining.run import PretrainStageConfig, has_checkpoint, run_folder


# The run folder is the cache (see stages.pretraining.run.KEY_FILE). Only I/O failures are retried, and a retry
# resumes from the latest checkpoint rather than starting over.
@task(name="pretrain", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=10, retry_condition_fn=retry_on_io,
      task_run_name="pretrain {config.model}")
def pretrain_task(catalog_uri: str, config: PretrainStageConfig, out_dir: str) -> dict[str, Any]:
    """The stage's runner holding a `gpu` slot (a retry resumes the run in ``out_dir``); every committed
    checkpoint emits `hvp.checkpoint.saved` (the `evaluate` deployment's trigger); returns the result as a plain
    dict."""
    from prefect.runtime import task_run

    if (task_run.run_count or 1) > 1 and has_checkpoint(out_dir):
        config = config.model_copy(update={"resume": True})
    with gpu_slot():
        result = stage.run_pretrain(open_catalog(catalog_uri), config,
                                    on_checkpoint=lambda step, path: emit_checkpoint(out_dir, step, path))
    return dataclasses.asdict(result)


@flow(name="pretrain", log_prints=True)
def pretrain_flow(profile: Profile = Profile.production, paths: PathParams = DEFAULT_PATHS,
                  pretrain: PretrainParams = DEFAULT_PRETRAIN, resume: bool = False,
                  downstream: DownstreamParams = DEFAULT_DOWNSTREAM) -> dict[str, Any] | State:
    """Pretrain the HyperVision backbone on the catalog's fused pseudo-labels; publishes the loss plot and the
    final metrics. A finished run with the same inputs is not trained again.

    Args:
        profile: Which profile fills the empty fields: demo (`tiny`, a few steps), production (the -B layout,
            100000 steps) or test.
        paths: Catalog, runs folder and datasets (resolved to absolute paths and shown in the run).
        pretrain: Model, steps, batch, checkpoints and weights of pretraining; empty fields take the profile's.
        resume: Continue the run in `pretrain.out` from its latest checkpoint.
        downstream: Tasks, steps and device of the evaluation each checkpoint triggers (`evaluate` deployment).
    """
    run = resolve(profile, paths, pretrain=pretrain, downstream=downstream, resume=resume)
    config = run.pretrain
    trainer, key = run_folder(open_catalog(run.paths.catalog), config)
    print(f"pretrain {config.model}, profile {run.profile.value}: {trainer.steps} steps, batch "
          f"{trainer.batch_size}, catalog {run.paths.catalog}, run folder {trainer.out_dir}, inputs key {key[:12]}")
    record_research(trainer.out_dir, run.profile, run.paths.catalog, run.downstream)
    result = pretrain_task(run.paths.catalog, config, trainer.out_dir)
    print(f"TensorBoard: {tensorboard_command(trainer.out_dir)}")
    if result["reused"]:
        print(f"finished run on these inputs: {trainer.out_dir}")
        return skipped("pretrain", f"run {Path(trainer.out_dir).name} already finished on these inputs", result)
    _publish(config.model, result)
    return result


def _publish(model: str, result: dict[str, Any]) -> None:
    """The loss plot (embedded) and the final metrics as artifacts named pretrain-*."""
    weights = f"student `{result['student_weights'][:12]}`, teacher `{result['teacher_weights'][:12]}`"
    note = "random-init: " if stage.RANDOM_INIT in (result["student_weights"], result["teacher_weights"]) else ""
    png = Path(result["plot_png"]).resolve()
    image = f"![loss curves]({png_data_uri(png)})\n\n" if png.is_file() else "_(no loss plot)_\n\n"
    publish_markdown(
        "pretrain-loss",
        f"## HyperVision-{model} pretraining loss ({note}{weights})\n\n{image}"
        f"Plot: `{png}`  \nMetrics: `{result['metrics_csv']}`  \nCheckpoint: `{result['checkpoint']}`\n",
        description=f"{note}loss curves of the pretraining run in `{result['out_dir']}`",
    )
    rows = [{"metric": k, "value": v} for k, v in result["final"].items()]
    rows += [{"metric": "steps_done", "value": result["steps_done"]},
             {"metric": "steps_per_s", "value": result["steps_per_s"]},
             {"metric": "world_size", "value": result["world_size"]},
             {"metric": "student_weights", "value": result["student_weights"][:12]},
             {"metric": "teacher_weights", "value": result["teacher_weights"][:12]}]
    publish_table("pretrain-metrics", rows,
                  description=f"{note}final metrics of the pretraining run in `{result['out_dir']}`")
