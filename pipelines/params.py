"""Flow parameters as pydantic models: what the Prefect UI shows as typed forms and what the CLI builds.

Every flow takes the same groups (`PathParams`, `LabelParams`, `PretrainParams`, `DownstreamParams`,
`BackboneParams`) and a `Profile`. Every field that can be left empty takes the value of the run's profile, a YAML
file of the same groups under pipelines/profiles/ (``demo``, ``production``, ``test``); `pipelines.profiles.resolve`
turns profile + parameters into the typed stage configs the flows pass down. Nothing below reads the environment
to find out what the UI asked for.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from infra.settings import Settings, get_settings
from model.preprocess import CONTRACTS
from model.registry import list_models, resolve_name
from stages.downstream.tasks import TASKS, ordered_tasks
from stages.labelling.sam2_models import available_configs
from stages.pretraining import OBJECTIVES
from stages.zeroshot.run import TASKS as ZERO_SHOT_TASKS


class Profile(StrEnum):
    """Which profile (pipelines/profiles/<name>.yaml) fills the fields left empty."""

    demo = "demo"
    production = "production"
    test = "test"


class Branch(StrEnum):
    """The pseudo-labelling branches."""

    spatial = "spatial"
    spectral = "spectral"
    material = "material"


class Device(StrEnum):
    """Where training runs: CUDA when available, or forced."""

    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Preprocessing(StrEnum):
    """The named preprocessing contracts of model.preprocess."""

    released = "released"
    crop_max = "crop_max"


if {p.value for p in Preprocessing} != set(CONTRACTS):  # pragma: no cover - guards the two lists drifting apart
    raise ImportError(f"pipelines.params.Preprocessing lists {[p.value for p in Preprocessing]} but "
                      f"model.preprocess.CONTRACTS is {list(CONTRACTS)}: update the enum")


#: Model names of the registry (model.registry.list_models): the choices of every `model` field.
ModelName = StrEnum("ModelName", {name: name for name in list_models()})  # type: ignore[misc]
#: Pretraining objectives (stages.pretraining.OBJECTIVES): the choices of `objective`.
ObjectiveName = StrEnum("ObjectiveName", {name: name for name in OBJECTIVES.names()})  # type: ignore[misc]
#: SAM2 config names that sam2 ships: the choices of `sam2_config`.
Sam2Config = StrEnum("Sam2Config", {name.replace("/", "_").replace(".", "_"): name  # type: ignore[misc]
                                    for name in available_configs()})

_FORM = ConfigDict(extra="forbid", frozen=True)


class PathParams(BaseModel):
    """Where the data lives. Empty fields take the settings' values; every path is resolved to an absolute one
    (against the flow run's working directory) and shown in the run."""

    model_config = _FORM

    source_root: str | None = Field(default=None, description="Folder of dataset folders. Empty: `HVP_SOURCE_ROOT` "
                                    "(default `./hvp-data/sources`).")
    catalog: str | None = Field(default=None, description="Catalog directory or fsspec URL. Empty: `HVP_CATALOG` "
                                "(default `./hvp-data/catalog`).")
    runs: str | None = Field(default=None, description="Folder of training runs. Empty: `runs` beside a local catalog.")
    datasets: list[str] | None = Field(default=None, description="Only these dataset folders (slugs). Empty: all.")


class ResolvedPaths(BaseModel):
    """Absolute paths (or URLs) a run works on."""

    source_root: str
    catalog: str
    runs: str
    datasets: list[str] | None


def absolute_path(path: str | Path) -> str:
    """A local path made absolute (against the working directory, `~` expanded); a URL as it is."""
    text = str(path)
    return text if "://" in text else str(Path(text).expanduser().resolve())


def resolve_paths(paths: PathParams, settings: Settings | None = None) -> ResolvedPaths:
    """Absolute source root, catalog and runs folder of a run (URLs are kept as they are)."""
    s = settings or get_settings()
    catalog = absolute_path(paths.catalog or s.catalog)
    if paths.runs:
        runs = absolute_path(paths.runs)
    else:
        runs = str(Path(catalog).parent / "runs") if "://" not in catalog else absolute_path("./hvp-data/runs")
    return ResolvedPaths(source_root=absolute_path(paths.source_root or s.source_root), catalog=catalog, runs=runs,
                         datasets=paths.datasets or None)


class AmgParams(BaseModel):
    """Thresholds of a SAM-style automatic mask generator; empty fields take the profile's values."""

    model_config = _FORM

    checkpoint: str | None = Field(default=None, description="Local weights file. Empty: the profile's (production: "
                                   "the settings' checkpoint; random-init when none).")
    points_per_side: int | None = Field(default=None, ge=1, le=128, description="Prompt grid side. Empty: the "
                                        "profile's, else the branch default (32).")
    pred_iou_thresh: float | None = Field(default=None, ge=0.0, le=1.0, description="Keep masks whose predicted IoU "
                                          "reaches this. Empty: the profile's, else the branch default.")
    stability_score_thresh: float | None = Field(default=None, ge=0.0, le=1.0, description="Keep masks whose stability "
                                                 "score reaches this. Empty: the profile's, else the branch "
                                                 "default.")
    extra: dict[str, Any] = Field(default_factory=dict, description="Further generator parameters by name "
                                  "(advanced; unknown names are an error naming the allowed ones).")

    def overrides(self) -> dict[str, Any]:
        """The parameters set here (thresholds and extras), for the labeler's ``params``."""
        keys = ("points_per_side", "pred_iou_thresh", "stability_score_thresh")
        return {**self.extra, **{k: getattr(self, k) for k in keys if getattr(self, k) is not None}}


class SpatialParams(AmgParams):
    """Spatial branch: SAM2 automatic masks on each image's RGB."""

    sam2_config: Sam2Config | None = Field(default=None, description="SAM2 config. Empty: the profile's (demo "
                                           "Hiera-T, production Hiera-B+).")
    image_size: int | None = Field(default=None, ge=32, description="SAM2 input side (a multiple of 32). Empty: the "
                                   "profile's (demo 128, production 1024).")


class SpectralParams(SpatialParams):
    """Spectral branch: SAM2 memory propagation through false-colour triplets along the spectrum."""

    stride: int | None = Field(default=None, ge=1, description="Bands between consecutive triplets. Empty: the "
                               "profile's, else 2.")
    max_objects: int | None = Field(default=None, ge=1, description="Most seed objects tracked. Empty: the profile's, "
                                    "else 32.")
    nms_thresh: float | None = Field(default=None, gt=0.0, le=1.0, description="IoU threshold of the intra-branch NMS. "
                                     "Empty: the profile's, else 0.7.")

    def overrides(self) -> dict[str, Any]:
        """Thresholds, extras and the spectral parameters set here."""
        extra = {k: getattr(self, k) for k in ("stride", "max_objects", "nms_thresh") if getattr(self, k) is not None}
        return {**super().overrides(), **extra}


class MaterialParams(AmgParams):
    """Material branch: HyperFree automatic masks on the full cube."""

    model: ModelName | None = Field(default=None, description="HyperFree registry model. Empty: the profile's "  # type: ignore[valid-type]
                                    "(demo `tiny`, production `hyperfree_b`).")


class LabelParams(BaseModel):
    """Pseudo-labelling and fusion: which branches, each branch's labeler, and the fusion threshold tau."""

    model_config = _FORM

    branches: list[Branch] = Field(default_factory=lambda: list(Branch), description="Branches to label with.")
    tau: float | None = Field(default=None, gt=0.0, le=1.0, description="IoU threshold of the global NMS that "
                              "fuses the branches. Empty: the profile's (0.7).")
    overlays: int = Field(default=4, ge=0, le=32, description="Overlay previews published with the fuse report.")
    spatial: SpatialParams = Field(default_factory=SpatialParams, description="Spatial branch labeler.")
    spectral: SpectralParams = Field(default_factory=SpectralParams, description="Spectral branch labeler.")
    material: MaterialParams = Field(default_factory=MaterialParams, description="Material branch labeler.")


class PretrainParams(BaseModel):
    """Pretraining of the HyperVision student on the fused pseudo-targets; empty fields take the profile's
    values."""

    model_config = _FORM

    model: ModelName | None = Field(default=None, description="Registry model to train. Empty: the profile's "  # type: ignore[valid-type]
                                    "(demo `tiny`, production the -B HyperVision layout).")
    objective: ObjectiveName | None = Field(default=None, description="Pretraining objective: `hypervision` "  # type: ignore[valid-type]
                                            "(prompted segmentation on the fused masks + distillation) or "
                                            "HyperSIGMA's `mae_spatial` / `mae_spectral` (hypersigma_* models). "
                                            "Empty: the profile's, else hypervision.")
    steps: int | None = Field(default=None, ge=1, description="Optimizer steps. Empty: the profile's.")
    batch_size: int | None = Field(default=None, ge=1, description="Crops per device and step. Empty: the "
                                   "profile's.")
    out: str | None = Field(default=None, description="Run folder. Empty: `<runs>/pretrain-<model>-<inputs key>`, so "
                            "unchanged inputs find their finished run and skip.")
    lr: float | None = Field(default=None, gt=0.0, description="Peak learning rate. Empty: the model preset's.")
    crop_size: int | None = Field(default=None, ge=16, description="Crop side in pixels. Empty: the model's input "
                                  "size.")
    lambda_distill: float = Field(default=1.0, ge=0.0, description="Weight of the distillation loss.")
    teacher_checkpoint: str | None = Field(default=None, description="Local RGB teacher weights. Empty: random-init.")
    student_checkpoint: str | None = Field(default=None, description="Initial student weights (HyperFree/HyperVision). "
                                           "Empty: random-init.")
    checkpoint_every: int | None = Field(default=None, ge=1, description="Steps between checkpoints. Empty: the "
                                         "profile's, else the preset's.")
    min_mask_pixels: int | None = Field(default=None, ge=1, description="Smallest sub-mask trained on, in pixels. "
                                        "Empty: the preset's (16).")
    nproc: int | None = Field(default=None, ge=1, description="Processes under torchrun. Empty: the visible GPUs, "
                              "or 1.")
    device: Device | None = Field(default=None, description="auto (CUDA when available), cpu or cuda. Empty: the "
                                  "profile's (auto).")
    init_strict: bool = Field(default=True, description="Load the initial student weights strictly (keys and shapes "
                              "must match the layout); off: load what matches and list what was dropped or resized.")
    preprocessing: Preprocessing = Field(default=Preprocessing.released, description="Preprocessing contract of "
                                         "the crops (model.preprocess): `released` as the released checkpoints "
                                         "were fed, or `crop_max` (each crop divided by its maximum).")


#: Downstream tasks (stages.downstream.tasks.TASKS, in report order), each a head on the frozen backbone scored
#: against a trivial baseline.
Task = StrEnum("Task", {name: name for name in ordered_tasks()})  # type: ignore[misc]

#: Each task's benchmark dataset (its TaskDef's first dataset): what an empty `benchmarks` means.
BENCHMARKS: dict[str, str] = {name: TASKS.get(name).default_dataset for name in ordered_tasks()}

#: Layouts sized for the CPU, whose heads take the tasks' "small" sizes and schedules (fixtures train in seconds);
#: every other layout takes the paper's head sizes.
SMALL_LAYOUTS = frozenset({"tiny", "hypersigma_tiny"})


def head_size_for(model: str) -> str:
    """The tasks' head size for a backbone layout: "small" for CPU-sized layouts, else "paper"."""
    return "small" if resolve_name(model) in SMALL_LAYOUTS else "paper"


def cached_feature_datasets(tasks: dict[str, str]) -> list[str]:
    """The datasets of `tasks` (task -> dataset) whose heads read cached whole-image features."""
    return [d for t, d in tasks.items() if TASKS.get(t).cached_features]


class CompareBackboneParams(BaseModel):
    """A backbone compared beside the run's own: a registry layout and its weights (a checkpoint, or random-init)."""

    model_config = _FORM

    model: ModelName = Field(description="Registry layout, e.g. `hyperfree_b` or `hypersigma_b`.")  # type: ignore[valid-type]
    checkpoint: str | None = Field(default=None, description="Weights file, pretraining checkpoint or run folder. "
                                   "Empty or `random-init`: random weights (stated as random-init in the report).")
    label: str | None = Field(default=None, description="Row name in the report. Empty: the model name.")
    seed: int = Field(default=0, description="Seed of random-init weights.")


class DownstreamParams(BaseModel):
    """Head-only adaptation after pretraining: the frozen backbone is the run's pretrained checkpoint, its
    features are cached in the catalog, one head per task trains on them and the report compares each with a
    trivial baseline and the paper's figures."""

    model_config = _FORM

    tasks: list[Task] = Field(  # type: ignore[valid-type]
        default_factory=lambda: list(Task), description="Tasks to run, each on its benchmark unless `benchmarks` "
        "says otherwise (" + ", ".join(f"{t} on `{d}`" for t, d in BENCHMARKS.items()) + "). Empty: none.")
    benchmarks: dict[Task, str] | None = Field(  # type: ignore[valid-type]
        default=None, description='Labelled dataset (slug) per task, e.g. `{"segmentation": '
        '"hyperspectral-city-v2"}`. Empty: ' + ", ".join(f"`{d}`" for d in BENCHMARKS.values()) + ".")
    steps: int | None = Field(default=None, ge=1, description="Training steps per head. Empty: by model size "
                              "(100 for tiny).")
    device: Device = Field(default=Device.auto, description="auto (CUDA when available), cpu or cuda.")
    tune: Literal["head", "full"] = Field(default="head", description="head: the backbone stays frozen; full: it "
                                          "is fine-tuned with each head (tasks that support it, e.g. "
                                          "airborne_classification; the others refuse it).")
    backbones: list[CompareBackboneParams] = Field(default_factory=list, description="Backbones the heads stage "
                                                   "compares beside the run's own (the same heads and data, one "
                                                   "report with a row per backbone per task). Empty: the run's "
                                                   "backbone only.")

    def task_datasets(self) -> dict[str, str]:
        """The chosen tasks, each with its labelled dataset."""
        given = {str(t.value): d for t, d in (self.benchmarks or {}).items()}
        return {str(t.value): given.get(str(t.value), BENCHMARKS[str(t.value)]) for t in self.tasks}


class BackboneParams(BaseModel):
    """The frozen backbone of the downstream stages: a registry layout, its weights and the preprocessing contract;
    empty fields take the profile's values."""

    model_config = _FORM

    model: ModelName | None = Field(default=None, description="Registry layout. Empty: demo `tiny`; production "  # type: ignore[valid-type]
                                    "the -B HyperVision layout (the profile's pretraining model).")
    checkpoint: str | None = Field(default=None, description="Weights file, pretraining checkpoint or run folder, or "
                                   "`random-init`. Empty: the latest finished pretraining run of this model under "
                                   "`<runs>` (random-init when there is none).")
    seed: int = Field(default=0, description="Seed of random-init weights.")
    overrides: dict[str, Any] | None = Field(default=None, description="create_model overrides, e.g. "
                                             '`{"img_size": 256}`. Empty: the model\'s downstream defaults (128 px '
                                             "for tiny).")
    preprocessing: Preprocessing | None = Field(default=None, description="Preprocessing contract of the inputs "
                                                "(model.preprocess); keep the one pretraining used. Empty: the model "
                                                "family's (`released` for HyperFree layouts, `hypersigma` for "
                                                "HyperSIGMA ones).")
    strict: bool = Field(default=True, description="Load the checkpoint strictly (keys and shapes must match the "
                         "layout).")

    def model_name(self, default: str) -> str:
        """The registry layout: the one given, else ``default`` (the profile's pretraining model)."""
        return str(self.model.value) if self.model is not None else default


#: Defaults of the flows' grouped parameters (frozen: shared safely as default values).
DEFAULT_PATHS = PathParams()
DEFAULT_LABEL = LabelParams()
DEFAULT_PRETRAIN = PretrainParams()
DEFAULT_DOWNSTREAM = DownstreamParams()
DEFAULT_BACKBONE = BackboneParams()


#: HyperFree's tuning-free tasks (stages.zeroshot.run.TASKS): the choices of the zero-shot forms.
ZeroShotTask = StrEnum("ZeroShotTask", {name: name for name in ZERO_SHOT_TASKS.names()})  # type: ignore[misc]


class Behaviour(StrEnum):
    """How the zero-shot tasks treat the released scripts' quirks (stages/zeroshot/README.md lists them)."""

    fixed = "fixed"
    released = "released"


class ZeroShotParams(BaseModel):
    """HyperFree's tuning-free tasks on airborne scenes: masks and one feature map of a frozen backbone, a few
    prompts, no training; each beside its classical baseline and the HyperFree README's figures."""

    model_config = _FORM

    tasks: list[ZeroShotTask] = Field(  # type: ignore[valid-type]
        default_factory=list, description="Tasks to run. In the DAG, empty skips the zero-shot stage; in the "
        "zeroshot deployment, empty runs every task whose annotation kind the catalog holds.")
    datasets: dict[ZeroShotTask, str] | None = Field(  # type: ignore[valid-type]
        default=None, description='Dataset (slug) per task, e.g. `{"classification": "indian-pines"}`. Empty: the '
        "first dataset holding the task's annotation kind.")
    behaviour: Behaviour = Field(default=Behaviour.fixed, description="`fixed` corrects the released scripts' "
                                 "quirks; `released` reproduces them exactly.")
    params: dict[ZeroShotTask, dict[str, Any]] | None = Field(  # type: ignore[valid-type]
        default=None, description='Per task, overrides of its released defaults, e.g. `{"anomaly": '
        '{"area_ratio_threshold": 0.001}}`.')
    relax: bool = Field(default=True, description="A prompt pixel outside every mask retries at lower thresholds "
                        "and more points (recorded) instead of failing.")
    seed: int = Field(default=0, description="Seed of the released random band draws and of the baselines.")
