"""HyperVision pretraining: prompt-driven segmentation on fused pseudo-labels + DINO-style RGB distillation.

Per step, a batch of crops that share one wavelength set is prepared under the run's preprocessing contract
(model.preprocess.prepare_batch) and goes through the student encoder (the channel-adaptive HyperFree/HyperVision
encoder: any registered layout, from random-init or from a released or compatible checkpoint); its neck
embedding feeds the SAM prompt encoder and mask decoder once per image with that image's sub-mask prompts, and its
last block's tokens feed the distillation head. The loss is L_seg (focal:dice:IoU-MSE = 20:1:1) +
lambda_distill * L_distill.

The trainer is restartable (dinov2 style): the resolved config is saved beside the run; periodic checkpoints hold
the model as safetensors (loadable by `model.load_checkpoint`), the distillation head and centre as safetensors,
and a torch-saved dict of optimizer, scheduler, step and RNG states (plain types and tensors only, read back with
weights_only=True). On CUDA it trains under bf16 autocast with fused AdamW; under torchrun (WORLD_SIZE > 1) it
wraps the model in DDP, shards every batch across ranks and only rank 0 writes. Run `python -m stages.pretraining.launch
--config run.json [--resume]`, or `launch(config, nproc)`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from catalog.catalog import Catalog
from model import LoadReport, create_model, load_checkpoint
from model.distill import DistillHead, RGBTeacher
from model.losses import segmentation_loss
from model.preprocess import check_contract, describe, prepare_batch
from model.pretraining import PretrainModule, StudentOutput, student_token_dim
from stages.pretraining.checkpoints import checkpoint_to_resume, latest_checkpoint, load_training_state, save_checkpoint
from stages.pretraining.config import RANDOM_INIT, STAGE_VERSION, PretrainConfig, PretrainResult
from stages.pretraining.data import BandSignatureBatchSampler, PretrainBatch, PretrainDataset, collate, scan_catalog
from stages.pretraining.logs import append_row, open_run_dir, plot_losses
from stages.pretraining.mae import train_mae
from stages.pretraining.objectives import OBJECTIVES, Objective, OnCheckpoint, register_objective
from stages.pretraining.runtime import Runtime, setup_runtime
from stages.training.checkpoints import prune_checkpoints
from stages.training.loop import checkpoint_due, optimizer_step
from stages.training.optim import adamw, warmup_cosine

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- the trainer
@dataclass
class Trainer:
    """The model, frozen teacher, optimizer and schedule of one run, and the optimisation step."""

    config: PretrainConfig
    runtime: Runtime
    module: PretrainModule
    teacher: RGBTeacher
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    student_weights: str
    train_module: nn.Module
    """`module`, or its DDP wrapper under torchrun."""
    init_report: LoadReport | None = None
    """What loading the initial student weights did (None: random-init)."""

    @classmethod
    def build(cls, config: PretrainConfig, rt: Runtime) -> Trainer:
        """Seed, build student (optionally from a checkpoint, strictly unless `init_strict` is off), teacher, head,
        AdamW and the lr schedule."""
        check_contract(config.preprocessing)
        torch.manual_seed(config.seed)
        np.random.seed(config.seed)
        random.seed(config.seed)
        student = create_model(config.model, **config.model_overrides)
        student_weights = RANDOM_INIT
        report = None
        if config.student_checkpoint:
            report = load_checkpoint(student, config.student_checkpoint, strict=config.init_strict)
            student_weights = report.sha256
        # HyperFree's semantic-contrast blocks are not part of this objective: frozen, kept for checkpoint keys.
        student.image_encoder.contras_modules.requires_grad_(False)
        teacher = RGBTeacher(config.teacher).to(rt.device)
        head = DistillHead(student_token_dim(student), teacher.embed_dim, config.distill)
        module = PretrainModule(student, head, config.multimask).to(rt.device)
        optimizer = adamw(module, config.lr, config.weight_decay, rt.device)
        scheduler = warmup_cosine(optimizer, config)
        train_module: nn.Module = module
        if rt.world_size > 1:
            # Some parameters get no gradient on some steps (grid bank with < 20 bands, box/mask prompt embeddings).
            train_module = DistributedDataParallel(module, device_ids=[rt.device.index] if rt.cuda else None,
                                                   find_unused_parameters=True, forward_sync_buffers=False)
        return cls(config, rt, module, teacher, optimizer, scheduler, student_weights, train_module, report)

    @property
    def img_size(self) -> int:
        """The student's input side."""
        return self.module.student.config.encoder.img_size

    @property
    def crop_size(self) -> int:
        """Crop side of the data (the input side unless configured)."""
        return self.config.crop_size or self.img_size

    @property
    def random_init(self) -> bool:
        """True when the student or the teacher started from random weights."""
        return RANDOM_INIT in (self.student_weights, self.teacher.identity)

    def step(self, step: int, batch: PretrainBatch) -> dict[str, Any]:
        """One optimisation step on a batch already on the device; returns its metrics (no step/seconds)."""
        config, crop, img_size = self.config, self.crop_size, self.img_size
        prepared = prepare_batch(batch.cube, batch.sizes, img_size, batch.gsd_m, config.preprocessing)
        image, gsd = prepared.image, prepared.gsd
        scale = img_size / crop
        # Pixel (x, y) of the crop -> input pixels, so that the prompt encoder's +0.5 lands on the pixel centre.
        points = [(p + 0.5) * scale - 0.5 for p in batch.points]
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step * 1009 + self.runtime.rank)
        head = self.module.head
        with self.runtime.autocast():
            teacher_tokens = self.teacher(batch.rgb)
            out: StudentOutput = self.train_module(image, batch.wavelengths, gsd, points, crop, config.grid_samples,
                                                   generator)
        targets = torch.cat(batch.masks)
        seg = segmentation_loss(out.mask_logits, out.iou_pred, targets, config.seg_loss)
        t_logits = head.teacher_logits(teacher_tokens, out.grid)
        distill = head.loss(out.head_logits, t_logits)
        loss = seg.total + config.lambda_distill * distill
        clipped, lr = optimizer_step(loss, self.module, self.optimizer, self.scheduler, config.grad_clip)
        grad_norm = clipped if clipped is not None else loss.new_tensor(float("nan"))
        head.update_center(t_logits)
        mean_iou = seg.chosen_iou.mean() if seg.chosen_iou.numel() else loss.new_tensor(float("nan"))
        names = ("loss", "seg", "focal", "dice", "iou_mse", "distill", "mask_iou", "grad_norm")
        values = torch.stack([t.detach().float() for t in (loss, seg.total, seg.focal, seg.dice, seg.iou, distill,
                                                          mean_iou, grad_norm)])
        if self.runtime.world_size > 1:  # log the mean over ranks
            dist.all_reduce(values)
            values /= self.runtime.world_size
        return {**dict(zip(names, values.tolist(), strict=True)), "prompts": int(targets.shape[0]),
                "bands": int(batch.wavelengths.numel()), "lr": lr}


