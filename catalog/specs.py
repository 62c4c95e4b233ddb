"""Dataset specs as data: the 31 built-in subsets (``specs/builtin.yaml``) and user ``dataset.yaml`` files.

A spec says where a dataset's images are (a glob under its folder), which reader parses them with which options,
and what the files do not say themselves (wavelengths, aligned RGB, GSD, provenance). Validation is strict:
unknown fields and wrong types are rejected with a message that names the field and the fix.
"""

from __future__ import annotations

import re
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from base.errors import InputError
from catalog.annotations import AnnotationSpec, Role, SplitSpec, check_dataset_labels, default_roles
from catalog.readers import READERS, get_reader
from catalog.readers.base import Reader, ReaderOptions

SPEC_FILENAME = "dataset.yaml"
#: Bounds on what a spec may ask for: a dataset.yaml is input like any other and may be hostile.
MAX_SPEC_BYTES = 1 << 20
MAX_YAML_ALIASES = 64
MAX_PATTERNS = 64
MAX_PATTERN_CHARS = 256
MAX_PATTERN_WILDCARDS = 16
MAX_BANDS = 4096


def slugify(name: str) -> str:
    """Folder-name form of a dataset name: 'HOT-2024 VIS' -> 'hot-2024-vis'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


class LinearWavelengths(BaseModel):
    """Evenly spaced band centres: ``count`` values from ``start`` to ``stop`` inclusive (nanometres)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    start: float
    stop: float
    count: int = Field(gt=0, le=MAX_BANDS)

    def values(self) -> np.ndarray:
        return np.linspace(self.start, self.stop, self.count)


class BandRange(BaseModel):
    """Keep bands ``[start, stop)`` of what the file holds (e.g. the 24 VNIR of 33 registered channels)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    start: int = Field(ge=0)
    stop: int = Field(gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> BandRange:
        if self.stop <= self.start:
            raise ValueError("stop must be greater than start")
        return self


class ReleasedInput(BaseModel):
    """How the released HyperVision reader fed this dataset to the released checkpoints, where that differs from the
    catalogued cube (kept lossless and as the dataset documents it). `released_input` applies it, to reproduce the
    released inputs exactly (e.g. when matching released features); the catalog itself never does."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    key: str = Field(min_length=1, description="the released reader's dataset key")
    drop_rows: dict[int, list[int]] = Field(default_factory=dict,
                                            description="image height -> rows it removes from images of that height")
    bands: BandRange | None = Field(default=None, description="the catalogued bands [start, stop) it keeps")
    keep_wavelengths_nm: list[float] | None = Field(
        default=None, description="it keeps the catalogued bands at these wavelengths (within 0.01 nm)")
    orientation: Literal["as_stored", "transpose", "rot90_cw"] = Field(
        default="as_stored", description="how it turns the image: transpose (swap x and y) or rotate 90 deg clockwise")
    wavelengths_nm: list[float] | LinearWavelengths | None = Field(
        default=None, description="the wavelengths it assigns to the kept bands, where they differ from ours")
    notes: str | None = None


