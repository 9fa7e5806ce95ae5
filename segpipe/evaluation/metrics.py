"""Segmentation metrics, with the challenges' conventions for empty masks.

The definitions follow the organisers' evaluation code, re-implemented with NumPy/SciPy (their code needs
``cc3d`` or Python 2):

- ISLES 2022 (``eval_utils.py`` in ezequieldlrosa/isles22): Dice (1.0 when both masks are empty), absolute
  volume difference in ml, absolute difference of the lesion counts, lesion-wise F1 (26-connected
  components; a ground-truth lesion is detected when one voxel overlaps the prediction, a predicted
  component that overlaps no ground truth is a false positive; ``tp / (tp + (fp + fn) / 2)``, 1.0 when both
  masks are empty).
- WMH 2017 (``evaluation.py`` in hjkuijf/wmhchallenge): Dice (scipy's, NaN when both are empty), the 95th
  percentile Hausdorff distance between the borders (voxels removed by an in-plane 2D erosion), in world mm,
  the larger of the two directed 95th percentiles (NaN when the prediction is empty); the WMH protocol itself
  (with SimpleITK, as the organisers' code) is in :mod:`segpipe.evaluation.protocols`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

__all__ = [
    "SIZE_BINS_ML",
    "absolute_volume_difference_ml",
    "components",
    "dice",
    "hausdorff95",
    "lesion_count_difference",
    "lesion_f1",
    "lesion_table",
    "lesions_by_size",
]

_FULL = np.ones((3, 3, 3), dtype=bool)


def components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """26-connected components (3D), 8-connected in 2D."""
    mask = np.asarray(mask, dtype=bool)
    return ndimage.label(mask, structure=np.ones((3,) * mask.ndim, dtype=bool))


def dice(gt: np.ndarray, pred: np.ndarray, empty_value: float = 1.0) -> float:
    gt = np.asarray(gt, dtype=bool)
    pred = np.asarray(pred, dtype=bool)
    total = int(gt.sum()) + int(pred.sum())
    if total == 0:
        return float(empty_value)
    return 2.0 * int(np.logical_and(gt, pred).sum()) / total


def absolute_volume_difference_ml(gt: np.ndarray, pred: np.ndarray, voxel_ml: float) -> float:
    return abs(float(np.count_nonzero(gt)) - float(np.count_nonzero(pred))) * float(voxel_ml)


def lesion_count_difference(gt: np.ndarray, pred: np.ndarray) -> int:
    return abs(components(gt)[1] - components(pred)[1])


def lesion_f1(gt: np.ndarray, pred: np.ndarray, empty_value: float = 1.0) -> float:
    """ISLES 2022 lesion-wise F1."""
    gt = np.asarray(gt, dtype=bool)
    pred = np.asarray(pred, dtype=bool)
    lab_gt, n_gt = components(gt)
    lab_pred, n_pred = components(pred)
    hit_gt = np.unique(lab_gt[gt & pred])
    tp = int(np.count_nonzero(hit_gt))
    fn = n_gt - tp
    hit_pred = np.unique(lab_pred[gt & pred])
    fp = n_pred - int(np.count_nonzero(hit_pred))
    if tp + fp + fn == 0:
        return float(empty_value)
    return tp / (tp + (fp + fn) / 2)


def _border(mask: np.ndarray, inplane: bool) -> np.ndarray:
    if inplane:  # erosion in x and y only (WMH: SimpleITK BinaryErode with radius (1, 1, 0))
        structure = np.ones((3, 3, 1), dtype=bool)
    else:
        structure = ndimage.generate_binary_structure(mask.ndim, 1)
    eroded = ndimage.binary_erosion(mask, structure=structure, border_value=0)
    return mask & ~eroded


def hausdorff95(gt: np.ndarray, pred: np.ndarray, affine_or_spacing: np.ndarray | Sequence[float], *, inplane: bool = True) -> float:
    """Larger of the two directed 95th-percentile distances between the borders, in mm (world coordinates
    when an affine is given). NaN when the prediction is empty, or the ground truth is (where the WMH
    organisers' code would fail)."""
    gt = np.asarray(gt, dtype=bool)
    pred = np.asarray(pred, dtype=bool)
    if not pred.any() or not gt.any():
        return math.nan
    a = np.asarray(affine_or_spacing, dtype=float)
    if a.shape == (4, 4):
        to_world = lambda idx: idx @ a[:3, :3].T + a[:3, 3]  # noqa: E731
    else:
        to_world = lambda idx: idx * a  # noqa: E731
    bg = to_world(np.argwhere(_border(gt, inplane)).astype(float))
    bp = to_world(np.argwhere(_border(pred, inplane)).astype(float))
    d_gt_to_pred = cKDTree(bg).query(bp, k=1)[0]
    d_pred_to_gt = cKDTree(bp).query(bg, k=1)[0]
    return float(max(np.percentile(d_gt_to_pred, 95), np.percentile(d_pred_to_gt, 95)))


#: lesion-size bins (ml) of :func:`lesions_by_size`: from the small emboli of stroke and the punctate WMH to
#: territorial infarcts
SIZE_BINS_ML = (0.0, 0.01, 0.1, 1.0, 10.0, math.inf)


def lesion_table(gt: np.ndarray, pred: np.ndarray, affine: np.ndarray, voxel_ml: float) -> list[dict[str, float | int | str]]:
    """Lesion by lesion, with the lesion-wise metrics' conventions (26-connected components; a ground-truth
    lesion is detected when one voxel of it is predicted): one row per ground-truth lesion (``kind`` "lesion":
    its volume, whether it was detected, the share of its voxels predicted) and one per predicted component
    that touches no ground truth (``kind`` "false_positive"); each with its centre in world mm (``affine``'s
    frame: RAS for NIfTI). ``gt`` and ``pred`` are binary masks on one grid."""
    gt, pred = np.asarray(gt, dtype=bool), np.asarray(pred, dtype=bool)
    rows: list[dict[str, float | int | str]] = []
    affine = np.asarray(affine, float)

    def centres(labels: np.ndarray, n: int) -> np.ndarray:
        if n == 0:
            return np.zeros((0, 3))
        index = np.asarray(ndimage.center_of_mass(labels > 0, labels, range(1, n + 1)), float).reshape(n, -1)
        return index @ affine[:3, :3].T + affine[:3, 3]

    lab_gt, n_gt = components(gt)
    if n_gt:
        size = ndimage.sum_labels(gt, lab_gt, range(1, n_gt + 1))
        hit = ndimage.sum_labels(pred, lab_gt, range(1, n_gt + 1))
        for j, (v, h, c) in enumerate(zip(size, hit, centres(lab_gt, n_gt)), start=1):
            rows.append({"kind": "lesion", "id": j, "volume_ml": float(v) * voxel_ml, "detected": int(h > 0),
                         "predicted_fraction": float(h) / float(v), "x_mm": float(c[0]), "y_mm": float(c[1]), "z_mm": float(c[2])})
    lab_pred, n_pred = components(pred)
    if n_pred:
        size = ndimage.sum_labels(pred, lab_pred, range(1, n_pred + 1))
        touch = ndimage.sum_labels(gt, lab_pred, range(1, n_pred + 1))
        for k, (v, t, c) in enumerate(zip(size, touch, centres(lab_pred, n_pred)), start=1):
            if t == 0:
                rows.append({"kind": "false_positive", "id": k, "volume_ml": float(v) * voxel_ml, "detected": 0,
                             "predicted_fraction": 1.0, "x_mm": float(c[0]), "y_mm": float(c[1]), "z_mm": float(c[2])})
    return rows


def _bin_label(lo: float, hi: float) -> str:
    if lo == 0:
        return f"< {hi:g} ml"
    return f">= {lo:g} ml" if math.isinf(hi) else f"{lo:g}-{hi:g} ml"


def lesions_by_size(rows: Sequence[dict[str, float | int | str]], bins: Sequence[float] = SIZE_BINS_ML) -> list[dict[str, float | int | str]]:
    """Per size bin: the ground-truth lesions, how many were detected (the sensitivity), and the false
    positives of that size (rows from :func:`lesion_table`, of any number of cases)."""
    out = []
    for lo, hi in zip(bins[:-1], bins[1:]):
        inside = [r for r in rows if lo <= float(r["volume_ml"]) < hi]
        lesions = [r for r in inside if r["kind"] == "lesion"]
        detected = sum(int(r["detected"]) for r in lesions)
        out.append({"size": _bin_label(lo, hi), "lesions": len(lesions), "detected": detected,
                    "sensitivity": detected / len(lesions) if lesions else math.nan,
                    "false_positives": sum(1 for r in inside if r["kind"] == "false_positive")})
    return out
