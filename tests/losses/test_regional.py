"""Dice, generalized Dice, cross-entropy and focal loss: known values, properties, ignore label, gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from segpipe.losses import (
    CrossEntropyLoss,
    DiceLoss,
    FocalLoss,
    GeneralizedDiceLoss,
    cross_entropy_loss,
    dice_loss,
    focal_loss,
    generalized_dice_loss,
)

IGN = 255


def _binary(p_fg, label):
    p = torch.tensor(p_fg, dtype=torch.float64)
    probs = torch.stack([1 - p, p])[None]  # (1, 2, N)
    return probs.reshape(1, 2, -1, 1), torch.tensor(label).reshape(1, -1, 1)


# -- Dice -------------------------------------------------------------------------------------------------


def test_dice_known_value():
    probs, label = _binary([0.9, 0.1, 0.8, 0.2], [1, 0, 1, 0])
    # foreground only: 2*1.7 / (2.0 + 2) = 0.85
    expected = 1 - (3.4 + 1e-5) / (4.0 + 1e-5)
    assert dice_loss(probs, label).item() == pytest.approx(expected, rel=1e-9)


def test_dice_with_background_averages_classes():
    probs, label = _binary([0.9, 0.1, 0.8, 0.2], [1, 0, 1, 0])
    fg = 1 - 3.4 / 4.0
    bg = 1 - 2 * 1.7 / 4.0  # background probs 0.1,0.9,0.2,0.8 vs 0,1,0,1
    assert dice_loss(probs, label, include_background=True, smooth_nr=0, smooth_dr=0).item() == pytest.approx((fg + bg) / 2)


def test_dice_perfect_prediction_is_the_minimum():
    label = torch.randint(0, 3, (2, 6, 6, 6))
    probs = F.one_hot(label, 3).permute(0, 4, 1, 2, 3).double()
    assert dice_loss(probs, label).item() == pytest.approx(0.0, abs=1e-6)
    worse = 0.9 * probs + 0.1 / 3
    assert dice_loss(worse, label) > dice_loss(probs, label)


def test_dice_batch_versus_per_sample():
    probs = torch.tensor([[0.0, 1.0], [0.0, 0.0]], dtype=torch.float64)  # fg prob per voxel, 2 samples
    label = torch.tensor([[0, 1], [0, 0]])
    p = torch.stack([1 - probs, probs], 1).unsqueeze(-1)
    lab = label.unsqueeze(-1)
    # sample 2 has no foreground and predicts none: per-sample Dice ~ 1 (smoothing), so mean of (0, 0)
    assert dice_loss(p, lab, batch=False).item() == pytest.approx(0.0, abs=1e-6)
    assert dice_loss(p, lab, batch=True).item() == pytest.approx(0.0, abs=1e-6)
    per_class = dice_loss(p, lab, batch=False, reduction="none")
    assert per_class.shape == (2, 1)


def test_dice_ignore_label_excludes_voxels():
    torch.manual_seed(1)
    probs = torch.rand(1, 2, 10, 1, dtype=torch.float64).softmax(1)
    label = torch.randint(0, 2, (1, 10, 1))
    label_ign = label.clone()
    label_ign[0, :3] = IGN
    probs_garbage = probs.clone()
    probs_garbage[0, :, :3] = torch.tensor([0.0, 1.0], dtype=torch.float64)[:, None, None]
    subset = dice_loss(probs[:, :, 3:], label[:, 3:])
    assert dice_loss(probs_garbage, label_ign, ignore_index=IGN).item() == pytest.approx(subset.item())


def test_dice_function_equals_module_and_gradcheck():
    probs = torch.rand(2, 3, 3, 3, 3, dtype=torch.float64).softmax(1).requires_grad_()
    label = torch.randint(0, 3, (2, 3, 3, 3))
    assert torch.equal(dice_loss(probs, label), DiceLoss()(probs, label))
    assert torch.autograd.gradcheck(lambda p: dice_loss(p, label, validate=False), (probs,))


# -- generalized Dice ---------------------------------------------------------------------------------------


def _gdl_numpy(p, g):
    """Independent formula: per sample, w_k = 1/(sum g_k)^2, 1 - 2 sum w I / sum w (P + G)."""
    out = []
    for b in range(p.shape[0]):
        pk = p[b].reshape(p.shape[1], -1)
        gk = g[b].reshape(g.shape[1], -1)
        w = 1.0 / gk.sum(1) ** 2
        out.append(1 - 2 * (w * (pk * gk).sum(1)).sum() / (w * (pk.sum(1) + gk.sum(1))).sum())
    return float(np.mean(out))


def test_gdl_known_value():
    torch.manual_seed(2)
    probs = torch.rand(2, 3, 4, 4, dtype=torch.float64).softmax(1)
    label = torch.randint(0, 3, (2, 4, 4))
    label[:, 0, :3] = torch.tensor([0, 1, 2])  # every class present in every sample
    onehot = F.one_hot(label, 3).permute(0, 3, 1, 2).double()
    expected = _gdl_numpy(probs.numpy(), onehot.numpy())
    got = generalized_dice_loss(probs, label, smooth_nr=0, smooth_dr=0).item()
    assert got == pytest.approx(expected, rel=1e-9)


def test_gdl_weights_favour_the_small_class():
    # a tiny class missed costs more than the same number of voxels missed in a big class
    label = torch.zeros(1, 100, 1, dtype=torch.long)
    label[0, :4] = 1
    probs = F.one_hot(label, 2).permute(0, 3, 1, 2).double()
    miss_small = probs.clone()
    miss_small[0, :, :2] = torch.tensor([1.0, 0.0], dtype=torch.float64)[:, None, None]
    miss_big = probs.clone()
    miss_big[0, :, 50:52] = torch.tensor([0.0, 1.0], dtype=torch.float64)[:, None, None]
    assert generalized_dice_loss(miss_small, label) > generalized_dice_loss(miss_big, label)


def test_gdl_absent_class_is_finite_and_perfect_is_zero():
    label = torch.zeros(1, 8, 8, dtype=torch.long)
    probs = torch.stack([torch.ones(8, 8), torch.zeros(8, 8)])[None].double()
    assert generalized_dice_loss(probs, label).item() == pytest.approx(0.0, abs=1e-6)
    noisy = torch.rand(1, 2, 8, 8, dtype=torch.float64).softmax(1)
    assert torch.isfinite(generalized_dice_loss(noisy, label))


def test_gdl_ignore_function_module_gradcheck():
    probs = torch.rand(1, 2, 4, 4, 2, dtype=torch.float64).softmax(1).requires_grad_()
    label = torch.randint(0, 2, (1, 4, 4, 2))
    label[0, 0] = IGN
    label[0, 1, 1, 1] = 1
    label[0, 2, 2, 1] = 0
    a = generalized_dice_loss(probs, label, ignore_index=IGN)
    assert torch.equal(a, GeneralizedDiceLoss(ignore_index=IGN)(probs, label))
    sub = generalized_dice_loss(probs[:, :, 1:], label[:, 1:])
    assert a.item() == pytest.approx(sub.item())
    assert torch.autograd.gradcheck(lambda p: generalized_dice_loss(p, label, ignore_index=IGN, validate=False), (probs,))


# -- cross-entropy and focal --------------------------------------------------------------------------------


def test_ce_equals_torch_and_handles_ignore():
    torch.manual_seed(3)
    logits = torch.randn(2, 3, 4, 5, 6, dtype=torch.float64)
    label = torch.randint(0, 3, (2, 4, 5, 6))
    assert cross_entropy_loss(logits, label).item() == pytest.approx(F.cross_entropy(logits, label).item())
    label[0, 0] = IGN
    expected = F.cross_entropy(logits, label, ignore_index=IGN).item()
    assert cross_entropy_loss(logits, label, ignore_index=IGN).item() == pytest.approx(expected)
    assert torch.equal(cross_entropy_loss(logits, label, ignore_index=IGN), CrossEntropyLoss(ignore_index=IGN)(logits, label))


def test_ce_all_ignored_is_zero_not_nan():
    logits = torch.randn(1, 2, 3, 3)
    label = torch.full((1, 3, 3), IGN)
    assert cross_entropy_loss(logits, label, ignore_index=IGN).item() == 0.0


def test_ce_known_value_and_gradcheck():
    logits = torch.tensor([[[[0.0]], [[np.log(3.0)]]]], dtype=torch.float64)  # p = (0.25, 0.75)
    assert cross_entropy_loss(logits, torch.tensor([[[1]]])).item() == pytest.approx(-np.log(0.75))
    lg = torch.randn(1, 2, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    lab = torch.randint(0, 2, (1, 3, 3, 3))
    assert torch.autograd.gradcheck(lambda x: cross_entropy_loss(x, lab, validate=False), (lg,))


def test_focal_gamma_zero_equals_ce():
    torch.manual_seed(4)
    logits = torch.randn(2, 3, 5, 5, 5, dtype=torch.float64)
    label = torch.randint(0, 3, (2, 5, 5, 5))
    label[1, 0] = IGN
    assert focal_loss(logits, label, gamma=0.0, ignore_index=IGN).item() == pytest.approx(
        cross_entropy_loss(logits, label, ignore_index=IGN).item()
    )


def test_focal_known_value_with_alpha():
    logits = torch.tensor([[[[0.0]], [[np.log(7 / 3)]]]], dtype=torch.float64)  # p = (0.3, 0.7)
    fg = torch.tensor([[[1]]])
    assert focal_loss(logits, fg, gamma=2).item() == pytest.approx(-(0.3**2) * np.log(0.7))
    assert focal_loss(logits, fg, gamma=2, alpha=0.25).item() == pytest.approx(-0.25 * 0.3**2 * np.log(0.7))
    bg = torch.tensor([[[0]]])
    assert focal_loss(logits, bg, gamma=2, alpha=0.25).item() == pytest.approx(-0.75 * 0.7**2 * np.log(0.3))


def test_focal_down_weights_easy_voxels():
    logits = torch.tensor([[[[0.0, 0.0]], [[4.0, 0.2]]]], dtype=torch.float64)  # easy, hard
    label = torch.tensor([[[1, 1]]])
    per = [focal_loss(logits[..., i : i + 1], label[..., i : i + 1]).item() for i in range(2)]
    ce = [cross_entropy_loss(logits[..., i : i + 1], label[..., i : i + 1]).item() for i in range(2)]
    assert per[0] / ce[0] < per[1] / ce[1]


def test_focal_module_and_gradcheck():
    lg = torch.randn(1, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    lab = torch.randint(0, 3, (1, 3, 3))
    assert torch.equal(focal_loss(lg, lab), FocalLoss()(lg, lab))
    assert torch.autograd.gradcheck(lambda x: focal_loss(x, lab, gamma=2.0, validate=False), (lg,))


# -- bad input shared by all ------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [dice_loss, generalized_dice_loss])
def test_probs_losses_detect_logits(fn):
    with pytest.raises(ValueError, match="look like logits"):
        fn(torch.randn(1, 2, 4, 4) * 4, torch.zeros(1, 4, 4, dtype=torch.long))


@pytest.mark.parametrize("fn", [dice_loss, generalized_dice_loss, cross_entropy_loss, focal_loss])
def test_label_out_of_range(fn):
    x = torch.rand(1, 2, 4, 4).softmax(1)
    label = torch.zeros(1, 4, 4, dtype=torch.long)
    label[0, 0, 0] = 2
    with pytest.raises(ValueError, match=r"expected class indices 0..1.*found \[2\]"):
        fn(x, label)


@pytest.mark.parametrize("fn", [dice_loss, cross_entropy_loss, focal_loss])
def test_label_shape_mismatch(fn):
    with pytest.raises(ValueError, match=r"label: expected class indices of shape"):
        fn(torch.rand(1, 2, 4, 4).softmax(1), torch.zeros(1, 4, 5, dtype=torch.long))


@pytest.mark.parametrize("fn", [cross_entropy_loss, focal_loss])
def test_nan_logits(fn):
    lg = torch.randn(1, 2, 4, 4)
    lg[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="logits: expected finite values, found 1 NaN"):
        fn(lg, torch.zeros(1, 4, 4, dtype=torch.long))


def test_focal_bad_parameters():
    with pytest.raises(ValueError, match="gamma"):
        focal_loss(torch.randn(1, 2, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long), gamma=-1)
    with pytest.raises(ValueError, match="alpha"):
        focal_loss(torch.randn(1, 2, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long), alpha=2)
