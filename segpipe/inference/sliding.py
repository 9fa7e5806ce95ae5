"""Sliding-window prediction of a whole preprocessed volume (MONAI ``sliding_window_inference``, Gaussian
weighting), with optional test-time mirroring (the mean of the softmax over all axis flips, as nnU-Net)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from contextlib import nullcontext

import torch
from monai.inferers import sliding_window_inference

__all__ = ["class_argmax", "mirror_axes", "predict_volume"]


def class_argmax(probs: torch.Tensor) -> torch.Tensor:
    """``probs.argmax(0)`` as uint8 (ties to the lower class, as argmax), one pass per class: PyTorch's CPU argmax
    over a leading axis of 2 classes takes 1.1 s on a 192x224x192 volume, this 0.05 s."""
    best = probs[0]
    out = torch.zeros(probs.shape[1:], dtype=torch.uint8, device=probs.device)
    for k in range(1, probs.shape[0]):
        higher = probs[k] > best
        out[higher] = k
        best = torch.maximum(best, probs[k])
    return out


def mirror_axes(ndim: int = 3) -> list[tuple[int, ...]]:
    """Every subset of the spatial axes (8 for 3D), the empty one first."""
    return [c for r in range(ndim + 1) for c in itertools.combinations(range(ndim), r)]


@torch.no_grad()
def predict_volume(
    net: torch.nn.Module,
    image: torch.Tensor,
    patch_size: Sequence[int],
    *,
    overlap: float = 0.5,
    sw_batch_size: int = 2,
    device: torch.device | str = "cpu",
    tta: bool = False,
    amp_dtype: torch.dtype | None = None,
    keep_on_device: bool = False,
) -> torch.Tensor:
    """Class probabilities ``(K, X, Y, Z)`` (float32; on the CPU, or on ``device`` with ``keep_on_device``) for a
    ``(C, X, Y, Z)`` preprocessed image."""
    device = torch.device(device)
    was_training = net.training
    net.eval()
    x = torch.as_tensor(image, dtype=torch.float32)[None].to(device)
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None and device.type == "cuda" else nullcontext()
    probs = None
    flips = mirror_axes(3) if tta else [()]
    try:
        for axes in flips:
            dims = [a + 2 for a in axes]
            xin = torch.flip(x, dims) if dims else x
            with autocast:
                logits = sliding_window_inference(xin, tuple(patch_size), sw_batch_size, net, overlap=overlap, mode="gaussian",
                                                  padding_mode="constant", cval=0.0)
            p = torch.softmax(logits.float(), dim=1)
            if dims:
                p = torch.flip(p, dims)
            probs = p if probs is None else probs + p
    finally:
        net.train(was_training)
    probs = (probs / len(flips))[0]
    return probs if keep_on_device else probs.cpu()
