"""Cross-modal DINO-style distillation: a frozen RGB teacher (timm ViT) guides the hyperspectral student's tokens.

The teacher sees the RGB of the student's crop; its patch tokens are resampled to the student's token grid. Both
sides are mapped to K prototypes:

- student: DINO projection head (MLP -> L2-normalised bottleneck) and K learnable unit prototypes (DINO's
  weight-normalised last layer with the norm fixed to 1), logits = cosine similarity;
- teacher: K fixed random unit directions in the teacher's feature space (a random-projection quantiser: the
  teacher has no DINO head in a backbone checkpoint), logits = cosine similarity x sqrt(teacher dim), i.e. about
  unit variance.

The loss is DINO's: cross-entropy between the teacher's centred, sharpened softmax ((t - c) / T_t) and the
student's softmax (s / T_s) per token; the centre c is an EMA of the teacher's mean logits (all ranks averaged).
The paper's exact teacher head is not released; this module is this project's choice, stated here.
"""

from __future__ import annotations

import logging
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from model.hyperfree import LoadReport, file_sha256, read_state_dict

RANDOM_INIT = "random-init"
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TeacherConfig:
    """A timm RGB ViT built with `pretrained=False` (timm never downloads) and, optionally, local weights."""

    name: str = "vit_small_patch14_dinov2"
    checkpoint: str | None = None
    """Local .safetensors or .pth/.pt state_dict; None keeps random weights (every output then says random-init)."""
    img_size: int = 224
    """The teacher's input side: the crop's RGB is resized to it (224 / patch 14 -> a 16 x 16 token grid)."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Extra timm.create_model keyword arguments (e.g. embed_dim, depth for a tiny test teacher)."""

    @classmethod
    def tiny(cls) -> TeacherConfig:
        """A DINOv2-architecture teacher small enough for CPU tests: 56 px input, 4 x 4 tokens, 1 block of 32-d."""
        return cls(img_size=56, overrides={"embed_dim": 32, "depth": 1, "num_heads": 2})

    @property
    def random_init(self) -> bool:
        """True when no weights file is configured."""
        return not self.checkpoint

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for the run's resolved config."""
        return asdict(self)


@dataclass(frozen=True)
class DistillConfig:
    """The projection head and the DINO loss hyper-parameters (DINO defaults, K reduced for small models)."""

    num_prototypes: int = 4096
    head_hidden_dim: int = 2048
    head_bottleneck_dim: int = 256
    head_layers: int = 3
    student_temp: float = 0.1
    teacher_temp: float = 0.04
    center_momentum: float = 0.9
    prototype_seed: int = 0
    """Seed of the teacher's fixed random prototypes (saved with the head, so a resumed run keeps them)."""

    @classmethod
    def tiny(cls) -> DistillConfig:
        """Head sized for the tiny test model."""
        return cls(num_prototypes=64, head_hidden_dim=64, head_bottleneck_dim=32)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for the run's resolved config."""
        return asdict(self)


