"""nnU-Net's CT normalisation ("ct" scheme) and the synthetic ISLES 2018 data it is made for: the schemes a
config gives each channel, the transform's arithmetic, the dataset statistics `segpipe preprocess` takes
from lesion voxels, and the same normalisation at inference from the checkpoint's plan."""

from __future__ import annotations

import glob
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from segpipe.config import load_config
from segpipe.data.cache import CaseCache
from segpipe.data.layouts import discover
from segpipe.data.manifest import load_manifest, write_manifest
from segpipe.data.preprocess import case_inputs, preprocess_dataset
from segpipe.data.synthetic import synthesize
from segpipe.errors import UsageError
from segpipe.planning import load_plan, normalization_schemes
from segpipe.transforms.preprocessing import ZScored, build_preprocessing, run_chain

TINY18 = ["plan.patch_size=[32,32,16]", "plan.base_features=4", "plan.max_features=16", "plan.max_stages=3"]


@pytest.fixture(scope="module")
def isles18(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("isles18")
    synthesize(root / "raw", "isles18", cases=3, seed=2, shape=(40, 40, 16))
    return write_manifest(discover(root / "raw", "auto"), root / "m.json")


def test_schemes_follow_nnunets_rule_by_name_and_the_config():
    assert normalization_schemes("auto", ["dwi", "adc", "flair"]) == "zscore"  # plans read as before
    assert normalization_schemes("auto", ["CT", "cbf"]) == {"CT": "ct", "cbf": "zscore"}
    assert normalization_schemes("ct", ["a", "b"]) == "ct"
    assert normalization_schemes("none", ["ct"]) == "none"
    assert normalization_schemes({"cbf": "none"}, ["ct", "cbf"]) == {"ct": "ct", "cbf": "none"}
    assert normalization_schemes({"ct": "zscore"}, ["ct", "cbf"]) == "zscore"
    with pytest.raises(UsageError, match=r"'cfb' is not a channel of the dataset \(did you mean 'cbf'\?\); its channels are ct, cbf"):
        normalization_schemes({"cfb": "none"}, ["ct", "cbf"])
    with pytest.raises(UsageError, match="preprocess.normalization"):
        load_config(None, ["preprocess.normalization={ct: hu}"])


def _image(values: np.ndarray) -> dict:
    head = np.zeros(values.shape[1:], dtype=bool)
    head[1:-1, 1:-1, 1:-1] = True
    return {"image": MetaTensor(torch.from_numpy(values)), "head": MetaTensor(torch.from_numpy(head)[None])}


def test_ct_scheme_clips_and_scales_by_the_datasets_statistics_and_keeps_the_outside():
    rng = np.random.default_rng(0)
    values = np.stack([rng.uniform(-1000, 1500, (6, 6, 6)), rng.uniform(0, 80, (6, 6, 6))]).astype(np.float32)
    stats = {"ct": {"mean": 30.0, "std": 8.0, "p00_5": 10.0, "p99_5": 60.0}}
    out = np.asarray(ZScored("image", "head", ["ct", "cbf"], ["ct", "zscore"], stats)(_image(values.copy()))["image"])
    expected = (np.clip(values[0], 10.0, 60.0) - 30.0) / 8.0
    assert np.allclose(out[0], expected, atol=1e-6)  # the whole volume, outside the head too: 0 is not air here
    head = _image(values)["head"][0].numpy().astype(bool)
    inside = values[1][head]
    assert np.allclose(out[1][head], (inside - inside.mean()) / inside.std(), atol=1e-5) and (out[1][~head] == 0).all()
    with pytest.raises(ValueError, match="intensity\\['ct'\\] lacks"):
        ZScored("image", "head", ["ct"], "ct", {})


def test_synthetic_isles18_is_found_as_the_challenge_ships_it(isles18):
    m = load_manifest(isles18)
    assert m.layout == "isles18" and list(m.channels) == ["ct", "cbf", "cbv", "mtt", "tmax"] and len(m.cases) == 3
    ct = nib.load(str(m.image_path(m.cases[0], "ct")))
    cbf = np.asarray(nib.load(str(m.image_path(m.cases[0], "cbf"))).dataobj)
    assert ct.get_data_dtype() == np.int16 and ct.shape == (40, 40, 16)
    hu = np.asarray(ct.dataobj)
    assert hu.min() < -900 and hu.max() > 1000  # air and bone in Hounsfield units
    assert cbf.min() == 0 and (cbf == 0).mean() > 0.2  # the perfusion maps are 0 outside the brain
    assert all(Path(m.image_path(c, "ct")).name.startswith("SMIR.Brain.XX.O.CT.") for c in m.cases)


def test_preprocess_takes_ct_statistics_from_lesion_voxels_and_applies_them(isles18, tmp_path):
    m = load_manifest(isles18)
    config = load_config("isles18", TINY18)
    report = preprocess_dataset(m, config, tmp_path / "c", workers=1)
    plan = load_plan(tmp_path / "c" / "plan.json")
    assert plan.normalization == {"ct": "ct", "cbf": "zscore", "cbv": "zscore", "mtt": "zscore", "tmax": "zscore"}
    st = plan.intensity["ct"]
    assert set(plan.intensity) == {"ct"} and st["cases"] == 3
    # the statistics of every lesion voxel (read here with nibabel alone), each case weighing the same as in
    # nnU-Net's fingerprint: the sample of 10^7 must come close to them
    per_case = [np.asarray(nib.load(str(m.image_path(c, "ct"))).dataobj)[np.asarray(nib.load(str(m.label_path(c))).dataobj) > 0]
                for c in m.cases]
    hu = np.concatenate(per_case).astype(np.float64)
    weight = np.concatenate([np.full(len(v), 1 / len(v)) for v in per_case]) / len(per_case)
    mean = float((hu * weight).sum())
    assert abs(st["mean"] - mean) < 0.05 and abs(st["std"] - np.sqrt((weight * (hu - mean) ** 2).sum())) < 0.05
    order = np.argsort(hu, kind="stable")
    cdf = np.cumsum(weight[order])
    lo, hi = (hu[order][np.searchsorted(cdf, q)] for q in (0.005, 0.995))
    assert abs(st["p00_5"] - lo) <= 1 and abs(st["p99_5"] - hi) <= 1
    assert abs(st["mean"] - hu.mean()) > 0.1  # not the pooled mean: the cases' lesions differ in size
    # the cached CT channel is clipped to those percentiles and scaled; air and bone land on the clip bounds
    image = np.asarray(CaseCache(tmp_path / "c").load(m.cases[0].id).image)
    assert np.isclose(image[0].min(), (st["p00_5"] - st["mean"]) / st["std"], atol=1e-5)
    assert np.isclose(image[0].max(), (st["p99_5"] - st["mean"]) / st["std"], atol=1e-5)
    # air in a corner: the CT's lower clip value there, where the z-scored maps have 0 (outside the head)
    assert image[0][0, 0, 0] == image[0].min() < -0.5 and image[1][0, 0, 0] == 0
    # the statistics are part of the cache key and do not change on a second run: nothing is redone
    again = preprocess_dataset(m, config, tmp_path / "c", workers=2)
    assert sorted(again.up_to_date) == sorted(report.processed) and not again.processed
    # inference preprocesses a case with the plan's statistics, as training saw it
    out = run_chain(build_preprocessing(plan, with_label=False), case_inputs(m, m.cases[0], with_label=False))
    assert np.allclose(np.asarray(out["image"]), image, atol=1e-5)


def test_ct_statistics_need_a_lesion_somewhere(isles18, tmp_path, cli):
    m = load_manifest(isles18)
    root = tmp_path / "empty"
    for c in m.cases:  # the same cases with empty masks
        lab = nib.load(str(m.label_path(c)))
        target = root / Path(m.label_path(c)).relative_to(isles18.parent / "raw")
        target.parent.mkdir(parents=True)
        nib.save(nib.Nifti1Image(np.zeros(lab.shape, np.uint8), lab.affine), str(target))
        for ch in m.channels:
            src = Path(m.image_path(c, ch))
            dst = root / src.relative_to(isles18.parent / "raw")
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.symlink_to(src)
    r = cli("manifest", root, "--out", tmp_path / "m.json")
    assert r.exit_code == 0, r.output
    r = cli("preprocess", "-m", tmp_path / "m.json", "-c", "isles18", "-o", tmp_path / "new" / "c", *TINY18)
    assert r.exit_code == 1 and "none of the 3 labelled cases has one" in r.output and "normalization=zscore" in r.output
    assert not (tmp_path / "new").exists()  # no empty cache folder left behind, nor the folder made for it
    (tmp_path / "mine").mkdir()  # a folder that was there before is left as it was
    r = cli("preprocess", "-m", tmp_path / "m.json", "-c", "isles18", "-o", tmp_path / "mine", *TINY18)
    assert r.exit_code == 1 and (tmp_path / "mine").is_dir() and not glob.glob(str(tmp_path / "mine" / "cases" / "*"))
    r = cli("preprocess", "-m", tmp_path / "m.json", "-c", "isles18", "-o", tmp_path / "c2", *TINY18,
            "preprocess.normalization={ctt: ct}")
    assert r.exit_code == 2 and "'ctt' is not a channel" in r.output and "did you mean 'ct'" in r.output
    assert not (tmp_path / "c2").exists()


def test_inspect_says_how_each_channel_is_normalised(isles18, tmp_path, cli):
    assert cli("preprocess", "-m", isles18, "-c", "isles18", "-o", tmp_path / "c", *TINY18).exit_code == 0
    r = cli("inspect", tmp_path / "c")
    st = json.loads((tmp_path / "c" / "plan.json").read_text())["intensity"]["ct"]
    assert f"ct: CT (clipped to [{st['p00_5']:g}, {st['p99_5']:g}]" in r.output
    assert "cbf, cbv, mtt, tmax: z-score in the head mask" in r.output


def _canonical(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    img = nib.as_closest_canonical(nib.Nifti1Image(np.asarray(array, dtype=np.float32), affine))
    return np.asarray(img.dataobj), img.affine


def test_a_ct_perfusion_export_is_read_by_the_built_in_rules(tmp_path, cli):
    from segpipe.io.dicom import read_series, scan_export, select_series

    # the same case drawing as NIfTI files and as a scanner export (CT modality, 16-bit with rescale)
    synthesize(tmp_path / "nii", "isles18", cases=1, seed=5, shape=(32, 32, 16))
    synthesize(tmp_path / "dcm", "isles18", cases=1, seed=5, shape=(32, 32, 16), fmt="dicom")
    m = discover(tmp_path / "nii", "auto")
    series, _ = scan_export(tmp_path / "dcm" / "ctpcase0001")
    chosen = select_series(series, list(m.channels), where="export")
    assert {ch: s.number for ch, (s, _) in chosen.items()} == {"ct": 2, "cbf": 11, "cbv": 12, "mtt": 13, "tmax": 14}
    assert all(s.modality == "CT" for s, _ in chosen.values())
    for ch, (s, files) in chosen.items():
        vol, _, _ = read_series(s, files)
        got, got_affine = _canonical(vol.array, vol.affine)
        ref = nib.load(str(m.image_path(m.cases[0], ch)))
        want, want_affine = _canonical(np.asarray(ref.dataobj), ref.affine)
        assert np.allclose(got_affine, want_affine, atol=1e-3)
        assert np.allclose(got, want, atol=0.02 if ch == "ct" else 1e-3 * float(np.abs(want).max())), ch  # HU kept as HU
    r = cli("inspect", tmp_path / "dcm" / "ctpcase0001")
    assert "the built-in rules would choose: ct <- #2, cbf <- #11, cbv <- #12, mtt <- #13, tmax <- #14" in r.output
    r = cli("synth", tmp_path / "e", "--layout", "isles18", "--format", "dicom-enhanced")
    assert r.exit_code == 2 and "use --format dicom for isles18" in r.output and not (tmp_path / "e").exists()


@pytest.mark.parametrize(("description", "channel"), [
    ("CT_CBF", "cbf"), ("rCBF (ml/100g/min)", "cbf"), ("Cerebral Blood Volume", "cbv"), ("MTT_map", "mtt"),
    ("Tmax", "tmax"), ("T-max RAPID", "tmax"), ("Mean Transit Time", "mtt"),
])
def test_perfusion_map_names_are_recognised_and_the_plain_ct_is_not_taken_for_them(description, channel):
    from segpipe.io.dicom import DEFAULT_RULES, SeriesInfo, _matches

    s = SeriesInfo(uid="1", number=1, description=description, modality="CT", files=["f"])
    assert _matches(s, DEFAULT_RULES[channel])
    assert not _matches(s, DEFAULT_RULES["ct"])  # nor a map for the CT
    assert not any(_matches(s, DEFAULT_RULES[other]) for other in ("cbf", "cbv", "mtt", "tmax") if other != channel)
    for plain in ("Head 5.0 H31s", "NCCT brain"):  # the plain CT is the CT's, and no map's
        head = SeriesInfo(uid="2", number=2, description=plain, modality="CT", files=["f"])
        assert _matches(head, DEFAULT_RULES["ct"]) and not _matches(head, DEFAULT_RULES[channel])
    assert not _matches(SeriesInfo(uid="3", number=3, description="CTP 4D dynamic", modality="CT", files=["f"]), DEFAULT_RULES["ct"])
