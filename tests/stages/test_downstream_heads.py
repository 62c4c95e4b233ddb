"""Head training and evaluation on small synthetic problems with clear structure: each head learns, beats its
trivial baseline by a margin, checkpoints and resumes exactly, and never touches the backbone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from base.errors import InputError
from model.heads import SaliencyHead, SegmentationHead, TrackingHead
from model.registry import create_model
from stages.downstream.backbone import backbone_feature_fn
from stages.downstream.baselines import (
    centre_prior,
    evaluate_centre_prior,
    evaluate_first_box,
    evaluate_spectral_baseline,
    fit_spectral_classifier,
)
from stages.downstream.checkpoints import load_head
from stages.downstream.evaluate import evaluate_saliency, evaluate_segmentation, evaluate_tracking
from stages.downstream.losses import SaliencyLoss, SegmentationLoss, TrackingLoss
from stages.downstream.samples import SaliencySample, SegmentationSample, TrackingSequence
from stages.downstream.spec import HeadTrainConfig
from stages.downstream.tracker import TrackerConfig, make_tracking_pairs
from stages.downstream.train import train_head

IGNORE = 255


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ------------------------------------------------------------------------------------------------ segmentation
def _segmentation_data(n: int, seed: int) -> tuple[list[SegmentationSample], list[np.ndarray]]:
    """24 x 32 images in a 32 x 32 frame (bottom rows padding); classes constant on 4 x 4 cells. The "backbone"
    features see each cell's class clearly; a pixel's own spectrum carries it only faintly."""
    rng = np.random.default_rng(seed)
    signatures = rng.normal(0, 1, (3, 8))
    samples, cubes = [], []
    for i in range(n):
        cells = rng.integers(0, 3, size=(6, 8))
        target = np.kron(cells, np.ones((4, 4), dtype=np.int64))
        target[rng.random(target.shape) < 0.05] = IGNORE
        feats = torch.zeros(8, 8, 8)
        feats[:3, :6] = torch.from_numpy(np.eye(3)[cells].transpose(2, 0, 1) * 2.0).float()
        feats[:, :6] += 0.3 * torch.randn(8, 6, 8, generator=torch.Generator().manual_seed(seed * 100 + i))
        cube = 5 + 0.25 * signatures[np.kron(cells, np.ones((4, 4), dtype=np.int64))] + rng.normal(0, 1, (24, 32, 8))
        samples.append(SegmentationSample([feats], target, input_size=(24, 32), image_id=f"img{i}"))
        cubes.append(cube)
    return samples, cubes


def _segmentation_head() -> SegmentationHead:
    torch.manual_seed(0)
    return SegmentationHead([8], 3, [4], widths=(32, 16), out_stride=2, dropout=0.1)


def test_segmentation_head_learns_and_beats_the_spectral_baseline(tmp_path: Path) -> None:
    train, train_cubes = _segmentation_data(8, seed=1)
    test, test_cubes = _segmentation_data(4, seed=2)
    head = _segmentation_head()
    config = HeadTrainConfig(steps=40, batch_size=4, lr=3e-3, warmup_steps=4, checkpoint_every=40)
    result = train_head(head, SegmentationLoss(3, IGNORE), train, config, tmp_path, weights="random-init",
                        preprocessing="synthetic")
    assert np.mean(result.losses[-5:]) < 0.5 * np.mean(result.losses[:5])
    scores = evaluate_segmentation(head, test, 3, IGNORE)
    baseline = evaluate_spectral_baseline(train_cubes, [s.target.numpy() for s in train], test_cubes,
                                          [s.target.numpy() for s in test], 3, IGNORE)
    assert scores.predictions[0].shape == (24, 32)
    assert scores.metrics["miou"] > 0.8
    assert scores.metrics["miou"] > baseline.metrics["miou"] + 0.25
    assert scores.confusion.sum() == sum(int((s.target != IGNORE).sum()) for s in test)


def test_checkpoint_resume_ends_with_the_same_head(tmp_path: Path) -> None:
    samples, _ = _segmentation_data(6, seed=3)
    task = SegmentationLoss(3, IGNORE)
    config = HeadTrainConfig(steps=6, batch_size=2, lr=3e-3, warmup_steps=2, checkpoint_every=3)
    straight = _segmentation_head()
    full = train_head(straight, task, samples, config, tmp_path / "straight", weights="random-init",
                      preprocessing="synthetic")
    seen: list[float] = []

    def crash(step: int, loss: float) -> None:
        seen.append(loss)
        if step == 4:
            raise KeyboardInterrupt  # killed mid-run, after the step-3 checkpoint and one more step

    with pytest.raises(KeyboardInterrupt):
        train_head(_segmentation_head(), task, samples, config, tmp_path / "resumed", weights="random-init",
                   preprocessing="synthetic", on_step=crash)
    resumed_head = _segmentation_head()  # a fresh process: weights, optimizer, schedule, RNG from the checkpoint
    second = train_head(resumed_head, task, samples, config, tmp_path / "resumed", weights="random-init",
                        preprocessing="synthetic")
    assert second.resumed_from == 3 and len(second.losses) == 3
    assert seen[:3] + list(second.losses) == pytest.approx(full.losses, abs=1e-6)
    for (name, a), b in zip(straight.state_dict().items(), resumed_head.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), name
    loaded, meta = load_head(tmp_path / "resumed")
    assert meta["task"] == "segmentation" and meta["weights"] == "random-init" and meta["step"] == "6"
    for a, b in zip(loaded.state_dict().values(), straight.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    assert (tmp_path / "resumed" / "train_log.csv").read_text().count("\n") == 7  # header + 6 steps
    again = train_head(_segmentation_head(), task, samples, config, tmp_path / "resumed", weights="random-init",
                       preprocessing="synthetic")
    assert again.losses == () and again.resumed_from == 6


def test_a_run_killed_after_a_checkpoint_keeps_every_logged_step(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The checkpoint is the commit point: the steps it covers are logged before it is committed, so a run killed
    right after committing one resumes with a complete log (it lost the steps before the checkpoint when the log was
    written after it)."""
    import stages.downstream.train as train_module

    samples, _ = _segmentation_data(4, seed=6)
    task = SegmentationLoss(3, IGNORE)
    config = HeadTrainConfig(steps=6, batch_size=2, lr=3e-3, warmup_steps=2, checkpoint_every=3)
    train_head(_segmentation_head(), task, samples, config, tmp_path / "straight", weights="random-init",
               preprocessing="synthetic")
    save = train_module.save_head_checkpoint

    def killed_after_commit(*args: Any, **kwargs: Any) -> Path:
        save(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "save_head_checkpoint", killed_after_commit)
    with pytest.raises(KeyboardInterrupt):
        train_head(_segmentation_head(), task, samples, config, tmp_path / "resumed", weights="random-init",
                   preprocessing="synthetic")
    monkeypatch.undo()
    again = train_head(_segmentation_head(), task, samples, config, tmp_path / "resumed", weights="random-init",
                       preprocessing="synthetic")
    assert again.resumed_from == 3
    log = (tmp_path / "resumed" / "train_log.csv").read_text()
    assert [line.split(",")[0] for line in log.splitlines()[1:]] == ["0", "1", "2", "3", "4", "5"]
    assert log == (tmp_path / "straight" / "train_log.csv").read_text()  # seeded on the CPU: the same bits
    assert not list((tmp_path / "resumed").glob(".*.tmp"))


