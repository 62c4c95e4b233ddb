"""`hvp pretrain` and `hvp models`: the HyperVision backbone on the fused pseudo-targets."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pipelines.cli.common import CatalogOpt, PlainOpt, ProfileOpt, console, print_pretrain, start_flows


def pretrain(catalog: CatalogOpt = None,
             model: Annotated[str, typer.Option(help="registry model name (`hvp models list`): tiny, or a released "
                                                    "layout by name (hypervision_b/l/h, hyperfree_b; "
                                                    "hypersigma_tiny/b/l/h with an mae_* objective)")] = "tiny",
             objective: Annotated[str, typer.Option(
                 help="hypervision (fused masks + distillation) | mae_spatial | mae_spectral (HyperSIGMA's masked "
                      "autoencoders: 64 x 64 crops of 100 contiguous bands, mask ratio 0.75)")] = "hypervision",
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
             resume: Annotated[bool, typer.Option(help="continue the run in OUT")] = False,
             profile: ProfileOpt = "production", plain: PlainOpt = False) -> None:
    """Pretrain the HyperVision backbone on the fused pseudo-targets, or a HyperSIGMA encoder with its masked
    autoencoder (--objective mae_spatial | mae_spectral) (Prefect flow unless --plain; torchrun when nproc > 1); the
    profile fills what the options leave empty."""
    import dataclasses

    from model.registry import resolve_name
    from pipelines.params import ModelName, ObjectiveName, PathParams, Preprocessing, PretrainParams, Profile

    try:
        name = ModelName(resolve_name(model))
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--model") from None
    params = PretrainParams(model=name, objective=ObjectiveName(objective), steps=steps, out=str(out.resolve()),
                            batch_size=batch_size, nproc=nproc,
                            teacher_checkpoint=teacher_checkpoint, student_checkpoint=init,
                            init_strict=not non_strict, preprocessing=Preprocessing(preprocessing))
    paths = PathParams(catalog=catalog)
    if plain:
        from pipelines.catalogs import open_catalog
        from pipelines.profiles import resolve
        from stages.pretraining import run_pretrain

        run = resolve(Profile(profile), paths, pretrain=params, resume=resume)
        print_pretrain(dataclasses.asdict(run_pretrain(open_catalog(run.paths.catalog), run.pretrain)))
        return
    from pipelines.pretrain import pretrain_flow

    start_flows()
    print_pretrain(pretrain_flow(Profile(profile), paths, params, resume))  # type: ignore[arg-type]


def models_list(family: Annotated[str | None, typer.Option(help="only this family: hyperfree | hypersigma")] = None
                ) -> None:
    """The registry's model names (what `--model` and the UI's model fields accept)."""
    from model.registry import list_models

    console.print("\n".join(list_models(family)))


def models_inspect(path: Annotated[Path, typer.Argument(help="a .safetensors, .pth or .pt checkpoint")],
                   json_out: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
                   limit: Annotated[int, typer.Option(help="tensors listed in the text form")] = 20) -> None:
    """A checkpoint's sha256, its tensors' layout and the registry layouts it fits, read without executing
    anything from the file (a file that would run code is refused)."""
    import json

    from model.inspect import describe, inspect_checkpoint

    info = inspect_checkpoint(path)
    if json_out:
        print(json.dumps(info.as_dict(), indent=2))
    else:
        console.print(describe(info, limit), markup=False, highlight=False)


def tensorboard(runs: Annotated[Path | None, typer.Option(
        help="a runs folder or one run's folder (default: `runs` beside $HVP_CATALOG)")] = None) -> None:
    """Print the command that opens the TensorBoard event files of pretraining, head training and checkpoint
    evaluations (each run keeps them under its own folder)."""
    from pipelines.params import PathParams, resolve_paths
    from pipelines.research import tensorboard_command

    folder = runs or Path(resolve_paths(PathParams()).runs)
    found = sorted({p.parent for p in folder.rglob("events.out.tfevents*")}) if folder.is_dir() else []
    console.print(f"{len(found)} folder(s) of event files under {folder}")
    print(tensorboard_command(folder))