class DatasetSpec(BaseModel):
    """One dataset (or subset): how to find and read its images and the facts its files do not carry."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    slug: str = ""
    format: str
    files: list[str] = Field(min_length=1, max_length=MAX_PATTERNS)
    exclude: list[str] = Field(default_factory=list, max_length=MAX_PATTERNS)
    sample_every: int = Field(default=1, ge=1, description="keep one item in every N per folder (video frames)")
    options: dict[str, Any] = Field(default_factory=dict)
    wavelengths_nm: Annotated[list[float], Field(max_length=MAX_BANDS)] | LinearWavelengths | None = None
    wavelengths_from: Literal["file"] | None = Field(default=None, description="the files carry the wavelengths "
                                                     "(the default for formats that can: envi, hsd, hdf5)")
    wavelength_units: Literal["auto", "nm", "um"] = "auto"
    out_of_range_bands: Literal["drop", "quarantine"] = Field(
        default="drop", description="bands centred outside 300-2600 nm: dropped with a note when the rest of the "
        "cube is valid, or the whole image quarantined")
    bands: int | None = Field(default=None, gt=0, description="band count after band_range")
    band_range: BandRange | None = None
    stem_suffix: str | None = Field(default=None, description="suffix of file stems dropped to give {base}")
    rgb: str | None = Field(default=None, description="aligned RGB path; {dir} {parent} {stem} {base} {path} expand")
    images: int | None = Field(default=None, ge=0, description="image count of the full public dataset")
    gsd_m: float | None = Field(default=None, gt=0)
    sensor: str | None = None
    value_scale: str | None = None
    source_url: str | None = None
    licence: str | None = None
    notes: str | None = None
    roles: list[Role] = Field(default_factory=default_roles, min_length=1,
                              description="pretraining, evaluation (labelled downstream data) or both")
    labels: AnnotationSpec | None = None
    splits: SplitSpec | None = None
    pretraining_splits: list[str] = Field(default_factory=lambda: ["train"],
                                          description="with both roles: the splits pretraining may use")
    released: ReleasedInput | None = Field(default=None, description="the released HyperVision reader's handling")

    @field_validator("files", "exclude", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("files", "exclude")
    @classmethod
    def _patterns_stay_inside(cls, v: list[str]) -> list[str]:
        for pattern in v:
            _check_relative(pattern, "pattern")
        return v

    @field_validator("rgb")
    @classmethod
    def _template_stays_inside(cls, v: str | None) -> str | None:
        if v is not None:
            _check_relative(v, "path template")
        return v

    @model_validator(mode="after")
    def _check(self) -> DatasetSpec:
        if not self.slug:
            object.__setattr__(self, "slug", slugify(self.name))
        if self.wavelengths_nm is not None and self.wavelengths_from is not None:
            raise ValueError("give either 'wavelengths_nm' or 'wavelengths_from: file', not both")
        if self.wavelengths_nm is None and self.wavelengths_from is None:
            if not get_reader(self.format).file_wavelengths:
                raise ValueError(f"'{self.format}' files carry no wavelengths: give 'wavelengths_nm' (a list, or "
                                 "start/stop/count); 'wavelengths_from: file' is for formats whose files do "
                                 f"({', '.join(sorted(n for n, r in READERS.items() if r.file_wavelengths))})")
            object.__setattr__(self, "wavelengths_from", "file")
        wl = self.wavelength_values()
        if wl is not None and self.bands is not None and len(wl) != self.bands:
            raise ValueError(f"'wavelengths_nm' has {len(wl)} values but 'bands' is {self.bands}")
        check_dataset_labels(self)
        return self

    @property
    def reader(self) -> Reader:
        return get_reader(self.format)

    def reader_options(self, path: str | Path = "<spec>") -> ReaderOptions:
        """The reader's typed options, validated against the reader's own option model."""
        reader = get_reader(self.format, path)
        try:
            return reader.Options(**self.options)
        except ValidationError as exc:
            raise InputError(path, _field_path("options", exc), _first_msg(exc),
                             f"see the '{self.format}' reader's options: "
                             f"{', '.join(reader.Options.model_fields) or 'none'}") from None

    def wavelength_values(self) -> np.ndarray | None:
        """The spec's wavelengths as floats in the spec's unit, or None when the files carry them."""
        if self.wavelengths_nm is None:
            return None
        if isinstance(self.wavelengths_nm, LinearWavelengths):
            return self.wavelengths_nm.values()
        return np.asarray(self.wavelengths_nm, dtype=np.float64)


def _check_relative(pattern: str, what: str) -> None:
    """Reject a file pattern or template that could leave its dataset folder, or cost unbounded matching."""
    parts = pattern.replace("\\", "/").split("/")
    if pattern.startswith(("/", "~")) or re.match(r"^[A-Za-z]:", pattern) or ".." in parts:
        raise ValueError(f"{what} {pattern!r} leaves the dataset folder (absolute, '~' or '..'); patterns are "
                         "relative to the folder that holds the dataset.yaml")
    if len(pattern) > MAX_PATTERN_CHARS:
        raise ValueError(f"{what} is {len(pattern)} characters long, more than {MAX_PATTERN_CHARS}")
    if sum(pattern.count(c) for c in "*?[") > MAX_PATTERN_WILDCARDS:
        raise ValueError(f"{what} {pattern!r} has more than {MAX_PATTERN_WILDCARDS} wildcards")


def _loc(loc: tuple[Any, ...]) -> str:
    """A field path from a pydantic error location, without union-member tags such as 'list[float]'."""
    return ".".join(str(p) for p in loc if not (isinstance(p, str) and ("[" in p or p[:1].isupper())))


def _field_path(prefix: str, exc: ValidationError) -> str:
    loc = _loc(exc.errors()[0]["loc"])
    return f"{prefix}.{loc}" if loc else prefix


def _first_msg(exc: ValidationError) -> str:
    err = exc.errors()[0]
    return f"{err['msg']} (got {err.get('input')!r})" if err["type"] != "missing" else "required field is missing"


_FIXES = {
    "extra_forbidden": "remove it, or check its spelling against the documented fields",
    "missing": "add it",
}


def parse_spec(data: Any, path: str | Path) -> DatasetSpec:
    """Validate one spec mapping; errors name the file, the field and the fix."""
    if not isinstance(data, dict):
        raise InputError(path, "<top level>", "a dataset spec must be a mapping of fields",
                         "write 'name: ...', 'format: ...', 'files: ...' and the wavelengths as YAML keys")
    try:
        spec = DatasetSpec(**data)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = _loc(err["loc"]) or "<spec>"
        fix = _FIXES.get(err["type"], f"expected {err['msg'].lower()}" if err["type"] != "value_error"
                         else "correct the value as the message says")
        raise InputError(path, field, _first_msg(exc), fix) from None
    spec.reader_options(path)
    return spec


def load_spec_file(path: str | Path) -> DatasetSpec:
    """Read and validate a user's ``dataset.yaml``."""
    return parse_spec(_read_yaml(Path(path)), path)


