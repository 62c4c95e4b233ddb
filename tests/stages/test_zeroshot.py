"""Zero-shot tasks: the rules recover each fixture's ground truth from its true regions, the baselines reach their
figures, and run_zeroshot runs every task on the ingested fixtures (tiny random-init model) and writes its report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from catalog.catalog import Catalog
from catalog.fixtures import FixtureImage, write_dataset
from stages.ingest import IngestConfig, run_ingest
from stages.metrics import change_metrics, classification_metrics, detection_auc, one_class_metrics
from stages.zeroshot import baselines, core
from stages.zeroshot.core import MaskFeatures, PromptOutsideMasks, Stack

pytestmark = pytest.mark.usefixtures("one_thread")


def _ingest(catalog: Catalog, source: Path) -> list:
    """Ingest a source tree with the plain stage runner; its per-file results."""
    return run_ingest(catalog, IngestConfig(source_root=str(source))).files
DATASETS = ("whu-hi-longkou", "abu-beach", "hyperfree-stone", "hermiston")
OPEN = {"pred_iou_thresh": -100.0, "stability_score_thresh": -100.0, "points_per_side": 8, "box_nms_thresh": 1.0}
"""Thresholds that keep every mask of a random-init model (its predicted IoUs are meaningless; without NMS its
masks cover the fixture scenes)."""
SEED = 3
"""Random-init seed of the tiny model in the runner tests."""


@pytest.fixture(scope="module")
def airborne(tmp_path_factory: pytest.TempPathFactory) -> tuple[Catalog, dict[str, FixtureImage], Path]:
    root = tmp_path_factory.mktemp("airborne")
    truth = {slug: write_dataset(slug, root / "src")[0] for slug in DATASETS}
    catalog = Catalog(str(root / "catalog")).init()
    results = _ingest(catalog, root / "src")
    assert all(r.status == "ingested" for r in results), [r.message for r in results]
    return catalog, truth, root


def _ideal(regions: np.ndarray, feature_of_region: np.ndarray, offset: float = 0.0) -> tuple[Stack, MaskFeatures]:
    """The true regions as masks and, as the feature map, one-hot per region's material at pixel resolution (plus
    ``offset`` in every channel)."""
    masks = np.stack([regions == r for r in range(int(regions.max()) + 1)])
    feats = np.eye(int(feature_of_region.max()) + 1, dtype=np.float32)[feature_of_region[regions]].transpose(2, 0, 1)
    feats = feats + np.float32(offset)
    return Stack.of(masks), MaskFeatures(feats, regions.shape)


# ------------------------------------------------------------------------------------------------ the rules
@pytest.mark.parametrize("behaviour", ["fixed", "released"])
def test_classification_recovers_the_classes_from_true_regions(airborne, behaviour: str) -> None:
    catalog, truth, _ = airborne
    fx = truth["whu-hi-longkou"]
    ann = catalog.annotation("whu-hi-longkou/WHU_Hi_LongKou")
    from catalog.fixtures.airborne import REGION_CLASS

    train = ann.pixels("train")
    ids = [1, 2, 3, 4]
    prompts = [[tuple(p) for p in np.argwhere(train & (ann.array == c))] for c in ids]
    target = np.where(ann.pixels("test"), ann.array, 0)
    for offset in (0.0, 0.1):  # orthogonal class features, then features whose cosines are all positive
        stack, feats = _ideal(fx.truth["regions"], REGION_CLASS, offset)
        raw = core.classify(stack, feats, prompts, ids, 0.0, behaviour, OPEN)  # type: ignore[arg-type]
        pred = np.asarray(ids)[raw] if behaviour == "released" else raw
        scores = classification_metrics(pred, target)
        if behaviour == "released" and offset == 0.0:
            # the released open-set test reads the LAST prototype's cosine (0 unless the mask is of class 4), so
            # only class 4 is painted and the rest stays 0, i.e. the first class
            assert set(np.unique(raw)) == {0, 3} and scores["oa"] < 0.5
        else:
            assert scores["oa"] == 1.0 and scores["kappa"] == 1.0


def test_classification_open_set_and_unassigned_differ_between_behaviours() -> None:
    regions = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 2, 2], [2, 2, 2, 2]])
    masks = np.stack([regions == r for r in range(3)])
    feats = np.zeros((2, 4, 4), dtype=np.float32)
    feats[0][regions == 0] = 1
    feats[1][regions == 1] = 1
    feats[:, regions == 2] = np.array([[-1.0], [-1.0]], dtype=np.float32)  # unlike either class: cosine < 0
    stack, mf = Stack.of(masks), MaskFeatures(feats, regions.shape)
    prompts = [[(0, 0)], [(0, 3)]]
    fixed = core.classify(stack, mf, prompts, [5, 7], 0.0, "fixed", {})
    released = core.classify(stack, mf, prompts, [5, 7], 0.0, "released", {})
    assert (fixed[regions == 0] == 5).all() and (fixed[regions == 1] == 7).all() and (fixed[regions == 2] == 0).all()
    # released: the map holds list indices; the rejected row stays 0, which reads as the first class
    assert (released[regions == 0] == 0).all() and (released[regions == 1] == 1).all()
    assert (released[regions == 2] == 0).all()


def test_prompt_outside_every_mask_names_the_pixel_and_thresholds() -> None:
    stack = Stack.of(np.array([[[True, False], [False, False]]]))
    with pytest.raises(PromptOutsideMasks, match=r"y=1, x=1.*pred_iou_thresh=0.3"):
        stack.smallest_holding((1, 1), "class 2 prompt", {"pred_iou_thresh": 0.3})


def test_one_class_recovers_the_class_from_true_regions(airborne) -> None:
    catalog, truth, _ = airborne
    fx = truth["whu-hi-longkou"]
    from catalog.fixtures.airborne import REGION_CLASS

    ann = catalog.annotation("whu-hi-longkou/WHU_Hi_LongKou")
    stack, feats = _ideal(fx.truth["regions"], REGION_CLASS)
    positive = ann.array == 1
    prior = float((REGION_CLASS[fx.truth["regions"]] == 1).mean())
    res = core.one_class(stack, feats, (2, 2), prior, "fixed", {})
    scores = one_class_metrics(res.map, positive, ann.array > 0)
    assert scores == {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    assert res.threshold == pytest.approx(0.8)


def test_target_detection_recovers_the_targets_from_true_regions(airborne) -> None:
    _, truth, _ = airborne
    fx = truth["hyperfree-stone"]
    stack, feats = _ideal(fx.truth["regions"], np.array([0, 1, 2, 2]))
    cube = np.moveaxis(fx.cube, 0, -1)
    det, pixel = core.target_detection(stack, feats, cube, fx.truth["spectrum"], 0.94, 1, {})
    assert fx.label is not None and fx.label[pixel] == 1
    assert np.array_equal(det, fx.label.astype(np.float64))
    assert detection_auc(det, fx.label)["auc_pd_pf"] == 1.0
    dilated, _ = core.target_detection(stack, feats, cube, fx.truth["spectrum"], 0.94, 7, {})
    assert dilated.sum() > det.sum() and (dilated[fx.label == 1] == 1).all()


def test_anomaly_detection_recovers_the_anomalies_from_true_regions(airborne) -> None:
    _, truth, _ = airborne
    fx = truth["abu-beach"]
    regions = fx.truth["regions"]
    masks = np.stack([regions == r for r in range(int(regions.max()) + 1)])
    det = core.anomaly_detection(masks, 0.0009)
    assert fx.label is not None and np.array_equal(det, fx.label.astype(np.float64))


@pytest.mark.parametrize("behaviour", ["fixed", "released"])
def test_change_detection_recovers_the_change_from_true_regions(airborne, behaviour: str) -> None:
    _, truth, _ = airborne
    fx = truth["hermiston"]
    r1, r2 = fx.truth["regions"], fx.truth["regions2"]
    s1, f1 = _ideal(r1, np.array([0, 1]))
    s2, f2 = _ideal(r2, np.array([0, 1, 2]))
    f1 = MaskFeatures(np.concatenate([f1.flat.numpy().reshape(2, *r1.shape), np.zeros((1, *r1.shape))]), r1.shape)
    det, scores = core.change_detection(s1, s2, f1, f2, 0.9, behaviour)  # type: ignore[arg-type]
    assert fx.label is not None
    assert change_metrics(det, fx.label)["f1"] == 1.0


def test_feature_cells_follow_the_padding_unless_stretched() -> None:
    padded = core.cell_index((4, 4), (2, 4))  # a 2 x 4 scene fills the top half of the square input
    stretched = core.cell_index((4, 4), (2, 4), pad_aware=False)
    assert padded[:, 0].tolist() == [0, 4] and stretched[:, 0].tolist() == [0, 8]


# ------------------------------------------------------------------------------------------------ baselines
def test_baselines_reach_their_figures_on_the_fixtures(airborne) -> None:
    catalog, truth, _ = airborne
    ann = catalog.annotation("whu-hi-longkou/WHU_Hi_LongKou")
    cube = np.moveaxis(truth["whu-hi-longkou"].cube, 0, -1)
    train = ann.pixels("train")
    prompts = [[tuple(p) for p in np.argwhere(train & (ann.array == c))] for c in (1, 2, 3, 4)]
    lr = baselines.logistic_regression(cube, prompts, [1, 2, 3, 4])
    # one labelled pixel per class in 270 noisy bands: well above chance (0.25), far below the mask rule's 1.0
    assert classification_metrics(lr, np.where(ann.pixels("test"), ann.array, 0))["oa"] >= 0.55
    abu = truth["abu-beach"]
    assert detection_auc(baselines.rx(np.moveaxis(abu.cube, 0, -1)), abu.label)["auc_pd_pf"] >= 0.95
    stone = truth["hyperfree-stone"]
    ace = baselines.ace(np.moveaxis(stone.cube, 0, -1), stone.truth["spectrum"])
    assert detection_auc(ace, stone.label)["auc_pd_pf"] >= 0.95
    herm = truth["hermiston"]
    _, cva = baselines.change_vector(np.moveaxis(herm.cube, 0, -1), np.moveaxis(herm.truth["second"], 0, -1))
    assert change_metrics(cva, herm.label)["f1"] >= 0.9


# ------------------------------------------------------------------------------------------------ the runner
@pytest.mark.parametrize(("task", "dataset", "params"), [
    ("classification", "whu-hi-longkou", {}), ("one_class", "whu-hi-longkou", {"class_prior": 0.25}),
    ("target", "hyperfree-stone", {"feature_index": -1}), ("anomaly", "abu-beach", {}),
    ("change", "hermiston", {}), ("segment_all", "whu-hi-longkou", {}), ("segment_point", "whu-hi-longkou", None),
])
def test_every_task_runs_and_reports_random_init(airborne, task: str, dataset: str, params: dict | None) -> None:
    from stages.zeroshot.report import paper_figures
    from stages.zeroshot.run import ZeroShotConfig, run_zeroshot

    catalog, _, root = airborne
    given = {} if params is None else {**OPEN, **params}
    result = run_zeroshot(catalog, ZeroShotConfig(task=task, dataset=dataset, params=given, init_seed=SEED,
                                                  out=str(root / "reports")))
    doc = json.loads(result.report_json.read_text())
    assert result.random_init and "plumbing" in doc["note"] and doc["provenance"]["weights"] == "random-init"
    entry = doc["tasks"][task]  # the heads' report shape: dataset, head and baseline scores, primary metric
    assert entry["dataset"] == dataset and entry["primary"] in entry["head"]
    primary_rows = [r["value"] for r in result.rows if r["primary"] and r["method"].startswith("HyperFree")]
    assert entry["head"][entry["primary"]] == pytest.approx(float(np.mean(primary_rows)))
    assert (result.out_dir / "results.parquet").is_file() and (result.out_dir / "config.json").is_file()
    assert list(result.out_dir.glob("*.png"))
    methods = {r["method"] for r in result.rows}
    assert any(m.startswith("HyperFree zero-shot (fixed)") for m in methods)
    if task in ("classification", "one_class", "target", "anomaly", "change"):
        assert any(m.startswith("baseline:") for m in methods)
    reported = dataset in paper_figures().get(task, {})  # HyperFree reports no Stone figure
    assert ("paper (HyperFree README)" in methods) == reported


def test_a_rerun_with_new_thresholds_runs_no_encoder_pass(airborne, monkeypatch: pytest.MonkeyPatch) -> None:
    from stages.zeroshot import encode
    from stages.zeroshot.run import ZeroShotConfig, run_zeroshot

    catalog, _, root = airborne
    config = ZeroShotConfig(task="classification", dataset="whu-hi-longkou", params=OPEN, init_seed=SEED,
                            out=str(root / "r1"))
    first = run_zeroshot(catalog, config)

    def no_pass(*args: object, **kwargs: object) -> None:
        raise AssertionError("the encoder ran although masks and features are cached")

    monkeypatch.setattr(encode.HyperFreeAutomaticMaskGenerator, "generate", no_pass)
    monkeypatch.setattr(encode, "prepare", no_pass)
    again = run_zeroshot(catalog, config.model_copy(update={"params": {**OPEN, "open_set_thresh": 0.5},
                                                            "prompts": {"1": [[2, 20]], "2": [[20, 2]]}}))
    assert first.rows and again.rows


def test_relax_retries_are_recorded(airborne) -> None:
    from stages.zeroshot.run import ZeroShotConfig, run_zeroshot

    catalog, _, root = airborne
    strict = {**OPEN, "pred_iou_thresh": 0.15, "points_per_side": 2}
    config = ZeroShotConfig(task="one_class", dataset="whu-hi-longkou", params={**strict, "class_prior": 0.25},
                            init_seed=SEED, out=str(root / "relax"))
    with pytest.raises(PromptOutsideMasks, match="pred_iou_thresh=0.15"):
        run_zeroshot(catalog, config)
    result = run_zeroshot(catalog, config.model_copy(update={"relax": True, "relax_steps": 12}))
    notes = json.loads(result.report_json.read_text())["tasks"]["one_class"]["scenes"][0]["notes"]
    assert notes["relax_retries"] and "no mask" in notes["relax_retries"][0]["error"]


def test_pixel_split_is_recorded_and_bad_maps_quarantine(airborne, tmp_path: Path) -> None:
    catalog, truth, _ = airborne
    ann = catalog.annotation("whu-hi-longkou/WHU_Hi_LongKou")
    assert ann.protocol == {"per_class": 1, "fraction": None, "seed": 0}
    assert np.array_equal(ann.pixel_split, truth["whu-hi-longkou"].truth["pixel_split"])
    assert catalog.row("whu-hi-longkou/WHU_Hi_LongKou")["split"] == "pixels"
    src = tmp_path / "src"
    write_dataset("abu-beach", src)
    import scipy.io

    data = scipy.io.loadmat(src / "abu-beach" / "abu-beach-2.mat")
    data["map"][0, :3] = [2, 3, 4]
    scipy.io.savemat(src / "abu-beach" / "abu-beach-2.mat", {"data": data["data"], "map": data["map"]})
    bad = Catalog(str(tmp_path / "cat")).init()
    results = _ingest(bad, src)
    assert results[0].status == "quarantined"
    q = bad.quarantine()
    assert q["field"].tolist() == ["labels.files"] and "binary" in q["message"].iloc[0]


def test_the_report_table_has_a_paper_column(airborne) -> None:
    from stages.zeroshot.run import ZeroShotConfig, run_zeroshot

    catalog, _, root = airborne
    result = run_zeroshot(catalog, ZeroShotConfig(task="anomaly", dataset="abu-beach", params=OPEN, init_seed=SEED,
                                                  out=str(root / "md")))
    text = (result.out_dir / "report.md").read_text()
    assert "| metric | HyperFree zero-shot | baseline (RX) | paper |" in text and "random-init" in text
    row = next(line for line in text.splitlines() if line.startswith("| auc_pd_pf |"))
    assert row.rstrip(" |").endswith("0.9566")  # HyperFree's Beach2 figure on its metric's row


def test_released_band_draws_replay_python_random_and_change_the_features() -> None:
    import random

    import torch

    from model import create_model
    from model.spectral import GRID_WAVELENGTHS_NM, MATCH_TOLERANCE_NM, find_corresponding_indices
    from stages.zeroshot.encode import ReleasedDraws, encode_features

    wl = np.linspace(427.0, 1017.0, 60)
    draws = ReleasedDraws(5).next(wl)
    rng = random.Random(5)
    matches = len(find_corresponding_indices(wl, GRID_WAVELENGTHS_NM, MATCH_TOLERANCE_NM)[0])
    assert matches > 60  # a band within 10 nm of two grid entries matches both
    assert draws == sorted(rng.randint(0, matches - 1) for _ in range(40))
    torch.manual_seed(0)
    model = create_model("tiny").eval()
    cube = np.random.default_rng(0).random((16, 16, 60)).astype(np.float32)
    full = encode_features(model, cube, wl, 1.0, "fixed")[-1]
    drawn = encode_features(model, cube, wl, 1.0, "fixed", band_draws=draws)[-1]
    again = encode_features(model, cube, wl, 1.0, "fixed", band_draws=draws)[-1]
    assert np.array_equal(drawn, again) and not np.allclose(full, drawn)


@pytest.mark.parametrize(("what", "field"), [("spectrum", "labels.target_spectrum"), ("second", "labels.second")])
def test_airborne_companions_are_checked_at_ingest(tmp_path: Path, what: str, field: str) -> None:
    src = tmp_path / "src"
    if what == "spectrum":
        write_dataset("hyperfree-stone", src)
        path = src / "hyperfree-stone" / "target_spectrum_stone.txt"
        path.write_text("\n".join(path.read_text().splitlines()[:-3]) + "\n")  # 43 values for 46 bands
    else:
        write_dataset("hermiston", src)
        import tifffile

        path = src / "hermiston" / "val" / "time2" / "img2_1.tif"
        tifffile.imwrite(path, tifffile.imread(path)[:, :20], photometric="minisblack", metadata=None)
    catalog = Catalog(str(tmp_path / "cat")).init()
    results = _ingest(catalog, src)
    assert [r.status for r in results] == ["quarantined"]
    q = catalog.quarantine()
    assert q["field"].tolist() == [field] and q["source_path"].iloc[0] == str(path)


def test_a_user_dataset_declares_pixel_classes_in_its_yaml(tmp_path: Path) -> None:
    folder = tmp_path / "src" / "my-scene"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    gt = np.zeros((12, 10), dtype=np.uint8)
    gt[:6] = 1
    gt[6:] = 2
    gt[0] = 0
    np.save(folder / "scene.npy", rng.random((12, 10, 25)).astype(np.float32))
    np.save(folder / "scene_gt.npy", gt)
    (folder / "dataset.yaml").write_text(
        "name: My Scene\nformat: npy\nfiles: scene.npy\noptions: {axes: yxb}\n"
        "wavelengths_nm: {start: 450, stop: 950, count: 25}\ngsd_m: 2.0\nroles: [evaluation]\n"
        "labels: {kind: pixel_classes, files: '{stem}_gt.npy', class_names: [unlabelled, field, forest],\n"
        "         pixel_split: {fraction: 0.2, seed: 7}}\n")
    catalog = Catalog(str(tmp_path / "cat")).init()
    results = _ingest(catalog, tmp_path / "src")
    assert results[0].status == "ingested", results[0].message
    ann = catalog.annotation("my-scene/scene")
    assert ann.protocol == {"per_class": None, "fraction": 0.2, "seed": 7}
    train = ann.pixels("train")
    assert [int((train & (gt == c)).sum()) for c in (1, 2)] == [10, 12]  # 20% of 50 and of 60 pixels
    assert not (train & ann.pixels("test")).any() and ((train | ann.pixels("test")) == (gt > 0)).all()


def test_mask_means_from_cell_counts_equal_the_gathered_ones() -> None:
    rng = np.random.default_rng(4)
    feature = rng.standard_normal((6, 4, 4)).astype(np.float32)
    masks = rng.random((5, 30, 22)) < 0.4
    gathered = MaskFeatures(feature, (30, 22))
    counted = MaskFeatures(feature, (30, 22), gather=False)
    for m in masks:
        assert np.allclose(gathered.mean(m).numpy(), counted.mean(m).numpy(), atol=1e-6)


def test_the_suite_runs_every_held_task_and_names_what_it_leaves_out(airborne) -> None:
    from stages.zeroshot.suite import ZeroShotSuiteConfig, held_scenes, run_zeroshot_suite

    catalog, _, root = airborne
    held, missing = held_scenes(catalog, ["classification", "anomaly", "change", "target"],
                                {"target": "whu-hi-longkou"})
    assert held == {"classification": "whu-hi-longkou", "anomaly": "abu-beach", "change": "hermiston"}
    assert "whu-hi-longkou holds no target_map" in missing["target"]
    out = root / "suite"
    result = run_zeroshot_suite(catalog, ZeroShotSuiteConfig(
        tasks=["anomaly", "change"], params={"anomaly": OPEN, "change": OPEN}, out=str(out)))
    assert {r["task"] for r in result.rows} == {"anomaly", "change"} and result.random_init
    doc = json.loads((out / "suite.json").read_text())
    assert set(doc["reports"]) == {"anomaly", "change"} and doc["random_init"] is True
    assert json.loads((out / "suite-config.json").read_text())["tasks"] == ["anomaly", "change"]
    assert all(Path(p).is_file() for p in doc["reports"].values())
