"""`segpipe evaluate`: the ISLES 2022, WMH 2017 and ISLES 2015 protocols against hand-computed values and the real case
(ISLES 2015's surface distances also against ITK itself: test_against_itk.py)."""

from __future__ import annotations

import json
import logging
import math

import nibabel as nib
import numpy as np
import pytest

from segpipe.errors import SegpipeError
from segpipe.evaluation.metrics import hausdorff95
from segpipe.evaluation.protocols import compare, evaluate, evaluate_isles15, evaluate_isles22, evaluate_wmh17
from tests.conftest import write_nifti


def test_isles22_hand_computed():
    gt = np.zeros((10, 10, 10), np.uint8)
    gt[1:3, 1:3, 1:3] = 1  # lesion A, 8 voxels
    gt[6:8, 6:8, 6:8] = 1  # lesion B, 8 voxels
    pred = np.zeros_like(gt)
    pred[1:3, 1:3, 1:2] = 1  # 4 voxels inside A
    pred[5, 0, 9] = 1  # a false positive component
    out = evaluate_isles22(gt, pred, voxel_ml=0.008)
    assert out["dice"] == pytest.approx(2 * 4 / (16 + 5))
    assert out["avd_ml"] == pytest.approx(11 * 0.008)
    assert out["lesion_count_diff"] == 0
    assert out["lesion_f1"] == pytest.approx(1 / (1 + (1 + 1) / 2))  # tp 1 (A), fn 1 (B), fp 1


def test_isles22_empty_conventions_and_diagonal_lesions():
    empty = np.zeros((5, 5, 5), np.uint8)
    assert evaluate_isles22(empty, empty, 0.001) == {"dice": 1.0, "avd_ml": 0.0, "lesion_count_diff": 0, "lesion_f1": 1.0}
    diag = empty.copy()
    diag[1, 1, 1] = diag[2, 2, 2] = 1  # one lesion with 26-connectivity
    assert evaluate_isles22(diag, empty, 0.001)["lesion_count_diff"] == 1


def test_isles22_real_sample_known_values(sample_dir):
    path = sample_dir / "derivatives" / "sub-strokecase0009" / "ses-0001" / "sub-strokecase0009_ses-0001_msk.nii.gz"
    img = nib.load(str(path))
    gt = np.asanyarray(img.dataobj)
    voxel_ml = float(np.prod(img.header.get_zooms())) / 1000
    assert evaluate_isles22(gt, gt, voxel_ml) == {"dice": 1.0, "avd_ml": 0.0, "lesion_count_diff": 0, "lesion_f1": 1.0}
    empty = evaluate_isles22(gt, np.zeros_like(gt), voxel_ml)
    assert empty["dice"] == 0 and empty["lesion_f1"] == 0 and empty["lesion_count_diff"] == 18
    assert empty["avd_ml"] == pytest.approx(4.184)


def _slab(z0, z1, shape=(12, 12, 10)):
    a = np.zeros(shape, np.uint8)
    a[3:9, 3:9, z0:z1] = 1
    return a


def test_wmh17_hausdorff_on_shifted_slabs_and_ignore_label():
    aff = np.diag([1.0, 1.0, 3.0, 1.0])
    gt = _slab(2, 7)
    pred = _slab(3, 8)  # one slice (3 mm) up: one fifth of each border 3 mm away
    out = evaluate_wmh17(gt, pred, aff)
    assert out["hd95"] == pytest.approx(3.0)
    assert out["dice"] == pytest.approx(2 * 4 / 10)
    assert out["avd_pct"] == pytest.approx(0.0)
    assert out["lesion_recall"] == 1.0 and out["lesion_f1"] == 1.0
    # label 2 in the ground truth: predictions there are removed before scoring
    gt2 = gt.copy()
    gt2[0:2, 0:2, 0:2] = 2
    pred2 = pred.copy()
    pred2[0:2, 0:2, 0:2] = 1
    assert evaluate_wmh17(gt2, pred2, aff) == out
    # a floating-point prediction is foreground from 0.5
    assert evaluate_wmh17(gt, pred.astype(np.float32) * 0.6, aff)["dice"] == pytest.approx(out["dice"])
    assert evaluate_wmh17(gt, pred.astype(np.float32) * 0.4, aff)["dice"] == 0.0
    # our generic metric agrees on this geometry
    assert hausdorff95(gt > 0, pred > 0, aff, inplane=True) == pytest.approx(3.0)


def test_wmh17_lesion_detection_hand_computed():
    gt = np.zeros((20, 20, 5), np.uint8)
    gt[1:3, 1:3, 1:3] = 1
    gt[10:12, 10:12, 1:3] = 1
    gt[15:17, 1:3, 1:3] = 1
    pred = np.zeros_like(gt)
    pred[1:3, 1:3, 1] = 1  # detects lesion 1
    pred[5:7, 15:17, 1] = 1  # a false detection
    out = evaluate_wmh17(gt, pred, np.eye(4))
    recall, precision = 1 / 3, 1 / 2
    assert out["lesion_recall"] == pytest.approx(recall)
    assert out["lesion_f1"] == pytest.approx(2 * precision * recall / (precision + recall))
    assert out["avd_pct"] == pytest.approx(abs(24 - 8) / 24 * 100)


