"""HyperVision pretraining: prompt-driven segmentation on fused pseudo-labels + DINO-style RGB distillation.

Per step, a batch of crops that share one wavelength set goes through the student encoder (the channel-adaptive
HyperFree/HyperVision encoder); its neck embedding feeds the SAM prompt encoder and mask decoder once per image
with that image's sub-mask prompts, and its last block's tokens feed the distillation head. The loss is
L_seg (focal:dice:IoU-MSE = 20:1:1) + lambda_distill * L_distill.

The trainer is restartable (dinov2 style): the resolved config is saved beside the run; periodic checkpoints hold
the model as safetensors (loadable by `model.load_checkpoint`), the distillation head and centre as safetensors,
and a torch-saved dict of optimizer, scheduler, step and RNG states (plain types and tensors only, read back with
weights_only=True). On CUDA it trains under bf16 autocast with fused AdamW; under torchrun (WORLD_SIZE > 1) it
wraps the model in DDP, shards every batch across ranks and only rank 0 writes. Run `python -m stages.pretrain
--config run.json [--resume]`, or `launch(config, nproc)`.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import math
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from catalog.store import Catalog
from model import HyperFree, create_model, load_checkpoint
from model.distill import DistillConfig, DistillHead, RGBTeacher, TeacherConfig
from model.losses import SegLossConfig, segmentation_loss
from stages.pretrain_data import BandSignatureBatchSampler, PretrainBatch, PretrainDataset, collate, scan_catalog

logger = logging.getLogger(__name__)

RANDOM_INIT = "random-init"
STAGE_VERSION = "1"
METRIC_FIELDS = ["step", "loss", "seg", "focal", "dice", "iou_mse", "distill", "mask_iou", "prompts", "bands",
                 "lr", "grad_norm", "seconds", "weights"]
# Fields that may differ between a run and its resumption without changing what it computes.
RUNTIME_FIELDS = {"device", "num_workers", "catalog", "out_dir", "keep_checkpoints"}


@dataclass
class PretrainConfig:
    """Everything that defines a pretraining run; saved, resolved, as config.json beside the run."""

    catalog: str | None = None
    """Catalog URI (None: the settings' HVP_CATALOG)."""
    out_dir: str = "./hvp-data/runs/pretrain"
    model: str = "tiny"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    student_checkpoint: str | None = None
    """Initial student weights (e.g. HyperFree-b); None starts from random-init."""
    steps: int = 1000
    batch_size: int = 4
    """Crops per rank and step."""
    lr: float = 1e-4
    weight_decay: float = 0.05
    warmup_steps: int = 100
    min_lr: float = 1e-6
    grad_clip: float = 1.0
    lambda_distill: float = 1.0
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    seg_loss: SegLossConfig = field(default_factory=SegLossConfig)
    multimask: bool = True
    """Three candidate masks per prompt, the best one trained (SAM's ambiguity-aware training)."""
    crop_size: int | None = None
    """Crop side in pixels; None uses the model's input size. Crops are resized to the input size when different."""
    max_masks: int = 16
    min_mask_pixels: int = 16
    grid_samples: int | None = 40
    """Training-mode random grid-bank subset size (HyperFree's 40); None uses every matched band."""
    datasets: list[str] | None = None
    seed: int = 0
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    num_workers: int = 0
    device: str = "auto"
    """"auto" (CUDA when available), "cpu" or "cuda"."""

    @classmethod
    def preset(cls, model: str, **overrides: Any) -> PretrainConfig:
        """Defaults for a model size: the tiny model gets the tiny teacher and head (CPU tests), others the
        ViT-S/14 DINOv2 teacher and the DINO head."""
        small = model == "tiny"
        base: dict[str, Any] = {"model": model}
        if small:
            base.update(teacher=TeacherConfig.tiny(), distill=DistillConfig.tiny(), warmup_steps=10, lr=1e-3,
                        checkpoint_every=50)
        return cls(**{**base, **overrides})

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-friendly dict; `from_dict` inverts it."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PretrainConfig:
        """Rebuild from `to_dict` output (a saved config.json's "config" entry)."""
        values = dict(data)
        nested = {"teacher": TeacherConfig, "distill": DistillConfig, "seg_loss": SegLossConfig}
        for name, kind in nested.items():
            if isinstance(values.get(name), dict):
                values[name] = kind(**values[name])
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"Unknown PretrainConfig field(s) {sorted(unknown)}; valid: "
                             f"{sorted(f.name for f in dataclasses.fields(cls))}.")
        return cls(**values)

    @classmethod
    def load(cls, path: str | Path) -> PretrainConfig:
        """Read a config JSON: either a bare config dict or a run's config.json (its "config" entry)."""
        data = json.loads(Path(path).read_text())
        return cls.from_dict(data.get("config", data))


