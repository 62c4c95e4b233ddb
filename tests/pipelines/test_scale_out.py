"""Scale-out: the catalog on fsspec URLs (``file://``, ``memory://``) gives what a plain path gives, and the ingest
and label flows run on a two-worker Dask cluster through prefect-dask (bench/scale.py measures the speedup)."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pytest

from catalog.catalog import Catalog
from catalog.fixtures import write_dataset
from tests.faults import harness as faults


def _content(cat: Catalog) -> tuple[list[dict], dict[tuple[str, str], bytes]]:
    index = cat.images().drop(columns=["ingested_at"]).to_dict("records")
    store = cat.mask_store
    masks = {(r["image_id"], r["labeler_id"]): store.read_packed(r["image_id"], labeler_id=r["labeler_id"]).bits
             .tobytes() for r in store.index().to_dict("records")}
    return index, masks


def test_memory_and_file_urls_hold_what_a_path_holds(tmp_path: Path) -> None:
    write_dataset("hot-2024-rednir", tmp_path / "src")
    uris = [str(tmp_path / "plain"), f"file://{tmp_path / 'url'}", f"memory://hvp-test-{uuid.uuid4().hex[:8]}"]
    contents = []
    for uri in uris:
        for stage in ("ingest", "label", "fuse"):
            faults.run_stage(stage, uri, str(tmp_path / "run"), str(tmp_path / "src"))
        cat = Catalog(uri)
        report = cat.verify()
        assert report.healthy and report.ok == 2, (uri, report.as_dict())
        contents.append(_content(cat))
        image = cat.images().iloc[0]
        np.testing.assert_array_equal(cat.read_crop(image["location"], 2, 3, 4),
                                      cat.open(image["image_id"]).values[:, 2:6, 3:7])
    assert contents[0][0] == contents[1][0] == contents[2][0]  # the same index rows
    assert contents[0][1] == contents[1][1] == contents[2][1] and len(contents[0][1]) == 8  # and the same masks


@pytest.fixture(scope="module")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.mark.integration
def test_ingest_and_label_flows_on_two_dask_workers_with_a_file_url(prefect_server: None, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from distributed import LocalCluster
    from prefect_dask import DaskTaskRunner

    from infra.settings import get_settings
    from pipelines.ingest import ingest_flow
    from pipelines.label import label_flow
    from pipelines.params import PathParams, Profile
    from stages.labelling import label as stage

    monkeypatch.setenv("HVP_LABEL_BATCH", "1")
    get_settings.cache_clear()
    stage.clear_labeler_cache()
    for slug in faults.DATASETS:
        write_dataset(slug, tmp_path / "src")
    catalog = f"file://{tmp_path / 'cat'}"
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        runner = DaskTaskRunner(address=cluster.scheduler_address)
        paths = PathParams(source_root=str(tmp_path / "src"), catalog=catalog)
        summary = ingest_flow.with_options(task_runner=runner)(paths)
        assert sum(r["ingested"] for r in summary) == 4
        rows = label_flow(Profile.test, paths, dask_address=cluster.scheduler_address)
    cat = Catalog(catalog)
    assert len(rows) == 4 and cat.verify().healthy
    assert len(cat.mask_store.index()) == 16  # three branches and the fused set for each image
    get_settings.cache_clear()
    stage.clear_labeler_cache()
