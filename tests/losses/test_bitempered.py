"""Bi-tempered logistic loss: CE at t1 = t2 = 1, tempered softmax, boundedness, smoothing, ignore label."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from segpipe.losses import (
    BiTemperedLoss,
    bi_tempered_loss,
    cross_entropy_loss,
    tempered_softmax,
)
from segpipe.losses.bitempered import exp_t, log_t


def test_equals_ce_at_unit_temperatures():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 4, 4, dtype=torch.float64)
    label = torch.randint(0, 3, (2, 4, 4, 4))
    label[0, 0] = 255
    a = bi_tempered_loss(logits, label, t1=1.0, t2=1.0, ignore_index=255)
    assert a.item() == pytest.approx(cross_entropy_loss(logits, label, ignore_index=255).item(), rel=1e-9)


def test_log_exp_t_are_inverse_and_reduce_to_log_exp():
    u = torch.linspace(0.1, 3, 7, dtype=torch.float64)
    for t in (0.5, 0.8, 1.0, 1.5):
        assert torch.allclose(exp_t(log_t(u, t), t), u)
    assert torch.allclose(log_t(u, 1.0), torch.log(u))


def test_tempered_softmax_normalises_and_has_heavy_tails():
    logits = torch.tensor([[4.0, 0.0, -4.0]], dtype=torch.float64).reshape(1, 3, 1)
    p = tempered_softmax(logits, 1.5, num_iters=30)
    assert p.sum().item() == pytest.approx(1.0, abs=1e-6)
    assert p[0, 2].item() > torch.softmax(logits, 1)[0, 2].item()  # heavier tail than softmax
    assert tempered_softmax(logits, 1.2, num_iters=5).sum().item() == pytest.approx(1.0, abs=1e-3)


def test_known_value_single_voxel():
    # t2 = 1 (plain softmax), t1 = 0.5: loss = y(log_t(y) - log_t(p)) - (y^1.5 - p^1.5)/1.5 summed
    logits = torch.tensor([0.0, np.log(3.0)], dtype=torch.float64).reshape(1, 2, 1)
    p = np.array([0.25, 0.75])
    y = np.array([0.0, 1.0])

    def lt(x):
        return (x**0.5 - 1) / 0.5

    expected = (y[1] * (lt(1.0) - lt(p[1]))) - ((y**1.5).sum() - (p**1.5).sum()) / 1.5
    got = bi_tempered_loss(logits, torch.tensor([[1]]), t1=0.5, t2=1.0).item()
    assert got == pytest.approx(expected, rel=1e-9)


def test_bounded_for_confidently_wrong_predictions():
    label = torch.tensor([[1]])
    very_wrong = torch.tensor([50.0, -50.0], dtype=torch.float64).reshape(1, 2, 1)
    assert cross_entropy_loss(very_wrong, label).item() > 90
    # t1 < 1: the loss is at most 1/(1 - t1) + 1/(2 - t1) whatever the logits
    assert bi_tempered_loss(very_wrong, label, t1=0.8, t2=1.2).item() < 1 / 0.2 + 1 / 1.2


def test_label_smoothing_changes_the_target():
    logits = torch.randn(1, 2, 3, 3, dtype=torch.float64)
    label = torch.randint(0, 2, (1, 3, 3))
    assert bi_tempered_loss(logits, label, label_smoothing=0.1).item() != pytest.approx(bi_tempered_loss(logits, label).item())


def test_module_and_gradcheck():
    lg = torch.randn(1, 3, 2, 2, 2, dtype=torch.float64, requires_grad=True)
    lab = torch.randint(0, 3, (1, 2, 2, 2))
    assert torch.equal(bi_tempered_loss(lg, lab), BiTemperedLoss()(lg, lab))
    assert torch.autograd.gradcheck(lambda x: bi_tempered_loss(x, lab, t1=0.7, t2=1.3, validate=False), (lg,))


@pytest.mark.parametrize("kwargs, needle", [({"t1": 1.2}, "t1"), ({"t2": 0.9}, "t2"), ({"label_smoothing": 1.0}, "label_smoothing")])
def test_bad_parameters(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        bi_tempered_loss(torch.randn(1, 2, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long), **kwargs)
