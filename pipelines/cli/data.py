"""`hvp fixtures make`, `hvp datasets` and `hvp ingest`: source data into the catalog."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from pipelines.cli.common import CatalogOpt, PlainOpt, console, progress, start_flows, table


def fixtures_make(out: Path, seed: int = 0,
                  broken: Annotated[bool, typer.Option(help="write the broken-file fixture set instead")] = False
                  ) -> None:
    """Write tiny seeded fixtures of every built-in dataset, labelled downstream ones included (plus two user
    dataset.yaml examples, one with labels and splits), into OUT."""
    from catalog.fixtures import make_fixtures

    if broken:
        from catalog.fixtures.broken import make_broken_fixtures

        cases = make_broken_fixtures(out)
        console.print(f"wrote {len(cases)} broken-input cases under {out}")
        return
    written = make_fixtures(out, seed=seed)
    n = sum(len(v) for v in written.values())
    console.print(f"wrote {n} images of {len(written)} datasets under {out}")


def datasets() -> None:
    """List the built-in dataset subsets (their slug is the folder name under a source root) and, for the labelled
    downstream ones, whether they also serve pretraining, their label kind and their splits."""
    from catalog.specs import builtin_specs

    specs = builtin_specs().values()
    rows = [{"slug": s.slug, "name": s.name, "format": s.format, "bands": s.bands, "images": s.images}
            for s in specs]
    console.print(table("built-in datasets", rows))
    console.print(table("labelled (downstream) datasets", [
        {"slug": s.slug, "serves": " + ".join(s.roles), "labels": s.labels.kind,
         "splits": ", ".join(s.splits.names()) if s.splits else ""} for s in specs if s.labels]))


def ingest(source_dir: Path, catalog: CatalogOpt = None,
           dataset: Annotated[list[str] | None, typer.Option("--dataset", help="only these folders")] = None,
           workers: Annotated[int | None, typer.Option(help="local Dask cluster of N worker processes")] = None,
           dask_address: Annotated[str | None, typer.Option(help="address of a running Dask scheduler")] = None,
           plain: PlainOpt = False) -> None:
    """Ingest SOURCE_DIR (one folder per dataset) into the catalog; bad files go to quarantine."""
    console.print(table("ingest", run_ingest(source_dir, catalog, dataset, workers, dask_address, plain)))


def run_ingest(source_dir: Path, catalog: str | None, datasets: list[str] | None = None, workers: int | None = None,
               dask_address: str | None = None, plain: bool = False) -> list[dict[str, Any]]:
    """The ingest stage as the CLI runs it: its runner with a progress bar (``plain``), else the ingest flow on
    threads, a local Dask cluster of ``workers`` processes or a running cluster; returns per-dataset counts."""
    from infra.settings import get_settings
    from pipelines.catalogs import open_catalog
    from pipelines.params import PathParams, resolve_paths

    paths = PathParams(source_root=str(source_dir), catalog=catalog, datasets=datasets)
    if not plain:
        from pipelines.ingest import ingest_flow

        start_flows()
        summary: list[dict[str, Any]] = ingest_flow(paths, workers or 1,  # type: ignore[assignment]
                                                    dask_address or get_settings().dask_address)
        return summary
    from stages.ingest import IngestConfig
    from stages.ingest import run_ingest as runner

    p = resolve_paths(paths)
    with progress() as bar:
        task = bar.add_task("ingest", total=None)
        result = runner(open_catalog(p.catalog).init(), IngestConfig(source_root=p.source_root, datasets=p.datasets),
                        on_item=lambda _: bar.advance(task))
    return result.summary
