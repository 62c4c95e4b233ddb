"""The `hypervision` DAG and its parameters: typed forms, profiles resolved into labeler configurations passed as
arguments, stages that skip on unchanged inputs, the arrival watcher, artifacts a browser can show."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from catalog.catalog import Catalog
from catalog.fixtures import write_dataset
from catalog.masks import MaskStore
from infra.settings import Settings
from model.registry import list_models
from pipelines.params import (
    DownstreamParams,
    LabelParams,
    MaterialParams,
    ModelName,
    PathParams,
    PretrainParams,
    Profile,
    SpatialParams,
    SpectralParams,
    Task,
    ZeroShotParams,
    resolve_paths,
)
from pipelines.profiles import load_profile, resolve
from stages.labelling import label as stage

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def _props(schema: dict[str, Any], ref: dict[str, Any]) -> dict[str, Any]:
    return schema["definitions"][ref["$ref"].split("/")[-1]]["properties"]


def test_run_form_is_typed_with_descriptions_and_enums() -> None:
    from prefect.utilities.callables import parameter_schema

    from pipelines.hypervision import hypervision_flow

    schema = parameter_schema(hypervision_flow).model_dump()
    top = schema["properties"]
    assert set(top) == {"profile", "paths", "label", "pretrain", "downstream", "ingest_workers", "zeroshot"}
    assert all(p.get("description") for p in top.values())
    assert schema["definitions"]["Profile"]["enum"] == ["demo", "production", "test"]
    assert schema["definitions"]["Branch"]["enum"] == ["spatial", "spectral", "material"]
    assert schema["definitions"]["ModelName"]["enum"] == list_models()  # follows the registry, never hard-coded
    label = _props(schema, top["label"])
    assert {"branches", "tau", "spatial", "spectral", "material"} <= set(label)
    for branch in ("spatial", "spectral", "material"):
        fields = _props(schema, label[branch])
        assert {"pred_iou_thresh", "stability_score_thresh", "points_per_side"} <= set(fields)
        assert all(f.get("description") for f in fields.values()), branch
    assert all(f.get("description") for f in _props(schema, top["pretrain"]).values())
    assert all(f.get("description") for f in _props(schema, top["paths"]).values())


def test_profiles_resolve_to_labeler_configs_passed_as_arguments(tmp_path: Path) -> None:
    demo = resolve(Profile.demo, settings=Settings()).label
    assert demo.branches == ["spatial", "spectral", "material"]
    for spec in demo.labelers.values():
        assert spec.checkpoint is None
        assert spec.params["pred_iou_thresh"] == 0.0 and spec.params["stability_score_thresh"] == 0.0
    assert demo.labelers["material"].model == {"model": "tiny"}
    assert demo.labelers["spatial"].model == {"config": "configs/sam2.1/sam2.1_hiera_t.yaml", "image_size": 128}
    assert demo.labelers["spectral"].params["stride"] == 4

    # production: released sizes at their native input, the branches' own thresholds
    plain = resolve(Profile.production, settings=Settings()).label
    assert plain.labelers["spatial"].model == {"config": "configs/sam2.1/sam2.1_hiera_b+.yaml", "image_size": 1024}
    assert plain.labelers["material"].model == {"model": "hyperfree_b"} and plain.labelers["spatial"].params == {}

    settings = Settings(spatial_params={"points_per_side": 8, "box_nms_thresh": 0.5}, fuse_tau=0.5, sam2_model={
        "config": "configs/sam2.1/sam2.1_hiera_t.yaml", "image_size": 256})
    prod = resolve(Profile.production, label=LabelParams(), settings=settings).label
    assert prod.tau == 0.5 and prod.labelers["spatial"].params == {"points_per_side": 8, "box_nms_thresh": 0.5}
    assert prod.labelers["spatial"].model["image_size"] == 256
    assert resolve(Profile.demo, settings=settings).label.labelers["spatial"].model["image_size"] == 128

    ckpt = tmp_path / "weights.pt"
    given = LabelParams(tau=0.6, branches=["material"], spatial=SpatialParams(pred_iou_thresh=0.3, image_size=64),
                        material=MaterialParams(checkpoint=str(ckpt), model=ModelName("tiny")))
    out = resolve(Profile.production, label=given, settings=settings).label
    assert out.tau == 0.6 and out.branches == ["material"]
    assert out.labelers["spatial"].params == {"points_per_side": 8, "box_nms_thresh": 0.5, "pred_iou_thresh": 0.3}
    assert out.labelers["spatial"].model["image_size"] == 64
    assert out.labelers["material"].checkpoint == str(ckpt.resolve())
    assert out.labelers["material"].model == {"model": "tiny"}


def test_profile_files_are_the_profiles_and_validate() -> None:
    from pipelines.profiles import PROFILE_DIR

    assert sorted(p.stem for p in PROFILE_DIR.glob("*.yaml")) == [p.value for p in Profile]
    for p in Profile:
        assert load_profile(p)["description"]
    test = resolve(Profile.test, settings=Settings())
    assert test.label.labelers["spatial"].model["image_size"] == 64 and test.label.overlays == 0
    assert test.pretrain.device == "cpu" and test.pretrain.checkpoint_every == 2 and test.downstream.steps == 6
    assert test.fuse.tau == 0.7 and set(test.fuse.labelers) == {"spatial", "spectral", "material"}
    assert test.label_config("spectral").labeler.params["stride"] == 7


def test_labeler_cache_is_keyed_on_the_whole_configuration() -> None:
    specs = resolve(Profile.demo, settings=Settings()).label.labelers
    a = stage.cached_labeler("spatial", specs["spatial"])
    assert stage.cached_labeler("spatial", specs["spatial"].model_copy()) is a
    looser = specs["spatial"].model_copy(update={"params": {**specs["spatial"].params, "points_per_side": 3}})
    b = stage.cached_labeler("spatial", looser)
    assert b is not a and b.labeler_id != a.labeler_id and b.params["points_per_side"] == 3
    bigger = specs["spatial"].model_copy(update={"model": {**specs["spatial"].model, "image_size": 64}})
    assert stage.cached_labeler("spatial", bigger).labeler_id not in (a.labeler_id, b.labeler_id)


def test_paths_and_pretrain_defaults_resolve(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    p = resolve_paths(PathParams(source_root="src", catalog="data/cat"), Settings())
    assert p.source_root == str(tmp_path / "src") and p.catalog == str(tmp_path / "data" / "cat")
    assert p.runs == str(tmp_path / "data" / "runs")
    assert resolve_paths(PathParams(catalog="s3://bucket/cat"), Settings()).catalog == "s3://bucket/cat"
    demo = resolve(Profile.demo, PathParams(catalog="data/cat"), settings=Settings()).pretrain
    assert demo.model_dump(exclude_none=True) == {
        "model": "tiny", "objective": "hypervision", "steps": 6, "batch_size": 2, "checkpoint_every": 3,
        "lambda_distill": 1.0, "device": "auto",
        "init_strict": True, "preprocessing": "released", "runs": str(tmp_path / "data" / "runs"), "resume": False}
    prod = resolve(Profile.production, pretrain=PretrainParams(steps=10), settings=Settings()).pretrain
    assert prod.model == "hypervision_b" and prod.steps == 10 and prod.batch_size == 4


def test_prefect_yaml_asks_nothing_and_declares_the_dag() -> None:
    from pipelines.watch import ARRIVED

    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    assert spec["pull"] and spec["build"] is None and spec["push"] is None
    deps = {d["name"]: d for d in spec["deployments"]}
    assert {"hypervision", "ingest", "label", "fuse", "relabel-new", "pretrain"} <= set(deps)
    for dep in deps.values():
        assert "schedules" in dep and dep["work_pool"]["name"] == "local", dep["name"]
    assert deps["hypervision"]["entrypoint"] == "pipelines/hypervision.py:hypervision_flow"
    assert deps["hypervision"]["parameters"]["profile"] == "demo"
    relabel = deps["relabel-new"]
    assert relabel["schedules"][0]["interval"] == 900
    assert relabel["triggers"][0]["expect"] == [ARRIVED]
    assert "base" not in str(deps["pretrain"].get("parameters"))


def test_watcher_emits_each_new_stable_folder_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipelines import watch

    sent: list[str] = []
    monkeypatch.setattr(watch, "emit_arrival", lambda root, name, state: sent.append(name))
    write_dataset("cave", tmp_path)
    w = watch.ArrivalWatcher(tmp_path, interval=0.01)
    assert w.poll() == []  # present at start: not an arrival
    write_dataset("hsi-road", tmp_path)
    assert w.poll() == []  # first sight: wait until it stops changing
    assert w.poll() == ["hsi-road"] and sent == ["hsi-road"]
    assert w.poll() == [] and sent == ["hsi-road"]


def test_preview_is_an_embedded_png(tmp_path: Path) -> None:
    from PIL import Image

    from pipelines.wiring import markdown_table, png_data_uri

    Image.new("RGB", (2000, 500), (200, 10, 10)).save(tmp_path / "big.png")
    uri = png_data_uri(tmp_path / "big.png", side=400)
    assert uri.startswith("data:image/png;base64,")
    with Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))) as im:
        assert im.size == (400, 100) and im.getpixel((10, 10)) == (200, 10, 10)
    assert markdown_table([{"a": 1.23456, "b": "x|y"}]).splitlines() == ["| a | b |", "|---|---|", "| 1.235 | x\\|y |"]


def test_hypervision_dag_runs_every_stage_then_skips_them(prefect_server: None, tmp_path: Path) -> None:
    from pipelines.hypervision import hypervision_flow

    src = tmp_path / "src"
    write_dataset("hsi-road", src)
    write_dataset("hot-2023-vis", src)  # evaluation only: tracked by the heads stage, never labelled or pretrained
    write_dataset("abu-beach", src)  # an airborne anomaly scene: the zero-shot stage's
    paths = PathParams(source_root=str(src), catalog=str(tmp_path / "cat"), runs=str(tmp_path / "runs"))
    label = LabelParams(spectral=SpectralParams(stride=3, max_objects=3), overlays=1)
    downstream = DownstreamParams(tasks=[Task.segmentation, Task.tracking], steps=20)
    zeroshot = ZeroShotParams.model_validate({"tasks": ["anomaly"], "params": {"anomaly": {
        "points_per_side": 8, "pred_iou_thresh": -100.0, "stability_score_thresh": -100.0, "box_nms_thresh": 1.0}}})
    out = hypervision_flow(Profile.demo, paths, label, downstream=downstream, zeroshot=zeroshot)
    stages = [r["stage"] for r in out["stages"]]
    assert stages == ["ingest", "label-spatial", "label-spectral", "label-material", "fuse", "pretrain", "features",
                      "heads", "compare", "zeroshot"]  # the demo compares a tiny HyperSIGMA beside the run's backbone
    zeroshot_report = json.loads(Path(out["outputs"]["zeroshot"]["reports"]["anomaly"]).read_text())
    assert zeroshot_report["tasks"]["anomaly"]["dataset"] == "abu-beach"
    assert zeroshot_report["provenance"]["weights"] != "random-init"  # the run's pretrained checkpoint
    states = {r["stage"]: r["state"] for r in out["stages"]}
    assert states.pop("features") == "Skipped"  # segmentation's dataset is absent, the tracker encodes on the fly
    assert set(states.values()) == {"Completed"}
    assert out["paths"]["catalog"] == str(tmp_path / "cat")
    cat = Catalog(str(tmp_path / "cat"))
    images = list(cat.images().query("pretraining")["image_id"])
    ingested = {r["dataset"]: r["ingested"] for r in out["outputs"]["ingest"]}
    assert len(images) == ingested["hsi-road"] >= 1 and ingested["hot-2023-vis"] >= 10
    for branch in ("spatial", "spectral", "material"):
        summary = out["outputs"][f"label-{branch}"]
        assert summary["labelled"] == len(images) and summary["masks"] >= len(images), branch
    index = MaskStore(cat).index(refresh=True)
    assert set(index["branch"]) == {"spatial", "spectral", "material", "fused", "zeroshot"}  # zero-shot masks cached
    trained = out["outputs"]["pretrain"]
    assert trained["steps_done"] == 6 and Path(trained["checkpoint"], "model.safetensors").is_file()
    assert Path(trained["out_dir"]).parent == tmp_path / "runs"
    heads = out["outputs"]["heads"]
    assert [r["task"] for r in heads["table"]] == ["tracking"] and Path(heads["report"]).is_file()
    report = json.loads(Path(heads["report"]).read_text())
    assert set(report["tasks"]) == {"tracking"} and "random-init" in report["provenance"]["weights"]
    folder = Path(heads["report"]).parent  # keyed on the frozen backbone, under the runs folder
    assert folder.parent == tmp_path / "runs" and folder.name.startswith("downstream-tiny-")
    assert heads["left_out"] == ["segmentation needs hsi-drive-v2-0, which the catalog does not hold"]
    compared = out["outputs"]["compare"]
    ours = {r["backbone"]: r for r in compared["rows"] if r["source"] == "this run"}
    assert set(ours) == {"tiny (this run)", "hypersigma_tiny (random-init)"}
    assert ours["hypersigma_tiny (random-init)"]["task"] == "tracking" and ours["tiny (this run)"]["random_init"]
    assert all(r["feature_ms_per_image"] > 0 for r in ours.values())  # timed on whole tracking frames
    assert "random-init" in Path(compared["markdown"]).read_text()

    again = hypervision_flow(Profile.demo, paths, label, downstream=downstream)
    assert [(r["stage"], r["state"]) for r in again["stages"]] == [(s, "Skipped") for s in stages if s != "zeroshot"]
    notes = {r["stage"]: r["note"] for r in again["stages"]}
    assert "unchanged" in notes["ingest"] and "already" in notes["pretrain"] and "reused" in notes["heads"]
    assert again["outputs"]["pretrain"]["checkpoint"] == trained["checkpoint"]
    # the `heads` deployment's defaults (profile demo, nothing else) find this run's backbone and report
    from pipelines.downstream import heads_flow

    alone = heads_flow(Profile.demo, PathParams(catalog=paths.catalog, runs=paths.runs), downstream=downstream,
                       return_state=True)
    assert alone.name == "Skipped" and alone.result()["report"] == heads["report"]


def test_hypersigma_mae_pretrains_through_the_dag_and_its_backbone_trains_a_head(prefect_server: None,
                                                                                 tmp_path: Path) -> None:
    """HyperSIGMA's spatial MAE as the DAG's pretraining objective: the run's checkpoint is the frozen backbone of
    the heads stage, and its encoder loads strictly into the hypersigma layout."""
    import torch
    from safetensors.torch import load_file

    from model.hypersigma import load_pretrained
    from model.registry import get_config
    from pipelines.hypervision import hypervision_flow

    src = tmp_path / "src"
    write_dataset("cave", src)  # 31 bands: the tiny MAE crops 18 contiguous ones
    write_dataset("hssod", src)
    paths = PathParams(source_root=str(src), catalog=str(tmp_path / "cat"), runs=str(tmp_path / "runs"))
    pretrain = PretrainParams.model_validate({"model": "hypersigma_tiny", "objective": "mae_spatial", "steps": 4})
    downstream = DownstreamParams(tasks=[Task.saliency], steps=5)
    out = hypervision_flow(Profile.demo, paths, pretrain=pretrain, downstream=downstream)
    states = {r["stage"]: r["state"] for r in out["stages"]}
    assert states["pretrain"] == "Completed" and states["heads"] == "Completed", states
    trained = out["outputs"]["pretrain"]
    assert trained["steps_done"] == 4
    heads = out["outputs"]["heads"]
    report = json.loads(Path(heads["report"]).read_text())
    assert set(report["tasks"]) == {"saliency"} and "random-init" not in report["provenance"]["weights"].split()[0]
    state = load_file(str(Path(trained["checkpoint"]) / "model.safetensors"))
    base = get_config("hypersigma_tiny")
    encoder = base.spatial_encoder()
    loaded = load_pretrained(encoder, state, released_edits=False, strict=True)  # strict: no missing key
    assert loaded.loaded and all(torch.equal(encoder.state_dict()[k], state[k]) for k in loaded.loaded)
