"""Losses on hand-made tensors: exact values where the math gives them."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from training.losses import (
    OHEM_THRESHOLD,
    DiceCELoss,
    OhemLovaszLoss,
    cross_pseudo_supervision,
    lovasz_grad,
    lovasz_softmax,
    ohem_cross_entropy,
    ohem_select,
    soft_dice_loss,
)


def _target() -> torch.Tensor:
    """(2, 8, 8) labels: class 1 a 4x4 square, class 2 a 2x3 bar in image 0 only."""
    t = torch.zeros(2, 8, 8, dtype=torch.long)
    t[:, 2:6, 2:6] = 1
    t[0, 6:8, 0:3] = 2
    return t


def _perfect_logits(target: torch.Tensor, num_classes: int = 3, scale: float = 30.0) -> torch.Tensor:
    return scale * F.one_hot(target, num_classes).permute(0, 3, 1, 2).float()


def test_dice_perfect_prediction_is_near_zero_and_wrong_one_is_near_one():
    t = _target()
    assert soft_dice_loss(_perfect_logits(t), t).item() < 1e-4
    wrong = _perfect_logits((t + 1) % 3)  # every pixel predicted as another class
    assert soft_dice_loss(wrong, t, smooth=1e-6).item() > 0.99


def test_dice_present_classes_only_ignores_absent_class():
    t = torch.zeros(1, 4, 4, dtype=torch.long)
    t[0, :2] = 1  # classes 0 and 1 present, class 2 absent
    logits = _perfect_logits(t)
    logits[:, 2] = 30.0  # the absent class ties with the truth everywhere: p = 1/2 each
    all_classes = soft_dice_loss(logits, t, smooth=0.0, classes="all").item()
    present = soft_dice_loss(logits, t, smooth=0.0, classes="present").item()
    # Classes 0 and 1: 8 true pixels each at p = 1/2, nothing elsewhere:
    # dice = 2 * 4 / (4 + 8) = 2/3.
    assert present == pytest.approx(1 - 2 / 3, abs=1e-4)
    # The absent class 2 has dice 0 (16 pixels at p = 1/2, none true) and joins the mean.
    assert all_classes == pytest.approx(1 - (2 / 3 + 2 / 3 + 0.0) / 3, abs=1e-4)


def test_dice_ignores_ignored_pixels():
    t = _target()
    logits = _perfect_logits(t)
    t_ignored = t.clone()
    t_ignored[:, :, :2] = -100
    logits[:, :, :, :2] = torch.randn(2, 3, 8, 2)  # garbage where ignored
    assert soft_dice_loss(logits, t_ignored, ignore_index=-100).item() < 1e-4


def test_dice_ce_perfect_prediction_and_label_smoothing_floor():
    t = _target()
    logits = _perfect_logits(t)
    assert DiceCELoss(label_smoothing=0.0)(logits, t).item() < 1e-4
    # Label smoothing 0.1 over 3 classes: a one-hot-confident prediction pays
    # (0.1 * 2/3) * 30 for the off classes, close to 2.0.
    smoothed = DiceCELoss(label_smoothing=0.1, dice_weight=0.0)(logits, t).item()
    assert smoothed == pytest.approx(0.1 * 2 / 3 * 30.0, rel=1e-3)


def test_cps_without_threshold_is_the_loss_on_the_peers_argmax():
    torch.manual_seed(0)
    a, b = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    ce_a, ce_b = cross_pseudo_supervision(a, b, loss="ce")
    assert ce_a.item() == pytest.approx(F.cross_entropy(a, b.argmax(1)).item(), rel=1e-6)
    assert ce_b.item() == pytest.approx(F.cross_entropy(b, a.argmax(1)).item(), rel=1e-6)
    dice_a, _ = cross_pseudo_supervision(a, b, loss="dice")
    assert dice_a.item() == pytest.approx(soft_dice_loss(a, b.argmax(1), classes="present").item(), rel=1e-6)


def test_cps_threshold_keeps_only_the_peers_confident_pixels():
    torch.manual_seed(1)
    a = torch.randn(1, 3, 8, 8)
    peer = torch.zeros(1, 3, 8, 8)  # uniform (p = 1/3) everywhere ...
    peer[0, 2, :4] = 10.0  # ... but sure of class 2 on the top half
    ce_a, _ = cross_pseudo_supervision(a, peer, loss="ce", threshold=0.9)
    expected = F.cross_entropy(a[..., :4, :], torch.full((1, 4, 8), 2))
    assert ce_a.item() == pytest.approx(expected.item(), rel=1e-6)
    # Nothing confident enough: a zero loss that still backpropagates.
    a.requires_grad_(True)
    none_a, _ = cross_pseudo_supervision(a, torch.zeros(1, 3, 8, 8), loss="dice", threshold=0.5)
    none_a.backward()
    assert none_a.item() == 0.0 and a.grad is not None


def test_cps_gradients_reach_each_network_only_through_its_own_logits():
    torch.manual_seed(2)
    a = torch.randn(2, 3, 8, 8, requires_grad=True)
    b = torch.randn(2, 3, 8, 8, requires_grad=True)
    loss_a, _ = cross_pseudo_supervision(a, b, loss="ce")
    loss_a.backward()
    assert a.grad.abs().sum() > 0
    assert b.grad is None  # the peer's label is detached
    with pytest.raises(ValueError, match="dice"):
        cross_pseudo_supervision(a, b, loss="l2")


def test_ohem_select_keeps_threshold_or_at_least_min_kept():
    losses = torch.tensor([0.1, 0.2, 0.05, 0.3, 0.01, 0.02, 0.9, 0.4])
    # Only 0.9 passes the threshold 0.69, fewer than min_kept = 3: the 3 largest.
    kept = ohem_select(losses, threshold=OHEM_THRESHOLD, min_kept=3)
    assert sorted(kept.tolist()) == pytest.approx([0.3, 0.4, 0.9])
    # Threshold 0.15 passes 4 pixels >= min_kept 2: exactly those.
    kept = ohem_select(losses, threshold=0.15, min_kept=2)
    assert sorted(kept.tolist()) == pytest.approx([0.2, 0.3, 0.4, 0.9])


def test_ohem_cross_entropy_keeps_at_least_one_sixteenth():
    torch.manual_seed(0)
    t = torch.randint(0, 3, (2, 16, 16))
    logits = _perfect_logits(t, scale=5.0)  # every pixel easy: CE ~ 0.013 < threshold
    pixel = F.cross_entropy(logits, t, reduction="none").reshape(-1)
    n_min = pixel.numel() // 16  # 32 of 512
    expected = pixel.topk(n_min).values.mean()
    assert ohem_cross_entropy(logits, t).item() == pytest.approx(expected.item(), rel=1e-5)
    # Hard pixels: flip 100 pixels' logits, those exceed the threshold and are all kept.
    flat = logits.permute(0, 2, 3, 1).reshape(-1, 3).clone()
    flat[:100] = -flat[:100]
    hard_logits = flat.reshape(2, 16, 16, 3).permute(0, 3, 1, 2)
    pixel = F.cross_entropy(hard_logits, t, reduction="none").reshape(-1)
    assert int((pixel > OHEM_THRESHOLD).sum()) == 100
    assert ohem_cross_entropy(hard_logits, t).item() == pytest.approx(
        pixel[pixel > OHEM_THRESHOLD].mean().item(), rel=1e-5
    )


def test_ohem_perfect_prediction_is_near_zero():
    t = _target()
    assert ohem_cross_entropy(_perfect_logits(t), t).item() < 1e-6


def test_lovasz_grad_matches_hand_computation():
    # errors sorted; foreground indicator [1, 0, 1, 0]: |fg| = 2.
    # Jaccard losses after each prefix: 1 - [1/2, 1/3, 0/3, 0/4] = [1/2, 2/3, 1, 1].
    w = lovasz_grad(torch.tensor([1.0, 0.0, 1.0, 0.0]))
    assert w.tolist() == pytest.approx([0.5, 1 / 6, 1 / 3, 0.0])


def test_lovasz_equals_one_minus_iou_at_hard_predictions():
    target = torch.zeros(1, 6, 6, dtype=torch.long)
    target[0, 1:4, 1:4] = 1  # 9 pixels
    pred = torch.zeros(1, 6, 6, dtype=torch.long)
    pred[0, 2:5, 2:5] = 1  # 9 pixels, overlap 4
    probs = F.one_hot(pred, 2).permute(0, 3, 1, 2).float()
    iou_fg = 4 / (9 + 9 - 4)
    iou_bg = (36 - 14) / (36 - 4)  # background: 27 true, 27 predicted, 22 shared
    loss = lovasz_softmax(probs, target).item()
    assert loss == pytest.approx(((1 - iou_fg) + (1 - iou_bg)) / 2, abs=1e-6)
    # Perfect soft-free prediction: zero.
    perfect = F.one_hot(target, 2).permute(0, 3, 1, 2).float()
    assert lovasz_softmax(perfect, target).item() == pytest.approx(0.0, abs=1e-7)


def test_lovasz_present_classes_and_ignore_index():
    target = torch.zeros(1, 4, 4, dtype=torch.long)
    target[0, :2] = 1
    probs = torch.full((1, 3, 4, 4), 1 / 3)
    present = lovasz_softmax(probs, target, classes="present").item()
    every = lovasz_softmax(probs, target, classes="all").item()
    # An absent class contributes its largest probability (1/3), present ones 2/3 each.
    assert present == pytest.approx(2 / 3, abs=1e-6)
    assert every == pytest.approx((2 / 3 + 2 / 3 + 1 / 3) / 3, abs=1e-6)
    ignored = target.clone()
    ignored[0, 3] = -1
    perfect = F.one_hot(target, 3).permute(0, 3, 1, 2).float()
    perfect[0, :, 3] = torch.tensor([0.0, 0.0, 1.0]).reshape(3, 1)  # wrong, but ignored
    assert lovasz_softmax(perfect, ignored, ignore_index=-1).item() == pytest.approx(0.0, abs=1e-7)


def test_lovasz_per_image_averages_images():
    target = _target()
    probs = torch.softmax(torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)), 1)
    per_image = lovasz_softmax(probs, target, per_image=True).item()
    separate = [lovasz_softmax(probs[i : i + 1], target[i : i + 1]).item() for i in range(2)]
    assert per_image == pytest.approx(sum(separate) / 2, rel=1e-6)


@pytest.mark.parametrize(
    "loss_fn",
    [
        lambda x, t: soft_dice_loss(x, t),
        DiceCELoss(),
        lambda x, t: ohem_cross_entropy(x, t),
        lambda x, t: lovasz_softmax(x.softmax(1), t),
        OhemLovaszLoss(),
    ],
    ids=["dice", "dice_ce", "ohem", "lovasz", "ohem_lovasz"],
)
def test_gradients_flow_to_logits(loss_fn):
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 8, 8, requires_grad=True)
    loss = loss_fn(logits, _target())
    assert loss.dim() == 0 and math.isfinite(loss.item()) and loss.item() > 0
    loss.backward()
    assert torch.isfinite(logits.grad).all()
    assert logits.grad.abs().sum() > 0


def test_ohem_lovasz_loss_is_small_on_perfect_logits_and_large_on_wrong():
    t = _target()
    loss = OhemLovaszLoss()
    assert loss(_perfect_logits(t), t).item() < 1e-4
    assert loss(_perfect_logits((t + 1) % 3), t).item() > 1.0
