"""Garbage collection: remove what no index row reaches any more, and never anything that one does.

Garbage is a stored group that a read can no longer reach: a cube or label group that is not the location of its
image's latest index row (an old version of a changed source, a killed run's uncommitted write), a derived
false colour of such a cube, a mask group no mask-index row names, a feature group no feature-index row names,
and the temporaries of writers that are gone (killed runs' half-written outputs). Everything is measured in bytes
first; ``dry_run`` (the default) only reports.

Safe beside running writers (see catalog/storage.py for leases and locks):

- a temporary of a live writer (its lease's process still runs) is never touched;
- a group younger than ``grace_s`` (by its folder's change time, which the rename that commits it sets) is left for
  a later run: a writer commits a group by renaming it into place, then writes its index row;
- cube and label groups are removed under their image's ingest lock, after the index is read again under that
  lock: an ingest holds the lock from writing the cube to writing its row, so a cube just committed is found
  indexed, or waited for;
- a group is moved aside (renamed under this process's lease) before it is deleted, and only deleted if it is still
  the folder that was judged (same inode): a writer that replaced it meanwhile gets its folder back;
- a store whose index has no part file at all is left alone (a lost index is not an empty one).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from base.errors import CatalogError
from catalog.catalog import Catalog
from catalog.features import FeatureStore

#: Default age below which an unreferenced group is left alone: longer than any commit (rename, then index row).
GRACE_S = 3600.0


@dataclass(frozen=True)
class Garbage:
    """One unreferenced item: its kind (cube, label, falsecolor, masks, features, temporary), catalog-relative
    path and size in bytes."""

    kind: str
    rel: str
    bytes: int


@dataclass
class GcReport:
    """Outcome of ``collect_garbage``: what was removed (or, on a dry run, would be), what was left and why."""

    dry_run: bool
    garbage: list[Garbage] = field(default_factory=list)
    recent: list[str] = field(default_factory=list)
    """Unreferenced, but changed within the grace period: left for a later run."""
    live_temporaries: list[str] = field(default_factory=list)
    """Temporaries of writers still running: never touched."""
    skipped: list[str] = field(default_factory=list)
    """Whole stores left alone, and why."""
    kept: list[str] = field(default_factory=list)
    """Candidates found referenced or replaced when looked at again just before removal."""

    @property
    def bytes(self) -> int:
        """Bytes removed (or to remove, on a dry run)."""
        return sum(g.bytes for g in self.garbage)

    def by_kind(self) -> dict[str, dict[str, int]]:
        """Count and bytes per kind."""
        out: dict[str, dict[str, int]] = {}
        for g in self.garbage:
            entry = out.setdefault(g.kind, {"count": 0, "bytes": 0})
            entry["count"] += 1
            entry["bytes"] += g.bytes
        return out

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (what `hvp catalog gc --json` prints)."""
        return {"dry_run": self.dry_run, "bytes": self.bytes, "by_kind": self.by_kind(),
                "garbage": [vars(g) for g in self.garbage], "recent": self.recent,
                "live_temporaries": self.live_temporaries, "skipped": self.skipped, "kept": self.kept}

    def summary(self) -> str:
        """A few lines for a person: what went (or would go), per kind, with bytes."""
        verb = "would remove" if self.dry_run else "removed"
        lines = [f"{verb} {len(self.garbage)} items, {self.bytes} bytes"
                 + (" (dry run: pass --apply to remove them)" if self.dry_run and self.garbage else "")]
        lines += [f"  {kind}: {v['count']} ({v['bytes']} bytes)" for kind, v in sorted(self.by_kind().items())]
        if self.recent:
            lines.append(f"left {len(self.recent)} unreferenced items younger than the grace period")
        if self.live_temporaries:
            lines.append(f"left {len(self.live_temporaries)} temporaries of running writers")
        lines += [f"skipped {s}" for s in self.skipped]
        return "\n".join(lines)


