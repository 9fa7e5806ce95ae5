"""Manifest format: round trip, folds, and every validation error (all reported at once)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from segpipe.data.layouts import discover
from segpipe.data.manifest import load_manifest, make_folds, write_manifest
from segpipe.errors import SegpipeError, UsageError

ROOT = Path(__file__).resolve().parents[2]


def _write(tmp_path: Path, data) -> Path:
    p = tmp_path / "m.json"
    p.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return p


def _valid(tmp_path: Path, nifti) -> dict:
    for cid in ("a", "b", "c"):
        nifti(tmp_path / "data" / cid / "t1.nii.gz")
        nifti(tmp_path / "data" / cid / "flair.nii.gz")
        nifti(tmp_path / "data" / cid / "seg.nii.gz")
    return {
        "name": "toy",
        "root": "data",
        "channels": ["t1", "flair"],
        "label": {"classes": ["background", "lesion"], "ignore_value": None, "threshold": 0.5},
        "cases": [
            {"id": cid, "images": {"t1": f"{cid}/t1.nii.gz", "flair": f"{cid}/flair.nii.gz"}, "label": f"{cid}/seg.nii.gz"}
            for cid in ("a", "b", "c")
        ],
        "folds": {"k": 3, "seed": 0, "validation": [["a"], ["b"], ["c"]]},
    }


def test_round_trip(tmp_path, synth_isles):
    m = discover(synth_isles, "isles22", folds=2, seed=5)
    out = write_manifest(m, tmp_path / "sub" / "isles.json")
    data = json.loads(out.read_text())
    assert not Path(data["root"]).is_absolute()  # stored relative to the manifest's folder
    back = load_manifest(out)
    assert back.cases == m.cases and back.channels == m.channels and back.folds == m.folds
    assert back.root == m.root and back.fold_seed == 5 and back.label == m.label


def test_valid_manifest_loads(tmp_path, nifti):
    m = load_manifest(_write(tmp_path, _valid(tmp_path, nifti)))
    assert m.channels == ("t1", "flair")
    assert m.image_path(m.case("b"), "flair") == (tmp_path / "data" / "b" / "flair.nii.gz").resolve()
    assert m.split(1) == (["a", "c"], ["b"])
    assert m.split("all") == (["a", "b", "c"], [])


def test_fold_out_of_range(tmp_path, nifti):
    m = load_manifest(_write(tmp_path, _valid(tmp_path, nifti)))
    with pytest.raises(UsageError, match=r"3 folds \(0..2\), got 3"):
        m.split(3)


def test_folds_are_seeded_stable_and_partition():
    ids = [f"case{i:03d}" for i in range(23)]
    folds = make_folds(ids, 5, seed=1)
    assert folds == make_folds(list(reversed(ids)), 5, seed=1)  # independent of input order
    assert folds != make_folds(ids, 5, seed=2)
    flat = [c for f in folds for c in f]
    assert sorted(flat) == ids and len(folds) == 5
    assert {len(f) for f in folds} <= {4, 5}
    # pinned: the split of a manifest must never change between versions
    # (random.Random is stable across Python versions for a given seed)
    assert make_folds(["a", "b", "c", "d", "e"], 2, seed=0) == (("a", "c", "d"), ("b", "e"))


def test_fewer_cases_than_folds():
    assert make_folds(["x", "y"], 5) == (("x",), ("y",))


def test_invalid_json_gives_line_and_column(tmp_path):
    p = _write(tmp_path, '{\n  "name": "x",\n  "root": "data"\n  "channels": []\n}')
    with pytest.raises(SegpipeError, match=r"invalid JSON at line 4, column 3"):
        load_manifest(p)


def test_all_problems_reported_at_once(tmp_path, nifti):
    data = _valid(tmp_path, nifti)
    cases = data["cases"]
    cases[0]["images"]["t1"] = "a/missing.nii.gz"  # missing file
    cases[1]["id"] = "a"  # duplicate id
    del cases[2]["images"]["flair"]  # missing channel
    cases[2]["images"]["dwi"] = "c/t1.nii.gz"  # unknown channel
    cases[2]["label"] = "../../etc/passwd"  # leaves the root
    data["folds"] = {"k": 1, "seed": 0, "validation": [["a", "zzz"]]}
    with pytest.raises(SegpipeError) as info:
        load_manifest(_write(tmp_path, data))
    err = info.value
    text = str(err)
    assert "file not found" in text and "missing.nii.gz" in text
    assert "duplicate id" in text
    assert "missing channel 'flair'" in text
    assert "unknown channel 'dwi'" in text
    assert "leaves the manifest root" in text
    assert "unknown case 'zzz'" in text
    assert len(err.details) >= 6
    assert err.message.endswith(f"{len(err.details)} problems")


def test_absolute_path_is_refused(tmp_path, nifti):
    data = _valid(tmp_path, nifti)
    data["cases"][0]["images"]["t1"] = str((tmp_path / "data" / "a" / "t1.nii.gz").resolve())
    with pytest.raises(SegpipeError, match="leaves the manifest root"):
        load_manifest(_write(tmp_path, data))


def test_one_file_in_two_roles_is_refused(tmp_path, nifti):
    """A pattern that matched twice (or a copy-paste slip) would train on a channel twice, or on an image as its label."""
    data = _valid(tmp_path, nifti)
    data["cases"][0]["images"]["flair"] = "a/t1.nii.gz"
    data["cases"][1]["label"] = "./b/flair.nii.gz"  # the same file, spelled otherwise
    with pytest.raises(SegpipeError) as info:
        load_manifest(_write(tmp_path, data))
    text = str(info.value)
    assert "2 problems" in text and "case 'a': channel 't1' and channel 'flair' are the same file 'a/t1.nii.gz'" in text
    assert "case 'b': channel 'flair' and label are the same file" in text


def test_unknown_keys_suggest(tmp_path, nifti):
    data = _valid(tmp_path, nifti)
    data["chanels"] = data.pop("channels")
    with pytest.raises(SegpipeError, match=r"unknown key 'chanels' \(did you mean 'channels'\?\)"):
        load_manifest(_write(tmp_path, data))


def test_label_spec_checked(tmp_path, nifti):
    data = _valid(tmp_path, nifti)
    data["label"] = {"classes": ["background"], "ignore_value": 0}
    with pytest.raises(SegpipeError) as info:
        load_manifest(_write(tmp_path, data))
    assert "label.classes" in str(info.value) and "label.ignore_value" in str(info.value)


def test_missing_root_is_one_problem(tmp_path, nifti):
    data = _valid(tmp_path, nifti)
    data["root"] = "nowhere"
    with pytest.raises(SegpipeError) as info:
        load_manifest(_write(tmp_path, data))
    assert len(info.value.details) == 1 and "folder not found" in info.value.details[0]


def test_manifest_file_missing(tmp_path):
    with pytest.raises(SegpipeError, match="segpipe manifest ROOT --out"):
        load_manifest(tmp_path / "none.json")


def test_shipped_sample_manifest_matches_discovery(sample_dir):
    shipped = load_manifest(ROOT / "data_manifests" / "isles22_sample.json")
    fresh = discover(sample_dir, name="isles22_sample")
    assert shipped.cases == fresh.cases and shipped.root == fresh.root.resolve()
