"""The `hvp` command line: fixtures, ingest, catalog inspection, downstream features and heads, and the end-to-end
demo."""

from __future__ import annotations

import json
import os
import shutil
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

#: What `hvp demo` runs with unless the environment says otherwise: tiny models (the settings' defaults) and
#: permissive thresholds, since random-init models score every mask low.
DEMO_SETTINGS = {
    "HVP_SPATIAL_PARAMS": json.dumps({"points_per_side": 4, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}),
    "HVP_SPECTRAL_PARAMS": json.dumps({"points_per_side": 4, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0,
                                       "stride": 4, "max_objects": 4}),
    "HVP_MATERIAL_PARAMS": json.dumps({"points_per_side": 4, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}),
}

CatalogOpt = Annotated[str | None, typer.Option("--catalog", help="catalog URI (default: $HVP_CATALOG or "
                                                "./hvp-data/catalog)")]


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

        return run_ingest(str(source_dir), catalog, datasets, workers, dask_address)
    from catalog.specs import spec_for_folder
    from catalog.store import Catalog
    from stages import ingest as stage

    cat = Catalog(catalog).init()
    work = stage.plan(source_dir, cat, datasets)
    stage.record_problems(cat, work.problems)
    results = []
    with _progress() as bar:
        task = bar.add_task("ingest", total=len(work.items))
        for w in work.items:
            spec = spec_for_folder(Path(w.folder))
            assert spec is not None
            results.append(stage.ingest_item(cat, spec, stage.item_for(Path(w.folder), spec, w.primary),
                                             w.known_sha256))
            bar.advance(task)
    cat.compact()
    return stage.summarize(results, work.problems)


@catalog_app.command("list")
def catalog_list(catalog: CatalogOpt = None, as_json: Annotated[bool, typer.Option("--json")] = False,
                 dataset: str | None = None) -> None:
    """One line per catalogued image (or JSON records with --json)."""
    from catalog.store import Catalog

    df = Catalog(catalog).images(dataset)
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
    from catalog.store import Catalog

    df = Catalog(catalog).images()
    if df.empty:
        return []
    g = df.groupby("dataset").agg(images=("image_id", "count"), bands=("bands", "max"), wl_min=("wl_min", "min"),
                                  wl_max=("wl_max", "max"), rgb=("has_rgb", "sum"))
    g[["wl_min", "wl_max"]] = g[["wl_min", "wl_max"]].round(1)
    return g.reset_index().to_dict("records")


def _quarantine_rows(catalog: str | None) -> list[dict[str, Any]]:
    from catalog.store import Catalog

    q = Catalog(catalog).quarantine()
    return q[["dataset", "source_path", "field", "message", "fix"]].to_dict("records") if not q.empty else []


@catalog_app.command("show")
def catalog_show(image_id: str, catalog: CatalogOpt = None) -> None:
    """Everything the catalog knows about one image: index row, attributes, wavelengths."""
    from catalog.store import Catalog

    cat = Catalog(catalog)
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
                   checksums: Annotated[bool, typer.Option(help="re-hash every stored cube")] = True) -> None:
    """Recompute content checksums and report missing, corrupt, partial and orphan cubes; exit 1 if unhealthy."""
    from catalog.store import Catalog

    report = Catalog(catalog).verify(checksums=checksums)
    console.print_json(json.dumps(report.as_dict()))
    if not report.healthy:
        raise typer.Exit(1)


@catalog_app.command("compact")
def catalog_compact(catalog: CatalogOpt = None) -> None:
    """Merge the index and quarantine part files (safe while other writers run)."""
    from catalog.store import Catalog

    console.print(f"merged {Catalog(catalog).compact()} part files")


@app.command("label")
def label(catalog: CatalogOpt = None,
          branch: Annotated[list[str] | None, typer.Option("--branch", help="spatial, spectral, material")] = None,
          workers: Annotated[int, typer.Option(help="images labelled at once")] = 1) -> None:
    """Label every image lacking masks for the current labeler ids, then fuse (Prefect flow)."""
    from pipelines.label import run_label

    rows = run_label(catalog, branch, workers)
    console.print(_table(f"labelled {len(rows)} images", rows[:40]))


@app.command("fuse")
def fuse(catalog: CatalogOpt = None) -> None:
    """Fuse the current branch masks into pseudo-targets where missing (Prefect flow)."""
    from pipelines.label import fuse_flow

    rows = fuse_flow(catalog)
    console.print(_table(f"fused {len(rows)} images", rows[:40]))


