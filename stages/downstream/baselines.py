"""Trivial baselines reported beside every head: what a result must beat to mean anything.

- segmentation: a per-pixel spectral classifier, multinomial logistic regression on each pixel's spectrum
  (scaled by its image's maximum, then standardised per band), fitted by L-BFGS;
- salient objects: a centre prior, a Gaussian centred on the image;
- tracking: the first frame's box held still.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from stages.downstream.evaluate import SaliencyEval, SegmentationEval, TrackingEval, score_tracks
from stages.downstream.samples import TrackingSequence
from stages.metrics import confusion_matrix, saliency_metrics, scores_from_confusion


def _pixels(cube: np.ndarray, index: int) -> torch.Tensor:
    """(H*W, C) float64 spectra divided by the cube's maximum (exposure differs between images)."""
    if cube.ndim != 3:
        raise ValueError(f"Spectral baseline: cube {index} has shape {cube.shape}; expected (H, W, C).")
    x = torch.from_numpy(np.ascontiguousarray(cube)).double().reshape(-1, cube.shape[-1])
    peak = x.max()
    return x / peak if peak > 0 else x


@dataclass(frozen=True)
class SpectralClassifier:
    """A fitted per-pixel logistic regression: logits = ((x / max - mean) / std) @ weight.T + bias."""

    weight: torch.Tensor
    bias: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor

    def predict(self, cube: np.ndarray) -> np.ndarray:
        """Class map (H, W) of an (H, W, C) cube."""
        if cube.ndim != 3 or cube.shape[-1] != self.weight.shape[1]:
            raise ValueError(f"SpectralClassifier.predict: cube of shape {cube.shape}; expected (H, W, "
                             f"{self.weight.shape[1]}) like the training cubes.")
        x = (_pixels(cube, 0) - self.mean) / self.std
        return (x @ self.weight.T + self.bias).argmax(1).reshape(cube.shape[:2]).numpy()


def fit_spectral_classifier(
    cubes: Iterable[np.ndarray],
    targets: Iterable[np.ndarray],
    num_classes: int,
    ignore_index: int | None,
    max_pixels: int = 200_000,
    l2: float = 1e-4,
    seed: int = 0,
    pixels_per_image: int | None = None,
) -> SpectralClassifier:
    """Fit the per-pixel classifier on up to `max_pixels` labelled pixels drawn uniformly (seeded) from the
    training cubes (H, W, C) and class maps (H, W). With `pixels_per_image`, each image contributes at most that
    many of its labelled pixels (seeded), so cubes can stream from an iterator without all being held at once."""
    xs, ys = [], []
    gen = torch.Generator().manual_seed(seed + 1)
    for i, (cube, target) in enumerate(zip(cubes, targets, strict=True)):
        if cube.shape[:2] != np.shape(target):
            raise ValueError(f"Spectral baseline: cube {i} is {cube.shape[:2]} but its class map "
                             f"{np.shape(target)}; give each label map at its cube's size.")
        y = torch.from_numpy(np.asarray(target).astype(np.int64).ravel())
        keep = y != ignore_index if ignore_index is not None else torch.ones_like(y, dtype=torch.bool)
        x, y = _pixels(cube, i)[keep], y[keep]
        if pixels_per_image is not None and len(y) > pixels_per_image:
            pick = torch.randperm(len(y), generator=gen)[:pixels_per_image]
            x, y = x[pick], y[pick]
        xs.append(x)
        ys.append(y)
    x, y = torch.cat(xs), torch.cat(ys)
    if not len(y):
        raise ValueError("Spectral baseline: no labelled pixel in the training split.")
    if len(y) > max_pixels:
        pick = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:max_pixels]
        x, y = x[pick], y[pick]
    mean, std = x.mean(0), x.std(0).clamp_min(1e-12)
    x = (x - mean) / std
    weight = torch.zeros(num_classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight.T + bias, y) + l2 * (weight**2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return SpectralClassifier(weight.detach(), bias.detach(), mean, std)


def evaluate_spectral_baseline(
    train_cubes: Sequence[np.ndarray],
    train_targets: Sequence[np.ndarray],
    test_cubes: Sequence[np.ndarray],
    test_targets: Sequence[np.ndarray],
    num_classes: int,
    ignore_index: int | None,
    seed: int = 0,
) -> SegmentationEval:
    """Fit the spectral classifier on the training split and score it on the test split."""
    model = fit_spectral_classifier(train_cubes, train_targets, num_classes, ignore_index, seed=seed)
    predictions = [model.predict(c) for c in test_cubes]
    cm = confusion_matrix(predictions, list(test_targets), num_classes, ignore_index)
    return SegmentationEval(scores_from_confusion(cm), cm, predictions)


def centre_prior(height: int, width: int, sigma: float = 0.25) -> np.ndarray:
    """A Gaussian centred on the image with standard deviation `sigma` x each side, peak 1."""
    y = (np.arange(height) + 0.5) / height - 0.5
    x = (np.arange(width) + 0.5) / width - 0.5
    return np.exp(-(y[:, None] ** 2 + x[None, :] ** 2) / (2 * sigma**2))


def evaluate_centre_prior(masks: Sequence[np.ndarray], sigma: float = 0.25) -> SaliencyEval:
    """Salient-object scores of the centre prior against each mask."""
    predictions = [centre_prior(np.shape(m)[0], np.shape(m)[1], sigma=sigma) for m in masks]
    return SaliencyEval(saliency_metrics(predictions, [np.asarray(m) for m in masks]), predictions)


def hold_first_box(sequence: TrackingSequence) -> np.ndarray:
    """The first frame's box repeated for every frame (N, 4)."""
    return np.repeat(sequence.boxes[:1], len(sequence.boxes), axis=0)


def evaluate_first_box(sequences: Sequence[TrackingSequence]) -> TrackingEval:
    """OTB scores of the held first box."""
    return score_tracks([hold_first_box(s) for s in sequences], sequences)
