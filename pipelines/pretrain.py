"""Prefect wiring of the pretraining stage: one task runs the trainer (in-process, or torchrun with several
devices) holding a `gpu` slot, then the loss plot and the final metrics are published as artifacts. Logic lives in
stages.pretraining.

A run is keyed on its inputs (the catalog's image sha256s and fused-mask ids, the resolved config, the student
and teacher checkpoints' sha256): a finished run with the same key is found in its folder and the stage skips.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from prefect import flow, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import State

from catalog.masks import MaskStore
from infra.settings import open_catalog
from pipelines.params import (
    Device,
    ModelName,
    PathParams,
    Preprocessing,
    PretrainParams,
    Profile,
    resolve_paths,
    resolve_pretrain,
)
from pipelines.wiring import content_key, gpu_slot, png_data_uri, publish_markdown, retry_on_io, skipped
from stages import pretraining as stage
from stages.labelling.labeler import checkpoint_identity
from stages.pretraining.config import RUNTIME_FIELDS

#: File in a run folder that records the inputs key of the finished run.
KEY_FILE = "inputs-key.json"


# The run folder is the cache (see KEY_FILE); `resume` continues a stopped run from its latest checkpoint. Only I/O
# failures are retried, and a retry resumes from the latest checkpoint rather than starting over.
@task(name="pretrain", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=10, retry_condition_fn=retry_on_io,
      task_run_name="pretrain {model} x{nproc}")
def run_training(config: dict[str, Any], model: str, nproc: int, resume: bool) -> dict[str, Any]:
    """Train with `stage.launch` (torchrun subprocess when nproc > 1); returns the result as a plain dict."""
    from prefect.runtime import task_run

    again = resume or (task_run.run_count or 1) > 1 and stage_has_checkpoint(config["out_dir"])
    with gpu_slot():
        result = stage.launch(stage.PretrainConfig.from_dict(config), nproc=nproc, resume=again)
    return dataclasses.asdict(result)


def stage_has_checkpoint(out_dir: str) -> bool:
    """Whether a run folder holds a checkpoint to resume from."""
    from stages.pretraining.checkpoints import latest_checkpoint

    return latest_checkpoint(Path(out_dir)) is not None


def inputs_key(config: stage.PretrainConfig) -> str:
    """sha256 of what a run computes from: the config (without runtime fields and its folder), every trained
    image's content sha256 and fused-mask id, and the student and teacher checkpoints' sha256."""
    cat = open_catalog(config.catalog)
    images = cat.images()
    if config.datasets:
        images = images[images["dataset"].isin(config.datasets)]
    index = MaskStore(cat).index()
    fused = index[index["branch"] == "fused"] if not index.empty else index
    latest = dict(zip(fused["image_id"], fused["labeler_id"], strict=True)) if not fused.empty else {}
    content = sorted((i, s, latest[i]) for i, s in zip(images["image_id"], images["sha256"], strict=True)
                     if i in latest)
    settings = {k: v for k, v in config.to_dict().items() if k not in RUNTIME_FIELDS}
    return content_key(settings, content, checkpoint_identity(config.student_checkpoint),
                       checkpoint_identity(config.teacher.checkpoint))


@flow(name="pretrain", log_prints=True)
def pretrain_flow(
    catalog: str | None = None,
    model: ModelName | None = None,  # type: ignore[valid-type]
    steps: int | None = None,
    out: str | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    crop_size: int | None = None,
    lambda_distill: float = 1.0,
    teacher_checkpoint: str | None = None,
    student_checkpoint: str | None = None,
    init_strict: bool = True,
    preprocessing: Preprocessing = Preprocessing.released,
    checkpoint_every: int | None = None,
    nproc: int | None = None,
    resume: bool = False,
    device: Device = Device.auto,
    profile: Profile = Profile.production,
    runs: str | None = None,
    datasets: list[str] | None = None,
) -> dict[str, Any] | State:
    """Pretrain the HyperVision backbone on the catalog's fused pseudo-labels; publishes the loss plot and the
    final metrics. A finished run with the same inputs is not trained again.

    Args:
        catalog: Catalog directory or fsspec URL. Empty: `HVP_CATALOG`.
        model: Registry model to train. Empty: the profile's (demo `tiny`, production the -B layout).
        steps: Optimizer steps. Empty: the profile's (demo 6, production 100000).
        out: Run folder. Empty: `<runs>/pretrain-<model>-<inputs key>`.
        batch_size: Crops per device and step. Empty: the profile's (demo 2, production 4).
        lr: Peak learning rate. Empty: the model preset's.
        crop_size: Crop side in pixels. Empty: the model's input size.
        lambda_distill: Weight of the distillation loss.
        teacher_checkpoint: Local RGB teacher weights. Empty: random-init.
        student_checkpoint: Initial student weights (`--init`: a released or compatible HyperFree/HyperVision
            checkpoint). Empty: random-init.
        init_strict: Load the initial student weights strictly (keys and shapes must match the layout).
        preprocessing: Preprocessing contract of the crops (`released` or `crop_max`, model.preprocess).
        checkpoint_every: Steps between checkpoints. Empty: the profile's (demo 3) or the preset's.
        nproc: Processes under torchrun. Empty: the visible GPUs, or 1.
        resume: Continue the run in `out` from its latest checkpoint.
        device: auto (CUDA when available), cpu or cuda.
        profile: Which defaults fill the empty fields: demo or production.
        runs: Folder of run folders. Empty: `runs` beside a local catalog.
        datasets: Only images of these datasets. Empty: all.
    """
    paths = resolve_paths(PathParams(catalog=catalog, runs=runs, datasets=datasets))
    given = PretrainParams(model=model, steps=steps, out=out, batch_size=batch_size, lr=lr, crop_size=crop_size,
                           lambda_distill=lambda_distill, teacher_checkpoint=teacher_checkpoint,
                           student_checkpoint=student_checkpoint, init_strict=init_strict,
                           preprocessing=preprocessing, checkpoint_every=checkpoint_every, nproc=nproc, device=device)
    kw = resolve_pretrain(profile, given)
    name = kw.pop("model")
    procs = kw.pop("nproc", None)
    run_dir = kw.pop("out", None)
    teacher = kw.pop("teacher_checkpoint", None)
    overrides = {"catalog": paths.catalog, "datasets": paths.datasets, **kw}
    config = stage.PretrainConfig.preset(name, **overrides)
    if teacher:
        config = dataclasses.replace(config, teacher=dataclasses.replace(config.teacher, checkpoint=teacher))
    key = inputs_key(config)
    folder = Path(run_dir or Path(paths.runs) / f"pretrain-{name}-{key[:12]}")
    config = dataclasses.replace(config, out_dir=str(folder))
    print(f"pretrain {name}: {config.steps} steps, batch {config.batch_size}, catalog {paths.catalog}, "
          f"run folder {folder}, inputs key {key[:12]}")
    done = _finished(folder, key)
    if done is not None and not resume:
        print(f"finished run on these inputs: {folder}")
        return skipped("pretrain", f"run {folder.name} already finished on these inputs", done)
    if run_dir is None and stage_has_checkpoint(str(folder)):  # an interrupted run on these very inputs
        print(f"resuming the interrupted run in {folder}")
        resume = True
    devices = torch.cuda.device_count() if config.device != "cpu" and torch.cuda.is_available() else 1
    result = run_training(config.to_dict(), name, procs or devices, resume)
    (folder / KEY_FILE).write_text(json.dumps({"key": key, "result": result}, indent=2))
    _publish(name, result)
    return result


def _finished(folder: Path, key: str) -> dict[str, Any] | None:
    """The stored result of the finished run in ``folder`` when its inputs key is ``key``."""
    try:
        data = json.loads((folder / KEY_FILE).read_text())
    except (OSError, ValueError):
        return None
    result: dict[str, Any] = data.get("result", {})
    if data.get("key") != key or not Path(result.get("checkpoint") or "/nonexistent").exists():
        return None
    return result


def latest_finished_run(runs: str, model: str) -> dict[str, Any] | None:
    """The stored result of the most recently finished pretraining run of ``model`` under ``runs`` (its
    ``pretrain-<model>-<inputs key>`` folders), or None: what the downstream stages take as their backbone when
    none is named."""
    found: list[tuple[float, dict[str, Any]]] = []
    for key_file in Path(runs).glob(f"pretrain-{model}-*/{KEY_FILE}"):
        try:
            result = json.loads(key_file.read_text()).get("result", {})
        except (OSError, ValueError):
            continue
        if Path(result.get("checkpoint") or "/nonexistent").exists():
            found.append((key_file.stat().st_mtime, result))
    return max(found, key=lambda f: f[0])[1] if found else None


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
    create_table_artifact(key="pretrain-metrics", table=rows,
                          description=f"{note}final metrics of the pretraining run in `{result['out_dir']}`")