@dataclass
class PretrainResult:
    """What a run produced (paths as strings, so it crosses process and task boundaries)."""

    out_dir: str
    steps_done: int
    final: dict[str, float]
    metrics_csv: str
    plot_png: str
    checkpoint: str
    steps_per_s: float
    student_weights: str
    teacher_weights: str
    world_size: int

    @property
    def random_init(self) -> bool:
        """True when the student or the teacher started from random weights."""
        return RANDOM_INIT in (self.student_weights, self.teacher_weights)


# ---------------------------------------------------------------------------------------------- model and schedule
@dataclass
class StudentOutput:
    """Per-prompt mask logits at crop resolution (N, M, S, S) and predicted IoU (N, M) for all images of the
    batch concatenated, plus the distillation head's logits (B, h*w, K) and the student token grid (h, w)."""

    mask_logits: torch.Tensor
    iou_pred: torch.Tensor
    head_logits: torch.Tensor
    grid: tuple[int, int]


class PretrainModule(nn.Module):
    """The trainable part: student (HyperFree/HyperVision) + distillation head; one forward for DDP."""

    def __init__(self, student: HyperFree, head: DistillHead, multimask: bool) -> None:
        super().__init__()
        self.student = student
        self.head = head
        self.multimask = multimask

    def forward(self, image: torch.Tensor, wavelengths: torch.Tensor, gsd: torch.Tensor,
                points: Sequence[torch.Tensor], out_size: int, grid_samples: int | None,
                generator: torch.Generator | None) -> StudentOutput:
        """Encoder once for the batch, mask decoder once per image with its prompts (points in input pixels)."""
        enc = self.student.image_encoder
        feats = enc.forward_intermediates(image, wavelengths, gsd, grid_samples, generator)
        tokens, embedding = feats[-2], feats[-1]
        logits, ious = [], []
        for b, pts in enumerate(points):
            if pts.shape[0] == 0:
                continue
            labels = torch.ones(pts.shape[0], 1, dtype=torch.int64, device=pts.device)
            low, iou = self.student.decode(embedding[b:b + 1], pts[:, None, :], labels,
                                           multimask_output=self.multimask)
            logits.append(F.interpolate(low.float(), (out_size, out_size), mode="bilinear", align_corners=False))
            ious.append(iou.float())
        m = self.student.config.num_multimask_outputs if self.multimask else 1
        mask_logits = torch.cat(logits) if logits else image.new_zeros(0, m, out_size, out_size)
        iou_pred = torch.cat(ious) if ious else image.new_zeros(0, m)
        grid = (int(tokens.shape[-2]), int(tokens.shape[-1]))
        return StudentOutput(mask_logits, iou_pred, self.head.student_logits(tokens), grid)


def student_token_dim(student: HyperFree) -> int:
    """Channels of the encoder's last collected block: the tokens the distillation head reads."""
    cfg = student.config.encoder
    if not cfg.feature_indexes or cfg.feature_indexes[-1] != cfg.depth - 1:
        raise ValueError(
            f"The distillation head reads the last block's tokens, but model {student.config.name!r} collects "
            f"blocks {cfg.feature_indexes} of {cfg.depth}; add {cfg.depth - 1} to feature_indexes."
        )
    return cfg.embed_dim


