"""Ingest stage: source folders in native formats -> validated, wavelength-annotated cubes in the catalog.

Plain functions, no orchestration: ``plan`` lists the work (one item per source image) from a source root,
``ingest_item`` stores one image or quarantines it with an error that names the file, the field and the fix.
The stage's runner is ``run_ingest(catalog, IngestConfig) -> IngestResult``: ``start_ingest`` (plan, record the
config and the unusable folders), ``ingest_path`` per item, ``finish_ingest`` (compact, count). The Prefect flow
(pipelines/ingest.py) maps ``ingest_path`` between the same two calls.
"""

from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from base.errors import InputError
from catalog.annotation_store import ingest_fingerprint, stored_fingerprints
from catalog.catalog import Catalog
from catalog.cubes.dtypes import dtype_sample, lossless_dtype
from catalog.cubes.writer import CubeWrite
from catalog.readers.base import BandSubset, SourceItem, load_rgb
from catalog.specs import SPEC_FILENAME, DatasetSpec, spec_for_folder
from catalog.validate import cube_shape, wavelengths_nm
from stages.ingest import annotate, discover
from stages.ingest.discover import item_for, list_items
from stages.registry import record_config, register_stage

STAGE_VERSION = "1"
#: Errors reading a source file that a retry cannot cure: the file is quarantined at once.
UNREADABLE = (PermissionError, FileNotFoundError, IsADirectoryError, NotADirectoryError)
Status = Literal["ingested", "skipped", "quarantined"]


@dataclass(frozen=True)
class WorkItem:
    """One source image to ingest, described by paths and strings only (safe to pass between tasks)."""

    dataset: str
    folder: str
    primary: str
    known_sha256: str | None = None
    """The stored image's ingest fingerprint: its source sha256, plus its label sha256 where it has labels."""


@dataclass
class Plan:
    """The work found under a source root, plus folders or specs that could not be used (already explained)."""

    items: list[WorkItem] = field(default_factory=list)
    problems: list[tuple[str, str, InputError]] = field(default_factory=list)  # (dataset, path, error)


class IngestConfig(BaseModel):
    """What the ingest stage reads: the source root (one folder per dataset) and, optionally, which folders."""

    model_config = ConfigDict(extra="forbid")

    source_root: str = Field(description="folder of dataset folders (absolute, as resolved by the caller)")
    datasets: list[str] | None = Field(default=None, description="only these dataset folders (slugs); None: all")


@dataclass
class FileResult:
    """What happened to one source image."""

    dataset: str
    source_path: str
    status: Status
    image_id: str | None = None
    message: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------- discovery
def plan(source_root: str | Path, catalog: Catalog | None = None, datasets: list[str] | None = None) -> Plan:
    """List the work under ``source_root`` (one folder per dataset), with the sha256 already catalogued per image
    so unchanged images are skipped cheaply. A folder with no usable spec becomes a problem, not a crash."""
    source_root = Path(source_root).absolute()
    if not source_root.is_dir():
        raise InputError(source_root, "SOURCE_DIR", "not a directory", "pass the folder that holds one folder per "
                         "dataset (e.g. the output of `hvp fixtures make`)")
    known = stored_fingerprints(catalog.images()) if catalog is not None else {}
    out = Plan()
    for folder in sorted(p for p in source_root.iterdir() if not p.name.startswith(".")):
        if datasets and folder.name not in datasets:
            continue
        if folder.is_symlink():  # a dataset folder may be a link to elsewhere, but one that resolves
            _, problem = discover.link_problem(folder, "SOURCE_DIR", ["/"])
            if problem is not None:
                out.problems.append((folder.name, str(folder), problem))
                continue
        if not folder.is_dir():
            continue
        try:
            spec = spec_for_folder(folder)
            if spec is None:
                raise InputError(folder, SPEC_FILENAME, "no dataset.yaml and the folder name is not a built-in "
                                 "dataset", "add a dataset.yaml (see README) or rename the folder to a built-in "
                                 "slug (`hvp datasets`)")
            items, problems = list_items(folder, spec, source_root)
            out.problems += [(spec.slug, exc.path, exc) for exc in problems]
            if not items and not problems:
                raise InputError(folder, "files", f"no file matches {spec.files}",
                                 "check the 'files' glob against the folder's layout")
        except InputError as exc:
            out.problems.append((folder.name, str(folder), exc))
            continue
        for it in items:
            rel = it.primary.relative_to(it.root).as_posix()
            out.items.append(WorkItem(spec.slug, str(folder), rel, known.get(f"{spec.slug}/{it.key}")))
    return out


