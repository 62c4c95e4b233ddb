"""Profiles as data, and the one resolver: ``resolve(profile, paths, label, pretrain, downstream) -> RunConfig``.

A profile is a YAML file beside this module (``demo.yaml``, ``production.yaml``, ``test.yaml``) holding the same
groups and fields as the flows' parameters (pipelines.params). Resolution layers, last wins:

1. the profile file;
2. where the profile says ``environment: true`` (production), the ``HVP_*`` labeller settings that are set
   (``HVP_SAM2_MODEL``, ``HVP_SAM2_CHECKPOINT``, ``HVP_*_PARAMS``, ``HVP_HYPERFREE_*``, ``HVP_FUSE_TAU``);
3. the fields given to the flow, the CLI or the test (empty ones leave the value below them).

The result is typed and grouped: absolute paths, one `LabelerSpec` per branch, the stage configs each runner
takes (`RunConfig.ingest`, `.label(branch)`, `.fuse`, `.pretrain`), the downstream parameters as given.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field

from infra.settings import Settings, get_settings
from pipelines.params import (
    DEFAULT_DOWNSTREAM,
    DEFAULT_LABEL,
    DEFAULT_PATHS,
    DEFAULT_PRETRAIN,
    AmgParams,
    DownstreamParams,
    LabelParams,
    MaterialParams,
    PathParams,
    PretrainParams,
    Profile,
    ResolvedPaths,
    SpatialParams,
    SpectralParams,
    absolute_path,
    resolve_paths,
)
from stages.ingest import IngestConfig
from stages.labelling.label import BRANCHES, FuseConfig, LabelConfig, LabelerSpec
from stages.pretraining.run import PretrainStageConfig

#: Folder of the profile files.
PROFILE_DIR = Path(__file__).resolve().parent
if {p.stem for p in PROFILE_DIR.glob("*.yaml")} != {p.value for p in Profile}:  # pragma: no cover - drift guard
    raise ImportError(f"pipelines/profiles holds {sorted(p.stem for p in PROFILE_DIR.glob('*.yaml'))} but "
                      f"pipelines.params.Profile lists {[p.value for p in Profile]}: update the enum")


class ProfileFile(BaseModel):
    """One profile file: what it is for, whether it writes fixtures and takes the environment, and its groups."""

    model_config = ConfigDict(extra="forbid")

    description: str
    fixtures: bool = Field(default=False, description="write the fixture sources when the source root is empty")
    environment: bool = Field(default=False, description="HVP_* labeller settings override this profile")
    label: LabelParams = DEFAULT_LABEL
    pretrain: PretrainParams = DEFAULT_PRETRAIN
    downstream: DownstreamParams = DEFAULT_DOWNSTREAM


@cache
def load_profile(profile: Profile | str) -> dict[str, Any]:
    """A profile file's contents (validated against `ProfileFile`, returned as the plain dict that was given)."""
    name = Profile(profile).value
    path = PROFILE_DIR / f"{name}.yaml"
    data = yaml.safe_load(path.read_text()) or {}
    ProfileFile.model_validate(data)  # a typo in a profile fails here, naming the field
    return dict(data)


class ResolvedLabel(BaseModel):
    """The labelers of every branch (fusion names all three), the branches that label, tau and overlays."""

    branches: list[str]
    labelers: dict[str, LabelerSpec]
    tau: float
    overlays: int


