"""Pretraining run configuration (saved, resolved, beside every run) and the result a run returns."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from model.distill import DistillConfig, TeacherConfig
from model.losses import SegLossConfig
from model.preprocess import DEFAULT_CONTRACT

RANDOM_INIT = "random-init"
STAGE_VERSION = "1"
# Fields that may differ between a run and its resumption without changing what it computes.
RUNTIME_FIELDS = {"device", "num_workers", "catalog", "out_dir", "keep_checkpoints", "collective_timeout_s"}


@dataclass(frozen=True)
class MAESettings:
    """HyperSIGMA's masked-autoencoder pretraining (objectives ``mae_spatial`` / ``mae_spectral``); the defaults are
    the release's: 64 x 64 crops of 100 contiguous bands (random start per crop), 8 x 8 patches, 75 % of the tokens
    masked, a 512-wide 8-deep decoder with 16 heads, MSE on raw pixel values (normalised per patch with
    `norm_pix_loss`), raw values / 4000 (the release's maxNum), AdamW betas (0.9, 0.95)."""

    bands: int = 100
    """Contiguous bands per crop. Images with fewer bands are left out of the run (listed in its config.json with
    the reason): resampling would invent spectra the sensor never measured. No image with enough bands: an error."""
    crop_size: int = 64
    patch_size: int = 8
    mask_ratio: float = 0.75
    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    norm_pix_loss: bool = False
    scale: float = 4000.0
    """Crops are divided by this (the release's maxNum for Hyperion / GF-5 counts)."""
    betas: tuple[float, float] = (0.9, 0.95)

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        if self.bands < 1 or self.crop_size < self.patch_size or self.scale <= 0:
            raise ValueError(f"MAESettings needs bands >= 1, crop_size >= patch_size and scale > 0; got {self}.")

    @classmethod
    def tiny(cls) -> MAESettings:
        """CPU-sized settings for hypersigma_tiny on the fixtures (15-band and wider cubes, tests and demos)."""
        return cls(bands=18, crop_size=32, patch_size=4, decoder_embed_dim=32, decoder_depth=2, decoder_num_heads=2,
                   scale=1.0)


MAE_PRESETS: dict[str, MAESettings] = {"hypersigma_tiny": MAESettings.tiny()}
"""MAE settings of layouts too small for the release's (the rest use MAESettings())."""

@dataclass
class PretrainConfig:
    """Everything that defines a pretraining run; saved, resolved, as config.json beside the run."""

    catalog: str | None = None
    """Catalog URI; required to train (the CLI and the pretrain flow fill it from HVP_CATALOG)."""
    out_dir: str = "./hvp-data/runs/pretrain"
    model: str = "tiny"
    """A registry name (model.registry): "hypervision_b" / "_l" / "_h" are the released layouts."""
    objective: str = "hypervision"
    """A registered objective (stages.pretraining.objectives.OBJECTIVES): "hypervision" (prompted segmentation on
    the fused masks + distillation), "mae_spatial" / "mae_spectral" (HyperSIGMA's masked autoencoders; hypersigma_*
    models)."""
    mae: MAESettings = field(default_factory=MAESettings)
    """Settings of the mae_* objectives."""
    model_overrides: dict[str, Any] = field(default_factory=dict)
    student_checkpoint: str | None = None
    """Initial student weights (`hvp pretrain --init`): a released HyperVision checkpoint of the model's layout, or
    any compatible state_dict (.pth/.safetensors, e.g. a previous run's model.safetensors); None: random-init."""
    init_strict: bool = True
    """Load `student_checkpoint` strictly (every key and shape must match; see model.load_checkpoint)."""
    preprocessing: str = DEFAULT_CONTRACT
    """The preprocessing contract of the crops (model.preprocess): "released" matches the released checkpoints."""
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
    fusion_id: str | None = None
    """Train on the fused pseudo-targets of this fusion id (an ablation's mask sources); None: each image's
    latest fused set."""
    seed: int = 0
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    num_workers: int = 0
    device: str = "auto"
    """"auto" (CUDA when available), "cpu" or "cuda"."""
    collective_timeout_s: float = 600.0
    """Under torchrun: how long a rank waits for its peers (process-group setup and each collective) before it
    fails, so that a lost peer ends in a restart from the last checkpoint instead of a hang."""

    @classmethod
    def preset(cls, model: str, **overrides: Any) -> PretrainConfig:
        """Defaults for a model size: the tiny model gets the tiny teacher and head (CPU tests), others the
        ViT-S/14 DINOv2 teacher and the DINO head."""
        small = model == "tiny"  # model names are resolved (and checked) when the trainer builds the student
        base: dict[str, Any] = {"model": model, "mae": MAE_PRESETS.get(model, MAESettings())}
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
        nested = {"teacher": TeacherConfig, "distill": DistillConfig, "seg_loss": SegLossConfig, "mae": MAESettings}
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
    reused: bool = False
    """True when the stage found this finished run on the same inputs and trained nothing."""

    @property
    def random_init(self) -> bool:
        """True when the student or the teacher started from random weights."""
        return RANDOM_INIT in (self.student_weights, self.teacher_weights)