# ---------------------------------------------------------------------------------------------- one image
def source_sha256(item: SourceItem, block: int = 1 << 20) -> str:
    """Content hash of every file that makes up the image (path relative to the dataset folder + bytes)."""
    outer = hashlib.sha256()
    for path in item.files:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            while chunk := fh.read(block):
                h.update(chunk)
        outer.update(path.relative_to(item.root).as_posix().encode() + b"\0" + h.digest())
    return outer.hexdigest()


def ingest_item(catalog: Catalog, spec: DatasetSpec, item: SourceItem, known_sha256: str | None = None,
                on_strip: Any = None) -> FileResult:
    """Read, validate and store one image; bad input is quarantined (never raised), and so is a source file that
    cannot be read for good (no permission, gone); other I/O errors propagate so the caller can retry. An unchanged
    image (same source sha256 and labels as catalogued) writes nothing; a bad label quarantines the image before
    anything of it is written (stages/ingest/annotate.py). Ingests of the same image at once are serialised by a
    lock: the second waits, then finds the image stored and skips it."""
    src = os.path.abspath(item.primary)
    image_id = f"{spec.slug}/{item.key}"
    try:
        if known_sha256 is None and catalog.storage.local:
            labels = annotate.resolve(spec, item)
            with catalog.storage.lock(f"ingest/{image_id}"):
                if not catalog.has_cube(spec.slug, item.key):
                    return _ingest_new(catalog, spec, item, labels, src, image_id, on_strip)
        sha = source_sha256(item)
        labels = annotate.resolve(spec, item)
        location = catalog.location_for(spec.slug, item.key, sha)
        if known_sha256 == ingest_fingerprint(sha, labels.label_sha256) and catalog.is_complete(location):
            return FileResult(spec.slug, src, "skipped", image_id, "unchanged (same source sha256 and labels)")
        with catalog.storage.lock(f"ingest/{image_id}"):
            if catalog.is_complete(location) and catalog.indexed(image_id, sha, labels.label_sha256):
                return FileResult(spec.slug, src, "skipped", image_id,
                                    "already catalogued (same source sha256 and labels)")
            cw = prepare(spec, item, sha)
            annotate.attach(catalog, spec, item, labels, cw)
            catalog.write_cube(cw, on_strip=on_strip)
        return FileResult(spec.slug, src, "ingested", image_id, cw.attrs.get("note", ""))
    except InputError as exc:
        path = os.path.abspath(exc.path)
        catalog.add_quarantine(spec.slug, path, type(exc).__name__, exc.field, exc.problem, exc.fix)
        return FileResult(spec.slug, src, "quarantined", None, str(exc))
    except OSError as exc:
        sources = {f.absolute() for f in item.files}
        if not (isinstance(exc, UNREADABLE) and exc.filename and Path(exc.filename).absolute() in sources):
            raise  # transient, or the catalog's own storage: the caller retries or reports it
        path = os.path.abspath(exc.filename)
        problem = f"cannot read the file ({exc.strerror or type(exc).__name__})"
        fix = "make the file readable by the user running ingest (or remove it), then re-run ingest"
        catalog.add_quarantine(spec.slug, path, type(exc).__name__, "file", problem, fix)
        return FileResult(spec.slug, src, "quarantined", None, f"{path}: field 'file': {problem}. Fix: {fix}")
    except Exception as exc:  # a reader choked on malformed content: quarantine it, keep the run going
        message = f"{type(exc).__name__}: {exc}"
        catalog.add_quarantine(spec.slug, src, type(exc).__name__, "file", message,
                               "the file is malformed for its format; re-export it, or report a reader bug with it")
        return FileResult(spec.slug, src, "quarantined", None, f"{src}: {message}")


