"""Dataset discovery for every layout, on small trees with the official names and on the real sample."""

from __future__ import annotations

from pathlib import Path

import pytest

from segpipe.data.layouts import LAYOUTS, discover
from segpipe.errors import SegpipeError, UsageError


def _isles15_tree(root: Path, nifti, nest: str = "") -> Path:
    """SISS 2015: <n>/VSD.Brain.XX.O.MR_<mod>.<id>/VSD.Brain.XX.O.MR_<mod>.<id>.nii, OT label."""
    base = root / "SISS2015_Training" / nest if nest else root / "SISS2015_Training"
    uid = 70600
    for case in ("1", "2", "10"):
        for tok in ("MR_Flair", "MR_T1", "MR_T2", "MR_DWI", "OT"):
            uid += 1  # ids deliberately unordered against the modalities: matching must not use them
            prefix = "VSD.Brain_3more.XX.O" if tok == "OT" else "VSD.Brain.XX.O"
            name = f"{prefix}.{tok}.{uid}"
            nifti(base / case / name / f"{name}.nii")
    return root


def _isles18_tree(root: Path, nifti) -> Path:
    uid = 345000
    for case in ("case_1", "case_2"):
        for tok in ("CT", "CT_4DPWI", "CT_CBF", "CT_CBV", "CT_MTT", "CT_Tmax", "OT"):
            uid += 1
            name = f"SMIR.Brain.XX.O.{tok}.{uid}"
            nifti(root / "TRAINING" / case / name / f"{name}.nii")
    return root


def _isles22_sample_tree(root: Path, nifti, with_label=True) -> Path:
    for sub in ("sub-strokecase0001", "sub-strokecase0002"):
        d = root / "rawdata" / sub / "ses-0001"
        for mod in ("dwi", "adc", "flair"):
            nifti(d / f"{sub}_ses-0001_{mod}.nii.gz")
        if with_label:
            nifti(root / "derivatives" / sub / "ses-0001" / f"{sub}_ses-0001_msk.nii.gz")
    return root


def test_isles22_zenodo_layout(synth_isles):
    m = discover(synth_isles, "isles22")
    assert [c.id for c in m.cases] == ["sub-strokecase0001", "sub-strokecase0002", "sub-strokecase0003"]
    c = m.cases[0]
    assert c.images["flair"].endswith("anat/sub-strokecase0001_ses-0001_FLAIR.nii.gz")
    assert c.images["dwi"].endswith("dwi/sub-strokecase0001_ses-0001_dwi.nii.gz")
    assert c.images["adc"].endswith("dwi/sub-strokecase0001_ses-0001_adc.nii.gz")
    assert c.label.startswith("ISLES-2022/derivatives/")
    assert m.channels == ("dwi", "adc", "flair")
    assert all(m.image_path(c, ch).is_file() for c in m.cases for ch in m.channels)


def test_isles22_sample_layout_lower_case(tmp_path, nifti):
    m = discover(_isles22_sample_tree(tmp_path, nifti), "auto")
    assert m.layout == "isles22"
    assert len(m.cases) == 2 and all(c.label for c in m.cases)


def test_isles22_real_sample(sample_dir):
    m = discover(sample_dir)
    assert m.layout == "isles22"
    assert [c.id for c in m.cases] == ["sub-strokecase0009"]
    case = m.cases[0]
    assert case.images == {
        "dwi": "rawdata/sub-strokecase0009/ses-0001/sub-strokecase0009_ses-0001_dwi.nii.gz",
        "adc": "rawdata/sub-strokecase0009/ses-0001/sub-strokecase0009_ses-0001_adc.nii.gz",
        "flair": "rawdata/sub-strokecase0009/ses-0001/sub-strokecase0009_ses-0001_flair.nii.gz",
    }
    assert case.label == "derivatives/sub-strokecase0009/ses-0001/sub-strokecase0009_ses-0001_msk.nii.gz"


def test_isles15_matches_tokens_not_ids(tmp_path, nifti):
    m = discover(_isles15_tree(tmp_path, nifti), "auto")
    assert m.layout == "isles15"
    assert [c.id for c in m.cases] == ["1", "10", "2"]
    for c in m.cases:
        for ch, tok in (("flair", "MR_Flair"), ("t1", "MR_T1."), ("t2", "MR_T2"), ("dwi", "MR_DWI")):
            assert tok in c.images[ch]
        assert ".OT." in c.label


