"""The `hvp` command line: fixtures, ingest, catalog inspection, downstream features and heads, and the end-to-end
demo."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

app = typer.Typer(help="HyperVision pretraining pipeline.", no_args_is_help=True, add_completion=False)
catalog_app = typer.Typer(help="Inspect and check the catalog.", no_args_is_help=True)
fixtures_app = typer.Typer(help="Tiny seeded fixtures of every dataset, in native formats.", no_args_is_help=True)
heads_app = typer.Typer(help="Task heads on the frozen backbone: train, evaluate, run all three into one report.",
                        no_args_is_help=True)
app.add_typer(catalog_app, name="catalog")
app.add_typer(fixtures_app, name="fixtures")
app.add_typer(heads_app, name="heads")
console = Console()

CatalogOpt = Annotated[str | None, typer.Option("--catalog", help="catalog URI (default: $HVP_CATALOG or "
                                                "./hvp-data/catalog)")]
ProfileOpt = Annotated[str, typer.Option("--profile", help="demo (tiny models, loose thresholds) or production "
                                         "(the settings' models, checkpoints and thresholds)")]


def _flows() -> None:
    """Before a command runs Prefect flows: start the temporary server (when none is configured) so that it dies
    with this process, even on kill -9."""
    from infra.prefect_server import start_temporary_server

    start_temporary_server()


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=False)


def _table(title: str, rows: list[dict[str, Any]]) -> Table:
    table = Table(title=title)
    for col in rows[0] if rows else []:
        table.add_column(str(col))
    for r in rows:
        table.add_row(*(str(v) for v in r.values()))
    return table


@fixtures_app.command("make")
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


@app.command("datasets")
def datasets() -> None:
    """List the built-in dataset subsets (their slug is the folder name under a source root) and, for the labelled
    downstream ones, whether they also serve pretraining, their label kind and their splits."""
    from catalog.specs import builtin_specs

    specs = builtin_specs().values()
    rows = [{"slug": s.slug, "name": s.name, "format": s.format, "bands": s.bands, "images": s.images}
            for s in specs]
    console.print(_table("built-in datasets", rows))
    console.print(_table("labelled (downstream) datasets", [
        {"slug": s.slug, "serves": " + ".join(s.roles), "labels": s.labels.kind,
         "splits": ", ".join(s.splits.names()) if s.splits else ""} for s in specs if s.labels]))


@app.command("ingest")
def ingest(source_dir: Path, catalog: CatalogOpt = None,
           dataset: Annotated[list[str] | None, typer.Option("--dataset", help="only these folders")] = None,
           workers: Annotated[int | None, typer.Option(help="local Dask cluster of N worker processes")] = None,
           dask_address: Annotated[str | None, typer.Option(help="address of a running Dask scheduler")] = None,
           plain: Annotated[bool, typer.Option(help="run the stage directly, without Prefect")] = False) -> None:
    """Ingest SOURCE_DIR (one folder per dataset) into the catalog; bad files go to quarantine."""
    summary = _ingest(source_dir, catalog, dataset, workers, dask_address, plain)
    console.print(_table("ingest", summary))


def _ingest(source_dir: Path, catalog: str | None, datasets: list[str] | None, workers: int | None,
            dask_address: str | None, plain: bool) -> list[dict[str, Any]]:
    from infra.settings import get_settings

    dask_address = dask_address or get_settings().dask_address
    if not plain:
        from pipelines.ingest import run_ingest

        _flows()
        return run_ingest(str(source_dir), catalog, datasets, workers, dask_address)
    from infra.settings import open_catalog
    from stages import ingest as stage

    cat = open_catalog(catalog).init()
    with _progress() as bar:
        task = bar.add_task("ingest", total=None)
        results, work = stage.ingest_all(cat, source_dir, datasets, on_item=lambda _: bar.advance(task))
    return stage.summarize(results, work.problems)


@catalog_app.command("list")
def catalog_list(catalog: CatalogOpt = None, as_json: Annotated[bool, typer.Option("--json")] = False,
                 dataset: str | None = None) -> None:
    """One line per catalogued image (or JSON records with --json)."""
    from infra.settings import open_catalog

    df = open_catalog(catalog).images(dataset)
    if as_json:
        sys.stdout.write(df.to_json(orient="records", date_format="iso") + "\n")
        return
    cols = ["image_id", "bands", "wl_min", "wl_max", "height", "width", "dtype", "has_rgb", "split", "label_kind"]
    console.print(_table(f"{len(df)} images", df[cols].to_dict("records") if not df.empty else []))


@catalog_app.command("summary")
def catalog_summary(catalog: CatalogOpt = None) -> None:
    """Per-dataset image counts, band counts and wavelength ranges, plus quarantined files."""
    console.print(_table("catalog", _summary_rows(catalog)))
    q = _quarantine_rows(catalog)
    if q:
        console.print(_table("quarantine", q))


def _summary_rows(catalog: str | None) -> list[dict[str, Any]]:
    from infra.settings import open_catalog

    df = open_catalog(catalog).images()
    if df.empty:
        return []
    g = df.groupby("dataset").agg(images=("image_id", "count"), bands=("bands", "max"), wl_min=("wl_min", "min"),
                                  wl_max=("wl_max", "max"), rgb=("has_rgb", "sum"))
    g[["wl_min", "wl_max"]] = g[["wl_min", "wl_max"]].round(1)
    return g.reset_index().to_dict("records")


def _quarantine_rows(catalog: str | None) -> list[dict[str, Any]]:
    from infra.settings import open_catalog

    q = open_catalog(catalog).quarantine()
    return q[["dataset", "source_path", "field", "message", "fix"]].to_dict("records") if not q.empty else []


@catalog_app.command("show")
def catalog_show(image_id: str, catalog: CatalogOpt = None) -> None:
    """Everything the catalog knows about one image: index row, attributes, wavelengths."""
    from infra.settings import open_catalog

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


@catalog_app.command("quarantine")
def catalog_quarantine(catalog: CatalogOpt = None) -> None:
    """Rejected source files with the field at fault and the fix."""
    rows = _quarantine_rows(catalog)
    console.print(_table(f"{len(rows)} quarantined", rows))


@catalog_app.command("verify")
def catalog_verify(catalog: CatalogOpt = None,
                   checksums: Annotated[bool, typer.Option(help="re-hash every stored cube")] = True,
                   repair: Annotated[bool, typer.Option(help="re-ingest damaged images whose source is unchanged, "
                                                        "quarantine the others, remove stale temporaries")] = False,
                   as_json: Annotated[bool, typer.Option("--json", help="one JSON object on stdout")] = False) -> None:
    """Check every image and mask set (checksums, completeness) and report each problem with the image it
    concerns, plus orphan cubes and temporaries; never stops at a damaged image. Exit 1 if unhealthy (after the
    repair, with --repair)."""
    from infra.settings import open_catalog
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
            console.print(_table(title, rows))
    console.print(f"{final['ok']} images ok, {len(final['problems'])} problems, {len(final['orphans'])} orphan "
                  f"cubes, {len(final['stale_temporaries'])} stale temporaries (removed by `hvp catalog compact`), "
                  f"{len(final['live_temporaries'])} writes in progress; healthy={final['healthy']}")


@catalog_app.command("compact")
def catalog_compact(catalog: CatalogOpt = None) -> None:
    """Merge the index, quarantine and mask-index part files and remove temporaries of writers that are gone (safe
    while other writers run)."""
    from infra.settings import open_catalog

    cat = open_catalog(catalog)
    stale = sum(not t.alive for t in cat.storage.temporaries())
    console.print(f"merged {cat.compact()} part files, removed {stale} stale temporaries")


@app.command("label")
def label(catalog: CatalogOpt = None,
          branch: Annotated[list[str] | None, typer.Option("--branch", help="spatial, spectral, material")] = None,
          workers: Annotated[int, typer.Option(help="images labelled at once")] = 1,
          profile: ProfileOpt = "production") -> None:
    """Label every image lacking masks for the current labeler ids, then fuse (Prefect flow)."""
    from pipelines.label import run_label
    from pipelines.params import Profile

    _flows()
    rows = run_label(catalog, branch, workers, Profile(profile))
    console.print(_table(f"labelled {len(rows)} images", rows[:40]))


@app.command("fuse")
def fuse(catalog: CatalogOpt = None, profile: ProfileOpt = "production") -> None:
    """Fuse the current branch masks into pseudo-targets where missing (Prefect flow)."""
    from pipelines.label import fuse_flow
    from pipelines.params import Profile

    _flows()
    rows = fuse_flow(catalog, profile=Profile(profile))
    console.print(_table(f"fused {len(rows)} images", list(rows or [])[:40]))  # type: ignore[arg-type]


@app.command("show")
def show(image_id: str, catalog: CatalogOpt = None,
         out: Annotated[Path | None, typer.Option(help="PNG path (default: <image id>.png here)")] = None,
         profile: ProfileOpt = "production") -> None:
    """Write an overlay PNG of one image: its RGB with each branch's masks and the fused pseudo-target."""
    from infra.settings import open_catalog
    from pipelines.params import DEFAULT_LABEL, Profile, resolve_label
    from stages.labelling import label as stage

    resolved = resolve_label(Profile(profile), DEFAULT_LABEL)
    ids = {b: stage.cached_labeler(b, c).labeler_id for b, c in resolved.configs.items()}
    path = out or Path(image_id.replace("/", "__") + ".png")
    console.print(f"wrote {stage.overlay_png(open_catalog(catalog), image_id, ids, resolved.tau, path)}")


