"""The ingest flow on the temporary local Prefect server: shards of files as tasks, a summary artifact, quarantine
rows; a file whose I/O keeps failing is quarantined and the rest go on."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from catalog.catalog import Catalog
from catalog.fixtures import write_dataset
from catalog.fixtures.broken import make_broken_fixtures

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_flow_ingests_and_publishes_summary(prefect_server: None, tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client

    from pipelines.ingest import ingest_flow
    from pipelines.params import PathParams

    for slug in ("cave", "hssod", "hot-2024-nir"):
        write_dataset(slug, tmp_path / "src")
    broken = tmp_path / "broken"
    make_broken_fixtures(broken)
    (tmp_path / "src" / "nan-values").symlink_to(broken / "nan-values", target_is_directory=True)
    catalog = str(tmp_path / "cat")
    paths = PathParams(source_root=str(tmp_path / "src"), catalog=catalog)
    summary = ingest_flow(paths)
    by = {r["dataset"]: r for r in summary}
    assert by["cave"]["ingested"] == 2 and by["hssod"]["ingested"] >= 1 and by["hot-2024-nir"]["ingested"] == 2
    assert by["nan-values"] == {"dataset": "nan-values", "ingested": 0, "skipped": 0, "quarantined": 1}
    cat = Catalog(catalog)
    assert len(cat.images()) == sum(r["ingested"] for r in summary) and cat.verify().healthy
    assert list(cat.quarantine()["field"]) == ["values"]

    again = ingest_flow(paths)
    assert sum(r["skipped"] for r in again) == len(cat.images()) and sum(r["ingested"] for r in again) == 0

    import asyncio

    async def latest_artifact() -> list:
        async with get_client() as client:
            from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

            key = ArtifactFilterKey(any_=["ingest-summary"])
            return await client.read_artifacts(artifact_filter=ArtifactFilter(key=key))

    artifacts = asyncio.run(latest_artifact())
    assert artifacts and artifacts[0].type == "table"


def test_deployments_point_at_real_flows() -> None:
    import importlib
    import inspect

    from prefect import Flow

    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    assert spec["deployments"]
    for dep in spec["deployments"]:
        module_path, name = dep["entrypoint"].split(":")
        module = importlib.import_module(module_path.removesuffix(".py").replace("/", "."))
        flow = getattr(module, name)
        assert isinstance(flow, Flow), dep["name"]
        params = inspect.signature(flow.fn).parameters
        assert set(dep.get("parameters", {})) <= set(params), dep["name"]
        assert dep["work_pool"]["name"] == "local"


def test_flow_on_a_local_dask_cluster(prefect_server: None, tmp_path: Path) -> None:
    from pipelines.ingest import ingest_flow
    from pipelines.params import PathParams

    for slug in ("harvard", "hyperspectral-city-v2"):
        write_dataset(slug, tmp_path / "src")
    summary = ingest_flow(PathParams(source_root=str(tmp_path / "src"), catalog=str(tmp_path / "cat")), workers=2)
    assert {r["dataset"]: r["ingested"] for r in summary} == {"harvard": 2, "hyperspectral-city-v2": 13}
    assert Catalog(str(tmp_path / "cat")).verify().healthy


def test_a_transient_io_error_is_tried_again_and_a_lasting_one_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    from pipelines import ingest as flow_module
    from stages import ingest as stage

    calls: list[str] = []
    good = stage.FileResult("cave", "/src/cave/a.mat", "ingested", "cave/a")

    def flaky(catalog: str, folder: str, primary: str, known: str | None, options: dict) -> stage.FileResult:
        calls.append(primary)
        if primary == "dead.mat" or calls.count(primary) < 3:
            raise TimeoutError(f"storage did not answer for {primary}")
        return good

    monkeypatch.setattr(flow_module.stage, "ingest_path", flaky)
    item = {"dataset": "cave", "folder": "/src/cave", "known_sha256": None}
    assert flow_module.ingest_one("cat", {**item, "primary": "a.mat"}, {}, delay_s=0) == {"result": good.as_dict()}
    assert calls.count("a.mat") == 3  # failed twice, then read
    lost = flow_module.ingest_one("cat", {**item, "primary": "dead.mat"}, {}, delay_s=0)
    assert lost == {"error": "TimeoutError: storage did not answer for dead.mat (after 3 attempts)"}

    def broken(*args: object) -> stage.FileResult:
        raise KeyError("a bug is not retried")

    monkeypatch.setattr(flow_module.stage, "ingest_path", broken)
    assert flow_module.ingest_one("cat", {**item, "primary": "b.mat"}, {}, delay_s=0) == {
        "error": "KeyError: 'a bug is not retried'"}