def test_isles15_tolerates_extra_nesting(tmp_path, nifti):
    m = discover(_isles15_tree(tmp_path, nifti, nest="SISS2015_Training"), "isles15")
    assert len(m.cases) == 3 and all(c.label for c in m.cases)


def test_isles18(tmp_path, nifti):
    m = discover(_isles18_tree(tmp_path, nifti), "auto")
    assert m.layout == "isles18"
    assert m.channels == ("ct", "cbf", "cbv", "mtt", "tmax")
    c = m.cases[0]
    assert ".CT." in c.images["ct"] and "CT_Tmax" in c.images["tmax"] and "4DPWI" not in str(c.images)
    assert ".OT." in c.label


def test_wmh17_sites_and_ignore_label(synth_wmh):
    m = discover(synth_wmh, "auto")
    assert m.layout == "wmh17"
    assert m.label.ignore_value == 2
    assert sorted(c.id for c in m.cases) == ["0", "100", "50"]
    sites = {c.id: c.meta.get("site") for c in m.cases}
    assert sites == {"0": "Utrecht", "50": "Singapore", "100": "GE3T"}
    ge = m.case("100")
    assert ge.images["flair"] == "Amsterdam/GE3T/100/pre/FLAIR.nii.gz" and ge.label == "Amsterdam/GE3T/100/wmh.nii.gz"


def test_channels_pick_and_order(synth_isles):
    m = discover(synth_isles, "isles22", ["flair", "dwi"])
    assert m.channels == ("flair", "dwi")
    assert set(m.cases[0].images) == {"flair", "dwi"}


def test_unknown_channel_suggests(synth_isles):
    with pytest.raises(UsageError, match=r"did you mean 'flair'"):
        discover(synth_isles, "isles22", ["flar"])


def test_unknown_layout_suggests(tmp_path):
    with pytest.raises(UsageError, match=r"did you mean 'isles22'"):
        discover(tmp_path, "isles2022")


def test_auto_reports_every_layout_tried(tmp_path, nifti):
    nifti(tmp_path / "random" / "image.nii.gz")
    with pytest.raises(SegpipeError) as info:
        discover(tmp_path)
    text = str(info.value)
    for name in LAYOUTS:
        assert name in text
    assert "pre/{FLAIR,T1}.nii.gz" in text


def test_missing_channel_reported_for_every_case(tmp_path, nifti):
    root = _isles22_sample_tree(tmp_path, nifti)
    for sub in ("sub-strokecase0001", "sub-strokecase0002"):
        (root / "rawdata" / sub / "ses-0001" / f"{sub}_ses-0001_adc.nii.gz").unlink()
    with pytest.raises(SegpipeError) as info:
        discover(root)
    assert "2 problems" in str(info.value)
    assert "sub-strokecase0001" in str(info.value) and "sub-strokecase0002" in str(info.value)
    assert "--skip-incomplete" in str(info.value)
    # without ADC, or skipping the incomplete cases, it works
    assert len(discover(root, channels=["dwi", "flair"]).cases) == 2


def test_skip_incomplete(tmp_path, nifti):
    root = _isles22_sample_tree(tmp_path, nifti)
    (root / "rawdata" / "sub-strokecase0002" / "ses-0001" / "sub-strokecase0002_ses-0001_adc.nii.gz").unlink()
    m = discover(root, skip_incomplete=True)
    assert [c.id for c in m.cases] == ["sub-strokecase0001"]


def test_duplicate_file_for_a_channel(tmp_path, nifti):
    root = _isles22_sample_tree(tmp_path, nifti)
    nifti(root / "rawdata" / "sub-strokecase0001" / "ses-0001" / "sub-strokecase0001_ses-0001_dwi.nii")
    with pytest.raises(SegpipeError, match="2 files for channel 'dwi'"):
        discover(root)


def test_cases_without_labels_are_allowed(tmp_path, nifti):
    m = discover(_isles22_sample_tree(tmp_path, nifti, with_label=False))
    assert all(c.label is None for c in m.cases)
    assert m.folds == ()


def test_root_missing(tmp_path):
    with pytest.raises(SegpipeError, match="folder not found"):
        discover(tmp_path / "nope")
