"""Per-step metrics CSV (truncated on resume) and the loss plot."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

METRIC_FIELDS = ["step", "loss", "seg", "focal", "dice", "iou_mse", "distill", "mask_iou", "prompts", "bands",
                 "lr", "grad_norm", "seconds", "weights"]


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the metric rows of steps before `step` (rows logged after the resumed checkpoint are redone)."""
    if not path.is_file():
        return
    with path.open(newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if int(r["step"]) < step]
    write_rows(path, rows)


def write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=METRIC_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def append_row(path: Path, row: dict[str, Any]) -> None:
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


def open_run_dir(run_dir: Path, resolved: dict[str, Any], metrics_csv: Path, start: int) -> None:
    """Prepare a run folder on the main rank, for every objective: its resolved config written, its metrics kept up
    to ``start`` (a resume) or cleared (a fresh run)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(resolved, indent=2, default=str))
    if start:
        truncate_metrics(metrics_csv, start)
    elif metrics_csv.exists():
        metrics_csv.unlink()
