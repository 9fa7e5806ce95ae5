"""Focal loss (Lin et al., ICCV 2017) over softmax outputs.

Per voxel ``-sum_k a_k (1 - p_k)^gamma g_k log p_k`` (MONAI's ``softmax_focal_loss``), averaged over the
voxels that are not ignored. ``alpha`` (a float) weighs the foreground classes by ``alpha`` and the background
by ``1 - alpha``; ``None`` weighs all classes 1. With ``gamma = 0`` and no ``alpha`` it is the cross-entropy.
(MONAI's ``FocalLoss`` with ``reduction="mean"`` also averages over the class axis, i.e. divides by K.)
"""

from __future__ import annotations

import torch
from monai.losses.focal_loss import softmax_focal_loss
from torch import nn

from segpipe.losses._checks import check_finite, check_label, label_as_index
from segpipe.losses._onehot import masked_one_hot
from segpipe.losses.cross_entropy import masked_voxel_mean

__all__ = ["FocalLoss", "focal_loss"]


def focal_loss(
    logits: torch.Tensor,
    label: torch.Tensor,
    *,
    gamma: float = 2.0,
    alpha: float | None = None,
    ignore_index: int | None = None,
    validate: bool = True,
) -> torch.Tensor:
    if gamma < 0:
        raise ValueError(f"gamma: expected a number >= 0, got {gamma}")
    if alpha is not None and not 0 <= alpha <= 1:
        raise ValueError(f"alpha: expected a number in [0, 1] or None, got {alpha}")
    label = label_as_index(label, logits)
    if validate:
        check_finite(logits, "logits")
        check_label(label, logits.shape[1], ignore_index)
    onehot, _ = masked_one_hot(label, logits.shape[1], ignore_index, logits.dtype)
    per_voxel = softmax_focal_loss(logits, onehot, gamma, alpha).sum(1)
    return masked_voxel_mean(per_voxel, label, ignore_index)


class FocalLoss(nn.Module):
    """Module form of :func:`focal_loss`."""

    def __init__(self, *, gamma: float = 2.0, alpha: float | None = None, ignore_index: int | None = None, validate: bool = True) -> None:
        super().__init__()
        self.kwargs = dict(gamma=gamma, alpha=alpha, ignore_index=ignore_index, validate=validate)

    def forward(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        return focal_loss(logits, label, **self.kwargs)
