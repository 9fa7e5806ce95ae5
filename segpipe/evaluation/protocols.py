"""``segpipe evaluate``: the ISLES 2022 and WMH 2017 evaluation protocols, number for number.

- ``isles22`` (the organisers' ``eval_utils.py``): ground truth and prediction are binarised as "non-zero";
  keys ``dice`` (1.0 when both are empty), ``avd_ml`` (voxel volume from the ground truth's header),
  ``lesion_count_diff`` and ``lesion_f1`` (26-connectivity).
- ``wmh17`` (the organisers' ``evaluation.py``, written with SimpleITK; so is this): the ground truth's label 1
  is WMH and label 2 "other pathology", where the prediction is set to 0; an integer prediction is
  foreground from 1, a floating-point one from 0.5. Keys ``dice`` (scipy's; NaN when both are empty),
  ``hd95`` (mm; borders by in-plane erosion, the larger of the two directed 95th percentiles; NaN when the
  prediction is empty), ``avd_pct`` (percent of the ground-truth volume), ``lesion_recall``, ``lesion_f1``.
  Where the official code raises (``hd95`` and ``avd_pct`` with an empty ground truth) the value is NaN and a
  warning is logged.
- ``isles15`` (the ISLES 2015 and 2016 organisers' program ``validateLabelImages-ISLES``, built on Covalic's
  ITK metrics; ISLES 2015 SISS/SPES and 2016 ranked by it): masks binarised as "non-zero"; keys ``dice``
  (0 when both are empty), ``assd`` and ``hd`` (mm: the average symmetric surface distance and the
  maximum Hausdorff distance, from each mask's border voxels (foreground voxels with background in their
  3x3x3 ball of 19 voxels) to the other mask's ITK signed Maurer distance map; 0 when both are empty,
  infinite when one is), ``precision``, ``recall``, and ``volume_error_mm3`` (the program's later version:
  prediction minus ground truth, signed, in float32 as it computes it).

The JSON report is ``{"cases": {"<id>": {<key>: value}}, "mean": {<key>: value}}``; the means skip NaN and
infinite values (``isles15``'s distances to an empty mask, which its online evaluation also leaves out of the
means), written as null in JSON.

``min_lesion_mm3`` removes predicted components smaller than that (as ``segpipe infer --min-lesion-mm3``
does, on the same grid) before scoring; several values give a sweep, the means for each (``"sweep"`` in the
report), to choose the value on cross-validation predictions as nnU-Net chooses its postprocessing.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from segpipe.errors import SegpipeError, UsageError, did_you_mean, problems_error
from segpipe.evaluation.metrics import (
    absolute_volume_difference_ml,
    dice,
    lesion_count_difference,
    lesion_f1,
    lesion_table,
    lesions_by_size,
)
from segpipe.io.atomic import atomic_write_text
from segpipe.io.nifti import read_volume, spacing_of
from segpipe.resources import process_pool, usable_cores

__all__ = ["HIGHER_IS_BETTER", "PROTOCOLS", "SIGNED", "best_in_sweep", "compare", "evaluate", "evaluate_isles15", "evaluate_isles22",
           "evaluate_wmh17", "pair_cases", "paired_difference", "protocol_for", "write_report"]

log = logging.getLogger(__name__)
NIFTI = (".nii.gz", ".nii")
#: what a mask may be stored as (read by nibabel, the others by SimpleITK: :func:`segpipe.io.nifti.read_volume`)
MASK_SUFFIXES = (*NIFTI, ".mha", ".mhd", ".nrrd")


def evaluate_isles22(gt: np.ndarray, pred: np.ndarray, voxel_ml: float) -> dict[str, float]:
    g = np.asarray(gt) != 0
    p = np.asarray(pred) != 0
    return {
        "dice": float(dice(g, p, empty_value=1.0)),
        "avd_ml": float(absolute_volume_difference_ml(g, p, voxel_ml)),
        "lesion_count_diff": int(lesion_count_difference(g, p)),
        "lesion_f1": float(lesion_f1(g, p, empty_value=1.0)),
    }


def _sitk(arr: np.ndarray, affine: np.ndarray):
    """A SimpleITK image of an (x, y, z) array with the geometry of a RAS ``affine`` (ITK is LPS)."""
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(arr, (2, 1, 0))))
    lps = np.diag([-1.0, -1.0, 1.0]) @ np.asarray(affine, float)[:3, :4]
    spacing = np.sqrt((lps[:, :3] ** 2).sum(axis=0))
    img.SetSpacing(tuple(float(s) for s in spacing))
    img.SetDirection(tuple(float(v) for v in (lps[:, :3] / spacing).ravel()))
    img.SetOrigin(tuple(float(v) for v in lps[:, 3]))
    return img


def _wmh_masks(gt: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """WMH 2017's binary masks (uint8): the ground truth's label 1, and the prediction with label 2's voxels
    (other pathology) removed."""
    gt = np.asarray(gt)
    pred = np.asarray(pred)
    wmh = ((gt >= 0.5) & (gt <= 1.5)).astype(np.uint8)
    keep = ~((gt >= 1.5) & (gt <= 2.5))
    masked = np.where(keep, pred, 0)
    if np.issubdtype(pred.dtype, np.integer) or pred.dtype == bool:
        res = ((masked >= 1) & (masked <= 1000)).astype(np.uint8)
    else:
        res = ((masked >= 0.5) & (masked <= 1000)).astype(np.uint8)
    return wmh, res


def evaluate_wmh17(gt: np.ndarray, pred: np.ndarray, affine: np.ndarray, case: str = "") -> dict[str, float]:
    import scipy.spatial
    import SimpleITK as sitk

    wmh, res = _wmh_masks(gt, pred)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        dsc = 1.0 - float(scipy.spatial.distance.dice(wmh.ravel(), res.ravel()))

    t_img, r_img = _sitk(wmh, affine), _sitk(res, affine)
    if res.sum() == 0:
        hd = math.nan
    elif wmh.sum() == 0:
        log.warning("case '%s': empty ground truth; the WMH organisers' code fails on hd95 here: reported as NaN", case)
        hd = math.nan
    else:
        def border_points(img):
            edge = sitk.Subtract(img, sitk.BinaryErode(img, (1, 1, 0)))
            idx = np.flipud(np.nonzero(sitk.GetArrayFromImage(edge))).T.astype(int)
            return np.array([img.TransformIndexToPhysicalPoint([int(v) for v in i]) for i in idx])

        tc, rc = border_points(t_img), border_points(r_img)
        if len(tc) == 0 or len(rc) == 0:  # a mask filling whole slices to the image's edges has no border voxel
            log.warning("case '%s': a mask without border voxels (it fills the image in-plane); the WMH organisers' code fails on "
                        "hd95 here: reported as NaN", case)
            hd = math.nan
        else:
            d_t2r = scipy.spatial.KDTree(tc, leafsize=100).query(rc, k=1, eps=0, p=2)[0]
            d_r2t = scipy.spatial.KDTree(rc, leafsize=100).query(tc, k=1, eps=0, p=2)[0]
            hd = float(max(np.percentile(d_t2r, 95), np.percentile(d_r2t, 95)))

    if wmh.sum() == 0:
        log.warning("case '%s': empty ground truth; the WMH organisers' code fails on avd_pct here: reported as NaN", case)
        avd = math.nan
    else:
        avd = abs(float(wmh.sum()) - float(res.sum())) / float(wmh.sum()) * 100

    cc = sitk.ConnectedComponentImageFilter()
    cc.SetFullyConnected(True)
    cc_test = cc.Execute(t_img)
    l_result = sitk.Multiply(cc_test, sitk.Cast(r_img, sitk.sitkUInt32))
    n_wmh = len(np.unique(sitk.GetArrayFromImage(cc_test))) - 1
    recall = 1.0 if n_wmh == 0 else (len(np.unique(sitk.GetArrayFromImage(l_result))) - 1) / n_wmh
    cc_result = cc.Execute(r_img)
    l_test = sitk.Multiply(cc_result, sitk.Cast(t_img, sitk.sitkUInt32))
    n_det = len(np.unique(sitk.GetArrayFromImage(cc_result))) - 1
    precision = 1.0 if n_det == 0 else (len(np.unique(sitk.GetArrayFromImage(l_test))) - 1) / n_det
    f1 = 0.0 if precision + recall == 0 else 2.0 * precision * recall / (precision + recall)
    return {"dice": dsc, "hd95": hd, "avd_pct": avd, "lesion_recall": float(recall), "lesion_f1": float(f1)}


def _border_distances(a, b) -> np.ndarray:
    """ISLES 2015's directed surface distances: at each border voxel of ``a`` (a foreground voxel whose 3x3x3 ball
    holds background: the morphological gradient the program takes, image edges not counted as background),
    the absolute value of ``b``'s signed Maurer distance map (ITK's, in mm; zero on ``b``'s own contour). The
    program reads that map through a cubic B-spline interpolator at the voxel centres, which returns the map's
    own values there (checked against ITK's interpolator in tests/evaluation/test_against_itk.py)."""
    import SimpleITK as sitk

    border = sitk.GetArrayViewFromImage(sitk.MorphologicalGradient(a, [1, 1, 1], sitk.sitkBall)) != 0
    border &= sitk.GetArrayViewFromImage(a) != 0
    dist = sitk.SignedMaurerDistanceMap(b, insideIsPositive=False, squaredDistance=False, useImageSpacing=True)
    return np.abs(sitk.GetArrayViewFromImage(dist)[border]).astype(np.float64)


def evaluate_isles15(gt: np.ndarray, pred: np.ndarray, affine: np.ndarray) -> dict[str, float]:
    """One case's ISLES 2015/2016 metrics (the module's docstring): ``gt`` and ``pred`` on the grid of ``affine``."""
    g = np.asarray(gt) != 0
    p = np.asarray(pred) != 0
    n_g, n_p = int(g.sum()), int(p.sum())
    tp = int(np.count_nonzero(g & p))
    if n_g == 0 or n_p == 0:
        assd = hd = 0.0 if n_g == n_p else math.inf
    else:
        g_img, p_img = _sitk(g.astype(np.uint8), affine), _sitk(p.astype(np.uint8), affine)
        d_gp, d_pg = _border_distances(g_img, p_img), _border_distances(p_img, g_img)
        if d_gp.size == 0 or d_pg.size == 0:  # a mask that fills the image has no border voxel
            assd = hd = math.inf
        else:
            assd = 0.5 * (float(d_gp.mean()) + float(d_pg.mean()))
            hd = max(float(d_gp.max()), float(d_pg.max()))
    # the volumes as the program computes them: float32 products, left to right, subtracted in float32
    s = np.asarray(spacing_of(affine), np.float32)

    def volume(n: int) -> np.float32:
        return np.float32(n) * s[0] * s[1] * s[2]

    return {
        "dice": tp / ((n_g + n_p) / 2.0 + 1e-20),
        "assd": assd,
        "hd": hd,
        "precision": tp / (n_p + 1e-20),
        "recall": tp / (n_g + 1e-20),
        "volume_error_mm3": float(volume(n_p) - volume(n_g)),
    }


PROTOCOLS: dict[str, tuple[str, ...]] = {
    "isles22": ("dice", "avd_ml", "lesion_count_diff", "lesion_f1"),
    "wmh17": ("dice", "hd95", "avd_pct", "lesion_recall", "lesion_f1"),
    "isles15": ("dice", "assd", "hd", "precision", "recall", "volume_error_mm3"),
}


def _strip(name: str) -> str:
    for ext in MASK_SUFFIXES:
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return name


def _mask_files(folder: Path, dicom_seg: bool = False) -> dict[str, Path]:
    """The masks of a folder by case id: NIfTI, and MetaImage or NRRD (3D Slicer, ITK-SNAP, ISLES 2015) where
    no NIfTI file has the same case id; with ``dicom_seg`` also DICOM SEG files, ``<case>.dcm`` or
    ``<case>_seg.dcm`` (what ``segpipe infer`` writes beside its ``<case>_sr.dcm`` reports, which are left out)."""
    found: dict[str, Path] = {}
    for p in sorted(folder.iterdir(), key=lambda p: (not p.name.lower().endswith(NIFTI), p.name)):
        name = p.name.lower()
        if not p.is_file():
            continue
        if name.endswith(MASK_SUFFIXES):
            found.setdefault(_strip(p.name), p)
        elif dicom_seg and name.endswith(".dcm") and not name.endswith("_sr.dcm"):
            stem = p.name[: -len(".dcm")]
            found.setdefault(stem[: -len("_seg")] if stem.lower().endswith("_seg") else stem, p)
    return dict(sorted(found.items()))


def _dataset_labels(root: Path) -> dict[str, Path]:
    """The labels of a dataset folder in a known layout (ISLES 2022's derivatives, WMH 2017's wmh.nii.gz, ...)."""
    from segpipe.data.layouts import discover

    try:
        m = discover(root)
    except SegpipeError as exc:
        reason = (str(exc).strip().splitlines() or [""])[0]
        raise SegpipeError(f"--gt '{root}': no masks named by case id in it (NIfTI, .mha, .nrrd), and not a dataset of a known layout ({reason}); "
                           "give the folder of masks or a manifest") from None
    return {c.id: m.label_path(c) for c in m.labelled}


#: the protocol of each dataset layout (``--protocol auto``); ISLES 2018's organisers reported measures of the
#: 2015/2016 program's kinds (Dice, Hausdorff distance, volume difference, ...), so it takes ``isles15``
LAYOUT_PROTOCOLS = {"isles22": "isles22", "wmh17": "wmh17", "isles15": "isles15", "isles18": "isles15"}


def protocol_for(gt: Path) -> tuple[str, str | None]:
    """``--protocol auto``: the protocol of the ground truth's dataset layout, when ``gt`` is a manifest or a
    dataset folder of a layout in :data:`LAYOUT_PROTOCOLS`, with that layout's name; else ``isles22`` and None."""
    layout = None
    try:
        if gt.is_file() and gt.suffix.lower() == ".json":
            from segpipe.data.manifest import load_manifest

            layout = load_manifest(gt).layout
        elif gt.is_dir() and not _mask_files(gt, dicom_seg=True):
            from segpipe.data.layouts import discover

            layout = discover(gt).layout
    except SegpipeError:  # pair_cases says what is wrong with it
        pass
    if layout in LAYOUT_PROTOCOLS:
        return LAYOUT_PROTOCOLS[layout], layout
    return "isles22", None


def pair_cases(pred: Path, gt: Path, *, ignore_missing: bool = False) -> list[tuple[str, Path, Path]]:
    """(case id, prediction, ground truth) triples. ``gt`` is a folder of masks named by case id (NIfTI, MetaImage, NRRD,
    DICOM SEG), a dataset folder in a known layout, or a manifest (its labelled cases). Predictions are masks named by
    case id: ``<case id>.nii.gz`` as ``segpipe infer`` writes them, or another tool's (MetaImage, NRRD, DICOM SEG
    ``<case id>.dcm``/``<case id>_seg.dcm``); NIfTI first where a case has several."""
    if not pred.is_dir():
        raise SegpipeError(f"--pred '{pred}': folder not found; give the folder `segpipe infer --out` wrote")
    preds = _mask_files(pred, dicom_seg=True)
    # `segpipe infer --save-probabilities` writes <case>_probabilities beside <case>: not a prediction of its own
    preds = {c: p for c, p in preds.items() if not (c.endswith("_probabilities") and c[: -len("_probabilities")] in preds)}
    if gt.is_dir():
        gts = _mask_files(gt, dicom_seg=True) or _dataset_labels(gt)
    elif gt.is_file() and gt.suffix.lower() == ".json":
        from segpipe.data.manifest import load_manifest

        m = load_manifest(gt)
        gts = {c.id: m.label_path(c) for c in m.labelled}
    else:
        found = "not found" if not gt.exists() else "found a file that is not a .json manifest"
        raise SegpipeError(f"--gt '{gt}': expected a folder of masks named by case id (NIfTI, .mha, .nrrd), or a manifest (.json); {found}")
    missing_pred = sorted(set(gts) - set(preds))
    missing_gt = sorted(set(preds) - set(gts))
    if (missing_pred or missing_gt) and not ignore_missing:
        problems = [f"no prediction for case '{c}' in {pred}{did_you_mean(c, preds)}" for c in missing_pred]
        problems += [f"no ground truth for predicted case '{c}'{did_you_mean(c, gts)}" for c in missing_gt]
        raise problems_error("evaluate: cases missing on one side", problems, hint="pass --ignore-missing to evaluate the cases found on both")
    common = sorted(set(preds) & set(gts))
    if not common:
        raise SegpipeError(f"evaluate: no case has both a prediction in '{pred}' and a ground truth in '{gt}'")
    return [(c, preds[c], gts[c]) for c in common]


def _load(path: Path, what: str) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """A mask as stored (NIfTI by nibabel; MetaImage and NRRD by SimpleITK, in the same voxel and world
    convention), its affine and voxel size: the header's for NIfTI, as the challenges' scripts take it."""
    vol = read_volume(path, what=what, dtype=None)
    zooms = vol.header.get_zooms()[:3] if vol.header is not None else spacing_of(vol.affine)
    return np.asarray(vol.array), vol.affine, tuple(float(z) for z in zooms)


def _is_seg(path: Path) -> bool:
    return path.name.lower().endswith(".dcm")


def _load_pair(p_path: Path, g_path: Path) -> tuple[np.ndarray, np.ndarray, tuple[float, ...], np.ndarray, np.ndarray, tuple[float, ...]]:
    """Prediction and ground truth (array, affine, voxel size each). A DICOM SEG on one side is placed on the
    other side's grid; two SEGs on the grid that holds the frames of both."""
    from segpipe.io.dicom import read_dicom_seg, read_dicom_seg_pair

    if _is_seg(p_path) and _is_seg(g_path):
        p, g, aff = read_dicom_seg_pair(p_path, g_path, what=("prediction", "ground truth"))
        zoom = tuple(float(z) for z in spacing_of(aff))
        return p, aff, zoom, g, aff, zoom
    if _is_seg(p_path):
        g, g_aff, g_zoom = _load(g_path, "ground truth")
        return read_dicom_seg(p_path, g.shape, g_aff, what="prediction"), g_aff, g_zoom, g, g_aff, g_zoom
    p, p_aff, p_zoom = _load(p_path, "prediction")
    if _is_seg(g_path):
        return p, p_aff, p_zoom, read_dicom_seg(g_path, p.shape, p_aff, what="ground truth"), p_aff, p_zoom
    return (p, p_aff, p_zoom, *_load(g_path, "ground truth"))


#: the direction in which each key is better
HIGHER_IS_BETTER = {"dice": True, "lesion_f1": True, "lesion_recall": True, "avd_ml": False, "avd_pct": False,
                    "lesion_count_diff": False, "hd95": False, "assd": False, "hd": False, "precision": True, "recall": True,
                    "volume_error_mm3": False}
#: keys whose sign says over or under, not better or worse: compared by their absolute value, and no size of a
#: sweep is named best by them (their mean lets over- and under-estimates cancel)
SIGNED = frozenset({"volume_error_mm3"})


def _means(cases: dict[str, dict[str, float]], protocol: str) -> dict[str, float]:
    mean = {}
    for key in PROTOCOLS[protocol]:
        vals = [float(c[key]) for c in cases.values() if math.isfinite(float(c[key]))]
        mean[key] = float(np.mean(vals)) if vals else math.nan
    return mean


def _score_case(cid: str, p_path: Path, g_path: Path, protocol: str, sizes: Sequence[float],
                single_thread: bool = False, lesions: bool = False) -> tuple[list[tuple[dict[str, float], int]], list[dict[str, Any]]]:
    """One case's metrics and removed lesions, per size of ``sizes``, and with ``lesions`` its lesion table
    (:func:`~segpipe.evaluation.metrics.lesion_table`, after the first size's removal); runs in a worker
    process too."""
    from segpipe.inference.postprocess import remove_small_components

    if single_thread:  # one process per core: SimpleITK's own threads would only compete
        import SimpleITK as sitk

        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    p, p_aff, p_zoom, g, g_aff, g_zoom = _load_pair(p_path, g_path)
    if p.shape != g.shape or not np.allclose(p_zoom, g_zoom, rtol=1e-3):
        raise SegpipeError(
            f"case '{cid}': prediction '{p_path}' is {p.shape} at {tuple(round(z, 4) for z in p_zoom)} mm but the ground truth "
            f"'{g_path}' is {g.shape} at {tuple(round(z, 4) for z in g_zoom)} mm; predict on the ground truth's grid "
            "(`segpipe infer` writes masks in the input's own geometry)"
        )
    if protocol != "wmh17" and p.dtype.kind == "f" and not np.array_equal(p, np.round(p)):
        log.warning("case '%s': prediction '%s' holds fractional values (a probability map?); the %s protocol counts "
                    "every non-zero voxel as lesion: score the masks instead", cid, p_path, protocol)
    out = []
    rows: list[dict[str, Any]] = []
    voxel_ml = float(np.prod(g_zoom)) / 1000.0
    for i, size in enumerate(sizes):
        kept, removed = p, 0
        if size > 0:  # the mask segpipe writes is integer; a probability map is taken from 0.5
            labels = p if np.issubdtype(p.dtype, np.integer) else (p >= 0.5).astype(np.uint8)
            kept, removed = remove_small_components(labels, p_zoom, size)
        if protocol == "isles22":
            out.append((evaluate_isles22(g, kept, voxel_ml), removed))
        elif protocol == "isles15":
            out.append((evaluate_isles15(g, kept, g_aff), removed))
        else:
            out.append((evaluate_wmh17(g, kept, g_aff, cid), removed))
        if lesions and i == 0:  # the protocol's own binary masks (WMH: label 1, label 2's voxels left out)
            g_bin, p_bin = (g != 0, kept != 0) if protocol != "wmh17" else _wmh_masks(g, kept)
            rows = [{"case": cid, **r} for r in lesion_table(g_bin, p_bin, g_aff, voxel_ml)]
    return out, rows


def evaluate(pred: str | os.PathLike, gt: str | os.PathLike, protocol: str, *, ignore_missing: bool = False,
             min_lesion_mm3: Sequence[float] = (0.0,), progress: Callable | None = None, workers: int | None = 1,
             lesions: bool = False) -> dict[str, Any]:
    """Score the predictions in ``pred`` against ``gt`` with ``protocol``'s metrics (``"auto"``: :func:`protocol_for`), per size of
    ``min_lesion_mm3`` (predicted lesions smaller than it removed first). ``workers`` processes score the
    cases side by side (None: one per CPU core, at most one per case, as nnU-Net's evaluation does with its
    8 processes by default); the report is the same whatever their number. With ``lesions`` the report also
    holds every lesion (``"lesions"``: :func:`~segpipe.evaluation.metrics.lesion_table`'s rows, with their case)
    and the detection rate by lesion size (``"lesions_by_size"``)."""
    chosen = None
    if protocol == "auto":
        protocol, layout = protocol_for(Path(gt))
        chosen = (f"the ground truth is a dataset of the {layout} layout" if layout else
                  f"the default: the ground truth is not a dataset of a layout with a protocol of its own ({', '.join(LAYOUT_PROTOCOLS)})")
    if protocol not in PROTOCOLS:
        choices = ("auto", *PROTOCOLS)
        raise UsageError(f"--protocol: expected one of {', '.join(choices)}, got '{protocol}'{did_you_mean(protocol, choices)}")
    sizes = [float(v) for v in min_lesion_mm3] or [0.0]
    bad = [v for v in sizes if not math.isfinite(v) or v < 0]
    if bad:
        raise UsageError(f"--min-lesion-mm3: expected sizes of 0 or more (mm^3), got {bad[0]:g}")
    if len(set(sizes)) < len(sizes):
        raise UsageError(f"--min-lesion-mm3: a size is given twice ({', '.join(f'{v:g}' for v in sizes)})")
    if workers is not None and workers < 1:
        raise UsageError(f"--workers: expected at least 1, got {workers}")
    pairs = pair_cases(Path(pred), Path(gt), ignore_missing=ignore_missing)
    if chosen:  # said once the cases are found, not before an error about them
        log.info("protocol %s (%s); --protocol chooses another", protocol, chosen)
    if workers is None:
        workers = usable_cores()
    workers = min(workers, len(pairs))
    scored: dict[str, tuple[list[tuple[dict[str, float], int]], list[dict[str, Any]]]] = {}
    if workers <= 1:
        for cid, p_path, g_path in (progress(pairs, "evaluating") if progress else pairs):
            scored[cid] = _score_case(cid, p_path, g_path, protocol, sizes, lesions=lesions)
    else:
        import concurrent.futures as cf

        with process_pool(workers) as pool:
            futures = {pool.submit(_score_case, cid, p_path, g_path, protocol, sizes, True, lesions): cid
                       for cid, p_path, g_path in pairs}
            done = cf.as_completed(futures)
            try:
                for fut in (progress(done, "evaluating", total=len(futures)) if progress else done):
                    scored[futures[fut]] = fut.result()
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
    swept: list[dict[str, dict[str, float]]] = [{} for _ in sizes]
    removed = [0] * len(sizes)
    rows: list[dict[str, Any]] = []
    for cid, _, _ in pairs:  # in the cases' order, whatever order the processes finished in
        for i, (metrics, n) in enumerate(scored[cid][0]):
            swept[i][cid] = metrics
            removed[i] += n
        rows += scored[cid][1]
    report: dict[str, Any] = {"protocol": protocol, "min_lesion_mm3": sizes[0], "cases": swept[0], "mean": _means(swept[0], protocol)}
    if lesions:
        report["lesions"] = rows
        report["lesions_by_size"] = lesions_by_size(rows)
    if len(sizes) > 1:
        report["sweep"] = [{"min_lesion_mm3": size, "removed_lesions": n, "mean": _means(c, protocol)}
                           for size, n, c in zip(sizes, removed, swept)]
    return report


def best_in_sweep(report: dict[str, Any]) -> dict[str, float]:
    """For each key, the swept size with the best mean (the smallest size among equals)."""
    best = {}
    for key in PROTOCOLS[report["protocol"]]:
        if key in SIGNED:
            continue
        rows = [r for r in report.get("sweep", []) if not math.isnan(r["mean"][key])]
        if rows:
            sign = -1 if HIGHER_IS_BETTER[key] else 1
            best[key] = min(rows, key=lambda r: (sign * r["mean"][key], r["min_lesion_mm3"]))["min_lesion_mm3"]
    return best


def paired_difference(values: Sequence[float], baseline: Sequence[float], *, higher_is_better: bool = True, resamples: int = 10000,
                      seed: int = 0) -> dict[str, Any]:
    """Paired values (case by case) against a baseline's: how many pairs have both values (pairs with a NaN or
    infinite value left out), both means, the mean difference (values minus baseline) with its 95 % bootstrap interval (pairs
    resampled ``resamples`` times, ``seed`` fixed), the Wilcoxon signed-rank test's two-sided p-value (SciPy;
    1 when every difference is 0), and on how many pairs each side is better, in the metric's direction."""
    from scipy.stats import wilcoxon

    pairs = [(float(a), float(b)) for a, b in zip(values, baseline) if math.isfinite(float(a)) and math.isfinite(float(b))]
    row: dict[str, Any] = {"cases": len(pairs), "mean": math.nan, "baseline_mean": math.nan, "difference": math.nan,
                           "ci_low": math.nan, "ci_high": math.nan, "p_value": math.nan, "better": 0, "worse": 0}
    if not pairs:
        return row
    a, b = np.array(pairs).T
    d = a - b
    sign = 1 if higher_is_better else -1
    boot = d[np.random.default_rng(seed).integers(0, len(d), size=(resamples, len(d)))].mean(axis=1)
    row.update(mean=float(a.mean()), baseline_mean=float(b.mean()), difference=float(d.mean()),
               ci_low=float(np.percentile(boot, 2.5)), ci_high=float(np.percentile(boot, 97.5)),
               p_value=1.0 if not np.any(d) else float(wilcoxon(d).pvalue),
               better=int(np.sum(sign * d > 0)), worse=int(np.sum(sign * d < 0)))
    return row


def compare(report: dict[str, Any], baseline: dict[str, Any], *, resamples: int = 10000, seed: int = 0) -> list[dict[str, Any]]:
    """Paired comparison of two reports of the same protocol on the same cases (a model against a baseline:
    the boundary loss against Dice alone, say): per metric, :func:`paired_difference` over the cases both
    reports hold."""
    if report["protocol"] != baseline["protocol"]:
        raise SegpipeError(f"compare: the reports use different protocols ({report['protocol']}, {baseline['protocol']})")
    cases = [c for c in report["cases"] if c in baseline["cases"]]

    def values(r: dict[str, Any], key: str) -> list[float]:
        return [abs(r["cases"][c][key]) if key in SIGNED else r["cases"][c][key] for c in cases]

    return [{"metric": f"|{key}|" if key in SIGNED else key,
             **paired_difference(values(report, key), values(baseline, key), higher_is_better=HIGHER_IS_BETTER[key],
                                 resamples=resamples, seed=seed)}
            for key in PROTOCOLS[report["protocol"]]]


def format_comparison(rows: Sequence[dict[str, Any]], name: str, baseline: str) -> str:
    lines = [f"paired comparison, {name} minus {baseline} (95 % bootstrap interval; Wilcoxon signed-rank p):",
             "metric".ljust(20) + "cases".rjust(6) + name[:14].rjust(15) + baseline[:14].rjust(15) + "difference".rjust(12)
             + "interval".rjust(24) + "p".rjust(9) + "better/worse".rjust(14)]
    for r in rows:
        interval = f"[{_cell(r['ci_low'])}, {_cell(r['ci_high'])}]"
        lines.append(r["metric"].ljust(20) + str(r["cases"]).rjust(6) + _cell(r["mean"]).rjust(15) + _cell(r["baseline_mean"]).rjust(15)
                     + _cell(r["difference"]).rjust(12) + interval.rjust(24) + _cell(r["p_value"]).rjust(9)
                     + f"{r['better']}/{r['worse']}".rjust(14))
    return "\n".join(lines)


def _json_safe(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    return v


#: the columns of the lesion table (``segpipe evaluate --lesions``)
LESION_COLUMNS = ("case", "kind", "id", "volume_ml", "detected", "predicted_fraction", "x_mm", "y_mm", "z_mm")


def write_report(report: dict[str, Any], json_path: str | os.PathLike | None = None, csv_path: str | os.PathLike | None = None,
                 lesions_path: str | os.PathLike | None = None) -> None:
    """JSON (NaN written as null), CSV (one row per case, then the mean) and the lesion table as CSV (one row
    per ground-truth lesion and per false-positive component)."""
    if json_path:
        out = {"cases": _json_safe(report["cases"]), "mean": _json_safe(report["mean"])}
        if report.get("min_lesion_mm3"):
            out["min_lesion_mm3"] = report["min_lesion_mm3"]
        if "sweep" in report:
            out["sweep"] = [{**r, "mean": _json_safe(r["mean"])} for r in report["sweep"]]
        if "lesions_by_size" in report:
            out["lesions_by_size"] = [_json_safe(r) for r in report["lesions_by_size"]]
        if "comparison" in report:
            out["comparison"] = {**{k: v for k, v in report["comparison"].items() if k != "metrics"},
                                 "metrics": [_json_safe(r) for r in report["comparison"]["metrics"]]}
        atomic_write_text(json_path, json.dumps(out, indent=2) + "\n")
    if lesions_path and "lesions" in report:
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(LESION_COLUMNS)
        for r in report["lesions"]:
            w.writerow([_cell(r[k]) for k in LESION_COLUMNS])
        atomic_write_text(lesions_path, buf.getvalue())
    if csv_path:
        keys = PROTOCOLS[report["protocol"]]
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["case", *keys])
        for cid, vals in report["cases"].items():
            w.writerow([cid, *(_cell(vals[k]) for k in keys)])
        w.writerow(["mean", *(_cell(report["mean"][k]) for k in keys)])
        atomic_write_text(csv_path, buf.getvalue())


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.6g}"
    return str(v)


