"""What `Catalog.verify` finds: one `Problem` per damaged image or group, gathered in a `VerifyReport` (a module of
its own so that the catalog's parts can report problems without importing the catalog)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Problem:
    """One thing wrong in the catalog: the image (empty for catalog-level damage), its kind (missing, partial,
    corrupt, masks, index), the location and what was found."""

    image_id: str
    kind: str
    location: str
    message: str


@dataclass
class VerifyReport:
    """Outcome of ``Catalog.verify``: the healthy count, every problem found, orphan groups and temporaries."""

    ok: int = 0
    problems: list[Problem] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)
    """Temporaries whose writer is gone (``compact`` or ``verify --repair`` removes them)."""
    in_progress: list[str] = field(default_factory=list)
    """Temporaries of writers still running."""

    def _ids(self, kind: str) -> list[str]:
        return [p.image_id for p in self.problems if p.kind == kind]

    @property
    def missing(self) -> list[str]:
        """Images whose cube group is gone."""
        return self._ids("missing")

    @property
    def partial(self) -> list[str]:
        """Images whose cube group was never completed."""
        return self._ids("partial")

    @property
    def corrupt(self) -> list[str]:
        """Images whose cube fails its checksums or cannot be read."""
        return self._ids("corrupt")

    @property
    def healthy(self) -> bool:
        """True when every indexed image reads back as written (orphans and temporaries are not damage)."""
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (what `hvp catalog verify --json` prints)."""
        return {"healthy": self.healthy, "ok": self.ok, "problems": [vars(p) for p in self.problems],
                "missing": self.missing, "corrupt": self.corrupt, "partial": self.partial, "orphans": self.orphans,
                "stale_temporaries": self.stale, "live_temporaries": self.in_progress}
