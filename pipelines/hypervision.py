"""The whole pipeline as one Prefect DAG, the `hypervision` flow: ingest -> label (spatial, spectral, material)
-> fuse -> pretrain -> features -> heads (with the report), each stage a dependent subflow.

Each stage is keyed on catalog content (source sha256, labeler ids, fusion id, checkpoint sha256) and returns a
"Skipped" state saying so when its inputs are unchanged; retries are on I/O errors only (see the stage modules).

Stages after pretraining are the DOWNSTREAM list of ``DownstreamStage(name, run)``, where ``run(ctx)`` calls the
stage's own flow as a subflow and returns its summary; ``ctx`` (a DagContext) carries the resolved paths, labeler
ids, the pretraining result (checkpoint, run folder) and every earlier stage's output. Today: frozen features of
the labelled datasets from the run's pretrained checkpoint, then one head per task and the report (heads), then,
when `downstream.backbones` lists backbones, the same heads for those beside the run's backbone (compare).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.states import State

from infra.settings import get_settings
from model.registry import FAMILY_HYPERFREE, model_entry
from pipelines.catalogs import open_catalog
from pipelines.compare import compare_backbones, compare_entry, own_entry
from pipelines.downstream import features_flow, heads_flow, resolve_backbone
from pipelines.ingest import ingest_flow
from pipelines.label import fuse_flow, label_branch_flow
from pipelines.params import (
    DEFAULT_DOWNSTREAM,
    DEFAULT_LABEL,
    DEFAULT_PATHS,
    DEFAULT_PRETRAIN,
    BackboneParams,
    DownstreamParams,
    LabelParams,
    PathParams,
    PretrainParams,
    Profile,
    ResolvedPaths,
    ZeroShotParams,
    cached_feature_datasets,
)
from pipelines.pretrain import pretrain_flow
from pipelines.profiles import ResolvedLabel, RunConfig, ensure_sources, resolve
from pipelines.wiring import (
    concurrently,
    engine_runner,
    in_process_subflows,
    markdown_table,
    publish_markdown,
    publish_table,
    skipped,
)
from pipelines.zeroshot import DEFAULT_ZEROSHOT, zeroshot_flow
from stages.downstream.features import cached_backbone
from stages.downstream.heads import held_benchmarks
from stages.downstream.tasks import TASKS
from stages.pretraining import OBJECTIVES
from stages.registry import record_config


@dataclass
class DagContext:
    """What a downstream stage gets from the run: resolved parameters and the outputs of earlier stages."""

    profile: Profile
    paths: ResolvedPaths
    label: ResolvedLabel
    model: str = "tiny"
    """The pretrained registry layout (the frozen backbone of the downstream stages)."""
    preprocessing: str | None = "released"
    """The preprocessing contract pretraining used, which the downstream stages keep (None: the objective scales
    its own inputs, e.g. HyperSIGMA's MAE; the backbone takes its family's contract)."""
    downstream: DownstreamParams = DEFAULT_DOWNSTREAM
    pretrain: dict[str, Any] = field(default_factory=dict)
    """The pretraining result: out_dir, checkpoint, final metrics, student/teacher weights."""
    outputs: dict[str, Any] = field(default_factory=dict)
    """Each finished stage's returned data, by stage name."""
    zeroshot: ZeroShotParams = DEFAULT_ZEROSHOT
    """HyperFree's tuning-free tasks on the pretrained checkpoint (no task: the stage skips)."""


@dataclass(frozen=True)
class DownstreamStage:
    """A stage appended after pretraining: ``run(ctx)`` calls its flow (a subflow of the run)."""

    name: str
    run: Callable[[DagContext], Any]
    enabled: Callable[[DagContext], bool] = lambda _ctx: True
    """Whether the run's parameters ask for this stage."""


def _backbone(ctx: DagContext) -> BackboneParams:
    """The frozen backbone of the downstream stages: the run's pretrained checkpoint, its layout."""
    return BackboneParams.model_validate({"model": ctx.model, "checkpoint": str(ctx.pretrain["checkpoint"]),
                                          "preprocessing": ctx.preprocessing})


def _features(ctx: DagContext) -> Any:
    """Cache the frozen backbone's features of the labelled datasets the heads train on."""
    tasks, missing = held_benchmarks(open_catalog(ctx.paths.catalog), ctx.downstream.task_datasets())
    datasets = cached_feature_datasets(tasks)  # tasks that encode their inputs on the fly read no cache
    if not datasets:
        why = "; ".join([*missing, *(TASKS.get(t).uncached_reason for t in tasks if not TASKS.get(t).cached_features)])
        return skipped("features", f"no image to encode ({why})", [])
    paths = PathParams(catalog=ctx.paths.catalog, runs=ctx.paths.runs, datasets=datasets)
    return features_flow(ctx.profile, paths, _backbone(ctx), ctx.downstream, return_state=True)


