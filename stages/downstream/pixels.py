"""The airborne scenes of HyperSIGMA's fine-tuning tasks as head inputs: a scene (one cube, or a pair) encoded whole
by the backbone, its maps read at labelled pixels, a per-pixel head trained with the backbone frozen (features
sampled once) or tuned (the head's copy of the backbone encodes the scene at every step).

Whole-scene encoding: the cube is resized (longest side) into the backbone's frame and padded as its family's
contract does; a pixel's vector is every map bilinearly sampled at the pixel's centre in that frame.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from base.errors import InputError
from catalog.catalog import Catalog
from model.registry import resolve_name
from stages.downstream.adapters import ExtractFn
from stages.downstream.features import Backbone
from stages.downstream.spec import TaskData, TaskSpec
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
    class_weights: tuple[float, ...] | None = None
    """Per-class weights of the cross-entropy (None: equal), e.g. to balance scarce pseudo-targets."""

    def loss(self, head: nn.Module, batch: Sequence[PixelSample], device: torch.device) -> torch.Tensor:
        targets = torch.tensor([s.target for s in batch], device=device)
        weight = None if self.class_weights is None else torch.tensor(self.class_weights, device=device)
        return F.cross_entropy(head(batch_vectors(head, batch, device)).float(), targets, weight=weight)


def batch_vectors(head: nn.Module, batch: Sequence[PixelSample], device: torch.device) -> torch.Tensor:
    """(B, D) vectors of the batch: from the head's own backbone when it carries one, else the frozen ones."""
    tuned = getattr(head, "backbone", None)
    if tuned is None:
        return torch.stack([s.features for s in batch if s.features is not None]).to(device)
    return batch[0].encode(tuned)[torch.tensor([s.index for s in batch], device=device)]


@torch.no_grad()
def predict_logits(head: nn.Module, encode: Encoder, frozen: nn.Module, device: torch.device,
                   batch_size: int = 4096) -> torch.Tensor:
    """(N, K) logits of every pixel `encode` covers (the head's tuned backbone, else the frozen one), on the CPU."""
    head.eval()
    model = getattr(head, "backbone", None) or frozen
    with autocast(device):
        vectors = encode(model).float()
        out = [head(vectors[i:i + batch_size]).float().cpu() for i in range(0, len(vectors), batch_size)]
    return torch.cat(out)


def predict_pixels(head: nn.Module, encode: Encoder, frozen: nn.Module, device: torch.device) -> np.ndarray:
    """Argmax class index of every pixel `encode` covers."""
    return predict_logits(head, encode, frozen, device).argmax(1).numpy()


def predict_scores(head: nn.Module, encode: Encoder, frozen: nn.Module, device: torch.device) -> np.ndarray:
    """Probability of class 1 (change, target, anomaly) of every pixel `encode` covers, in [0, 1]."""
    return predict_logits(head, encode, frozen, device).softmax(1)[:, 1].double().numpy()


class PixelSplit(Sequence[tuple[int, int, int]]):
    """One split of a scene's pixels: where they are, their class ids and class indices (targets, -1: none), and
    how a backbone encodes them: the scene's vectors, or for a pair of co-registered scenes (Siamese) the absolute
    difference of the two dates' vectors. A sequence of (row, col, class id)."""

    def __init__(self, scenes: tuple[Scene, ...], rows: np.ndarray, cols: np.ndarray, ids: np.ndarray,
                 targets: np.ndarray) -> None:
        if len(scenes) not in (1, 2):
            raise ValueError(f"PixelSplit reads one scene or a pair, got {len(scenes)}")
        self.scenes, self.rows, self.cols = scenes, np.asarray(rows), np.asarray(cols)
        self.ids, self.targets = np.asarray(ids, dtype=np.int64), np.asarray(targets, dtype=np.int64)

    @classmethod
    def of(cls, scenes: tuple[Scene, ...], mask: np.ndarray, labels: np.ndarray, class_ids: Sequence[int]
           ) -> PixelSplit:
        """The pixels of `mask` with their labels; targets index `class_ids`."""
        rows, cols = np.nonzero(mask)
        ids = labels[rows, cols].astype(np.int64)
        lookup = {int(c): i for i, c in enumerate(class_ids)}
        return cls(scenes, rows, cols, ids, np.array([lookup.get(int(c), -1) for c in ids], dtype=np.int64))

    @property
    def shape(self) -> tuple[int, int]:
        """(H, W) of the scene."""
        return (int(self.scenes[0].cube.shape[0]), int(self.scenes[0].cube.shape[1]))

    def __len__(self) -> int:
        """Pixels in the split (what the report counts as items)."""
        return len(self.ids)

    def __getitem__(self, i: Any) -> Any:
        """(row, col, class id) of pixel `i`."""
        return int(self.rows[i]), int(self.cols[i]), int(self.ids[i])

    def encode(self, model: nn.Module) -> torch.Tensor:
        """(N, D) vectors of this split's pixels: one whole-scene pass of `model` per scene."""
        vectors = [s.at(s.maps(model), self.rows, self.cols) for s in self.scenes]
        return vectors[0] if len(vectors) == 1 else (vectors[0] - vectors[1]).abs()


def scene_id(catalog: Catalog, dataset: str, kind: str) -> str:
    """The one labelled scene of `dataset` with annotations of `kind` (airborne benchmarks are single scenes)."""
    df = catalog.images(dataset)
    ids = sorted(df.loc[df["label_kind"] == kind, "image_id"]) if not df.empty else []
    if len(ids) != 1:
        raise InputError(catalog.uri, "dataset", f"'{dataset}' holds {len(ids)} {kind} scenes; this task reads one",
                         "pass a dataset with exactly one labelled scene (`hvp datasets` lists them)")
    return str(ids[0])


def backbone_options(backbone: Backbone) -> dict[str, Any]:
    """The layout of `backbone` as a head's `backbone` option (what a tune=full head builds its copy from)."""
    return {"model": resolve_name(backbone.spec.model), "overrides": backbone.spec.resolved_overrides()}


def pixel_head_options(spec: TaskSpec, data: TaskData, num_classes: int) -> dict[str, Any]:
    """The pixel head's options: its classes and, with tune=full, the backbone copy it carries (new_head loads the
    backbone's weights into it); the task's reader put `backbone_options` under extras["backbone"]."""
    options: dict[str, Any] = {"num_classes": num_classes}
    if spec.tune == "full":
        options["backbone"] = data.extras["backbone"]
    return options


def frozen_model(spec: TaskSpec, backbone: Backbone) -> nn.Module | None:
    """The model whose features head-only runs sample once (None with tune=full: the head's copy encodes)."""
    return backbone.model if spec.tune == "head" else None
