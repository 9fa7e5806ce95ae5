"""Generalized Dice loss (Sudre et al. 2017), as used with the boundary loss by Kervadec et al.

Class weights ``w_k = 1 / (sum of the ground truth of class k)^2`` per sample;
``1 - 2 * sum_k w_k * sum(p_k * g_k) / sum_k w_k * (sum(p_k) + sum(g_k))``. A class absent from a sample
would get an infinite weight: as MONAI does, it gets the largest weight of the other classes instead. The
arithmetic is MONAI's ``GeneralizedDiceLoss``; segpipe adds class-index labels and the ignore label.
Defaults follow the boundary-loss paper: background included, one value per sample, then the mean.
"""

from __future__ import annotations

import torch
from monai.losses import GeneralizedDiceLoss as _MonaiGDL
from torch import nn

from segpipe.losses._onehot import overlap_inputs

__all__ = ["GeneralizedDiceLoss", "generalized_dice_loss"]


def generalized_dice_loss(
    probs: torch.Tensor,
    label: torch.Tensor,
    *,
    include_background: bool = True,
    batch: bool = False,
    ignore_index: int | None = None,
    smooth_nr: float = 1e-5,
    smooth_dr: float = 1e-5,
    validate: bool = True,
) -> torch.Tensor:
    probs, onehot = overlap_inputs(probs, label, ignore_index, validate)
    fn = _MonaiGDL(include_background=include_background, batch=batch, smooth_nr=smooth_nr, smooth_dr=smooth_dr, w_type="square")
    return fn(probs, onehot)


class GeneralizedDiceLoss(nn.Module):
    """Module form of :func:`generalized_dice_loss`."""

    def __init__(self, *, include_background: bool = True, batch: bool = False, ignore_index: int | None = None,
                 smooth_nr: float = 1e-5, smooth_dr: float = 1e-5, validate: bool = True) -> None:
        super().__init__()
        self.kwargs = dict(include_background=include_background, batch=batch, ignore_index=ignore_index,
                           smooth_nr=smooth_nr, smooth_dr=smooth_dr, validate=validate)

    def forward(self, probs: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        return generalized_dice_loss(probs, label, **self.kwargs)