def collect_garbage(catalog: Catalog, dry_run: bool = True, grace_s: float = GRACE_S) -> GcReport:
    """Find (and unless ``dry_run``, remove) the catalog's unreferenced cubes, labels, derived false colours,
    masks, features and dead writers' temporaries; returns the report with their bytes. Local catalogs only
    (removal relies on atomic renames)."""
    storage = catalog.storage
    if not storage.local:
        raise CatalogError(f"{catalog.uri}: garbage collection needs a local catalog (atomic renames); run it on "
                           "a machine that mounts the catalog as a local folder")
    report = GcReport(dry_run=dry_run)
    for tmp in storage.temporaries():
        if tmp.alive:
            report.live_temporaries.append(tmp.rel)
        else:
            report.garbage.append(Garbage("temporary", tmp.rel, _size(storage.path(tmp.rel))))
    if not dry_run:
        storage.remove_stale_temporaries()  # checks each lease again

    features = FeatureStore(catalog)
    stores: list[tuple[str, str, str, Callable[[], set[str]], bool]] = [
        # kind, folder of groups, index table, referenced locations (read afresh), under the ingest lock
        ("cube", "cubes", "index", lambda: set(_images(catalog)["location"]), True),
        ("label", "labels", "index", lambda: _labels(_images(catalog)), True),
        ("falsecolor", "derived/falsecolor", "index",
         lambda: {catalog.falsecolor_location(loc) for loc in _images(catalog)["location"]}, False),
        ("masks", "masks", "masks/index", lambda: _locations(catalog.mask_store.index(refresh=True)), False),
        ("features", "features", "features/index", lambda: _locations(features.index(refresh=True)), False),
    ]
    now = time.time()
    for kind, folder, table, referenced, locked in stores:
        groups = storage.groups(folder)
        if not groups:
            continue
        if not storage.parts(table):
            report.skipped.append(f"{kind}: {len(groups)} groups under {folder}/ but no part file in {table}/ "
                                  "(a lost index is not an empty one)")
            continue
        known = referenced()
        for rel in groups:
            if rel in known:
                continue
            path = storage.path(rel)
            try:
                st = os.stat(path)
            except FileNotFoundError:
                continue  # removed meanwhile (another collection, a repair)
            if now - max(st.st_mtime, st.st_ctime) < grace_s:
                report.recent.append(rel)
                continue
            item = Garbage(kind, rel, _size(path))
            if dry_run or _remove(catalog, rel, st.st_ino, referenced, _image_of(rel) if locked else None):
                report.garbage.append(item)
            else:
                report.kept.append(rel)
    return report


def _images(catalog: Catalog) -> pd.DataFrame:
    """The index afresh: the latest row per image (what reads reach)."""
    return catalog.images()


def _labels(images: pd.DataFrame) -> set[str]:
    return {str(v) for v in images["label_location"] if isinstance(v, str) and v}


def _locations(index: pd.DataFrame) -> set[str]:
    return set(index["location"]) if not index.empty else set()


def _image_of(rel: str) -> str:
    """The image id of a cube or label group: ``<store>/<dataset>/<key>@<sha12>.zarr`` -> ``<dataset>/<key>``."""
    return rel.split("/", 1)[1].rsplit("@", 1)[0]


def _remove(catalog: Catalog, rel: str, inode: int, referenced: Callable[[], set[str]], image_id: str | None
            ) -> bool:
    """Remove one judged group unless it became referenced or was replaced; under the image's ingest lock when
    ``image_id`` is given. Returns whether it was removed."""
    storage = catalog.storage
    if image_id is None:
        return _move_aside_and_delete(catalog, rel, inode, referenced)
    with storage.lock(f"ingest/{image_id}"):
        return _move_aside_and_delete(catalog, rel, inode, referenced)


def _move_aside_and_delete(catalog: Catalog, rel: str, inode: int, referenced: Callable[[], set[str]]) -> bool:
    storage = catalog.storage
    if rel in referenced():  # committed since the first look
        return False
    path = storage.path(rel)
    aside = storage.path(storage.temporary(rel))  # under this process's lease: a crash leaves a stale temporary
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return False
    if os.stat(aside).st_ino != inode:  # a writer replaced it after it was judged: give it back
        try:
            os.rename(aside, path)
        except OSError:  # yet another version sits there now; the moved one is a superseded write
            shutil.rmtree(aside, ignore_errors=True)
        return False
    shutil.rmtree(aside, ignore_errors=True)
    catalog.cubes.forget(rel)
    return True


def _size(path: str) -> int:
    """Bytes of a file, or of every file under a folder."""
    if not os.path.isdir(path):
        try:
            return os.stat(path).st_size
        except FileNotFoundError:
            return 0
    total = 0
    for top, _, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(top, name)).st_size
            except FileNotFoundError:
                continue
    return total

