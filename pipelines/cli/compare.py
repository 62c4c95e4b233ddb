"""`hvp compare`: the same heads on the same data for several backbones, one report."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any

import typer

from pipelines.cli.common import CatalogOpt, console, key_values

RANDOM_INIT = "random-init"


def _words(items: list[str] | None) -> list[str]:
    """Option values and extra arguments as words (comma- or space-separated lists allowed)."""
    return [w for item in items or [] for w in re.split(r"[,\s]+", item) if w]


def compare_entries(models: list[str], checkpoints: dict[str, Any]) -> list[Any]:
    """The compared backbones (stages.downstream.compare.CompareEntry) the words name: a registry layout with its
    --checkpoint (random-init without one); `random-init` is the first model's layout with random weights, the
    control for what its checkpoint adds."""
    from base.errors import InputError
    from model.registry import resolve_name
    from stages.downstream.compare import CompareEntry
    from stages.downstream.runners import BackboneConfig

    unknown = set(checkpoints) - set(models)
    if unknown:
        raise InputError("--checkpoint", sorted(unknown)[0], "names a model that --models does not list",
                         f"write --checkpoint MODEL=PATH for one of {models}")
    entries = []
    for word in models:
        if word == RANDOM_INIT:
            first = next((m for m in models if m != RANDOM_INIT), None)
            if first is None or first not in checkpoints:
                raise InputError("--models", RANDOM_INIT, "stands for the first model's layout with random weights, "
                                 "which only differs from that model when it has a checkpoint",
                                 "give --checkpoint FIRST_MODEL=PATH, or drop random-init (a model without a "
                                 "checkpoint is random-init already)")
            entries.append(CompareEntry(label=f"{RANDOM_INIT} ({first})",
                                        backbone=BackboneConfig(model=resolve_name(first))))
            continue
        path = checkpoints.get(word)
        weights = str(Path(str(path)).resolve()) if path not in (None, RANDOM_INIT) else RANDOM_INIT
        entries.append(CompareEntry(backbone=BackboneConfig(model=resolve_name(word), checkpoint=weights)))
    return entries


def compare(models: Annotated[list[str] | None, typer.Option(
                "--models", help="backbones: registry layouts (hypervision_b hyperfree_b hypersigma_b tiny ...) and "
                                 "`random-init` (the first model's layout with random weights); the words after "
                                 "--models count too")] = None,
            more: Annotated[list[str] | None, typer.Argument(
                help="more models (and task names) after --models / --tasks", show_default=False)] = None,
            tasks: Annotated[list[str] | None, typer.Option(
                "--tasks", help="tasks (segmentation saliency tracking; default: every registered task)")] = None,
            checkpoint: Annotated[list[str] | None, typer.Option(
                "--checkpoint", help="MODEL=PATH: a model's weights (file, pretraining checkpoint or run folder); "
                                     "repeat for several. Models without one are random-init")] = None,
            benchmark: Annotated[list[str] | None, typer.Option(
                "--benchmark", help="TASK=DATASET: a task's labelled dataset (default: its benchmark)")] = None,
            out: Annotated[Path, typer.Option(help="report folder, one run folder per backbone")] = Path(
                "hvp-data/runs/compare"),
            catalog: CatalogOpt = None,
            steps: Annotated[int | None, typer.Option(help="training steps per head (default: by head size)")] = None,
            seed: Annotated[int, typer.Option(help="seed of the heads and of random-init weights")] = 0,
            timing_images: Annotated[int, typer.Option(help="images encoded to time each backbone")] = 2,
            device: Annotated[str, typer.Option(help="auto | cuda | cpu")] = "auto") -> None:
    """Run the same heads on the same data for every backbone and write ONE report (compare.parquet, report.json,
    report.md): a row per backbone per task, the trivial baseline's and the paper's figures in their own rows, the
    trainable parameters and the feature time per image. Features are cached per backbone, unchanged heads are
    reused. Example: hvp compare --models hypervision_b hyperfree_b hypersigma_b random-init --tasks segmentation
    --checkpoint hypervision_b=runs/pretrain-hypervision_b-.../"""
    from base.errors import InputError
    from pipelines.catalogs import open_catalog
    from pipelines.params import head_size_for
    from stages.downstream.compare import CompareConfig, run_compare
    from stages.downstream.runners import TaskChoice
    from stages.downstream.tasks import TASKS

    words = _words(more)
    task_names = _words(tasks) + [w for w in words if w in TASKS]
    model_names = _words(models) + [w for w in words if w not in TASKS]
    if not model_names:
        raise InputError("--models", "(none)", "lists no backbone", "write e.g. --models tiny hypersigma_tiny")
    entries = compare_entries(model_names, key_values(checkpoint, "--checkpoint") or {})
    datasets = {str(k): str(v) for k, v in (key_values(benchmark, "--benchmark") or {}).items()}
    choices = [TaskChoice(task=t, dataset=datasets.get(t)) for t in task_names]
    sizes = {head_size_for(e.backbone.model) for e in entries}
    config = CompareConfig.model_validate({
        "out_dir": str(out.resolve()), "backbones": entries, "tasks": choices, "steps": steps, "seed": seed,
        "head_size": "small" if sizes == {"small"} else "paper", "device": device, "timing_images": timing_images})
    console.print(f"[bold]compare[/bold] {', '.join(e.name for e in entries)}: "
                  f"{', '.join(c.task for c in config.task_choices())} ({config.head_size} heads)")
    result = run_compare(open_catalog(catalog), config)
    from rich import box
    from rich.table import Table

    view = Table(title="backbones compared (primary metric; paper rows are published figures)", box=box.SIMPLE_HEAD)
    for name in ("task", "backbone", "source", "metric", "value", "head params", "ms/image", "weights"):
        view.add_column(name)
    for r in result.rows:
        view.add_row(r["task"], r["backbone"], r["source"], r["metric"],
                     "—" if r["value"] is None else f"{r['value']:.4f}",
                     "—" if r["trainable_parameters"] is None else f"{int(r['trainable_parameters']):,}",
                     "—" if r["feature_ms_per_image"] is None else f"{r['feature_ms_per_image']:.1f}",
                     r["weights"] or "—")
    console.print(view)
    console.print(f"report: {result.markdown}  {result.json}  {result.parquet}")
