"""The pieces of worker-per-device execution that need no cluster: shards, per-device limits, worker specs and the
merge of features shards."""

from __future__ import annotations

import pytest

from infra.cluster import DEVICE_ENV, device_worker_spec
from pipelines.wiring import device_limit, worker_device
from stages.downstream.runners import merge_feature_rows
from stages.labelling.label import shards


def test_shards_cover_the_pending_list_once_in_order() -> None:
    ids = [f"d/{i}" for i in range(11)]
    cut = shards(ids, 4)
    assert [len(s) for s in cut] == [4, 4, 3] and [i for s in cut for i in s] == ids
    assert shards([], 4) == []
    with pytest.raises(ValueError, match="label_batch"):
        shards(ids, 0)


def test_each_gpu_has_its_own_limit_and_the_cpu_none(monkeypatch: pytest.MonkeyPatch) -> None:
    assert device_limit("cuda:1", host="node7") == "gpu:node7:1"
    assert device_limit("cuda", host="node7") == "gpu:node7:0"
    assert device_limit("cpu") is None
    monkeypatch.setenv(DEVICE_ENV, "cuda:3")
    assert worker_device() == "cuda:3"
    monkeypatch.delenv(DEVICE_ENV)
    assert worker_device() == "auto"


def test_a_device_worker_owns_one_device_and_one_task_thread() -> None:
    gpu = device_worker_spec("cuda:2", threads=4)["options"]
    assert gpu["env"][DEVICE_ENV] == "cuda:2" and gpu["env"]["OMP_NUM_THREADS"] == "4"
    assert gpu["nthreads"] == 1 and gpu["resources"] == {"GPU": 1}
    assert "resources" not in device_worker_spec("cpu")["options"]


def test_features_shard_rows_merge_into_one_row_per_dataset() -> None:
    def row(dataset: str, images: int, computed: int, seconds: float) -> dict:
        return {"dataset": dataset, "feature_set": "f", "weights": "w", "images": images, "computed": computed,
                "cached": images - computed, "seconds": seconds, "note": ""}

    merged = merge_feature_rows([row("a", 2, 2, 1.0), row("b", 1, 0, 0.5), row("a", 2, 1, 0.25)])
    assert [(r["dataset"], r["images"], r["computed"], r["cached"], r["seconds"]) for r in merged] == [
        ("a", 4, 3, 1, 1.25), ("b", 1, 0, 1, 0.5)]
