"""The `hvp` command line, one module per command group: data (fixtures, datasets, ingest), catalog, label
(label, fuse, show), pretrain (pretrain, models), downstream (features, heads), compare (compare) and run (demo,
ui, watch). This
module is the table of commands; the console script is ``hvp = pipelines.cli:main``."""

from __future__ import annotations

import os

import typer

from pipelines.cli import catalog, compare, data, downstream, label, pretrain, run, zeroshot
from pipelines.cli.common import console

app = typer.Typer(help="HyperVision pretraining pipeline.", no_args_is_help=True, add_completion=False)
catalog_app = typer.Typer(help="Inspect and check the catalog.", no_args_is_help=True)
fixtures_app = typer.Typer(help="Tiny seeded fixtures of every dataset, in native formats.", no_args_is_help=True)
models_app = typer.Typer(help="The model registry and checkpoint files.", no_args_is_help=True)
heads_app = typer.Typer(help="Task heads on the frozen backbone: train, evaluate, run all three into one report.",
                        no_args_is_help=True)
app.add_typer(catalog_app, name="catalog")
app.add_typer(fixtures_app, name="fixtures")
app.add_typer(heads_app, name="heads")
app.add_typer(models_app, name="models")

fixtures_app.command("make")(data.fixtures_make)
app.command("datasets")(data.datasets)
app.command("ingest")(data.ingest)
catalog_app.command("list")(catalog.catalog_list)
catalog_app.command("summary")(catalog.catalog_summary)
catalog_app.command("show")(catalog.catalog_show)
catalog_app.command("quarantine")(catalog.catalog_quarantine)
catalog_app.command("verify")(catalog.catalog_verify)
catalog_app.command("compact")(catalog.catalog_compact)
catalog_app.command("gc")(catalog.catalog_gc)
app.command("label")(label.label)
app.command("fuse")(label.fuse)
app.command("show")(label.show)
app.command("pretrain")(pretrain.pretrain)
models_app.command("list")(pretrain.models_list)
models_app.command("inspect")(pretrain.models_inspect)
app.command("tensorboard")(pretrain.tensorboard)
app.command("demo")(run.demo)
app.command("ui")(run.ui)
app.command("watch")(run.watch)
app.command("automations")(run.automations)
app.command("features")(downstream.features)
heads_app.command("train")(downstream.heads_train)
heads_app.command("eval")(downstream.heads_eval)
heads_app.command("run-all")(downstream.heads_run_all)
app.command("zeroshot")(zeroshot.zeroshot)
app.command("compare")(compare.compare)


def main() -> None:
    """The `hvp` entry point: bad input and missing files print one clear line (file, field, fix), not a
    traceback, and exit with status 2. Prefect's embedded server never phones home (no internet here)."""
    from base.errors import InputError
    from infra.prefect_server import configure_client_auth

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    configure_client_auth()  # clients (and the processes they start) send the configured credential
    try:
        app()
    except (InputError, FileNotFoundError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise SystemExit(2) from None