def test_wmh17_empty_conventions(caplog):
    empty = np.zeros((6, 6, 4), np.uint8)
    some = empty.copy()
    some[2:4, 2:4, 1:3] = 1
    no_pred = evaluate_wmh17(some, empty, np.eye(4))
    assert math.isnan(no_pred["hd95"]) and no_pred["avd_pct"] == 100.0 and no_pred["lesion_recall"] == 0.0 and no_pred["dice"] == 0.0
    with caplog.at_level(logging.WARNING):
        no_gt = evaluate_wmh17(empty, some, np.eye(4), "c1")
    assert math.isnan(no_gt["hd95"]) and math.isnan(no_gt["avd_pct"])
    assert "c1" in caplog.text and "avd_pct" in caplog.text
    both = evaluate_wmh17(empty, empty, np.eye(4))
    assert math.isnan(both["dice"]) and both["lesion_recall"] == 1.0 and both["lesion_f1"] == 1.0
    # a prediction filling the image has no in-plane border (the erosion keeps the image's edges): the organisers'
    # KD-tree fails on it; NaN with a warning (it was "unexpected ValueError ... a bug in segpipe")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        full = evaluate_wmh17(some, np.ones_like(some), np.eye(4), "c2")
    assert math.isnan(full["hd95"]) and "c2" in caplog.text and "hd95" in caplog.text
    assert full["dice"] == pytest.approx(2 * 8 / (8 + some.size))


def _folders(tmp_path, cases):
    for cid, (gt, pred, zoom) in cases.items():
        aff = np.diag([*zoom, 1.0])
        write_nifti(tmp_path / "gt" / f"{cid}.nii.gz", gt, aff)
        if pred is not None:
            write_nifti(tmp_path / "pred" / f"{cid}.nii.gz", pred, aff)
    return tmp_path / "pred", tmp_path / "gt"


def test_isles15_hand_computed():
    """Two cubes offset by one voxel along x at 1 x 1 x 2 mm: every count and distance by hand."""
    gt = np.zeros((12, 10, 8), np.uint8)
    gt[2:6, 2:6, 2:6] = 1  # 64 voxels
    pred = np.zeros_like(gt)
    pred[3:7, 2:6, 2:6] = 1  # 64 voxels, 48 shared
    out = evaluate_isles15(gt, pred, np.diag([1.0, 1.0, 2.0, 1.0]))
    assert out["dice"] == pytest.approx(48 / 64)
    assert out["precision"] == pytest.approx(48 / 64) and out["recall"] == pytest.approx(48 / 64)
    assert out["volume_error_mm3"] == 0.0
    # borders: 56 voxels each (64 less the 2x2x2 core). From the ground truth's: its x = 2 face (16 voxels) lies
    # 1 mm outside the prediction, the middle of its x = 5 face (4 voxels) 1 mm inside the prediction's contour,
    # the rest on that contour (0); the same the other way round
    assert out["assd"] == pytest.approx(0.5 * (20 / 56 + 20 / 56))
    assert out["hd"] == pytest.approx(1.0)
    pred[3:7, 2:6, 6] = 1  # 16 more voxels, one 2 mm slice beyond the ground truth
    out = evaluate_isles15(gt, pred, np.diag([1.0, 1.0, 2.0, 1.0]))
    assert out["volume_error_mm3"] == pytest.approx(16 * 2.0)  # prediction minus ground truth, signed
    assert out["hd"] == pytest.approx(math.sqrt(1 + 2 ** 2))  # the corner (6, y, 6) to the ground truth's (5, y, 5)


def test_isles15_empty_conventions():
    """The program's: Dice, precision and recall 0 on empty masks (its 1e-20 in the denominators); distances 0
    when both are empty and infinite when one is; infinite values are left out of the means and written as
    null in JSON."""
    empty = np.zeros((6, 6, 6), np.uint8)
    one = empty.copy()
    one[2:4, 2:4, 2:4] = 1
    both = evaluate_isles15(empty, empty, np.eye(4))
    assert both == {"dice": 0.0, "assd": 0.0, "hd": 0.0, "precision": 0.0, "recall": 0.0, "volume_error_mm3": 0.0}
    missed = evaluate_isles15(one, empty, np.eye(4))
    assert math.isinf(missed["assd"]) and math.isinf(missed["hd"]) and missed["dice"] == 0.0
    assert missed["volume_error_mm3"] == -8.0 and math.isinf(evaluate_isles15(empty, one, np.eye(4))["hd"])


def test_isles15_report_skips_infinite_distances(cli, tmp_path):
    gt = _slab(2, 7)
    grown = _slab(2, 8)
    pred, gtd = _folders(tmp_path, {"a": (gt, grown, (1, 1, 3)), "b": (gt, np.zeros_like(gt), (1, 1, 3))})
    r = cli("evaluate", "--pred", pred, "--gt", gtd, "--protocol", "isles15", "--json", tmp_path / "r.json", "--csv", tmp_path / "r.csv")
    assert r.exit_code == 0, r.output
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["cases"]["b"]["assd"] is None and data["cases"]["b"]["hd"] is None  # infinite: null, valid JSON
    assert data["mean"]["hd"] == pytest.approx(data["cases"]["a"]["hd"]) == pytest.approx(3.0)  # one slice of 3 mm
    assert data["mean"]["dice"] == pytest.approx(data["cases"]["a"]["dice"] / 2)
    rows = (tmp_path / "r.csv").read_text().splitlines()
    assert rows[0] == "case,dice,assd,hd,precision,recall,volume_error_mm3" and rows[2].split(",")[2:4] == ["inf", "inf"]
    assert "inf" in r.output and "(means leave out NaN and infinite values: assd over 1 of 2 cases, hd over 1 of 2 cases)" in r.output


