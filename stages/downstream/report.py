"""The downstream report of a run: report.json, a Parquet table, a markdown table laid out like the paper's
Tables 2-4 (the paper's figures beside this run's), and PNG plots (OTB curves, confusion matrix, examples).

How a task is reported (its primary metric, names, the paper's columns and figures, how its examples are drawn) is
its `ReportSection`, data of the task's card (stages/downstream/tasks/<task>.yaml) that every TaskReport carries.
Every output carries the backbone's weight provenance and the preprocessing contract; a random-init backbone is
named as such in each of them.
"""

from __future__ import annotations

import json
import re
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from base.markdown import escape_markdown
from stages.metrics import TrackingCurves  # noqa: E402

OVERLAY_STYLES = ("classes", "map", "boxes")
"""How a section draws its examples: image + label + prediction as class maps, or as [0, 1] maps, or the image
with named boxes."""


@dataclass(frozen=True)
class Column:
    """One column of a task's table: its label, the metric it shows (None: a paper-only column) and the display
    scale (100 for percentages)."""

    label: str
    metric: str | None
    scale: float = 1.0


@dataclass(frozen=True)
class PaperTable:
    """The paper's figures on one dataset: method -> figures in the order of the section's columns."""

    key: str
    name: str
    """The dataset as the paper names it."""
    aliases: tuple[str, ...]
    """Prefixes of a catalog dataset name (lower case, alphanumerics only) that mean this dataset."""
    rows: dict[str, tuple[float, ...]]

    def matches(self, dataset: str) -> bool:
        """Whether catalog dataset `dataset` is this table's dataset."""
        return re.sub(r"[^a-z0-9]", "", dataset.lower()).startswith(self.aliases)


@dataclass(frozen=True)
class ReportSection:
    """How one task is reported: its primary metric and sense, what its head and baseline are called, the columns
    of the paper's table, the paper's figures per dataset and how its examples are drawn (a task's data)."""

    task: str
    primary: str
    higher_is_better: bool
    head_name: str
    baseline_name: str
    columns: tuple[Column, ...]
    paper: tuple[PaperTable, ...] = ()
    overlay: str = "map"

    def __post_init__(self) -> None:
        if self.overlay not in OVERLAY_STYLES:
            raise ValueError(f"ReportSection {self.task}: overlay={self.overlay!r}; choose one of {OVERLAY_STYLES}.")

    def paper_table(self, dataset: str) -> PaperTable | None:
        """The paper's figures on catalog dataset `dataset`, or None when the paper reports none."""
        return next((t for t in self.paper if t.matches(dataset)), None)


@dataclass(frozen=True)
class Overlay:
    """One qualitative example: an RGB / false-colour image (H, W, 3) in [0, 1] with its label and prediction
    (class maps or saliency maps), or, for tracking, named (x, y, w, h) boxes."""

    image: np.ndarray
    title: str = ""
    target: np.ndarray | None = None
    prediction: np.ndarray | None = None
    boxes: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True)
class TaskReport:
    """One task's results on one dataset: head and baseline scores plus what the plots need."""

    section: ReportSection
    dataset: str
    head: dict[str, float]
    baseline: dict[str, float]
    confusion: np.ndarray | None = None
    """Pooled confusion matrix of the head (rows = target), segmentation only."""
    class_names: Sequence[str] = ()
    head_curves: TrackingCurves | None = None
    baseline_curves: TrackingCurves | None = None
    overlays: Sequence[Overlay] = ()

    @property
    def task(self) -> str:
        """The task's name."""
        return self.section.task

    def __post_init__(self) -> None:
        primary = self.section.primary
        for side, scores in (("head", self.head), ("baseline", self.baseline)):
            if primary not in scores:
                raise ValueError(f"TaskReport {self.task}: {side} scores lack the primary metric {primary!r}; "
                                 f"pass the dict the {self.task}_metrics function returns.")


@dataclass(frozen=True)
class ReportPaths:
    """Where the report's files went."""

    json: Path
    parquet: Path
    markdown: Path
    plots: tuple[Path, ...]


def report_json(tasks: Sequence[TaskReport], weights: str, preprocessing: str, model: str) -> dict[str, Any]:
    """The report.json document: per task the dataset, head and baseline scores, primary metric and its sense;
    the backbone's provenance beside it."""
    names = [t.task for t in tasks]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"Two {twice[0]} results in one report; write one report per dataset of a task.")
    out: dict[str, Any] = {"tasks": {}}
    for t in tasks:
        primary, higher = t.section.primary, t.section.higher_is_better
        out["tasks"][t.task] = {"dataset": t.dataset, "head": {k: float(v) for k, v in t.head.items()},
                                "baseline": {k: float(v) for k, v in t.baseline.items()}, "primary": primary,
                                "higher_is_better": higher}
    out["provenance"] = {"weights": weights, "preprocessing": preprocessing, "model": model}
    return out