class RGBTeacher(nn.Module):
    """A frozen timm ViT returning its patch-token grid (B, D, gh, gw) for RGB input in [0, 1].

    Frozen means: no parameter requires grad, the module stays in eval mode even under `.train()`, and the
    forward runs without autograd, so no gradient can reach it.
    """

    model: Any
    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, config: TeacherConfig) -> None:
        super().__init__()
        self.config = config
        self.model = timm.create_model(
            config.name, pretrained=False, num_classes=0, img_size=config.img_size, **config.overrides
        )
        self.load_report: LoadReport | None = None
        self.identity = RANDOM_INIT
        if config.checkpoint:
            self.load_report = load_teacher_weights(self.model, Path(config.checkpoint))
            self.identity = self.load_report.sha256
        cfg: dict[str, Any] = self.model.pretrained_cfg
        self.register_buffer("mean", torch.tensor(cfg.get("mean", (0.485, 0.456, 0.406))).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(cfg.get("std", (0.229, 0.224, 0.225))).view(1, 3, 1, 1),
                             persistent=False)
        self.embed_dim = int(self.model.embed_dim)
        self.requires_grad_(False)
        super().train(False)

    def provenance(self) -> dict[str, Any]:
        """What the teacher's weights are, for run records: the load report, or random-init."""
        report = self.load_report
        if report is None:
            return {"name": self.config.name, "weights": RANDOM_INIT}
        return {"name": self.config.name, "weights": report.sha256, "source": report.source,
                "loaded": report.loaded, "missing": list(report.missing), "unexpected": list(report.unexpected),
                "mismatched": list(report.mismatched)}

    def train(self, mode: bool = True) -> RGBTeacher:
        """Stay in eval mode whatever the caller asks (the teacher is frozen)."""
        return self

    @torch.no_grad()
    def forward(self, rgb: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) RGB in [0, 1] -> patch tokens (B, D, gh, gw) (prefix tokens dropped)."""
        if rgb.ndim != 4 or rgb.shape[1] != 3:
            raise ValueError(f"The teacher takes (B, 3, H, W) RGB in [0, 1], got {tuple(rgb.shape)}.")
        size = (self.config.img_size, self.config.img_size)
        x = rgb.float()
        if x.shape[-2:] != size:
            x = F.interpolate(x, size, mode="bilinear", align_corners=False, antialias=True)
        x = (x - self.mean) / self.std
        tokens = self.model.forward_features(x)[:, self.model.num_prefix_tokens:]
        gh, gw = self.model.patch_embed.grid_size
        return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, gh, gw)


def load_teacher_weights(model: Any, path: Path) -> LoadReport:
    """Load a local teacher state_dict through timm's checkpoint filter of the model's family (which converts
    official DINOv2 keys and resamples the position embedding), reporting missing and unexpected keys."""
    if not path.is_file():
        raise FileNotFoundError(
            f"Teacher checkpoint {path} does not exist; fix TeacherConfig.checkpoint or set it to None for a "
            "random-init teacher."
        )
    state = read_state_dict(path)
    filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    if filter_fn is not None:
        state = filter_fn(state, model)
    own = model.state_dict()
    mismatched = tuple(k for k, v in state.items() if k in own and v.shape != own[k].shape)
    to_load = {k: v for k, v in state.items() if k in own and k not in mismatched}
    if not to_load:
        raise ValueError(
            f"Teacher checkpoint {path}: none of its {len(state)} keys fits {type(model).__name__}; "
            "check TeacherConfig.name against the weights."
        )
    model.load_state_dict(to_load, strict=False)
    report = LoadReport(
        source=str(path), sha256=file_sha256(path), loaded=len(to_load),
        missing=tuple(k for k in own if k not in state), unexpected=tuple(k for k in state if k not in own),
        resized=(), mismatched=mismatched,
    )
    for kind in ("missing", "unexpected", "mismatched"):
        keys = getattr(report, kind)
        if keys:
            logger.warning("Teacher checkpoint %s: %d %s keys: %s", path, len(keys), kind, list(keys))
    return report


class DistillHead(nn.Module):
    """Student projection head + student prototypes (trained), teacher prototypes and the centre (buffers)."""

    teacher_prototypes: torch.Tensor
    center: torch.Tensor

    def __init__(self, student_dim: int, teacher_dim: int, config: DistillConfig) -> None:
        super().__init__()
        self.config = config
        layers: list[nn.Module] = []
        dim = student_dim
        for _ in range(config.head_layers - 1):
            layers += [nn.Linear(dim, config.head_hidden_dim), nn.GELU()]
            dim = config.head_hidden_dim
        layers.append(nn.Linear(dim, config.head_bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        for module in self.mlp:
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        self.prototypes = nn.Parameter(torch.randn(config.num_prototypes, config.head_bottleneck_dim) * 0.02)
        generator = torch.Generator().manual_seed(config.prototype_seed)
        self.register_buffer(
            "teacher_prototypes",
            F.normalize(torch.randn(config.num_prototypes, teacher_dim, generator=generator), dim=-1),
        )
        self.register_buffer("center", torch.zeros(1, config.num_prototypes))

    def student_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Student tokens (B, D, h, w) -> cosine logits (B, h*w, K) (before the temperature)."""
        x = self.mlp(tokens.flatten(2).transpose(1, 2))
        return F.normalize(x, dim=-1) @ F.normalize(self.prototypes, dim=-1).t()

    @torch.no_grad()
    def teacher_logits(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Teacher tokens (B, D_t, gh, gw) resampled to the student `grid` -> logits (B, h*w, K), about unit
        variance (cosine x sqrt(D_t)). No gradient."""
        x = tokens.float()
        if tuple(x.shape[-2:]) != tuple(grid):
            down = x.shape[-2] > grid[0] or x.shape[-1] > grid[1]
            x = F.interpolate(x, grid, mode="bilinear", align_corners=False, antialias=down)
        x = F.normalize(x.flatten(2).transpose(1, 2), dim=-1)
        return x @ self.teacher_prototypes.t() * math.sqrt(self.teacher_prototypes.shape[1])

    def loss(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        """DINO cross-entropy per token, averaged: -sum softmax((t - c)/T_t) * log_softmax(s/T_s)."""
        cfg = self.config
        target = F.softmax((teacher_logits.float() - self.center) / cfg.teacher_temp, dim=-1)
        log_prob = F.log_softmax(student_logits.float() / cfg.student_temp, dim=-1)
        return -(target * log_prob).sum(-1).mean()

    @torch.no_grad()
    def update_center(self, teacher_logits: torch.Tensor) -> None:
        """EMA of the teacher's mean logits over the batch and tokens (averaged over ranks under DDP)."""
        mean = teacher_logits.float().mean(dim=(0, 1), keepdim=False).unsqueeze(0)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(mean)
            mean /= dist.get_world_size()
        m = self.config.center_momentum
        self.center.mul_(m).add_(mean, alpha=1 - m)

