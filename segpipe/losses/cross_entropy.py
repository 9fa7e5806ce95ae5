"""Cross-entropy over voxels with an ignore label: the mean of ``-log softmax(logits)[label]`` over the
voxels that are not ignored (0 when every voxel is ignored, instead of PyTorch's NaN)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from segpipe.losses._checks import check_finite, check_label, label_as_index

__all__ = ["CrossEntropyLoss", "cross_entropy_loss", "masked_voxel_mean"]


def masked_voxel_mean(per_voxel: torch.Tensor, label: torch.Tensor, ignore_index: int | None) -> torch.Tensor:
    """Mean of a ``(B, *spatial)`` per-voxel loss over the voxels whose label is not ``ignore_index``."""
    if ignore_index is None:
        return per_voxel.mean()
    valid = (label != ignore_index).to(per_voxel.dtype)
    return (per_voxel * valid).sum() / valid.sum().clamp_min(1.0)


def cross_entropy_loss(
    logits: torch.Tensor, label: torch.Tensor, *, ignore_index: int | None = None, validate: bool = True
) -> torch.Tensor:
    label = label_as_index(label, logits)
    if validate:
        check_finite(logits, "logits")
        check_label(label, logits.shape[1], ignore_index)
    target = label if ignore_index is None else torch.where(label == ignore_index, torch.full_like(label, -100), label)
    per_voxel = F.cross_entropy(logits, target, reduction="none", ignore_index=-100)
    return masked_voxel_mean(per_voxel, label, ignore_index)


class CrossEntropyLoss(nn.Module):
    """Module form of :func:`cross_entropy_loss`."""

    def __init__(self, *, ignore_index: int | None = None, validate: bool = True) -> None:
        super().__init__()
        self.ignore_index = ignore_index
        self.validate = validate

    def forward(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        return cross_entropy_loss(logits, label, ignore_index=self.ignore_index, validate=self.validate)
