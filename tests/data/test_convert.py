"""``segpipe convert``: DICOM exports with DICOM SEG annotations -> an nnU-Net raw dataset segpipe discovers."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from segpipe.data.convert import convert_dicom
from segpipe.data.layouts import discover
from segpipe.data.synthetic import synthesize
from segpipe.errors import SegpipeError, UsageError
from segpipe.io.dicom import find_series, read_series, select_series, write_dicom_seg

CHANNELS = ["dwi", "adc", "flair"]


def _annotate(export, label, name="annotation_seg.dcm", channel="dwi"):
    """A DICOM SEG of ``label`` drawn on the export's ``channel`` series (as a viewer would store it beside the
    images); the label must be on that series' grid."""
    info, files = select_series(find_series(export), [channel])[channel]
    volume, ordered, index = read_series(info, files)
    assert volume.array.shape == label.shape
    (export / "SEG").mkdir(exist_ok=True)
    return write_dicom_seg(label, ordered, export / "SEG" / name, classes=["background", "lesion"], source_index=index), volume


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert")
    synthesize(root, "isles22", 2, 0, (24, 24, 16), fmt="dicom")
    return root


def test_studies_and_their_seg_become_an_nnunet_dataset(exports, tmp_path, cli, monkeypatch):
    one, two = tmp_path / "strokecase0001", tmp_path / "strokecase0002"
    shutil.copytree(exports / "strokecase0001", one)
    shutil.copytree(exports / "strokecase0002", two)
    label_img = nib.load(str(exports / "labels" / "strokecase0001.nii.gz"))
    label = (np.asarray(label_img.dataobj) > 0).astype(np.uint8)
    assert label.sum() > 0
    _, dwi = _annotate(one, label)
    r = cli("inspect", one)  # the annotation is listed with the series it is drawn on
    dwi_number = select_series(find_series(one), ["dwi"])["dwi"][0].number
    assert r.exit_code == 0 and f"DICOM SEG SEG/annotation_seg.dcm drawn on #{dwi_number}" in r.output, r.output
    out = tmp_path / "Dataset501_Site"
    import collections

    import pydicom

    opened: collections.Counter = collections.Counter()
    dcmread = pydicom.dcmread
    monkeypatch.setattr(pydicom, "dcmread", lambda fp, *a, **k: opened.update([str(fp)]) or dcmread(fp, *a, **k))
    r = cli("convert", one, two, "--out", out, "--channels", "dwi,adc,flair")
    assert r.exit_code == 0, r.output
    # one pass over the headers finds the series and the SEGs (then the chosen series are read): a PACS export of
    # thousands of files is not scanned twice
    assert max(opened.values()) <= 2, opened.most_common(3)
    assert "1 annotated studies" in r.output and f"segpipe manifest {out}" in r.output
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "dwi", "1": "adc", "2": "flair"} and meta["labels"] == {"background": 0, "lesion": 1}
    assert meta["numTraining"] == 1 and meta["file_ending"] == ".nii.gz"
    # the label: the SEG on the DWI's grid, voxel for voxel; the images: the series as infer reads them
    converted = nib.load(str(out / "labelsTr" / "strokecase0001.nii.gz"))
    assert np.array_equal(np.asarray(converted.dataobj), label)
    assert np.allclose(converted.affine, dwi.affine, atol=1e-4)
    image = nib.load(str(out / "imagesTr" / "strokecase0001_0000.nii.gz"))
    assert np.allclose(np.asarray(image.dataobj), dwi.array, atol=1e-3) and np.allclose(image.affine, dwi.affine, atol=1e-4)
    assert sorted(p.name for p in (out / "imagesTs").iterdir()) == [f"strokecase0002_000{i}.nii.gz" for i in range(3)]
    # what segpipe (and nnU-Net) read from it
    m = discover(out)
    assert m.layout == "nnunet" and list(m.channels) == CHANNELS
    assert [c.id for c in m.labelled] == ["strokecase0001"] and len(m.cases) == 2