@app.command("pretrain")
def pretrain(catalog: CatalogOpt = None,
             model: Annotated[str, typer.Option(help="registry model name (`hvp models`): tiny, or a released "
                                                    "layout by name (hypervision_b/l/h, hyperfree_b)")] = "tiny",
             steps: Annotated[int, typer.Option(help="optimizer steps")] = 1000,
             out: Annotated[Path, typer.Option(help="run folder (config, metrics, checkpoints)")] = Path(
                 "hvp-data/runs/pretrain"),
             batch_size: int = 4,
             nproc: Annotated[int | None, typer.Option(help="processes under torchrun (default: GPUs, or 1)")] = None,
             teacher_checkpoint: Annotated[str | None, typer.Option(help="local RGB teacher weights")] = None,
             init: Annotated[str | None, typer.Option(
                 "--init", "--student-checkpoint",
                 help="start from these weights: a released HyperVision checkpoint of --model's layout or any "
                      "compatible .pth/.safetensors, loaded strictly")] = None,
             non_strict: Annotated[bool, typer.Option(
                 "--non-strict", help="load --init even where keys or shapes differ; lists what is dropped or "
                                      "resized")] = False,
             preprocessing: Annotated[str, typer.Option(
                 help="preprocessing contract: released (as the released checkpoints) | crop_max")] = "released",
             resume: Annotated[bool, typer.Option(help="continue the run in OUT")] = False) -> None:
    """Pretrain the HyperVision backbone on the fused pseudo-targets (Prefect flow; torchrun when nproc > 1)."""
    from model.registry import resolve_name
    from pipelines.params import ModelName, Preprocessing
    from pipelines.pretrain import pretrain_flow

    try:
        name = ModelName(resolve_name(model))
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--model") from None
    _flows()
    result = pretrain_flow(catalog, name, steps, str(out.resolve()), batch_size, teacher_checkpoint=teacher_checkpoint,
                           student_checkpoint=init, init_strict=not non_strict,
                           preprocessing=Preprocessing(preprocessing), nproc=nproc, resume=resume)
    _print_pretrain(result)  # type: ignore[arg-type]


