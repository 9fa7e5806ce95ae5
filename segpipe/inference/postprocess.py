"""Postprocessing of predicted masks (NumPy and SciPy only, so that ``segpipe evaluate`` can apply it to
masks already written without loading the network's libraries)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["remove_small_components"]


def remove_small_components(mask: np.ndarray, spacing: tuple[float, ...], min_mm3: float) -> tuple[np.ndarray, int]:
    """Set components (26-connected, per class) smaller than ``min_mm3`` to background (a relative 1e-6 below
    it: a component of exactly that volume stays); returns the mask and how many were removed."""
    if min_mm3 <= 0:
        return mask, 0
    voxel = float(np.prod(spacing))
    out = mask.copy()
    removed = 0
    for k in np.unique(mask):
        if k == 0:
            continue
        lab, n = ndimage.label(mask == k, structure=np.ones((3, 3, 3), bool))
        if n == 0:
            continue
        sizes = np.bincount(lab.ravel(), minlength=n + 1)[1:] * voxel
        # "smaller than": a component of exactly min_mm3 stays, also when the spacing is read as 1.9999999 mm
        # from the affine here and as 2.0 from the header elsewhere
        small = np.flatnonzero(sizes < min_mm3 * (1 - 1e-6)) + 1
        if len(small):
            out[np.isin(lab, small)] = 0
            removed += len(small)
    return out, removed
