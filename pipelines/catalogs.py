"""Opening the catalog at the edge: the URI and cube-store options come from the settings (``HVP_*``), so the CLI
and the flows open it one way; everything below them takes a Catalog or its URI and options as arguments."""

from __future__ import annotations

from catalog.catalog import Catalog
from infra.settings import Settings, cube_options, get_settings


def open_catalog(uri: str | None = None, settings: Settings | None = None) -> Catalog:
    """The catalog at ``uri`` (default: HVP_CATALOG) with the settings' cube options."""
    s = settings or get_settings()
    return Catalog(uri or s.catalog, **cube_options(s))