@app.command("models")
def models() -> None:
    """The registry's model names (what `--model` and the UI's model fields accept)."""
    from model.registry import list_models

    console.print("\n".join(list_models()))


def _print_pretrain(result: dict[str, Any]) -> None:
    final = {k: round(v, 4) if isinstance(v, float) else v for k, v in result["final"].items()}
    console.print(f"pretrained {result['steps_done']} steps ({result['steps_per_s']:.2f} steps/s), "
                  f"student {result['student_weights'][:12]}, teacher {result['teacher_weights'][:12]}")
    console.print(f"final: {final}")
    console.print(f"checkpoint: {result['checkpoint']}  plot: {result['plot_png']}")


@app.command("demo")
def demo(workdir: Annotated[Path, typer.Option(help="where sources, the catalog and runs go")] = Path("hvp-data"),
         plain: Annotated[bool, typer.Option(help="ingest without Prefect first (the DAG's ingest then skips)")
                          ] = False) -> None:
    """The main job end to end on fixture data with tiny random-init models: make fixtures, then run the
    `hypervision` flow (ingest, label with the three branches, fuse, pretrain a few steps, cache the pretrained
    backbone's features, train and score the three task heads) with the demo profile on
    a temporary local server, exactly as the UI's `hypervision` deployment does; stages with unchanged inputs
    skip."""
    from catalog.fixtures import make_fixtures
    from infra.settings import open_catalog
    from pipelines.hypervision import hypervision_flow
    from pipelines.params import PathParams, Profile

    workdir = workdir.resolve()
    _flows()
    sources, catalog = workdir / "sources", str(workdir / "catalog")
    written = make_fixtures(sources)
    console.print(f"[bold]fixtures[/bold]: {sum(map(len, written.values()))} images of {len(written)} "
                  f"datasets under {sources}")
    if plain:
        console.print(_table("ingest (plain)", _ingest(sources, catalog, None, None, None, True)))
    console.print("[bold]hypervision[/bold] flow, profile demo (tiny random-init models, loose thresholds): "
                  "ingest -> label spatial, spectral, material -> fuse -> pretrain -> features -> heads")
    out = hypervision_flow(Profile.demo, PathParams(source_root=str(sources), catalog=catalog,
                                                    runs=str(workdir / "runs")))
    console.print(_table("stages", out["stages"]))
    console.print(_table("catalog", _summary_rows(catalog)))
    report = open_catalog(catalog).verify()
    console.print(f"[bold]verify[/bold]: {report.ok} cubes ok, healthy={report.healthy}, "
                  f"orphans={len(report.orphans)}")
    if not report.healthy:
        raise typer.Exit(1)
    branches = [v for k, v in out["outputs"].items() if k.startswith("label-")]
    console.print(_table("labelling (random-init weights: masks show the plumbing, not quality)", branches))
    fused = out["outputs"]["fuse"]
    if fused:
        console.print(_table(f"pseudo-labels of {len(fused)} images", fused[:12]))
    console.print(f"overlays: {Path(catalog) / 'reports' / 'overlays'}")
    result = out["outputs"]["pretrain"]
    _print_pretrain(result)
    from model import create_model, load_checkpoint

    loaded = load_checkpoint(create_model("tiny"), Path(result["checkpoint"]) / "model.safetensors")
    console.print(f"checkpoint loads back: {len(loaded.missing)} missing, {len(loaded.unexpected)} unexpected keys")
    heads = out["outputs"].get("heads")
    if heads:
        _print_heads(heads["table"], "heads on the frozen pretrained backbone vs trivial baselines (random-init "
                                     "student and teacher pretrained a few steps: the figures show the plumbing)")
        console.print(f"report: {heads['report']}  ({heads['markdown']})")