def results_table(tasks: Sequence[TaskReport], weights: str, preprocessing: str, model: str) -> pd.DataFrame:
    """Long table: one row per (task, method, metric)."""
    rows = []
    for t in tasks:
        primary, higher = t.section.primary, t.section.higher_is_better
        for method, scores in (("head", t.head), ("baseline", t.baseline)):
            for metric, value in scores.items():
                rows.append({"task": t.task, "dataset": t.dataset, "method": method, "metric": metric,
                             "value": float(value), "primary": metric == primary, "higher_is_better": higher,
                             "weights": weights, "preprocessing": preprocessing, "model": model})
    return pd.DataFrame(rows)


def _cell(value: float | None, scale: float) -> str:
    if value is None or not np.isfinite(value):
        return "—"
    return f"{value * scale:.2f}" if scale != 1.0 else f"{value:.3f}"


def markdown_table(t: TaskReport, weights: str) -> str:
    """The task's table as in the paper: methods as rows, the paper's columns, a `source` column marking the
    paper's figures ("paper") and this run's ("this run")."""
    section = t.section
    columns = [(c.label, c.metric, c.scale) for c in section.columns]
    paper = section.paper_table(t.dataset)
    title = f"### {t.task.capitalize()} — {escape_markdown(t.dataset)}"
    header = "| method | source | " + " | ".join(label for label, _, _ in columns) + " |"
    lines = [title, "", header, "|" + "---|" * (len(columns) + 2)]
    for method, figures in (paper.rows if paper else {}).items():
        cells = [_cell(v / scale, scale) for v, (_, _, scale) in zip(figures, columns, strict=False)]
        lines.append(f"| {method} | paper | " + " | ".join(cells + ["—"] * (len(columns) - len(cells))) + " |")
    for name, scores in ((section.head_name, t.head), (section.baseline_name, t.baseline)):
        cells = [_cell(scores.get(metric) if metric else None, scale) for _, metric, scale in columns]
        lines.append(f"| {name} | this run ({weights}) | " + " | ".join(cells) + " |")
    lines.append("")
    if paper is None:
        lines.append(f"The paper reports no figures for {escape_markdown(t.dataset)}.")
    else:
        lines.append(f"Rows marked paper: the published figures on {paper.name}, not measured by this run.")
    if any(label.endswith("*") for label, _, _ in columns):
        lines.append("")
        lines.append("\\* A column of the paper's table whose name is lost in the paper's text; its figures are "
                     "quoted, this run does not compute it.")
    return "\n".join(lines)


def _wrap(text: str, width: int) -> str:
    """A plot title broken into lines of at most ``width`` characters, so that it stays inside the figure."""
    return textwrap.fill(text, width, break_long_words=False)


def _plot_curves(t: TaskReport, out_dir: Path, weights: str) -> list[Path]:
    if t.head_curves is None or t.baseline_curves is None:
        return []
    paths = []
    for name, x_of, y_of, xlabel, score in (
        ("success", lambda c: c.iou_thresholds, lambda c: c.success, "IoU threshold", "success_auc"),
        ("precision", lambda c: c.error_thresholds, lambda c: c.precision, "centre error threshold (px)",
         "precision_20"),
    ):
        fig, ax = plt.subplots(figsize=(5, 4))
        for label, curves, scores in (("head", t.head_curves, t.head), ("baseline", t.baseline_curves,
                                                                          t.baseline)):
            ax.plot(x_of(curves), y_of(curves), label=f"{label} [{score} {scores.get(score, float('nan')):.3f}]")
        ax.set(xlabel=xlabel, ylabel=f"{name} rate", ylim=(0, 1.02),
               title=f"{t.dataset}: {name} plot\n" + _wrap(f"backbone {weights}", 48))
        ax.legend(loc="best", fontsize=8)
        path = out_dir / f"{t.task}_{name}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def _plot_confusion(t: TaskReport, out_dir: Path, weights: str) -> list[Path]:
    if t.confusion is None:
        return []
    cm = np.asarray(t.confusion, dtype=np.float64)
    shown = np.flatnonzero((cm.sum(1) + cm.sum(0)) > 0)
    cm = cm[np.ix_(shown, shown)]
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    names = [t.class_names[int(i)] if i < len(t.class_names) else str(i) for i in shown]
    fig, ax = plt.subplots(figsize=(max(4.5, 1.5 + 0.55 * len(shown)), max(4.0, 1.2 + 0.5 * len(shown))))
    image = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(shown)), names, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(shown)), names, fontsize=7)
    for i in range(len(shown)):
        for j in range(len(shown)):
            ax.text(j, i, f"{norm[i, j]:.2f}", ha="center", va="center", fontsize=6,
                    color="white" if norm[i, j] > 0.5 else "black")
    ax.set(xlabel="predicted", ylabel="target",
           title=f"{t.dataset} (row-normalised)\n" + _wrap(f"backbone {weights}", 48))
    fig.colorbar(image, ax=ax, fraction=0.046)
    path = out_dir / f"{t.task}_confusion.png"
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]


