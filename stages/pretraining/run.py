"""The pretraining stage's runner: ``run_pretrain(catalog, PretrainStageConfig) -> PretrainResult``.

A run is keyed on its inputs (the catalog's image sha256s and fused-mask ids, the resolved trainer config, the
student and teacher checkpoints' sha256): a finished run with the same key is found in its folder and reused; an
interrupted one in its automatic folder resumes from its latest checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from catalog.catalog import Catalog
from catalog.masks import MaskStore
from stages.labelling.labeler import checkpoint_identity
from stages.pretraining.checkpoints import latest_checkpoint
from stages.pretraining.config import RUNTIME_FIELDS, PretrainConfig, PretrainResult
from stages.pretraining.launch import launch
from stages.pretraining.objectives import OBJECTIVES
from stages.registry import record_run_config, register_stage
from stages.research.cards import keep_snapshot, write_model_card
from stages.research.tensorboard import pretraining_events

#: File in a run folder that records the inputs key of the finished run and its result.
KEY_FILE = "inputs-key.json"


class MAEOptions(BaseModel):
    """Settings of the mae_* objectives; None: HyperSIGMA's (or the tiny model's preset, MAESettings)."""

    model_config = ConfigDict(extra="forbid")

    bands: int | None = Field(default=None, ge=1, description="contiguous bands per crop (release: 100)")
    crop_size: int | None = Field(default=None, ge=4, description="crop side in pixels (release: 64)")
    patch_size: int | None = Field(default=None, ge=1, description="spatial patch side (release: 8)")
    mask_ratio: float | None = Field(default=None, ge=0.0, lt=1.0, description="masked token fraction (0.75)")
    decoder_embed_dim: int | None = Field(default=None, ge=1, description="decoder width (release: 512)")
    decoder_depth: int | None = Field(default=None, ge=1, description="decoder blocks (release: 8)")
    decoder_num_heads: int | None = Field(default=None, ge=1, description="decoder heads (release: 16)")
    norm_pix_loss: bool | None = Field(default=None, description="loss on per-patch normalised pixels")
    scale: float | None = Field(default=None, gt=0.0, description="crops are divided by this (release: 4000)")


class PretrainStageConfig(BaseModel):
    """The pretraining stage: the model, its schedule and weights, and where the run goes. Empty (None) fields
    take the model preset's values (stages.pretraining.config.PretrainConfig.preset)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(default="tiny", description="registry model to train")
    objective: str = Field(default="hypervision", description="hypervision | mae_spatial | mae_spectral "
                           "(stages.pretraining.objectives; mae_* train hypersigma_* models)")
    mae: MAEOptions | None = Field(default=None, description="settings of the mae_* objectives; None: the model "
                                   "preset's (HyperSIGMA's, or the tiny preset for hypersigma_tiny)")
    steps: int | None = Field(default=None, ge=1, description="optimizer steps")
    batch_size: int | None = Field(default=None, ge=1, description="crops per device and step")
    lr: float | None = Field(default=None, gt=0.0, description="peak learning rate")
    crop_size: int | None = Field(default=None, ge=16, description="crop side in pixels")
    min_mask_pixels: int | None = Field(default=None, ge=1, description="smallest sub-mask trained on (pixels)")
    lambda_distill: float = Field(default=1.0, ge=0.0, description="weight of the distillation loss")
    teacher_checkpoint: str | None = Field(default=None, description="local RGB teacher weights; None: random-init")
    student_checkpoint: str | None = Field(default=None, description="initial student weights; None: random-init")
    init_strict: bool = Field(default=True, description="load the initial student weights strictly")
    preprocessing: str = Field(default="released", description="preprocessing contract of the crops")
    checkpoint_every: int | None = Field(default=None, ge=1, description="steps between checkpoints")
    device: str = Field(default="auto", description="auto (CUDA when available), cpu or cuda")
    nproc: int | None = Field(default=None, ge=1, description="processes under torchrun; None: the GPUs, or 1")
    datasets: list[str] | None = Field(default=None, description="only images of these datasets; None: all")
    fusion_id: str | None = Field(default=None, description="train on this fusion's pseudo-targets; None: latest")
    out_dir: str | None = Field(default=None, description="run folder; None: <runs>/pretrain-<model>-<inputs key>")
    runs: str = Field(default="./hvp-data/runs", description="folder of run folders (when out_dir is None)")
    resume: bool = Field(default=False, description="continue the run in out_dir from its latest checkpoint")

    @field_validator("objective")
    @classmethod
    def _registered(cls, objective: str) -> str:
        OBJECTIVES.get(objective)
        return objective

    def trainer_config(self, catalog_uri: str) -> PretrainConfig:
        """The trainer's config: the model preset, then every field set here (out_dir left to the runner)."""
        keys = ("objective", "steps", "batch_size", "lr", "crop_size", "min_mask_pixels", "lambda_distill",
                "student_checkpoint", "init_strict", "preprocessing", "checkpoint_every", "device", "datasets",
                "fusion_id")
        given = {k: getattr(self, k) for k in keys if getattr(self, k) is not None}
        config = PretrainConfig.preset(self.model, catalog=catalog_uri, **given)
        if self.mae is not None:
            config = dataclasses.replace(config, mae=dataclasses.replace(config.mae,
                                                                         **self.mae.model_dump(exclude_none=True)))
        if self.teacher_checkpoint:
            config = dataclasses.replace(config, teacher=dataclasses.replace(config.teacher,
                                                                             checkpoint=self.teacher_checkpoint))
        return config


