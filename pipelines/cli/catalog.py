"""`hvp catalog ...`: inspect, check, repair and compact the catalog."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import typer

from pipelines.cli.common import CatalogOpt, console, table


def catalog_list(catalog: CatalogOpt = None, as_json: Annotated[bool, typer.Option("--json")] = False,
                 dataset: str | None = None) -> None:
    """One line per catalogued image (or JSON records with --json)."""
    from pipelines.catalogs import open_catalog

    df = open_catalog(catalog).images(dataset)
    if as_json:
        sys.stdout.write(df.to_json(orient="records", date_format="iso") + "\n")
        return
    cols = ["image_id", "bands", "wl_min", "wl_max", "height", "width", "dtype", "has_rgb", "split", "label_kind"]
    console.print(table(f"{len(df)} images", df[cols].to_dict("records") if not df.empty else []))


def catalog_summary(catalog: CatalogOpt = None) -> None:
    """Per-dataset image counts, band counts and wavelength ranges, plus quarantined files."""
    console.print(table("catalog", summary_rows(catalog)))
    q = quarantine_rows(catalog)
    if q:
        console.print(table("quarantine", q))


def summary_rows(catalog: str | None) -> list[dict[str, Any]]:
    """Per dataset: images, most bands, wavelength range and images with an aligned RGB."""
    from pipelines.catalogs import open_catalog

    df = open_catalog(catalog).images()
    if df.empty:
        return []
    g = df.groupby("dataset").agg(images=("image_id", "count"), bands=("bands", "max"), wl_min=("wl_min", "min"),
                                  wl_max=("wl_max", "max"), rgb=("has_rgb", "sum"))
    g[["wl_min", "wl_max"]] = g[["wl_min", "wl_max"]].round(1)
    return g.reset_index().to_dict("records")


def quarantine_rows(catalog: str | None) -> list[dict[str, Any]]:
    """The quarantined files with the field at fault and the fix."""
    from pipelines.catalogs import open_catalog

    q = open_catalog(catalog).quarantine()
    return q[["dataset", "source_path", "field", "message", "fix"]].to_dict("records") if not q.empty else []


def catalog_show(image_id: str, catalog: CatalogOpt = None) -> None:
    """Everything the catalog knows about one image: index row, attributes, wavelengths."""
    from pipelines.catalogs import open_catalog

    cat = open_catalog(catalog)
    try:
        da = cat.open(image_id)
    except KeyError as exc:
        console.print(f"[red]{exc.args[0]}[/red]")
        raise typer.Exit(1) from None
    info = {"image_id": image_id, "dims": dict(da.sizes), "dtype": str(da.dtype),
            "wavelength_nm": [round(float(w), 3) for w in da["wavelength"].values],
            "attrs": {k: v for k, v in da.attrs.items() if k != "_ARRAY_DIMENSIONS"}}
    console.print_json(json.dumps(info, default=str))


def catalog_quarantine(catalog: CatalogOpt = None) -> None:
    """Rejected source files with the field at fault and the fix."""
    rows = quarantine_rows(catalog)
    console.print(table(f"{len(rows)} quarantined", rows))


def catalog_verify(catalog: CatalogOpt = None,
                   checksums: Annotated[bool, typer.Option(help="re-hash every stored cube")] = True,
                   repair: Annotated[bool, typer.Option(help="re-ingest damaged images whose source is unchanged, "
                                                        "quarantine the others, remove stale temporaries")] = False,
                   as_json: Annotated[bool, typer.Option("--json", help="one JSON object on stdout")] = False) -> None:
    """Check every image and mask set (checksums, completeness) and report each problem with the image it
    concerns, plus orphan cubes and temporaries; never stops at a damaged image. Exit 1 if unhealthy (after the
    repair, with --repair)."""
    from pipelines.catalogs import open_catalog
    from stages.ingest.repair import repair as repair_catalog

    cat = open_catalog(catalog)
    report = cat.verify(checksums=checksums)
    out: dict[str, Any] = report.as_dict()
    if repair:
        out = {"before": out, "repairs": [r.as_dict() for r in repair_catalog(cat, report)]}
        report = cat.verify(checksums=checksums)
        out["after"] = report.as_dict()
    if as_json:
        sys.stdout.write(json.dumps(out, default=str) + "\n")
    else:
        _print_verify(out)
    if not report.healthy:
        raise typer.Exit(1)


def _print_verify(out: dict[str, Any]) -> None:
    """A person's view of a verify result: a table of problems (and of repairs) and one summary line."""
    final = out.get("after", out)
    for title, rows in (("problems found", out.get("before", out)["problems"]), ("repairs", out.get("repairs", []))):
        if rows:
            console.print(table(title, rows))
    console.print(f"{final['ok']} images ok, {len(final['problems'])} problems, {len(final['orphans'])} orphan "
                  f"cubes, {len(final['stale_temporaries'])} stale temporaries (removed by `hvp catalog compact`), "
                  f"{len(final['live_temporaries'])} writes in progress; healthy={final['healthy']}")


def catalog_compact(catalog: CatalogOpt = None) -> None:
    """Merge the index, quarantine and mask-index part files and remove temporaries of writers that are gone (safe
    while other writers run)."""
    from pipelines.catalogs import open_catalog

    cat = open_catalog(catalog)
    stale = sum(not t.alive for t in cat.storage.temporaries())
    console.print(f"merged {cat.compact()} part files, removed {stale} stale temporaries")


def catalog_gc(catalog: CatalogOpt = None,
               apply: Annotated[bool, typer.Option("--apply", help="remove what is listed (default: dry run)")] = False,
               grace_hours: Annotated[float, typer.Option(help="leave anything changed more recently alone")] = 1.0,
               json_out: Annotated[bool, typer.Option("--json", help="print JSON")] = False) -> None:
    """Remove cubes, annotations, masks, features and dead writers' temporaries that no index row references
    (never a referenced one; live writers and recent groups are left alone) and report the bytes. A dry run
    unless --apply."""
    import json

    from catalog.gc import collect_garbage
    from pipelines.catalogs import open_catalog

    report = collect_garbage(open_catalog(catalog), dry_run=not apply, grace_s=grace_hours * 3600)
    if json_out:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        console.print(report.summary(), markup=False)
