"""Channel-adaptive spectral patch embedding of HyperFree / HyperVision.

Each input band is matched, by wavelength, to entries of two banks of per-wavelength patch kernels: the 85 key
wavelengths and a 10 nm grid over 400-2500 nm. The patch embedding sums the convolutions of the matched bands
with the matched kernels, so any sensor (any number of bands, any wavelengths) maps to the same token space.
Matching follows the official HyperFree `find_corresponding_indices(input_wl, bank_wl, dis=10)`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# The 85 key wavelengths (nm) of HyperFree's point bank, in bank order (near-duplicates such as 1575 and
# 1575.5 are distinct bank rows in the official checkpoint).
KEY_WAVELENGTHS_NM: tuple[float, ...] = (
    400, 412.5, 429.5, 443, 455, 467.5, 473.375, 481.25, 488.25,
    500, 520, 531, 536, 545, 550.5, 561.25, 564.75, 565.5, 575, 580,
    596, 605, 610, 612, 626, 627.5, 630, 635, 640, 645, 650, 655, 656,
    660, 664.5, 665, 667, 671.25, 677.5, 686, 700, 705, 710, 716, 725,
    730, 740, 748.5, 760, 764.25, 776, 783, 790, 808, 820, 825, 830,
    835.3125, 842, 850, 858.5, 865, 866, 869.5, 880, 896, 905, 910, 926,
    938, 945, 950, 959, 1240, 1375, 1575, 1575.5, 1610, 1640, 1650, 2050.25,
    2130, 2195, 2217.5, 2500,
)  # fmt: skip

# The 211 wavelengths (nm) of the block (grid) bank: 400, 410, ..., 2500.
GRID_WAVELENGTHS_NM: tuple[float, ...] = tuple(float(w) for w in np.arange(400, 2510, 10))

MATCH_TOLERANCE_NM = 10.0
"""A bank entry takes an input band within this distance (inclusive), as the official `dis=10`."""

MIN_BANDS_FOR_GRID = 20
"""Inputs with fewer bands use the key bank only (the official multispectral path)."""

VALID_RANGE_NM = (KEY_WAVELENGTHS_NM[0] - MATCH_TOLERANCE_NM, GRID_WAVELENGTHS_NM[-1] + MATCH_TOLERANCE_NM)


def find_corresponding_indices(
    input_wl: Sequence[float] | np.ndarray, bank_wl: Sequence[float] | np.ndarray, dis: float
) -> tuple[list[int], list[int]]:
    """For each bank entry, in bank order, the FIRST input band within `dis` nm (inclusive).

    Returns `(input_indices, bank_indices)` of equal length; one input band may serve several bank entries.
    Vectorised equivalent of the official double loop.
    """
    inp = np.asarray(input_wl, dtype=np.float64).reshape(-1)
    bank = np.asarray(bank_wl, dtype=np.float64).reshape(-1)
    if inp.size == 0:
        return [], []
    close = np.abs(bank[:, None] - inp[None, :]) <= dis
    bank_idx = np.flatnonzero(close.any(axis=1))
    return close[bank_idx].argmax(axis=1).tolist(), bank_idx.tolist()


@dataclass(frozen=True)
class BandMatch:
    """Which input bands feed which bank kernels, and which input bands were dropped."""

    wavelengths_nm: tuple[float, ...]
    key_input: tuple[int, ...]
    key_bank: tuple[int, ...]
    grid_input: tuple[int, ...]
    grid_bank: tuple[int, ...]
    unmatched: tuple[int, ...]
    """Input band indices with no entry of the banks in use within the tolerance (e.g. 377 nm)."""
    unused: tuple[int, ...]
    """Input band indices feeding no kernel (superset of `unmatched`: first-match leaves dense bands out)."""

    @property
    def unmatched_wavelengths_nm(self) -> tuple[float, ...]:
        """Wavelengths of the input bands that matched no bank entry."""
        return tuple(self.wavelengths_nm[i] for i in self.unmatched)


def _unused(num_bands: int, key_input: Sequence[int], grid_input: Sequence[int]) -> tuple[int, ...]:
    """Input band indices that feed neither bank."""
    used = set(key_input) | set(grid_input)
    return tuple(i for i in range(num_bands) if i not in used)


def match_bands(wavelengths_nm: Sequence[float] | np.ndarray | torch.Tensor) -> BandMatch:
    """Match input band wavelengths (nm) to the key and grid banks exactly as HyperFree's inference path.

    Key bank: first input band within 10 nm per key wavelength. Grid bank (only with >= 20 bands): the same
    rule, then entries whose input band is already used by the key bank are removed.
    Raises ValueError when no input band matches any bank entry in use.
    """
    if isinstance(wavelengths_nm, torch.Tensor):
        wavelengths_nm = wavelengths_nm.detach().cpu().numpy()
    wl = np.asarray(wavelengths_nm, dtype=np.float64).reshape(-1)
    key_input, key_bank = find_corresponding_indices(wl, KEY_WAVELENGTHS_NM, MATCH_TOLERANCE_NM)
    use_grid = wl.size >= MIN_BANDS_FOR_GRID
    grid_input: list[int] = []
    grid_bank: list[int] = []
    banks = np.asarray(KEY_WAVELENGTHS_NM)
    if use_grid:
        key_used = set(key_input)
        pairs = zip(*find_corresponding_indices(wl, GRID_WAVELENGTHS_NM, MATCH_TOLERANCE_NM), strict=True)
        kept = [(i, b) for i, b in pairs if i not in key_used]
        grid_input = [i for i, _ in kept]
        grid_bank = [b for _, b in kept]
        banks = np.concatenate([banks, np.asarray(GRID_WAVELENGTHS_NM)])
    if not key_input and not grid_input:
        bank_text = "the 85 HyperFree key wavelengths" if not use_grid else "the key or 10 nm grid banks"
        raise ValueError(
            f"No input band lies within {MATCH_TOLERANCE_NM:g} nm of {bank_text}: wavelengths "
            f"{np.round(wl, 3).tolist()} nm. Valid range: {VALID_RANGE_NM[0]:g}-{VALID_RANGE_NM[1]:g} nm"
            + (
                " (with fewer than 20 bands only the key wavelengths count; they leave gaps, e.g. 970-1230)"
                if not use_grid
                else ""
            )
            + "; check that the cube's wavelength coordinate is in nanometres."
        )
    matchable = (np.abs(wl[:, None] - banks[None, :]) <= MATCH_TOLERANCE_NM).any(axis=1)
    return BandMatch(
        wavelengths_nm=tuple(float(w) for w in wl),
        key_input=tuple(key_input),
        key_bank=tuple(key_bank),
        grid_input=tuple(grid_input),
        grid_bank=tuple(grid_bank),
        unmatched=tuple(int(i) for i in np.flatnonzero(~matchable)),
        unused=_unused(wl.size, key_input, grid_input),
    )


def sample_grid_subset(
    match: BandMatch, num_samples: int, generator: torch.Generator | None = None,
    draws: Sequence[int] | None = None,
) -> BandMatch:
    """The official training-mode band subset: `num_samples` grid matches drawn with replacement, sorted.

    HyperFree draws 40 indices (uniform, with replacement) over the grid matches computed BEFORE removing the
    key-used bands, sorts them, then removes entries whose input band the key bank uses; repeated draws stay
    (their kernels then count twice). Inputs with fewer than 20 bands have no grid part: returned as is.
    `draws` gives the drawn indices (into the grid matches) instead of drawing them (a replayed draw).
    """
    full_input, full_bank = find_corresponding_indices(
        match.wavelengths_nm, GRID_WAVELENGTHS_NM, MATCH_TOLERANCE_NM
    )
    if len(match.wavelengths_nm) < MIN_BANDS_FOR_GRID or not full_input:
        return match
    if draws is None:
        draws = torch.randint(0, len(full_input), (num_samples,), generator=generator).sort().values.tolist()
    elif any(not 0 <= d < len(full_input) for d in draws):
        raise ValueError(f"band draws {list(draws)} index {len(full_input)} grid matches")
    key_used = set(match.key_input)
    kept = [(full_input[d], full_bank[d]) for d in draws if full_input[d] not in key_used]
    return BandMatch(
        wavelengths_nm=match.wavelengths_nm,
        key_input=match.key_input,
        key_bank=match.key_bank,
        grid_input=tuple(i for i, _ in kept),
        grid_bank=tuple(b for _, b in kept),
        unmatched=match.unmatched,
        unused=_unused(len(match.wavelengths_nm), match.key_input, [i for i, _ in kept]),
    )


class SpectralPatchEmbed(nn.Module):
    """Two-bank wavelength-dictionary patch embedding (HyperFree key bank + 10 nm grid bank).

    Parameter names are the official ones; the image encoder subclasses this module so that they sit directly
    at `image_encoder.<name>` as in the HyperFree checkpoint.
    """

    def __init__(self, embed_dim: int, patch_size: int) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.patch_size = patch_size
        n_key, n_grid = len(KEY_WAVELENGTHS_NM), len(GRID_WAVELENGTHS_NM)
        self.point_spectral_weight_bank_w = nn.Parameter(
            torch.empty(embed_dim, n_key, patch_size, patch_size)
        )
        self.point_spectral_weight_bank_b = nn.Parameter(torch.zeros(embed_dim))
        self.block_spectral_weight_bank_w = nn.Parameter(
            torch.empty(embed_dim, n_grid, patch_size, patch_size)
        )
        self.block_spectral_weight_bank_b = nn.Parameter(torch.zeros(embed_dim))
        # The official code draws the banks from randn; checkpoints overwrite them, and a ViT-style small init
        # keeps randomly initialised models numerically tame.
        nn.init.trunc_normal_(self.point_spectral_weight_bank_w, std=0.02)
        nn.init.trunc_normal_(self.block_spectral_weight_bank_w, std=0.02)

    def embed_patches(
        self,
        x: torch.Tensor,
        wavelengths_nm: Sequence[float] | np.ndarray | torch.Tensor,
        grid_samples: int | None = None,
        generator: torch.Generator | None = None,
        band_draws: Sequence[int] | None = None,
    ) -> tuple[torch.Tensor, BandMatch]:
        """Embed `x` (B, C, H, W) with wavelengths (C,) into tokens (B, D, H/p, W/p).

        `grid_samples=None` is the official inference path (all matches); an int draws the official
        training-mode random grid subset of that many entries (HyperFree uses 40); `band_draws` replays a given
        draw (indices into the grid matches, sorted) instead.
        """
        if x.shape[1] != len(wavelengths_nm):
            raise ValueError(
                f"The input has {x.shape[1]} bands but {len(wavelengths_nm)} wavelengths were given; "
                "pass one wavelength (nm) per band."
            )
        match = match_bands(wavelengths_nm)
        if band_draws is not None:
            match = sample_grid_subset(match, len(band_draws), draws=band_draws)
        elif grid_samples is not None:
            match = sample_grid_subset(match, grid_samples, generator)
        stride = (self.patch_size, self.patch_size)
        out_hw = (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        if match.key_input:
            tokens = F.conv2d(
                x[:, list(match.key_input)],
                self.point_spectral_weight_bank_w[:, list(match.key_bank)],
                self.point_spectral_weight_bank_b,
                stride=stride,
            )
        else:
            # No key match (only possible with >= 20 bands): the empty sum leaves the bias, where the official
            # code would fail on a zero-channel convolution.
            tokens = self.point_spectral_weight_bank_b.view(1, -1, 1, 1).expand(x.shape[0], -1, *out_hw)
        if match.grid_input:
            tokens = tokens + F.conv2d(
                x[:, list(match.grid_input)],
                self.block_spectral_weight_bank_w[:, list(match.grid_bank)],
                self.block_spectral_weight_bank_b,
                stride=stride,
            )
        return tokens, match

    def forward(
        self,
        x: torch.Tensor,
        wavelengths_nm: Sequence[float] | np.ndarray | torch.Tensor,
        grid_samples: int | None = None,
        generator: torch.Generator | None = None,
        band_draws: Sequence[int] | None = None,
    ) -> tuple[torch.Tensor, BandMatch]:
        """See `embed_patches`."""
        return self.embed_patches(x, wavelengths_nm, grid_samples, generator)
