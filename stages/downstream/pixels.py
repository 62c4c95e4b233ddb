"""The airborne scenes of HyperSIGMA's fine-tuning tasks as head inputs: a scene (one cube, or a pair) encoded whole
by the backbone, its maps read at labelled pixels, a per-pixel head trained with the backbone frozen (features
sampled once) or tuned (the head's copy of the backbone encodes the scene at every step).

Whole-scene encoding: the cube is resized (longest side) into the backbone's frame and padded as its family's
contract does; a pixel's vector is every map bilinearly sampled at the pixel's centre in that frame.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from stages.downstream.adapters import ExtractFn
from stages.downstream.features import Backbone
from stages.training.device import autocast


def pca(cube_hwc: np.ndarray, components: int) -> tuple[np.ndarray, float]:
    """The cube's first `components` principal components, whitened (HyperSIGMA's `apply_PCA`), and the fraction
    of the variance they keep; at most the band count."""
    h, w, c = cube_hwc.shape
    x = cube_hwc.reshape(-1, c).astype(np.float64)
    x = x - x.mean(axis=0)
    _, s, vt = np.linalg.svd(x, full_matrices=False)
    k = min(components, c)
    scores = x @ vt[:k].T / (s[:k] / np.sqrt(max(len(x) - 1, 1)) + 1e-12)
    kept = float((s[:k] ** 2).sum() / max((s**2).sum(), 1e-300))
    return scores.reshape(h, w, k).astype(np.float32), kept


@dataclass(frozen=True)
class Scene:
    """A cube as the backbone reads it: the task's input (H, W, C), the band centres passed with it, its GSD."""

    cube: np.ndarray
    wavelengths: np.ndarray
    gsd_m: float
    contract: str
    extract: ExtractFn
    img_size: int

    def maps(self, model: nn.Module) -> list[torch.Tensor]:
        """The model's maps (1, C, h, w) of the whole scene (gradients flow when enabled)."""
        return [m.float() for m in self.extract(model, self.cube, self.wavelengths, self.gsd_m, self.contract)]

    def at(self, maps: Sequence[torch.Tensor], rows: np.ndarray, cols: np.ndarray) -> torch.Tensor:
        """(N, sum of channels): every map bilinearly sampled at pixels (rows, cols) of the cube."""
        h, w = self.cube.shape[:2]
        scale = self.img_size / max(h, w)  # the longest side fills the frame, padded bottom / right
        device = maps[0].device
        y = torch.as_tensor((np.asarray(rows) + 0.5) * scale, dtype=torch.float32, device=device)
        x = torch.as_tensor((np.asarray(cols) + 0.5) * scale, dtype=torch.float32, device=device)
        grid = torch.stack([2 * x / self.img_size - 1, 2 * y / self.img_size - 1], dim=-1).view(1, 1, -1, 2)
        return torch.cat([F.grid_sample(m, grid.to(m.dtype), mode="bilinear", align_corners=False)[0, :, 0].T
                          for m in maps], dim=1)


def scene_of(backbone: Backbone, cube: np.ndarray, wavelengths: np.ndarray, gsd_m: float) -> Scene:
    """A cube ready for the backbone's family (its contract, its extractor, its frame)."""
    return Scene(cube, np.asarray(wavelengths, dtype=np.float64), float(gsd_m), backbone.spec.contract,
                 backbone.spec.adapter.extract, backbone.img_size)


Encoder = Callable[[nn.Module], torch.Tensor]
"""(backbone) -> (N, D) the vectors of a split's pixels (one whole-scene pass, differentiable when enabled)."""


@dataclass(frozen=True)
class PixelSample:
    """One labelled pixel: its index in the split, its target (a class index) and, when the backbone is frozen,
    its feature vector sampled once; `encode` gives every pixel's vectors of the split from a (tuned) backbone."""

    index: int
    target: int
    encode: Encoder = field(repr=False)
    features: torch.Tensor | None = None


def pixel_samples(encode: Encoder, targets: np.ndarray, frozen: nn.Module | None) -> list[PixelSample]:
    """The split's pixels as samples; with `frozen` (head-only runs) their vectors are computed once, detached."""
    vectors = None
    if frozen is not None:
        with torch.no_grad():
            vectors = encode(frozen).detach().float().cpu()
    return [PixelSample(i, int(t), encode, None if vectors is None else vectors[i]) for i, t in enumerate(targets)]


@dataclass(frozen=True)
class PixelLoss:
    """Cross-entropy of the head's logits at the batch's pixels; a head carrying a backbone (tune=full) encodes
    the scene itself, so the gradient reaches the backbone."""

    name: str
    """The task's name (recorded with the head's checkpoints)."""

    def loss(self, head: nn.Module, batch: Sequence[PixelSample], device: torch.device) -> torch.Tensor:
        targets = torch.tensor([s.target for s in batch], device=device)
        return F.cross_entropy(head(batch_vectors(head, batch, device)).float(), targets)


def batch_vectors(head: nn.Module, batch: Sequence[PixelSample], device: torch.device) -> torch.Tensor:
    """(B, D) vectors of the batch: from the head's own backbone when it carries one, else the frozen ones."""
    tuned = getattr(head, "backbone", None)
    if tuned is None:
        return torch.stack([s.features for s in batch if s.features is not None]).to(device)
    return batch[0].encode(tuned)[torch.tensor([s.index for s in batch], device=device)]


@torch.no_grad()
def predict_pixels(head: nn.Module, encode: Encoder, frozen: nn.Module, device: torch.device,
                   batch_size: int = 4096) -> np.ndarray:
    """Argmax class index of every pixel `encode` covers (the head's tuned backbone, else the frozen one)."""
    head.eval()
    model = getattr(head, "backbone", None) or frozen
    with autocast(device):
        vectors = encode(model).float()
        out = [head(vectors[i:i + batch_size]).argmax(1).cpu() for i in range(0, len(vectors), batch_size)]
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.int64)
