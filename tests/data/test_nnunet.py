"""Datasets in nnU-Net's raw format (dataset.json, imagesTr, labelsTr, imagesTs) and nnU-Net's splits_final.json."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from segpipe.data.layouts import discover
from segpipe.data.manifest import load_manifest, write_manifest
from segpipe.data.nnunet import discover_nnunet, read_splits, splits_json
from segpipe.errors import SegpipeError, UsageError
from tests.conftest import write_nifti

V2 = {"channel_names": {"0": "DWI", "1": "ADC"}, "labels": {"background": 0, "lesion": 1}, "numTraining": 3,
      "file_ending": ".nii.gz", "name": "Stroke"}


def make_dataset(folder: Path, meta: dict, train=("a", "b", "c"), test=("t",), channels=2, ending=".nii.gz") -> Path:
    """An nnU-Net raw dataset of tiny NIfTI files (or of ``ending``'s format, written by nibabel's NIfTI writer)."""
    folder.mkdir(parents=True)
    (folder / "dataset.json").write_text(json.dumps(meta))
    vol = np.zeros((4, 4, 4), np.float32)
    for split, ids in (("Tr", train), ("Ts", test)):
        for cid in ids:
            for i in range(channels):
                write_nifti(folder / f"images{split}" / f"{cid}_{i:04d}{ending}", vol)
            if split == "Tr":
                write_nifti(folder / "labelsTr" / f"{cid}{ending}", vol.astype(np.uint8))
    return folder


def test_v2_dataset_read_as_it_is(tmp_path):
    ds = make_dataset(tmp_path / "Dataset001_Stroke", V2)
    m = discover(ds)  # auto: dataset.json says what it is
    assert m.layout == "nnunet" and m.name == "Stroke"
    assert m.channels == ("dwi", "adc")  # lower case, so that the configs' channel names (reference_channel: dwi) apply
    assert [c.id for c in m.cases] == ["a", "b", "c", "t"]
    assert [c.id for c in m.labelled] == ["a", "b", "c"]
    a = m.case("a")
    assert a.images == {"dwi": "imagesTr/a_0000.nii.gz", "adc": "imagesTr/a_0001.nii.gz"} and a.label == "labelsTr/a.nii.gz"
    assert m.case("t").images["adc"] == "imagesTs/t_0001.nii.gz" and m.case("t").label is None
    assert m.label.classes == ("background", "lesion") and m.label.ignore_value is None and m.label.threshold == 0.5
    assert sorted(c for f in m.folds for c in f) == ["a", "b", "c"]
    # written and read back: every path is checked to exist
    back = load_manifest(write_manifest(m, tmp_path / "m.json"))
    assert back.cases == m.cases and back.label == m.label


def test_nnunet_raw_folder_with_one_dataset_and_with_several(tmp_path):
    make_dataset(tmp_path / "nnUNet_raw" / "Dataset001_Stroke", V2)
    assert discover(tmp_path / "nnUNet_raw").layout == "nnunet"
    make_dataset(tmp_path / "nnUNet_raw" / "Dataset002_WMH", V2)
    with pytest.raises(SegpipeError, match=r"2 nnU-Net datasets in it \(Dataset001_Stroke, Dataset002_WMH\)"):
        discover(tmp_path / "nnUNet_raw")


def test_layout_nnunet_on_another_folder_says_what_it_expects(synth_isles):
    with pytest.raises(SegpipeError, match="not an nnU-Net raw dataset; expected dataset.json next to imagesTr"):
        discover(synth_isles, "nnunet")


def test_v1_dataset_json(tmp_path):
    meta = {"modality": {"0": "FLAIR", "1": "T1"}, "labels": {"0": "background", "1": "wmh"}, "numTraining": 3,
            "training": [], "test": []}
    m = discover_nnunet(make_dataset(tmp_path / "Task01", meta))
    assert m.channels == ("flair", "t1") and m.label.classes == ("background", "wmh")


def test_ignore_label_becomes_the_ignored_value(tmp_path):
    meta = dict(V2, labels={"background": 0, "wmh": 1, "ignore": 2})
    m = discover_nnunet(make_dataset(tmp_path / "D", meta))
    assert m.label.classes == ("background", "wmh") and m.label.ignore_value == 2 and m.label.threshold == 0.5


def test_multiclass_labels_are_classes_by_value(tmp_path):
    meta = dict(V2, labels={"background": 0, "core": 2, "penumbra": 1})
    m = discover_nnunet(make_dataset(tmp_path / "D", meta))
    assert m.label.classes == ("background", "penumbra", "core") and m.label.threshold is None


@pytest.mark.parametrize("labels, message", [
    ({"background": 0, "tumour": [1, 2], "core": 2}, "label 'tumour' is a region"),
    ({"background": 0, "lesion": 2}, "without gaps, found"),
    ({"background": 0, "a": 1, "b": 2, "ignore": 5}, "the 'ignore' label must have the value after the last class"),
    ({"background": 0, "a": 1, "b": 1}, "share the value 1"),
])
def test_labels_segpipe_cannot_train_are_refused(tmp_path, labels, message):
    with pytest.raises(SegpipeError, match=message):
        discover_nnunet(make_dataset(tmp_path / "D", dict(V2, labels=labels)))


def test_duplicate_channel_names_are_made_unique(tmp_path):
    meta = dict(V2, channel_names={"0": "T1", "1": "T1", "2": "noise map"})
    m = discover_nnunet(make_dataset(tmp_path / "D", meta, channels=3))
    assert m.channels == ("t1", "t1_1", "noise_map")


def test_channels_pick_and_order(tmp_path):
    ds = make_dataset(tmp_path / "D", V2)
    m = discover(ds, channels=["adc"])
    assert m.channels == ("adc",) and m.case("a").images == {"adc": "imagesTr/a_0001.nii.gz"}
    with pytest.raises(UsageError, match="'flair' is not a channel of .* choose from dwi, adc"):
        discover(ds, channels=["flair"])


def test_every_problem_reported_at_once(tmp_path):
    ds = make_dataset(tmp_path / "D", V2)
    (ds / "imagesTr" / "b_0001.nii.gz").unlink()  # a missing channel
    (ds / "labelsTr" / "c.nii.gz").unlink()  # a training case without its label
    write_nifti(ds / "labelsTr" / "z.nii.gz", np.zeros((4, 4, 4), np.uint8))  # a label without images
    write_nifti(ds / "imagesTr" / "a_0007.nii.gz", np.zeros((4, 4, 4)))  # a channel dataset.json does not name
    with pytest.raises(SegpipeError) as err:
        discover(ds)
    text = str(err.value)
    for part in ("case 'b': no file for channel(s) adc (_0001)", "case 'c': in imagesTr without a label",
                 "'labelsTr/z.nii.gz': a label without images", "'imagesTr/a_0007.nii.gz': channel index 0007"):
        assert part in text, text


def test_skip_incomplete_leaves_out_cases_that_miss_a_channel_or_their_label(tmp_path):
    ds = make_dataset(tmp_path / "D", V2, train=("a", "b", "c", "d"))
    (ds / "imagesTr" / "b_0001.nii.gz").unlink()
    (ds / "labelsTr" / "d.nii.gz").unlink()
    m = discover(ds, skip_incomplete=True)
    assert [c.id for c in m.cases] == ["a", "c", "t"]


def test_decathlon_4d_files_are_refused_with_the_fix(tmp_path):
    ds = tmp_path / "Task04_Hippocampus"
    ds.mkdir()
    (ds / "dataset.json").write_text(json.dumps({"modality": {"0": "MRI"}, "labels": {"0": "background", "1": "x"}}))
    write_nifti(ds / "imagesTr" / "hippo_001.nii.gz", np.zeros((4, 4, 4, 2), np.float32))
    write_nifti(ds / "labelsTr" / "hippo_001.nii.gz", np.zeros((4, 4, 4), np.uint8))
    with pytest.raises(SegpipeError) as err:
        discover(ds)
    assert "Medical Segmentation Decathlon" in str(err.value)


def test_unreadable_file_ending_is_refused(tmp_path):
    with pytest.raises(SegpipeError, match=r"file_ending '\.png' is not an image format segpipe reads"):
        discover_nnunet(make_dataset(tmp_path / "D", dict(V2, file_ending=".png")))


def test_other_readable_file_ending(tmp_path):
    m = discover_nnunet(make_dataset(tmp_path / "D", dict(V2, file_ending=".nii"), ending=".nii"))
    assert m.case("a").images["dwi"] == "imagesTr/a_0000.nii"


def test_dataset_key_lists_files_anywhere_in_the_folder(tmp_path):
    ds = tmp_path / "D"
    write_nifti(ds / "scans" / "p1_dwi.nii.gz", np.zeros((4, 4, 4)))
    write_nifti(ds / "scans" / "p1_adc.nii.gz", np.zeros((4, 4, 4)))
    write_nifti(ds / "masks" / "p1.nii.gz", np.zeros((4, 4, 4), np.uint8))
    meta = dict(V2, dataset={"p1": {"images": ["scans/p1_dwi.nii.gz", "scans/p1_adc.nii.gz"], "label": "masks/p1.nii.gz"},
                             "p2": {"images": ["scans/p2_dwi.nii.gz", "scans/p2_adc.nii.gz"]}})
    (ds / "dataset.json").write_text(json.dumps(meta))  # no imagesTr: the files are where 'dataset' says
    with pytest.raises(SegpipeError) as err:
        discover(ds)
    assert "case 'p2': file(s) of its 'dataset' entry not found" in str(err.value)
    meta["dataset"].pop("p2")
    (ds / "dataset.json").write_text(json.dumps(meta))
    m = discover(ds)
    assert m.case("p1").images == {"dwi": "scans/p1_dwi.nii.gz", "adc": "scans/p1_adc.nii.gz"} and m.case("p1").label == "masks/p1.nii.gz"
    # absolute paths, and files outside the dataset folder: the manifest's root is the folder above them all
    write_nifti(tmp_path / "elsewhere" / "p3_dwi.nii.gz", np.zeros((4, 4, 4)))
    meta["dataset"]["p3"] = {"images": [str(tmp_path / "elsewhere" / "p3_dwi.nii.gz"), "scans/p1_adc.nii.gz"]}
    (ds / "dataset.json").write_text(json.dumps(meta))
    m = discover(ds)
    assert m.root == tmp_path.resolve() and m.case("p3").images["dwi"] == "elsewhere/p3_dwi.nii.gz"
    assert m.case("p1").images["dwi"] == "D/scans/p1_dwi.nii.gz"
    back = load_manifest(write_manifest(m, tmp_path / "m.json"))
    assert back.image_path(back.case("p3"), "dwi").is_file() and back.label_path(back.case("p1")).is_file()


def test_broken_dataset_json(tmp_path):
    ds = make_dataset(tmp_path / "D", V2)
    (ds / "dataset.json").write_text('{"channel_names": {"0": "DWI"},')
    with pytest.raises(SegpipeError, match=r"dataset.json '.*': invalid JSON at line 1"):
        discover(ds)


# -- splits_final.json ------------------------------------------------------------------------------------


def test_splits_round_trip_and_nnunet_semantics(tmp_path):
    m = discover(make_dataset(tmp_path / "D", V2, train=tuple("abcdefg")), folds=3, seed=1)
    splits = splits_json(m)
    assert len(splits) == 3
    for f, s in enumerate(splits):  # nnU-Net's meaning: train on every case the fold does not validate on
        assert sorted(s["train"] + s["val"]) == list("abcdefg") and sorted(s["val"]) == sorted(m.folds[f])
    # another split, as nnU-Net would have written it, read back as the folds
    other = discover(make_dataset(tmp_path / "D2", V2, train=tuple("abcdefg")), folds=3, seed=9)
    path = tmp_path / "splits_final.json"
    path.write_text(json.dumps(splits_json(other)))
    assert read_splits(path, m) == other.folds != m.folds


@pytest.mark.parametrize("splits, message", [
    ([{"train": ["b", "c"], "val": ["a", "zz"]}], "not among the dataset's labelled cases: zz"),
    ([{"train": ["b"], "val": ["a"]}, {"train": ["a", "b"], "val": ["c"]}], "fold 0: its training cases are not all the others"),
    ([{"train": ["c"], "val": ["a", "b"]}, {"train": ["b", "c"], "val": ["a"]}], "case 'a' is also validated in fold 0"),
    ([{"train": ["b", "c"], "val": ["a"]}], "2 labelled case(s) validated in no fold: b, c"),
    ({"fold0": []}, "expected nnU-Net's splits_final.json"),
])
def test_splits_that_do_not_fit_are_refused(tmp_path, splits, message):
    m = discover(make_dataset(tmp_path / "D", V2))
    path = tmp_path / "splits_final.json"
    path.write_text(json.dumps(splits))
    with pytest.raises(SegpipeError) as err:
        read_splits(path, m)
    assert message in str(err.value)


def test_cli_manifest_with_splits_in_and_out(tmp_path, cli):
    ds = make_dataset(tmp_path / "D", V2, train=tuple("abcdef"))
    other = discover(ds, folds=2, seed=4)
    (tmp_path / "splits_final.json").write_text(json.dumps(splits_json(other)))
    r = cli("manifest", ds, "--out", tmp_path / "m.json", "--splits", tmp_path / "splits_final.json",
            "--write-splits", tmp_path / "out" / "splits.json")
    assert r.exit_code == 0, r.output
    assert "layout nnunet, channels dwi,adc, 2 folds" in r.output
    assert load_manifest(tmp_path / "m.json").folds == other.folds
    assert json.loads((tmp_path / "out" / "splits.json").read_text()) == splits_json(other)
    # a split of another dataset: one line, exit 1, and no manifest written
    (tmp_path / "bad.json").write_text(json.dumps([{"train": ["a"], "val": ["x"]}]))
    r = cli("manifest", ds, "--out", tmp_path / "m2.json", "--splits", tmp_path / "bad.json")
    assert r.exit_code == 1 and "--splits" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "m2.json").exists()


def test_same_cache_as_the_challenge_layout(synth_isles, tmp_path):
    """The synthetic ISLES 2022 dataset converted to nnU-Net's format preprocesses to the same arrays."""
    from segpipe.config import load_config
    from segpipe.data.cache import CaseCache
    from segpipe.data.preprocess import preprocess_dataset

    isles = discover(synth_isles, "isles22")
    ds = tmp_path / "Dataset101_ISLES"
    for case in isles.labelled:
        for i, ch in enumerate(isles.channels):
            (ds / "imagesTr").mkdir(parents=True, exist_ok=True)
            shutil.copy(isles.image_path(case, ch), ds / "imagesTr" / f"{case.id}_{i:04d}.nii.gz")
        (ds / "labelsTr").mkdir(exist_ok=True)
        shutil.copy(isles.label_path(case), ds / "labelsTr" / f"{case.id}.nii.gz")
    (ds / "dataset.json").write_text(json.dumps({"channel_names": {"0": "DWI", "1": "ADC", "2": "FLAIR"},
                                                 "labels": {"background": 0, "lesion": 1}, "numTraining": 3, "file_ending": ".nii.gz"}))
    nn = discover(ds)
    assert nn.channels == isles.channels and [c.id for c in nn.labelled] == [c.id for c in isles.labelled]
    cfg = load_config("isles22", ["preprocess.target_spacing=[2.0,2.0,2.0]"])
    preprocess_dataset(isles, cfg, tmp_path / "c1")
    preprocess_dataset(nn, cfg, tmp_path / "c2")
    for case in isles.labelled:
        a, b = CaseCache(tmp_path / "c1").load(case.id), CaseCache(tmp_path / "c2").load(case.id)
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.label, b.label)
        np.testing.assert_array_equal(a.sdm, b.sdm)


