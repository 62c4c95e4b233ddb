"""HyperSIGMA's masked-autoencoder pretraining on the catalog: objectives ``mae_spatial`` and ``mae_spectral``.

Data: every pretraining image (catalog/annotations.py keeps evaluation images out) with at least
`MAESettings.bands` bands; per crop a random `crop_size` window (zero-padded where the image is smaller) of
`bands` contiguous bands from a random start, divided by `scale` (the release: raw / 4000). The release draws the
band start once per file; here it is drawn per crop, keyed by (seed, image, draw id) like every other crop, so a
resumed run sees the crops an uninterrupted one would. Images with fewer bands are left out, each named with the
reason in the run's config.json (resampling would invent spectra); none left is an InputError.

Training: the MAE of the run's hypersigma_* layout (model.hypersigma.mae) in fp32, as the release (no autocast),
AdamW with the release's betas (0.9, 0.95) on the shared warmup-cosine schedule; checkpoints hold the whole MAE
in the release's key layout (model.safetensors: what `SpatMAE` / `SpecMAE` load strictly; its encoder part is what
`model.hypersigma.load_pretrained` and the downstream HyperSIGMA backbone load).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

from base.errors import InputError
from catalog.catalog import Catalog
from model.hypersigma import MaskedAutoencoder, create_mae, describe_input, mae_step
from model.hypersigma.checkpoint import read_released
from model.hypersigma.mae import MAEKind
from stages.pretraining.checkpoints import MODEL_FILE, checkpoint_to_resume, latest_checkpoint
from stages.pretraining.config import RANDOM_INIT, STAGE_VERSION, MAESettings, PretrainConfig, PretrainResult
from stages.pretraining.data import BandSignatureBatchSampler
from stages.pretraining.logs import append_row, open_run_dir, plot_losses
from stages.pretraining.objectives import OnCheckpoint
from stages.pretraining.runtime import Runtime
from stages.training import checkpoints as ckpt_io
from stages.training.loop import checkpoint_due, optimizer_step
from stages.training.optim import adamw, warmup_cosine

logger = logging.getLogger(__name__)

NO_TEACHER = "none (no teacher)"


@dataclass(frozen=True)
class MAEImage:
    """A catalogued image an MAE run crops from."""

    image_id: str
    location: str
    height: int
    width: int
    bands: int


def scan_mae_images(catalog: Catalog, bands: int, datasets: Sequence[str] | None = None
                    ) -> tuple[list[MAEImage], dict[str, str]]:
    """The pretraining images with at least `bands` bands (optionally of `datasets`), sorted by id, and those left
    out for too few bands (image id -> reason)."""
    images = catalog.images()
    keep: list[MAEImage] = []
    left_out: dict[str, str] = {}
    for row in images.sort_values("image_id").itertuples(index=False):
        if not row.pretraining or (datasets and row.dataset not in datasets):
            continue
        if int(row.bands) < bands:
            left_out[row.image_id] = f"{int(row.bands)} bands < {bands} contiguous bands per crop"
            continue
        keep.append(MAEImage(row.image_id, row.location, int(row.height), int(row.width), int(row.bands)))
    if not keep:
        raise InputError(catalog.uri, "mae.bands", "no pretraining image" + (f" of {list(datasets)}" if datasets
                         else "") + f" has {bands} bands (left out: {len(left_out)} with fewer)",
                         "ingest cubes with enough bands, or lower mae.bands (the layout's in_chans follows it)")
    return keep, left_out


class MAECropDataset(Dataset[torch.Tensor]):
    """Crops (bands, S, S) float32, scaled, indexed by (image index, draw id): same key, same crop."""

    def __init__(self, catalog_uri: str, images: Sequence[MAEImage], settings: MAESettings, seed: int = 0) -> None:
        self.catalog_uri = catalog_uri
        self.images = list(images)
        self.settings = settings
        self.seed = seed
        self._catalog: Catalog | None = None

    def __getstate__(self) -> dict[str, object]:
        """Workers get the configuration, not the open catalog."""
        return {**self.__dict__, "_catalog": None}

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: int | tuple[int, int]) -> torch.Tensor:
        index, draw = (key, 0) if isinstance(key, int) else key
        info, s = self.images[index], self.settings
        if self._catalog is None:
            self._catalog = Catalog(self.catalog_uri)
        rng = np.random.default_rng([self.seed, index, draw])
        y0 = int(rng.integers(0, max(info.height - s.crop_size, 0) + 1))
        x0 = int(rng.integers(0, max(info.width - s.crop_size, 0) + 1))
        b0 = int(rng.integers(0, info.bands - s.bands + 1))
        out = np.zeros((s.bands, s.crop_size, s.crop_size), dtype=np.float32)
        h, w = min(s.crop_size, info.height - y0), min(s.crop_size, info.width - x0)
        out[:, :h, :w] = self._catalog.read_crop(info.location, y0, x0, s.crop_size, bands=np.arange(b0, b0 + s.bands),
                                                 dtype=np.float32)
        return torch.from_numpy(out / np.float32(s.scale))


def _collate(crops: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.stack(list(crops))


def build_mae(config: PretrainConfig, kind: MAEKind) -> MaskedAutoencoder:
    """The run's MAE: the layout's encoder sizes, the crop, band count, patch and decoder of `config.mae`."""
    s = config.mae
    return create_mae(config.model, kind, img_size=s.crop_size, in_chans=s.bands, patch_size=s.patch_size,
                      mask_ratio=s.mask_ratio, decoder_embed_dim=s.decoder_embed_dim, decoder_depth=s.decoder_depth,
                      decoder_num_heads=s.decoder_num_heads, norm_pix_loss=s.norm_pix_loss,
                      **config.model_overrides)


def train_mae(kind: MAEKind, config: PretrainConfig, rt: Runtime, resume: bool, until_step: int | None,
              on_checkpoint: OnCheckpoint | None = None) -> PretrainResult:
    """Train (or resume) one MAE run in `config.out_dir` (see the module); `on_checkpoint` hears of every committed
    checkpoint (main rank)."""
    if config.catalog is None:
        raise ValueError("PretrainConfig.catalog is not set: give the catalog URI (the CLI and the pretrain flow "
                         "fill it from HVP_CATALOG)")
    run_dir = Path(config.out_dir)
    torch.manual_seed(config.seed)
    mae = build_mae(config, kind)
    student_weights = RANDOM_INIT
    if config.student_checkpoint:
        state, _, student_weights = read_released(config.student_checkpoint)
        mae.load_state_dict(state, strict=config.init_strict)
    mae.to(rt.device)
    optimizer = adamw(mae, config.lr, config.weight_decay, rt.device)
    for group in optimizer.param_groups:
        group["betas"] = config.mae.betas
    scheduler = warmup_cosine(optimizer, config)
    train_module: torch.nn.Module = mae
    if rt.world_size > 1:  # the encoder's pos_embed is unused (as in the release): find_unused_parameters
        train_module = DistributedDataParallel(mae, device_ids=[rt.device.index] if rt.cuda else None,
                                               find_unused_parameters=True)
    catalog = Catalog(config.catalog)
    images, left_out = scan_mae_images(catalog, config.mae.bands, config.datasets)
    resolved: dict[str, Any] = {
        "config": config.to_dict(), "objective": config.objective, "mae_config": mae.config.to_dict(),
        "input": describe_input(mae.config, config.mae.scale), "precision": "fp32 (as the release)",
        "student_weights": student_weights, "teacher_weights": NO_TEACHER, "world_size": rt.world_size,
        "catalog_uri": catalog.uri, "images": len(images), "left_out": left_out,
        "model_config": {"name": config.model}, "torch": torch.__version__, "stage_version": STAGE_VERSION,
    }
    metrics_csv = run_dir / "metrics.csv"
    start = 0
    ckpt = checkpoint_to_resume(run_dir, config.to_dict(), resume)
    if ckpt is not None:
        mae.load_state_dict(load_file(str(ckpt / MODEL_FILE), device=str(rt.device)))
        start = ckpt_io.restore_training_state(ckpt_io.read_training_state(ckpt), optimizer, scheduler)
        logger.info("Resumed %s at step %d from %s", run_dir, start, ckpt)
    if rt.is_main:
        open_run_dir(run_dir, resolved, metrics_csv, start)
    end = min(config.steps, until_step) if until_step is not None else config.steps
    sampler = BandSignatureBatchSampler(["mae"] * len(images), config.batch_size, end, config.seed, start, rt.rank,
                                        rt.world_size)
    loader = DataLoader(MAECropDataset(catalog.uri, images, config.mae, config.seed), batch_sampler=sampler,
                        collate_fn=_collate, num_workers=config.num_workers, pin_memory=rt.cuda,
                        multiprocessing_context="spawn" if config.num_workers else None)
    meta = {"student_weights": student_weights, "teacher_weights": NO_TEACHER, "model": config.model,
            "objective": config.objective}
    mae.train()
    last: dict[str, Any] = {}
    step, t_first, timed = start - 1, 0.0, 0
    for step, cube in zip(range(start, end), loader, strict=False):
        t0 = time.perf_counter()
        generator = torch.Generator(device=rt.device).manual_seed(config.seed * 1_000_003 + step * 1009 + rt.rank)
        loss = mae_step(train_module, cube.to(rt.device), generator)  # type: ignore[arg-type]
        clipped, lr = optimizer_step(loss, mae, optimizer, scheduler, config.grad_clip)
        value = loss.detach().float()
        if rt.world_size > 1:
            dist.all_reduce(value)
            value /= rt.world_size
        row = {"loss": float(value), "grad_norm": float(clipped) if clipped is not None else float("nan"), "lr": lr,
               "step": step, "seconds": time.perf_counter() - t0}
        if step == start:
            t_first = time.perf_counter()
        else:
            timed += 1
        last = row
        if rt.is_main:
            append_row(metrics_csv, row)
            done = step + 1
            if checkpoint_due(done, config.checkpoint_every, end):
                saved = ckpt_io.save_training_checkpoint(
                    run_dir, done, {MODEL_FILE: mae}, {**meta, "step": str(done)}, optimizer, scheduler, resolved,
                    config.keep_checkpoints, rng=ckpt_io.rng_state(), extra_state={"stage_version": STAGE_VERSION})
                if on_checkpoint is not None:
                    on_checkpoint(done, saved)
    steps_done = step + 1
    png = run_dir / "loss.png"
    result = PretrainResult(
        out_dir=str(run_dir), steps_done=steps_done,
        final={k: float(v) for k, v in last.items() if k != "step"}, metrics_csv=str(metrics_csv),
        plot_png=str(png), checkpoint=str(latest_checkpoint(run_dir) or "") if rt.is_main else "",
        steps_per_s=timed / (time.perf_counter() - t_first) if timed else 0.0, student_weights=student_weights,
        teacher_weights=NO_TEACHER, world_size=rt.world_size)
    if rt.is_main:
        if metrics_csv.is_file():
            note = " (random-init)" if student_weights == RANDOM_INIT else ""
            plot_losses(metrics_csv, png, f"HyperSIGMA {config.objective} {config.model}{note}: "
                        f"{steps_done}/{config.steps} steps, world {rt.world_size}")
        (run_dir / "result.json").write_text(json.dumps(dataclasses.asdict(result), indent=2))
    return result

