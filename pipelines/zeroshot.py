"""Prefect wiring of HyperFree's tuning-free tasks (stages/zeroshot): one task run per (task, dataset) holding a
`gpu` slot, the table and map previews as artifacts. Masks and features are cached in the catalog, so a rerun with
new prompts or thresholds costs no encoder pass."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import State

from base.markdown import escape_markdown
from pipelines.catalogs import open_catalog
from pipelines.downstream import resolve_backbone
from pipelines.params import (
    DEFAULT_BACKBONE,
    DEFAULT_PATHS,
    BackboneParams,
    PathParams,
    Profile,
    ZeroShotParams,
    absolute_path,
)
from pipelines.profiles import resolve
from pipelines.wiring import gpu_slot, publish_table, skipped
from stages.downstream.features import RANDOM_INIT
from stages.downstream.report import preview_data_uri
from stages.zeroshot.run import TASKS, ZeroShotConfig, run_zeroshot
from stages.zeroshot.suite import held_scenes

DEFAULT_ZEROSHOT = ZeroShotParams()
#: Map previews per task in the markdown artifact (the report folder holds them all).
PREVIEWS = 3


@task(name="zeroshot-task", tags=["gpu"], cache_policy=NO_CACHE, task_run_name="zeroshot {task_name} {dataset}")
def zeroshot_task(catalog_uri: str, task_name: str, dataset: str, config: dict[str, Any]) -> dict[str, Any]:
    """Run one zero-shot task on a dataset's annotated scenes (the stage's runner); its report folder and rows."""
    with gpu_slot():
        result = run_zeroshot(open_catalog(catalog_uri), ZeroShotConfig.model_validate(config))
    print(f"{task_name} on {dataset}: {len(result.rows)} rows, report {result.report_json}")
    return {"task": task_name, "dataset": dataset, "out_dir": str(result.out_dir), "rows": result.rows,
            "report": str(result.report_json), "random_init": result.random_init}


def _markdown(done: list[dict[str, Any]], weights: str) -> str:
    """Each task's report text with a few of its maps embedded as previews (dataset-named text escaped)."""
    parts = [f"# Zero-shot tasks (backbone weights {escape_markdown(weights)})"]
    for d in done:
        parts.append(f"## {escape_markdown(d['task'])} on {escape_markdown(d['dataset'])}")
        md = Path(d["out_dir"]) / "report.md"
        if md.is_file():
            parts.append("\n".join(line for line in md.read_text().splitlines() if not line.startswith("# ")))
        for png in sorted(Path(d["out_dir"]).glob("*.png"))[:PREVIEWS]:
            parts.append(f"**{escape_markdown(png.stem)}**\n\n![{escape_markdown(png.stem)}]"
                         f"({preview_data_uri(png, 320)})")
    return "\n\n".join(parts)


@flow(name="zeroshot", log_prints=True)
def zeroshot_flow(profile: Profile = Profile.demo, paths: PathParams = DEFAULT_PATHS,
                  backbone: BackboneParams = DEFAULT_BACKBONE, zeroshot: ZeroShotParams = DEFAULT_ZEROSHOT,
                  out_dir: str | None = None) -> dict[str, Any] | State:
    """HyperFree's tuning-free tasks on the catalog's airborne scenes with a frozen backbone (a HyperFree-family
    layout: it needs the mask decoder), each beside its classical baseline; publishes the table and the maps.

    Args:
        profile: Which profile fills the empty fields: demo (`tiny`), production (the -B layout) or test.
        paths: Catalog and runs folder (where the latest pretraining run is looked up).
        backbone: The frozen backbone: layout and weights (empty: the latest finished pretraining run of the
            layout, else random-init).
        zeroshot: Tasks, datasets, behaviour, per-task parameters, relax and seed.
        out_dir: Report folder. Empty: `<runs>/zeroshot-<model>`.
    """
    run = resolve(profile, paths)
    p = run.paths
    spec, origin = resolve_backbone(profile, backbone, p.runs)
    names = [str(t.value) for t in zeroshot.tasks] or TASKS.names()
    datasets = {str(k.value): v for k, v in (zeroshot.datasets or {}).items()}
    held, missing = held_scenes(open_catalog(p.catalog), names, datasets)
    for name, why in missing.items():
        print(f"zeroshot: left out {name}: {why}")
    if not held:
        return skipped("zeroshot", "; ".join(f"{t}: {w}" for t, w in missing.items()) or "no task chosen", {})
    folder = absolute_path(out_dir) if out_dir else str(Path(p.runs) / f"zeroshot-{spec.model}")
    checkpoint = None if spec.checkpoint in (None, RANDOM_INIT) else spec.checkpoint
    params = {str(k.value): v for k, v in (zeroshot.params or {}).items()}
    print(f"zeroshot, profile {run.profile.value}: backbone {spec.model}, weights {spec.checkpoint or RANDOM_INIT} "
          f"({origin}); tasks {', '.join(f'{t} on {d}' for t, d in held.items())}; reports in {folder}")
    done = [zeroshot_task(p.catalog, name, dataset, ZeroShotConfig(
        task=name, dataset=dataset, model=spec.model, checkpoint=checkpoint, model_overrides=dict(spec.overrides or {}),
        init_seed=spec.seed, behaviour=zeroshot.behaviour.value, params=params.get(name, {}), relax=zeroshot.relax,
        seed=zeroshot.seed, out=folder).model_dump(mode="json")) for name, dataset in held.items()]
    weights = spec.checkpoint or RANDOM_INIT
    rows = [{k: r.get(k) for k in ("task", "dataset", "image_id", "method", "metric", "value")}
            for d in done for r in d["rows"]]
    random_init = any(d["random_init"] for d in done)
    note = " Random-init weights: the figures measure the plumbing." if random_init else ""
    publish_table("zeroshot-report", rows or [{"task": "(none)"}],
                  description=f"Zero-shot tasks with `{spec.model}` (weights {weights}), each beside its classical "
                              f"baseline and the HyperFree README's figures (rows marked paper).{note}")
    create_markdown_artifact(key="zeroshot-maps", markdown=_markdown(done, weights),
                             description=f"Zero-shot maps and tables, backbone weights {weights}")
    return {"reports": {d["task"]: d["report"] for d in done}, "table": rows, "left_out": missing,
            "out_dir": folder}
