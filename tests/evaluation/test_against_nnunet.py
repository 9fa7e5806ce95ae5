"""segpipe's Dice against nnU-Net's own evaluation, case for case, on the same files (skipped without nnU-Net,
which only the optional 'compare' extra installs: `pip install -e ".[compare]"`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from segpipe.data.layouts import discover


def _perturbed(fg: np.ndarray, k: int) -> np.ndarray:
    """Predictions an evaluation must tell apart: grown, shrunk, shifted, a lesion dropped, empty, exact."""
    ops = (ndimage.binary_dilation, ndimage.binary_erosion, lambda m: np.roll(m, 1, axis=0),
           lambda m: m & (ndimage.label(m)[0] != 1), np.zeros_like, lambda m: m)
    return ops[k % len(ops)](fg)


@pytest.mark.parametrize("kind", ["isles22", "wmh17"])
def test_dice_equals_nnunets(kind, synth_isles, synth_wmh, tmp_path, cli, nnunet):
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    m = discover(synth_isles if kind == "isles22" else synth_wmh)
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    gt_dir.mkdir(), pred_dir.mkdir()
    for k, case in enumerate(m.labelled):
        img = nib.load(str(m.label_path(case)))
        raw = np.asanyarray(img.dataobj)
        gt = (raw > 0.5).astype(np.uint8) if kind == "isles22" else np.rint(raw).astype(np.uint8)  # WMH keeps its 2
        nib.save(nib.Nifti1Image(gt, img.affine), str(gt_dir / f"{case.id}.nii.gz"))
        nib.save(nib.Nifti1Image(_perturbed(gt == 1, k).astype(np.uint8), img.affine), str(pred_dir / f"{case.id}.nii.gz"))
    r = cli("evaluate", "--pred", pred_dir, "--gt", gt_dir, "--protocol", kind, "--json", tmp_path / "ours.json")
    assert r.exit_code == 0, r.output
    ours = json.loads((tmp_path / "ours.json").read_text())["cases"]
    ignore = 2 if kind == "wmh17" else None  # WMH's "other pathology" is nnU-Net's ignore label
    for case in m.labelled:
        theirs = compute_metrics(os.fspath(gt_dir / f"{case.id}.nii.gz"), os.fspath(pred_dir / f"{case.id}.nii.gz"), SimpleITKIO(), [1],
                                 ignore_label=ignore)["metrics"][1]["Dice"]
        assert ours[case.id]["dice"] == pytest.approx(theirs, abs=1e-9), case.id
    assert len({round(v["dice"], 6) for v in ours.values()}) >= 3  # the perturbations did make different scores


def test_synthetic_labels_fit_nnunet_ignore_semantics(synth_wmh):
    """The WMH test above relies on label 2 being present, as in the real data."""
    m = discover(synth_wmh)
    values = set()
    for case in m.labelled:
        values |= set(np.unique(np.rint(np.asanyarray(nib.load(str(m.label_path(case))).dataobj))).astype(int).tolist())
    assert values == {0, 1, 2}
    assert Path(m.label_path(m.labelled[0])).name == "wmh.nii.gz"
