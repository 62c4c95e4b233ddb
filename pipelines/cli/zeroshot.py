"""`hvp zeroshot`: one of HyperFree's tuning-free tasks on the catalog's airborne scenes (no training)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pipelines.cli.common import CatalogOpt, PlainOpt, ProfileOpt, console, key_values, start_flows


def zeroshot(task: Annotated[str, typer.Argument(help="classification | one_class | target | anomaly | change | "
                                                      "segment_all | segment_point")],
             dataset: Annotated[str | None, typer.Option(help="dataset slug (default: the first holding the "
                                                              "task's annotation kind)")] = None,
             catalog: CatalogOpt = None,
             model: Annotated[str, typer.Option(help="a layout with HyperFree's mask decoder: tiny | hyperfree_b | "
                                                     "hypervision_b/l/h")] = "tiny",
             checkpoint: Annotated[str | None, typer.Option(help="weights file (default: random-init)")] = None,
             behaviour: Annotated[str, typer.Option(help="fixed | released (the released scripts' quirks)")] = "fixed",
             set_: Annotated[list[str] | None, typer.Option(
                 "--set", help="KEY=VALUE overriding a released default (JSON value), e.g. "
                               "--set area_ratio_threshold=0.001; repeat for several")] = None,
             relax: Annotated[bool, typer.Option(help="retry a prompt outside every mask at lower thresholds")] = False,
             seed: int = 0,
             out: Annotated[Path, typer.Option(help="report folder")] = Path("hvp-data/runs/zeroshot"),
             profile: ProfileOpt = "demo", plain: PlainOpt = False) -> None:
    """Run TASK on the annotated scenes of a dataset with a frozen backbone (masks and features cached in the
    catalog), beside its classical baseline and the HyperFree README's figures; writes maps, overlays, a table,
    results.parquet and report.json (Prefect `zeroshot` flow unless --plain)."""
    params = key_values(set_, "--set") or {}
    if plain:
        from pipelines.catalogs import open_catalog
        from stages.zeroshot.run import ZeroShotConfig, run_zeroshot
        from stages.zeroshot.suite import held_scenes

        cat = open_catalog(catalog)
        held, missing = held_scenes(cat, [task], {task: dataset} if dataset else None)
        if task not in held:
            raise typer.BadParameter(missing[task], param_hint="--dataset")
        result = run_zeroshot(cat, ZeroShotConfig(
            task=task, dataset=held[task], model=model, checkpoint=checkpoint, behaviour=behaviour,  # type: ignore[arg-type]
            params=params, relax=relax, seed=seed, out=str(out.resolve())))
        table, report = result.rows, str(result.report_json)
    else:
        from pipelines.params import BackboneParams, PathParams, Profile, ZeroShotParams
        from pipelines.zeroshot import zeroshot_flow

        start_flows()
        done = zeroshot_flow(Profile(profile), PathParams(catalog=catalog), BackboneParams.model_validate(
            {"model": model, "checkpoint": checkpoint or "random-init"}), ZeroShotParams.model_validate(
            {"tasks": [task], "datasets": {task: dataset} if dataset else None, "behaviour": behaviour,
             "params": {task: params} if params else None, "relax": relax, "seed": seed}),
            out_dir=str(out.resolve()))
        if not isinstance(done, dict):
            raise typer.Exit(1)
        table, report = done["table"], next(iter(done["reports"].values()), "")
    for row in table:
        console.print(f"{row.get('image_id') or '-':<32} {row['method']:<40} {row['metric']:<12} {row['value']:.4f}",
                      markup=False, highlight=False)
    console.print(f"report: {report}")