def test_resume_refuses_a_different_run(tmp_path: Path) -> None:
    samples, _ = _segmentation_data(2, seed=4)
    config = HeadTrainConfig(steps=1, batch_size=1, warmup_steps=1)
    train_head(_segmentation_head(), SegmentationLoss(3, IGNORE), samples, config, tmp_path, weights="random-init",
               preprocessing="synthetic")
    with pytest.raises(InputError, match="train.lr"):
        train_head(_segmentation_head(), SegmentationLoss(3, IGNORE), samples,
                   HeadTrainConfig(steps=2, batch_size=1, warmup_steps=1, lr=5e-4), tmp_path,
                   weights="random-init", preprocessing="synthetic")
    with pytest.raises(InputError, match="weights"):
        train_head(_segmentation_head(), SegmentationLoss(3, IGNORE), samples, config, tmp_path,
                   weights="0" * 64, preprocessing="synthetic")


def test_spectral_baseline_separates_distinct_spectra() -> None:
    rng = np.random.default_rng(5)
    target = rng.integers(0, 3, size=(20, 20))
    cube = np.eye(3)[target] * 10 + rng.normal(0, 0.1, (20, 20, 3)) + 1
    model = fit_spectral_classifier([cube], [target], 3, None)
    assert np.mean(model.predict(cube) == target) == 1.0


