"""Prefect wiring of the research loop: every saved pretraining checkpoint emits `hvp.checkpoint.saved`; the
`evaluate` deployment's trigger runs `evaluate_flow` on it (features and heads on that checkpoint, with the run's
downstream parameters, holding a `gpu` slot), and the run's metric-vs-step plot and best-checkpoint table are
published as artifacts. `ablation_flow` (deployment `hypervision-ablation`) runs the Table 5 grid. Logic lives in
stages.research.
"""

from __future__ import annotations

import json
import re
from enum import StrEnum
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict, Field

from pipelines.catalogs import open_catalog
from pipelines.ingest import ingest_flow
from pipelines.params import (
    DEFAULT_DOWNSTREAM,
    DEFAULT_LABEL,
    DEFAULT_PATHS,
    DEFAULT_PRETRAIN,
    DownstreamParams,
    LabelParams,
    ModelName,
    PathParams,
    PretrainParams,
    Profile,
    head_size_for,
)
from pipelines.profiles import ensure_sources, resolve
from pipelines.wiring import gpu_slot, png_data_uri, publish_markdown, publish_table
from stages.downstream.runners import TaskChoice
from stages.labelling.labeler import file_sha256
from stages.research.ablation import AblationConfig, run_ablation
from stages.research.evaluation import EvaluationConfig, run_evaluation

#: Event of a committed pretraining checkpoint; its resource id is `hvp.checkpoint.<sha256>`.
CHECKPOINT_SAVED = "hvp.checkpoint.saved"
RESOURCE_PREFIX = "hvp.checkpoint."
#: File in a pretraining run folder holding the profile, catalog and downstream parameters its evaluations use.
RESEARCH_FILE = "research.json"


def tensorboard_command(folder: str | Path) -> str:
    """The command that opens a folder's TensorBoard event files."""
    return f"tensorboard --logdir {Path(folder).resolve()}"


def record_research(run_dir: str | Path, profile: Profile, catalog: str, downstream: DownstreamParams) -> Path:
    """Write what the run's checkpoint evaluations take (profile, catalog, downstream parameters) beside it."""
    path = Path(run_dir) / RESEARCH_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"profile": profile.value, "catalog": catalog,
                                "downstream": downstream.model_dump(mode="json")}, indent=2))
    return path


def emit_checkpoint(run_dir: str | Path, step: int, checkpoint: Path) -> Any:
    """Emit `hvp.checkpoint.saved` for one committed checkpoint (run, step, path, sha256)."""
    from prefect.events import emit_event

    sha = file_sha256(checkpoint / "model.safetensors")
    run = Path(run_dir).resolve()
    print(f"checkpoint step {step}: {checkpoint} (sha256 {sha[:12]}) -> {CHECKPOINT_SAVED}")
    return emit_event(event=CHECKPOINT_SAVED,
                      resource={"prefect.resource.id": f"{RESOURCE_PREFIX}{sha}",
                                "prefect.resource.name": f"{run.name} step {step}", "hvp.run": str(run)},
                      payload={"run": str(run), "step": step, "checkpoint": str(Path(checkpoint).resolve()),
                               "sha256": sha})


def _artifact_key(run_dir: str | Path) -> str:
    """A stable artifact key per pretraining run (lowercase letters, digits and dashes)."""
    return re.sub(r"[^a-z0-9-]+", "-", f"evaluation-{Path(run_dir).name}".lower())[:80]


def evaluation_config(run_dir: Path, checkpoint: str, step: int | None, profile: Profile,
                      downstream: DownstreamParams) -> EvaluationConfig:
    """The evaluation of one checkpoint under the run's downstream parameters (tasks on their benchmarks, steps,
    device) with the head size of its layout."""
    model = json.loads((Path(checkpoint) / "config.json").read_text())["config"]["model"]
    tasks = [TaskChoice(task=t, dataset=d) for t, d in downstream.task_datasets().items()]
    return EvaluationConfig.model_validate({"checkpoint": checkpoint, "run_dir": str(run_dir), "step": step,
                                            "tasks": tasks, "head_size": head_size_for(model),
                                            "steps": downstream.steps, "device": downstream.device.value})