def test_isles15_real_sample_against_itself_and_empty(sample_dir):
    img = nib.load(str(next(sample_dir.glob("derivatives/**/*_msk.nii.gz"))))
    gt = np.asanyarray(img.dataobj)
    same = evaluate_isles15(gt, gt, img.affine)
    assert same["dice"] == pytest.approx(1.0) and same["assd"] == 0.0 and same["hd"] == 0.0 and same["volume_error_mm3"] == 0.0
    empty = evaluate_isles15(gt, np.zeros_like(gt), img.affine)
    assert empty["volume_error_mm3"] == pytest.approx(-4184.0)  # 523 voxels of 8 mm^3 (ISLES 2022's AVD: 4.184 ml)


def test_comparison_of_a_signed_metric_is_by_its_size():
    """A signed volume error is better when nearer 0, whatever its sign: an under-estimate of 5 beats an
    over-estimate of 10, and the row says it compares absolute values."""
    def report(errors):
        return {"protocol": "isles15", "cases": {f"c{i}": {"dice": 0.5, "assd": 1.0, "hd": 2.0, "precision": 0.5, "recall": 0.5,
                                                            "volume_error_mm3": e} for i, e in enumerate(errors)}}

    rows = {r["metric"]: r for r in compare(report([-5.0, -5.0, -4.0]), report([10.0, 12.0, 9.0]))}
    assert "volume_error_mm3" not in rows
    assert rows["|volume_error_mm3|"]["better"] == 3 and rows["|volume_error_mm3|"]["difference"] == pytest.approx(-17 / 3)


def test_cli_reports_and_json_layout(cli, tmp_path):
    gt = _slab(2, 7)
    pred, gtd = _folders(tmp_path, {"a": (gt, gt, (1, 1, 3)), "b": (gt, np.zeros_like(gt), (1, 1, 3))})
    r = cli("evaluate", "--pred", pred, "--gt", gtd, "--protocol", "wmh17", "--json", tmp_path / "r.json", "--csv", tmp_path / "r.csv")
    assert r.exit_code == 0, r.output
    data = json.loads((tmp_path / "r.json").read_text())
    assert set(data) == {"cases", "mean"} and set(data["cases"]) == {"a", "b"}
    assert data["cases"]["a"]["dice"] == 1.0 and data["cases"]["b"]["hd95"] is None  # NaN -> null
    assert data["mean"]["dice"] == pytest.approx(0.5) and data["mean"]["hd95"] == pytest.approx(0.0)
    rows = (tmp_path / "r.csv").read_text().splitlines()
    assert rows[0] == "case,dice,hd95,avd_pct,lesion_recall,lesion_f1" and rows[-1].startswith("mean,")


def test_cli_bad_input(cli, tmp_path):
    gt = _slab(2, 7)
    pred, gtd = _folders(tmp_path, {"a": (gt, gt, (1, 1, 3)), "b": (gt, None, (1, 1, 3))})
    write_nifti(pred / "zzz.nii.gz", gt, np.eye(4))
    r = cli("evaluate", "--pred", pred, "--gt", gtd)
    assert r.exit_code == 1 and "no prediction for case 'b'" in r.output and "no ground truth for predicted case 'zzz'" in r.output
    r = cli("evaluate", "--pred", pred, "--gt", gtd, "--ignore-missing")
    assert r.exit_code == 0 and "a " in r.output
    write_nifti(pred / "b.nii.gz", gt[:, :, :8], np.diag([1, 1, 3, 1.0]))
    r = cli("evaluate", "--pred", pred, "--gt", gtd, "--ignore-missing")
    assert r.exit_code == 1 and "(12, 12, 8)" in r.output and "(12, 12, 10)" in r.output and "Traceback" not in r.output
    r = cli("evaluate", "--pred", pred, "--gt", gtd, "--protocol", "isles2022")
    assert r.exit_code == 2 and "did you mean 'isles22'" in r.output
    with pytest.raises(SegpipeError, match="--pred"):
        evaluate(tmp_path / "nothing", gtd, "isles22")
    # a report path that is a folder: refused before the scoring (it failed after it with IsADirectoryError)
    for option in ("--json", "--csv"):
        r = cli("evaluate", "--pred", pred, "--gt", gtd, "--ignore-missing", option, tmp_path)
        assert r.exit_code == 1 and f"{option} '{tmp_path}': expected a file to write, found a folder" in r.output
        assert "Traceback" not in r.output and "case" not in r.output.split("error:")[0]


