"""The research loop without Prefect: a tiny pretraining run whose three checkpoints are kept with model cards,
each evaluated downstream (keyed on its sha256), the metric-vs-step table and report, the refusal to merge results
of different protocols, and the TensorBoard event files read back."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from catalog.catalog import Catalog
from catalog.fixtures import write_dataset
from catalog.masks import MaskSet, MaskStore, table_from_masks
from stages.downstream.runners import TaskChoice
from stages.ingest import IngestConfig, run_ingest
from stages.labelling.labeler import file_sha256
from stages.pretraining import PretrainStageConfig, run_pretrain
from stages.registry import STAGES
from stages.research.evaluation import (
    EvaluationConfig,
    IncomparableResults,
    best_checkpoints,
    one_row,
    read_table,
    run_evaluation,
)
from stages.research.tensorboard import EventWriter, read_events, read_records

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def synthetic_fused(cat: Catalog, dataset: str) -> None:
    """Fused pseudo-targets (three discs) on every image of `dataset`, so that pretraining has targets."""
    store = MaskStore(cat)
    rng = np.random.default_rng(0)
    for row in cat.images(dataset).itertuples():
        yy, xx = np.mgrid[: row.height, : row.width]
        masks = np.stack([(yy - rng.integers(0, row.height)) ** 2 + (xx - rng.integers(0, row.width)) ** 2
                          <= int(rng.integers(2, 6)) ** 2 for _ in range(3)])
        store.write(row.image_id, "fused-test", "fused", MaskSet(masks, table_from_masks(masks, "fused", score=1.0)),
                    random_init=True)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Catalog, Path, list[tuple[int, Path]]]:
    """A catalog (HSI Drive for the heads, CAVE with fused masks for pretraining) and a six-step tiny run with a
    checkpoint every two steps (keeping only the newest two for resuming): the announced snapshots."""
    root = tmp_path_factory.mktemp("research")
    for slug in ("hsi-drive-v2-0", "cave"):
        write_dataset(slug, root / "src")
    cat = Catalog(str(root / "catalog")).init()
    assert not run_ingest(cat, IngestConfig(source_root=str(root / "src"))).problems
    synthetic_fused(cat, "cave")
    announced: list[tuple[int, Path]] = []
    config = PretrainStageConfig(model="tiny", steps=6, batch_size=2, crop_size=16, min_mask_pixels=2,
                                 checkpoint_every=2, device="cpu", runs=str(root / "runs"), datasets=["cave"])
    result = run_pretrain(cat, config, on_checkpoint=lambda step, path: announced.append((step, path)))
    return cat, Path(result.out_dir), announced


def _config(snapshot: Path, steps: int = 2) -> EvaluationConfig:
    return EvaluationConfig(checkpoint=str(snapshot), tasks=[TaskChoice(task="segmentation")], head_size="small",
                            steps=steps, device="cpu")


def test_every_checkpoint_is_kept_with_its_model_card(pretrained: tuple) -> None:
    cat, run, announced = pretrained
    assert [s for s, _ in announced] == [2, 4, 6]
    assert len(list((run / "checkpoints").glob("step_*"))) == 2  # the run kept two for resuming ...
    for step, snapshot in announced:  # ... the snapshots keep all three
        assert snapshot.parent == run / "snapshots" and (snapshot / "model.safetensors").is_file()
        card = json.loads((snapshot / "model-card.json").read_text())
        assert card["step"] == step and card["sha256"] == file_sha256(snapshot / "model.safetensors")
        assert card["layout"]["name"] == "tiny" and card["random_init"] is True
        assert card["catalog"]["datasets"]["cave"]["images"] == len(cat.images("cave"))
        assert card["catalog"]["fusion_ids"] == ["fused-test"] and card["training"]["steps"] == 6
        assert card["preprocessing"]["name"] == "released" and card["metrics"] == []
        assert "random-init" in (snapshot / "model-card.md").read_text()
    assert len({json.loads((s / "model-card.json").read_text())["sha256"] for _, s in announced}) == 3


def test_pretraining_event_files_read_back(pretrained: tuple) -> None:
    _, run, _ = pretrained
    scalars, texts, versions = read_events(run / "tensorboard" / "pretrain")
    assert versions == ["brain.Event:2"]
    losses = [(e.step, e.value) for e in scalars if e.tag == "pretrain/loss"]
    csv_rows = pd.read_csv(run / "metrics.csv")
    assert [s for s, _ in losses] == list(csv_rows["step"])
    np.testing.assert_allclose([v for _, v in losses], csv_rows["loss"], rtol=1e-6)
    assert "| steps | 6 |" in texts["hparams"] and "random-init" in texts["hparams"]


def test_each_checkpoint_is_evaluated_once_into_the_runs_table(pretrained: tuple) -> None:
    cat, run, announced = pretrained
    assert STAGES.get("evaluate").run is run_evaluation
    results = [run_evaluation(cat, _config(snapshot)) for _, snapshot in announced]
    assert [r.step for r in results] == [2, 4, 6] and not any(r.reused for r in results)
    table = pd.read_parquet(run / "evaluations" / "evaluations.parquet")
    assert list(table["step"]) == [2, 4, 6] and set(table["task"]) == {"segmentation"}
    assert table["sha256"].nunique() == 3 and table["protocol_id"].nunique() == 1
    assert list(table["value"]) == [r.rows[0]["value"] for r in results]
    again = run_evaluation(cat, _config(announced[0][1]))  # the same weights under the same protocol
    assert again.reused and again.rows[0]["value"] == results[0].rows[0]["value"]
    assert len(read_table(run / "evaluations")) == 3
    best = results[-1].best
    top = table.loc[table["value"].idxmax()]
    assert len(best) == 1 and best[0]["best_step"] == top["step"] and best[0]["evaluations"] == 3
    report = (run / "evaluations" / "report.md").read_text()
    assert "Best checkpoint per task" in report and "random-init" in report
    assert (run / "evaluations" / "metric_vs_step.png").stat().st_size > 1000
    card = json.loads((announced[1][1] / "model-card.json").read_text())
    assert [m["value"] for m in card["metrics"]] == [results[1].rows[0]["value"]]
    scalars, texts, _ = read_events(run / "evaluations" / "tensorboard" / "evaluation")
    curve = sorted((e.step, e.value) for e in scalars if e.tag == "eval/segmentation/" + table["metric"][0])
    np.testing.assert_allclose([v for _, v in curve], table["value"], rtol=1e-6)
    assert [s for s, _ in curve] == [2, 4, 6] and "hparams/step_2" in texts
    head_losses = read_events(run / "evaluations" / "tensorboard")[0]
    assert {e.tag for e in head_losses} >= {"head/segmentation/loss"}


def test_results_of_different_protocols_are_never_one_row(pretrained: tuple) -> None:
    cat, run, announced = pretrained
    other = run_evaluation(cat, _config(announced[2][1], steps=3).model_copy(
        update={"out_dir": str(run / "evaluations-mixed")}))
    first = run_evaluation(cat, _config(announced[0][1]).model_copy(
        update={"out_dir": str(run / "evaluations-mixed")}))
    rows = read_table(run / "evaluations-mixed").to_dict("records")
    with pytest.raises(IncomparableResults, match=r"head\.steps: 2 vs 3|head\.steps: 3 vs 2"):
        one_row(rows)
    best, notes = best_checkpoints(rows)
    assert len(best) == 2 and {b["protocol"] for b in best} == {other.protocol_id[:12], first.protocol_id[:12]}
    assert len(notes) == 1 and "head.steps" in notes[0] and "own row" in notes[0]
    assert "Not compared" in (run / "evaluations-mixed" / "report.md").read_text()


def test_event_writer_round_trip_and_corruption_is_named(tmp_path: Path) -> None:
    writer = EventWriter(tmp_path)
    writer.scalars(7, {"a/b": 0.25, "nan": float("nan")})
    writer.text("notes", "hello")
    scalars, texts, _ = read_events(tmp_path)
    assert [(e.tag, e.step, e.value) for e in scalars] == [("a/b", 7, 0.25)] and texts == {"notes": "hello"}
    data = bytearray(writer.path.read_bytes())
    data[-6] ^= 0xFF
    writer.path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="fails its CRC"):
        list(read_records(writer.path))


def test_ablation_grid_shares_caches_and_writes_the_table5_layout(tmp_path: Path) -> None:
    from pipelines.profiles import resolve
    from stages.research.ablation import AblationConfig, run_ablation

    for slug in ("hsi-drive-v2-0", "cave"):
        write_dataset(slug, tmp_path / "src")
    cat = Catalog(str(tmp_path / "catalog")).init()
    assert not run_ingest(cat, IngestConfig(source_root=str(tmp_path / "src"))).problems
    run = resolve("test")
    config = AblationConfig(labelers=run.label.labelers, tau=run.label.tau, sources=["spatial"],
                            distillation=[False, True], pretrain=run.pretrain, datasets=["cave"],
                            tasks=[TaskChoice(task="segmentation")], head_size="small", head_steps=2, device="cpu",
                            out_dir=str(tmp_path / "ablation"))
    result = run_ablation(cat, config)
    measured = [r for r in result.rows if r["row"] == "this run"]
    assert [(r["sources"], r["distillation"]) for r in measured] == [("spatial", False), ("spatial", True)]
    assert len({r["run"] for r in measured}) == 2 and len({r["sha256"] for r in measured}) == 2
    assert {r["fusion_id"] for r in measured} == {result.fusion_ids["spatial"]}  # one fusion for both variants
    fused = MaskStore(cat).index()
    assert set(fused.loc[fused["branch"] == "fused", "labeler_id"]) == {result.fusion_ids["spatial"]}
    for r in measured:
        pretrain_cfg = json.loads((Path(r["run"]) / "config.json").read_text())["config"]
        assert pretrain_cfg["fusion_id"] == result.fusion_ids["spatial"]
        assert pretrain_cfg["lambda_distill"] == (1.0 if r["distillation"] else 0.0)
        last = sorted((Path(r["run"]) / "snapshots").glob("step_*"))[-1]  # the one evaluated
        card = json.loads((last / "model-card.json").read_text())
        assert card["fusion_id"] == result.fusion_ids["spatial"] and card["metrics"]
        table = pd.read_parquet(Path(config.out_dir) / "evaluations" / f"tiny-spatial-"
                                f"{'distill' if r['distillation'] else 'no-distill'}" / "evaluations.parquet")
        assert r["segmentation"] == pytest.approx(100 * table["value"].iloc[-1])
    paper = [r for r in result.rows if r["row"] == "paper"]
    assert len(paper) == 4 and paper[-1]["segmentation"] == 83.51
    text = result.markdown.read_text()
    assert "| this run | SAM2 spatial masks only | spatial | off | tiny |" in text and "| paper |" in text
    assert "random-init" in text
    again = run_ablation(cat, config)  # every cache holds: same runs, same numbers
    assert [r["sha256"] for r in again.rows if r["row"] == "this run"] == [r["sha256"] for r in measured]
    assert [r["segmentation"] for r in again.rows] == [r["segmentation"] for r in result.rows]


def test_tensorboard_itself_reads_the_event_files(tmp_path: Path) -> None:
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    writer = EventWriter(tmp_path)
    writer.scalars(2, {"eval/segmentation/miou": 0.25})
    writer.scalars(4, {"eval/segmentation/miou": 0.5})
    writer.hparams({"lr": 0.001, "model": "tiny"}, metrics=["eval/segmentation/miou"])
    acc = accumulator.EventAccumulator(str(tmp_path))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("eval/segmentation/miou")] == [(2, 0.25), (4, 0.5)]
    assert b"| lr | 0.001 |" in acc.Tensors("hparams")[0].tensor_proto.string_val[0]
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = acc.PluginTagToContent("hparams")
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert [h.name for h in experiment.hparam_infos] == ["lr", "model"]
    assert [m.name.tag for m in experiment.metric_infos] == ["eval/segmentation/miou"]
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    assert start.session_start_info.hparams["lr"].number_value == 0.001
    assert start.session_start_info.hparams["model"].string_value == "tiny"