# ---------------------------------------------------------------------------------------------------- saliency
def _saliency_data(n: int, seed: int) -> list[SaliencySample]:
    """32 x 32 images with one salient square of 2-3 cells anywhere (not centred); features mark it clearly."""
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        size = int(rng.integers(2, 4))
        top, left = rng.integers(0, 8 - size, size=2)
        cells = np.zeros((8, 8))
        cells[top: top + size, left: left + size] = 1
        feats = torch.randn(2, 8, 8, generator=torch.Generator().manual_seed(seed * 100 + i)) * 0.3
        feats[0] += 2 * torch.from_numpy(cells).float()
        neck = torch.randn(8, 8, 8, generator=torch.Generator().manual_seed(seed * 100 + i + 50)) * 0.3
        neck[1] += 2 * torch.from_numpy(cells).float()
        samples.append(SaliencySample([feats, neck], np.kron(cells, np.ones((4, 4))), image_id=f"s{i}"))
    return samples


def test_saliency_head_learns_and_beats_the_centre_prior(tmp_path: Path) -> None:
    train, test = _saliency_data(12, seed=6), _saliency_data(6, seed=7)
    torch.manual_seed(0)
    head = SaliencyHead([2, 8], [4, 4], dim=32, num_heads=2, mlp_dim=64)
    config = HeadTrainConfig(steps=50, batch_size=4, lr=3e-3, warmup_steps=5, checkpoint_every=50)
    result = train_head(head, SaliencyLoss(), train, config, tmp_path, weights="random-init",
                        preprocessing="synthetic")
    assert np.mean(result.losses[-5:]) < 0.6 * np.mean(result.losses[:5])
    scores = evaluate_saliency(head, test)
    baseline = evaluate_centre_prior([s.mask.numpy() for s in test])
    assert scores.predictions[0].shape == (32, 32)
    assert scores.metrics["cc"] > baseline.metrics["cc"] + 0.3
    assert scores.metrics["mae"] < baseline.metrics["mae"]


def test_centre_prior_peaks_in_the_centre() -> None:
    prior = centre_prior(9, 15)
    assert prior.shape == (9, 15) and prior.argmax() == 4 * 15 + 7 and prior[4, 7] == 1.0
    corner = ((0.5 / 9 - 0.5) ** 2 + (0.5 / 15 - 0.5) ** 2) / (2 * 0.25**2)
    assert prior[0, 0] == pytest.approx(np.exp(-corner))


# ---------------------------------------------------------------------------------------------------- tracking
def _sequence(seed: int, frames: int = 16) -> TrackingSequence:
    """A 10 x 10 target of a distinct spectrum drifting ~3 px per frame over a noisy 72 x 72 background."""
    rng = np.random.default_rng(seed)
    pos = rng.uniform(20, 30, 2)
    vel = rng.uniform(2.0, 3.0, 2) * rng.choice([-1, 1], 2)
    images, boxes = [], []
    for _ in range(frames):
        image = rng.uniform(0, 0.3, (72, 72, 3)).astype(np.float32)
        x, y = (int(round(v)) for v in pos)
        image[y: y + 10, x: x + 10] = np.array([1.0, 0.1, 0.8]) + rng.normal(0, 0.05, (10, 10, 3))
        images.append(image)
        boxes.append([x, y, 10, 10])
        vel = np.where((pos + vel < 4) | (pos + vel > 58), -vel, vel)
        pos = pos + vel
    return TrackingSequence(images, np.array(boxes, float), name=f"seq{seed}")


def _pooled_features(crop: np.ndarray) -> list[torch.Tensor]:
    """A stand-in backbone: the crop's bands average-pooled to an 8 x 8 and a 4 x 4 grid."""
    x = torch.from_numpy(crop).permute(2, 0, 1).unsqueeze(0)
    return [torch.nn.functional.avg_pool2d(x, 4), torch.nn.functional.avg_pool2d(x, 8)]


