"""Input checks shared by the losses: each failure is a ``ValueError`` naming the argument, what was
expected and what came."""

from __future__ import annotations

import torch

__all__ = ["check_finite", "check_label", "check_logits_probs", "check_same_shape", "label_as_index", "valid_mask"]


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def check_same_shape(a: torch.Tensor, b: torch.Tensor, name_a: str, name_b: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name_a} and {name_b}: expected the same shape (B, K, *spatial), got {_shape(a)} and {_shape(b)}")


def check_finite(x: torch.Tensor, name: str) -> None:
    x = x.detach()
    if not bool(torch.isfinite(x).all()):
        n_nan = int(torch.isnan(x).sum())
        n_inf = int(torch.isinf(x).sum())
        raise ValueError(f"{name}: expected finite values, found {n_nan} NaN and {n_inf} inf; check the data and the learning rate")


def check_logits_probs(probs: torch.Tensor, name: str = "probs") -> None:
    """Probabilities must be finite and in [0, 1]; values outside usually mean logits were passed."""
    check_finite(probs, name)
    lo, hi = float(probs.detach().min()), float(probs.detach().max())
    if lo < -1e-6 or hi > 1 + 1e-6:
        raise ValueError(
            f"{name}: expected probabilities in [0, 1], found values in [{lo:.4g}, {hi:.4g}]; these look like logits: "
            "apply torch.softmax(logits, dim=1) first"
        )


def label_as_index(label: torch.Tensor, ref: torch.Tensor, name: str = "label") -> torch.Tensor:
    """Class-index label of shape ``(B, *spatial)`` (a ``(B, 1, *spatial)`` one is squeezed) as int64."""
    if label.ndim == ref.ndim and label.shape[1] == 1:
        label = label[:, 0]
    if label.shape != ref.shape[:1] + ref.shape[2:]:
        raise ValueError(
            f"{name}: expected class indices of shape (B, *spatial) = {tuple(ref.shape[:1] + ref.shape[2:])} "
            f"(or with a channel of 1) to match the prediction {_shape(ref)}, got {_shape(label)}"
        )
    if label.is_floating_point():
        label = label.round()
    return label.long()


def check_label(label: torch.Tensor, num_classes: int, ignore_index: int | None, name: str = "label") -> None:
    bad = (label < 0) | (label >= num_classes)
    if ignore_index is not None:
        bad &= label != ignore_index
    if bool(bad.any()):
        values = torch.unique(label[bad])[:5].tolist()
        allowed = f"0..{num_classes - 1}" + (f" or the ignore index {ignore_index}" if ignore_index is not None else "")
        raise ValueError(f"{name}: expected class indices {allowed} (the prediction has {num_classes} classes), found {values}")


def valid_mask(label: torch.Tensor, ignore_index: int | None) -> torch.Tensor | None:
    """``(B, 1, *spatial)`` float mask of the voxels that count, or ``None`` when nothing is ignored."""
    if ignore_index is None:
        return None
    return (label != ignore_index).unsqueeze(1)
