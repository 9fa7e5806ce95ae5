"""One-hot targets with ignored voxels removed, shared by the region-overlap losses."""

from __future__ import annotations

import torch

__all__ = ["masked_one_hot", "overlap_inputs"]


def masked_one_hot(
    label: torch.Tensor, num_classes: int, ignore_index: int | None, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``label`` ``(B, *spatial)`` int64 -> one-hot ``(B, K, *spatial)`` with ignored voxels all zero, and the
    ``(B, 1, *spatial)`` mask of valid voxels (``None`` when nothing is ignored)."""
    mask = None
    if ignore_index is not None:
        valid = label != ignore_index
        mask = valid.unsqueeze(1).to(dtype)
        label = torch.where(valid, label, torch.zeros_like(label))
    shape = (label.shape[0], num_classes, *label.shape[1:])
    onehot = torch.zeros(shape, dtype=dtype, device=label.device).scatter_(1, label.unsqueeze(1), 1.0)
    if mask is not None:
        onehot = onehot * mask
    return onehot, mask


def overlap_inputs(probs: torch.Tensor, label: torch.Tensor, ignore_index: int | None,
                   validate: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """What the Dice-type losses feed MONAI: the probabilities and the one-hot target, both with the ignored
    voxels zeroed (so they count in neither), after the input checks."""
    from segpipe.losses._checks import check_label, check_logits_probs, label_as_index

    label = label_as_index(label, probs)
    if validate:
        check_logits_probs(probs)
        check_label(label, probs.shape[1], ignore_index)
    onehot, mask = masked_one_hot(label, probs.shape[1], ignore_index, probs.dtype)
    return (probs if mask is None else probs * mask), onehot