@app.command("ui")
def ui(workdir: Annotated[Path, typer.Option(help="sources, catalog, runs, the server's database and logs")] = Path(
           "hvp-data"),
       port: Annotated[int, typer.Option(help="port of the Prefect server on 127.0.0.1")] = 4200,
       watch_interval: Annotated[float, typer.Option(help="seconds between polls of the source root")] = 5.0) -> None:
    """The Prefect UI with every deployment ready to run: starts a local server, the `local` work pool, the `gpu`
    concurrency limit, the deployments of prefect.yaml, a worker and the dataset-arrival watcher (fixtures are
    made when the source root is empty); Ctrl-C stops them all."""
    from pipelines.ui import serve_ui

    raise typer.Exit(serve_ui(workdir, port, watch_interval))


@app.command("watch")
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


# ------------------------------------------------------------------------------------------------ downstream
CheckpointOpt = Annotated[str, typer.Option(help="backbone weights: a .safetensors/.pth file, a pretraining checkpoint "
                                            "or run folder (its latest checkpoint), or random-init")]
ModelOpt = Annotated[str, typer.Option(help="registry layout: tiny | hypervision_b | hypervision_l | hypervision_h | "
                                       "hyperfree_b")]
OverrideOpt = Annotated[list[str] | None, typer.Option(
    "--override", help="model override KEY=VALUE (JSON value), e.g. img_size=256; repeat for several "
                       "(default: the model's downstream defaults, img_size=128 for tiny)")]