@pytest.mark.parametrize("protocol", ["isles22", "wmh17"])
def test_cases_scored_in_processes_give_the_same_report(tmp_path, protocol):
    rng = np.random.default_rng(3)
    cases = {}
    for k in range(5):
        gt = (rng.random((14, 12, 10)) > 0.8).astype(np.uint8)
        gt[2:6, 2:6, 2:5] = 1
        pred = np.where(rng.random(gt.shape) > 0.15, gt, 1 - gt).astype(np.uint8)
        cases[f"c{k}"] = (gt, pred, (1, 1, 2))
    pred_dir, gt_dir = _folders(tmp_path, cases)
    serial = evaluate(pred_dir, gt_dir, protocol, min_lesion_mm3=(0, 3), workers=1)
    parallel = evaluate(pred_dir, gt_dir, protocol, min_lesion_mm3=(0, 3), workers=3)
    assert json.dumps(serial, sort_keys=True) == json.dumps(parallel, sort_keys=True)
    assert list(parallel["cases"]) == sorted(cases)  # the cases' order, not the order the processes finished in
    assert parallel["sweep"][1]["removed_lesions"] > 0
    with pytest.raises(SegpipeError, match="--workers: expected at least 1"):
        evaluate(pred_dir, gt_dir, protocol, workers=0)


def test_a_bad_case_in_a_scoring_process_is_the_commands_one_line(cli, tmp_path):
    gt = _slab(2, 7)
    pred, gtd = _folders(tmp_path, {"a": (gt, gt, (1, 1, 3)), "b": (gt, gt, (1, 1, 3)), "c": (gt, gt, (1, 1, 3))})
    write_nifti(pred / "b.nii.gz", gt[:, :, :8], np.diag([1, 1, 3, 1.0]))
    with pytest.raises(SegpipeError, match=r"case 'b': prediction .*\(12, 12, 8\)"):
        evaluate(pred, gtd, "isles22", workers=3)
    r = cli("evaluate", "--pred", pred, "--gt", gtd, "--workers", "2")
    assert r.exit_code == 1 and "case 'b'" in r.output and "Traceback" not in r.output
    r = cli("evaluate", "--pred", pred, "--gt", gtd, "--workers", "0")
    assert r.exit_code == 2 and "--workers" in r.output


def test_min_lesion_sweep_hand_computed(cli, tmp_path):
    gt = np.zeros((12, 12, 10), np.uint8)
    gt[2:4, 2:4, 2:4] = 1  # one lesion of 8 mm^3
    pred = gt.copy()
    pred[9, 9, 8] = 1  # a false positive of 1 mm^3
    pred_dir, gt_dir = _folders(tmp_path, {"a": (gt, pred, (1, 1, 1))})
    r = cli("evaluate", "--pred", pred_dir, "--gt", gt_dir, "--min-lesion-mm3", "0,2,10", "--json", tmp_path / "r.json")
    assert r.exit_code == 0, r.output
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["cases"]["a"]["lesion_f1"] == pytest.approx(2 / 3)  # the table is the first size: nothing removed
    sweep = {row["min_lesion_mm3"]: row for row in data["sweep"]}
    assert sweep[0.0]["removed_lesions"] == 0 and sweep[2.0]["removed_lesions"] == 1 and sweep[10.0]["removed_lesions"] == 2
    assert sweep[2.0]["mean"]["lesion_f1"] == 1.0 and sweep[2.0]["mean"]["dice"] == 1.0
    assert sweep[10.0]["mean"]["dice"] == 0.0  # the true lesion went too
    best = next(line for line in r.output.splitlines() if line.startswith("best")).split()
    assert best[1:] == ["2", "2", "2", "2"]  # dice, avd_ml, lesion count difference, F1
    for bad in ("-1", "x", "5,5"):
        r = cli("evaluate", "--pred", pred_dir, "--gt", gt_dir, "--min-lesion-mm3", bad)
        assert r.exit_code == 2 and "--min-lesion-mm3" in r.output and "Traceback" not in r.output, r.output


def test_min_lesion_sweep_equals_infer_removing_them(cli, tiny_model, tiny_cache, tmp_path):
    manifest = tiny_cache.parent / "m.json"
    for size in ("0", "40"):
        # --save-probabilities: infer's output folder, <case>_probabilities files included, is evaluated as it is
        r = cli("infer", "--model", tiny_model, manifest, "--out", tmp_path / f"p{size}", "--no-tta", "--min-lesion-mm3", size,
                *(["--save-probabilities"] if size == "0" else []))
        assert r.exit_code == 0, r.output
    assert list((tmp_path / "p0").glob("*_probabilities.nii.gz"))
    swept = evaluate(tmp_path / "p0", manifest, "isles22", min_lesion_mm3=[0, 40])
    direct = evaluate(tmp_path / "p40", manifest, "isles22")
    assert swept["sweep"][1]["removed_lesions"] > 0
    assert swept["sweep"][1]["mean"] == direct["mean"]
    assert swept["sweep"][0]["mean"] == swept["mean"] != direct["mean"]


def test_ground_truth_from_a_dataset_folder(cli, synth_isles, tmp_path):
    from segpipe.data.layouts import discover

    m = discover(synth_isles)
    pred = tmp_path / "pred"
    pred.mkdir()
    for case in m.labelled:  # the masks themselves as predictions: Dice 1
        (pred / f"{case.id}.nii.gz").write_bytes(m.label_path(case).read_bytes())
    r = cli("evaluate", "--pred", pred, "--gt", synth_isles, "--json", tmp_path / "r.json")
    assert r.exit_code == 0, r.output
    data = json.loads((tmp_path / "r.json").read_text())
    assert len(data["cases"]) == 3 and data["mean"]["dice"] == 1.0
    (tmp_path / "nothing").mkdir()
    r = cli("evaluate", "--pred", pred, "--gt", tmp_path / "nothing")
    assert r.exit_code == 1 and "not a dataset of a known layout" in r.output and "Traceback" not in r.output