def _heads(ctx: DagContext) -> Any:
    """One head per task on the cached features, scored against its baseline; the report (in
    `<runs>/downstream-<model>-<feature set id>`, where the `heads` deployment finds it too)."""
    paths = PathParams(catalog=ctx.paths.catalog, runs=ctx.paths.runs)
    return heads_flow(ctx.profile, paths, _backbone(ctx), ctx.downstream, return_state=True)


def _zeroshot(ctx: DagContext) -> Any:
    """HyperFree's tuning-free tasks on the pretrained checkpoint, when the run names tasks and the layout has
    HyperFree's mask decoder."""
    if model_entry(ctx.model).family != FAMILY_HYPERFREE:
        return skipped("zeroshot", f"{ctx.model} has no HyperFree mask decoder: the tuning-free tasks need one", {})
    paths = PathParams(catalog=ctx.paths.catalog, runs=ctx.paths.runs)
    return zeroshot_flow(ctx.profile, paths, _backbone(ctx), ctx.zeroshot, return_state=True)


def _compare(ctx: DagContext) -> Any:
    """The run's backbone beside `downstream.backbones`: the same heads on the same data, one report in
    `<runs>/compare-<model>-<feature set id>`."""
    spec, _ = resolve_backbone(ctx.profile, _backbone(ctx), ctx.paths.runs)
    own = own_entry(spec, f"{spec.model} (this run)")
    entries = [own, *(compare_entry(b) for b in ctx.downstream.backbones)]
    set_id = cached_backbone(spec, ctx.downstream.device.value).set_id
    folder = Path(ctx.paths.runs) / f"compare-{spec.model}-{set_id}"
    return compare_backbones(ctx.paths.catalog, entries, ctx.downstream, folder)


#: Stages run after pretraining, in order.
DOWNSTREAM: list[DownstreamStage] = [
    DownstreamStage("features", _features), DownstreamStage("heads", _heads),
    DownstreamStage("compare", _compare, enabled=lambda ctx: bool(ctx.downstream.backbones)),
    DownstreamStage("zeroshot", _zeroshot, enabled=lambda ctx: bool(ctx.zeroshot.tasks)),
]


@dataclass
class StageRecord:
    """One stage of a run as the summary shows it."""

    stage: str
    state: str
    seconds: float
    note: str = ""


def _run_stage(records: list[StageRecord], name: str, call: Callable[[], Any]) -> Any:
    """Call one stage's subflow, time it, record whether it ran or skipped, and return its data (raising on
    failure)."""
    record, data = _timed(name, call)
    records.append(record)
    return data


def _timed(name: str, call: Callable[[], Any]) -> tuple[StageRecord, Any]:
    """One stage's subflow called and timed: its record (ran or skipped, and why) and its data (raising on
    failure)."""
    t0 = time.perf_counter()
    with in_process_subflows():
        result = call()
    state = result if isinstance(result, State) else None
    data = state.result() if state is not None else result
    name_of_state = (state.name or "Completed") if state is not None else "Completed"
    note = (state.message or "").split(" skipped: ", 1)[-1] if state is not None and state.name == "Skipped" else ""
    return StageRecord(name, name_of_state, round(time.perf_counter() - t0, 3), note), data


