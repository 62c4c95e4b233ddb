"""What every `hvp` command group shares: the console, common options, tables and progress bars, and the start
of Prefect's temporary server before a command runs flows."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

console = Console()

CatalogOpt = Annotated[str | None, typer.Option("--catalog", help="catalog URI (default: $HVP_CATALOG or "
                                                "./hvp-data/catalog)")]
ProfileOpt = Annotated[str, typer.Option("--profile", help="demo (tiny models, loose thresholds), production "
                                         "(released model sizes, the settings' checkpoints and thresholds) or test "
                                         "(pipelines/profiles/<name>.yaml)")]
PlainOpt = Annotated[bool, typer.Option(help="run the stage's runner directly, without Prefect")]


def start_flows() -> None:
    """Before a command runs Prefect flows: start the temporary server (when none is configured) so that it dies
    with this process, even on kill -9."""
    from infra.prefect_server import start_temporary_server

    start_temporary_server()


def progress() -> Progress:
    """A progress bar on the console that stays after it finishes."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=False)


def table(title: str, rows: list[dict[str, Any]]) -> Table:
    """Rows of dicts as a rich table, columns in the first row's order."""
    out = Table(title=title)
    for col in rows[0] if rows else []:
        out.add_column(str(col))
    for r in rows:
        out.add_row(*(str(v) for v in r.values()))
    return out


def key_values(items: list[str] | None, option: str) -> dict[str, Any] | None:
    """`KEY=VALUE` options as a dict (values parsed as JSON where they are JSON), or None when none are given."""
    if not items:
        return None
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            from base.errors import InputError

            raise InputError(option, item, "is not KEY=VALUE", f"write e.g. {option} img_size=256")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def print_pretrain(result: dict[str, Any]) -> None:
    """A pretraining result in three lines: speed and weights, final metrics, checkpoint and plot."""
    final = {k: round(v, 4) if isinstance(v, float) else v for k, v in result["final"].items()}
    console.print(f"pretrained {result['steps_done']} steps ({result['steps_per_s']:.2f} steps/s), "
                  f"student {result['student_weights'][:12]}, teacher {result['teacher_weights'][:12]}")
    console.print(f"final: {final}")
    console.print(f"checkpoint: {result['checkpoint']}  plot: {result['plot_png']}")


def print_heads(rows: list[dict[str, Any]], title: str) -> None:
    """Head vs baseline per task on the primary metric, with the head's size, steps and time (fits 80 columns)."""
    from rich import box

    out = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1), collapse_padding=True)
    for name in ("task", "dataset", "metric", "head", "baseline", "margin", "params"):
        out.add_column(name, no_wrap=True)
    for r in rows:
        out.add_row(r["task"], r["dataset"], r["metric"], f"{r['head']:.3f}", f"{r['baseline']:.3f}",
                    f"{r['margin']:+.3f}", f"{r['trainable_parameters']:,}")
    console.print(out)
    for r in rows:
        console.print(f"{r['task']}: {r['steps']} steps, {r['seconds']:.1f} s, {r['train_items']} train / "
                      f"{r['test_items']} test items" + (" (reused: inputs unchanged)" if r["reused"] else ""))