def test_isles22_warns_about_a_probability_map(tmp_path, caplog):
    """The ISLES 2022 protocol counts every non-zero voxel, so a probability map scored by mistake (segpipe infer's
    _probabilities file) is all lesion: the numbers stay the official ones, a warning names the file."""
    gt = _slab(2, 7)
    prob = np.where(gt > 0, 0.9, 0.05).astype(np.float32)
    pred, gtd = _folders(tmp_path, {"a": (gt, prob, (1, 1, 1)), "b": (gt, gt.astype(np.float32), (1, 1, 1))})
    with caplog.at_level(logging.WARNING):
        report = evaluate(pred, gtd, "isles22")
    assert report["cases"]["a"]["dice"] < 0.5 and report["cases"]["b"]["dice"] == 1.0  # the official binarisation
    warned = [r.getMessage() for r in caplog.records if "fractional values" in r.getMessage()]
    assert len(warned) == 1 and "case 'a'" in warned[0] and "a.nii.gz" in warned[0]


@pytest.mark.parametrize("protocol", ["isles22", "wmh17"])
def test_ground_truth_as_metaimage_or_nrrd_scores_as_nifti(tmp_path, protocol):
    """Masks drawn in 3D Slicer or ITK-SNAP (NRRD, MetaImage) and ISLES 2015's .mha labels were refused as
    ground truth ('no NIfTI masks named by case id'), and read by nibabel alone when a manifest named them.
    Written by SimpleITK from the NIfTI ones (LPS on disk), they score as the NIfTI ones, number for number."""
    import SimpleITK as sitk

    rng = np.random.default_rng(5)
    cases = {}
    for k in range(3):
        gt = np.zeros((14, 12, 10), np.uint8)
        gt[2 + k:7, 3:8, 2:6] = 1
        pred = np.where(rng.random(gt.shape) > 0.1, gt, 0).astype(np.uint8)
        cases[f"c{k}"] = (gt, pred, (0.9, 1.1, 3.0))
    pred, gtd = _folders(tmp_path, cases)
    other = tmp_path / "gt_other"
    other.mkdir()
    for cid, suffix in zip(cases, (".mha", ".nrrd", ".mha")):
        sitk.WriteImage(sitk.ReadImage(str(gtd / f"{cid}.nii.gz")), str(other / f"{cid}{suffix}"))
    want = evaluate(pred, gtd, protocol)
    got = evaluate(pred, other, protocol)
    assert list(got["cases"]) == list(want["cases"]) and want["mean"]["dice"] > 0.5
    for cid, metrics in want["cases"].items():  # the voxel size comes in float64 here: the last digit of a volume may differ
        assert got["cases"][cid] == pytest.approx(metrics, rel=1e-9, nan_ok=True), cid
    # a NIfTI mask of the same case id is taken before the others
    write_nifti(other / "c0.nii.gz", np.zeros((14, 12, 10), np.uint8), np.diag([0.9, 1.1, 3.0, 1.0]))
    assert evaluate(pred, other, "isles22")["cases"]["c0"]["dice"] == 0.0
    # a damaged one is one line naming it
    (other / "c1.nrrd").write_bytes(b"NRRD0004\nnot really\n")
    with pytest.raises(SegpipeError, match=r"ground truth '.*c1.nrrd': cannot be read"):
        evaluate(pred, other, "isles22", workers=1)


