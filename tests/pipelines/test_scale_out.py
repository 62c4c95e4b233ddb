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


def _labelled(tmp_path: Path, name: str, devices: list[str], monkeypatch: pytest.MonkeyPatch,
              kill: bool = False) -> tuple[Catalog, dict[str, set]]:
    """Ingest and label the fault datasets on a device cluster of ``devices`` through the flows; the catalog and,
    per label-images task key, the workers that ran it (``kill``: SIGKILL the worker running the first shard
    while it runs)."""
    import os
    import signal
    import threading
    import time

    from distributed import Client, get_task_stream
    from prefect_dask import DaskTaskRunner

    from infra.cluster import device_cluster
    from infra.settings import get_settings
    from pipelines.downstream import features_flow
    from pipelines.ingest import ingest_flow
    from pipelines.label import label_flow
    from pipelines.params import BackboneParams, PathParams, Profile

    catalog = f"file://{tmp_path / name}"
    paths = PathParams(source_root=str(tmp_path / "src"), catalog=catalog)
    ran: dict[str, set] = {}
    with device_cluster(devices) as cluster, Client(cluster) as client:
        ingest_flow.with_options(task_runner=DaskTaskRunner(address=cluster.scheduler_address))(paths)
        killed: list[str] = []

        def killer() -> None:
            pids = client.run(os.getpid)
            for _ in range(2000):
                busy = {w: keys for w, keys in client.processing().items() if any("label" in k for k in keys)}
                if busy:
                    time.sleep(0.05)
                    worker = next(iter(busy))
                    os.kill(pids[worker], signal.SIGKILL)
                    killed.append(worker)
                    return
                time.sleep(0.01)

        thread = threading.Thread(target=killer, daemon=True)
        if kill:
            thread.start()
        with get_task_stream(client) as stream:
            label_flow(Profile.test, paths, dask_address=cluster.scheduler_address)
            if not kill:
                monkeypatch.setenv("HVP_DASK_ADDRESS", cluster.scheduler_address)
                monkeypatch.setenv("HVP_FEATURES_SHARD", "1")
                get_settings.cache_clear()
                rows = features_flow(Profile.test, PathParams(catalog=catalog, datasets=["hssod"]),
                                     BackboneParams(seed=31))
                monkeypatch.delenv("HVP_DASK_ADDRESS")
                get_settings.cache_clear()
                assert rows[0]["computed"] == rows[0]["images"] > 1
        if kill:
            thread.join()
            assert killed, "no label shard was seen running: nothing was killed"
        for rec in stream.data:
            if "label" in str(rec["key"]) or "features" in str(rec["key"]):
                ran.setdefault(str(rec["key"]), set()).add(rec["worker"])
    return Catalog(catalog), ran


def _features(cat: Catalog) -> dict[tuple[str, str], list[bytes]]:
    """Every cached feature entry's arrays, as bytes."""
    from catalog.features import FeatureStore

    store = FeatureStore(cat)
    index = store.index(refresh=True)
    return {(r["feature_set"], r["image_id"]): [np.asarray(m).tobytes() for m in store.read(r["feature_set"],
                                                                                        r["image_id"]).maps]
            for r in index.to_dict("records")}


def _writes(cat: Catalog) -> list[tuple[str, str]]:
    """Every committed (image, labeler) mask set in the index, duplicates kept."""
    return sorted((r["image_id"], r["labeler_id"]) for r in cat.mask_store.index(refresh=True).to_dict("records"))


@pytest.mark.slow
@pytest.mark.integration
def test_two_device_workers_label_like_one_and_survive_a_killed_worker(prefect_server: None, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from infra.settings import get_settings
    from stages.labelling import label as stage

    monkeypatch.setenv("HVP_LABEL_BATCH", "1")  # four images, one shard each per branch
    get_settings.cache_clear()
    stage.clear_labeler_cache()
    for slug in (*faults.DATASETS, "hssod"):
        write_dataset(slug, tmp_path / "src")
    one, _ = _labelled(tmp_path, "one", ["cpu"], monkeypatch)
    two, ran = _labelled(tmp_path, "two", ["cpu", "cpu"], monkeypatch)
    assert len({w for k, workers in ran.items() if "label" in k for w in workers}) == 2  # labels on both workers
    assert len({w for k, workers in ran.items() if "features" in k for w in workers}) == 2  # and features
    assert _content(one) == _content(two)  # the same index and the same mask bits as one worker
    assert _features(one) == _features(two) and _features(one)  # and the same features
    assert two.verify().healthy
    killed, _ = _labelled(tmp_path, "killed", ["cpu", "cpu"], monkeypatch, kill=True)
    assert killed.verify().healthy
    assert _content(killed) == _content(one)  # nothing lost
    writes = _writes(killed)
    assert len(writes) == len(set(writes)) == len(_writes(one))  # no image labelled (committed) twice
    get_settings.cache_clear()
    stage.clear_labeler_cache()
