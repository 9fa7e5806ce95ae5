"""Boundary loss: contract, known values, gradients, the ground-truth minimiser property, bad input."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from segpipe.losses import BoundaryLoss, boundary_loss
from segpipe.transforms import signed_distance_map


def test_known_value_2d():
    probs = torch.tensor([[[[0.0, 0.5], [1.0, 0.25]]]])
    sdm = torch.tensor([[[[2.0, -1.0], [0.0, 4.0]]]])
    # (0*2 + 0.5*-1 + 1*0 + 0.25*4) / 4
    assert boundary_loss(probs, sdm).item() == pytest.approx(0.125)


def test_3d_and_mean_over_every_element():
    torch.manual_seed(0)
    p = torch.rand(2, 3, 4, 5, 6)
    d = torch.randn(2, 3, 4, 5, 6)
    assert torch.allclose(boundary_loss(p, d), (p * d).sum() / p.numel())


def test_function_equals_module():
    p, d = torch.rand(2, 1, 5, 5, 5), torch.randn(2, 1, 5, 5, 5)
    assert torch.equal(boundary_loss(p, d), BoundaryLoss()(p, d))


def test_gradcheck():
    p = torch.rand(1, 2, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    d = torch.randn(1, 2, 3, 3, 3, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: boundary_loss(x, d), (p,))


def test_ground_truth_is_the_minimiser_over_binary_predictions():
    gt = np.array([[0, 0, 0, 0], [0, 1, 1, 0], [0, 1, 0, 0]], dtype=bool)
    sdm = torch.from_numpy(signed_distance_map(gt, (1.0, 2.0)))[None, None]
    values = {}
    for bits in itertools.product([0.0, 1.0], repeat=gt.size):
        pred = torch.tensor(bits).reshape(1, 1, *gt.shape)
        values[bits] = boundary_loss(pred, sdm).item()
    best = min(values.values())
    gt_bits = tuple(float(b) for b in gt.ravel())
    assert values[gt_bits] == pytest.approx(best)
    # the value there: the sum of the map over the object divided by the number of elements
    assert values[gt_bits] == pytest.approx(sdm[0, 0][torch.from_numpy(gt)].sum().item() / gt.size)


def test_perfect_prediction_beats_shifted_one_3d():
    gt = np.zeros((12, 12, 8), bool)
    gt[3:8, 4:9, 2:5] = True
    sdm = torch.from_numpy(signed_distance_map(gt, (1, 1, 3)))[None, None]
    good = torch.from_numpy(gt.astype(np.float32))[None, None]
    shifted = torch.roll(good, 2, dims=2)
    assert boundary_loss(good, sdm) < boundary_loss(shifted, sdm) < boundary_loss(1 - good, sdm)


def test_shape_mismatch_shows_both_shapes():
    with pytest.raises(ValueError, match=r"\(2, 1, 4, 4, 4\) and \(2, 2, 4, 4, 4\)"):
        boundary_loss(torch.rand(2, 1, 4, 4, 4), torch.rand(2, 2, 4, 4, 4))


def test_logits_are_detected():
    with pytest.raises(ValueError, match="look like logits"):
        boundary_loss(torch.randn(1, 1, 4, 4) * 5, torch.rand(1, 1, 4, 4))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_inputs(bad):
    p, d = torch.rand(1, 1, 4, 4), torch.rand(1, 1, 4, 4)
    d[0, 0, 1, 1] = bad
    with pytest.raises(ValueError, match="sdm: expected finite values"):
        boundary_loss(p, d)
    p[0, 0, 0, 0] = bad
    with pytest.raises(ValueError, match="probs: expected finite values"):
        boundary_loss(p, torch.rand(1, 1, 4, 4))


def test_1d_is_refused():
    with pytest.raises(ValueError, match="expected"):
        boundary_loss(torch.rand(2, 4), torch.rand(2, 4))