@task(name="evaluate-checkpoint", tags=["gpu"], cache_policy=NO_CACHE, task_run_name="evaluate step {step}")
def evaluate_task(catalog_uri: str, config: dict[str, Any], step: int | None) -> dict[str, Any]:
    """The evaluation runner holding a `gpu` slot; returns its rows, best table and report paths."""
    with gpu_slot():
        result = run_evaluation(open_catalog(catalog_uri), EvaluationConfig.model_validate(config))
    return {"sha256": result.sha256, "step": result.step, "reused": result.reused, "rows": result.rows,
            "best": result.best, "plot": str(result.plot), "report": str(result.report_md), "card": str(result.card),
            "table": str(result.table)}


@flow(name="evaluate", log_prints=True)
def evaluate_flow(checkpoint: str, run: str | None = None, step: int | None = None, sha256: str | None = None,
                  profile: Profile | None = None, paths: PathParams = DEFAULT_PATHS,
                  downstream: DownstreamParams | None = None) -> dict[str, Any]:
    """Evaluate one pretraining checkpoint downstream (once per sha256 and protocol) and publish its run's
    metric-vs-step plot and best checkpoint per task. Started by the `hvp.checkpoint.saved` trigger, or by hand.

    Args:
        checkpoint: The checkpoint folder (`<run>/checkpoints/step_N` or `<run>/snapshots/step_N`).
        run: The pretraining run folder. Empty: the checkpoint's run.
        step: The pretraining step. Empty: from the folder name.
        sha256: The weights' sha256 the event announced (checked against the file).
        profile: Which profile fills the empty fields. Empty: the run's (research.json), else demo.
        paths: The catalog. Empty: the run's (research.json), else the settings'.
        downstream: Tasks, steps and device. Empty: the run's (research.json), else the profile's.
    """
    ckpt = Path(checkpoint)
    run_dir = Path(run) if run else ckpt.resolve().parent.parent
    recorded = json.loads((run_dir / RESEARCH_FILE).read_text()) if (run_dir / RESEARCH_FILE).is_file() else {}
    prof = profile or Profile(recorded.get("profile", Profile.demo.value))
    base = DownstreamParams.model_validate(recorded["downstream"]) if "downstream" in recorded else DEFAULT_DOWNSTREAM
    resolved = resolve(prof, paths, downstream=downstream or base)
    catalog = resolved.paths.catalog if paths.catalog else recorded.get("catalog", resolved.paths.catalog)
    if sha256 and (ckpt / "model.safetensors").is_file() and file_sha256(ckpt / "model.safetensors") != sha256:
        raise ValueError(f"{ckpt}/model.safetensors no longer has the announced sha256 {sha256[:12]}: it was "
                         "replaced since the event; evaluate the snapshot of that step instead")
    config = evaluation_config(run_dir, str(ckpt), step, prof, downstream or resolved.downstream)
    print(f"evaluate {ckpt} (step {step if step is not None else 'from name'}) of run {run_dir}, catalog {catalog}; "
          f"tasks {', '.join(c.task for c in config.tasks)}")
    out = evaluate_task(catalog, config.model_dump(mode="json"), step)
    _publish(run_dir, out)
    print(f"TensorBoard: {tensorboard_command(run_dir)}")
    return out


def _publish(run_dir: Path, out: dict[str, Any]) -> None:
    """The run's best checkpoint per task (table) and its metric-vs-step plot with the report (markdown)."""
    key = _artifact_key(run_dir)
    note = "random-init: " if any(r["random_init"] for r in out["rows"]) else ""
    publish_table(f"{key}-best", out["best"] or [{"task": "(none)"}],
                          description=f"{note}best checkpoint per task of `{run_dir}` (rows of one protocol each)")
    report = Path(out["report"]).read_text()
    plot = Path(out["plot"])
    image = f"![metric vs step]({png_data_uri(plot)})\n\n" if plot.is_file() else ""
    publish_markdown(f"{key}-curves", f"{image}{report}\nTensorBoard: `{tensorboard_command(run_dir)}`\n",
                     description=f"{note}downstream metric against pretraining step of `{run_dir}`")