def test_infer_and_evaluate_take_the_dataset_folder(tmp_path, caplog):
    from segpipe.evaluation.protocols import pair_cases
    from segpipe.inference.inputs import resolve_inputs

    ds = make_dataset(tmp_path / "Dataset001_Stroke", V2)
    cases = resolve_inputs([ds], ["adc", "dwi"])  # by name, in the model's order
    assert [c.id for c in cases] == ["a", "b", "c", "t"]
    assert cases[3].channels == {"adc": ds / "imagesTs" / "t_0001.nii.gz", "dwi": ds / "imagesTs" / "t_0000.nii.gz"}
    # a model whose channels are named otherwise: by index, as nnU-Net does, with a warning
    cases = resolve_inputs([ds], ["b1000", "adc_map"])
    assert cases[0].channels == {"b1000": ds / "imagesTr" / "a_0000.nii.gz", "adc_map": ds / "imagesTr" / "a_0001.nii.gz"}
    assert "taken in order" in caplog.text
    with pytest.raises(SegpipeError, match=r"an nnU-Net dataset with 2 channel\(s\) \(dwi, adc\), but the model takes 3"):
        resolve_inputs([ds], ["dwi", "adc", "flair"])
    pred = tmp_path / "pred"
    pred.mkdir()
    for cid in "ab":
        shutil.copy(ds / "labelsTr" / f"{cid}.nii.gz", pred / f"{cid}.nii.gz")
    pairs = pair_cases(pred, ds, ignore_missing=True)
    assert [(c, g) for c, _, g in pairs] == [("a", ds / "labelsTr" / "a.nii.gz"), ("b", ds / "labelsTr" / "b.nii.gz")]


def test_a_dataset_json_of_something_else_is_not_taken_for_nnunet(tmp_path, synth_isles):
    root = tmp_path / "copy"
    shutil.copytree(synth_isles, root)
    (root / "dataset.json").write_text(json.dumps({"description": "our own notes", "cases": 3}))
    assert discover(root).layout == "isles22"


def test_splits_made_by_nnunet_itself(tmp_path, nnunet):
    """nnU-Net's own split function (what its trainer writes as splits_final.json) is read as the folds."""
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    m = discover(make_dataset(tmp_path / "D", V2, train=tuple("abcdefghijk")))
    splits = generate_crossval_split([c.id for c in m.labelled], seed=12345, n_splits=5)
    (tmp_path / "splits_final.json").write_text(json.dumps(splits))
    folds = read_splits(tmp_path / "splits_final.json", m)
    assert folds == tuple(tuple(sorted(s["val"])) for s in splits) and len(folds) == 5
    # and back: what --write-splits writes has the same structure as nnU-Net's own
    mine = splits_json(dataclasses.replace(m, folds=folds))
    assert [{k: sorted(v) for k, v in s.items()} for s in splits] == mine