def format_table(report: dict[str, Any]) -> str:
    keys = PROTOCOLS[report["protocol"]]
    width = max([len("mean"), *(len(c) for c in report["cases"])]) + 2
    lines = ["case".ljust(width) + "".join(k.rjust(18) for k in keys)]
    for cid, vals in [*report["cases"].items(), ("mean", report["mean"])]:
        lines.append(cid.ljust(width) + "".join(_cell(vals[k]).rjust(18) for k in keys))
    left_out = {k: sum(not math.isfinite(float(v[k])) for v in report["cases"].values()) for k in keys}
    if any(left_out.values()):  # a mean over fewer cases than the table shows must say so
        n = len(report["cases"])
        lines.append("(means leave out NaN and infinite values: " + ", ".join(f"{k} over {n - m} of {n} cases"
                                                                             for k, m in left_out.items() if m) + ")")
    if "sweep" in report:
        lines += ["", f"means after removing predicted lesions smaller than (mm^3); the table above: {report['min_lesion_mm3']:g}",
                  "min_lesion_mm3".ljust(16) + "removed".rjust(9) + "".join(k.rjust(18) for k in keys)]
        for r in report["sweep"]:
            lines.append(f"{r['min_lesion_mm3']:g}".ljust(16) + str(r["removed_lesions"]).rjust(9)
                         + "".join(_cell(r["mean"][k]).rjust(18) for k in keys))
        best = best_in_sweep(report)
        lines.append("best".ljust(25) + "".join((f"{best[k]:g}" if k in best else "-").rjust(18) for k in keys))
    if "lesions_by_size" in report:
        lines += ["", "lesions by size (ground truth; detected: one voxel of it predicted), and false positives of each size:"]
        for r in report["lesions_by_size"]:
            rate = "-" if math.isnan(r["sensitivity"]) else f"{100 * r['sensitivity']:.0f} %"
            lines.append(f"  {r['size']:>12}: {r['detected']:>5} of {r['lesions']:<5} detected ({rate:>5}); "
                         f"{r['false_positives']} false positives")
    return "\n".join(lines)
