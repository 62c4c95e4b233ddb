"""Repairing what ``Catalog.verify`` found: a damaged cube is re-ingested when its source is unchanged, and
quarantined (its row dropped, its source named with the fix) when the source changed or is gone; damaged mask sets
are forgotten so the label stage makes them again; temporaries of dead writers are removed.

Nothing here raises for one image: a repair that fails is reported like the damage it tried to fix.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from base.errors import InputError
from catalog.catalog import Catalog
from catalog.problems import Problem, VerifyReport
from catalog.readers.base import SourceItem
from catalog.specs import DatasetSpec, spec_for_folder
from stages.ingest import annotate, item_for, prepare, source_sha256

REINGEST_FIX = "re-run `hvp ingest` on the dataset's folder: the current source is stored as a new cube"


@dataclass(frozen=True)
class Repair:
    """What was done about one problem: ``reingested``, ``quarantined``, ``dropped`` (masks to relabel), or
    ``failed`` (with why)."""

    image_id: str
    kind: str
    action: str
    message: str

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


def repair(catalog: Catalog, report: VerifyReport) -> list[Repair]:
    """Act on every problem of ``report`` (see the module docstring) and remove stale temporaries; returns one
    Repair per problem, in the report's order."""
    catalog.storage.remove_stale_temporaries()
    out: list[Repair] = []
    masks = [p for p in report.problems if p.kind == "masks"]
    if masks:
        catalog.mask_store.drop([(p.image_id, p.location.split("/")[1]) for p in masks])
        out += [Repair(p.image_id, p.kind, "dropped", f"{p.message}; run `hvp label` to make them again")
                for p in masks]
    for problem in report.problems:
        if problem.kind == "masks":
            continue
        try:
            out.append(_repair_image(catalog, problem) if problem.image_id else _repair_part(catalog, problem))
        except Exception as exc:  # reported, never raised: the other problems still get their repair
            out.append(Repair(problem.image_id, problem.kind, "failed", f"{type(exc).__name__}: {exc}"))
    return out


def _repair_part(catalog: Catalog, problem: Problem) -> Repair:
    """An unreadable index part: moved aside under damaged/ (its rows come back when ingest runs again)."""
    target = f"damaged/{problem.location}"
    catalog.storage.put_bytes(target, catalog.storage.read_bytes(problem.location))
    catalog.storage.remove(problem.location)
    return Repair("", problem.kind, "quarantined", f"{problem.location} moved to {target}; {REINGEST_FIX}")


def _repair_image(catalog: Catalog, problem: Problem) -> Repair:
    """Re-ingest one image from its unchanged source, or quarantine it."""
    row = catalog.row(problem.image_id)
    source = Path(str(row["source_path"]))
    key = problem.image_id.split("/", 1)[1]
    folder = source.parents[key.count("/")]
    spec = spec_for_folder(folder) if folder.is_dir() else None
    why = None
    if spec is None or not source.is_file():
        why = "its source file is gone"
    else:
        item = item_for(folder, spec, source.relative_to(folder).as_posix())
        if source_sha256(item) != row["sha256"]:
            why = "its source changed since it was ingested"
    if why is not None:
        message = f"stored cube is {problem.kind} ({problem.message}) and {why}"
        catalog.add_quarantine(str(row["dataset"]), str(source), "CatalogError", "cube", message, REINGEST_FIX)
        catalog.drop_images([problem.image_id])
        catalog.storage.remove(str(row["location"]))
        return Repair(problem.image_id, problem.kind, "quarantined", message)
    assert spec is not None
    if problem.location.startswith("labels/"):
        return _repair_label(catalog, problem, row, spec, item)
    with catalog.storage.lock(f"ingest/{problem.image_id}"):
        catalog.storage.remove(str(row["location"]))
        try:
            catalog.write_cube(prepare(spec, item, str(row["sha256"])), commit=False)
        except InputError as exc:  # the same bytes now fail validation: a reader or rule changed since
            catalog.add_quarantine(str(row["dataset"]), exc.path, "InputError", exc.field, exc.problem, exc.fix)
            catalog.drop_images([problem.image_id])
            return Repair(problem.image_id, problem.kind, "quarantined", str(exc))
    return Repair(problem.image_id, problem.kind, "reingested", f"rewritten from {source} (sha256 unchanged)")


def _repair_label(catalog: Catalog, problem: Problem, row: Any, spec: DatasetSpec, item: SourceItem) -> Repair:
    """Rewrite one image's damaged label group from its unchanged label file (the cube is left alone); a label
    file that changed since ingest is left to a new ingest."""
    labels = annotate.resolve(spec, item)
    if labels.label_sha256 != row.get("label_sha256"):
        return Repair(problem.image_id, problem.kind, "failed", f"its label group is {problem.kind} and its label "
                      f"file changed since it was ingested; {REINGEST_FIX}")
    with catalog.storage.lock(f"ingest/{problem.image_id}"):
        catalog.storage.remove(problem.location)
        annotate.attach(catalog, spec, item, labels, prepare(spec, item, str(row["sha256"])))
    return Repair(problem.image_id, problem.kind, "reingested", f"label rewritten from {labels.label_path} "
                  "(sha256 unchanged)")
