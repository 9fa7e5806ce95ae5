"""Soft Dice loss, per class, with or without the background, over the batch or per sample.

``1 - (2 * sum(p * g) + smooth_nr) / (sum(p) + sum(g) + smooth_dr)`` per class (summed over the batch too
when ``batch=True``), averaged over classes (and samples). The arithmetic is MONAI's ``DiceLoss``; segpipe
adds class-index labels and the ignore label: ignored voxels are removed from prediction and target alike.

``batch=True`` (the default) pools the voxels of the whole batch per class, so a patch without lesion does not
produce a 0/0 Dice of its own (nnU-Net's "batch dice").
"""

from __future__ import annotations

import torch
from monai.losses import DiceLoss as _MonaiDice
from torch import nn

from segpipe.losses._onehot import overlap_inputs

__all__ = ["DiceLoss", "dice_loss"]


def dice_loss(
    probs: torch.Tensor,
    label: torch.Tensor,
    *,
    include_background: bool = False,
    batch: bool = True,
    ignore_index: int | None = None,
    smooth_nr: float = 1e-5,
    smooth_dr: float = 1e-5,
    reduction: str = "mean",
    validate: bool = True,
) -> torch.Tensor:
    """Soft Dice loss of ``probs`` ``(B, K, *spatial)`` against class indices ``label`` ``(B, [1,] *spatial)``.

    ``reduction="none"`` returns the per-class losses, shape ``(K',)`` with ``batch=True`` or ``(B, K')``.
    """
    if probs.shape[1] == 1:
        raise ValueError("probs: expected at least 2 channels (background and foreground), got 1")
    probs, onehot = overlap_inputs(probs, label, ignore_index, validate)
    fn = _MonaiDice(
        include_background=include_background, batch=batch, smooth_nr=smooth_nr, smooth_dr=smooth_dr,
        reduction="none" if reduction == "none" else reduction,
    )
    out = fn(probs, onehot)
    if reduction == "none":
        out = out.reshape(out.shape[:2]) if not batch else out.reshape(-1)
    return out


class DiceLoss(nn.Module):
    """Module form of :func:`dice_loss`."""

    def __init__(self, *, include_background: bool = False, batch: bool = True, ignore_index: int | None = None,
                 smooth_nr: float = 1e-5, smooth_dr: float = 1e-5, reduction: str = "mean", validate: bool = True) -> None:
        super().__init__()
        self.kwargs = dict(include_background=include_background, batch=batch, ignore_index=ignore_index,
                           smooth_nr=smooth_nr, smooth_dr=smooth_dr, reduction=reduction, validate=validate)

    def forward(self, probs: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        return dice_loss(probs, label, **self.kwargs)
