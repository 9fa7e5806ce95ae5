"""Bi-tempered logistic loss (Amid, Warmuth, Anil, Koren, NeurIPS 2019, "Robust bi-tempered logistic loss
based on Bregman divergences"), per voxel, for noisy labels such as hand-drawn lesion masks.

Two temperatures replace the log and the exp of the logistic loss by their tempered versions
``log_t(x) = (x^(1-t) - 1) / (1 - t)`` and ``exp_t(x) = [1 + (1 - t) x]_+^(1/(1-t))``:

- ``t1 < 1`` makes the loss bounded, so a few badly wrong labels cannot dominate;
- ``t2 > 1`` gives the tempered softmax ``p = exp_t2(a - lambda(a))`` heavier tails, so outliers far from the
  boundary have less pull. Its normaliser ``lambda(a)`` has no closed form; it is found by the paper's
  fixed-point iteration (a few steps suffice).

The loss per voxel is ``sum_k [ y_k (log_t1(y_k) - log_t1(p_k)) - (y_k^(2-t1) - p_k^(2-t1)) / (2 - t1) ]``,
optionally with label smoothing of the one-hot ``y``, averaged over the voxels that are not ignored. At
``t1 = t2 = 1`` it is the cross-entropy.
"""

from __future__ import annotations

import torch
from torch import nn

from segpipe.losses._checks import check_finite, check_label, label_as_index
from segpipe.losses._onehot import masked_one_hot
from segpipe.losses.cross_entropy import masked_voxel_mean

__all__ = ["BiTemperedLoss", "bi_tempered_loss", "exp_t", "log_t", "tempered_softmax"]


def log_t(u: torch.Tensor, t: float) -> torch.Tensor:
    if t == 1.0:
        return torch.log(u)
    return (u.pow(1.0 - t) - 1.0) / (1.0 - t)


def exp_t(u: torch.Tensor, t: float) -> torch.Tensor:
    if t == 1.0:
        return torch.exp(u)
    return torch.relu(1.0 + (1.0 - t) * u).pow(1.0 / (1.0 - t))


def _normalization_fixed_point(a: torch.Tensor, t: float, num_iters: int, dim: int) -> torch.Tensor:
    """``lambda(a)`` with ``sum_k exp_t(a_k - lambda) = 1`` for ``t > 1`` (the paper's fixed point)."""
    mu = a.amax(dim=dim, keepdim=True)
    a0 = a - mu
    a_ = a0
    for _ in range(num_iters):
        z = exp_t(a_, t).sum(dim=dim, keepdim=True)
        a_ = a0 * z.pow(1.0 - t)
    z = exp_t(a_, t).sum(dim=dim, keepdim=True)
    return -log_t(1.0 / z, t) + mu


def tempered_softmax(logits: torch.Tensor, t: float, num_iters: int = 5, dim: int = 1) -> torch.Tensor:
    """Tempered softmax over ``dim``; ``t = 1`` is the softmax, ``t > 1`` has heavier tails."""
    if t == 1.0:
        return torch.softmax(logits, dim=dim)
    if t < 1.0:
        raise ValueError(f"t2: expected a temperature >= 1 (heavy tails), got {t}")
    return exp_t(logits - _normalization_fixed_point(logits, t, num_iters, dim), t)


def bi_tempered_loss(
    logits: torch.Tensor,
    label: torch.Tensor,
    *,
    t1: float = 0.8,
    t2: float = 1.2,
    label_smoothing: float = 0.0,
    num_iters: int = 5,
    ignore_index: int | None = None,
    validate: bool = True,
) -> torch.Tensor:
    if not 0.0 <= t1 <= 1.0:
        raise ValueError(f"t1: expected a temperature in [0, 1] (below 1 bounds the loss), got {t1}")
    if t2 < 1.0:
        raise ValueError(f"t2: expected a temperature >= 1 (above 1 gives heavy tails), got {t2}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing: expected a number in [0, 1), got {label_smoothing}")
    label = label_as_index(label, logits)
    k = logits.shape[1]
    if validate:
        check_finite(logits, "logits")
        check_label(label, k, ignore_index)
    y, _ = masked_one_hot(label, k, ignore_index, logits.dtype)
    if label_smoothing > 0 and k > 1:
        y = (1.0 - label_smoothing * k / (k - 1)) * y + label_smoothing / (k - 1)
    p = tempered_softmax(logits, t2, num_iters, dim=1)
    tiny = torch.finfo(logits.dtype).tiny
    per_class = (
        y * log_t(y + tiny, t1)
        - y * log_t(p.clamp_min(tiny), t1)
        - y.pow(2.0 - t1) / (2.0 - t1)
        + p.pow(2.0 - t1) / (2.0 - t1)
    )
    return masked_voxel_mean(per_class.sum(1), label, ignore_index)


class BiTemperedLoss(nn.Module):
    """Module form of :func:`bi_tempered_loss`."""

    def __init__(self, *, t1: float = 0.8, t2: float = 1.2, label_smoothing: float = 0.0, num_iters: int = 5,
                 ignore_index: int | None = None, validate: bool = True) -> None:
        super().__init__()
        self.kwargs = dict(t1=t1, t2=t2, label_smoothing=label_smoothing, num_iters=num_iters,
                           ignore_index=ignore_index, validate=validate)

    def forward(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        return bi_tempered_loss(logits, label, **self.kwargs)
