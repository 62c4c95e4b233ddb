"""`hvp label`, `hvp fuse` and `hvp show`: pseudo-labels of the three branches, their fusion, an overlay."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from pipelines.cli.common import CatalogOpt, PlainOpt, ProfileOpt, console, start_flows, table


def label(catalog: CatalogOpt = None,
          branch: Annotated[list[str] | None, typer.Option("--branch", help="spatial, spectral, material")] = None,
          workers: Annotated[int, typer.Option(help="images labelled at once")] = 1,
          profile: ProfileOpt = "production", plain: PlainOpt = False) -> None:
    """Label every image lacking masks for the current labeler ids, then fuse (Prefect flow unless --plain)."""
    from pipelines.params import DEFAULT_LABEL, LabelParams, PathParams, Profile

    params = LabelParams.model_validate({"branches": branch}) if branch else DEFAULT_LABEL
    paths = PathParams(catalog=catalog)
    if plain:
        from pipelines.catalogs import open_catalog
        from pipelines.profiles import resolve
        from stages.labelling.label import run_fuse, run_label

        run = resolve(Profile(profile), paths, params)
        cat = open_catalog(run.paths.catalog)
        for b in run.label.branches:
            console.print(table(f"label-{b}", [run_label(cat, run.label_config(b)).summary()]))
        rows: list[dict[str, Any]] = run_fuse(cat, run.fuse).report
    else:
        from pipelines.label import label_flow

        start_flows()
        rows = label_flow(Profile(profile), paths, params, True, workers)
    console.print(table(f"labelled {len(rows)} images", rows[:40]))


def fuse(catalog: CatalogOpt = None, profile: ProfileOpt = "production", plain: PlainOpt = False) -> None:
    """Fuse the current branch masks into pseudo-targets where missing (Prefect flow unless --plain)."""
    from pipelines.params import DEFAULT_LABEL, PathParams, Profile

    paths = PathParams(catalog=catalog)
    if plain:
        from pipelines.catalogs import open_catalog
        from pipelines.profiles import resolve
        from stages.labelling.label import run_fuse

        run = resolve(Profile(profile), paths)
        rows = run_fuse(open_catalog(run.paths.catalog), run.fuse).report
    else:
        from pipelines.label import fuse_flow

        start_flows()
        rows = fuse_flow(Profile(profile), paths, DEFAULT_LABEL)
    console.print(table(f"fused {len(rows)} images", rows[:40]))


def show(image_id: str, catalog: CatalogOpt = None,
         out: Annotated[Path | None, typer.Option(help="PNG path (default: <image id>.png here)")] = None,
         profile: ProfileOpt = "production") -> None:
    """Write an overlay PNG of one image: its RGB with each branch's masks and the fused pseudo-target."""
    from pipelines.catalogs import open_catalog
    from pipelines.params import Profile
    from pipelines.profiles import resolve
    from stages.labelling import label as stage

    run = resolve(Profile(profile))
    ids = {b: stage.cached_labeler(b, spec).labeler_id for b, spec in run.label.labelers.items()}
    path = out or Path(image_id.replace("/", "__") + ".png")
    console.print(f"wrote {stage.overlay_png(open_catalog(catalog), image_id, ids, run.label.tau, path)}")
