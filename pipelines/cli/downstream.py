"""`hvp features` and `hvp heads ...`: the frozen backbone's cached features and the task heads on them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from pipelines.cli.common import CatalogOpt, console, key_values, print_heads, progress

CheckpointOpt = Annotated[str, typer.Option(help="backbone weights: a .safetensors/.pth file, a pretraining checkpoint "
                                            "or run folder (its latest checkpoint), or random-init")]
ModelOpt = Annotated[str, typer.Option(help="registry layout: tiny | hypervision_b | hypervision_l | hypervision_h | "
                                       "hyperfree_b | hypersigma_tiny | hypersigma_b | hypersigma_l | hypersigma_h")]
OverrideOpt = Annotated[list[str] | None, typer.Option(
    "--override", help="model override KEY=VALUE (JSON value), e.g. img_size=256; repeat for several "
                       "(default: the model's downstream defaults, img_size=128 for tiny)")]
PreprocessingOpt = Annotated[str | None, typer.Option(
    help="preprocessing contract: released | crop_max (HyperFree layouts), hypersigma (HyperSIGMA layouts); default: "
         "the model family's")]


def backbone_config(checkpoint: str, model: str, overrides: list[str] | None, preprocessing: str | None, seed: int,
                    non_strict: bool) -> Any:
    """The frozen backbone the options name (a stages.downstream.runners.BackboneConfig)."""
    from stages.downstream.runners import BackboneConfig

    return BackboneConfig(model=model, checkpoint=checkpoint, seed=seed,
                          overrides=key_values(overrides, "--override"), preprocessing=preprocessing,
                          strict=not non_strict)


def features(catalog: CatalogOpt = None, checkpoint: CheckpointOpt = "random-init", model: ModelOpt = "tiny",
             dataset: Annotated[list[str] | None, typer.Option(
                 "--dataset", help="labelled dataset slug; repeat for several (default: the paper's segmentation "
                                   "and saliency benchmarks)")] = None,
             split: Annotated[list[str] | None, typer.Option("--split", help="only these splits")] = None,
             preprocessing: PreprocessingOpt = None, override: OverrideOpt = None,
             seed: Annotated[int, typer.Option(help="seed of random-init weights")] = 0,
             batch_size: Annotated[int, typer.Option(help="images per forward pass")] = 8,
             non_strict: Annotated[bool, typer.Option("--non-strict", help="load a checkpoint whose keys or shapes "
                                                      "differ (lists what is dropped)")] = False,
             device: Annotated[str, typer.Option(help="auto | cuda | cpu")] = "auto") -> None:
    """Compute the frozen backbone's multi-scale features of labelled images once and cache them in the catalog
    (per checkpoint sha256 or random-init + seed, model and overrides, preprocessing, image); cached images are
    skipped. Tracking datasets are left out: the tracker encodes its search crops on the fly."""
    from pipelines.catalogs import open_catalog
    from stages.downstream.features import load_backbone
    from stages.downstream.runners import FeaturesConfig, feature_datasets, feature_images, run_features

    cat = open_catalog(catalog)
    config = FeaturesConfig.model_validate({
        "backbone": backbone_config(checkpoint, model, override, preprocessing, seed, non_strict),
        "datasets": dataset or [], "splits": split, "batch_size": batch_size, "device": device})
    backbone = load_backbone(config.backbone.to_spec(), device)
    ids, skipped = feature_images(cat, config.datasets or feature_datasets(), split)
    for name, why in skipped.items():
        console.print(f"[yellow]{name}: skipped[/yellow]: {why}")
    console.print(f"backbone {backbone.descriptor['model']} {backbone.descriptor['overrides'] or ''} weights "
                  f"{backbone.provenance}, preprocessing {backbone.spec.contract}: feature set {backbone.set_id}")
    with progress() as bar:
        task = bar.add_task("features", total=len(ids))
        run = run_features(cat, config, backbone=backbone, on_progress=lambda n: bar.advance(task, n))
    seconds = sum(r["seconds"] for r in run.rows)
    console.print(f"{run.computed} image(s) encoded, {run.cached} cache hit(s) skipped in {seconds:.1f} s "
                  f"(feature set {run.set_id}, catalog {cat.uri}/features)")


TaskArg = Annotated[str, typer.Argument(help="a registered task: segmentation | saliency | tracking | "
                                               "airborne_classification")]
TuneOpt = Annotated[str, typer.Option(help="head: the backbone stays frozen; full: it is fine-tuned with the head "
                                           "(tasks that support it, e.g. airborne_classification)")]


def heads_train(task: TaskArg, out: Annotated[Path, typer.Option(help="the head's run folder")],
                dataset: Annotated[str | None, typer.Option(help="labelled dataset slug (default: the paper's "
                                                            "benchmark of the task)")] = None,
                catalog: CatalogOpt = None, checkpoint: CheckpointOpt = "random-init", model: ModelOpt = "tiny",
                preprocessing: PreprocessingOpt = None, override: OverrideOpt = None,
                steps: Annotated[int | None, typer.Option(help="training steps (default: by model size)")] = None,
                train_split: str = "train", test_split: str = "test",
                variant: Annotated[str | None, typer.Option(help="label variant, e.g. hs3bench")] = None,
                seed: Annotated[int, typer.Option(help="seed of the head (and of random-init weights)")] = 0,
                non_strict: Annotated[bool, typer.Option("--non-strict")] = False,
                replace: Annotated[bool, typer.Option(help="start over a run of other inputs in OUT")] = False,
                tune: TuneOpt = "head",
                device: Annotated[str, typer.Option(help="auto | cuda | cpu")] = "auto") -> None:
    """Train TASK's head on the frozen backbone (features from the catalog's cache, computed where missing), score
    it on the test split beside the trivial baseline and write the report into OUT. Unchanged inputs reuse OUT's
    result; an interrupted run resumes."""
    from pipelines.catalogs import open_catalog
    from pipelines.params import head_size_for
    from stages.downstream.runners import HeadsConfig, TaskChoice, run_heads

    config = HeadsConfig.model_validate({
        "out_dir": str(out), "backbone": backbone_config(checkpoint, model, override, preprocessing, seed, non_strict),
        "tasks": [TaskChoice(task=task, dataset=dataset, train_split=train_split, test_split=test_split,
                             variant=variant)],
        "head_size": head_size_for(model), "steps": steps, "seed": seed, "device": device, "replace": replace,
        "folder_per_task": False, "tune": tune})
    with progress() as bar:
        bar_task = bar.add_task(f"{task} head", total=None)
        result = run_heads(open_catalog(catalog), config, on_step=lambda spec, step, loss: bar.update(
            bar_task, total=spec.train.steps, completed=step + 1))
    outcome = result.outcomes[0]
    if outcome.skipped:
        console.print(f"inputs unchanged (fingerprint {outcome.fingerprint[:12]}): reused the result in {out}")
    state = "backbone frozen" if tune == "head" else "backbone fine-tuned with it"
    console.print(f"{task} head: {outcome.trainable_parameters:,} trainable parameters ({state}, weights "
                  f"{result.weights})")
    print_heads(result.table, f"{task}: head vs trivial baseline")
    console.print(f"report: {out / 'report.json'}  {out / 'report.md'}")


def heads_eval(run: Annotated[Path, typer.Option(help="a head's run folder (`hvp heads train --out`)")],
               catalog: CatalogOpt = None,
               split: Annotated[str | None, typer.Option(help="split to score (default: the run's test split)")] = None,
               out: Annotated[Path | None, typer.Option(help="report folder (default: RUN/eval-SPLIT)")] = None,
               device: Annotated[str, typer.Option(help="auto | cuda | cpu")] = "auto") -> None:
    """Score a trained head again (its latest checkpoint, on the backbone it was trained on) with the trivial
    baseline beside it, and write the report."""
    from pipelines.catalogs import open_catalog
    from stages.downstream.heads import evaluate_run

    outcome, paths = evaluate_run(open_catalog(catalog), run, split, out, device)
    print_heads([outcome.summary()], f"{outcome.report.task}: head vs trivial baseline")
    console.print(f"report: {paths.json}  {paths.markdown}")


def heads_run_all(out: Annotated[Path, typer.Option(help="report folder, with one run folder per task")] = Path(
                      "hvp-data/runs/downstream"),
                  catalog: CatalogOpt = None, checkpoint: CheckpointOpt = "random-init", model: ModelOpt = "tiny",
                  preprocessing: PreprocessingOpt = None, override: OverrideOpt = None,
                  benchmark: Annotated[list[str] | None, typer.Option(
                      "--benchmark", help="TASK=DATASET: the labelled dataset of a task (default: the task's "
                                          "benchmark in the task registry); repeat for several")] = None,
                  task: Annotated[list[str] | None, typer.Option(
                      "--task", help="only these tasks (default: every registered task)")] = None,
                  steps: Annotated[int | None, typer.Option(help="training steps per head")] = None,
                  seed: int = 0,
                  tune: TuneOpt = "head",
                  device: Annotated[str, typer.Option(help="auto | cuda | cpu")] = "auto",
                  plain: Annotated[bool, typer.Option(help="run the stages directly, without Prefect")] = False
                  ) -> None:
    """Features, then every head, then one report (Prefect `downstream` flow unless --plain); prints the report's
    path and the head-vs-baseline table."""
    from stages.downstream.tasks import TASKS, ordered_tasks

    datasets = {name: TASKS.get(name).default_dataset for name in ordered_tasks()}
    for name, dataset in (key_values(benchmark, "--benchmark") or {}).items():
        TASKS.get(name)  # an unknown task names the registered ones
        datasets[name] = str(dataset)
    chosen = {t: datasets[TASKS.get(t).name] for t in (task or list(datasets))}
    if plain:
        from pipelines.catalogs import open_catalog
        from pipelines.params import head_size_for
        from stages.downstream.runners import HeadsConfig, TaskChoice, run_heads

        config = HeadsConfig.model_validate({
            "out_dir": str(out), "backbone": backbone_config(checkpoint, model, override, preprocessing, seed, False),
            "tasks": [TaskChoice(task=t, dataset=d) for t, d in chosen.items()], "head_size": head_size_for(model),
            "steps": steps, "seed": seed, "device": device, "replace": True, "tune": tune})
        console.print("[bold]" + ", ".join(f"{t} on {d}" for t, d in chosen.items()) + "[/bold]")
        result = run_heads(open_catalog(catalog), config)
        rows, report = result.table, str(result.report.json)
    else:
        from model.registry import resolve_name
        from pipelines.downstream import downstream_flow
        from pipelines.params import BackboneParams, DownstreamParams, PathParams

        backbone_params = BackboneParams.model_validate({
            "model": resolve_name(model), "checkpoint": checkpoint, "seed": seed, "preprocessing": preprocessing,
            "overrides": key_values(override, "--override")})
        downstream = DownstreamParams.model_validate({"tasks": list(chosen), "benchmarks": chosen, "steps": steps,
                                                      "device": device, "tune": tune})
        done = downstream_flow(paths=PathParams(catalog=catalog), backbone=backbone_params, downstream=downstream,
                               out_dir=str(out.resolve()), seed=seed)
        rows, report = done["table"], done["report"]
    print_heads(rows, "downstream: head vs trivial baseline (primary metric)")
    console.print(f"report: {report}")