PreprocessingOpt = Annotated[str, typer.Option(help="preprocessing contract: released | crop_max")]


def _overrides(items: list[str] | None) -> dict[str, Any] | None:
    """`KEY=VALUE` options as a dict (values parsed as JSON where they are JSON), or None when none are given."""
    if not items:
        return None
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            from infra.errors import InputError

            raise InputError("--override", item, "is not KEY=VALUE", "write e.g. --override img_size=256")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _backbone_config(checkpoint: str, model: str, overrides: list[str] | None, preprocessing: str, seed: int,
                     non_strict: bool) -> Any:
    """The frozen backbone of the features and heads commands (a stages.downstream.runners.BackboneConfig)."""
    from stages.downstream.runners import BackboneConfig

    return BackboneConfig(model=model, checkpoint=checkpoint, seed=seed, overrides=_overrides(overrides),
                          preprocessing=preprocessing, strict=not non_strict)


def _print_heads(rows: list[dict[str, Any]], title: str) -> None:
    """Head vs baseline per task on the primary metric, with the head's size, steps and time (fits 80 columns)."""
    from rich import box

    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1), collapse_padding=True)
    for name in ("task", "dataset", "metric", "head", "baseline", "margin", "params"):
        table.add_column(name, no_wrap=True)
    for r in rows:
        table.add_row(r["task"], r["dataset"], r["metric"], f"{r['head']:.3f}", f"{r['baseline']:.3f}",
                      f"{r['margin']:+.3f}", f"{r['trainable_parameters']:,}")
    console.print(table)
    for r in rows:
        console.print(f"{r['task']}: {r['steps']} steps, {r['seconds']:.1f} s, {r['train_items']} train / "
                      f"{r['test_items']} test items" + (" (reused: inputs unchanged)" if r["reused"] else ""))