def test_studies_that_cannot_be_converted_are_named_and_left_out(exports, tmp_path, caplog):
    one, two = tmp_path / "strokecase0001", tmp_path / "strokecase0002"
    shutil.copytree(exports / "strokecase0001", one)
    shutil.copytree(exports / "strokecase0002", two)
    label = (np.asarray(nib.load(str(exports / "labels" / "strokecase0001.nii.gz")).dataobj) > 0).astype(np.uint8)
    _annotate(one, label)
    _annotate(one, label, name="second_seg.dcm")  # two readers' annotations of one series: which one?
    out = tmp_path / "ds"
    report = convert_dicom([one, two], out, CHANNELS)
    assert list(report.failed) == ["strokecase0001"] and "2 DICOM SEGs refer to the dwi series" in report.failed["strokecase0001"]
    assert report.unlabelled == ["strokecase0002"]
    assert not any(p.name.startswith("strokecase0001") for p in out.rglob("*"))  # nothing of the failed study
    assert json.loads((out / "dataset.json").read_text())["left_out"] == report.failed
    # an annotation drawn on another channel than the first: say which to list first
    (one / "SEG" / "second_seg.dcm").unlink()
    with pytest.raises(SegpipeError, match="none of the 1 studies could be converted"):
        convert_dicom([one], tmp_path / "ds2", ["flair", "dwi"])
    assert "drawn on the dwi series, not on the flair series of the first channel; list dwi first" in caplog.text
    assert not (tmp_path / "ds2").exists()  # nothing converted: no folder


def test_bad_options_are_one_line(exports, tmp_path, cli):
    export = exports / "strokecase0001"
    with pytest.raises(UsageError, match="--classes: expected background first"):
        convert_dicom([export], tmp_path / "a", CHANNELS, classes=["lesion"])
    with pytest.raises(UsageError, match="--series: t1 is not among --channels"):
        convert_dicom([export], tmp_path / "a", CHANNELS, series={"t1": 3})
    with pytest.raises(SegpipeError, match="expected a folder of DICOM series"):
        convert_dicom([tmp_path / "nothing"], tmp_path / "a", CHANNELS)
    (tmp_path / "taken").mkdir()
    r = cli("convert", export, "--out", tmp_path / "taken", "--channels", "dwi")
    assert r.exit_code == 1 and "already exists" in r.output and "Traceback" not in r.output
    r = cli("convert", export, "--out", tmp_path / "b", "--channels", "dwi", "--dicom-case", "series")
    assert r.exit_code == 2 and "--dicom-case: expected study or folder" in r.output


def test_an_export_as_zip_archive_converts_as_its_folder(exports, tmp_path):
    """A PACS portal's download: the studies and SEGs in the archive, the same dataset as from the folder."""
    one = tmp_path / "strokecase0001"
    shutil.copytree(exports / "strokecase0001", one)
    label = (np.asarray(nib.load(str(exports / "labels" / "strokecase0001.nii.gz")).dataobj) > 0).astype(np.uint8)
    _annotate(one, label)
    archive = shutil.make_archive(str(tmp_path / "zips" / "strokecase0001"), "zip", root_dir=tmp_path, base_dir="strokecase0001")
    convert_dicom([one], tmp_path / "from_folder", CHANNELS)
    report = convert_dicom([archive], tmp_path / "from_zip", CHANNELS)
    assert report.labelled == ["strokecase0001"]
    for sub in ("labelsTr/strokecase0001.nii.gz", "imagesTr/strokecase0001_0002.nii.gz"):
        a, b = (nib.load(str(tmp_path / d / sub)) for d in ("from_folder", "from_zip"))
        assert np.array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj)) and np.allclose(a.affine, b.affine)
    (tmp_path / "empty.zip").write_bytes(b"PK\x05\x06" + b"\0" * 18)  # an empty archive
    with pytest.raises(SegpipeError, match=r"EXPORT '.*empty.zip': expected .* found a ZIP archive without DICOM files"):
        convert_dicom([tmp_path / "empty.zip"], tmp_path / "c", CHANNELS)