def lr_factor(step: int, config: PretrainConfig) -> float:
    """Linear warm-up to `lr` over `warmup_steps`, then cosine decay to `min_lr` at `steps` (as a factor of lr)."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = min((step - config.warmup_steps) / max(config.steps - config.warmup_steps, 1), 1.0)
    lr = config.min_lr + (config.lr - config.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
    return lr / config.lr


def param_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on matrices and kernels, none on 1-D parameters (biases, norm scales)."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for _, param in sorted(module.named_parameters()):
        if param.requires_grad:
            (no_decay if param.ndim <= 1 else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# ---------------------------------------------------------------------------------------------- distributed setup
@dataclass(frozen=True)
class Runtime:
    """Where this process runs: device, rank and world size (1 without torchrun)."""

    device: torch.device
    rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def autocast(self) -> AbstractContextManager[Any]:
        """bf16 autocast on CUDA; fp32 on the CPU."""
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.cuda else nullcontext()


def setup_runtime(device: str) -> Runtime:
    """Pick the device and, under torchrun (WORLD_SIZE > 1), join the process group (NCCL on CUDA, else gloo)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("PretrainConfig.device is 'cuda' but no CUDA device is visible; use 'auto' or 'cpu'.")
    if device not in ("auto", "cuda", "cpu"):
        raise ValueError(f"PretrainConfig.device must be 'auto', 'cuda' or 'cpu', got {device!r}.")
    dev = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Runtime(dev, rank, world)


# ---------------------------------------------------------------------------------------------- checkpoints
def rng_state() -> dict[str, Any]:
    """Global RNG states as tensors and plain types (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": [s.cpu() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": {"version": int(version), "state": torch.tensor(py_state, dtype=torch.int64), "gauss": gauss},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of `rng_state`."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss"]))


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def save_checkpoint(run_dir: Path, step: int, module: PretrainModule, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, resolved: dict[str, Any], keep: int) -> Path:
    """Write checkpoints/step_<step>/ (model.safetensors, distill.safetensors, state.pt, config.json), then
    point checkpoints/latest at it (the commit point), and drop all but the newest `keep`."""
    root = run_dir / "checkpoints"
    final = root / f"step_{step:07d}"
    tmp = root / f".tmp-{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    meta = {"step": str(step), "student_weights": resolved["student_weights"],
            "teacher_weights": resolved["teacher_weights"], "model": resolved["config"]["model"]}
    save_file(_tensors(module.student), str(tmp / "model.safetensors"), metadata=meta)
    save_file(_tensors(module.head), str(tmp / "distill.safetensors"), metadata=meta)
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": rng_state(), "stage_version": STAGE_VERSION}, tmp / "state.pt")
    (tmp / "config.json").write_text(json.dumps(resolved, indent=2, default=str))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    pointer = root / "latest.tmp"
    pointer.write_text(final.name)
    os.replace(pointer, root / "latest")
    for old in sorted(p for p in root.glob("step_*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The committed checkpoint the `latest` pointer names, or None."""
    pointer = run_dir / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    path = run_dir / "checkpoints" / pointer.read_text().strip()
    if not (path / "state.pt").is_file():
        raise FileNotFoundError(f"{pointer} names {path}, which has no state.pt; delete the pointer to restart, "
                                "or point it at an intact step_* folder.")
    return path


def load_training_state(ckpt: Path, module: PretrainModule, optimizer: torch.optim.Optimizer,
                        scheduler: torch.optim.lr_scheduler.LRScheduler) -> int:
    """Restore model, head, optimizer, scheduler and RNG from a checkpoint folder; returns the next step."""
    device = next(module.parameters()).device
    load_checkpoint(module.student, ckpt / "model.safetensors", strict=True)
    module.head.load_state_dict(load_file(str(ckpt / "distill.safetensors"), device=str(device)))
    state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return int(state["step"])


