"""Synthetic datasets: determinism and the properties the rest of the pipeline relies on."""

from __future__ import annotations

import hashlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from segpipe.data.synthetic import make_head_case, synthesize
from segpipe.errors import UsageError


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*.nii.gz"))}


def test_isles18_same_seed_same_bytes_and_the_default_slab(tmp_path):
    synthesize(tmp_path / "a", "isles18", cases=1, seed=3)
    synthesize(tmp_path / "b", "isles18", cases=1, seed=3)
    files = sorted((tmp_path / "a").rglob("*.nii"))
    assert len(files) == 6
    assert all((tmp_path / "b" / f.relative_to(tmp_path / "a")).read_bytes() == f.read_bytes() for f in files)
    ct = nib.load(str(next(f for f in files if ".O.CT." in f.name)))
    assert ct.shape == (64, 64, 16) and np.allclose(ct.header.get_zooms(), (2, 2, 5))


def test_same_seed_same_bytes(tmp_path):
    synthesize(tmp_path / "a", "isles22", cases=2, seed=11, shape=(24, 24, 16))
    synthesize(tmp_path / "b", "isles22", cases=2, seed=11, shape=(24, 24, 16))
    synthesize(tmp_path / "c", "isles22", cases=2, seed=12, shape=(24, 24, 16))
    a, b, c = _digest(tmp_path / "a"), _digest(tmp_path / "b"), _digest(tmp_path / "c")
    assert a == b and len(a) == 8
    assert a.keys() == c.keys() and all(a[k] != c[k] for k in a)


def test_case_does_not_depend_on_number_of_cases(tmp_path):
    synthesize(tmp_path / "a", "wmh17", cases=1, seed=4, shape=(32, 32, 16))
    synthesize(tmp_path / "b", "wmh17", cases=2, seed=4, shape=(32, 32, 16))
    a, b = _digest(tmp_path / "a"), _digest(tmp_path / "b")
    assert all(b[k] == v for k, v in a.items())


def _load(p: Path):
    img = nib.load(str(p))
    return np.asanyarray(img.dataobj), img


def test_isles22_grids_orientation_and_codes(synth_isles):
    base = synth_isles / "ISLES-2022"
    sub = "sub-strokecase0001"
    dwi, dimg = _load(base / sub / "ses-0001" / "dwi" / f"{sub}_ses-0001_dwi.nii.gz")
    adc, aimg = _load(base / sub / "ses-0001" / "dwi" / f"{sub}_ses-0001_adc.nii.gz")
    flair, fimg = _load(base / sub / "ses-0001" / "anat" / f"{sub}_ses-0001_FLAIR.nii.gz")
    msk, mimg = _load(base / "derivatives" / sub / "ses-0001" / f"{sub}_ses-0001_msk.nii.gz")
    assert dwi.shape == adc.shape == msk.shape == (32, 32, 24)
    assert np.allclose(dimg.header.get_zooms(), (2, 2, 2)) and np.allclose(fimg.header.get_zooms(), (1, 1, 5))
    assert flair.shape != dwi.shape and not np.allclose(fimg.affine, dimg.affine, atol=1e-3)
    for img in (dimg, aimg, fimg, mimg):
        assert nib.aff2axcodes(img.affine) == ("L", "A", "S")
    assert np.allclose(mimg.affine, dimg.affine, atol=1e-4)
    assert (int(dimg.header["qform_code"]), int(dimg.header["sform_code"])) == (2, 1)
    assert (int(mimg.header["qform_code"]), int(mimg.header["sform_code"])) == (0, 2)
    # contrasts: lesions bright on DWI, dark on ADC
    les = msk > 0.5
    brain = (adc > 0.5) & (adc < 1.0) & ~les
    assert dwi[les].mean() > 1.8 * dwi[brain].mean()
    assert adc[les].mean() < 0.75 * np.median(adc[brain])
    # odd cases store the foreground as 0.99999999977 (float), like some real masks
    msk2, _ = _load(base / "derivatives" / "sub-strokecase0002" / "ses-0001" / "sub-strokecase0002_ses-0001_msk.nii.gz")
    assert msk2.dtype == np.float64 and 0.9999 < msk2.max() < 1.0


def test_wmh17_label_two_and_flair_contrast(synth_wmh):
    lab, limg = _load(synth_wmh / "Utrecht" / "0" / "wmh.nii.gz")
    flair, fimg = _load(synth_wmh / "Utrecht" / "0" / "pre" / "FLAIR.nii.gz")
    assert set(np.unique(lab)) == {0, 1, 2}
    assert np.allclose(fimg.header.get_zooms(), (0.96, 0.96, 3.0), atol=1e-3)
    assert nib.aff2axcodes(fimg.affine) == ("L", "A", "S")
    wm_like = (flair > 60) & (flair < 90) & (lab == 0)
    assert flair[lab == 1].mean() > 1.5 * flair[wm_like].mean()
    _, ge = _load(synth_wmh / "Amsterdam" / "GE3T" / "100" / "pre" / "FLAIR.nii.gz")
    assert np.allclose(ge.header.get_zooms(), (0.98, 0.98, 1.2), atol=1e-3)


@pytest.mark.parametrize("kind", ["stroke", "wmh"])
def test_lesions_small_unbalanced_and_diagonal(kind):
    fractions, n26, n6 = [], [], []
    for seed in range(6):
        rng = np.random.default_rng(seed)
        case = make_head_case(rng, kind, (40, 40, 28), (2.0, 2.0, 2.0), channels=("flair",))
        les = case.label == 1
        fractions.append(case.lesion_fraction)
        n26.append(ndimage.label(les, np.ones((3, 3, 3)))[1])
        n6.append(ndimage.label(les)[1])
        assert (case.label == 2).any() == (kind == "wmh")
    assert all(0.0005 <= f <= 0.02 for f in fractions), fractions
    assert all(n >= 2 for n in n26)  # several lesions
    assert sum(b > a for a, b in zip(n26, n6)) >= 3  # corner-touching pairs split under 6-connectivity


def test_bad_options():
    with pytest.raises(UsageError, match="--layout"):
        synthesize("unused", "isles15")
    with pytest.raises(UsageError, match="--cases"):
        synthesize("unused", "isles22", cases=0)
    with pytest.raises(UsageError, match="--shape"):
        synthesize("unused", "isles22", shape=(8, 8, 8))