@flow(name="hypervision", log_prints=True)
def hypervision_flow(profile: Profile = Profile.demo, paths: PathParams = DEFAULT_PATHS,
                     label: LabelParams = DEFAULT_LABEL, pretrain: PretrainParams = DEFAULT_PRETRAIN,
                     downstream: DownstreamParams = DEFAULT_DOWNSTREAM, ingest_workers: int = 1,
                     zeroshot: ZeroShotParams = DEFAULT_ZEROSHOT) -> dict[str, Any]:
    """The whole pipeline: ingest, label with the three branches, fuse, pretrain, then frozen features and one
    head per task with the report; stages whose inputs are unchanged skip. Returns the per-stage summary and each
    stage's output.

    Args:
        profile: demo (fixtures, tiny random-init models, loose thresholds), production (released model sizes, the
            settings' checkpoints, the branches' thresholds) or test; fills every field left empty.
        paths: Source root, catalog and runs folder (resolved to absolute paths and shown in the run).
        label: Branches, each branch's labeler thresholds and tau.
        pretrain: Model, steps, batch and checkpoints of pretraining.
        downstream: Tasks, steps and device of head-only adaptation on the pretrained, frozen backbone.
        ingest_workers: More than 1 ingests on a local Dask cluster of that many processes.
        zeroshot: HyperFree's tuning-free tasks on the pretrained checkpoint (airborne scenes the catalog holds);
            no task skips the stage.
    """
    run = resolve(profile, paths, label, pretrain, downstream)
    p = run.paths
    _publish_parameters(run)
    ensure_sources(run)
    record_config(open_catalog(p.catalog).init(), "hypervision", run)
    records: list[StageRecord] = []
    contract = run.pretrain.preprocessing if OBJECTIVES.get(run.pretrain.objective).uses_contract else None
    ctx = DagContext(run.profile, p, run.label, model=run.pretrain.model, preprocessing=contract,
                     downstream=run.downstream, zeroshot=zeroshot)
    only = PathParams(source_root=p.source_root, catalog=p.catalog, runs=p.runs, datasets=p.datasets)
    ctx.outputs["ingest"] = _run_stage(records, "ingest", lambda: ingest_flow(only, ingest_workers,
                                                                              return_state=True))
    # the three branches are independent: they run at once (sharing the engine's workers), fusion waits for all
    branch_flow = label_branch_flow.with_options(task_runner=engine_runner(dask_address=get_settings().dask_address))
    labelled = concurrently([functools.partial(_timed, f"label-{b}", functools.partial(
        branch_flow, p.catalog, run.label_config(b), return_state=True)) for b in run.label.branches])
    for branch, (record, data) in zip(run.label.branches, labelled, strict=True):
        records.append(record)
        ctx.outputs[f"label-{branch}"] = data
    ctx.outputs["fuse"] = _run_stage(records, "fuse", lambda: fuse_flow(profile, only, label, return_state=True))
    ctx.pretrain = _run_stage(records, "pretrain", lambda: pretrain_flow(profile, only, pretrain, return_state=True))
    ctx.outputs["pretrain"] = ctx.pretrain
    for stage in [s for s in DOWNSTREAM if s.enabled(ctx)] if run.downstream.tasks else []:
        def run_downstream(s: DownstreamStage = stage) -> Any:
            return s.run(ctx)

        ctx.outputs[stage.name] = _run_stage(records, stage.name, run_downstream)
    rows = [vars(r) for r in records]
    publish_table("hypervision-stages", rows,
                  description="Each stage of the run: its final state (Skipped when its inputs were "
                              "unchanged), wall time in seconds and why it skipped.")
    for r in records:
        print(f"{r.stage}: {r.state} in {r.seconds:.1f} s" + (f" ({r.note})" if r.note else ""))
    return {"stages": rows, "outputs": ctx.outputs, "paths": p.model_dump()}


def _model_label(model_config: dict[str, Any]) -> str:
    """A labeler's model in a few characters: `sam2.1_hiera_t @128` or the registry name."""
    if "config" in model_config:
        return f"{Path(str(model_config['config'])).stem} @{model_config.get('image_size')}"
    return str(model_config.get("model", model_config))


def _publish_parameters(run: RunConfig) -> None:
    """The run's resolved parameters (absolute paths, each labeler's configuration, pretraining, the downstream
    tasks) as a markdown artifact."""
    paths, label, downstream = run.paths, run.label, run.downstream
    path_rows = [{"what": k, "value": f"`{v}`"} for k, v in paths.model_dump().items()]
    labeler_rows = [{"branch": b, "model": _model_label(c.model),
                     "checkpoint": Path(c.checkpoint).name if c.checkpoint else "random-init",
                     "points": c.params.get("points_per_side", "default"),
                     "iou thr": c.params.get("pred_iou_thresh", "default"),
                     "stability thr": c.params.get("stability_score_thresh", "default")}
                    for b, c in label.labelers.items()]
    task_rows = [{"task": t, "dataset": d} for t, d in downstream.task_datasets().items()]
    pretrain = run.pretrain.model_dump(exclude_none=True)
    profile = run.profile.value
    text = (f"## Run parameters (profile `{profile}`)\n\n### Paths\n\n{markdown_table(path_rows)}\n"
            f"### Labelers (branches run: {', '.join(label.branches)}; tau = {label.tau})\n\n"
            f"{markdown_table(labeler_rows)}\n### Pretraining\n\n"
            f"{markdown_table([{'field': k, 'value': v} for k, v in pretrain.items()])}\n"
            f"### Downstream (frozen pretrained backbone; head steps: {downstream.steps or 'by model size'}; device "
            f"{downstream.device.value})\n\n{markdown_table(task_rows)}")
    print(f"profile {profile}; paths: " + ", ".join(f"{k}={v}" for k, v in paths.model_dump().items()))
    publish_markdown("hypervision-parameters", text,
                     description=f"Resolved parameters of this run (profile `{profile}`): absolute paths, "
                                 "labeler configurations, pretraining settings, downstream tasks.")