def inputs_key(catalog: Catalog, config: PretrainConfig) -> str:
    """sha256 of what a run computes from: the config (without runtime fields and its folder), every trained
    image's content sha256 and fused-mask id (objectives that train on masks), and the student and teacher
    checkpoints' sha256."""
    images = catalog.images()
    if config.datasets:
        images = images[images["dataset"].isin(config.datasets)]
    if OBJECTIVES.get(config.objective).needs_masks:
        index = MaskStore(catalog).index()
        fused = index[index["branch"] == "fused"] if not index.empty else index
        if config.fusion_id is not None and not fused.empty:
            fused = fused[fused["labeler_id"] == config.fusion_id]
        latest = dict(zip(fused["image_id"], fused["labeler_id"], strict=True)) if not fused.empty else {}
        content = sorted((i, s, latest[i]) for i, s in zip(images["image_id"], images["sha256"], strict=True)
                         if i in latest)
    else:  # pixels only: every image's content
        content = sorted((i, s, "") for i, s in zip(images["image_id"], images["sha256"], strict=True))
    settings = {k: v for k, v in config.to_dict().items() if k not in RUNTIME_FIELDS}
    parts = (settings, content, checkpoint_identity(config.student_checkpoint),
             checkpoint_identity(config.teacher.checkpoint))
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def run_folder(catalog: Catalog, config: PretrainStageConfig) -> tuple[PretrainConfig, str]:
    """The trainer config with its run folder filled in, and the inputs key that names an automatic folder."""
    trainer = config.trainer_config(catalog.uri)
    key = inputs_key(catalog, trainer)
    folder = config.out_dir or str(Path(config.runs) / f"pretrain-{config.model}-{key[:12]}")
    return dataclasses.replace(trainer, out_dir=folder), key


def _stored(folder: str | Path, key: str | None = None) -> dict[str, Any] | None:
    """The result stored in a run folder's KEY_FILE when its checkpoint exists (and its key is ``key``, if given)."""
    try:
        data = json.loads((Path(folder) / KEY_FILE).read_text())
    except (OSError, ValueError):
        return None
    result: dict[str, Any] = data.get("result", {})
    if (key is not None and data.get("key") != key) or not Path(result.get("checkpoint") or "/nonexistent").exists():
        return None
    return result


def finished_run(folder: str | Path, key: str) -> PretrainResult | None:
    """The finished run in ``folder`` when its inputs key is ``key`` (marked ``reused``)."""
    result = _stored(folder, key)
    return None if result is None else PretrainResult(**{**result, "reused": True})


def latest_finished_run(runs: str | Path, model: str) -> dict[str, Any] | None:
    """The stored result of the most recently finished pretraining run of ``model`` under ``runs`` (its
    ``pretrain-<model>-<key>`` folders), or None: the downstream stages' backbone when none is named."""
    found = [(f.stat().st_mtime, result) for f in Path(runs).glob(f"pretrain-{model}-*/{KEY_FILE}")
             if (result := _stored(f.parent)) is not None]
    return max(found, key=lambda f: f[0])[1] if found else None


def has_checkpoint(folder: str | Path) -> bool:
    """Whether a run folder holds a checkpoint to resume from."""
    return latest_checkpoint(Path(folder)) is not None


@register_stage("pretrain", PretrainStageConfig, "HyperVision student on the fused pseudo-targets (restartable)")
def run_pretrain(catalog: Catalog, config: PretrainStageConfig, *,
                 on_checkpoint: Callable[[int, Path], None] | None = None) -> PretrainResult:
    """Train (in this process, or under torchrun with several devices), or reuse the finished run on the same
    inputs; an interrupted run in its automatic folder resumes. The resolved stage config is written beside the
    run (stage-config.json), the inputs key and result into KEY_FILE. Every checkpoint is kept as a snapshot
    with its model card (stages.research.cards) and then announced to `on_checkpoint` (step, snapshot folder);
    the run's TensorBoard event files go to <run>/tensorboard/pretrain."""
    trainer, key = run_folder(catalog, config)
    done = finished_run(trainer.out_dir, key)
    if done is not None and not config.resume:
        return done
    resume = config.resume or (config.out_dir is None and has_checkpoint(trainer.out_dir))
    record_run_config(trainer.out_dir, "pretrain", config)
    devices = torch.cuda.device_count() if trainer.device != "cpu" and torch.cuda.is_available() else 1
    def snapshot(step: int, checkpoint: Path) -> None:
        kept = keep_snapshot(checkpoint, trainer.out_dir)
        write_model_card(catalog, kept)
        if on_checkpoint is not None:
            on_checkpoint(step, kept)

    result = launch(trainer, nproc=config.nproc or devices, resume=resume, on_checkpoint=snapshot)
    pretraining_events(trainer.out_dir)
    path = Path(trainer.out_dir) / KEY_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"key": key, "result": dataclasses.asdict(result)}, indent=2))
    tmp.replace(path)
    return result
