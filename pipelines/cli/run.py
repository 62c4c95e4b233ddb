"""`hvp demo`, `hvp ui` and `hvp watch`: the whole pipeline end to end, the Prefect UI, the arrival watcher."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from pipelines.cli.catalog import summary_rows
from pipelines.cli.common import console, print_heads, print_pretrain, start_flows, table
from pipelines.cli.data import run_ingest


def demo(workdir: Annotated[Path, typer.Option(help="where sources, the catalog and runs go")] = Path("hvp-data"),
         plain: Annotated[bool, typer.Option(help="ingest without Prefect first (the DAG's ingest then skips)")
                          ] = False) -> None:
    """The main job end to end on fixture data with tiny random-init models: make fixtures, then run the
    `hypervision` flow (ingest, label with the three branches, fuse, pretrain a few steps, cache the pretrained
    backbone's features, train and score the three task heads, and the same heads on a tiny random-init HyperSIGMA
    backbone beside it) with the demo profile on a temporary local server, exactly as the UI's `hypervision`
    deployment does; stages with unchanged inputs skip."""
    from catalog.fixtures import make_fixtures
    from pipelines.catalogs import open_catalog
    from pipelines.hypervision import hypervision_flow
    from pipelines.params import PathParams, Profile

    workdir = workdir.resolve()
    start_flows()
    sources, catalog = workdir / "sources", str(workdir / "catalog")
    written = make_fixtures(sources)
    console.print(f"[bold]fixtures[/bold]: {sum(map(len, written.values()))} images of {len(written)} "
                  f"datasets under {sources}")
    if plain:
        console.print(table("ingest (plain)", run_ingest(sources, catalog, plain=True)))
    console.print("[bold]hypervision[/bold] flow, profile demo (tiny random-init models, loose thresholds): "
                  "ingest -> label spatial, spectral, material -> fuse -> pretrain -> features -> heads -> compare")
    out = hypervision_flow(Profile.demo, PathParams(source_root=str(sources), catalog=catalog,
                                                    runs=str(workdir / "runs")))
    console.print(table("stages", out["stages"]))
    console.print(table("catalog", summary_rows(catalog)))
    report = open_catalog(catalog).verify()
    console.print(f"[bold]verify[/bold]: {report.ok} cubes ok, healthy={report.healthy}, "
                  f"orphans={len(report.orphans)}")
    if not report.healthy:
        raise typer.Exit(1)
    branches = [v for k, v in out["outputs"].items() if k.startswith("label-")]
    console.print(table("labelling (random-init weights: masks show the plumbing, not quality)", branches))
    fused = out["outputs"]["fuse"]
    if fused:
        console.print(table(f"pseudo-labels of {len(fused)} images", fused[:12]))
    console.print(f"overlays: {Path(catalog) / 'reports' / 'overlays'}")
    result = out["outputs"]["pretrain"]
    print_pretrain(result)
    from model import create_model, load_checkpoint

    loaded = load_checkpoint(create_model("tiny"), Path(result["checkpoint"]) / "model.safetensors")
    console.print(f"checkpoint loads back: {len(loaded.missing)} missing, {len(loaded.unexpected)} unexpected keys")
    heads = out["outputs"].get("heads")
    if heads:
        print_heads(heads["table"], "heads on the frozen pretrained backbone vs trivial baselines (random-init "
                                    "student and teacher pretrained a few steps: the figures show the plumbing)")
        console.print(f"report: {heads['report']}  ({heads['markdown']})")
    compared = out["outputs"].get("compare")
    if compared:
        rows = [{"task": r["task"], "backbone": r["backbone"], "source": r["source"], "metric": r["metric"],
                 "value": "—" if r["value"] is None else f"{r['value']:.3f}",
                 "weights": r["weights"] or "—"} for r in compared["rows"]]
        console.print(table("backbones compared (same heads, same data; random-init weights stated per row; paper "
                            "rows are published figures)", rows))
        console.print(f"compare report: {compared['markdown']}")


def ui(workdir: Annotated[Path, typer.Option(help="sources, catalog, runs, the server's database and logs")] = Path(
           "hvp-data"),
       port: Annotated[int, typer.Option(help="port of the Prefect server")] = 4200,
       watch_interval: Annotated[float, typer.Option(help="seconds between polls of the source root")] = 5.0,
       host: Annotated[str, typer.Option(help="address the server binds; beyond loopback it needs a credential "
                                              "(HVP_SERVER_AUTH=user:password)")] = "127.0.0.1") -> None:
    """The Prefect UI with every deployment ready to run: starts a local server, the `local` work pool, the `gpu`
    concurrency limit, the deployments of prefect.yaml, a worker and the dataset-arrival watcher (fixtures are
    made when the source root is empty); Ctrl-C stops them all."""
    from pipelines.ui import serve_ui

    raise typer.Exit(serve_ui(workdir, port, watch_interval, host=host))


def watch(source_root: Annotated[Path | None, typer.Option(help="folder of dataset folders (default: "
                                                           "$HVP_SOURCE_ROOT)")] = None,
          interval: Annotated[float, typer.Option(help="seconds between polls")] = 5.0) -> None:
    """Emit a `hvp.dataset.arrived` event to the Prefect server ($PREFECT_API_URL) for each dataset folder that
    appears under the source root (the `relabel-new` deployment runs on it); Ctrl-C stops. `hvp ui` runs this."""
    import threading

    from infra.settings import get_settings
    from pipelines.watch import ArrivalWatcher

    if not os.environ.get("PREFECT_API_URL"):
        console.print("[red]error:[/red] PREFECT_API_URL is not set: point it at the Prefect server "
                      "(e.g. http://127.0.0.1:4200/api), or use `hvp ui`, which runs the watcher itself")
        raise typer.Exit(2)
    root = (source_root or get_settings().source_root).resolve()
    console.print(f"watching {root} every {interval:g} s; Ctrl-C stops")
    try:
        ArrivalWatcher(root, interval).run(threading.Event())
    except KeyboardInterrupt:
        console.print("stopped")


def automations() -> None:
    """Create (or update) on the Prefect server at $PREFECT_API_URL the automation that marks flow runs without
    heartbeats Crashed after $HVP_CRASHED_AFTER_S (default 600 s); `hvp ui` does this on its own server."""
    from infra.settings import get_settings
    from pipelines.automations import ensure_crashed_runs_automation

    if not os.environ.get("PREFECT_API_URL"):
        console.print("[red]error:[/red] PREFECT_API_URL is not set: point it at the Prefect server "
                      "(e.g. http://127.0.0.1:4200/api)")
        raise typer.Exit(2)
    window = get_settings().crashed_after_s
    heartbeat = os.environ.get("PREFECT_FLOWS_HEARTBEAT_FREQUENCY")
    try:
        done = ensure_crashed_runs_automation(window, float(heartbeat) if heartbeat else None)
    except ValueError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    console.print(f"flow runs without a heartbeat for {window} s are marked Crashed ({done})")
