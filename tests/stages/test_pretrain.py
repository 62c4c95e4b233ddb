"""Pretraining data and trainer on a tiny catalog of 15- to 420-band fixtures with synthetic fused masks."""

from __future__ import annotations

import csv
import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader

from base.errors import InputError
from catalog.catalog import Catalog
from catalog.fixtures import write_dataset
from catalog.masks import MaskSet, MaskStore, table_from_masks
from catalog.specs import spec_for_folder
from model import create_model, describe, load_checkpoint
from model.hyperfree import file_sha256
from model.preprocess import prepare_batch
from stages.ingest import ingest_item, plan
from stages.ingest.discover import item_for
from stages.pretraining import PretrainConfig, launch, train
from stages.pretraining.checkpoints import latest_checkpoint
from stages.pretraining.data import BandSignatureBatchSampler, PretrainDataset, collate, scan_catalog
from stages.pretraining.runtime import setup_runtime
from stages.pretraining.trainer import Trainer
from stages.training.checkpoints import rng_state, set_rng_state
from stages.training.optim import lr_factor

DATASETS = ("cave", "hot-2024-rednir", "hyperspectral-city-v2", "virginia-tech-tree")  # 31, 15, 128, 420 bands
CROP = 16


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models gain nothing from intra-op threads, and two threads stall when the cores are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def catalog_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A catalog of four datasets; every image gets synthetic fused masks: discs plus one tall left strip whose
    stored prompt (its deepest point) lies outside many crops."""
    root = tmp_path_factory.mktemp("pretrain")
    for slug in DATASETS:
        write_dataset(slug, root / "src")
    cat = Catalog(str(root / "cat")).init()
    for w in plan(root / "src", cat).items:
        spec = spec_for_folder(Path(w.folder))
        assert spec is not None
        assert ingest_item(cat, spec, item_for(Path(w.folder), spec, w.primary)).status == "ingested"
    store = MaskStore(cat)
    rng = np.random.default_rng(0)
    for row in cat.images().itertuples():
        yy, xx = np.mgrid[: row.height, : row.width]
        discs = [(yy - rng.integers(0, row.height)) ** 2 + (xx - rng.integers(0, row.width)) ** 2
                 <= int(rng.integers(2, 6)) ** 2 for _ in range(3)]
        strip = xx < max(row.width // 2, 2)
        masks = np.stack([*discs, strip])
        store.write(row.image_id, "fused-test", "fused", MaskSet(masks, table_from_masks(masks, "fused", score=1.0)),
                    random_init=True)
    return cat.uri


def tiny_config(catalog_uri: str, out: Path, **kw: object) -> PretrainConfig:
    base = {"catalog": catalog_uri, "out_dir": str(out), "steps": 6, "batch_size": 2, "crop_size": CROP,
            "min_mask_pixels": 4, "checkpoint_every": 100, "device": "cpu"}
    return PretrainConfig.preset("tiny", **{**base, **kw})


# ---------------------------------------------------------------------------------------------- data
def test_scan_finds_every_image_with_its_band_signature(catalog_uri: str) -> None:
    images = scan_catalog(Catalog(catalog_uri))
    assert {i.dataset for i in images} == set(DATASETS)
    bands = {i.dataset: i.wavelengths.size for i in images}
    assert bands == {"cave": 31, "hot-2024-rednir": 15, "hyperspectral-city-v2": 128, "virginia-tech-tree": 420}
    assert len({i.signature for i in images}) == 4
    city = [i for i in images if i.dataset == "hyperspectral-city-v2"]
    assert len(city) == 7  # its 6 train images and the unsplit one: val and test images stay out of pretraining
    with pytest.raises(ValueError, match="fused masks"):
        scan_catalog(Catalog(catalog_uri), datasets=["no-such-dataset"])


def test_dataset_crops_hold_masks_that_contain_their_prompts(catalog_uri: str) -> None:
    ds = PretrainDataset(catalog_uri, CROP, min_mask_pixels=4, max_masks=3, seed=0)
    cat = Catalog(catalog_uri)
    redrawn = 0
    for index, info in enumerate(ds.images):
        fused = cat.fused(info.image_id)
        for draw in range(6):
            s = ds[(index, draw)]
            c = info.wavelengths.size
            assert s.cube.shape == (c, CROP, CROP) and s.cube.dtype == torch.float32
            assert s.rgb.shape == (3, CROP, CROP) and s.rgb.min() >= 0.0 and s.rgb.max() <= 1.0
            assert torch.equal(s.wavelengths, torch.from_numpy(info.wavelengths))
            assert 1 <= s.masks.shape[0] <= 3 and s.points.shape == (s.masks.shape[0], 2)
            y0, x0 = s.origin
            h, w = min(CROP, info.height - y0), min(CROP, info.width - x0)
            assert s.size == (h, w)  # stored values, scaled later by the trainer's preprocessing contract
            stored_crop = cat.read_crop(info.location, y0, x0, CROP).astype(np.float32)
            assert torch.equal(s.cube[:, :h, :w], torch.from_numpy(stored_crop))
            assert not s.masks[:, h:, :].any() and not s.masks[:, :, w:].any()  # padding is background
            assert (s.masks.flatten(1).sum(1) >= 4).all()
            for m, (px, py) in zip(s.masks, s.points.long().tolist(), strict=True):
                assert m[py, px], f"prompt ({px}, {py}) outside its mask in {info.image_id} draw {draw}"
                stored = {(int(x) - x0, int(y) - y0) for x, y in zip(fused.table["prompt_x"], fused.table["prompt_y"],
                                                                       strict=True)}
                redrawn += (px, py) not in stored
            again = ds[(index, draw)]
            assert torch.equal(again.cube, s.cube) and torch.equal(again.points, s.points)
    assert redrawn > 0  # some stored prompts fell outside their crop and were re-drawn inside the mask


def test_small_images_are_padded_and_small_masks_dropped(catalog_uri: str) -> None:
    ds = PretrainDataset(catalog_uri, CROP, min_mask_pixels=10**6)
    index = next(i for i, info in enumerate(ds.images) if info.dataset == "hot-2024-rednir")  # 8 x 8 images
    s = ds[(index, 0)]
    assert s.masks.shape == (0, CROP, CROP) and s.points.shape == (0, 2)
    assert s.cube[:, 8:, :].abs().sum() == 0 and s.cube[:, :, 8:].abs().sum() == 0
    assert s.cube[:, :8, :8].abs().sum() > 0


def test_rgb_is_the_aligned_rgb_else_the_false_colour_of_the_crop(catalog_uri: str) -> None:
    from stages.labelling.falsecolor import to_rgb

    ds = PretrainDataset(catalog_uri, CROP, min_mask_pixels=4)
    cat = Catalog(catalog_uri)
    index = next(i for i, info in enumerate(ds.images) if info.dataset == "cave")
    s = ds[(index, 0)]
    rgb = cat.rgb(ds.images[index].image_id)
    assert rgb is not None
    y0, x0 = s.origin
    expected = torch.from_numpy(rgb[y0:y0 + CROP, x0:x0 + CROP].transpose(2, 0, 1).astype(np.float32) / 255)
    torch.testing.assert_close(s.rgb, expected)

    index = next(i for i, info in enumerate(ds.images) if info.dataset == "virginia-tech-tree")  # 420 bands, no RGB
    info = ds.images[index]
    s = ds[(index, 0)]
    y0, x0 = s.origin
    h, w = min(CROP, info.height - y0), min(CROP, info.width - x0)
    synth, how = to_rgb(cat.read_crop(info.location, y0, x0, CROP), info.wavelengths)
    assert how == "cie1931" and synth.shape == (h, w, 3)
    torch.testing.assert_close(s.rgb[:, :h, :w], torch.from_numpy(synth.transpose(2, 0, 1).astype(np.float32) / 255))
    assert s.rgb[:, h:, :].abs().sum() == 0 and s.rgb[:, :, w:].abs().sum() == 0


def test_sampler_groups_by_band_signature_and_mixes_datasets(catalog_uri: str) -> None:
    ds = PretrainDataset(catalog_uri, CROP, min_mask_pixels=4)
    sigs = ds.signatures
    sampler = BandSignatureBatchSampler(sigs, batch_size=3, steps=60, seed=0)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 60
    seen = set()
    for batch in batches:
        assert len({sigs[i] for i, _ in batch}) == 1
        seen.add(sigs[batch[0][0]])
    assert len(seen) == 4  # 15-, 31-, 128- and 420-band batches in one run
    draws = [d for batch in batches for _, d in batch]
    assert len(set(draws)) == len(draws)
    # Resuming at step 40 yields the tail of the uninterrupted stream.
    assert list(BandSignatureBatchSampler(sigs, 3, 60, seed=0, start_step=40)) == batches[40:]
    # DDP sharding: each step, both ranks use one group and take disjoint slices of its permutation.
    r0 = BandSignatureBatchSampler(sigs, 1, 20, seed=0, rank=0, world_size=2)
    r1 = BandSignatureBatchSampler(sigs, 1, 20, seed=0, rank=1, world_size=2)
    for a, b in zip(r0, r1, strict=True):
        assert sigs[a[0][0]] == sigs[b[0][0]] and a[0][1] != b[0][1]
        if sigs.count(sigs[a[0][0]]) >= 2:
            assert a[0][0] != b[0][0]


def test_collate_refuses_mixed_wavelength_sets(catalog_uri: str) -> None:
    ds = PretrainDataset(catalog_uri, CROP, min_mask_pixels=4)
    by: dict[str, int] = {}
    for i, info in enumerate(ds.images):
        by.setdefault(info.dataset, i)
    with pytest.raises(ValueError, match="BandSignatureBatchSampler"):
        collate([ds[by["cave"]], ds[by["virginia-tech-tree"]]])


def test_worker_processes_yield_the_same_batches(catalog_uri: str) -> None:
    ds = PretrainDataset(catalog_uri, CROP, min_mask_pixels=4)

    def batches(workers: int) -> list:
        sampler = BandSignatureBatchSampler(ds.signatures, 2, 4, seed=3)
        return list(DataLoader(ds, batch_sampler=sampler, collate_fn=collate, num_workers=workers,
                               multiprocessing_context="spawn" if workers else None))

    in_process, in_workers = batches(0), batches(2)
    assert len(in_process) >= 2, "the fixture catalog gave fewer than two batches: nothing is compared"
    for a, b in zip(in_process, in_workers, strict=True):
        assert a.image_ids == b.image_ids and torch.equal(a.cube, b.cube) and torch.equal(a.rgb, b.rgb)
        assert all(torch.equal(x, y) for x, y in zip(a.masks, b.masks, strict=True))


# ---------------------------------------------------------------------------------------------- trainer
def test_lr_schedule_warms_up_then_decays_to_min_lr() -> None:
    cfg = PretrainConfig(steps=100, warmup_steps=10, lr=1e-3, min_lr=1e-5)
    lrs = [cfg.lr * lr_factor(s, cfg) for s in range(101)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:], strict=False))
    assert lrs[100] == pytest.approx(1e-5)


def test_tiny_model_overfits_one_batch(catalog_uri: str, tmp_path: Path) -> None:
    ds = PretrainDataset(catalog_uri, 32, min_mask_pixels=4)
    batch = collate([ds[(i, 0)] for i, info in enumerate(ds.images) if info.dataset == "cave"])
    cfg = tiny_config(catalog_uri, tmp_path, crop_size=32, lr=1e-3, warmup_steps=1, steps=1000, grid_samples=None)
    trainer = Trainer.build(cfg, setup_runtime("cpu"))
    rows = [trainer.step(s, batch) for s in range(30)]
    assert rows[0]["prompts"] >= 4
    assert rows[-1]["loss"] <= rows[0]["loss"] / 2, [round(r["loss"], 3) for r in rows]
    assert rows[-1]["seg"] < rows[0]["seg"] and rows[-1]["distill"] < rows[0]["distill"]


def _rows(run: Path) -> list[dict[str, str]]:
    with (run / "metrics.csv").open() as fh:
        return list(csv.DictReader(fh))


def test_resume_continues_exactly_as_an_uninterrupted_run(catalog_uri: str, tmp_path: Path) -> None:
    full = train(tiny_config(catalog_uri, tmp_path / "full"))
    assert full.steps_done == 6 and full.random_init
    cfg = tiny_config(catalog_uri, tmp_path / "sliced")
    first = train(cfg, until_step=3)
    assert first.steps_done == 3 and Path(first.checkpoint).name == "step_0000003"
    with pytest.raises(FileExistsError, match="resume=True"):
        train(cfg)
    with pytest.raises(ValueError, match="lr"):
        train(dataclasses.replace(cfg, lr=0.5), resume=True)
    second = train(cfg, resume=True)
    assert second.steps_done == 6
    a, b = _rows(tmp_path / "full"), _rows(tmp_path / "sliced")
    assert [r["step"] for r in b] == [str(s) for s in range(6)]
    for ra, rb in zip(a, b, strict=True):  # bit-exact on the CPU
        for key in ("loss", "seg", "distill", "lr", "grad_norm", "prompts", "bands"):
            assert ra[key] == rb[key], (ra["step"], key)
    m_full = create_model("tiny")
    m_sliced = create_model("tiny")
    load_checkpoint(m_full, Path(full.checkpoint) / "model.safetensors", strict=True)
    load_checkpoint(m_sliced, Path(second.checkpoint) / "model.safetensors", strict=True)
    for (k, va), vb in zip(m_full.state_dict().items(), m_sliced.state_dict().values(), strict=True):
        assert torch.equal(va, vb), k


def test_checkpoint_round_trip_and_run_records(catalog_uri: str, tmp_path: Path) -> None:
    cfg = tiny_config(catalog_uri, tmp_path / "run", steps=4, checkpoint_every=2, keep_checkpoints=1)
    result = train(cfg)
    run = Path(result.out_dir)
    ckpt = latest_checkpoint(run)
    assert ckpt is not None and ckpt.name == "step_0000004" and Path(result.checkpoint) == ckpt
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_0000004"]  # keep 1
    assert {p.name for p in ckpt.iterdir()} == {"model.safetensors", "distill.safetensors", "state.pt", "config.json"}

    model = create_model("tiny")
    report = load_checkpoint(model, ckpt / "model.safetensors", strict=True)
    assert report.is_exact
    from safetensors import safe_open

    with safe_open(str(ckpt / "model.safetensors"), "pt") as fh:
        assert fh.metadata()["student_weights"] == "random-init"
        assert fh.metadata()["teacher_weights"] == "random-init"
        assert json.loads(fh.metadata()["preprocessing"]) == describe("released")
    state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True)
    assert state["step"] == 4 and state["scheduler"]["last_epoch"] == 4
    assert len(state["optimizer"]["state"]) > 0

    saved = json.loads((run / "config.json").read_text())
    assert PretrainConfig.load(run / "config.json") == cfg
    assert saved["student_weights"] == saved["teacher_weights"] == "random-init"
    assert saved["preprocessing"] == describe("released") and saved["init"] is None
    assert saved["images"] == 12 and saved["band_signatures"] == 4  # H-City: 6 train + 1 unsplit of its 13
    rows = _rows(run)
    assert len(rows) == 4 and all("random-init" in r["weights"] for r in rows)
    assert all(np.isfinite(float(r["loss"])) for r in rows)
    assert (run / "loss.png").stat().st_size > 1000
    assert json.loads((run / "result.json").read_text())["steps_done"] == 4


def test_init_from_a_checkpoint_is_strict_unless_asked_and_recorded(catalog_uri: str, tmp_path: Path) -> None:
    torch.manual_seed(7)
    same = tmp_path / "same.safetensors"
    save_file(create_model("tiny").state_dict(), str(same))
    result = train(tiny_config(catalog_uri, tmp_path / "same", steps=1, student_checkpoint=str(same)))
    saved = json.loads((tmp_path / "same" / "config.json").read_text())
    assert result.student_weights == file_sha256(same) == saved["init"]["sha256"]
    assert saved["init"]["strict"] and saved["init"]["dropped"] == [] and saved["init"]["resized"] == []

    merged = tmp_path / "merged.pth"  # another layout: patch merging after block 0 adds a PatchMerging module
    torch.save(create_model("tiny", merge_indexes=(0,), feature_indexes=(0, 1)).state_dict(), merged)
    with pytest.raises(InputError, match=r"unexpected 3: \['image_encoder.multi_scale_convs.0.*--non-strict"):
        train(tiny_config(catalog_uri, tmp_path / "strict", steps=1, student_checkpoint=str(merged)))
    train(tiny_config(catalog_uri, tmp_path / "loose", steps=1, student_checkpoint=str(merged), init_strict=False))
    init = json.loads((tmp_path / "loose" / "config.json").read_text())["init"]
    assert not init["strict"] and init["dropped"] == ["image_encoder.multi_scale_convs.0.reduction.weight",
                                                      "image_encoder.multi_scale_convs.0.norm.weight",
                                                      "image_encoder.multi_scale_convs.0.norm.bias"]


def test_crops_are_prepared_under_the_configured_contract(catalog_uri: str, tmp_path: Path) -> None:
    ds = PretrainDataset(catalog_uri, CROP, min_mask_pixels=4)
    batch = collate([ds[(i, 0)] for i, info in enumerate(ds.images) if info.dataset == "cave"])
    seen: dict[str, torch.Tensor] = {}
    for contract in ("released", "crop_max"):
        trainer = Trainer.build(tiny_config(catalog_uri, tmp_path, preprocessing=contract), setup_runtime("cpu"))
        def keep(_: torch.nn.Module, args: tuple, name: str = contract) -> None:
            seen[name] = args[0].detach().clone()  # the encoder input PretrainModule.forward receives

        trainer.module.register_forward_pre_hook(keep)
        trainer.step(0, batch)
    expected = prepare_batch(batch.cube, batch.sizes, 64, batch.gsd_m, "released").image
    assert torch.equal(seen["released"], expected)
    assert (seen["released"] - seen["crop_max"]).abs().max() > 0.01
    with pytest.raises(ValueError, match="Unknown preprocessing contract"):
        Trainer.build(tiny_config(catalog_uri, tmp_path, preprocessing="raw"), setup_runtime("cpu"))


def test_rng_state_round_trips_through_weights_only_load(tmp_path: Path) -> None:
    torch.manual_seed(5)
    np.random.seed(5)
    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = (torch.rand(3), np.random.rand(3))
    torch.manual_seed(99)
    np.random.seed(99)
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert torch.equal(torch.rand(3), expected[0]) and np.array_equal(np.random.rand(3), expected[1])


def test_runner_records_its_config_and_reuses_a_finished_run(catalog_uri: str, tmp_path: Path) -> None:
    from stages.pretraining import PretrainStageConfig, run_pretrain
    from stages.registry import STAGES

    assert STAGES.get("pretrain").run is run_pretrain and STAGES.get("pretrain").config is PretrainStageConfig
    config = PretrainStageConfig(model="tiny", steps=2, batch_size=2, crop_size=CROP, min_mask_pixels=4,
                                 checkpoint_every=100, device="cpu", runs=str(tmp_path))
    first = run_pretrain(Catalog(catalog_uri), config)
    folder = Path(first.out_dir)
    assert not first.reused and first.steps_done == 2 and folder.parent == tmp_path
    assert folder.name.startswith("pretrain-tiny-")  # keyed on the inputs
    recorded = json.loads((folder / "stage-config.json").read_text())
    assert recorded["stage"] == "pretrain" and recorded["config"] == config.model_dump(mode="json")
    again = run_pretrain(Catalog(catalog_uri), config)
    assert again.reused and again.checkpoint == first.checkpoint and again.final == first.final
    other = run_pretrain(Catalog(catalog_uri), config.model_copy(update={"steps": 3}))
    assert not other.reused and other.out_dir != first.out_dir


@pytest.mark.integration
def test_launch_runs_ddp_under_torchrun_on_cpu(catalog_uri: str, tmp_path: Path) -> None:
    result = launch(tiny_config(catalog_uri, tmp_path / "ddp", steps=3), nproc=2)
    assert result.world_size == 2 and result.steps_done == 3
    assert len(_rows(tmp_path / "ddp")) == 3  # rank 0 alone writes
    assert (Path(result.checkpoint) / "model.safetensors").is_file()


@pytest.mark.integration
def test_pretrain_flow_runs_two_steps_and_publishes_artifacts(catalog_uri: str, tmp_path: Path) -> None:
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.testing.utilities import prefect_test_harness

    from pipelines.params import Device, ModelName, PathParams, PretrainParams, Profile
    from pipelines.pretrain import pretrain_flow

    params = PretrainParams(model=ModelName("tiny"), steps=2, out=str(tmp_path / "flow"), batch_size=2,
                            crop_size=CROP, device=Device.cpu)
    with prefect_test_harness(server_startup_timeout=120):
        result = pretrain_flow(Profile.production, PathParams(catalog=catalog_uri), params)

        async def artifacts() -> list:
            async with get_client() as client:
                key = ArtifactFilterKey(any_=["pretrain-loss", "pretrain-metrics"])
                return await client.read_artifacts(artifact_filter=ArtifactFilter(key=key))

        found = asyncio.run(artifacts())
    assert result["steps_done"] == 2 and Path(result["plot_png"]).is_file()
    assert {a.type for a in found} == {"markdown", "table"}
    assert all("random-init" in (a.description or "") for a in found)


def test_batches_decode_into_one_buffer_and_collate_without_copying(catalog_uri: str) -> None:
    ds = PretrainDataset(catalog_uri, CROP, min_mask_pixels=4)
    sig = ds.signatures[0]
    keys = [(i, 5) for i, s in enumerate(ds.signatures) if s == sig][:3]
    samples = ds.__getitems__(keys)
    batch = collate(samples)
    assert batch.cube.untyped_storage().data_ptr() == samples[0].cube.untyped_storage().data_ptr()
    for n, key in enumerate(keys):  # the same crops, values and padding as one by one
        torch.testing.assert_close(batch.cube[n], ds[key].cube, rtol=0, atol=0)


def test_batches_cross_processes_with_small_tensors_by_value(catalog_uri: str) -> None:
    import pickle
    from multiprocessing.reduction import ForkingPickler

    import torch.multiprocessing  # noqa: F401  (registers the shared-memory reductions of tensors)

    ds = PretrainDataset(catalog_uri, CROP, min_mask_pixels=4)
    batch = collate([ds[(0, 1)], ds[(0, 2)]])
    _, fields = batch.__reduce__()
    assert isinstance(fields[5][0], np.ndarray) and isinstance(fields[6][0], np.ndarray)  # masks, points by value
    again = pickle.loads(ForkingPickler.dumps(batch))
    for name in ("cube", "wavelengths", "gsd_m", "rgb"):
        torch.testing.assert_close(getattr(again, name), getattr(batch, name), rtol=0, atol=0)
    for a, b in zip(again.masks + again.points, batch.masks + batch.points, strict=True):
        assert isinstance(a, torch.Tensor) and torch.equal(a, b)
    assert again.image_ids == batch.image_ids and again.origins == batch.origins