def _config_diff(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Fields that differ between a saved config and the current one (compared as JSON), runtime ones aside."""
    current = json.loads(json.dumps(current))
    return sorted(k for k in set(saved) | set(current)
                  if k not in RUNTIME_FIELDS and saved.get(k) != current.get(k))


# ---------------------------------------------------------------------------------------------- metrics output
def _truncate_metrics(path: Path, step: int) -> None:
    """Keep the metric rows of steps before `step` (rows logged after the resumed checkpoint are redone)."""
    if not path.is_file():
        return
    with path.open(newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if int(r["step"]) < step]
    _write_rows(path, rows)


def _write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=METRIC_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def _append_row(path: Path, row: dict[str, Any]) -> None:
    new = not path.is_file()
    with path.open("a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=METRIC_FIELDS)
        if new:
            writer.writeheader()
        writer.writerow(row)


def plot_losses(metrics_csv: Path, out_png: Path, title: str) -> Path:
    """Loss curves (total, segmentation, distillation) against the step, as a PNG (matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    df = pd.read_csv(metrics_csv)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for name in ("loss", "seg", "distill"):
        ax.plot(df["step"], df[name], label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return out_png


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

    @classmethod
    def build(cls, config: PretrainConfig, rt: Runtime) -> Trainer:
        """Seed, build student (optionally from a checkpoint), teacher, head, AdamW and the lr schedule."""
        torch.manual_seed(config.seed)
        np.random.seed(config.seed)
        random.seed(config.seed)
        student = create_model(config.model, **config.model_overrides)
        student_weights = RANDOM_INIT
        if config.student_checkpoint:
            student_weights = load_checkpoint(student, config.student_checkpoint).sha256
        # HyperFree's semantic-contrast blocks are not part of this objective: frozen, kept for checkpoint keys.
        student.image_encoder.contras_modules.requires_grad_(False)
        teacher = RGBTeacher(config.teacher).to(rt.device)
        head = DistillHead(student_token_dim(student), teacher.embed_dim, config.distill)
        module = PretrainModule(student, head, config.multimask).to(rt.device)
        optimizer = torch.optim.AdamW(param_groups(module, config.weight_decay), lr=config.lr,
                                      betas=(0.9, 0.999), fused=True if rt.cuda else None)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, config))
        train_module: nn.Module = module
        if rt.world_size > 1:
            # Some parameters get no gradient on some steps (grid bank with < 20 bands, box/mask prompt embeddings).
            train_module = DistributedDataParallel(module, device_ids=[rt.device.index] if rt.cuda else None,
                                                   find_unused_parameters=True, forward_sync_buffers=False)
        return cls(config, rt, module, teacher, optimizer, scheduler, student_weights, train_module)

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
        image = batch.cube
        if crop != img_size:
            image = F.interpolate(image, (img_size, img_size), mode="bilinear", align_corners=False, antialias=True)
        scale = img_size / crop
        # Pixel (x, y) of the crop -> input pixels, so that the prompt encoder's +0.5 lands on the pixel centre.
        points = [(p + 0.5) * scale - 0.5 for p in batch.points]
        gsd = batch.gsd_m * crop / img_size  # effective GSD of the resized crop, as the official scripts
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
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), config.grad_clip)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        head.update_center(t_logits)
        mean_iou = seg.chosen_iou.mean() if seg.chosen_iou.numel() else loss.new_tensor(float("nan"))
        names = ("loss", "seg", "focal", "dice", "iou_mse", "distill", "mask_iou", "grad_norm")
        values = torch.stack([t.detach().float() for t in (loss, seg.total, seg.focal, seg.dice, seg.iou, distill,
                                                          mean_iou, grad_norm)])
        if self.runtime.world_size > 1:  # log the mean over ranks
            dist.all_reduce(values)
            values /= self.runtime.world_size
        return {**dict(zip(names, values.tolist(), strict=True)), "prompts": int(targets.shape[0]),
                "bands": int(batch.wavelengths.numel()), "lr": float(lr)}


