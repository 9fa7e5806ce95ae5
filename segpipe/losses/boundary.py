"""Boundary loss (Kervadec et al., MIDL 2019 / Medical Image Analysis 2021).

``boundary_loss(probs, sdm) = mean(probs * sdm)`` over every element, where ``sdm`` holds the signed distance
map of each foreground class (negative inside the object, positive outside, in mm; see
:func:`segpipe.transforms.signed_distance_map`). It approximates the L2 distance between the predicted and
the true boundaries as an integral over regions, so it needs no per-step distance transform: the maps are
computed once per case and cached. Lower is better; the minimum over binary predictions is reached by the
ground-truth mask itself, where the value is the (negative) sum of the map inside the object divided by the
number of elements. Voxels to be ignored (WMH label 2) carry a map value of 0.
"""

from __future__ import annotations

import torch
from torch import nn

from segpipe.losses._checks import check_finite, check_logits_probs, check_same_shape

__all__ = ["BoundaryLoss", "boundary_loss"]


def boundary_loss(probs: torch.Tensor, sdm: torch.Tensor, *, validate: bool = True) -> torch.Tensor:
    """Mean of ``probs * sdm``; both ``(B, K, *spatial)`` (2D or 3D), the caller picks the foreground channels.

    ``validate`` checks shapes, finiteness and that ``probs`` are probabilities (a full pass over the data
    and a device synchronisation; the training loop checks the loss value instead).
    """
    check_same_shape(probs, sdm, "probs", "sdm")
    if probs.ndim not in (4, 5):
        raise ValueError(f"probs: expected (B, K, H, W) or (B, K, X, Y, Z), got {tuple(probs.shape)}")
    if validate:
        check_logits_probs(probs, "probs")
        check_finite(sdm, "sdm")
    return (probs * sdm.to(probs.dtype)).mean()


class BoundaryLoss(nn.Module):
    """Module form of :func:`boundary_loss`."""

    def __init__(self, validate: bool = True) -> None:
        super().__init__()
        self.validate = validate

    def forward(self, probs: torch.Tensor, sdm: torch.Tensor) -> torch.Tensor:
        return boundary_loss(probs, sdm, validate=self.validate)
