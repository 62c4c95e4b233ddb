"""Checkpoint snapshots and their model cards.

A pretraining run keeps only its newest checkpoints for resuming; the research loop keeps every checkpoint's weights
as a snapshot (``<run>/snapshots/step_<n>/``: model.safetensors hard-linked where the file system allows, and the
run's resolved config), so that an evaluation triggered later still finds them. Each snapshot carries a model card
(model-card.md + model-card.json): the registry layout, the catalog's datasets with image counts and content
hashes, the labeler and fusion ids, the preprocessing contract, the training configuration and the downstream
metrics measured on it so far.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from catalog.catalog import Catalog
from catalog.masks import MaskStore
from model.registry import model_entry
from stages.labelling.labeler import file_sha256

SNAPSHOT_DIR = "snapshots"
CARD_MD, CARD_JSON = "model-card.md", "model-card.json"
WEIGHTS_FILE, CONFIG_FILE = "model.safetensors", "config.json"
RANDOM_INIT = "random-init"


def keep_snapshot(checkpoint: str | Path, run_dir: str | Path) -> Path:
    """Keep a committed checkpoint's weights and config under ``<run_dir>/snapshots/<its name>`` (hard link, or a
    copy across file systems); returns the snapshot folder. Idempotent."""
    src = Path(checkpoint)
    dest = Path(run_dir) / SNAPSHOT_DIR / src.name
    dest.mkdir(parents=True, exist_ok=True)
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        target = dest / name
        if target.exists():
            continue
        tmp = dest / f".{name}.tmp"
        tmp.unlink(missing_ok=True)
        try:
            os.link(src / name, tmp)
        except OSError:
            shutil.copyfile(src / name, tmp)
        os.replace(tmp, target)
    return dest


def step_of(checkpoint: str | Path) -> int:
    """The pretraining step of a checkpoint folder named ``step_<n>`` (0 for anything else)."""
    name = Path(checkpoint).name
    return int(name.split("_", 1)[1]) if name.startswith("step_") and name.split("_", 1)[1].isdigit() else 0


def catalog_summary(catalog: Catalog, datasets: Sequence[str] | None = None) -> dict[str, Any]:
    """The catalog's datasets (each: image count and a content hash over its images' sha256s), and the labeler
    ids per branch and fusion ids of their masks."""
    images = catalog.images()
    if datasets:
        images = images[images["dataset"].isin(list(datasets))]
    per_dataset = {}
    for name, rows in images.groupby("dataset"):
        digest = hashlib.sha256("\n".join(sorted(rows["sha256"])).encode()).hexdigest()
        per_dataset[str(name)] = {"images": int(len(rows)), "content_sha256": digest}
    index = MaskStore(catalog).index()
    labelers: dict[str, list[str]] = {}
    if not index.empty:
        index = index[index["image_id"].isin(set(images["image_id"]))]
        for branch, rows in index.groupby("branch"):
            labelers[str(branch)] = sorted(set(rows["labeler_id"]))
    return {"uri": catalog.uri, "images": int(len(images)), "datasets": per_dataset,
            "labeler_ids": {b: ids for b, ids in labelers.items() if b != "fused"},
            "fusion_ids": labelers.get("fused", [])}


def _layout(model: str) -> dict[str, Any]:
    entry = model_entry(model)
    return {"name": entry.name, "family": entry.family, "feature_info": entry.feature_info(entry.config)}


def model_card(catalog: Catalog, snapshot: str | Path, evaluations: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    """The card of one snapshot (or checkpoint) folder, as a plain dict."""
    folder = Path(snapshot)
    resolved = json.loads((folder / CONFIG_FILE).read_text())
    config = resolved.get("config", {})
    weights = folder / WEIGHTS_FILE
    random_init = RANDOM_INIT in (resolved.get("student_weights"), resolved.get("teacher_weights"))
    return {
        "checkpoint": str(folder), "sha256": file_sha256(weights), "step": step_of(folder),
        "random_init": random_init, "student_init": resolved.get("student_weights"),
        "teacher": resolved.get("teacher_weights"), "layout": _layout(config.get("model", "tiny")),
        "catalog": catalog_summary(catalog, resolved.get("datasets") or None),
        "fusion_id": config.get("fusion_id") or "latest fused set per image",
        "preprocessing": resolved.get("preprocessing"), "training": config,
        "stage_version": resolved.get("stage_version"),
        "metrics": [{k: e[k] for k in ("task", "dataset", "metric", "value", "baseline", "protocol_id")}
                    for e in evaluations],
    }


def card_markdown(card: dict[str, Any]) -> str:
    """A card as markdown (the headline facts, then the full JSON card's sections)."""
    note = " (random-init)" if card["random_init"] else ""
    lines = [f"# Model card: {card['layout']['name']} at step {card['step']}{note}", "",
             f"- weights: `{card['checkpoint']}/{WEIGHTS_FILE}`, sha256 `{card['sha256']}`",
             f"- layout: `{card['layout']['name']}` (family {card['layout']['family']})",
             f"- student init: `{card['student_init']}`; teacher: `{card['teacher']}`",
             f"- preprocessing: `{json.dumps(card['preprocessing'], sort_keys=True)}`",
             f"- catalog: `{card['catalog']['uri']}`, {card['catalog']['images']} images", "",
             "| dataset | images | content sha256 |", "|---|---|---|"]
    lines += [f"| {d} | {v['images']} | `{v['content_sha256'][:16]}` |" for d, v in card["catalog"]["datasets"].items()]
    lines += ["", "Labeler ids: " + ", ".join(f"{b} `{', '.join(i[:12] for i in ids)}`"
                                              for b, ids in card["catalog"]["labeler_ids"].items()),
              "Fusion ids in the catalog: " + ", ".join(f"`{i[:12]}`" for i in card["catalog"]["fusion_ids"])
              + f"; trained on: `{card['fusion_id']}`", "",
              "## Downstream metrics measured on this checkpoint", ""]
    if card["metrics"]:
        lines += ["| task | dataset | metric | value | baseline | protocol |", "|---|---|---|---|---|---|"]
        lines += [f"| {m['task']} | {m['dataset']} | {m['metric']} | {m['value']:.4f} | {m['baseline']:.4f} | "
                  f"`{m['protocol_id'][:12]}` |" for m in card["metrics"]]
    else:
        lines.append("_none yet_")
    lines += ["", "## Training configuration", "", "```json", json.dumps(card["training"], indent=2), "```", ""]
    return "\n".join(lines)


def write_model_card(catalog: Catalog, snapshot: str | Path,
                     evaluations: Sequence[dict[str, Any]] = ()) -> tuple[Path, Path]:
    """Write (or refresh) model-card.md and model-card.json in a snapshot folder; returns their paths."""
    folder = Path(snapshot)
    card = model_card(catalog, folder, evaluations)
    paths = folder / CARD_MD, folder / CARD_JSON
    for path, text in zip(paths, (card_markdown(card), json.dumps(card, indent=2, default=str)), strict=True):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    return paths