@app.command("show")
def show(image_id: str, catalog: CatalogOpt = None,
         out: Annotated[Path | None, typer.Option(help="PNG path (default: <image id>.png here)")] = None) -> None:
    """Write an overlay PNG of one image: its RGB with each branch's masks and the fused pseudo-target."""
    from catalog.store import Catalog
    from infra.settings import get_settings
    from stages.labelling import label as stage

    ids = {b: stage.cached_labeler(b).labeler_id for b in stage.BRANCHES}
    path = out or Path(image_id.replace("/", "__") + ".png")
    console.print(f"wrote {stage.overlay_png(Catalog(catalog), image_id, ids, get_settings().fuse_tau, path)}")


@app.command("pretrain")
def pretrain(catalog: CatalogOpt = None,
             model: Annotated[str, typer.Option(help="tiny | hypervision_b | hypervision_l | hypervision_h | "
                                                    "hyperfree_b (released layouts by name)")] = "tiny",
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
    from pipelines.pretrain import pretrain_flow

    result = pretrain_flow(catalog, model, steps, str(out), batch_size, teacher_checkpoint=teacher_checkpoint,
                           student_checkpoint=init, init_strict=not non_strict, preprocessing=preprocessing,
                           nproc=nproc, resume=resume)
    _print_pretrain(result)


def _print_pretrain(result: dict[str, Any]) -> None:
    final = {k: round(v, 4) if isinstance(v, float) else v for k, v in result["final"].items()}
    console.print(f"pretrained {result['steps_done']} steps ({result['steps_per_s']:.2f} steps/s), "
                  f"student {result['student_weights'][:12]}, teacher {result['teacher_weights'][:12]}")
    console.print(f"final: {final}")
    console.print(f"checkpoint: {result['checkpoint']}  plot: {result['plot_png']}")


@app.command("demo")
def demo(workdir: Annotated[Path, typer.Option(help="where sources and the catalog go")] = Path("hvp-data"),
         plain: Annotated[bool, typer.Option(help="skip Prefect (run the stages directly)")] = False) -> None:
    """The main job end to end on fixture data with tiny random-init models: make fixtures, ingest them all, verify
    the catalog, label with the three branches, fuse, pretrain a few steps; each step is a Prefect flow on a
    temporary local server."""
    from catalog.fixtures import make_fixtures
    from catalog.store import Catalog
    from infra.settings import get_settings

    for key, value in DEMO_SETTINGS.items():  # the user's own settings win
        os.environ.setdefault(key, value)
    get_settings.cache_clear()
    sources, catalog = workdir / "sources", str(workdir / "catalog")
    written = make_fixtures(sources)
    console.print(f"[bold]1/5 fixtures[/bold]: {sum(map(len, written.values()))} images of {len(written)} "
                  f"datasets under {sources}")
    console.print("[bold]2/5 ingest[/bold] (Prefect flow on a temporary local server)" if not plain else
                  "[bold]2/5 ingest[/bold]")
    console.print(_table("ingest", _ingest(sources, catalog, None, None, None, plain)))
    console.print(_table("catalog", _summary_rows(catalog)))
    report = Catalog(catalog).verify()
    console.print(f"[bold]3/5 verify[/bold]: {report.ok} cubes ok, healthy={report.healthy}, "
                  f"orphans={len(report.orphans)}")
    if not report.healthy:
        raise typer.Exit(1)
    from pipelines.label import run_label
    from stages.labelling.label import cached_labeler

    weights = {b: cached_labeler(b).weights for b in ("spatial", "spectral", "material")}
    console.print(f"[bold]4/5 label + fuse[/bold] with tiny models, weights: {weights}")
    rows = run_label(catalog, None)
    console.print(_table(f"pseudo-labels of {len(rows)} images (random-init weights: masks show the "
                         "plumbing, not quality)" if "random-init" in weights.values() else "pseudo-labels",
                         rows[:12]))
    console.print(f"overlays: {Path(catalog) / 'reports' / 'overlays'}")
    from pipelines.pretrain import pretrain_flow

    console.print("[bold]5/5 pretrain[/bold]: tiny HyperVision, random-init student and teacher, a few steps")
    run_dir = workdir / "runs" / "pretrain-demo"
    shutil.rmtree(run_dir, ignore_errors=True)  # the demo's own previous run: start it afresh
    result = pretrain_flow(catalog, "tiny", 6, str(run_dir), 2, checkpoint_every=3)
    _print_pretrain(result)
    from model import create_model, load_checkpoint

    loaded = load_checkpoint(create_model("tiny"), Path(result["checkpoint"]) / "model.safetensors")
    console.print(f"checkpoint loads back: {len(loaded.missing)} missing, {len(loaded.unexpected)} unexpected keys")


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
            from catalog.errors import InputError

            raise InputError("--override", item, "is not KEY=VALUE", "write e.g. --override img_size=256")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _backbone_spec(checkpoint: str, model: str, overrides: list[str] | None, preprocessing: str, seed: int,
                   non_strict: bool) -> Any:
    from stages.downstream.features import BackboneSpec

    return BackboneSpec(model=model, checkpoint=checkpoint, seed=seed, overrides=_overrides(overrides),
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
    from catalog.store import Catalog
    from stages.downstream.features import compute_features, feature_images, load_backbone
    from stages.downstream.run import DEFAULT_DATASETS

    cat = Catalog(catalog)
    backbone = load_backbone(_backbone_spec(checkpoint, model, override, preprocessing, seed, non_strict), device)
    datasets = dataset or [DEFAULT_DATASETS["segmentation"], DEFAULT_DATASETS["saliency"]]
    ids, skipped = feature_images(cat, datasets, split)
    for name, why in skipped.items():
        console.print(f"[yellow]{name}: skipped[/yellow]: {why}")
    console.print(f"backbone {backbone.descriptor['model']} {backbone.descriptor['overrides'] or ''} weights "
                  f"{backbone.provenance}, preprocessing {preprocessing}: feature set {backbone.set_id}")
    with _progress() as bar:
        task = bar.add_task("features", total=len(ids))
        run = compute_features(cat, backbone, ids, batch_size, on_progress=lambda n: bar.advance(task, n))
    console.print(f"{len(run.computed)} image(s) encoded, {len(run.cached)} cache hit(s) skipped in "
                  f"{run.seconds:.1f} s (feature set {run.set_id}, catalog {cat.uri}/features)")


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
    from catalog.store import Catalog
    from stages.downstream.features import load_backbone
    from stages.downstream.run import task_spec, train_task

    backbone = load_backbone(_backbone_spec(checkpoint, model, override, preprocessing, seed, non_strict), device)
    spec = task_spec(task, backbone.descriptor["model"], backbone.img_size, dataset=dataset, steps=steps, seed=seed,
                     device=device, train_split=train_split, test_split=test_split, variant=variant)
    with _progress() as bar:
        progress = bar.add_task(f"{task} head", total=spec.train.steps)
        outcome = train_task(Catalog(catalog), backbone, spec, out, replace=replace,
                             on_step=lambda step, loss: bar.update(progress, completed=step + 1))
    row = outcome.summary()
    if outcome.skipped:
        console.print(f"inputs unchanged (fingerprint {outcome.fingerprint[:12]}): reused the result in {out}")
    console.print(f"{task} head: {outcome.trainable_parameters:,} trainable parameters (backbone frozen, weights "
                  f"{backbone.provenance})")
    _print_heads([row], f"{task}: head vs trivial baseline")
    console.print(f"report: {out / 'report.json'}  {out / 'report.md'}")


@heads_app.command("eval")
def heads_eval(run: Annotated[Path, typer.Option(help="a head's run folder (`hvp heads train --out`)")],
               catalog: CatalogOpt = None,
               split: Annotated[str | None, typer.Option(help="split to score (default: the run's test split)")] = None,
               out: Annotated[Path | None, typer.Option(help="report folder (default: RUN/eval-SPLIT)")] = None,
               device: Annotated[str, typer.Option(help="auto | cuda | cpu")] = "auto") -> None:
    """Score a trained head again (its latest checkpoint, on the backbone it was trained on) with the trivial
    baseline beside it, and write the report."""
    from catalog.store import Catalog
    from stages.downstream.run import evaluate_run

    outcome, paths = evaluate_run(Catalog(catalog), run, split, out, device)
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
        from catalog.store import Catalog
        from stages.downstream.features import load_backbone
        from stages.downstream.run import summarise, task_spec, train_task

        spec = _backbone_spec(checkpoint, model, override, preprocessing, seed, False)
        backbone = load_backbone(spec, device)
        cat = Catalog(catalog)
        outcomes = []
        for name, dataset in chosen.items():
            ts = task_spec(name, backbone.descriptor["model"], backbone.img_size, dataset=dataset, steps=steps,
                           seed=seed, device=device)
            console.print(f"[bold]{name}[/bold] on {dataset}")
            outcomes.append(train_task(cat, backbone, ts, out / name, replace=True))
        result = summarise(out, outcomes, backbone)
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
    from catalog.errors import InputError

    try:
        app()
    except (InputError, FileNotFoundError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
