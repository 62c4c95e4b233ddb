"""Shared test fixtures: the fixture source tree (made once per session) and an isolated Prefect home."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

# Tests never touch the user's Prefect home or catalog.
os.environ.setdefault("PREFECT_HOME", str(Path(os.environ.get("TMPDIR", "/tmp")) / f"hvp-test-prefect-{os.getpid()}"))
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


@pytest.fixture(scope="session")
def fixture_sources(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """Every built-in dataset plus the two user examples, written once: (root, {slug: [FixtureImage]})."""
    from catalog.fixtures import make_fixtures

    root = tmp_path_factory.mktemp("sources")
    return root, make_fixtures(root, seed=0)


@pytest.fixture(scope="session")
def ingested_sources(fixture_sources: tuple[Path, dict], tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """The whole fixture tree ingested once with plain stage calls: (Catalog, {slug: [FixtureImage]}, results).
    Tests that share it must not change it."""
    from catalog.catalog import Catalog
    from stages.ingest import IngestConfig, run_ingest

    root, truth = fixture_sources
    cat = Catalog(tmp_path_factory.mktemp("cat") / "catalog").init()
    return cat, truth, run_ingest(cat, IngestConfig(source_root=str(root))).files


@pytest.fixture(scope="session")
def labelled_catalog(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """The labelled fixtures of the paper's benchmarks (HSI Drive v2.0, HSSOD, HOT-2023 VIS) ingested once:
    (Catalog, source root). Downstream tests add cached features to it (each under its own backbone seed when it
    counts what is computed) and must not change anything else."""
    from catalog.catalog import Catalog
    from catalog.fixtures import write_dataset
    from stages.ingest import IngestConfig, run_ingest

    root = tmp_path_factory.mktemp("labelled-sources")
    for slug in ("hsi-drive-v2-0", "hssod", "hot-2023-vis"):
        write_dataset(slug, root)
    cat = Catalog(tmp_path_factory.mktemp("labelled") / "catalog").init()
    assert not run_ingest(cat, IngestConfig(source_root=str(root))).problems
    return cat, root


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Small tensors on a shared 2-core machine: one intra-op thread is ~10x faster than two fighting for cores
    (modules of small-model tests use it with ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The integration tier holds, beside the cases marked so, every case that starts a Prefect server (the
    `prefect_server` fixture: flows run end to end on it) and the kill -9 fault harness; the fast tier runs every
    stage through its runner without one."""
    integration = pytest.mark.integration
    for item in items:
        if "prefect_server" in getattr(item, "fixturenames", ()) or "tests/faults/" in item.nodeid:
            item.add_marker(integration)