def test_tracking_head_learns_and_beats_the_held_first_box(tmp_path: Path) -> None:
    tracker = TrackerConfig(crop_px=32)
    pairs = make_tracking_pairs([_sequence(s) for s in range(4)], _pooled_features, tracker, pairs_per_sequence=16)
    torch.manual_seed(0)
    head = TrackingHead([3, 3], [4, 8], hidden=16, tower_depth=1, groups=4)
    config = HeadTrainConfig(steps=60, batch_size=8, lr=3e-3, warmup_steps=5, checkpoint_every=60)
    result = train_head(head, TrackingLoss(), pairs, config, tmp_path, weights="random-init",
                        preprocessing="synthetic")
    assert np.mean(result.losses[-5:]) < 0.7 * np.mean(result.losses[:5])
    test = [_sequence(s) for s in (10, 11)]
    scores = evaluate_tracking(head, test, _pooled_features, tracker)
    baseline = evaluate_first_box(test)
    assert scores.boxes[0].shape == (16, 4)
    assert scores.metrics["success_auc"] > baseline.metrics["success_auc"] + 0.2
    assert scores.metrics["precision_20"] > baseline.metrics["precision_20"]


# ----------------------------------------------------------------------------------------- frozen backbone
def test_the_backbone_stays_frozen_with_a_real_tiny_backbone_in_the_loop(tmp_path: Path) -> None:
    torch.manual_seed(0)
    backbone = create_model("tiny")
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    enc = backbone.image_encoder
    wavelengths = [450.0 + 40 * i for i in range(6)]
    size = enc.img_size
    samples = []
    for i in range(3):  # features computed with autograd on, as a careless caller might: the trainer detaches
        feats = enc.forward_intermediates(torch.rand(1, 6, size, size), wavelengths)
        assert feats[0].requires_grad
        samples.append(SegmentationSample(feats, np.full((size, size), i % 2), image_id=str(i)))
    layout_channels = [f.shape[0] for f in samples[0].features]
    head = SegmentationHead(layout_channels, 2, [8] * len(layout_channels), widths=(16, 8), dropout=0.0)
    head_before = {k: v.clone() for k, v in head.state_dict().items()}
    train_head(head, SegmentationLoss(2, None), samples, HeadTrainConfig(steps=3, batch_size=2, warmup_steps=1),
               tmp_path / "seg", weights="random-init", preprocessing="released")
    feature_fn = backbone_feature_fn(backbone, wavelengths)  # the production path: frozen, no grad
    sequence = _sequence(20, frames=3)
    sequence = TrackingSequence([np.concatenate([f, f], axis=-1) for f in sequence.frames], sequence.boxes)
    tracker = TrackerConfig(crop_px=size)
    pairs = make_tracking_pairs([sequence], feature_fn, tracker, pairs_per_sequence=2)
    track_head = TrackingHead(layout_channels, [8] * len(layout_channels), hidden=8, tower_depth=1, groups=4)
    train_head(track_head, TrackingLoss(), pairs, HeadTrainConfig(steps=2, batch_size=2, warmup_steps=1),
               tmp_path / "track", weights="random-init", preprocessing="released")
    evaluate_tracking(track_head, [sequence], feature_fn, tracker)
    assert any(not torch.equal(v, head.state_dict()[k]) for k, v in head_before.items())  # the head did train
    for name, param in backbone.named_parameters():
        assert param.grad is None, name
        assert torch.equal(param, before[name]), name
    for name, buffer in backbone.named_buffers():
        assert torch.equal(buffer, before[name]), name


def test_predictions_drop_the_frame_padding() -> None:
    rows = torch.arange(8, dtype=torch.float32).repeat_interleave(4)  # frame of 32 px, one value per 4-px row
    logits = rows[None, None, :, None].expand(1, 1, 32, 32).clone()
    sample = SaliencySample([torch.zeros(1, 8, 8)], np.zeros((12, 16)), input_size=(24, 32))
    restored = sample.restore(logits)
    assert restored.shape == (1, 1, 12, 16)
    assert restored[0, 0, 0, 0] == 0 and restored[0, 0, -1, 0] == 5  # rows 24-31 of the frame are padding
    small = SaliencySample([torch.zeros(1, 8, 8)], np.zeros((12, 16)), input_size=(12, 16), frame_size=32)
    assert small.restore(logits)[0, 0, -1, 0] == 2  # the image fills only the frame's top-left 12 x 16