@app.command("features")
def features(catalog: CatalogOpt = None, checkpoint: CheckpointOpt = "random-init", model: ModelOpt = "tiny",
             dataset: Annotated[list[str] | None, typer.Option(
                 "--dataset", help="labelled dataset slug; repeat for several (default: the paper's segmentation "
                                   "and saliency benchmarks)")] = None,
             split: Annotated[list[str] | None, typer.Option("--split", help="only these splits")] = None,
             preprocessing: PreprocessingOpt = "released", override: OverrideOpt = None,
             seed: Annotated[int, typer.Option(help="seed of random-init weights")] = 0,
             batch_size: Annotated[int, typer.Option(help="images per forward pass")] = 8,
             non_strict: Annotated[bool, typer.Option("--non-strict", help="load a checkpoint whose keys or shapes "
                                                      "differ (lists what is dropped)")] = False,
             device: Annotated[str, typer.Option(help="auto | cuda | cpu")] = "auto") -> None:
    """Compute the frozen backbone's multi-scale features of labelled images once and cache them in the catalog
    (per checkpoint sha256 or random-init + seed, model and overrides, preprocessing, image); cached images are
    skipped. Tracking datasets are left out: the tracker encodes its search crops on the fly."""
    from infra.settings import open_catalog
    from stages.downstream.features import load_backbone
    from stages.downstream.runners import FeaturesConfig, feature_datasets, feature_images, run_features

    cat = open_catalog(catalog)
    config = FeaturesConfig.model_validate({
        "backbone": _backbone_config(checkpoint, model, override, preprocessing, seed, non_strict),
        "datasets": dataset or [], "splits": split, "batch_size": batch_size, "device": device})
    backbone = load_backbone(config.backbone.to_spec(), device)
    ids, skipped = feature_images(cat, config.datasets or feature_datasets(), split)
    for name, why in skipped.items():
        console.print(f"[yellow]{name}: skipped[/yellow]: {why}")
    console.print(f"backbone {backbone.descriptor['model']} {backbone.descriptor['overrides'] or ''} weights "
                  f"{backbone.provenance}, preprocessing {preprocessing}: feature set {backbone.set_id}")
    with _progress() as bar:
        task = bar.add_task("features", total=len(ids))
        run = run_features(cat, config, backbone=backbone, on_progress=lambda n: bar.advance(task, n))
    seconds = sum(r["seconds"] for r in run.rows)
    console.print(f"{run.computed} image(s) encoded, {run.cached} cache hit(s) skipped in {seconds:.1f} s "
                  f"(feature set {run.set_id}, catalog {cat.uri}/features)")


TaskArg = Annotated[str, typer.Argument(help="segmentation | saliency | tracking")]


@heads_app.command("train")
def heads_train(task: TaskArg, out: Annotated[Path, typer.Option(help="the head's run folder")],
                dataset: Annotated[str | None, typer.Option(help="labelled dataset slug (default: the paper's "
                                                            "benchmark of the task)")] = None,
                catalog: CatalogOpt = None, checkpoint: CheckpointOpt = "random-init", model: ModelOpt = "tiny",
                preprocessing: PreprocessingOpt = "released", override: OverrideOpt = None,
                steps: Annotated[int | None, typer.Option(help="training steps (default: by model size)")] = None,
                train_split: str = "train", test_split: str = "test",
                variant: Annotated[str | None, typer.Option(help="label variant, e.g. hs3bench")] = None,
                seed: Annotated[int, typer.Option(help="seed of the head (and of random-init weights)")] = 0,
                non_strict: Annotated[bool, typer.Option("--non-strict")] = False,
                replace: Annotated[bool, typer.Option(help="start over a run of other inputs in OUT")] = False,
                device: Annotated[str, typer.Option(help="auto | cuda | cpu")] = "auto") -> None:
    """Train TASK's head on the frozen backbone (features from the catalog's cache, computed where missing), score
    it on the test split beside the trivial baseline and write the report into OUT. Unchanged inputs reuse OUT's
    result; an interrupted run resumes."""
    from infra.settings import open_catalog
    from pipelines.params import head_size_for
    from stages.downstream.runners import HeadsConfig, TaskChoice, run_heads

    config = HeadsConfig.model_validate({
        "out_dir": str(out), "backbone": _backbone_config(checkpoint, model, override, preprocessing, seed, non_strict),
        "tasks": [TaskChoice(task=task, dataset=dataset, train_split=train_split, test_split=test_split,
                             variant=variant)],
        "head_size": head_size_for(model), "steps": steps, "seed": seed, "device": device, "replace": replace,
        "folder_per_task": False})
    with _progress() as bar:
        progress = bar.add_task(f"{task} head", total=None)
        result = run_heads(open_catalog(catalog), config, on_step=lambda spec, step, loss: bar.update(
            progress, total=spec.train.steps, completed=step + 1))
    outcome = result.outcomes[0]
    if outcome.skipped:
        console.print(f"inputs unchanged (fingerprint {outcome.fingerprint[:12]}): reused the result in {out}")
    console.print(f"{task} head: {outcome.trainable_parameters:,} trainable parameters (backbone frozen, weights "
                  f"{result.weights})")
    _print_heads(result.table, f"{task}: head vs trivial baseline")
    console.print(f"report: {out / 'report.json'}  {out / 'report.md'}")