def _ingest_new(catalog: Catalog, spec: DatasetSpec, item: SourceItem, labels: Any, src: str, image_id: str,
                on_strip: Any) -> FileResult:
    """Store an image the catalog has never held (the caller holds its ingest lock): the source is hashed on a
    thread while the cube is written to a temporary, which then moves to the location the hash names. There is
    no stored version to compare with, so nothing waits for the hash before the write."""
    with ThreadPoolExecutor(1, thread_name_prefix="hvp-source-hash") as pool:
        hashing = pool.submit(source_sha256, item)
        try:
            cw = prepare(spec, item, "")
            annotate.attach(catalog, spec, item, labels, cw)
            catalog.write_cube(cw, on_strip=on_strip, source_sha256=hashing.result)
        finally:
            hashing.cancel()
    return FileResult(spec.slug, src, "ingested", image_id, cw.attrs.get("note", ""))


@dataclass
class IngestResult:
    """What one ingest run did: each source file's result, the folders that could not be used, and the
    per-dataset counts (``summary``)."""

    files: list[FileResult]
    problems: list[tuple[str, str, InputError]]
    summary: list[dict[str, Any]]


def start_ingest(catalog: Catalog, config: IngestConfig) -> Plan:
    """The first step of a run: plan the work, record the resolved config and quarantine unusable folders."""
    work = plan(config.source_root, catalog, config.datasets)
    record_config(catalog, "ingest", config)
    record_problems(catalog, work.problems)
    return work


def finish_ingest(catalog: Catalog, work: Plan, files: list[FileResult]) -> IngestResult:
    """The last step of a run: compact the catalog (which also clears a killed writer's temporaries) and count."""
    catalog.compact()
    return IngestResult(files, work.problems, summarize(files, work.problems))


@register_stage("ingest", IngestConfig, "source folders -> validated cubes in the catalog (bad files quarantined)")
def run_ingest(catalog: Catalog, config: IngestConfig,
               on_item: Callable[[FileResult], None] | None = None) -> IngestResult:
    """Ingest every file under the source root in this process, one after another (``on_item`` sees each result
    as it lands); unchanged files are skipped by sha256, so a rerun does only what is left."""
    work = start_ingest(catalog, config)
    files = []
    for w in work.items:
        spec = spec_for_folder(Path(w.folder))
        assert spec is not None  # plan() only lists folders with a spec
        files.append(ingest_item(catalog, spec, item_for(Path(w.folder), spec, w.primary), w.known_sha256))
        if on_item is not None:
            on_item(files[-1])
    return finish_ingest(catalog, work, files)


def ingest_path(catalog_uri: str, folder: str, primary: str, known_sha256: str | None = None,
                options: dict[str, Any] | None = None) -> FileResult:
    """``ingest_item`` from paths and strings only: what a task or a worker process calls (``options``: the
    Catalog's cube-store options)."""
    spec = spec_for_folder(Path(folder))
    if spec is None:
        raise InputError(folder, SPEC_FILENAME, "the dataset has no spec", "add a dataset.yaml")
    item = item_for(Path(folder), spec, primary)
    return ingest_item(Catalog(catalog_uri, **(options or {})), spec, item, known_sha256)


