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
