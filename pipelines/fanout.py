"""Features fanned out in shards of images over the engine's workers (one worker per device, see infra.cluster):
the features flow plans the shards, a subflow on the Dask cluster (or this process's threads) encodes them, and
the merged run record is written once. Only ids, URIs and configs travel through Prefect; features stay in the
catalog's feature cache."""

from __future__ import annotations

from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from infra.settings import get_settings
from pipelines.catalogs import open_catalog
from pipelines.wiring import engine_runner, fan_out, gpu_slot, retry_on_io, worker_device
from stages.downstream.features import cached_backbone
from stages.downstream.runners import (
    FeaturesConfig,
    feature_images,
    merge_feature_rows,
    record_features,
    run_features,
)
from stages.labelling.label import shards


@task(name="features-shard", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=5, retry_condition_fn=retry_on_io,
      task_run_name="features {images[0]} (+{extra})")
def features_shard_task(catalog_uri: str, config: dict[str, Any], images: list[str], extra: int = 0
                        ) -> dict[str, Any]:
    """Encode one shard of images the cache lacks with the backbone built once per process on this worker's
    device, holding the device's slot; returns the shard's rows and run record."""
    features = FeaturesConfig.model_validate({**config, "images": images})
    device = worker_device()
    loaded = cached_backbone(features.backbone.to_spec(), features.device if device == "auto" else device)
    with gpu_slot(device):
        result = run_features(open_catalog(catalog_uri), features, backbone=loaded)
    return {"rows": [r for r in result.rows if r["images"] or r["note"]], "resolved": result.resolved}


@flow(name="features-shards", log_prints=True)
def features_shards_flow(catalog: str, config: dict[str, Any], shard: int = 16) -> list[dict[str, Any]]:
    """Encode the configured datasets' images in shards of ``shard`` on the flow's task runner; returns one row per
    dataset and writes the run record (as a one-process features run writes it)."""
    cat = open_catalog(catalog)
    features = FeaturesConfig.model_validate(config)
    work: list[list[str]] = []
    left: dict[str, str] = {}
    for dataset in features.datasets:
        ids, left_out = feature_images(cat, [dataset], features.splits)
        if left_out or not ids:
            left[dataset] = left_out.get(dataset, "no labelled images of the chosen splits")
        work += shards(ids, shard)
    settings = get_settings()
    out = fan_out(lambda ids: features_shard_task.submit(cat.uri, config, ids, len(ids) - 1), work,
                  settings.label_in_flight)
    if not out:  # nothing to encode: one in-process run gives the rows and record a plain run gives
        res = run_features(cat, features, backbone=cached_backbone(features.backbone.to_spec(), features.device))
        return res.rows
    first = out[0]["resolved"]
    rows = merge_feature_rows([r for o in out for r in o["rows"]]) + [
        {"dataset": d, "feature_set": first["feature_set"], "weights": first["weights"], "images": 0, "computed": 0,
         "cached": 0, "seconds": 0.0, "note": note} for d, note in left.items()]
    by_dataset = {r["dataset"]: r for r in rows}
    ordered = [by_dataset[d] for d in features.datasets if d in by_dataset]
    record = {**first, "config": FeaturesConfig.model_validate(config).model_dump(
        mode="json", exclude={"images"}), "rows": ordered}
    record_features(cat, record)
    return ordered


def sharded_features(catalog: str, config: dict[str, Any], dask_address: str | None = None,
                     shard: int | None = None) -> list[dict[str, Any]]:
    """The features of ``config``'s datasets as one row per dataset, encoded in shards on the Dask cluster at
    ``dask_address`` (settings' when None), else on this process's thread."""
    settings = get_settings()
    runner = engine_runner(dask_address=dask_address or settings.dask_address)
    return features_shards_flow.with_options(task_runner=runner)(catalog, config, shard or settings.features_shard)