# ------------------------------------------------------------------------------------------------ ablation
class SourceSet(StrEnum):
    """Pseudo-mask sources of an ablation variant."""

    spatial = "spatial"
    spatial_spectral = "spatial+spectral"
    spatial_spectral_material = "spatial+spectral+material"


class AblationParams(BaseModel):
    """The axes of the ablation grid (the paper's Table 5) and the heads' schedule."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sources: list[SourceSet] = Field(default_factory=lambda: list(SourceSet), description="Pseudo-mask sources: "
                                     "spatial only; spatial + spectral; + material.")
    distillation: list[bool] = Field(default_factory=lambda: [False, True], description="Distillation off, on.")
    models: list[ModelName] = Field(default_factory=list, description="Model sizes. Empty: "  # type: ignore[valid-type]
                                    "the profile's pretraining model.")
    out: str | None = Field(default=None, description="Ablation folder. Empty: `<runs>/ablation`.")


DEFAULT_ABLATION = AblationParams()


@flow(name="hypervision-ablation", log_prints=True)
def ablation_flow(profile: Profile = Profile.demo, paths: PathParams = DEFAULT_PATHS,
                  ablation: AblationParams = DEFAULT_ABLATION, label: LabelParams = DEFAULT_LABEL,
                  pretrain: PretrainParams = DEFAULT_PRETRAIN,
                  downstream: DownstreamParams = DEFAULT_DOWNSTREAM) -> dict[str, Any]:
    """Ingest what the catalog lacks (the demo profile writes the fixtures first), pretrain every variant of the
    grid (labelling and fusion caches shared), evaluate each, write Table 5's layout beside the paper's figures and
    publish it.

    Args:
        profile: Which profile fills the empty fields (demo: fixtures and tiny models, minutes on a CPU).
        paths: Catalog, runs folder and the pretraining datasets.
        ablation: The axes (sources, distillation, model sizes) and the folder.
        label: The labelers of the branches and the fusion tau.
        pretrain: The base pretraining config (its lambda_distill is the 'on' weight).
        downstream: The tasks evaluated, the heads' steps and the device.
    """
    run = resolve(profile, paths, label=label, pretrain=pretrain, downstream=downstream)
    ensure_sources(run)
    p = run.paths
    ingest_flow(PathParams(source_root=p.source_root, catalog=p.catalog, runs=p.runs, datasets=p.datasets))
    models = [str(m.value) for m in ablation.models] or [run.pretrain.model]
    out = ablation.out or str(Path(run.paths.runs) / "ablation")
    tasks = [TaskChoice(task=t, dataset=d) for t, d in run.downstream.task_datasets().items()]
    config = AblationConfig.model_validate({
        "labelers": run.label.labelers, "tau": run.label.tau, "sources": [s.value for s in ablation.sources],
        "distillation": ablation.distillation, "models": models, "pretrain": run.pretrain, "tasks": tasks,
        "head_size": head_size_for(models[0]), "head_steps": run.downstream.steps,
        "device": run.downstream.device.value, "datasets": run.paths.datasets, "out_dir": out})
    print(f"ablation, profile {run.profile.value}: {len(config.sources) * len(config.distillation) * len(models)} "
          f"variants into {out}")
    with gpu_slot():
        result = run_ablation(open_catalog(run.paths.catalog), config)
    rows = [{k: r.get(k) for k in ("row", "label", "sources", "distillation", "model", *[c.task for c in tasks])}
            for r in result.rows]
    publish_table("ablation-table5", rows, description="The ablation grid in Table 5's layout "
                          "(this run's rows beside the paper's; % of each task's primary metric)")
    publish_markdown("ablation-table5-md", result.markdown.read_text() +
                     f"\nTensorBoard: `{tensorboard_command(Path(out) / 'runs')}`\n",
                     description=f"Table 5 layout written to `{result.markdown}`")
    return {"rows": result.rows, "markdown": str(result.markdown), "table": str(result.table),
            "fusion_ids": result.fusion_ids}
