"""Mask overlays as PNG: what a person looks at to judge pseudo-labels (UI artifacts and `hvp show`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from catalog.masks import MaskSet


def palette(n: int, seed: int = 7) -> np.ndarray:
    """``n`` distinct bright colours (uint8 RGB), stable for a given seed."""
    rng = np.random.default_rng(seed)
    hues = (np.arange(n) * 0.61803398875 + rng.random()) % 1.0
    import colorsys

    return np.array([[int(c * 255) for c in colorsys.hsv_to_rgb(h, 0.85, 1.0)] for h in hues], dtype=np.uint8)


def overlay(rgb: np.ndarray, masks: MaskSet, alpha: float = 0.5, scale: int = 1) -> Image.Image:
    """Blend each mask in its own colour over ``rgb`` (y, x, 3), smallest masks on top, and mark each prompt."""
    img = rgb.astype(np.float32).copy()
    colours = palette(len(masks))
    order = np.argsort([-int(m.sum()) for m in masks.masks])
    for i in order:
        m = masks.masks[i]
        img[m] = (1 - alpha) * img[m] + alpha * colours[i]
    out = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    if scale > 1:
        out = out.resize((out.width * scale, out.height * scale), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(out)
    r = max(1, scale // 2)
    for i, row in masks.table.reset_index(drop=True).iterrows():
        if row["prompt_x"] >= 0:
            cx, cy = (row["prompt_x"] + 0.5) * scale, (row["prompt_y"] + 0.5) * scale
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=(255, 255, 255), fill=tuple(colours[i]))
    return out


def panel(rgb: np.ndarray, sets: dict[str, MaskSet], title_note: str = "", scale: int = 4) -> Image.Image:
    """Side-by-side overlays, one per branch (e.g. spatial, spectral, material, fused), with captions."""
    tiles = [(name, overlay(rgb, ms, scale=scale)) for name, ms in sets.items()]
    w = sum(t.width for _, t in tiles) + 4 * (len(tiles) - 1)
    h = max(t.height for _, t in tiles) + 14
    canvas = Image.new("RGB", (w, h + (12 if title_note else 0)), (20, 20, 20))
    draw = ImageDraw.Draw(canvas)
    x = 0
    for name, tile in tiles:
        canvas.paste(tile, (x, 14))
        draw.text((x + 2, 1), f"{name} ({len(sets[name])})", fill=(230, 230, 230))
        x += tile.width + 4
    if title_note:
        draw.text((2, h + 1), title_note, fill=(255, 200, 80))
    return canvas


def save_panel(rgb: np.ndarray, sets: dict[str, MaskSet], path: str | Path, note: str = "") -> Path:
    """Write the panel PNG (parents created) and return its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    scale = max(1, min(8, 256 // max(rgb.shape[:2])))
    panel(rgb, sets, note, scale=scale).save(path)
    return path