def train(config: PretrainConfig, resume: bool = False, until_step: int | None = None) -> PretrainResult:
    """Run (or, with `resume`, continue) the pretraining run in `config.out_dir`.

    `until_step` stops early after that many steps in total, with a checkpoint: a job with a wall-clock budget
    runs in slices, and `resume=True` continues exactly where it stopped.
    """
    rt = setup_runtime(config.device)
    try:
        return _train(config, rt, resume, until_step)
    finally:
        if rt.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _train(config: PretrainConfig, rt: Runtime, resume: bool, until_step: int | None) -> PretrainResult:
    run_dir = Path(config.out_dir)
    trainer = Trainer.build(config, rt)
    module, teacher = trainer.module, trainer.teacher
    catalog = Catalog(config.catalog)
    images = scan_catalog(catalog, config.datasets)
    dataset = PretrainDataset(catalog.uri, trainer.crop_size, images, config.max_masks, config.min_mask_pixels,
                              seed=config.seed)
    resolved = {
        "config": config.to_dict(), "model_config": module.student.config.to_dict(), "crop_size": trainer.crop_size,
        "student_weights": trainer.student_weights, "teacher": teacher.provenance(),
        "teacher_weights": teacher.identity, "world_size": rt.world_size, "catalog_uri": catalog.uri,
        "images": len(images), "band_signatures": len(set(dataset.signatures)),
        "datasets": sorted({i.dataset for i in images}), "torch": torch.__version__,
        "stage_version": STAGE_VERSION,
    }
    metrics_csv = run_dir / "metrics.csv"
    start = 0
    ckpt = latest_checkpoint(run_dir) if resume else None
    if ckpt is not None:
        saved = json.loads((ckpt / "config.json").read_text())["config"]
        diff = _config_diff(saved, config.to_dict())
        if diff:
            raise ValueError(f"Cannot resume {run_dir}: the config differs from the checkpoint's in {diff}; "
                             "resume with the saved config (checkpoints/latest/config.json) or use a new out_dir.")
        start = load_training_state(ckpt, module, trainer.optimizer, trainer.scheduler)
        logger.info("Resumed %s at step %d from %s", run_dir, start, ckpt)
    elif latest_checkpoint(run_dir) is not None:
        raise FileExistsError(f"{run_dir} already holds a run; pass resume=True to continue it or use a new out_dir.")
    if rt.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(resolved, indent=2, default=str))
        if start:
            _truncate_metrics(metrics_csv, start)
        elif metrics_csv.exists():
            metrics_csv.unlink()

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
            _append_row(metrics_csv, row)
            done = step + 1
            if done % config.checkpoint_every == 0 or done == end:
                save_checkpoint(run_dir, done, module, trainer.optimizer, trainer.scheduler, resolved,
                                config.keep_checkpoints)
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


# ---------------------------------------------------------------------------------------------- launching
def launch(config: PretrainConfig, nproc: int = 1, resume: bool = False) -> PretrainResult:
    """Train in this process (nproc 1) or under torchrun with `nproc` processes (one per GPU, or gloo on CPU)."""
    if nproc <= 1:
        return train(config, resume=resume)
    run_dir = Path(config.out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg_path = run_dir / "launch_config.json"
    cfg_path.write_text(json.dumps(config.to_dict(), indent=2))
    # `python -m torch.distributed.run` is the torchrun entry point, taken from this interpreter's environment.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "stages.pretrain", "--config", str(cfg_path), *(["--resume"] if resume else [])]
    log = run_dir / "torchrun.log"
    with log.open("w") as fh:
        proc = subprocess.run(cmd, cwd=str(Path(__file__).resolve().parents[1]), stdout=fh, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = log.read_text()[-4000:]
        raise RuntimeError(f"torchrun exited with {proc.returncode} for {cfg_path} ({' '.join(cmd)}); "
                           f"full log in {log}:\n{tail}")
    data = json.loads((run_dir / "result.json").read_text())
    return PretrainResult(**data)


def main(argv: Sequence[str] | None = None) -> None:
    """Command line for torchrun: `python -m stages.pretrain --config run.json [--resume] [--until-step N]`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="PretrainConfig JSON (or a run's config.json)")
    parser.add_argument("--resume", action="store_true", help="continue the run in out_dir from its latest checkpoint")
    parser.add_argument("--until-step", type=int, default=None, help="stop (with a checkpoint) after this step")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    result = train(PretrainConfig.load(args.config), resume=args.resume, until_step=args.until_step)
    if result.world_size == 1 or int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(dataclasses.asdict(result)))


if __name__ == "__main__":
    main()
