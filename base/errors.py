"""Errors that name the file, the field and the fix, so a data engineer can act on them without reading code."""

from __future__ import annotations

from pathlib import Path


class InputError(ValueError):
    """Bad input: a source file or spec that cannot be ingested as it is.

    Every instance carries the offending ``path``, the ``field`` that is wrong and the ``fix`` to apply; the
    quarantine table stores these three so a rejected file can be repaired and re-ingested.
    """

    def __init__(self, path: str | Path, field: str, problem: str, fix: str) -> None:
        self.path = str(path)
        self.field = field
        self.problem = problem
        self.fix = fix
        super().__init__(f"{self.path}: field '{field}': {problem}. Fix: {fix}")


class CatalogError(RuntimeError):
    """The catalog itself is inconsistent or unreachable (not the fault of one source file)."""


class CorruptChunkError(CatalogError):
    """A stored chunk failed its checksum or could not be decoded: the catalog would return wrong bytes.

    Names the image, the array, the chunk (its grid index) and the file, and says how to repair it
    (`hvp catalog verify --repair` re-ingests the image when its source is unchanged).
    """

    def __init__(self, image_id: str, array: str, chunk: tuple[int, ...], path: str, problem: str) -> None:
        self.image_id = image_id
        self.array = array
        self.chunk = tuple(int(c) for c in chunk)
        self.path = path
        self.problem = problem
        super().__init__(
            f"{image_id}: chunk {self.chunk} of array '{array}' ({path}) is corrupt: {problem}. "
            "Fix: run `hvp catalog verify --repair` to re-ingest the image from its unchanged source "
            "(or re-ingest it after restoring the source file)."
        )
