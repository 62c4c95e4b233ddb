"""Shared test fixtures: the fixture source tree (made once per session) and an isolated Prefect home."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests never touch the user's Prefect home or catalog.
os.environ.setdefault("PREFECT_HOME", str(Path(os.environ.get("TMPDIR", "/tmp")) / f"hvp-test-prefect-{os.getpid()}"))
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


@pytest.fixture(scope="session")
def fixture_sources(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """All 31 built-in subsets plus the user example, written once: (root, {slug: [FixtureImage]})."""
    from catalog.fixtures import make_fixtures

    root = tmp_path_factory.mktemp("sources")
    return root, make_fixtures(root, seed=0)
