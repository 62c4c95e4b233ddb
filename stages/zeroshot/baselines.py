"""Classical per-pixel baselines reported beside every zero-shot result, on the same cube and the same prompts:
multinomial logistic regression on the labelled pixels (classification), spectral angle to the prompt pixel with
the class prior (one class), ACE and spectral angle (target), RX (anomaly), change-vector analysis with an Otsu
threshold (change). numpy / scipy / torch only.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def _pixels(cube_hwc: np.ndarray) -> np.ndarray:
    return np.asarray(cube_hwc, dtype=np.float64).reshape(-1, cube_hwc.shape[-1])


def logistic_regression(cube_hwc: np.ndarray, prompts: Sequence[Sequence[tuple[int, int]]], class_ids: Sequence[int],
                        weight_decay: float = 1e-3, steps: int = 200, seed: int = 0) -> np.ndarray:
    """Class map of a multinomial logistic regression (L2-regularised, L-BFGS) on the standardised spectra of the
    labelled pixels: the per-pixel baseline of few-shot classification."""
    x = _pixels(cube_hwc)
    mean, std = x.mean(axis=0), x.std(axis=0) + 1e-12
    z = torch.from_numpy((x - mean) / std)
    h, w = cube_hwc.shape[:2]
    idx = [int(y) * w + int(xx) for pixels in prompts for y, xx in pixels]
    labels = torch.tensor([j for j, pixels in enumerate(prompts) for _ in pixels])
    generator = torch.Generator().manual_seed(seed)
    weight = (0.01 * torch.randn(z.shape[1], len(class_ids), generator=generator, dtype=torch.float64))
    weight.requires_grad_(True)
    bias = torch.zeros(len(class_ids), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], max_iter=steps, line_search_fn="strong_wolfe")
    train = z[idx]

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(train @ weight + bias, labels) + weight_decay * (weight**2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        pred = (z @ weight + bias).argmax(1).numpy()
    return np.asarray(class_ids, dtype=np.int64)[pred].reshape(h, w)


def spectral_angle(cube_hwc: np.ndarray, spectrum: np.ndarray) -> np.ndarray:
    """Score in [0, 1] per pixel: 1 - angle / (pi / 2) between the pixel's spectrum and ``spectrum``."""
    x = _pixels(cube_hwc)
    s = np.asarray(spectrum, dtype=np.float64).reshape(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = x @ s / (np.linalg.norm(x, axis=1) * np.linalg.norm(s))
    angle = np.arccos(np.clip(np.nan_to_num(cos, nan=0.0), -1.0, 1.0))
    return np.clip(1 - angle / (np.pi / 2), 0.0, 1.0).reshape(cube_hwc.shape[:2])


def one_class_angle(cube_hwc: np.ndarray, prompt: tuple[int, int], class_prior: float) -> np.ndarray:
    """Binary map: the ``class_prior`` share of pixels whose spectra are closest in angle to the prompt pixel's."""
    score = spectral_angle(cube_hwc, np.asarray(cube_hwc[prompt[0], prompt[1]], dtype=np.float64))
    cut = np.quantile(score, 1 - class_prior)
    return (score >= cut).astype(np.uint8)


def _whitening(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Background mean and inverse covariance (pseudo-inverse, for rank-deficient cubes)."""
    mean = x.mean(axis=0)
    cov = np.cov(x - mean, rowvar=False)
    return mean, np.linalg.pinv(np.atleast_2d(cov))


def ace(cube_hwc: np.ndarray, spectrum: np.ndarray) -> np.ndarray:
    """Adaptive coherence estimator in [0, 1]: (s' C^-1 x)^2 / ((s' C^-1 s)(x' C^-1 x)), x and s with the scene's
    mean removed and C its covariance."""
    x = _pixels(cube_hwc)
    mean, inv = _whitening(x)
    xc = x - mean
    s = np.asarray(spectrum, dtype=np.float64).reshape(-1) - mean
    num = (xc @ inv @ s) ** 2
    den = float(s @ inv @ s) * np.einsum("ij,jk,ik->i", xc, inv, xc)
    with np.errstate(invalid="ignore", divide="ignore"):
        score = np.where(den > 0, num / den, 0.0)
    return np.clip(score, 0.0, 1.0).reshape(cube_hwc.shape[:2])


def _unit(score: np.ndarray) -> np.ndarray:
    lo, hi = float(score.min()), float(score.max())
    return (score - lo) / (hi - lo) if hi > lo else np.zeros_like(score)


def rx(cube_hwc: np.ndarray) -> np.ndarray:
    """Global RX anomaly score (Mahalanobis distance to the scene's mean), min-max scaled to [0, 1]."""
    x = _pixels(cube_hwc)
    mean, inv = _whitening(x)
    xc = x - mean
    return _unit(np.einsum("ij,jk,ik->i", xc, inv, xc)).reshape(cube_hwc.shape[:2])


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of ``values``: the histogram cut maximising the between-class variance."""
    hist, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist).astype(np.float64)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    with np.errstate(invalid="ignore", divide="ignore"):
        mu0 = m0 / w0
        mu1 = (m0[-1] - m0) / w1
        between = w0 * w1 * (mu0 - mu1) ** 2
    return float(edges[1:][int(np.nanargmax(between))])


def change_vector(cube1_hwc: np.ndarray, cube2_hwc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Change-vector analysis: magnitude of the per-pixel difference of the two dates' spectra, each date
    standardised per band (a radiometric normalisation: illumination differences cancel), scaled to [0, 1], and
    the binary change map at its Otsu threshold."""
    a, b = _pixels(cube1_hwc), _pixels(cube2_hwc)
    a = (a - a.mean(axis=0)) / (a.std(axis=0) + 1e-12)
    b = (b - b.mean(axis=0)) / (b.std(axis=0) + 1e-12)
    magnitude = _unit(np.linalg.norm(b - a, axis=1)).reshape(cube1_hwc.shape[:2])
    return magnitude, (magnitude > otsu_threshold(magnitude)).astype(np.uint8)