def _dicom_case(tmp_path):
    """A DICOM series (8 slices), its grid, and a function writing a mask as a viewer's SEG on it."""
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    from segpipe.io.dicom import find_series, read_series, write_dicom_series

    affine = np.array([[-0.9, 0, 0, 60.0], [0, -0.9, 0, 50.0], [0, 0, 3.0, -20.0], [0, 0, 0, 1]])
    image = np.random.default_rng(0).random((20, 18, 8)).astype(np.float32) * 100
    write_dicom_series(image, affine, tmp_path / "dicom", description="t2_flair", series_number=3, study_uid=generate_uid(),
                       frame_uid=generate_uid())
    info = find_series(tmp_path / "dicom")[0]
    volume, files, index = read_series(info, [str(f) for f in sorted((tmp_path / "dicom").iterdir())])
    sources = [pydicom.dcmread(f) for f in files]

    def write_seg(mask, path):
        """as a viewer writes it: frames in the files' order, empty ones left out; returns the frames kept"""
        frames = np.transpose(mask[:, :, index], (2, 1, 0))
        desc = hd.seg.SegmentDescription(1, "lesion", codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Lesion,
                                         hd.seg.SegmentAlgorithmTypeValues.MANUAL)
        seg = hd.seg.Segmentation(sources, frames, hd.seg.SegmentationTypeValues.BINARY, [desc], generate_uid(), 9, generate_uid(),
                                  1, "hospital", "viewer", "1", "0", omit_empty_frames=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        seg.save_as(path)
        return int(seg.NumberOfFrames)

    return volume, write_seg


def test_ground_truth_as_dicom_seg(tmp_path):
    """Annotations drawn on the DICOM images (OHIF, 3D Slicer, MONAI Label export DICOM SEG, often without the
    empty frames) score against NIfTI predictions on that series' grid as the same mask in NIfTI does; a SEG
    of another grid is one line; segpipe's own <case>_sr.dcm reports are not taken for masks."""
    volume, write_seg = _dicom_case(tmp_path)
    gt = np.zeros(volume.array.shape, np.uint8)
    gt[4:9, 5:10, 2:4] = 1
    gt[14:16, 3:5, 6] = 1
    pred = gt.copy()
    pred[4:9, 5:10, 4] = 1  # one slice too many
    write_nifti(tmp_path / "pred" / "c1.nii.gz", pred, volume.affine)
    write_nifti(tmp_path / "gt_nifti" / "c1.nii.gz", gt, volume.affine)
    assert write_seg(gt, tmp_path / "gt" / "c1_seg.dcm") == 3  # of 8 slices
    (tmp_path / "gt" / "c1_sr.dcm").write_bytes(b"a report, not a mask")
    want = evaluate(tmp_path / "pred", tmp_path / "gt_nifti", "isles22")["cases"]["c1"]
    got = evaluate(tmp_path / "pred", tmp_path / "gt", "isles22")["cases"]["c1"]
    assert got == pytest.approx(want) and 0.5 < got["dice"] < 1.0
    # a SEG of another series' grid (shifted by half a voxel): refused, naming it
    write_nifti(tmp_path / "pred" / "c1.nii.gz", pred, volume.affine @ np.array([[1, 0, 0, 0.5], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]))
    with pytest.raises(SegpipeError, match=r"ground truth '.*c1_seg.dcm': its frames do not lie on the grid"):
        evaluate(tmp_path / "pred", tmp_path / "gt", "isles22", workers=1)
    (tmp_path / "gt" / "c1_seg.dcm").write_bytes(b"not DICOM at all")
    with pytest.raises(SegpipeError, match=r"ground truth '.*c1_seg.dcm': not a readable DICOM SEG"):
        evaluate(tmp_path / "pred", tmp_path / "gt", "isles22", workers=1)


@pytest.mark.parametrize("protocol", ["isles22", "wmh17"])
def test_predictions_as_dicom_seg_score_as_nifti(tmp_path, protocol):
    """Another tool's results as DICOM SEG (a vendor's AI, a viewer) score as the same masks in NIfTI do, against
    NIfTI or DICOM SEG ground truth. Two SEGs that store different frames are compared on the grid holding both:
    a false positive on a slice the ground truth's SEG leaves out still counts."""
    volume, write_seg = _dicom_case(tmp_path)
    gt = np.zeros(volume.array.shape, np.uint8)
    gt[4:9, 5:10, 2:4] = 1
    gt[14:16, 3:5, 5] = 1
    pred = gt.copy()
    pred[4:9, 5:10, 4] = 1
    pred[12:14, 12:15, 0] = 1  # a false positive on a slice outside the ground truth's frames (2-5)
    pred[14:16, 3:5, 5] = 0  # a missed lesion
    for name, mask in (("pred_nifti", pred), ("gt_nifti", gt)):
        write_nifti(tmp_path / name / "c1.nii.gz", mask, volume.affine)
    assert write_seg(pred, tmp_path / "pred_seg" / "c1.dcm") == 4
    assert write_seg(gt, tmp_path / "gt_seg" / "c1_seg.dcm") == 3
    want = evaluate(tmp_path / "pred_nifti", tmp_path / "gt_nifti", protocol)["cases"]["c1"]
    assert 0.3 < want["dice"] < 0.9 and want["lesion_f1"] < 1
    for gt_dir in ("gt_nifti", "gt_seg"):
        got = evaluate(tmp_path / "pred_seg", tmp_path / gt_dir, protocol, workers=1)["cases"]["c1"]
        assert got == pytest.approx(want, nan_ok=True), gt_dir
    # both SEGs, but of different series (the prediction's drawn on a shifted grid): one line naming the files
    shifted = tmp_path / "shifted"
    _, write_other = _dicom_case(shifted)
    import pydicom

    write_other(pred, tmp_path / "pred_other" / "c1.dcm")
    ds = pydicom.dcmread(tmp_path / "pred_other" / "c1.dcm")
    for item in ds.PerFrameFunctionalGroupsSequence:
        pos = item.PlanePositionSequence[0].ImagePositionPatient
        item.PlanePositionSequence[0].ImagePositionPatient = [float(pos[0]) + 0.45, pos[1], pos[2]]
    ds.save_as(tmp_path / "pred_other" / "c1.dcm")
    with pytest.raises(SegpipeError, match=r"ground truth '.*c1_seg.dcm': its frames do not lie on the grid of prediction '.*c1.dcm'"):
        evaluate(tmp_path / "pred_other", tmp_path / "gt_seg", protocol, workers=1)


def test_lesion_table_hand_computed(cli, tmp_path):
    """--lesions: every ground-truth lesion (volume, detected, share predicted, centre in mm) and every false
    positive, consistent with the lesion-wise F1; the detection rate by size. Voxels of 2 mm: 0.008 ml."""
    gt = np.zeros((20, 20, 20), np.uint8)
    pred = np.zeros_like(gt)
    gt[1, 1, 1] = 1  # 1 voxel, missed
    gt[5:7, 5:7, 5:7] = 1  # 8 voxels, half predicted
    pred[5:7, 5:7, 5] = 1
    gt[10:13, 10:13, 10:13] = 1  # 27 voxels, all predicted
    pred[10:13, 10:13, 10:13] = 1
    pred[16, 16, 16:18] = 1  # a false positive of 2 voxels
    pred_dir, gt_dir = _folders(tmp_path, {"c1": (gt, pred, (2, 2, 2))})
    r = cli("evaluate", "--pred", pred_dir, "--gt", gt_dir, "--lesions", tmp_path / "lesions.csv", "--json", tmp_path / "r.json")
    assert r.exit_code == 0, r.output
    rows = (tmp_path / "lesions.csv").read_text().splitlines()
    assert rows[0] == "case,kind,id,volume_ml,detected,predicted_fraction,x_mm,y_mm,z_mm"
    table = [row.split(",") for row in rows[1:]]
    assert [(t[1], float(t[3]), int(t[4]), float(t[5])) for t in table] == [
        ("lesion", 0.008, 0, 0.0), ("lesion", 0.064, 1, 0.5), ("lesion", 0.216, 1, 1.0), ("false_positive", 0.016, 0, 1.0)]
    assert [float(v) for v in table[2][6:]] == [22.0, 22.0, 22.0]  # the 27-voxel cube's centre: voxel 11, 2 mm each
    assert [float(v) for v in table[3][6:]] == [32.0, 32.0, 33.0]
    report = json.loads((tmp_path / "r.json").read_text())
    tp, fn, fp = 2, 1, 1
    assert report["cases"]["c1"]["lesion_f1"] == pytest.approx(tp / (tp + (fp + fn) / 2))
    by_size = {b["size"]: b for b in report["lesions_by_size"]}
    assert by_size["< 0.01 ml"] == {"size": "< 0.01 ml", "lesions": 1, "detected": 0, "sensitivity": 0.0, "false_positives": 0}
    assert by_size["0.01-0.1 ml"]["detected"] == 1 and by_size["0.01-0.1 ml"]["false_positives"] == 1
    assert by_size["1-10 ml"]["sensitivity"] is None  # no lesion of that size: null, not 0
    assert "0.1-1 ml:     1 of 1     detected (100 %)" in r.output


def test_lesion_table_wmh_leaves_out_other_pathology(tmp_path):
    """WMH 2017: label 2 (other pathology) is neither a lesion nor, where predicted, a false positive; the
    table is the same whether the cases are scored in one process or several."""
    gt = np.zeros((16, 16, 8), np.uint8)
    gt[2:4, 2:4, 2:4] = 1
    gt[8:12, 8:12, 2:5] = 2
    pred = np.zeros_like(gt)
    pred[2:4, 2:4, 2] = 1
    pred[9:11, 9:11, 3] = 1  # inside label 2: ignored
    pred[14, 14, 6] = 1  # a false positive
    pred_dir, gt_dir = _folders(tmp_path, {"a": (gt, pred, (1, 1, 3)), "b": (gt, np.zeros_like(gt), (1, 1, 3))})
    one = evaluate(pred_dir, gt_dir, "wmh17", lesions=True, workers=1)
    two = evaluate(pred_dir, gt_dir, "wmh17", lesions=True, workers=2)
    assert one["lesions"] == two["lesions"]
    kinds = [(r["case"], r["kind"], r["detected"]) for r in one["lesions"]]
    assert kinds == [("a", "lesion", 1), ("a", "false_positive", 0), ("b", "lesion", 0)]
    assert one["lesions"][0]["predicted_fraction"] == pytest.approx(0.5)


def test_paired_comparison_with_a_baseline(cli, tmp_path):
    """--baseline: the same cases scored for a second set of predictions, and per metric the mean difference,
    its bootstrap interval, the Wilcoxon p-value (SciPy's, on the per-case differences) and the cases each side
    wins, in the metric's direction."""
    from scipy.stats import wilcoxon

    rng = np.random.default_rng(0)
    cases = {}
    for k in range(8):
        gt = np.zeros((16, 16, 8), np.uint8)
        gt[4:12, 4:12, 2:6] = 1
        better = gt.copy()
        better[4:12, 4:4 + (k % 3), 2:6] = 0  # a little missed
        worse = gt.copy()
        worse[4:12, 4:7 + (k % 4), 2:6] = 0  # more missed
        worse[14, 14, int(rng.integers(0, 8))] = 1  # and a false positive
        cases[f"c{k}"] = (gt, better, worse)
    for cid, (gt, a, b) in cases.items():
        write_nifti(tmp_path / "gt" / f"{cid}.nii.gz", gt, np.eye(4))
        write_nifti(tmp_path / "model_a" / f"{cid}.nii.gz", a, np.eye(4))
        write_nifti(tmp_path / "model_b" / f"{cid}.nii.gz", b, np.eye(4))
    r = cli("evaluate", "--pred", tmp_path / "model_a", "--baseline", tmp_path / "model_b", "--gt", tmp_path / "gt",
            "--json", tmp_path / "r.json")
    assert r.exit_code == 0, r.output
    assert "paired comparison, model_a minus model_b" in r.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["comparison"]["baseline"] == str(tmp_path / "model_b")
    rows = {m["metric"]: m for m in report["comparison"]["metrics"]}
    a = evaluate(tmp_path / "model_a", tmp_path / "gt", "isles22")["cases"]
    b = evaluate(tmp_path / "model_b", tmp_path / "gt", "isles22")["cases"]
    d = np.array([a[c]["dice"] - b[c]["dice"] for c in sorted(a)])
    dice_row = rows["dice"]
    assert dice_row["cases"] == 8 and dice_row["difference"] == pytest.approx(d.mean()) and dice_row["better"] == 8
    assert dice_row["p_value"] == pytest.approx(wilcoxon(d).pvalue) and dice_row["p_value"] < 0.01
    assert dice_row["ci_low"] <= d.mean() <= dice_row["ci_high"] and dice_row["ci_low"] > 0
    # lower is better for the volume difference: model_a wins there too
    assert rows["avd_ml"]["difference"] < 0 and rows["avd_ml"]["better"] == 8 and rows["avd_ml"]["worse"] == 0
    # the same predictions against themselves: no difference, p = 1
    r = cli("evaluate", "--pred", tmp_path / "model_a", "--baseline", tmp_path / "model_a", "--gt", tmp_path / "gt",
            "--json", tmp_path / "same.json")
    same = {m["metric"]: m for m in json.loads((tmp_path / "same.json").read_text())["comparison"]["metrics"]}
    assert same["dice"]["difference"] == 0 and same["dice"]["p_value"] == 1 and same["dice"]["better"] == same["dice"]["worse"] == 0
    r = cli("evaluate", "--pred", tmp_path / "model_a", "--baseline", tmp_path / "nope", "--gt", tmp_path / "gt")
    assert r.exit_code == 1 and "--baseline '" in r.output and "found nothing there" in r.output
    (tmp_path / "model_b" / "c3.nii.gz").unlink()  # the baseline misses a case: named, as for --pred
    r = cli("evaluate", "--pred", tmp_path / "model_a", "--baseline", tmp_path / "model_b", "--gt", tmp_path / "gt")
    assert r.exit_code == 1 and "no prediction for case 'c3'" in r.output and "Traceback" not in r.output


def test_loss_study_pairs_each_boundary_loss_with_its_regional_loss_case_by_case():
    """The loss study's paired analysis: the same held-out case under the same seed is a pair, over all seeds;
    NaN (HD95 of an empty prediction) pairs are left out."""
    from scipy.stats import wilcoxon

    from benchmarks.loss_study import paired

    def entry(dice_cases, hd_cases):
        return {"dice": {"cases": dice_cases}, "hd95": {"cases": hd_cases}, "lesion_f1": {"cases": dice_cases}}

    table = {"dice": entry([[0.5, 0.6, 0.7], [0.55, 0.65, 0.75]], [[5.0, 4.0, math.nan], [5.5, 4.5, 3.5]]),
             "dice+boundary": entry([[0.6, 0.6, 0.8], [0.65, 0.7, 0.7]], [[4.0, 4.5, 3.0], [5.0, math.nan, 3.0]])}
    rows = {r["metric"]: r for r in paired({"datasets": {"isles": table}})["isles"]}
    d = np.array([0.1, 0.0, 0.1, 0.1, 0.05, -0.05])
    assert rows["dice"]["cases"] == 6 and rows["dice"]["difference"] == pytest.approx(d.mean())
    assert rows["dice"]["p_value"] == pytest.approx(wilcoxon(d).pvalue) and (rows["dice"]["better"], rows["dice"]["worse"]) == (4, 1)
    assert rows["hd95"]["cases"] == 4 and rows["hd95"]["better"] == 3  # lower is better; two NaN pairs left out
    assert all(r["loss"] == "dice+boundary" and r["baseline"] == "dice" for r in rows.values())


def test_protocol_auto_follows_the_datasets_layout(cli, tmp_path, nifti, synth_wmh, synth_isles):
    """--protocol auto (the default): a WMH 2017 dataset is scored with wmh17, an ISLES 2015 one with isles15,
    ISLES 2022 and folders of masks with isles22; the choice is said."""
    from segpipe.data.layouts import discover
    from segpipe.data.manifest import write_manifest
    from segpipe.evaluation.protocols import protocol_for
    from tests.data.test_layouts import _isles15_tree

    assert protocol_for(synth_wmh) == ("wmh17", "wmh17")
    assert protocol_for(synth_isles) == ("isles22", "isles22")
    write_manifest(discover(synth_wmh), tmp_path / "wmh.json")
    assert protocol_for(tmp_path / "wmh.json") == ("wmh17", "wmh17")
    gt = _slab(2, 7)
    pred, gtd = _folders(tmp_path, {"a": (gt, gt, (1, 1, 3))})
    assert protocol_for(gtd) == ("isles22", None)
    root = _isles15_tree(tmp_path / "siss", nifti)
    (tmp_path / "siss_pred").mkdir()
    for case in discover(root).labelled:
        write_nifti(tmp_path / "siss_pred" / f"{case.id}.nii.gz", np.zeros((4, 4, 4), np.uint8), np.eye(4))
    r = cli("evaluate", "--pred", tmp_path / "siss_pred", "--gt", root)
    assert r.exit_code == 0, r.output
    assert "protocol isles15 (the ground truth is a dataset of the isles15 layout)" in r.output and "volume_error_mm3" in r.output
    r = cli("evaluate", "--pred", pred, "--gt", gtd, "--protocol", "isles2015")
    assert r.exit_code == 2 and "auto, isles22, wmh17, isles15" in r.output and "did you mean 'isles15'" in r.output