def train(config: PretrainConfig, resume: bool = False, until_step: int | None = None,
          on_checkpoint: OnCheckpoint | None = None) -> PretrainResult:
    """Run (or, with `resume`, continue) the pretraining run in `config.out_dir` with its registered objective.

    `until_step` stops early after that many steps in total, with a checkpoint: a job with a wall-clock budget
    runs in slices, and `resume=True` continues exactly where it stopped. `on_checkpoint` hears of every
    checkpoint once it is committed (the research loop evaluates each).
    """
    objective = OBJECTIVES.get(config.objective)
    rt = setup_runtime(config.device, config.collective_timeout_s)
    try:
        return objective.train(config, rt, resume, until_step, on_checkpoint)
    finally:
        if rt.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _init_record(config: PretrainConfig, report: LoadReport | None) -> dict[str, Any] | None:
    """What the run started from: the checkpoint, its sha256 and every key that did not load as stored."""
    if report is None:
        return None
    return {"checkpoint": config.student_checkpoint, "sha256": report.sha256, "strict": report.strict,
            "loaded": report.loaded, "resized": list(report.resized), "missing": list(report.missing),
            "dropped": list(report.dropped)}


def _train(config: PretrainConfig, rt: Runtime, resume: bool, until_step: int | None,
           on_checkpoint: OnCheckpoint | None = None) -> PretrainResult:
    run_dir = Path(config.out_dir)
    trainer = Trainer.build(config, rt)
    module, teacher = trainer.module, trainer.teacher
    if config.catalog is None:
        raise ValueError("PretrainConfig.catalog is not set: give the catalog URI (the CLI and the pretrain flow "
                         "fill it from HVP_CATALOG)")
    catalog = Catalog(config.catalog)
    images = scan_catalog(catalog, config.datasets, config.fusion_id)
    dataset = PretrainDataset(catalog.uri, trainer.crop_size, images, config.max_masks, config.min_mask_pixels,
                              seed=config.seed, fusion_id=config.fusion_id)
    resolved = {
        "config": config.to_dict(), "model_config": module.student.config.to_dict(), "crop_size": trainer.crop_size,
        "student_weights": trainer.student_weights, "teacher": teacher.provenance(),
        "teacher_weights": teacher.identity, "world_size": rt.world_size, "catalog_uri": catalog.uri,
        "preprocessing": describe(config.preprocessing), "init": _init_record(config, trainer.init_report),
        "images": len(images), "band_signatures": len(set(dataset.signatures)),
        "datasets": sorted({i.dataset for i in images}), "torch": torch.__version__,
        "stage_version": STAGE_VERSION,
    }
    metrics_csv = run_dir / "metrics.csv"
    start = 0
    ckpt = checkpoint_to_resume(run_dir, config.to_dict(), resume)
    if ckpt is not None:
        start = load_training_state(ckpt, module, trainer.optimizer, trainer.scheduler)
        if rt.is_main:
            prune_checkpoints(run_dir, config.keep_checkpoints)
        logger.info("Resumed %s at step %d from %s", run_dir, start, ckpt)
    if rt.is_main:
        open_run_dir(run_dir, resolved, metrics_csv, start)

    end = min(config.steps, until_step) if until_step is not None else config.steps
    sampler = BandSignatureBatchSampler(dataset.signatures, config.batch_size, end, config.seed, start,
                                        rt.rank, rt.world_size)
    # Workers are spawned, not forked: a fork inherits the zarr event-loop thread and Prefect's exit hooks.
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=config.num_workers,
                        pin_memory=rt.cuda, persistent_workers=False,
                        multiprocessing_context="spawn" if config.num_workers else None)
    weights_note = f"student={trainer.student_weights[:12]};teacher={teacher.identity[:12]}"
    module.train()
    last: dict[str, Any] = {}
    timed, t_first = 0, 0.0
    step = start - 1
    for step, batch in zip(range(start, end), loader, strict=False):
        t0 = time.perf_counter()
        row = trainer.step(step, batch.to(rt.device))
        row.update(step=step, seconds=time.perf_counter() - t0, weights=weights_note)
        if step == start:
            t_first = time.perf_counter()
        else:
            timed += 1
        last = row
        if rt.is_main:
            append_row(metrics_csv, row)
            done = step + 1
            if checkpoint_due(done, config.checkpoint_every, end):
                saved = save_checkpoint(run_dir, done, module, trainer.optimizer, trainer.scheduler, resolved,
                                        config.keep_checkpoints)
                if on_checkpoint is not None:
                    on_checkpoint(done, saved)
    steps_done = step + 1
    rate = timed / (time.perf_counter() - t_first) if timed else 0.0
    png = run_dir / "loss.png"
    result = PretrainResult(
        out_dir=str(run_dir), steps_done=steps_done,
        final={k: float(v) for k, v in last.items() if k not in ("step", "weights")},
        metrics_csv=str(metrics_csv), plot_png=str(png),
        checkpoint=str(latest_checkpoint(run_dir) or "") if rt.is_main else "", steps_per_s=rate,
        student_weights=trainer.student_weights, teacher_weights=teacher.identity, world_size=rt.world_size,
    )
    if rt.is_main:
        if metrics_csv.is_file():
            note = " (random-init)" if trainer.random_init else ""
            plot_losses(metrics_csv, png, f"HyperVision-{config.model} pretraining{note}: "
                        f"{steps_done}/{config.steps} steps, world {rt.world_size}")
        (run_dir / "result.json").write_text(json.dumps(dataclasses.asdict(result), indent=2))
    logger.info("Pretraining stopped at step %d (%.2f steps/s after the first step)", steps_done, rate)
    return result




register_objective(Objective(name="hypervision", train=_train, needs_masks=True, uses_contract=True,
                             description="prompted segmentation on the fused masks + RGB distillation"))
for _kind in ("spatial", "spectral"):
    register_objective(Objective(
        name=f"mae_{_kind}", train=partial(train_mae, _kind), needs_masks=False, uses_contract=False,
        description=f"HyperSIGMA's {_kind} masked autoencoder (hypersigma_* models; no masks or teacher needed)"))