def _read_yaml(path: Path) -> Any:
    """A spec file's YAML, bounded in size and in aliases (a few nested aliases expand exponentially)."""
    size = path.stat().st_size
    if size > MAX_SPEC_BYTES:
        raise InputError(path, "<yaml>", f"{size} bytes, more than the {MAX_SPEC_BYTES} a dataset spec may have",
                         "describe the dataset with patterns and start/stop/count, not long lists")
    text = path.read_text()
    try:
        aliases = sum(isinstance(event, yaml.AliasEvent) for event in yaml.parse(text, Loader=yaml.SafeLoader))
        if aliases > MAX_YAML_ALIASES:
            raise InputError(path, "<yaml>", f"{aliases} YAML aliases, more than {MAX_YAML_ALIASES}",
                             "write the values out instead of referring to anchors")
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InputError(path, "<yaml>", f"not valid YAML ({exc})", "fix the YAML syntax") from None


BUILTIN_FILES = ("specs/builtin.yaml", "specs/airborne.yaml")
"""The built-in spec files: the pretraining subsets, then the airborne zero-shot benchmarks."""


@cache
def builtin_specs() -> dict[str, DatasetSpec]:
    """The built-in dataset subsets keyed by slug (which is also their folder name under a source root)."""
    out: dict[str, DatasetSpec] = {}
    for name in BUILTIN_FILES:
        for entry in yaml.safe_load(resources.files("catalog").joinpath(name).read_text())["datasets"]:
            spec = parse_spec(entry, f"catalog/{name}")
            if spec.slug in out:
                raise ValueError(f"duplicate built-in slug {spec.slug}")
            out[spec.slug] = spec
    return out


def spec_for_folder(folder: Path) -> DatasetSpec | None:
    """The spec of a dataset folder: its own ``dataset.yaml`` first (its slug defaults to the folder's name, so
    image ids and ``--dataset`` filters use what the user sees), else the built-in named like the folder."""
    own = folder / SPEC_FILENAME
    if own.is_file():
        data = _read_yaml(own)
        spec = parse_spec(data, own)
        return spec if "slug" in data else spec.model_copy(update={"slug": folder.name})
    return builtin_specs().get(folder.name)


def released_input(spec: DatasetSpec, cube: np.ndarray, wavelengths_nm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A catalogued cube (band, y, x) and its wavelengths as the released reader hands them to the released
    checkpoints (`spec.released`: rows dropped, bands kept, orientation, assigned wavelengths); unchanged when the
    spec records no difference."""
    rel = spec.released
    wl = np.asarray(wavelengths_nm, dtype=np.float64)
    if rel is None:
        return cube, wl
    field = f"{spec.slug}.released"
    out = np.delete(cube, rel.drop_rows.get(int(cube.shape[1]), []), axis=1)
    keep = np.arange(out.shape[0])
    if rel.bands is not None:
        keep = keep[rel.bands.start:rel.bands.stop]
    if rel.keep_wavelengths_nm is not None:
        near = np.abs(wl[keep, None] - np.asarray(rel.keep_wavelengths_nm)[None, :]) <= 0.01
        keep = keep[near.any(axis=1)]
    if not keep.size:
        raise InputError("catalog/specs/builtin.yaml", field, f"no band of this {out.shape[0]}-band cube is kept",
                         "check 'bands' and 'keep_wavelengths_nm' against the catalogued wavelengths")
    out, wl = out[keep], wl[keep]
    if rel.orientation == "transpose":
        out = out.transpose(0, 2, 1)
    elif rel.orientation == "rot90_cw":
        out = np.rot90(out, k=-1, axes=(1, 2))
    if rel.wavelengths_nm is not None:
        assigned = (rel.wavelengths_nm.values() if isinstance(rel.wavelengths_nm, LinearWavelengths)
                    else np.asarray(rel.wavelengths_nm, dtype=np.float64))
        if assigned.size != keep.size:
            raise InputError("catalog/specs/builtin.yaml", f"{field}.wavelengths_nm",
                             f"{assigned.size} wavelengths for {keep.size} kept bands", "give one per kept band")
        wl = assigned
    return np.ascontiguousarray(out), wl