def prepare(spec: DatasetSpec, item: SourceItem, sha: str) -> CubeWrite:
    """Read the image lazily and check everything but the pixel values (those are checked strip by strip)."""
    path = item.primary
    options = spec.reader_options(path)
    raw = spec.reader.read(item, options)
    data = raw.data
    file_wl = raw.wavelengths
    file_fwhm = raw.fwhm
    if spec.band_range is not None:
        br = spec.band_range
        if br.stop > data.shape[0]:
            raise InputError(path, "band_range", f"stop {br.stop} exceeds the file's {data.shape[0]} bands",
                             "fix 'band_range' in the dataset spec")
        data = BandSubset(data, br.start, br.stop)
        file_wl = None if file_wl is None else np.asarray(file_wl)[br.start:br.stop]
        file_fwhm = None if file_fwhm is None else np.asarray(file_fwhm)[br.start:br.stop]
    cube_shape(tuple(data.shape), np.dtype(data.dtype), path, spec.bands)
    bands, height, width = (int(s) for s in data.shape)
    if spec.wavelengths_from == "file":
        if file_wl is None:
            raise InputError(path, "wavelength", "the spec says the file carries wavelengths but it has none",
                             "add the band centres to the file's header, or give 'wavelengths_nm' in the spec")
        units = raw.wavelength_units if spec.wavelength_units == "auto" else spec.wavelength_units
        wl = wavelengths_nm(file_wl, units, bands, path, "file", file_fwhm, spec.out_of_range_bands)
    else:
        values = spec.wavelength_values()
        assert values is not None  # guaranteed by the spec's validator
        units = None if spec.wavelength_units == "auto" else spec.wavelength_units
        wl = wavelengths_nm(values, units, bands, path, "spec 'wavelengths_nm'", file_fwhm, spec.out_of_range_bands)
    if wl.keep is not None:  # out-of-range bands at the ends are left out
        data = BandSubset(data, wl.keep.start, wl.keep.stop)
    rgb, rgb_note = raw.rgb, ""
    if rgb is None and item.rgb is not None:
        rgb = load_rgb(item.rgb)
    if rgb is not None and tuple(rgb.shape[:2]) != (height, width):
        rgb_note = f"aligned RGB skipped: its size {rgb.shape[:2]} differs from the cube's {(height, width)}"
        rgb = None
    reader = spec.reader
    attrs: dict[str, Any] = {
        "source_path": str(path), "source_files": [f.relative_to(item.root).as_posix() for f in item.files],
        "sensor": spec.sensor, "gsd_m": spec.gsd_m, "value_scale": spec.value_scale,
        "reader": reader.name, "reader_version": reader.version, "ingest_stage_version": STAGE_VERSION,
        "dataset_name": spec.name, "wavelength_note": wl.unit_note, "native_dtype": np.dtype(data.dtype).str,
        **{f"file_{k}": v for k, v in raw.attrs.items()},
    }
    if wl.band_note:
        attrs["band_note"] = wl.band_note
    if notes := "; ".join(n for n in (wl.band_note, rgb_note) if n):
        attrs["note"] = notes
    # the smallest lossless storage dtype (integer-valued floats, e.g. MATLAB doubles holding counts, stay
    # integers), guessed from a sample; the writer checks every chunk and widens if the guess was too narrow
    store_dtype = lossless_dtype(dtype_sample(data), np.dtype(data.dtype))
    return CubeWrite(dataset=spec.slug, image_id=f"{spec.slug}/{item.key}", key=item.key, sha256=sha, data=data,
                     wavelength_nm=wl.nm, fwhm_nm=wl.fwhm_nm, rgb=rgb, extras=raw.extras, attrs=attrs,
                     store_dtype=store_dtype)


def new_dataset_folders(source_root: Path, catalog: Catalog) -> list[str]:
    """Dataset folders under ``source_root`` with nothing in the catalog yet (neither images nor a quarantined
    spec): what a scheduled relabel run should ingest."""
    source_root = Path(source_root)
    if not source_root.is_dir():
        return []
    known = set(catalog.images()["dataset"])
    q = catalog.quarantine()
    rejected = set(q["source_path"]) if not q.empty else set()
    out = []
    for folder in sorted(p for p in source_root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        try:
            spec = spec_for_folder(folder)
        except InputError:
            spec = None
        seen = (spec.slug if spec else folder.name) in known
        if not seen and not {str(folder), str(folder / SPEC_FILENAME)} & rejected:
            out.append(folder.name)
    return out


def summarize(results: list[FileResult], problems: list[tuple[str, str, InputError]]) -> list[dict[str, Any]]:
    """Per-dataset counts of ingested / skipped / quarantined (spec problems count as quarantined)."""
    counts: dict[str, dict[str, int]] = defaultdict(lambda: {"ingested": 0, "skipped": 0, "quarantined": 0})
    for r in results:
        counts[r.dataset][r.status] += 1
    for dataset, _, _ in problems:
        counts[dataset]["quarantined"] += 1
    return [{"dataset": d, **c} for d, c in sorted(counts.items())]


def record_problems(catalog: Catalog, problems: list[tuple[str, str, InputError]]) -> None:
    """Quarantine rows for dataset folders whose spec could not be used."""
    for dataset, _, exc in problems:
        catalog.add_quarantine(dataset, exc.path, type(exc).__name__, exc.field, exc.problem, exc.fix)