@heads_app.command("eval")
def heads_eval(run: Annotated[Path, typer.Option(help="a head's run folder (`hvp heads train --out`)")],
               catalog: CatalogOpt = None,
               split: Annotated[str | None, typer.Option(help="split to score (default: the run's test split)")] = None,
               out: Annotated[Path | None, typer.Option(help="report folder (default: RUN/eval-SPLIT)")] = None,
               device: Annotated[str, typer.Option(help="auto | cuda | cpu")] = "auto") -> None:
    """Score a trained head again (its latest checkpoint, on the backbone it was trained on) with the trivial
    baseline beside it, and write the report."""
    from infra.settings import open_catalog
    from stages.downstream.heads import evaluate_run

    outcome, paths = evaluate_run(open_catalog(catalog), run, split, out, device)
    _print_heads([outcome.summary()], f"{outcome.report.task}: head vs trivial baseline")
    console.print(f"report: {paths.json}  {paths.markdown}")


@heads_app.command("run-all")
def heads_run_all(out: Annotated[Path, typer.Option(help="report folder, with one run folder per task")] = Path(
                      "hvp-data/runs/downstream"),
                  catalog: CatalogOpt = None, checkpoint: CheckpointOpt = "random-init", model: ModelOpt = "tiny",
                  preprocessing: PreprocessingOpt = "released", override: OverrideOpt = None,
                  segmentation: Annotated[str, typer.Option(help="segmentation dataset")] = "hsi-drive-v2-0",
                  saliency: Annotated[str, typer.Option(help="salient-object dataset")] = "hssod",
                  tracking: Annotated[str, typer.Option(help="tracking dataset")] = "hot-2023-vis",
                  task: Annotated[list[str] | None, typer.Option(
                      "--task", help="only these tasks (default: all three)")] = None,
                  steps: Annotated[int | None, typer.Option(help="training steps per head")] = None,
                  seed: int = 0,
                  device: Annotated[str, typer.Option(help="auto | cuda | cpu")] = "auto",
                  plain: Annotated[bool, typer.Option(help="run the stages directly, without Prefect")] = False
                  ) -> None:
    """Features, then every head, then one report (Prefect `downstream` flow unless --plain); prints the report's
    path and the head-vs-baseline table."""
    datasets = {"segmentation": segmentation, "saliency": saliency, "tracking": tracking}
    chosen = {t: datasets[t] for t in (task or list(datasets))}
    if plain:
        from infra.settings import open_catalog
        from pipelines.params import head_size_for
        from stages.downstream.runners import HeadsConfig, TaskChoice, run_heads

        config = HeadsConfig.model_validate({
            "out_dir": str(out), "backbone": _backbone_config(checkpoint, model, override, preprocessing, seed, False),
            "tasks": [TaskChoice(task=t, dataset=d) for t, d in chosen.items()], "head_size": head_size_for(model),
            "steps": steps, "seed": seed, "device": device, "replace": True})
        console.print("[bold]" + ", ".join(f"{t} on {d}" for t, d in chosen.items()) + "[/bold]")
        result = run_heads(open_catalog(catalog), config)
        rows, report = result.table, str(result.report.json)
    else:
        from pipelines.downstream import downstream_flow

        done = downstream_flow(catalog, checkpoint, model, preprocessing, chosen, str(out), steps,
                               _overrides(override), seed, device)
        rows, report = done["table"], done["report"]
    _print_heads(rows, "downstream: head vs trivial baseline (primary metric)")
    console.print(f"report: {report}")


def main() -> None:
    """The `hvp` entry point: bad input and missing files print one clear line (file, field, fix), not a
    traceback, and exit with status 2."""
    from infra.errors import InputError

    try:
        app()
    except (InputError, FileNotFoundError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
