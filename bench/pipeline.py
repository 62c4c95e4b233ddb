"""The whole `hypervision` DAG on fixtures: wall time of each stage, and the orchestration overhead, measured side
by side in one run.

1. The stages' own time: each stage's runner called directly on a fresh catalog (ingest every file, label with
   each branch, fuse with the report and overlays, pretrain, cache the frozen backbone's features, train and
   score one head per task with the report), no Prefect.
2. The flow: `hypervision_flow` (demo profile) on another fresh catalog of the same sources, on Prefect's
   temporary local server, as `hvp demo` runs it; per stage the subflow's wall time.
3. Overhead = the flow's wall time / the stages' own time (target <= 1.3x). The fixed cost of one flow run (an
   empty flow with one task) is reported apart, as is a second run of the flow, where every stage skips.

Both sides build their models afresh (the labeler cache is cleared before each) after one warm-up of the imports,
and run in the order plain, flow, flow, plain (each on a fresh catalog): the minimum of the two is kept per stage,
so that load from other processes on a shared machine skews neither side.

    .venv/bin/python bench/pipeline.py [--datasets cave hsi-road ...] [--all] [--steps 6] [--repeats 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

#: Three pretraining sets and the three labelled benchmarks, so that every stage of the DAG has work.
DEFAULT_DATASETS = ["cave", "hsi-road", "hot-2024-nir", "hsi-drive-v2-0", "hssod", "hot-2023-vis"]
TARGET = 1.3


def plain_run(src: Path, catalog: str, runs: Path, steps: int) -> dict[str, float]:
    """Every stage's runner called directly with the demo profile's configuration; seconds per stage."""
    from catalog.catalog import Catalog
    from pipelines.params import PathParams, PretrainParams, Profile
    from pipelines.profiles import resolve
    from stages.ingest import run_ingest
    from stages.labelling.label import run_fuse, run_label
    from stages.pretraining import run_pretrain

    run = resolve(Profile.demo, PathParams(source_root=str(src), catalog=catalog, runs=str(runs)),
                  pretrain=PretrainParams(steps=steps))
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    cat = Catalog(catalog).init()
    run_ingest(cat, run.ingest)
    times["ingest"] = time.perf_counter() - t0
    for branch in run.label.branches:
        t0 = time.perf_counter()
        run_label(cat, run.label_config(branch))
        times[f"label-{branch}"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    run_fuse(cat, run.fuse)
    times["fuse"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = run_pretrain(cat, run.pretrain.model_copy(update={"out_dir": str(runs / "plain")}))
    times["pretrain"] = time.perf_counter() - t0
    times.update(plain_downstream(cat, result.checkpoint, runs / "plain-downstream"))
    return times


def plain_downstream(cat: Any, checkpoint: str, out_dir: Path) -> dict[str, float]:
    """Features, then one head per task whose benchmark the catalog holds, then the report, as the DAG runs them
    (demo profile: the tiny layout, the pretrained checkpoint frozen); seconds per stage."""
    from pipelines.params import DEFAULT_DOWNSTREAM, cached_feature_datasets
    from stages.downstream.features import BackboneSpec, load_backbone
    from stages.downstream.heads import held_benchmarks
    from stages.downstream.runners import (
        BackboneConfig,
        FeaturesConfig,
        HeadsConfig,
        TaskChoice,
        run_features,
        run_heads,
    )

    times: dict[str, float] = {}
    t0 = time.perf_counter()
    tasks, _ = held_benchmarks(cat, DEFAULT_DOWNSTREAM.task_datasets())
    backbone_config = BackboneConfig(model="tiny", checkpoint=checkpoint)
    backbone = load_backbone(BackboneSpec(model="tiny", checkpoint=checkpoint), "cpu")
    datasets = cached_feature_datasets(tasks)
    if datasets:
        run_features(cat, FeaturesConfig(backbone=backbone_config, datasets=datasets, device="cpu"), backbone=backbone)
    times["features"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if tasks:
        run_heads(cat, HeadsConfig(out_dir=str(out_dir), backbone=backbone_config, head_size="small", device="cpu",
                                   replace=True, tasks=[TaskChoice(task=t, dataset=d) for t, d in tasks.items()]),
                  backbone=backbone)
    times["heads"] = time.perf_counter() - t0
    return times


def fixed_cost(repeats: int = 5) -> float:
    """Median wall time of an empty flow run with one task (what every flow run pays)."""
    from prefect import flow, task

    @task
    def nothing() -> int:
        return 0

    @flow
    def empty() -> int:
        return nothing()

    empty()
    walls = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        empty()
        walls.append(time.perf_counter() - t0)
    return statistics.median(walls)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", default=DEFAULT_DATASETS, help="fixture datasets (slugs)")
    ap.add_argument("--all", action="store_true", help="every built-in fixture dataset")
    ap.add_argument("--steps", type=int, default=6, help="pretraining steps")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each side (ABBA order), minimum kept")
    ap.add_argument("--json", action="store_true", help="also print every figure as JSON lines")
    args = ap.parse_args()
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

    from catalog.fixtures import make_fixtures
    from pipelines.hypervision import hypervision_flow
    from pipelines.params import Device, DownstreamParams, PathParams, PretrainParams, Profile
    from pipelines.profiles import resolve
    from stages.labelling import label as stage

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        src = root / "src"
        written = make_fixtures(src, datasets=None if args.all else args.datasets)
        images = sum(map(len, written.values()))
        print(f"{images} fixture images of {len(written)} datasets; demo profile (tiny random-init models), "
              f"{args.steps} pretraining steps")
        for branch, spec in resolve(Profile.demo).label.labelers.items():  # warm the imports
            stage.cached_labeler(branch, spec)
        fixed = fixed_cost()  # also starts the temporary server
        plains: list[dict[str, float]] = []
        flows: list[tuple[float, dict[str, float]]] = []
        order = ["plain", "flow", "flow", "plain"] * ((args.repeats + 1) // 2)
        for k, side in enumerate(order[: 2 * args.repeats]):
            stage.clear_labeler_cache()
            if side == "plain":
                plains.append(plain_run(src, str(root / f"cat-plain-{k}"), root / f"runs-plain-{k}", args.steps))
                continue
            paths = PathParams(source_root=str(src), catalog=str(root / f"cat-flow-{k}"), runs=str(root / f"runs-{k}"))
            t0 = time.perf_counter()
            out = hypervision_flow(Profile.demo, paths, pretrain=PretrainParams(steps=args.steps),
                                   downstream=DownstreamParams(device=Device.cpu))
            flows.append((time.perf_counter() - t0, {r["stage"]: r["seconds"] for r in out["stages"]}))
        t0 = time.perf_counter()
        again = hypervision_flow(Profile.demo, paths, pretrain=PretrainParams(steps=args.steps),
                                 downstream=DownstreamParams(device=Device.cpu))
        skip_wall = time.perf_counter() - t0

    plain = {name: min(p[name] for p in plains) for name in plains[0]}
    flow_wall = min(w for w, _ in flows)
    flow_stages = {name: min(f[name] for _, f in flows) for name in flows[0][1]}
    own = sum(plain.values())
    print(f"{'stage':16s} {'own s':>8s} {'in flow s':>10s} {'ratio':>7s}   (minimum of {args.repeats} runs each)")
    for name, seconds in plain.items():
        print(f"{name:16s} {seconds:8.2f} {flow_stages[name]:10.2f} {flow_stages[name] / seconds:7.2f}")
    overhead = flow_wall / own
    print(f"{'whole DAG':16s} {own:8.2f} {flow_wall:10.2f} {overhead:7.2f}  (target <= {TARGET})")
    print(f"fixed cost of one flow run (empty flow, one task, median of 5): {fixed:.2f} s; the DAG makes "
          f"{1 + len(flow_stages)} flow runs")
    skipped = sum(r["state"] == "Skipped" for r in again["stages"])
    print(f"second run, unchanged inputs: {skipped}/{len(again['stages'])} stages skipped in {skip_wall:.2f} s")
    figures: list[dict[str, Any]] = [
        {"name": "orchestration_overhead_x", "value": round(overhead, 3), "target": TARGET, "met": overhead <= TARGET},
        {"name": "fixed_cost_per_flow_run_s", "value": round(fixed, 3), "target": None, "met": None},
        {"name": "dag_wall_s", "value": round(flow_wall, 2), "target": None, "met": None},
        {"name": "stages_own_s", "value": round(own, 2), "target": None, "met": None},
        {"name": "rerun_all_skipped_s", "value": round(skip_wall, 2), "target": None,
         "met": skipped == len(again["stages"])},
    ]
    figures += [{"name": f"stage_{n}_s", "value": round(flow_stages[n], 2), "target": None, "met": None}
                for n in plain]
    if args.json:
        for f in figures:
            print(json.dumps(f))
    print(json.dumps({"figures": figures}))


if __name__ == "__main__":
    main()
