"""Segmentation losses against direct computations; the frozen RGB teacher and the DINO distillation head."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from model.distill import RANDOM_INIT, DistillConfig, DistillHead, RGBTeacher, TeacherConfig
from model.losses import (
    SegLossConfig,
    dice_loss,
    iou_mse_loss,
    mask_iou,
    segmentation_loss,
    sigmoid_focal_loss,
)


def _focal_direct(x: float, t: float, alpha: float = 0.25, gamma: float = 2.0) -> float:
    p = 1 / (1 + math.exp(-x))
    ce = -math.log(p) if t else -math.log(1 - p)
    p_t = p if t else 1 - p
    a = alpha if t else 1 - alpha
    return a * (1 - p_t) ** gamma * ce


def test_focal_loss_matches_direct_formula() -> None:
    logits = torch.tensor([[[2.0, -1.0], [0.5, -3.0]]])
    target = torch.tensor([[[1, 1], [0, 0]]], dtype=torch.bool)
    expected = sum(_focal_direct(x, t) for x, t in zip([2.0, -1.0, 0.5, -3.0], [1, 1, 0, 0], strict=True)) / 4
    assert sigmoid_focal_loss(logits, target).shape == (1,)
    assert sigmoid_focal_loss(logits, target).item() == pytest.approx(expected, rel=1e-6)
    no_alpha = sum(_focal_direct(x, t, alpha=0.5) * 2 for x, t in zip([2.0, -1.0, 0.5, -3.0], [1, 1, 0, 0],
                                                                      strict=True)) / 4
    assert sigmoid_focal_loss(logits, target, alpha=-1).item() == pytest.approx(no_alpha, rel=1e-6)


def test_dice_loss_matches_direct_formula() -> None:
    logits = torch.tensor([[[2.0, -1.0], [0.5, -3.0]]])
    target = torch.tensor([[[1, 1], [0, 0]]], dtype=torch.bool)
    p = torch.sigmoid(logits).flatten().tolist()
    inter = p[0] + p[1]
    expected = 1 - (2 * inter + 1) / (sum(p) + 2 + 1)
    assert dice_loss(logits, target).item() == pytest.approx(expected, rel=1e-6)
    # A confident, exact prediction has (nearly) zero dice loss; its inverse (nearly) one.
    assert dice_loss(torch.full((1, 4, 4), 20.0), torch.ones(1, 4, 4, dtype=torch.bool)).item() < 1e-6
    assert dice_loss(torch.full((1, 4, 4), -20.0), torch.ones(1, 4, 4, dtype=torch.bool)).item() > 0.9


def test_iou_of_thresholded_mask_and_mse() -> None:
    logits = torch.tensor([[[1.0, -1.0], [1.0, 1.0]]])
    target = torch.tensor([[[1, 0], [0, 1]]], dtype=torch.bool)
    assert mask_iou(logits, target).item() == pytest.approx(2 / 3)
    assert iou_mse_loss(torch.tensor([0.5]), logits, target).item() == pytest.approx((0.5 - 2 / 3) ** 2)
    empty = torch.zeros(1, 2, 2, dtype=torch.bool)
    assert mask_iou(torch.full((1, 2, 2), -1.0), empty).item() == 1.0
    assert mask_iou(torch.full((1, 2, 2), 1.0), empty).item() == 0.0


def test_segmentation_loss_picks_best_candidate_and_weights_20_1_1() -> None:
    torch.manual_seed(0)
    target = torch.zeros(2, 8, 8, dtype=torch.bool)
    target[:, 2:6, 2:6] = True
    good = torch.where(target, 5.0, -5.0)
    logits = torch.randn(2, 3, 8, 8)
    logits[0, 2] = good[0]  # prompt 0: candidate 2 is right
    logits[1, 0] = good[1]  # prompt 1: candidate 0 is right
    logits.requires_grad_(True)
    iou_pred = torch.full((2, 3), 0.5, requires_grad=True)
    out = segmentation_loss(logits, iou_pred, target)

    tgt = target.unsqueeze(1).expand(-1, 3, -1, -1)
    focal = sigmoid_focal_loss(logits.detach(), tgt)
    dice = dice_loss(logits.detach(), tgt)
    chosen = [(0, 2), (1, 0)]
    f = torch.stack([focal[i, j] for i, j in chosen]).mean()
    d = torch.stack([dice[i, j] for i, j in chosen]).mean()
    iou = ((0.5 - mask_iou(logits.detach(), tgt)) ** 2).mean()
    assert out.focal.item() == pytest.approx(f.item(), rel=1e-6)
    assert out.dice.item() == pytest.approx(d.item(), rel=1e-6)
    assert out.iou.item() == pytest.approx(iou.item(), rel=1e-6)
    assert out.total.item() == pytest.approx(20 * f.item() + d.item() + iou.item(), rel=1e-6)
    assert out.chosen_iou.tolist() == [1.0, 1.0]

    out.total.backward()
    assert logits.grad is not None and iou_pred.grad is not None
    grad = logits.grad.abs().flatten(2).sum(-1)
    assert grad[0, 2] > 0 and grad[1, 0] > 0  # the mask loss reaches the chosen candidates only
    assert grad[0, 0] == 0 and grad[0, 1] == 0 and grad[1, 1] == 0 and grad[1, 2] == 0
    assert bool((iou_pred.grad != 0).all())  # the IoU head learns on every candidate

    weighted = segmentation_loss(logits.detach(), iou_pred.detach(), target,
                                 SegLossConfig(focal_weight=1.0, dice_weight=0.0, iou_weight=0.0))
    assert weighted.total.item() == pytest.approx(f.item(), rel=1e-6)


def test_segmentation_loss_without_prompts_is_zero_and_rejects_bad_shapes() -> None:
    logits = torch.zeros(0, 3, 8, 8, requires_grad=True)
    out = segmentation_loss(logits, torch.zeros(0, 3, requires_grad=True), torch.zeros(0, 8, 8, dtype=torch.bool))
    assert out.total.item() == 0.0
    out.total.backward()
    with pytest.raises(ValueError, match="logits"):
        segmentation_loss(torch.zeros(2, 8, 8), torch.zeros(2, 1), torch.zeros(2, 8, 8, dtype=torch.bool))


# ---------------------------------------------------------------------------------------------- distillation
@pytest.fixture(scope="module")
def teacher() -> RGBTeacher:
    torch.manual_seed(0)
    return RGBTeacher(TeacherConfig.tiny())


def test_teacher_is_frozen_and_no_gradient_reaches_it(teacher: RGBTeacher) -> None:
    assert teacher.identity == RANDOM_INIT and teacher.provenance()["weights"] == RANDOM_INIT
    assert not any(p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.training and not teacher.model.training
    rgb = torch.rand(2, 3, 32, 32, requires_grad=True)
    tokens = teacher(rgb)
    assert tokens.shape == (2, 32, 4, 4) and not tokens.requires_grad

    head = DistillHead(16, teacher.embed_dim, DistillConfig.tiny())
    student_tokens = torch.randn(2, 16, 8, 8, requires_grad=True)
    loss = head.loss(head.student_logits(student_tokens), head.teacher_logits(tokens, (8, 8)))
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert rgb.grad is None
    assert student_tokens.grad is not None and student_tokens.grad.abs().sum() > 0


def test_teacher_loads_local_weights_and_reports_keys(teacher: RGBTeacher, tmp_path: Path) -> None:
    state = {k: v.clone() for k, v in teacher.model.state_dict().items()}
    save_file(state, str(tmp_path / "teacher.safetensors"))
    extra = dict(state, **{"head.extra": torch.zeros(3)})
    del extra["norm.weight"]
    torch.save(extra, tmp_path / "teacher.pth")

    rgb = torch.rand(1, 3, 56, 56)
    torch.manual_seed(123)  # a different random init, overwritten by the file
    loaded = RGBTeacher(TeacherConfig(**{**TeacherConfig.tiny().to_dict(),
                                         "checkpoint": str(tmp_path / "teacher.safetensors")}))
    assert loaded.load_report is not None and loaded.load_report.missing == ()
    assert loaded.load_report.unexpected == () and len(loaded.identity) == 64
    torch.testing.assert_close(loaded(rgb), teacher(rgb), rtol=0, atol=0)

    partial = RGBTeacher(TeacherConfig(**{**TeacherConfig.tiny().to_dict(),
                                          "checkpoint": str(tmp_path / "teacher.pth")}))
    assert partial.load_report is not None
    assert partial.load_report.missing == ("norm.weight",) and partial.load_report.unexpected == ("head.extra",)
    with pytest.raises(FileNotFoundError, match="TeacherConfig.checkpoint"):
        RGBTeacher(TeacherConfig(**{**TeacherConfig.tiny().to_dict(), "checkpoint": str(tmp_path / "nope.pth")}))


def test_distill_loss_is_lower_when_student_copies_teacher(teacher: RGBTeacher) -> None:
    torch.manual_seed(1)
    head = DistillHead(16, teacher.embed_dim, DistillConfig.tiny())
    cfg = head.config
    t_logits = head.teacher_logits(teacher(torch.rand(2, 3, 56, 56)), (8, 8))
    assert t_logits.shape == (2, 64, cfg.num_prototypes)
    head.center.copy_(torch.randn_like(head.center) * 0.1)
    copy = (t_logits - head.center) * (cfg.student_temp / cfg.teacher_temp)
    random_logits = torch.randn_like(t_logits)
    matched = head.loss(copy, t_logits)
    entropy = -(torch.softmax((t_logits - head.center) / cfg.teacher_temp, -1)
                * torch.log_softmax((t_logits - head.center) / cfg.teacher_temp, -1)).sum(-1).mean()
    assert matched.item() == pytest.approx(entropy.item(), rel=1e-4)  # cross-entropy = entropy at the optimum
    assert matched < head.loss(random_logits, t_logits)
    assert matched < head.loss(copy.roll(1, dims=1), t_logits)  # a misaligned copy is worse too


def test_center_is_an_ema_of_the_teacher_logits() -> None:
    head = DistillHead(16, 32, DistillConfig.tiny())
    m = head.config.center_momentum
    logits = torch.randn(2, 10, head.config.num_prototypes)
    head.update_center(logits)
    torch.testing.assert_close(head.center, (1 - m) * logits.mean(dim=(0, 1)).unsqueeze(0))
    before = head.center.clone()
    head.update_center(logits)
    torch.testing.assert_close(head.center, m * before + (1 - m) * logits.mean(dim=(0, 1)).unsqueeze(0))


def test_student_head_logits_are_cosines_on_the_token_grid() -> None:
    head = DistillHead(16, 32, DistillConfig.tiny())
    logits = head.student_logits(torch.randn(3, 16, 4, 5))
    assert logits.shape == (3, 20, head.config.num_prototypes)
    assert logits.abs().max() <= 1.0 + 1e-6
    # Teacher grids of any size land on the student's grid.
    assert head.teacher_logits(torch.randn(3, 32, 7, 7), (4, 5)).shape == (3, 20, head.config.num_prototypes)