class RunConfig(BaseModel):
    """A run's resolved configuration: what every stage of it takes, and what is written beside its outputs."""

    profile: Profile
    fixtures: bool
    paths: ResolvedPaths
    label: ResolvedLabel
    pretrain: PretrainStageConfig
    downstream: DownstreamParams

    @property
    def ingest(self) -> IngestConfig:
        """The ingest stage's config."""
        return IngestConfig(source_root=self.paths.source_root, datasets=self.paths.datasets)

    def label_config(self, branch: str) -> LabelConfig:
        """One branch's label stage config."""
        return LabelConfig.model_validate({"branch": branch, "labeler": self.label.labelers[branch],
                                           "datasets": self.paths.datasets})

    @property
    def fuse(self) -> FuseConfig:
        """The fuse stage's config."""
        return FuseConfig.model_validate({"labelers": self.label.labelers, "tau": self.label.tau,
                                          "overlays": self.label.overlays, "datasets": self.paths.datasets})


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` laid on ``base``, dicts merged key by key (other values replaced)."""
    out = dict(base)
    for key, value in over.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def given(params: BaseModel) -> dict[str, Any]:
    """The fields a caller set on a parameter group (empty and untouched ones left to the layers below)."""
    return params.model_dump(mode="json", exclude_none=True, exclude_unset=True)


def _branch_fields(params: dict[str, Any], form: type[AmgParams]) -> dict[str, Any]:
    """Labeller parameters split into the form's own fields and its ``extra`` (every other generator key)."""
    own = set(form.model_fields) - {"extra", "checkpoint"}
    fields = {k: v for k, v in params.items() if k in own}
    extra = {k: v for k, v in params.items() if k not in own}
    return {**fields, **({"extra": extra} if extra else {})}


def environment_layer(s: Settings) -> dict[str, Any]:
    """The labeller settings that are set (``HVP_*``), as a `LabelParams`-shaped layer."""
    label: dict[str, Any] = {}
    for branch, form, params in (("spatial", SpatialParams, s.spatial_params),
                                 ("spectral", SpectralParams, s.spectral_params),
                                 ("material", MaterialParams, s.material_params)):
        layer = _branch_fields(params, form)
        if branch != "material":
            if s.sam2_model:
                layer.update(sam2_config=s.sam2_model["config"], image_size=s.sam2_model["image_size"])
            if s.sam2_checkpoint:
                layer["checkpoint"] = str(s.sam2_checkpoint)
        else:
            if s.hyperfree_model:
                layer["model"] = s.hyperfree_model["model"]
            if s.hyperfree_checkpoint:
                layer["checkpoint"] = str(s.hyperfree_checkpoint)
        if layer:
            label[branch] = layer
    if s.fuse_tau is not None:
        label["tau"] = s.fuse_tau
    return {"label": label} if label else {}


def labeler_spec(params: AmgParams) -> LabelerSpec:
    """A branch form, resolved, as the labeler spec its stage takes (checkpoint made absolute)."""
    if isinstance(params, SpatialParams):
        model: dict[str, Any] = {"config": params.sam2_config.value if params.sam2_config else None,
                                 "image_size": params.image_size}
    else:
        assert isinstance(params, MaterialParams)
        model = {"model": params.model.value if params.model else None}
    missing = [k for k, v in model.items() if v is None]
    if missing:
        raise ValueError(f"the profile gives the {type(params).__name__} no {missing}: set them in "
                         "pipelines/profiles/<profile>.yaml or in the run's parameters")
    return LabelerSpec(model=model, checkpoint=absolute_path(params.checkpoint) if params.checkpoint else None,
                       params=params.overrides())


def resolve(profile: Profile | str = Profile.demo, paths: PathParams = DEFAULT_PATHS,
            label: LabelParams = DEFAULT_LABEL, pretrain: PretrainParams = DEFAULT_PRETRAIN,
            downstream: DownstreamParams = DEFAULT_DOWNSTREAM, settings: Settings | None = None,
            resume: bool = False) -> RunConfig:
    """The one resolver: profile file, then (where the profile takes it) the environment, then the given fields."""
    s = settings or get_settings()
    name = Profile(profile)
    base = load_profile(name)
    layers = merge(base, environment_layer(s)) if base.get("environment") else base
    layers = merge(layers, {"label": given(label), "pretrain": given(pretrain), "downstream": given(downstream)})
    form = ProfileFile.model_validate(layers)
    p = resolve_paths(paths, s)
    lab = form.label
    labelers = {b: labeler_spec(getattr(lab, b)) for b in BRANCHES}
    if lab.tau is None:
        raise ValueError(f"the {name.value} profile sets no label.tau: add it to pipelines/profiles/{name.value}.yaml")
    resolved_label = ResolvedLabel(branches=[b.value for b in lab.branches] or list(BRANCHES), labelers=labelers,
                                   tau=lab.tau, overlays=lab.overlays)
    pre = form.pretrain.model_dump(mode="json", exclude_none=True)
    out = pre.pop("out", None)
    stage = PretrainStageConfig.model_validate({**pre, "out_dir": absolute_path(out) if out else None,
                                                "runs": p.runs, "datasets": p.datasets, "resume": resume,
                                                **{k: absolute_path(pre[k]) for k in ("teacher_checkpoint",
                                                                                     "student_checkpoint")
                                                   if k in pre}})
    return RunConfig(profile=name, fixtures=form.fixtures, paths=p, label=resolved_label, pretrain=stage,
                     downstream=form.downstream)


def pretrain_model(profile: Profile | str) -> str:
    """The profile's pretraining model (the downstream stages' frozen layout when none is named)."""
    model = load_profile(profile).get("pretrain", {}).get("model")
    if not model:
        raise ValueError(f"the {Profile(profile).value} profile names no pretrain.model: add it to its YAML file")
    return str(model)


def ensure_sources(run: RunConfig) -> None:
    """A profile that says ``fixtures: true`` (demo) makes the fixture sources when the source root is empty or
    missing, and says so."""
    source_root = run.paths.source_root
    root = Path(source_root)
    if not run.fixtures or "://" in source_root or (root.is_dir() and any(root.iterdir())):
        return
    from catalog.fixtures import make_fixtures

    written = make_fixtures(root)
    print(f"source root {root} was empty: wrote fixtures of {len(written)} datasets "
          f"({sum(map(len, written.values()))} images) there ({run.profile.value} profile)")