def _class_colours(classes: np.ndarray, n_classes: int) -> np.ndarray:
    """RGB image of a class map: tab20 colours, ids outside [0, n_classes) (ignored pixels) black."""
    rgb = np.zeros((*classes.shape, 3))
    valid = (classes >= 0) & (classes < n_classes)
    rgb[valid] = plt.get_cmap("tab20")(classes[valid] % 20)[:, :3]
    return rgb


def _plot_overlays(t: TaskReport, out_dir: Path, weights: str) -> list[Path]:
    if not t.overlays:
        return []
    n_cols = 1 if t.section.overlay == "boxes" else 3
    fig, axes = plt.subplots(len(t.overlays), n_cols, figsize=(max(5.0, 3.2 * n_cols), 3 * len(t.overlays)),
                             squeeze=False)
    colours = ("lime", "red", "deepskyblue", "orange")
    n_classes = t.confusion.shape[0] if t.confusion is not None else max(len(t.class_names), 20)
    for row, overlay in zip(axes, t.overlays, strict=True):
        row[0].imshow(np.clip(overlay.image, 0, 1))
        row[0].set_title(overlay.title or "image", fontsize=8)
        for (name, box), colour in zip(overlay.boxes.items(), colours, strict=False):
            x, y, w, h = np.asarray(box, dtype=float)
            row[0].add_patch(plt.Rectangle((x, y), w, h, fill=False, color=colour, lw=1.5, label=name))
        if overlay.boxes:
            row[0].legend(loc="lower right", fontsize=6)
        if n_cols == 3:
            for ax, data, label in ((row[1], overlay.target, "label"), (row[2], overlay.prediction, "head")):
                if data is not None and t.section.overlay == "classes":
                    ax.imshow(_class_colours(np.asarray(data), n_classes), interpolation="nearest")
                elif data is not None:
                    ax.imshow(data, cmap="gray", vmin=0, vmax=1)
                ax.set_title(label, fontsize=8)
        for ax in row:
            ax.axis("off")
    fig.suptitle(_wrap(f"{t.dataset}: {t.task} examples (backbone {weights})", 72), fontsize=9)
    path = out_dir / f"{t.task}_examples.png"
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return [path]


def write_report(out_dir: Path, tasks: Sequence[TaskReport], *, weights: str, preprocessing: str,
                 model: str = "", appendix: str = "") -> ReportPaths:
    """Write report.json, results.parquet, report.md and the plots under `out_dir`.

    `weights` is the backbone's provenance (a checkpoint sha256, or "random-init"), `preprocessing` the input
    contract's name and `model` the registry name; all three are recorded in every file. `appendix` (markdown) is
    added to report.md after the tables, e.g. the runs' sizes and timings.
    """
    if not tasks:
        raise ValueError("write_report: no task results to report.")
    out_dir = Path(out_dir)
    plots_dir = out_dir / "plots"
    plots_dir.mkdir(parents=True, exist_ok=True)
    doc = report_json(tasks, weights, preprocessing, model)
    json_path = out_dir / "report.json"
    json_path.write_text(json.dumps(doc, indent=2))
    parquet_path = out_dir / "results.parquet"
    results_table(tasks, weights, preprocessing, model).to_parquet(parquet_path, index=False)
    plots: list[Path] = []
    for t in tasks:
        plots += _plot_curves(t, plots_dir, weights) + _plot_confusion(t, plots_dir, weights)
        plots += _plot_overlays(t, plots_dir, weights)
    warning = ("\n**The backbone is random-init: these figures measure the pipeline, not a trained backbone, and "
               "are not comparable to the paper's.**\n" if "random-init" in weights else "")
    tuned = (", except rows marked tune=full, whose backbone was fine-tuned with the head"
             if any("tune=full" in t.section.head_name for t in tasks) else "")
    md = [f"# Downstream report\n\nBackbone `{model or 'unnamed'}`, weights `{weights}`, preprocessing "
          f"`{preprocessing}`. Heads train on the frozen backbone's features (head-only adaptation){tuned}.\n{warning}"]
    md += [markdown_table(t, weights) + "\n" for t in tasks]
    md += [appendix.rstrip() + "\n"] if appendix.strip() else []
    md += ["Plots: " + ", ".join(f"[{p.name}](plots/{p.name})" for p in plots) + "\n"] if plots else []
    md_path = out_dir / "report.md"
    md_path.write_text("\n".join(md))
    return ReportPaths(json_path, parquet_path, md_path, tuple(plots))


def preview_data_uri(path: Path, max_side: int = 360, colours: int = 64) -> str:
    """A PNG downscaled to at most `max_side` pixels and `colours` palette entries, as a base64 data URI: an image
    a markdown viewer shows without access to the file (the Prefect UI's artifacts), a few tens of kB."""
    import base64
    import io

    from PIL import Image

    with Image.open(path) as image:
        image.thumbnail((max_side, max_side))
        buffer = io.BytesIO()
        image.convert("RGB").quantize(colors=colours).save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
