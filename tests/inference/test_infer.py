"""`segpipe infer`: NIfTI round trip, DICOM exports and SEG, small-lesion removal, bad input."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from pydicom.uid import generate_uid

from segpipe.data.synthetic import make_head_case
from segpipe.errors import SegpipeError, UsageError
from segpipe.inference.predictor import Predictor, remove_small_components
from segpipe.inference.run import infer, resolve_inputs
from segpipe.io.dicom import (
    find_series,
    read_series,
    select_series,
    write_dicom_report,
    write_dicom_seg,
    write_dicom_series,
    write_enhanced_dicom,
)
from segpipe.io.nifti import save_nifti
from tests.conftest import write_dicom_series_sitk

CHANNELS = ("dwi", "adc", "flair")


def _case(seed=1, shape=(40, 40, 24)):
    return make_head_case(np.random.default_rng(seed), "stroke", shape, (2.0, 2.0, 2.0), channels=CHANNELS,
                          second_grid=((80, 80, 12), (1.0, 1.0, 5.0)), second_grid_channels=("flair",))


def _nifti_case(folder: Path, seed=1) -> Path:
    case = _case(seed)
    for ch in CHANNELS:
        arr, aff = case.images[ch]
        save_nifti(folder / f"subj_{ch}.nii.gz", arr, aff, qform_code=2 if ch != "flair" else 1, sform_code=1)
    return folder


def test_nifti_round_trip_keeps_geometry_and_codes(tiny_model, tmp_path):
    src = _nifti_case(tmp_path / "in")
    out = tmp_path / "out"
    report = infer(tiny_model, [src], out, tta=False)
    assert not report.failed and list(report.done) == ["in"]
    ref = nib.load(str(src / "subj_dwi.nii.gz"))
    mask = nib.load(str(out / "in.nii.gz"))
    assert mask.shape == ref.shape and np.allclose(mask.affine, ref.affine, atol=1e-5)
    assert nib.aff2axcodes(mask.affine) == ("L", "A", "S")
    assert (int(mask.header["qform_code"]), int(mask.header["sform_code"])) == (2, 1)
    assert mask.get_data_dtype() == np.uint8 and set(np.unique(np.asanyarray(mask.dataobj))) <= {0, 1}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cases"]["in"]["seconds"]["network"] > 0 and summary["failed"] == {}


def test_mask_lands_where_the_lesion_is(tmp_path):
    """A 'model' that thresholds its first input channel, on a DWI that is a head plus the lesion mask: the
    whole path (preprocessing with reorientation, crop and resampling, sliding window, inversion) must put
    the mask back in place, on the input's oblique LAS grid."""
    case = _case(3)
    gt = case.label == 1
    dwi_aff = case.images["dwi"][1]
    head = case.images["adc"][0] > 0.3
    save_nifti(tmp_path / "in" / "c_dwi.nii.gz", (100.0 * head + 400.0 * gt).astype(np.float32), dwi_aff)
    for ch in ("adc", "flair"):
        save_nifti(tmp_path / "in" / f"c_{ch}.nii.gz", *case.images[ch])

    class Threshold(torch.nn.Module):
        def forward(self, x):
            fg = (x[:, :1] - 3.0) * 10  # z-scored: the lesion is far above the head's mean
            return torch.cat([-fg, fg], dim=1)

    from segpipe.config import load_config
    from segpipe.planning import make_plan

    # at the input's own spacing the round trip is exact; resampled to 1.5 mm and back, interpolation blurs edges
    for spacing, min_dice, max_shift in (("[2.0,2.0,2.0]", 0.999, 0.05), ("[1.5,1.5,1.5]", 0.85, 1.0)):
        plan = make_plan(load_config(None, ["plan.patch_size=[32,32,32]", f"preprocess.target_spacing={spacing}"]), CHANNELS,
                         ("background", "lesion"), None, 0.5, [(2, 2, 2)], [(40, 40, 24)])
        pred = Predictor(Threshold(), plan, device=torch.device("cpu")).predict(
            {ch: tmp_path / "in" / f"c_{ch}.nii.gz" for ch in CHANNELS}, tta=True)
        m = pred.mask.astype(bool)
        dice = 2 * (m & gt).sum() / (m.sum() + gt.sum())
        shift = np.linalg.norm(np.argwhere(m).mean(0) - np.argwhere(gt).mean(0))
        assert pred.mask.shape == gt.shape and dice >= min_dice and shift < max_shift, (spacing, dice, shift)


def test_remove_small_components():
    m = np.zeros((10, 10, 10), np.uint8)
    m[1:4, 1:4, 1:4] = 1  # 27 voxels
    m[7, 7, 7] = 1  # 1 voxel
    out, removed = remove_small_components(m, (2.0, 2.0, 2.0), min_mm3=10.0)  # voxel = 8 mm3
    assert removed == 1 and out.sum() == 27
    assert remove_small_components(m, (2.0, 2.0, 2.0), 0)[1] == 0


def _dicom_export(root: Path, seed=2, oblique=True, uneven=False) -> tuple[Path, dict]:
    case = _case(seed)
    study, frame = generate_uid(), generate_uid()
    images = dict(case.images)
    if not oblique:  # plain axis-aligned geometry
        images = {ch: (arr, np.diag([-np.linalg.norm(aff[:3, 0]), np.linalg.norm(aff[:3, 1]), np.linalg.norm(aff[:3, 2]), 1.0]))
                  for ch, (arr, aff) in images.items()}
    # two series in one folder (DWI with SimpleITK's writer, ADC with pydicom), FLAIR in another
    dwi_files = write_dicom_series_sitk(*images["dwi"], root / "DICOM" / "0001", description="ep2d_diff_3scan_trace_p2 TRACEW",
                                        series_number=7, study_uid=study, frame_uid=frame, b_value=1000)
    write_dicom_series(*images["adc"], root / "DICOM" / "0001", description="ep2d_diff_3scan_trace_p2_ADC", series_number=8,
                       study_uid=study, frame_uid=frame, prefix="ADC")
    write_dicom_series(*images["flair"], root / "DICOM" / "0002", description="t2_tirm_tra_dark-fluid", series_number=4,
                       study_uid=study, frame_uid=frame)
    if uneven:
        dwi_files[len(dwi_files) // 2].unlink()
    return root, {"dwi_uid": pydicom.dcmread(str(dwi_files[0])).SeriesInstanceUID}


@pytest.mark.parametrize("oblique", [True, False])
def test_dicom_export_segmented_and_seg_reads_back(tiny_model, tmp_path, oblique):
    export, info = _dicom_export(tmp_path / "study", oblique=oblique)
    out = tmp_path / "out"
    report = infer(tiny_model, [export], out, tta=False)
    assert not report.failed, report.failed
    seg = pydicom.dcmread(str(out / "study_seg.dcm"))
    assert seg.Modality == "SEG" and seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == info["dwi_uid"]
    assert int(seg.NumberOfFrames) == 24 and seg.SegmentSequence[0].SegmentLabel == "lesion"
    frames = seg.pixel_array
    nii = nib.load(str(out / "study.nii.gz"))
    assert frames.shape == (24, 40, 40) and int(frames.sum()) == int(np.asanyarray(nii.dataobj).sum())
    # the structured report: the lesion volume and count of the summary, tied to the SEG's segment and the series
    stats = json.loads((out / "summary.json").read_text())["cases"]["study"]["lesions"]["lesion"]
    assert stats["lesions"] > 0
    sr = hd.sr.srread(str(out / "study_sr.dcm"))
    assert sr.Modality == "SR" and sr.StudyInstanceUID == seg.StudyInstanceUID and sr.PatientID == seg.PatientID
    (group,) = sr.content.get_volumetric_roi_measurement_groups()
    assert group.referenced_segment.referenced_sop_instance_uid == seg.SOPInstanceUID
    assert group.referenced_segment.referenced_segment_numbers == [1]
    assert group.referenced_segment.source_series_for_segmentation.value == info["dwi_uid"]
    measured = {m.name.meaning: (m.value, m.unit.value) for m in group.get_measurements()}
    assert measured["Volume"][1] == "ml" and measured["Volume"][0] == pytest.approx(stats["volume_ml"], rel=1e-6)
    assert measured["Number of lesions"][0] == stats["lesions"]
    # which model made them: the checkpoint's SHA-256, in the summary, the SEG and the SR
    import hashlib

    summary = json.loads((out / "summary.json").read_text())
    digest = hashlib.sha256(Path(summary["model"]).read_bytes()).hexdigest()
    assert summary["model_sha256"] == digest
    assert seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0].AlgorithmParameters == f"model_sha256={digest}"
    assert f"model_sha256={digest}" in _sr_texts(sr)
    # the lesion volume read from the SEG itself: voxel count x voxel volume
    voxel_ml = float(np.prod(nii.header.get_zooms()[:3])) / 1000
    assert measured["Volume"][0] == pytest.approx(int(frames.sum()) * voxel_ml, rel=1e-5)


def test_no_dicom_seg_writes_nifti_only(cli, tiny_model, tmp_path):
    export, _ = _dicom_export(tmp_path / "study")
    r = cli("infer", "--model", tiny_model, export, "--out", tmp_path / "out", "--no-tta", "--no-dicom-seg")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["study.nii.gz", "summary.csv", "summary.json"]


def _outline(mask2d: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    return ndimage.binary_dilation(mask2d, ndimage.generate_binary_structure(2, 1)) & ~mask2d


def test_dicom_overlay_outlines_the_seg_on_a_copy_of_the_series(cli, tiny_model, tiny_cache, tmp_path, caplog):
    """--dicom-overlay: for viewers without DICOM SEG, a new series of the reference images, pixel for pixel and
    place for place, with the outline around each SEG lesion as an overlay plane."""
    export, info = _dicom_export(tmp_path / "study")
    out = tmp_path / "out"
    r = cli("infer", "--model", tiny_model, export, "--out", out, "--no-tta", "--dicom-overlay")
    assert r.exit_code == 0, r.output
    seg = pydicom.dcmread(str(out / "study_seg.dcm"))
    seg_frame = {item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID: frame
                 for item, frame in zip(seg.PerFrameFunctionalGroupsSequence, seg.pixel_array)}
    sources = {}
    for f in (export / "DICOM" / "0001").iterdir():
        ds = pydicom.dcmread(str(f))
        sources[ds.SOPInstanceUID] = ds
    files = sorted((out / "study_overlay").iterdir())
    assert len(files) == 24
    copies = [pydicom.dcmread(str(f)) for f in files]
    assert len({c.SeriesInstanceUID for c in copies}) == 1 and copies[0].SeriesInstanceUID != info["dwi_uid"]
    drawn = 0
    for copy in copies:
        source = sources[copy.SourceImageSequence[0].ReferencedSOPInstanceUID]
        assert copy.SOPInstanceUID != source.SOPInstanceUID and copy.StudyInstanceUID == source.StudyInstanceUID
        assert copy.PixelData == source.PixelData and copy.ImagePositionPatient == source.ImagePositionPatient
        assert copy.ImageOrientationPatient == source.ImageOrientationPatient and "DERIVED" in copy.ImageType
        lesion = seg_frame[source.SOPInstanceUID].astype(bool)
        overlay = copy.overlay_array(0x6000).astype(bool)
        assert np.array_equal(overlay, _outline(lesion))
        assert copy[0x6000, 0x1500].value == "lesion"
        drawn += int(overlay.sum())
    assert drawn > 0
    # --skip-existing counts the overlay folder among the case's outputs
    r = cli("infer", "--model", tiny_model, export, "--out", out, "--no-tta", "--dicom-overlay", "--skip-existing")
    assert r.exit_code == 0 and "1 skipped" in r.output, r.output
    # NIfTI cases have no DICOM images to copy: said once, not silently skipped
    logging.getLogger("segpipe").propagate = True  # the commands above made it print on its own: caplog needs the records
    with caplog.at_level(logging.WARNING, logger="segpipe"):
        report = infer(tiny_model, [tiny_cache.parent / "m.json"], tmp_path / "nifti", tta=False, dicom_overlay=True)
    assert not report.failed and "cases are not DICOM exports and get no overlay series" in caplog.text


def test_dicom_export_as_zip_archive(cli, tiny_model, tmp_path):
    """A PACS portal's or a viewer's download (a ZIP of the export) segments as the folder does, named after
    the archive; unsafe, empty, damaged and password-protected archives are one line each."""
    import shutil
    import zipfile

    export, _ = _dicom_export(tmp_path / "study")
    archive = Path(shutil.make_archive(str(tmp_path / "zips" / "patient7"), "zip", root_dir=export))
    r = cli("infer", "--model", tiny_model, export, archive, "--out", tmp_path / "out", "--no-tta")
    assert r.exit_code == 0, r.output
    out = tmp_path / "out"
    for name in ("patient7.nii.gz", "patient7_seg.dcm", "patient7_sr.dcm"):
        assert (out / name).is_file(), name
    mask = np.asanyarray(nib.load(str(out / "patient7.nii.gz")).dataobj)
    assert np.array_equal(mask, np.asanyarray(nib.load(str(out / "study.nii.gz")).dataobj)) and mask.any()
    assert json.loads((out / "summary.json").read_text())["cases"]["patient7"]["input"] == str(archive)
    r = cli("inspect", archive)  # the series in it, as for a folder
    assert r.exit_code == 0 and f"DICOM export {archive}: 3 image series" in r.output, r.output

    def bad(name, members=(), data=None):
        path = tmp_path / "zips" / name
        if data is not None:
            path.write_bytes(data)
        else:
            with zipfile.ZipFile(path, "w") as z:
                for member, content in members:
                    z.writestr(member, content)
        r = cli("infer", "--model", tiny_model, path, "--out", tmp_path / f"out_{name}", "--no-tta")
        assert r.exit_code == 1 and "Traceback" not in r.output and not (tmp_path / f"out_{name}").exists(), r.output
        return r.output

    dicom_bytes = next((export / "DICOM" / "0001").iterdir()).read_bytes()
    assert "names a file outside itself ('../escape.dcm'); refused" in bad("slip.zip", [("../escape.dcm", dicom_bytes)])
    assert "a ZIP archive without DICOM files" in bad("notes.zip", [("readme.txt", "no images here")])
    assert "not a readable ZIP archive" in bad("cut.zip", data=archive.read_bytes()[: archive.stat().st_size // 2])
    # a password-protected archive (zipfile writes none: the encryption flag set by hand, in both headers)
    raw = bytearray((tmp_path / "zips" / "notes.zip").read_bytes())
    for signature, offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        at = raw.index(signature) + offset
        raw[at] |= 0x1
    assert "password-protected" in bad("locked.zip", data=bytes(raw))


def test_dicom_selection_errors(tmp_path):
    export, _ = _dicom_export(tmp_path / "study")
    series = find_series(export)
    assert [s.number for s in series] == [4, 7, 8]
    with pytest.raises(SegpipeError, match="no series found for channel 't1'") as info:
        select_series(series, ["t1"], where="study")
    assert len(info.value.details) == 3 and "#7 'ep2d_diff_3scan_trace_p2 TRACEW' (MR, 24 files), b=1000" in info.value.details[1]
    with pytest.raises(SegpipeError, match=r"2 candidate series for channel 'dwi'.*--series dwi=NUMBER") as info:
        select_series(series, ["dwi"], rules={"dwi": {"description": "ep2d", "exclude": "^$", "min_b_value": 0}}, where="study")
    assert len(info.value.details) == 2
    chosen = select_series(series, ["dwi"], forced={"dwi": 8})
    assert chosen["dwi"][0].number == 8
    with pytest.raises(SegpipeError, match=r"--series dwi=7 and --series adc=7: one series for two channels") as info:
        select_series(series, ["dwi", "adc"], forced={"dwi": 7, "adc": 7}, where="study")
    assert len(info.value.details) == 3
    # a series chosen by hand is not also taken by a rule for another channel, whatever the channels' order
    with pytest.raises(SegpipeError, match="no series found for channel 'dwi'"):
        select_series(series, ["dwi", "adc"], forced={"adc": 7}, where="study")
    chosen = select_series(series, ["dwi", "adc"], forced={"adc": 8}, where="study")
    assert [(ch, s.number) for ch, (s, _) in chosen.items()] == [("dwi", 7), ("adc", 8)]
    with pytest.raises(SegpipeError, match="no DICOM|no image series"):
        empty = tmp_path / "empty"
        empty.mkdir()
        select_series(find_series(empty), ["dwi"], where=str(empty))


def test_multi_b_value_series_uses_the_highest_b(tmp_path):
    case = _case(4)
    study, frame = generate_uid(), generate_uid()
    write_dicom_series(case.images["dwi"][0] * 3, case.images["dwi"][1], tmp_path / "s", description="DWI", series_number=3,
                       study_uid=study, frame_uid=frame, b_value=0, prefix="B0_")
    b1000 = write_dicom_series(case.images["dwi"][0], case.images["dwi"][1], tmp_path / "s", description="DWI", series_number=3,
                               study_uid=study, frame_uid=frame, b_value=1000, prefix="B1000_")
    # the same series: one SeriesInstanceUID for both b-values
    uid = pydicom.dcmread(str(b1000[0])).SeriesInstanceUID
    for f in (tmp_path / "s").glob("B0_*"):
        ds = pydicom.dcmread(str(f))
        ds.SeriesInstanceUID = uid
        ds.save_as(str(f))
    series = find_series(tmp_path / "s")
    assert len(series) == 1 and sorted(set(series[0].b_values.values())) == [0.0, 1000.0]
    info, files = select_series(series, ["dwi"])["dwi"]
    assert len(files) == 24 and all("B1000_" in f for f in files)
    vol, _, _ = read_series(info, files)
    assert vol.shape == (40, 40, 24)


def _one_series(folder, uid, marks=None):
    """Give every file in ``folder`` the SeriesInstanceUID ``uid`` (several writes, one series), and per file
    prefix the DiffusionDirectionality in ``marks``."""
    for f in folder.glob("*"):
        ds = pydicom.dcmread(str(f))
        ds.SeriesInstanceUID = uid
        for prefix, kind in (marks or {}).items():
            if f.name.startswith(prefix):
                ds.add_new((0x0018, 0x9075), "CS", kind)
        ds.save_as(str(f))


def test_directional_dwi_is_read_as_its_trace(tmp_path, caplog):
    case = _case(4)
    vol, aff = case.images["dwi"]
    study, frame = generate_uid(), generate_uid()
    rng = np.random.default_rng(1)
    gains = rng.uniform(0.8, 1.25, size=(3,) + vol.shape)
    gains[2] = 1.0 / (gains[0] * gains[1])  # the geometric mean of the three directions is the trace

    def write(folder, arr, b, prefix):
        return write_dicom_series(arr, aff, folder, description="DWI", series_number=5, study_uid=study, frame_uid=frame,
                                  b_value=b, prefix=prefix)

    raw = tmp_path / "raw"  # b0, then three directions at b=1000, no trace image: as some exports hold them
    write(raw, vol * 3 + 10, 0, "B0_")
    for k in range(3):
        write(raw, vol * gains[k], 1000, f"D{k}_")
    _one_series(raw, generate_uid())
    ref = tmp_path / "ref"
    write(ref, vol, 1000, "T_")
    expected, _, _ = read_series(find_series(ref)[0], [str(f) for f in sorted(ref.glob("*"))])
    info, files = select_series(find_series(raw), ["dwi"])["dwi"]
    assert len(files) == 3 * 24
    with caplog.at_level(logging.INFO, logger="segpipe"):
        got, sources, index = read_series(info, files)
    assert "3 diffusion images at each of 24 slice positions" in caplog.text
    assert got.shape == expected.shape and np.allclose(got.affine, expected.affine)
    np.testing.assert_allclose(got.array, expected.array, rtol=0.01, atol=0.01 * float(expected.array.max()))
    assert len(sources) == 24 and index == list(range(24))
    # the same series with the scanner's trace images in it, marked ISOTROPIC: those are taken
    write(raw, vol * 0.5, 1000, "ISO_")
    _one_series(raw, info.uid, {"ISO_": "ISOTROPIC", "D": "DIRECTIONAL"})
    info, files = select_series(find_series(raw), ["dwi"])["dwi"]
    assert len(files) == 24 and all(Path(f).name.startswith("ISO_") for f in files)
    iso, _, _ = read_series(info, files)
    np.testing.assert_allclose(iso.array, expected.array * 0.5, rtol=0.01, atol=0.01 * float(expected.array.max()))


def test_directional_frames_of_an_enhanced_file_are_read_as_the_trace(tmp_path):
    case = _case(4)
    vol, aff = case.images["dwi"]
    gains = np.random.default_rng(2).uniform(0.8, 1.25, size=(3,) + vol.shape)
    gains[2] = 1.0 / (gains[0] * gains[1])
    stacks = [(vol * 3 + 10, 0.0), *((vol * g, 1000.0) for g in gains)]
    kinds = ["NONE", "DIRECTIONAL", "DIRECTIONAL", "DIRECTIONAL"]
    order = list(np.random.default_rng(0).permutation(4 * vol.shape[2]))  # frames in no particular order
    write_enhanced_dicom([(vol, 1000.0)], aff, tmp_path / "ref" / "dwi.dcm", description="DWI", series_number=5,
                         study_uid=generate_uid(), frame_uid=generate_uid())
    ref = find_series(tmp_path / "ref")[0]
    reference = read_series(ref, ref.files)[0].array  # the trace as the reader gives a file holding just it
    for name, extra, extra_kind in (("raw", [], []), ("with_trace", [(vol * 0.5, 1000.0)], ["ISOTROPIC"])):
        n = len(stacks) + len(extra)
        write_enhanced_dicom([*stacks, *extra], aff, tmp_path / name / "dwi.dcm", description="DWI", series_number=5,
                             study_uid=generate_uid(), frame_uid=generate_uid(), directionality=[*kinds, *extra_kind],
                             frame_order=order if not extra else list(np.random.default_rng(1).permutation(n * vol.shape[2])))
        info, files = select_series(find_series(tmp_path / name), ["dwi"])["dwi"]
        got, sources, index = read_series(info, files)
        expected = reference if not extra else reference * 0.5
        assert got.shape == reference.shape and len(sources) == 1 and len(index) == n * vol.shape[2]
        assert sorted(i for i in index if i >= 0) == list(range(vol.shape[2]))  # one referenced frame per slice
        np.testing.assert_allclose(got.array, expected, rtol=0.01, atol=0.01 * float(np.abs(reference).max()))


def test_missing_slice_is_named_or_resampled(tiny_model, tmp_path, caplog):
    export, _ = _dicom_export(tmp_path / "study", uneven=True)
    out = tmp_path / "out"
    report = infer(tiny_model, [export], out, tta=False)
    assert "uneven slice spacing" in report.failed["study"] and "a missing slice" in report.failed["study"]
    assert "--allow-uneven" in report.failed["study"]
    report = infer(tiny_model, [export], out, tta=False, allow_uneven=True)
    assert not report.failed and "resampling onto even" in caplog.text
    assert nib.load(str(out / "study.nii.gz")).shape == (40, 40, 24)
    assert int(pydicom.dcmread(str(out / "study_seg.dcm")).NumberOfFrames) == 23  # one frame per source image


def test_inputs_and_channels(tmp_path):
    src = _nifti_case(tmp_path / "in")
    cases = resolve_inputs(sorted(src.iterdir()), CHANNELS)
    assert len(cases) == 1 and cases[0].id == "subj" and set(cases[0].channels) == set(CHANNELS)
    with pytest.raises(SegpipeError, match=r"expects channels dwi, adc, flair.*missing adc"):
        resolve_inputs([src / "subj_dwi.nii.gz", src / "subj_flair.nii.gz"], CHANNELS)
    explicit = resolve_inputs([], CHANNELS, {"dwi": str(src / "subj_dwi.nii.gz"), "adc": str(src / "subj_adc.nii.gz"),
                                             "flair": str(src / "subj_flair.nii.gz")})
    assert explicit[0].channels["adc"].name == "subj_adc.nii.gz"
    with pytest.raises(SegpipeError, match="give also flair"):
        resolve_inputs([], CHANNELS, {"dwi": str(src / "subj_dwi.nii.gz"), "adc": str(src / "subj_adc.nii.gz")})
    with pytest.raises(SegpipeError, match="dwi and adc are the same file .*subj_dwi.nii.gz'; give each channel its own"):
        resolve_inputs([], CHANNELS, {"dwi": str(src / "subj_dwi.nii.gz"), "adc": str(src / "." / "subj_dwi.nii.gz"),
                                      "flair": str(src / "subj_flair.nii.gz")})


def _copy_case(src: Path, dest: Path, names: dict[str, str]) -> None:
    """The channels of the case in ``src`` (subj_<channel>.nii.gz) under other names in ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    for ch, name in names.items():
        (dest / name).write_bytes((src / f"subj_{ch}.nii.gz").read_bytes())


def test_a_folder_of_several_cases(cli, tiny_model, tmp_path):
    a, b = _nifti_case(tmp_path / "a", seed=1), _nifti_case(tmp_path / "b", seed=2)
    # nnU-Net's naming (imagesTs): CASE_XXXX, XXXX the channel's index in the model's order
    nn = tmp_path / "imagesTs"
    for case, src in (("isles_001", a), ("isles_002", b)):
        _copy_case(src, nn, {ch: f"{case}_{i:04d}.nii.gz" for i, ch in enumerate(CHANNELS)})
    cases = resolve_inputs([nn], CHANNELS)
    assert [c.id for c in cases] == ["isles_001", "isles_002"]
    assert {ch: p.name for ch, p in cases[1].channels.items()} == {"dwi": "isles_002_0000.nii.gz", "adc": "isles_002_0001.nii.gz",
                                                                   "flair": "isles_002_0002.nii.gz"}
    r = cli("infer", "--model", tiny_model, nn, "--out", tmp_path / "out", "--no-tta")
    assert r.exit_code == 0 and "2 done" in r.output, r.output
    single = infer([tiny_model], [b], tmp_path / "single", tta=False)  # the same images as one case: the same mask
    assert not single.failed
    assert np.array_equal(nib.load(str(tmp_path / "out" / "isles_002.nii.gz")).get_fdata(),
                          nib.load(str(tmp_path / "single" / "b.nii.gz")).get_fdata())
    (nn / "isles_002_0002.nii.gz").unlink()
    with pytest.raises(SegpipeError, match=r"1 case\(s\) lack one file per channel 0000..0002 \(dwi, adc, flair.*isles_002 has 0000, 0001"):
        resolve_inputs([nn], CHANNELS)
    # channel-named files of several cases in one folder; a file without a channel word (a mask) is not an image
    flat = tmp_path / "flat"
    for case, src in (("sub-01", a), ("sub-02", b)):
        _copy_case(src, flat, {ch: f"{case}_ses-1_{ch.upper() if ch == 'flair' else ch}.nii.gz" for ch in CHANNELS})
    (flat / "sub-01_ses-1_msk.nii.gz").write_bytes((a / "subj_dwi.nii.gz").read_bytes())
    cases = resolve_inputs([flat], CHANNELS)
    assert [c.id for c in cases] == ["sub-01_ses-1", "sub-02_ses-1"]
    assert cases[0].channels["flair"].name == "sub-01_ses-1_FLAIR.nii.gz"
    _copy_case(a, flat, {"dwi": "sub-03_ses-1_dwi.nii.gz"})
    with pytest.raises(SegpipeError, match="3 cases of channel-named files, 1 without exactly one file for each of dwi, adc, flair "
                                           r"\(sub_03_ses_1: sub-03_ses-1_dwi.nii.gz\)"):
        resolve_inputs([flat], CHANNELS)
    # a name that ends like nnU-Net's but with no channel index (a year) is an ordinary one-case file
    (tmp_path / "year").mkdir()
    (tmp_path / "year" / "flair_2021.nii.gz").write_bytes((a / "subj_flair.nii.gz").read_bytes())
    assert [(c.id, list(c.channels)) for c in resolve_inputs([tmp_path / "year"], ("flair",))] == [("year", ["flair"])]
    # one folder per case
    folders = tmp_path / "folders"
    for case, src in (("p1", a), ("p2", b)):
        _copy_case(src, folders / case, {ch: f"{ch}.nii.gz" for ch in CHANNELS})
    assert [(c.id, sorted(c.channels)) for c in resolve_inputs([folders], CHANNELS)] == [("p1", sorted(CHANNELS)), ("p2", sorted(CHANNELS))]
    # nothing usable
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(SegpipeError, match="not a dataset of a known layout.*give NIfTI files, a folder of them, or a manifest"):
        resolve_inputs([tmp_path / "empty"], CHANNELS)


def test_a_dataset_folder_in_a_known_layout(synth_isles):
    cases = resolve_inputs([synth_isles], CHANNELS)
    assert len(cases) == 3 and all(set(c.channels) == set(CHANNELS) for c in cases)
    assert all("_dwi.nii.gz" in c.channels["dwi"].name and "FLAIR" in c.channels["flair"].name for c in cases)


def test_cli_failure_in_one_case_does_not_stop_the_others(cli, tiny_model, tmp_path):
    good = _nifti_case(tmp_path / "good")
    bad = _nifti_case(tmp_path / "bad", seed=5)
    data = (bad / "subj_adc.nii.gz").read_bytes()
    (bad / "subj_adc.nii.gz").write_bytes(data[: len(data) // 3])
    r = cli("infer", "--model", tiny_model, good, bad, "--out", tmp_path / "out", "--no-tta", "--min-lesion-mm3", "50")
    assert r.exit_code == 1, r.output
    assert "1 done, 1 failed" in r.output and "bad:" in r.output and "cannot be read" in r.output and "Traceback" not in r.output
    assert (tmp_path / "out" / "good.nii.gz").is_file() and not (tmp_path / "out" / "bad.nii.gz").exists()
    # summary.csv: a row per case, the failed one with its error; the numbers are summary.json's
    import csv

    rows = {r["case"]: r for r in csv.DictReader((tmp_path / "out" / "summary.csv").open())}
    entry = json.loads((tmp_path / "out" / "summary.json").read_text())["cases"]["good"]
    assert rows["good"]["status"] == "done" and int(rows["good"]["lesion_lesions"]) == entry["lesions"]["lesion"]["lesions"]
    assert float(rows["good"]["lesion_volume_ml"]) == pytest.approx(entry["lesions"]["lesion"]["volume_ml"], abs=1e-3)
    assert rows["bad"]["status"] == "failed" and "cannot be read" in rows["bad"]["error"] and rows["bad"]["lesion_lesions"] == ""


def test_model_checks(cli, tiny_model, tmp_path):
    src = _nifti_case(tmp_path / "in")
    not_ckpt = tmp_path / "x.pt"
    not_ckpt.write_bytes(b"garbage")
    r = cli("infer", "--model", not_ckpt, src, "--out", tmp_path / "o")
    assert r.exit_code == 1 and "not a readable PyTorch checkpoint" in r.output
    plain = tmp_path / "plain.pt"
    torch.save({"state": torch.zeros(2)}, plain)
    r = cli("infer", "--model", plain, src, "--out", tmp_path / "o")
    assert r.exit_code == 1 and "not a segpipe checkpoint" in r.output

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    evil = tmp_path / "evil.pt"
    torch.save({"format": "segpipe-checkpoint-v1", "x": Evil()}, evil)
    r = cli("infer", "--model", evil, src, "--out", tmp_path / "o")
    assert r.exit_code == 1 and "refused, loading it would run pickled code" in r.output and "pwned" not in r.output
    r = cli("infer", "--model", tmp_path / "nothing", src, "--out", tmp_path / "o")
    assert r.exit_code == 1 and "not found" in r.output
    assert not (tmp_path / "o").exists()  # a bad model leaves no output folder behind
    (tmp_path / "file").write_text("x")
    r = cli("infer", "--model", tiny_model, src, "--out", tmp_path / "file" / "o")
    assert r.exit_code == 1 and "cannot be created" in r.output
    r = cli("infer", "--model", tiny_model, "--out", tmp_path / "o")
    assert r.exit_code == 2 and "give INPUT" in r.output
    r = cli("infer", "--model", tiny_model, src, "--out", tmp_path / "o", "--series", "dwi")
    assert r.exit_code == 2 and "--series" in r.output


def test_workers_split_the_cases_and_agree(tiny_model, tmp_path):
    a = _nifti_case(tmp_path / "a", seed=1)
    b = _nifti_case(tmp_path / "b", seed=2)
    one = infer(tiny_model, [a, b], tmp_path / "one", tta=False)
    two = infer(tiny_model, [a, b], tmp_path / "two", tta=False, workers=2)
    assert sorted(one.done) == sorted(two.done) == ["a", "b"] and not two.failed
    for cid in ("a", "b"):
        m1 = np.asanyarray(nib.load(str(tmp_path / "one" / f"{cid}.nii.gz")).dataobj)
        m2 = np.asanyarray(nib.load(str(tmp_path / "two" / f"{cid}.nii.gz")).dataobj)
        assert np.array_equal(m1, m2)
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["workers"] == 2


def test_config_dicom_rules_and_inference_defaults(cli, tiny_model, tmp_path):
    case = _case(6)
    study, frame = generate_uid(), generate_uid()
    root = tmp_path / "study"
    # descriptions the built-in rules do not recognise as DWI
    write_dicom_series(*case.images["dwi"], root / "a", description="Ax SE 1000", series_number=2, study_uid=study, frame_uid=frame)
    write_dicom_series(*case.images["adc"], root / "a", description="ADC map", series_number=3, study_uid=study, frame_uid=frame, prefix="A")
    write_dicom_series(*case.images["flair"], root / "b", description="FLAIR ax", series_number=4, study_uid=study, frame_uid=frame)
    r = cli("infer", "--model", tiny_model, root, "--out", tmp_path / "o1", "--no-tta")
    assert r.exit_code == 1 and "no series found for channel 'dwi'" in r.output
    cfg = tmp_path / "infer.yaml"
    cfg.write_text("infer:\n  tta: false\n  min_lesion_mm3: 1000000\n  dicom_rules:\n    dwi:\n      description: 'se 1000'\n      min_b_value: 0\n")
    r = cli("infer", "--model", tiny_model, root, "--out", tmp_path / "o2", "--config", cfg)
    assert r.exit_code == 0, r.output
    summary = json.loads((tmp_path / "o2" / "summary.json").read_text())
    # every lesion is under a litre: the configured minimum size removed them all
    assert summary["cases"]["study"]["lesions"]["lesion"]["lesions"] == 0


@pytest.mark.parametrize("perm,signs,shift", [((0, 1, 2), (1, 1, 1), (0, 0, 0)), ((0, 1, 2), (-1, 1, 1), (3, -2, 1)),
                                              ((2, 0, 1), (1, -1, -1), (8, 5, 0)), ((1, 0, 2), (-1, -1, 1), (30, 2, -40))])
def test_index_inversion_equals_monai_resampling(perm, signs, shift):
    """The exact path (axis order, flips, whole-voxel shift) gives what ResampleToMatch gives, zero outside."""
    from monai.data import MetaTensor
    from monai.transforms.spatial.array import ResampleToMatch

    from segpipe.inference.predictor import _index_map, resample_to_grid

    rng = np.random.default_rng(0)
    probs = torch.from_numpy(rng.random((2, 9, 11, 7)).astype(np.float32))
    src_affine = np.diag([2.0, 1.5, 3.0, 1.0])
    src_affine[:3, 3] = (10, -20, 5)
    m = np.zeros((4, 4))
    m[3, 3] = 1
    for i in range(3):  # destination axis i reads source axis perm[i]
        m[perm[i], i] = signs[i]
        m[perm[i], 3] = shift[perm[i]]
    dst_affine = src_affine @ m
    dst_shape = (8, 12, 10)
    assert _index_map(src_affine, dst_affine) is not None
    ours = resample_to_grid(probs, src_affine, dst_shape, dst_affine)
    ref = ResampleToMatch(mode="bilinear", padding_mode="zeros", dtype=torch.float32)(
        MetaTensor(probs, affine=torch.as_tensor(src_affine)), img_dst=MetaTensor(torch.zeros((1, *dst_shape)), affine=torch.as_tensor(dst_affine)))
    assert ours.shape == (2, *dst_shape)
    assert torch.allclose(ours, ref.as_tensor(), atol=1e-5)
    assert float(ours.abs().sum()) > 0 or shift[0] == 30
    # half a voxel off: no exact map, MONAI resamples
    shifted = dst_affine.copy()
    shifted[:3, 3] += 0.5 * src_affine[:3, :3].diagonal()
    assert _index_map(src_affine, shifted) is None
    assert resample_to_grid(probs, src_affine, dst_shape, shifted).shape == (2, *dst_shape)


@pytest.mark.parametrize("k", [2, 4])
def test_class_argmax_equals_torch_argmax(k):
    from segpipe.inference.sliding import class_argmax

    probs = torch.rand((k, 7, 9, 5), generator=torch.Generator().manual_seed(k))
    probs[:, 0, 0, 0] = 0.5  # a tie goes to the lower class, as with argmax
    ours = class_argmax(probs)
    assert ours.dtype == torch.uint8 and torch.equal(ours.long(), probs.argmax(0))


def _mixed_inputs(tmp_path):
    """Two NIfTI cases, one unreadable, one DICOM export: every kind of input and a failure in the middle."""
    a = _nifti_case(tmp_path / "a", seed=1)
    bad = _nifti_case(tmp_path / "bad", seed=5)
    data = (bad / "subj_adc.nii.gz").read_bytes()
    (bad / "subj_adc.nii.gz").write_bytes(data[: len(data) // 3])
    export, _ = _dicom_export(tmp_path / "study")
    b = _nifti_case(tmp_path / "b", seed=2)
    return [a, bad, export, b]


def _sr_texts(items) -> list[str]:
    """Every TEXT value of a structured report's content tree."""
    found = []
    for item in items.ContentSequence if hasattr(items, "ContentSequence") else items:
        if item.ValueType == "TEXT":
            found.append(str(item.TextValue))
        if "ContentSequence" in item:
            found += _sr_texts(item.ContentSequence)
    return found


def _outputs(folder):
    def content(p: Path):
        if p.name.endswith(".nii.gz"):
            return np.asanyarray(nib.load(str(p)).dataobj)
        if p.name.endswith("_sr.dcm"):  # the measurements
            groups = hd.sr.srread(str(p)).content.get_volumetric_roi_measurement_groups()
            return np.array([[m.value for m in g.get_measurements()] for g in groups])
        return pydicom.dcmread(str(p)).pixel_array

    return {p.name: content(p) for p in sorted(folder.iterdir()) if not p.name.startswith("summary.")}


def test_preprocessing_processes_give_the_same_outputs(tiny_model, tmp_path):
    inputs = _mixed_inputs(tmp_path)
    seq = infer(tiny_model, inputs, tmp_path / "seq", tta=False, preprocess_workers=0, save_probabilities=True)
    par = infer(tiny_model, inputs, tmp_path / "par", tta=False, preprocess_workers=2, save_probabilities=True)
    assert list(par.done) == list(seq.done) == ["a", "study", "b"]
    assert list(par.failed) == ["bad"] and "cannot be read" in par.failed["bad"] and par.failed == seq.failed
    one, two = _outputs(tmp_path / "seq"), _outputs(tmp_path / "par")
    assert sorted(one) == sorted(two) and {"study_seg.dcm", "study_sr.dcm", "b_probabilities.nii.gz"} <= set(two)
    for name in one:
        assert np.array_equal(one[name], two[name]), name
    summary = json.loads((tmp_path / "par" / "summary.json").read_text())
    assert summary["preprocess_workers"] == 2 and list(summary["cases"]) == ["a", "study", "b"]
    assert all(set(c["seconds"]) >= {"preprocess", "network", "invert", "write", "total"} for c in summary["cases"].values())


def test_a_dead_preprocessing_process_does_not_lose_cases(tiny_model, tmp_path, monkeypatch, caplog):
    import concurrent.futures as cf
    import multiprocessing
    import os

    from segpipe.inference import run

    def dying_pool(processes, level, threads):  # every process exits at once: the pool breaks on first use
        return cf.ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"), initializer=os._exit, initargs=(3,))

    monkeypatch.setattr(run, "_preprocessing_pool", dying_pool)
    prepare = run._prepare

    def slow_prepare(*args):  # cases prepared here take long enough for the pool's breaking to be seen
        time.sleep(1.0)
        return prepare(*args)

    monkeypatch.setattr(run, "_prepare", slow_prepare)
    cases = [_nifti_case(tmp_path / n, seed=s) for n, s in (("a", 1), ("b", 2), ("c", 3), ("d", 4), ("e", 5))]
    report = infer(tiny_model, cases, tmp_path / "out", tta=False, preprocess_workers=2)
    assert list(report.done) == ["a", "b", "c", "d", "e"] and not report.failed
    assert "preprocessing process stopped unexpectedly" in caplog.text


def test_processes_that_are_slow_to_start_neither_hold_up_nor_lengthen_the_run(tiny_model, tmp_path, monkeypatch):
    """Until a preprocessing process has started, the cases are prepared here; processes that never got to work
    are stopped at the end, not waited for (on the H200 machine, waiting made 6 cases 2.1x slower)."""
    import concurrent.futures as cf
    import multiprocessing

    from segpipe.inference import run

    def sleepy_pool(processes, level, threads):  # processes that take 120 s to start
        return cf.ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"), initializer=time.sleep, initargs=(120,))

    monkeypatch.setattr(run, "_preprocessing_pool", sleepy_pool)
    cases = [_nifti_case(tmp_path / f"c{i}", seed=i + 1) for i in range(3)]
    start = time.monotonic()
    report = infer(tiny_model, cases, tmp_path / "out", tta=False, preprocess_workers=2)
    assert time.monotonic() - start < 60  # 120 s and more if the run waited for them
    assert list(report.done) == ["c0", "c1", "c2"] and not report.failed
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["preprocess_workers"] == 2


def test_preprocess_workers_option_checks(cli, tiny_model, tmp_path):
    src = _nifti_case(tmp_path / "in")
    r = cli("infer", "--model", tiny_model, src, "--out", tmp_path / "o", "--preprocess-workers", "-1")
    assert r.exit_code == 2 and "--preprocess-workers: expected 0 or more, got -1" in r.output and "Traceback" not in r.output
    r = cli("infer", "--model", tiny_model, src, "--out", tmp_path / "o", "--preprocess-workers", "4096")
    assert r.exit_code == 2 and "--preprocess-workers: at most" in r.output and "got 4096" in r.output
    r = cli("infer", "--model", tiny_model, src, src, "--out", tmp_path / "o", "--preprocess-workers", "2", "--workers", "2")
    assert r.exit_code == 2 and "give one of the two" in r.output
    assert not (tmp_path / "o").exists()


def test_default_preprocess_workers(monkeypatch):
    from segpipe.inference import run

    monkeypatch.setattr(run, "usable_cores", lambda: 16)  # the cores this process may use (affinity), not the machine's
    assert run.default_preprocess_workers("cuda") == run.default_preprocess_workers("cuda:1") == 3
    assert run.default_preprocess_workers("cpu") == 0
    monkeypatch.setattr(run, "usable_cores", lambda: 2)
    assert run.default_preprocess_workers("cuda") == 1


def test_ctrl_c_with_preprocessing_processes_is_one_line(tiny_model, tmp_path):
    """Ctrl-C reaches the whole process group; preprocessing processes still importing must not print
    tracebacks, and the finished masks stay."""
    import os
    import signal
    import subprocess
    import sys

    cases = [_nifti_case(tmp_path / f"c{i}", seed=i + 1) for i in range(5)]
    cmd = [sys.executable, "-c", "from cli.main import main; main()", "infer", "--model", str(tiny_model), *map(str, cases),
           "--out", str(tmp_path / "out"), "--no-tta", "--preprocess-workers", "2"]
    # as from a terminal: Ctrl-C live in the command, whatever this process has (a shell's background job, `cmd &`,
    # starts with SIGINT ignored and Python keeps it so: the command then rightly ignores Ctrl-C; CI runs had
    # failed that way, the command segmenting every case and ending with 0)
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=Path(__file__).resolve().parents[2], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen, sent = [], None
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("c0:"):  # the first case is done: the processes are still starting
            os.killpg(proc.pid, signal.SIGINT)
            sent = time.monotonic() - start
            break
    seen.append(proc.stdout.read())
    proc.wait(timeout=60)
    text = "".join(seen)
    assert proc.returncode == 130, f"SIGINT sent at {sent} s, ended at {time.monotonic() - start:.1f} s\n{text}"
    assert "Traceback" not in text and "KeyboardInterrupt" not in text and "interrupted" in text
    assert (tmp_path / "out" / "c0.nii.gz").is_file()


def test_automatic_preprocessing_processes_only_when_worth_it(tiny_model, tmp_path, monkeypatch):
    from segpipe.inference import run

    monkeypatch.setattr(run, "default_preprocess_workers", lambda device: 2)  # as on a GPU machine
    cases = [_nifti_case(tmp_path / f"c{i}", seed=i + 1) for i in range(3)]
    used = {}
    for threshold in (1e6, 0.0):  # small cases are prepared faster here than processes start; else start them
        monkeypatch.setattr(run, "POOL_START_SECONDS", threshold)
        out = tmp_path / f"out{threshold:g}"
        report = infer(tiny_model, cases, out, tta=False)
        assert list(report.done) == ["c0", "c1", "c2"]
        used[threshold] = json.loads((out / "summary.json").read_text())["preprocess_workers"]
    assert used == {1e6: 0, 0.0: 2}


def _variant(tiny_model, path, *, noise=0.0, plan_change=None):
    """Another checkpoint from the tiny model: weights perturbed, or the plan changed."""
    from segpipe.training.checkpoint import load_checkpoint, save_checkpoint

    ckpt = load_checkpoint(tiny_model / "checkpoint_best.pt")
    ckpt.pop("format")
    gen = torch.Generator().manual_seed(7)
    ckpt["model"] = {k: v + noise * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v for k, v in ckpt["model"].items()}
    if plan_change:
        ckpt["plan"] = {**ckpt["plan"], **plan_change}
    return save_checkpoint(path, ckpt)


def test_ensemble_averages_the_members_probabilities(tiny_model, tmp_path):
    src = _nifti_case(tmp_path / "in")
    other = _variant(tiny_model, tmp_path / "other.pt", noise=0.05)
    probs = {}
    for name, models in (("a", [tiny_model]), ("b", [other]), ("ab", [tiny_model, other])):
        report = infer(models, [src], tmp_path / name, tta=False, save_probabilities=True)
        assert not report.failed, report.failed
        probs[name] = np.asanyarray(nib.load(str(tmp_path / name / "in_probabilities.nii.gz")).dataobj)
    assert not np.allclose(probs["a"], probs["b"], atol=1e-3)  # the members differ
    np.testing.assert_allclose(probs["ab"], (probs["a"] + probs["b"]) / 2, atol=1e-5)
    mask = np.asanyarray(nib.load(str(tmp_path / "ab" / "in.nii.gz")).dataobj)
    assert np.array_equal(mask, (probs["ab"] > 0.5).astype(np.uint8))  # two classes: argmax of the average
    summary = json.loads((tmp_path / "ab" / "summary.json").read_text())
    assert summary["model"] == [str(tiny_model / "checkpoint_best.pt"), str(other)]


def test_ensemble_checks(cli, tiny_model, tmp_path):
    src = _nifti_case(tmp_path / "in")
    coarse = _variant(tiny_model, tmp_path / "coarse.pt", plan_change={"target_spacing": [3.0, 3.0, 3.0]})
    r = cli("infer", "--model", tiny_model, "--model", coarse, src, "--out", tmp_path / "o")
    assert r.exit_code == 1 and "its preprocessing differs" in r.output and "target_spacing" in r.output and "Traceback" not in r.output
    r = cli("infer", "--model", tiny_model, "--model", tiny_model / "checkpoint_best.pt", src, "--out", tmp_path / "o")
    assert r.exit_code == 1 and "the same checkpoint is given twice" in r.output
    assert not (tmp_path / "o").exists()
    runs = tmp_path / "runs"
    for fold in ("fold0", "fold1"):
        (runs / fold).mkdir(parents=True)
        _variant(tiny_model, runs / fold / "checkpoint_best.pt")
    r = cli("infer", "--model", runs, src, "--out", tmp_path / "o")  # copies of one fold: not a cross-validation's folds
    assert r.exit_code == 1 and "its runs (fold0, fold1) are not the folds of one cross-validation (fold0 and fold1 both held out" in r.output
    r = cli("infer", "--model", runs / "fold0", "--model", runs / "fold1", src, "--out", tmp_path / "o", "--workers", "2", src)
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["model"][1].endswith("fold1/checkpoint_best.pt")


def test_skip_existing_continues_an_interrupted_run(cli, tiny_model, tmp_path):
    a, b = _nifti_case(tmp_path / "a", seed=1), _nifti_case(tmp_path / "b", seed=2)
    export, _ = _dicom_export(tmp_path / "study")
    out = tmp_path / "out"
    r = cli("infer", "--model", tiny_model, a, b, export, "--out", out, "--no-tta")
    assert r.exit_code == 0, r.output
    first = json.loads((out / "summary.json").read_text())["cases"]
    # as if interrupted: b's mask never written, the study's SEG missing (its mask is there)
    (out / "b.nii.gz").unlink()
    (out / "study_seg.dcm").unlink()
    a_time = (out / "a.nii.gz").stat().st_mtime_ns
    r = cli("infer", "--model", tiny_model, a, b, export, "--out", out, "--no-tta", "--skip-existing")
    assert r.exit_code == 0 and "2 done, 0 failed, 1 skipped (outputs already there)" in r.output, r.output
    assert (out / "a.nii.gz").stat().st_mtime_ns == a_time and (out / "b.nii.gz").is_file() and (out / "study_seg.dcm").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["cases"]) == ["b", "study"] and summary["skipped"] == {"a": first["a"]}
    r = cli("infer", "--model", tiny_model, a, b, export, "--out", out, "--no-tta", "--skip-existing", "--save-probabilities")
    assert r.exit_code == 0 and "3 done" in r.output  # asked for more outputs: nothing is complete
    r = cli("infer", "--model", tiny_model, a, b, export, "--out", out, "--no-tta", "--skip-existing", "--save-probabilities")
    assert r.exit_code == 0 and "0 done, 0 failed, 3 skipped" in r.output and "were made with" not in r.output
    assert json.loads((out / "summary.json").read_text())["skipped"]["a"]["outputs"] == ["a.nii.gz", "a_probabilities.nii.gz"]
    other = _variant(tiny_model, tmp_path / "other.pt", noise=0.01)
    r = cli("infer", "--model", other, a, b, export, "--out", out, "--no-tta", "--skip-existing", "--save-probabilities")
    assert r.exit_code == 0 and "were made with" in r.output and "keep the other model's masks" in r.output


def test_a_result_that_does_not_come_back_is_prepared_here(tiny_model, tmp_path, monkeypatch, caplog):
    import concurrent.futures as cf

    from segpipe.inference import run

    class NoSpace:  # a pool whose results fail to arrive, as when shared memory is full
        def submit(self, *args, **kwargs):
            fut = cf.Future()
            fut.set_exception(RuntimeError("unable to write to file </torch_1>: No space left on device (28)"))
            return fut

        def shutdown(self, **kwargs):
            pass

    monkeypatch.setattr(run, "_preprocessing_pool", lambda *a: NoSpace())
    cases = [_nifti_case(tmp_path / n, seed=s) for n, s in (("a", 1), ("b", 2), ("c", 3))]
    report = infer(tiny_model, cases, tmp_path / "out", tta=False, preprocess_workers=2)
    assert list(report.done) == ["a", "b", "c"] and not report.failed
    # 'b' is prepared here while the pool takes 'c' (a pool's processes take the cases after the one at hand)
    assert "case 'c': its preprocessing process failed to return it (RuntimeError: unable to write" in caplog.text


def _series_of(root, study, patient, *channels, frame=None):
    """Write ``channels`` of a small case as DICOM series of one study into ``root``."""
    case = _case(3)
    frame = frame or generate_uid()
    names = {"dwi": ("DWI b1000", 7, 1000.0), "adc": ("DWI_ADC", 8, None), "flair": ("FLAIR tra", 4, None)}
    for ch in channels:
        desc, number, b = names[ch]
        arr, aff = case.images[ch]
        write_dicom_series(arr, aff, root / study / ch, description=desc, series_number=number, study_uid=study, frame_uid=frame,
                           patient=patient, b_value=b)


def test_dicom_series_must_come_from_one_study(tmp_path):
    p1, p2 = ("One^Patient", "P1"), ("Two^Patient", "P2")
    both = tmp_path / "both"  # two full studies: the candidates come in pairs
    _series_of(both, generate_uid(), p1, "dwi", "adc", "flair")
    _series_of(both, generate_uid(), p2, "dwi", "adc", "flair")
    with pytest.raises(SegpipeError, match=r"2 candidate series for channel 'dwi' in 2 studies; point INPUT at the folder of one study") as info:
        select_series(find_series(both), CHANNELS, where="both")
    assert any("of patient P2" in line for line in info.value.details) and "--series cannot" not in str(info.value)
    with pytest.raises(SegpipeError, match="in 2 studies.*--series cannot tell them apart"):  # series numbers repeat between studies
        select_series(find_series(both), ["dwi"], forced={"dwi": 7}, where="both")
    mixed = tmp_path / "mixed"  # DWI of one patient, ADC and FLAIR of another: never mixed silently
    _series_of(mixed, generate_uid(), p1, "dwi")
    _series_of(mixed, generate_uid(), p2, "adc", "flair")
    with pytest.raises(SegpipeError, match="come from different patients") as info:
        select_series(find_series(mixed), CHANNELS, where="mixed")
    assert [line.split(" <- ")[0] for line in info.value.details] == ["channel dwi", "channel adc", "channel flair"]
    follow_up = tmp_path / "follow_up"  # one patient, two examinations
    _series_of(follow_up, generate_uid(), p1, "dwi", "adc")
    _series_of(follow_up, generate_uid(), p1, "flair")
    with pytest.raises(SegpipeError, match="come from different studies"):
        select_series(find_series(follow_up), CHANNELS, where="follow_up")
    one = tmp_path / "one"
    _series_of(one, generate_uid(), p1, "dwi", "adc", "flair")
    assert sorted(select_series(find_series(one), CHANNELS, where="one")) == sorted(CHANNELS)


def _export_with_enhanced_dwi(root, case, study, frame, *, enhanced=True, per_frame_geometry=False):
    """The case's DWI (with a b0 stack, frames shuffled) as one enhanced multi-frame file, or classic; ADC and
    FLAIR classic; one study."""
    arr, aff = case.images["dwi"]
    if enhanced:
        n = arr.shape[2]
        order = list(np.random.default_rng(0).permutation(2 * n))
        write_enhanced_dicom([(arr * 0.4 + 5, 0.0), (arr, 1000.0)], aff, root / "DWI" / "IM0001", description="ep2d_diff_trace",
                             series_number=7, study_uid=study, frame_uid=frame, frame_order=order,
                             per_frame_geometry=per_frame_geometry)
    else:
        write_dicom_series(arr, aff, root / "DWI", description="ep2d_diff_trace", series_number=7, study_uid=study,
                           frame_uid=frame, b_value=1000.0)
    write_dicom_series(*case.images["adc"], root / "ADC", description="ep2d_diff_ADC", series_number=8, study_uid=study, frame_uid=frame)
    write_dicom_series(*case.images["flair"], root / "FLAIR", description="t2_tirm_tra_dark-fluid", series_number=4, study_uid=study,
                       frame_uid=frame)
    return root


def test_enhanced_multiframe_reads_like_the_classic_series(tmp_path):
    case = _case(3)  # oblique LAS grid
    study, frame = generate_uid(), generate_uid()
    enhanced = _export_with_enhanced_dwi(tmp_path / "enh", case, study, frame)
    classic = _export_with_enhanced_dwi(tmp_path / "cls", case, study, frame, enhanced=False)
    e = next(s for s in find_series(enhanced) if s.number == 7)
    c = next(s for s in find_series(classic) if s.number == 7)
    assert e.multiframe and e.label == "#7 'ep2d_diff_trace' (MR, enhanced multi-frame file)" and sorted(set(e.all_b_values)) == [0, 1000]
    (ve, files_e, index_e), (vc, _, _) = read_series(e, e.files), read_series(c, c.files)
    assert ve.array.shape == vc.array.shape == case.images["dwi"][0].shape
    np.testing.assert_allclose(ve.affine, vc.affine, atol=1e-4)
    # the b1000 frames (the b0 ones hold 0.4 x + 5), up to the 16-bit quantisation of each file
    np.testing.assert_allclose(ve.array, vc.array, atol=2e-3 * float(np.ptp(vc.array)))
    n = ve.array.shape[2]
    assert files_e == e.files and len(index_e) == 2 * n and sorted(i for i in index_e if i >= 0) == list(range(n))


@pytest.mark.parametrize("per_frame_geometry", [False, True])
def test_enhanced_multiframe_export_is_segmented_and_seg_references_its_frames(tiny_model, tmp_path, per_frame_geometry, caplog):
    """Also with orientation and spacing in every frame's groups (as Philips exports them), where highdicom
    wants them shared. An overlay copy (enhanced images have no overlay planes) is left out with a warning."""
    case = _case(3)
    study, frame = generate_uid(), generate_uid()
    enhanced = _export_with_enhanced_dwi(tmp_path / "enh", case, study, frame, per_frame_geometry=per_frame_geometry)
    classic = _export_with_enhanced_dwi(tmp_path / "cls", case, study, frame, enhanced=False)
    report = infer(tiny_model, [enhanced, classic], tmp_path / "out", tta=False, dicom_overlay=True)
    assert not report.failed, report.failed
    assert (tmp_path / "out" / "cls_overlay").is_dir() and not (tmp_path / "out" / "enh_overlay").exists()
    assert "case 'enh': no overlay series: DICOM overlay: the series of" in caplog.text
    m_e = np.asanyarray(nib.load(str(tmp_path / "out" / "enh.nii.gz")).dataobj)
    m_c = np.asanyarray(nib.load(str(tmp_path / "out" / "cls.nii.gz")).dataobj)
    assert m_e.shape == m_c.shape and (m_e != m_c).mean() < 0.002  # same case; only the 16-bit quantisation differs
    seg = pydicom.dcmread(str(tmp_path / "out" / "enh_seg.dcm"))
    source = pydicom.dcmread(str(tmp_path / "enh" / "DWI" / "IM0001"))
    assert seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    frames = seg.pixel_array.reshape(-1, *seg.pixel_array.shape[-2:])
    assert int(frames.sum()) == int(m_e.sum()) > 0
    b_of = [float(f.MRDiffusionSequence[0].DiffusionBValue) for f in source.PerFrameFunctionalGroupsSequence]
    for f, item in zip(frames, seg.PerFrameFunctionalGroupsSequence):
        referenced = int(item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedFrameNumber)
        assert b_of[referenced - 1] == 1000.0 or not f.any()  # lesions only on the frames that were segmented


def test_enhanced_multiframe_bad_geometry_is_named(tmp_path):
    case = _case(3)
    arr, aff = case.images["dwi"]
    path = write_enhanced_dicom([(arr, 1000.0)], aff, tmp_path / "e" / "IM1", description="DWI", series_number=3,
                                study_uid=generate_uid(), frame_uid=generate_uid())
    ds = pydicom.dcmread(str(path))
    ds.PerFrameFunctionalGroupsSequence[5].PlanePositionSequence[0].ImagePositionPatient = \
        ds.PerFrameFunctionalGroupsSequence[4].PlanePositionSequence[0].ImagePositionPatient
    ds.save_as(str(path))
    (series,) = find_series(tmp_path / "e")
    with pytest.raises(SegpipeError, match="several images share a slice position"):
        read_series(series, series.files, what="channel 'dwi' series")
    del ds.PerFrameFunctionalGroupsSequence[2].PlanePositionSequence
    ds.save_as(str(path))
    with pytest.raises(SegpipeError, match=r"#3 'DWI' \(MR, enhanced multi-frame file\): frames without position"):
        read_series(series, series.files, what="channel 'dwi' series")


def test_synthetic_enhanced_export_segments_like_the_classic_one(tiny_model, tmp_path):
    from segpipe.data.synthetic import synthesize

    for fmt in ("dicom", "dicom-enhanced"):
        synthesize(tmp_path / fmt, "isles22", cases=1, seed=3, shape=(40, 40, 24), fmt=fmt)
    assert len(list((tmp_path / "dicom-enhanced" / "strokecase0001" / "DICOM").rglob("*_0*"))) == 3  # one file per series
    masks = {}
    for fmt in ("dicom", "dicom-enhanced"):
        report = infer(tiny_model, [tmp_path / fmt / "strokecase0001"], tmp_path / f"out-{fmt}", tta=False)
        assert not report.failed, report.failed
        assert (tmp_path / f"out-{fmt}" / "strokecase0001_seg.dcm").is_file()
        masks[fmt] = np.asanyarray(nib.load(str(tmp_path / f"out-{fmt}" / "strokecase0001.nii.gz")).dataobj)
    assert (masks["dicom"] != masks["dicom-enhanced"]).mean() < 0.002 and masks["dicom"].any()


def test_a_dicom_folder_of_several_studies_is_a_batch(cli, tiny_model, tmp_path):
    p1, p2 = ("One^Patient", "P1"), ("Two^Patient", "P2")
    batch = tmp_path / "pacs"
    _series_of(batch / "exam_b", generate_uid(), p2, "dwi", "adc", "flair")
    _series_of(batch / "exam_a", generate_uid(), p1, "dwi", "adc", "flair")
    _series_of(batch / "exam_c", generate_uid(), p1, "dwi", "adc")  # a follow-up without FLAIR: that case fails alone
    r = cli("infer", "--model", tiny_model, batch, "--out", tmp_path / "out", "--no-tta")
    assert r.exit_code == 1 and "2 done, 1 failed" in r.output, r.output
    assert "pacs_exam_c: DICOM input" in r.output and "no series found for channel 'flair'" in r.output
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert list(summary["cases"]) == ["pacs_exam_a", "pacs_exam_b"]
    assert all((tmp_path / "out" / f"pacs_exam_{x}_seg.dcm").is_file() for x in "ab")
    seg_b = pydicom.dcmread(str(tmp_path / "out" / "pacs_exam_b_seg.dcm"))
    assert seg_b.PatientID == "P2"  # each SEG belongs to its own examination
    flat = tmp_path / "flat"  # two studies' files in one folder: numbered
    case = _case(3)
    for k, patient in enumerate((p1, p2)):
        write_dicom_series(*case.images["dwi"], flat, description="DWI", series_number=7, study_uid=generate_uid(),
                           frame_uid=generate_uid(), patient=patient, prefix=f"S{k}_")
    assert [c.id for c in resolve_inputs([flat], CHANNELS)] == ["flat_study1", "flat_study2"]


def test_dicom_case_folder_joins_series_an_anonymiser_split_into_studies(cli, tiny_model, tmp_path, caplog):
    patient = ("Anon^Patient", "ANON1")
    export = tmp_path / "anon"
    frame = generate_uid()
    for ch in CHANNELS:  # each series in a study of its own, as some anonymisers write them
        _series_of(export / ch, generate_uid(), patient, ch, frame=frame)
    r = cli("infer", "--model", tiny_model, export, "--out", tmp_path / "by_study", "--no-tta")
    assert r.exit_code == 1 and "0 done, 3 failed" in r.output  # by study: three cases of one series each
    r = cli("infer", "--model", tiny_model, export, "--out", tmp_path / "one", "--no-tta", "--dicom-case", "folder")
    assert r.exit_code == 0 and "1 done" in r.output, r.output
    assert (tmp_path / "one" / "anon.nii.gz").is_file() and (tmp_path / "one" / "anon_seg.dcm").is_file()
    logging.getLogger("segpipe").propagate = True  # the commands above made it print on its own: caplog needs the records
    with caplog.at_level(logging.WARNING, logger="segpipe"):
        report = infer([tiny_model], [export], tmp_path / "again", tta=False, dicom_case="folder")
    assert not report.failed and "come from different studies" in caplog.text and "--dicom-case folder" in caplog.text
    r = cli("infer", "--model", tiny_model, export, "--out", tmp_path / "x", "--dicom-case", "studies")
    assert r.exit_code == 2 and "did you mean 'study'" in r.output


def _fold_models(tiny_model, tiny_cache, folder):
    """One checkpoint per fold of the tiny cache (the tiny model's weights, perturbed differently), each
    recording the cases its training held out, as `segpipe train --fold F` writes them."""
    from segpipe.training.checkpoint import load_checkpoint, save_checkpoint

    folds = json.loads((tiny_cache / "cache.json").read_text())["folds"]
    cases = json.loads((tiny_cache / "cache.json").read_text())["cases"]
    paths = []
    for f, val in enumerate(folds):
        path = _variant(tiny_model, folder / f"fold{f}.pt", noise=0.05 * (f + 1))
        ckpt = load_checkpoint(path)
        ckpt.pop("format")
        ckpt.update(fold=str(f), validation_cases=list(val), training_cases=[c for c in cases if c not in val])
        paths.append(save_checkpoint(path, ckpt))
    return paths, folds


def test_training_records_the_cases_it_held_out(tiny_model, tiny_cache):
    from segpipe.training.checkpoint import load_checkpoint

    index = json.loads((tiny_cache / "cache.json").read_text())
    ckpt = load_checkpoint(tiny_model / "checkpoint_best.pt")
    assert ckpt["fold"] == "0" and ckpt["validation_cases"] == list(index["folds"][0])
    assert sorted(ckpt["training_cases"] + ckpt["validation_cases"]) == sorted(index["cases"])


def test_cross_validation_segments_each_case_with_the_model_that_held_it_out(tiny_model, tiny_cache, tmp_path):
    manifest = tiny_cache.parent / "m.json"
    models, folds = _fold_models(tiny_model, tiny_cache, tmp_path)
    report = infer(models, [manifest], tmp_path / "cv", tta=False, save_probabilities=True, cross_validation=True)
    assert not report.failed and sorted(report.done) == sorted(c for fold in folds for c in fold)
    summary = json.loads((tmp_path / "cv" / "summary.json").read_text())
    assert summary["cross_validation"] is True and summary["not_held_out"] == []

    def probs(folder, cid):
        return np.asanyarray(nib.load(str(folder / f"{cid}_probabilities.nii.gz")).dataobj)

    for f, (model, val) in enumerate(zip(models, folds)):
        alone = infer([model], [manifest], tmp_path / f"alone{f}", tta=False, save_probabilities=True)  # every case, one model
        for cid in report.done:
            same = np.allclose(probs(tmp_path / "cv", cid), probs(tmp_path / f"alone{f}", cid), atol=1e-6)
            assert same == (cid in val), (cid, f)  # equal to the fold's model on its own validation cases only
            if cid in val:
                assert summary["cases"][cid]["model"] == [str(model)]
        assert not alone.failed


def test_a_folder_of_fold_runs_is_their_ensemble(cli, tiny_model, tiny_cache, tmp_path):
    from segpipe.training.checkpoint import load_checkpoint, save_checkpoint

    manifest = tiny_cache.parent / "m.json"
    models, _ = _fold_models(tiny_model, tiny_cache, tmp_path)
    runs = tmp_path / "exp"
    for f, model in enumerate(models):
        (runs / f"fold_{f}").mkdir(parents=True)
        (runs / f"fold_{f}" / "checkpoint_best.pt").write_bytes(model.read_bytes())
    r = cli("infer", "--model", runs, manifest, "--out", tmp_path / "folder", "--no-tta", "--save-probabilities")
    assert r.exit_code == 0, r.output
    listed = [a for m in models for a in ("--model", m)]
    r = cli("infer", *listed, manifest, "--out", tmp_path / "listed", "--no-tta", "--save-probabilities")
    assert r.exit_code == 0, r.output
    for f in sorted((tmp_path / "listed").glob("*_probabilities.nii.gz")):
        np.testing.assert_allclose(nib.load(str(tmp_path / "folder" / f.name)).get_fdata(), nib.load(str(f)).get_fdata(), atol=1e-6)
    assert len(json.loads((tmp_path / "folder" / "summary.json").read_text())["model"]) == 3
    r = cli("infer", "--model", runs, manifest, "--out", tmp_path / "cv", "--no-tta", "--cross-validation")
    assert r.exit_code == 0 and "3 done" in r.output, r.output
    r = cli("inspect", runs)  # the ensemble as deployed: each member, its fold and its SHA-256
    assert r.exit_code == 0 and "an ensemble of 3 checkpoints" in r.output, r.output
    import hashlib

    for f, model in enumerate(models):
        assert f"fold_{f}/checkpoint_best.pt: fold {f}," in r.output
        assert f"sha256 {hashlib.sha256(model.read_bytes()).hexdigest()}" in r.output
    ckpt = load_checkpoint(models[2])  # a --fold all run among them: refused, named
    ckpt.pop("format")
    ckpt.update(fold="all", validation_cases=[])
    save_checkpoint(runs / "fold_2" / "checkpoint_best.pt", ckpt)
    r = cli("infer", "--model", runs, manifest, "--out", tmp_path / "x")
    assert r.exit_code == 1 and "(fold_2 was trained on every case (--fold all))" in r.output
    r = cli("inspect", runs)
    assert r.exit_code == 1 and "(fold_2 was trained on every case (--fold all))" in r.output and "would refuse it too" in r.output


def test_cross_validation_with_some_folds_and_bad_inputs(cli, tiny_model, tiny_cache, tmp_path):
    from segpipe.training.checkpoint import load_checkpoint, save_checkpoint

    manifest = tiny_cache.parent / "m.json"
    models, folds = _fold_models(tiny_model, tiny_cache, tmp_path)
    # one fold's model: its validation cases only; the others are listed as held out by none (also with --workers 2)
    r = cli("infer", "--model", models[1], manifest, "--out", tmp_path / "one", "--cross-validation", "--no-tta", "--workers", "2")
    assert r.exit_code == 0, r.output
    summary = json.loads((tmp_path / "one" / "summary.json").read_text())
    assert sorted(summary["cases"]) == sorted(folds[1])
    assert sorted(summary["not_held_out"]) == sorted(c for f in (0, 2) for c in folds[f])
    assert "segpipe evaluate --pred" in r.output
    # a case the models never saw; one case given by --channel
    src = _nifti_case(tmp_path / "in")
    r = cli("infer", "--model", models[0], src, "--out", tmp_path / "o", "--cross-validation")
    assert r.exit_code == 1 and "none of the 1 input cases was held out by the given models" in r.output
    r = cli("infer", "--model", models[0], "--channel", f"dwi={src / 'subj_dwi.nii.gz'}", "--out", tmp_path / "o", "--cross-validation")
    assert r.exit_code == 2 and "--cross-validation: give the manifest (or the dataset folder)" in r.output
    # a model trained on every case, and one that does not record its held-out cases
    for name, change in (("all", {"fold": "all", "validation_cases": []}), ("old", None)):
        ckpt = load_checkpoint(models[0])
        ckpt.pop("format")
        if change is None:
            ckpt.pop("validation_cases")
        else:
            ckpt.update(change)
        path = save_checkpoint(tmp_path / f"{name}.pt", ckpt)
        r = cli("infer", "--model", path, "--model", models[1], manifest, "--out", tmp_path / "o", "--cross-validation")
        assert r.exit_code == 1 and "Traceback" not in r.output
        assert ("trained on every case (--fold all)" if change else "does not record which cases") in r.output
    # a manifest of other cases
    other = json.loads(manifest.read_text())
    root = (manifest.parent / other["root"]).resolve()
    for c in other["cases"]:
        c["id"] = "other_" + c["id"]
    other.update(root=str(root), folds={"k": 1, "seed": 0, "validation": [[c["id"] for c in other["cases"]]]})
    (tmp_path / "other.json").write_text(json.dumps(other))
    r = cli("infer", "--model", models[0], tmp_path / "other.json", "--out", tmp_path / "o", "--cross-validation")
    assert r.exit_code == 1 and "was held out by the given models" in r.output
    assert not (tmp_path / "o").exists()


def test_dcm2niix_4d_dwi_with_bval_reads_as_its_highest_b_trace(tiny_model, tmp_path, caplog):
    from segpipe.io.nifti import read_volume

    src = _nifti_case(tmp_path / "in3d")
    dwi = nib.load(str(src / "subj_dwi.nii.gz"))
    trace = np.asanyarray(dwi.dataobj).astype(np.float32)
    rng = np.random.default_rng(0)
    # b0, then three directions at b=1000 (and one at 995: the same shell, as scanners round) whose geometric mean is the trace
    gains = rng.uniform(0.7, 1.3, size=(3,) + trace.shape)
    gains[2] = 1.0 / (gains[0] * gains[1])
    vols = [trace * 3 + 10, *(trace * g for g in gains)]
    (tmp_path / "in4d").mkdir()
    for ch in ("adc", "flair"):
        (tmp_path / "in4d" / f"subj_{ch}.nii.gz").write_bytes((src / f"subj_{ch}.nii.gz").read_bytes())
    four = tmp_path / "in4d" / "subj_dwi.nii.gz"
    nib.save(nib.Nifti1Image(np.stack(vols, axis=3).astype(np.float32), dwi.affine, header=dwi.header), str(four))
    (tmp_path / "in4d" / "subj_dwi.bval").write_text("0 1000 995 1000\n")
    with caplog.at_level(logging.INFO, logger="segpipe"):
        vol = read_volume(four, what="channel 'dwi'")
    np.testing.assert_allclose(vol.array, trace, rtol=1e-4, atol=1e-4)
    assert "using b=1000 (geometric mean of its 3 volumes)" in caplog.text
    # segmented like the 3D trace image, the mask on the 3D grid
    for name in ("in3d", "in4d"):
        report = infer([tiny_model], [tmp_path / name], tmp_path / f"out_{name}", tta=False, save_probabilities=True)
        assert not report.failed, report.failed
    p3 = nib.load(str(tmp_path / "out_in3d" / "in3d_probabilities.nii.gz")).get_fdata()
    p4 = nib.load(str(tmp_path / "out_in4d" / "in4d_probabilities.nii.gz")).get_fdata()
    np.testing.assert_allclose(p4, p3, atol=1e-3)
    assert nib.load(str(tmp_path / "out_in4d" / "in4d.nii.gz")).shape == trace.shape
    # bad sidecars: one line each; without one, the 4D file is refused with the hint
    (tmp_path / "in4d" / "subj_dwi.bval").write_text("0 1000\n")
    with pytest.raises(SegpipeError, match="4 volumes but 2 b-values"):
        read_volume(four)
    (tmp_path / "in4d" / "subj_dwi.bval").write_text("0 b1000 0 0\n")
    with pytest.raises(SegpipeError, match="cannot be read"):
        read_volume(four)
    (tmp_path / "in4d" / "subj_dwi.bval").unlink()
    with pytest.raises(SegpipeError, match="found 4D .* is read when its .bval file lies next to it"):
        read_volume(four)


def test_overlap_option(cli, tiny_model, tmp_path):
    src = _nifti_case(tmp_path / "in")
    probs = {}
    for name, extra in (("default", []), ("quarter", ["--overlap", "0.25"]), ("half", ["--overlap", "0.5"])):
        r = cli("infer", "--model", tiny_model, src, "--out", tmp_path / name, "--no-tta", "--save-probabilities", *extra)
        assert r.exit_code == 0, r.output
        probs[name] = nib.load(str(tmp_path / name / "in_probabilities.nii.gz")).get_fdata()
    np.testing.assert_array_equal(probs["quarter"], probs["default"])  # the model's infer.overlap (demo.yaml) is 0.25
    assert not np.allclose(probs["half"], probs["default"], atol=1e-4)  # other windows, other blending
    assert json.loads((tmp_path / "half" / "summary.json").read_text())["overlap"] == 0.5
    r = cli("infer", "--model", tiny_model, src, "--out", tmp_path / "bad", "--overlap", "1")
    assert r.exit_code == 2 and "--overlap: expected a fraction of the window in [0, 1)" in r.output
    assert not (tmp_path / "bad").exists()


def test_workers_take_the_gpus_in_turn(monkeypatch):
    from segpipe.inference.run import worker_devices

    assert worker_devices("auto", 3) == ["auto"] * 3  # no GPU here (or one): all alike
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert worker_devices("auto", 3) == ["cuda:0", "cuda:1", "cuda:0"]
    assert worker_devices("cuda", 2) == ["cuda:0", "cuda:1"]
    assert worker_devices("cuda:1", 2) == ["cuda:1", "cuda:1"]  # an explicit GPU stays
    assert worker_devices("cpu", 2) == ["cpu", "cpu"]


def test_a_single_slice_reference_is_segmented(tiny_model, tmp_path):
    """A 2D file (one slice) is a volume one voxel deep: its header's shape is 2D, the mask's grid is 3D."""
    src = _nifti_case(tmp_path / "in")
    img = nib.load(str(src / "subj_dwi.nii.gz"))
    one = np.asanyarray(img.dataobj)[:, :, 12]
    nib.save(nib.Nifti1Image(one, img.affine), str(src / "subj_dwi.nii.gz"))
    report = infer(tiny_model, [src], tmp_path / "out", tta=False)
    assert not report.failed, report.failed
    mask = nib.load(str(tmp_path / "out" / "in.nii.gz"))
    assert mask.shape == (*one.shape, 1) and np.allclose(mask.affine, img.affine, atol=1e-5)


def test_debug_lets_an_unexpected_error_of_a_case_through(cli, tiny_model, tmp_path, monkeypatch):
    """Without --debug a bug in one case is one line and the others go on; with it, the traceback comes out
    (the per-case guard reads SEGPIPE_DEBUG, which --debug sets, so worker processes see it too)."""
    import segpipe.inference.run as run
    from cli._common import state

    src = _nifti_case(tmp_path / "in")

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(run, "_predict", boom)
    monkeypatch.setattr(state, "debug", False)
    monkeypatch.setenv("SEGPIPE_DEBUG", "0")
    report = infer(tiny_model, [src], tmp_path / "o1", tta=False)
    assert report.failed["in"].startswith("unexpected RuntimeError: boom")
    r = cli("infer", "--model", tiny_model, src, "--out", tmp_path / "o2", "--no-tta")
    assert r.exit_code == 1 and "unexpected RuntimeError: boom" in r.output
    with pytest.raises(RuntimeError, match="boom"):
        cli("--debug", "infer", "--model", tiny_model, src, "--out", tmp_path / "o3", "--no-tta")


@pytest.mark.parametrize("odd", ["orientation", "size", "spacing"])
def test_a_series_that_is_not_one_stack_is_named(tmp_path, odd):
    """A slice of another orientation (a localizer), size or pixel spacing filed under the series: one line naming
    the file, not GDCM's 'Size: [...]' or highdicom's 'shared orientation' error after the network has run."""
    export, _ = _dicom_export(tmp_path / "study", oblique=False)
    files = sorted((export / "DICOM" / "0001").glob("ADC*"))
    ds = pydicom.dcmread(str(files[5]))
    if odd == "orientation":
        ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    elif odd == "size":
        pixels = ds.pixel_array[:-4]
        ds.Rows, ds.PixelData = pixels.shape[0], pixels.tobytes()
    else:
        ds.PixelSpacing = [1.5, 1.5]
    ds.save_as(str(files[5]))
    with pytest.raises(SegpipeError) as info:
        read_series(*_adc_series(export))
    text = str(info.value)
    assert "not one stack" in text and files[5].name in text and {"orientation": "orientation [0.0, 1.0", "size": "36x40 pixels",
                                                                   "spacing": "pixel spacing [1.5, 1.5]"}[odd] in text


def _adc_series(export: Path):
    adc = next(s for s in find_series(export) if s.description.endswith("_ADC"))
    return adc, adc.files


def test_a_damaged_file_that_gdcm_leaves_out_is_named(tmp_path, caplog):
    """GDCM leaves a file cut short out of its series without a word, and the series then 'misses a slice':
    find_series names the file; a DICOMDIR and a structured report (DICOM, but no images) are not named."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.fileset import FileSet
    from pydicom.uid import ExplicitVRLittleEndian

    export, _ = _dicom_export(tmp_path / "study", oblique=False)
    adc = sorted((export / "DICOM" / "0001").glob("ADC*"))
    fs = FileSet()
    fs.add(pydicom.dcmread(str(adc[0])))
    fs.write(str(tmp_path / "fs"))
    (export / "DICOMDIR").write_bytes((tmp_path / "fs" / "DICOMDIR").read_bytes())
    sr = Dataset()
    sr.file_meta = FileMetaDataset()
    sr.file_meta.MediaStorageSOPClassUID = sr.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    sr.file_meta.MediaStorageSOPInstanceUID = sr.SOPInstanceUID = generate_uid()
    sr.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    sr.Modality, sr.SeriesInstanceUID, sr.StudyInstanceUID = "SR", generate_uid(), generate_uid()
    sr.save_as(str(export / "DICOM" / "0001" / "REPORT"), enforce_file_format=True)
    with caplog.at_level(logging.WARNING):
        find_series(export)
    assert "cannot be read" not in caplog.text  # the DICOMDIR and the report are no images
    data = adc[7].read_bytes()
    adc[7].write_bytes(data[: len(data) - 1000])
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        series = find_series(export)
    assert "1 DICOM file(s)" in caplog.text and adc[7].name in caplog.text and "cut short" in caplog.text
    assert len(next(s for s in series if s.description.endswith("_ADC")).files) == len(adc) - 1
    # cut inside its header (before Rows and the series' UID): its SOP class still says it is an image
    adc[8].write_bytes(adc[8].read_bytes()[:500])
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        series = find_series(export)
    assert "2 DICOM file(s)" in caplog.text and "cannot be read" in caplog.text
    assert len(next(s for s in series if s.description.endswith("_ADC")).files) == len(adc) - 2


def _to_mosaic(files: list[Path], out: Path, *, count_tag: bool = True) -> Path:
    """The slices ``files`` (one classic series) as one Siemens mosaic image: tiled row by row in their order
    along row x column, the position that of the whole image's corner, as Siemens stores it; the slice count
    in the private tag (0019,100A) (no CSA header: the slice normal is then row x column)."""
    dss = [pydicom.dcmread(str(f)) for f in files]
    iop = np.asarray(dss[0].ImageOrientationPatient, float)
    normal = np.cross(iop[:3], iop[3:])
    dss.sort(key=lambda d: float(np.asarray(d.ImagePositionPatient, float) @ normal))
    n, (rt, ct) = len(dss), dss[0].pixel_array.shape
    grid = int(np.ceil(np.sqrt(n)))
    tiles = np.zeros((grid * grid, rt, ct), dss[0].pixel_array.dtype)
    tiles[:n] = [d.pixel_array for d in dss]
    image = tiles.reshape(grid, grid, rt, ct).transpose(0, 2, 1, 3).reshape(grid * rt, grid * ct)
    ds = dss[0]
    ps = [float(v) for v in ds.PixelSpacing]
    corner = np.asarray(ds.ImagePositionPatient, float) - iop[:3] * ps[1] * (grid * ct - ct) / 2 - iop[3:] * ps[0] * (grid * rt - rt) / 2
    ds.ImagePositionPatient = [f"{v:.6f}" for v in corner]
    ds.Rows, ds.Columns, ds.PixelData = grid * rt, grid * ct, image.tobytes()
    positions = [float(np.asarray(d.ImagePositionPatient, float) @ normal) for d in dss]
    ds.SpacingBetweenSlices = f"{positions[1] - positions[0]:.6f}"  # centre to centre, as Siemens writes it
    ds.ImageType = ["ORIGINAL", "PRIMARY", "DIFFUSION", "TRACEW", "ND", "MOSAIC"]
    if count_tag:
        ds.private_block(0x0019, "SIEMENS MR HEADER", create=True).add_new(0x0A, "US", n)
    ds.SOPInstanceUID = generate_uid()
    for f in files:
        f.unlink()
    ds.save_as(str(out))
    return out


def test_siemens_mosaic_unpacked_like_the_slices_it_tiles(tiny_model, tmp_path):
    """A Siemens mosaic DWI (every slice tiled into one image) reads as the volume of the classic slices it was
    made from (same voxels, same geometry), segments to the same mask, and gets a DICOM SEG in its own tiled
    layout that untiles to that mask."""
    for oblique in (False, True):
        classic, _ = _dicom_export(tmp_path / f"classic{oblique}", oblique=oblique)
        mosaic, _ = _dicom_export(tmp_path / f"mosaic{oblique}", oblique=oblique)
        dwi = sorted((mosaic / "DICOM" / "0001").glob("IM007_*"))
        _to_mosaic(dwi, dwi[0].parent / "MOSAIC_DWI.dcm")
        (ref, ref_files), (mos, mos_files) = [select_series(find_series(e), ["dwi"])["dwi"] for e in (classic, mosaic)]
        assert len(mos_files) == 1 and len(ref_files) == 24
        want, got = read_series(ref, ref_files)[0], read_series(mos, mos_files)
        assert np.array_equal(got[0].array, want.array) and np.allclose(got[0].affine, want.affine, atol=1e-4)
        assert sorted(got[2]) == list(range(24))
    out_classic, out_mosaic = tmp_path / "out_classic", tmp_path / "out_mosaic"
    assert not infer(tiny_model, [classic], out_classic, tta=False).failed
    report = infer(tiny_model, [mosaic], out_mosaic, tta=False, dicom_overlay=True)
    assert not report.failed, report.failed
    mask = np.asanyarray(nib.load(str(out_mosaic / f"{mosaic.name}.nii.gz")).dataobj)
    assert np.array_equal(mask, np.asanyarray(nib.load(str(out_classic / f"{classic.name}.nii.gz")).dataobj)) and mask.any()
    seg = pydicom.dcmread(str(out_mosaic / f"{mosaic.name}_seg.dcm"))
    source = pydicom.dcmread(str(mosaic / "DICOM" / "0001" / "MOSAIC_DWI.dcm"))
    assert int(seg.NumberOfFrames) == 1 and (seg.Rows, seg.Columns) == (source.Rows, source.Columns) == (200, 200)
    assert seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    frame = seg.pixel_array.reshape(5, 40, 5, 40).transpose(0, 2, 1, 3).reshape(25, 40, 40)[:24]  # tiles, each (rows, columns)
    volume = read_series(*select_series(find_series(mosaic), ["dwi"])["dwi"])
    assert np.array_equal(np.transpose(frame, (2, 1, 0))[:, :, np.argsort(volume[2])], mask.astype(bool))
    # --dicom-overlay on a mosaic: the one image copied, the outlines drawn in its tiles
    (copy,) = sorted((out_mosaic / f"{mosaic.name}_overlay").iterdir())
    copy = pydicom.dcmread(str(copy))
    assert copy.PixelData == source.PixelData
    tiles = copy.overlay_array(0x6000).reshape(5, 40, 5, 40).transpose(0, 2, 1, 3).reshape(25, 40, 40).astype(bool)
    expected = seg.pixel_array.reshape(5, 40, 5, 40).transpose(0, 2, 1, 3).reshape(25, 40, 40).astype(bool)
    assert all(np.array_equal(t, _outline(e)) for t, e in zip(tiles, expected)) and tiles.any()


def test_siemens_mosaic_with_the_csa_header_matches_nibabel(tmp_path):
    """The slice count and slice direction of a real Siemens mosaic come from its CSA header (nibabel parses
    it; a header from a Siemens Trio DTI series that nibabel ships): the volume and its affine agree with
    nibabel's own mosaic reader, also without the (0019,100A) tag."""
    import gzip
    import io
    import warnings

    src = Path(nib.__file__).parent / "nicom" / "tests" / "data" / "siemens_dwi_1000.dcm.gz"
    if not src.is_file():
        pytest.skip("nibabel's Siemens test file is not installed")
    ds = pydicom.dcmread(io.BytesIO(gzip.open(src).read()))
    del ds[0x0019, 0x100A]
    volume = np.random.default_rng(0).integers(0, 4000, (128, 128, 48)).astype(np.uint16)  # (column, row, tile)
    tiles = np.zeros((49, 128, 128), np.uint16)
    tiles[:48] = volume.transpose(2, 1, 0)
    ds.PixelData = tiles.reshape(7, 7, 128, 128).transpose(0, 2, 1, 3).reshape(896, 896).tobytes()
    (tmp_path / "ex").mkdir()
    ds.save_as(str(tmp_path / "ex" / "dti.dcm"))
    series = find_series(tmp_path / "ex")
    assert series[0].b_values and max(series[0].b_values.values()) == 1000
    vol, files, slice_of = read_series(series[0], series[0].files)
    assert np.array_equal(vol.array[:, :, slice_of], volume)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from nibabel.nicom.dicomwrappers import wrapper_from_data

        theirs = wrapper_from_data(ds)
    assert np.array_equal(theirs.get_data(), volume.transpose(1, 0, 2))  # nibabel: (row, column, tile)
    for i, j, k in [(0, 0, 0), (10, 100, 5), (127, 3, 47)]:
        lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ vol.affine @ [j, i, slice_of[k], 1]
        assert np.allclose(lps, theirs.affine @ [i, j, k, 1], atol=1e-3)
    # two directions of the same b-value: their geometric mean (the trace); mosaics without b-values: refused
    (tmp_path / "dirs").mkdir()
    for d, scale in enumerate((1, 4)):  # the header stores 12 bits: values at most 4095
        ds.PixelData = (tiles // 4 * scale).reshape(7, 7, 128, 128).transpose(0, 2, 1, 3).reshape(896, 896).tobytes()
        ds.SOPInstanceUID, ds.InstanceNumber = generate_uid(), d + 1
        ds.save_as(str(tmp_path / "dirs" / f"dir{d}.dcm"))
    series = find_series(tmp_path / "dirs")
    info, files = select_series(series, ["dwi"], forced={"dwi": series[0].number})["dwi"]
    vol, _, slice_of = read_series(info, files)
    assert len(files) == 2 and np.allclose(vol.array[:, :, slice_of], 2 * (volume // 4), rtol=1e-5, atol=1e-5)
    info.b_values.clear()
    with pytest.raises(SegpipeError, match="2 mosaic volumes without b-values"):
        read_series(info, files)


def test_mosaic_word_without_a_mosaic(tiny_model, tmp_path):
    """Siemens XA exports that were de-mosaiced keep MOSAIC in ImageType on ordinary slices (dcm2niix issue 553):
    read as the stack they are. One image that says MOSAIC without the slice count (an anonymiser removed the
    private tags) is refused, naming the fix, instead of segmenting a picture of tiles."""
    export, _ = _dicom_export(tmp_path / "study", oblique=False)
    for f in (export / "DICOM" / "0001").glob("ADC*"):
        ds = pydicom.dcmread(str(f))
        ds.ImageType = ["DERIVED", "PRIMARY", "ADC", "ND", "NORM", "MOSAIC"]
        ds.save_as(str(f))
    assert not infer(tiny_model, [export], tmp_path / "out", tta=False).failed
    dwi = sorted((export / "DICOM" / "0001").glob("IM007_*"))
    _to_mosaic(dwi, dwi[0].parent / "MOSAIC_DWI.dcm", count_tag=False)
    report = infer(tiny_model, [export], tmp_path / "out2", tta=False)
    message = report.failed["study"]
    assert "channel 'dwi'" in message and "without the private header" in message and "dcm2niix" in message
    assert not (tmp_path / "out2" / "study.nii.gz").exists()


def test_series_option_checked_before_any_case(tiny_model, tmp_path):
    """--series for a channel the model lacks, one series for two channels, or --series with NIfTI inputs only:
    each was ignored (the rules chose instead) or failed per case; now refused before anything is written."""
    export, _ = _dicom_export(tmp_path / "study")
    nifti = _nifti_case(tmp_path / "nifti")
    for series, inputs, message in [
        ({"DWI": 7}, [export], r"--series: the model has no channel DWI; its channels are dwi, adc, flair \(did you mean 'dwi'\?\)"),
        ({"dwi": 7, "adc": 7}, [export], r"--series dwi=7 and --series adc=7: one series for two channels"),
        ({"dwi": 7}, [nifti], "no INPUT is a DICOM folder"),
    ]:
        with pytest.raises(UsageError, match=message):
            infer(tiny_model, inputs, tmp_path / "out", series=series, tta=False)
        assert not (tmp_path / "out").exists()


def test_slices_rewritten_by_another_tool_compressed_and_with_fewer_digits(tiny_model, tmp_path):
    """Half the DWI slices re-encoded by another tool (RLE-compressed, orientation written with fewer digits, as
    GDCM writes it): read, segmented as the untouched export is, and the SEG written (highdicom wants one exact
    orientation for all source images; it failed with 'Source images must have a shared orientation')."""
    from pydicom.uid import RLELossless

    original, _ = _dicom_export(tmp_path / "original", oblique=True)
    export, _ = _dicom_export(tmp_path / "rewritten", oblique=True)
    for f in sorted((export / "DICOM" / "0001").glob("IM007_*"))[::2]:
        ds = pydicom.dcmread(str(f))
        ds.ImageOrientationPatient = [f"{float(v):.6f}" for v in ds.ImageOrientationPatient]
        ds.compress(RLELossless)
        ds.save_as(str(f))
    assert not infer(tiny_model, [original], tmp_path / "out", tta=False).failed
    report = infer(tiny_model, [export], tmp_path / "out", tta=False)
    assert not report.failed, report.failed
    masks = [np.asanyarray(nib.load(str(tmp_path / "out" / f"{name}.nii.gz")).dataobj) for name in ("original", "rewritten")]
    assert np.array_equal(*masks)
    seg = pydicom.dcmread(str(tmp_path / "out" / "rewritten_seg.dcm"))
    assert int(seg.NumberOfFrames) == 24 and int(seg.pixel_array.sum()) == int(masks[1].sum())


def test_a_gantry_tilted_series_is_read_square_and_its_seg_lies_on_the_slices(tmp_path):
    """A series acquired with a gantry tilt (head CT often is) steps sideways from slice to slice: stacked as they
    are, the slices shear the head (here 0.8 mm per 3 mm slice, 15 degrees). They are shifted onto a grid square
    to them, as dcm2niix corrects them: a linear function of the world position reads back as that function on
    the returned grid. The DICOM SEG shifts the mask back: each source pixel gets the mask at its own position."""
    shape, tilt = (40, 36, 20), np.tan(np.radians(15.0)) * 3.0
    sheared = np.array([[-2.0, 0, 0, 40], [0, 2.0, 0, -30], [0, 0, 3.0, -20], [0, 0, 0, 1]])
    sheared[1, 2] = tilt  # each slice 0.8 mm further along y (anterior) than the one before
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).reshape(-1, 3)
    world = (sheared[:3, :3] @ ijk.T).T + sheared[:3, 3]
    volume = (500.0 + 3.0 * world[:, 1] + world[:, 0]).reshape(shape)  # linear in the world position
    write_dicom_series(volume, sheared, tmp_path / "ex" / "CT", description="head ct tilt", series_number=2,
                       study_uid=generate_uid(), frame_uid=generate_uid(), modality="CT")
    series = find_series(tmp_path / "ex")
    vol, ordered, index = read_series(series[0], series[0].files)
    columns = vol.affine[:3, :3]
    assert np.allclose(columns.T @ columns, np.diag([4.0, 4.0, 9.0]), atol=1e-6)  # square to the slices, 2 x 2 x 3 mm
    got_world = (vol.affine[:3, :3] @ ijk.T).T + vol.affine[:3, 3]
    expected = (500.0 + 3.0 * got_world[:, 1] + got_world[:, 0]).reshape(shape)
    inside = np.zeros(shape, bool)
    inside[1:-1, 9:-9, :] = True  # the last slice moved 7.6 voxels along y: what came from outside is 0
    assert np.abs(vol.array - expected)[inside].max() < 0.05  # 16-bit storage
    # the same as one enhanced multi-frame file: the frames' positions step sideways alike
    write_enhanced_dicom([(volume, None)], sheared, tmp_path / "enh" / "CT", description="head ct tilt", series_number=3,
                         study_uid=generate_uid(), frame_uid=generate_uid())
    enhanced = find_series(tmp_path / "enh")[0]
    vol_e, files_e, index_e = read_series(enhanced, enhanced.files)
    assert np.allclose(vol_e.affine, vol.affine, atol=1e-4) and np.abs(vol_e.array - expected)[inside].max() < 0.05
    assert write_dicom_seg(np.ones(shape, np.uint8), files_e, tmp_path / "seg_e.dcm", classes=["background", "lesion"],
                           source_index=index_e).is_file()
    # the SEG: a mask on the square grid, shifted back onto each source slice
    mask = np.zeros(shape, np.uint8)
    mask[10:30, 8:28, 4:16] = 1
    seg_path = write_dicom_seg(mask, ordered, tmp_path / "seg.dcm", classes=["background", "lesion"], source_index=index)
    seg = pydicom.dcmread(str(seg_path))
    frame_of = {item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID: f
                for f, item in enumerate(seg.PerFrameFunctionalGroupsSequence)}  # highdicom orders frames its own way
    inv = np.linalg.inv(vol.affine)
    for k in (4, 10, 15):  # source slice k: each pixel's own world position, looked up in the mask
        src = pydicom.dcmread(str(ordered[k]))
        frame = seg.pixel_array[frame_of[src.SOPInstanceUID]]  # (rows, columns)
        pos = np.asarray(src.ImagePositionPatient, float)
        ij = np.stack(np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij"), axis=-1).reshape(-1, 2)
        lps = pos + np.outer(ij[:, 0], np.asarray(src.ImageOrientationPatient[:3], float) * float(src.PixelSpacing[1])) \
            + np.outer(ij[:, 1], np.asarray(src.ImageOrientationPatient[3:], float) * float(src.PixelSpacing[0]))
        vox = np.rint((inv[:3, :3] @ (lps * [-1, -1, 1]).T).T + inv[:3, 3]).astype(int)
        assert (vox[:, 2] == index[k]).all()
        ok = (vox[:, 1] >= 0) & (vox[:, 1] < shape[1])
        want = np.zeros(len(ij), np.uint8)
        want[ok] = mask[vox[ok, 0], vox[ok, 1], vox[ok, 2]]
        assert np.array_equal(frame.T.reshape(-1)[ok], want[ok]) and want.any()


def test_bare_dicom_files_without_the_part10_header(tiny_model, tmp_path):
    """Files written without the 128-byte preamble and 'DICM' (bare implicit-VR data sets, as older systems and
    some PACS dumps store them) are recognised as DICOM, read, segmented as the same export with headers, and
    get their SEG."""
    from pydicom.uid import ImplicitVRLittleEndian

    original, _ = _dicom_export(tmp_path / "original", oblique=False)
    bare, _ = _dicom_export(tmp_path / "bare", oblique=False)
    for f in (p for p in bare.rglob("*") if p.is_file()):
        ds = pydicom.dcmread(str(f))
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        del ds.file_meta
        ds.preamble = None
        pydicom.dcmwrite(str(f), ds, implicit_vr=True, little_endian=True, enforce_file_format=False)
        assert f.read_bytes()[128:132] != b"DICM"
    assert [s.number for s in find_series(bare)] == [4, 7, 8]
    report = infer(tiny_model, [original, bare], tmp_path / "out", tta=False, dicom_overlay=True)
    assert not report.failed, report.failed
    masks = [np.asanyarray(nib.load(str(tmp_path / "out" / f"{name}.nii.gz")).dataobj) for name in ("original", "bare")]
    assert np.array_equal(*masks) and (tmp_path / "out" / "bare_seg.dcm").is_file()
    # the overlay copies are proper Part 10 files, whatever their sources were
    copies = sorted((tmp_path / "out" / "bare_overlay").iterdir())
    assert len(copies) == 24 and all(f.read_bytes()[128:132] == b"DICM" for f in copies)
    assert pydicom.dcmread(str(copies[0])).overlay_array(0x6000).shape == (40, 40)


def test_inspect_lists_the_series_of_an_export_and_what_infer_would_choose(cli, tmp_path):
    """`segpipe inspect DICOM_FOLDER`: the series per study and the rules' choice per channel, before any model
    runs; several candidates are counted, not hidden."""
    export, _ = _dicom_export(tmp_path / "study", oblique=False)
    r = cli("inspect", export)
    assert r.exit_code == 0, r.output
    assert "3 image series in 1 study" in r.output and "#7 'ep2d_diff_3scan_trace_p2 TRACEW' (MR, 24 files), b=1000" in r.output
    assert "the built-in rules would choose: dwi <- #7, adc <- #8, flair <- #4" in r.output
    write_dicom_series(*_case(4).images["flair"], export / "DICOM" / "0003", description="t2_tirm_tra_dark-fluid repeat",
                       series_number=5, study_uid=pydicom.dcmread(str(next((export / "DICOM" / "0002").iterdir()))).StudyInstanceUID,
                       frame_uid=generate_uid())
    r = cli("inspect", export)
    assert "dwi <- #7, adc <- #8, flair: 2 candidates" in r.output and "--series CHANNEL=NUMBER" in r.output
    r = cli("inspect", export, "case1")
    assert r.exit_code == 2 and "is a DICOM export" in r.output


def test_dicom_report_has_one_group_per_segment(tmp_path):
    """Several foreground classes: the SR's groups follow the SEG's segments one to one, each with its own
    volume and count, and reads back as the values given; a CT source is reported as a CT procedure."""
    arr = np.zeros((16, 16, 6), np.float32) + 100
    files = [str(f) for f in write_dicom_series(arr, np.diag([1.0, 1.0, 2.0, 1.0]), tmp_path / "ct", description="head",
                                                series_number=2, study_uid=generate_uid(), frame_uid=generate_uid())]
    for f in files:
        ds = pydicom.dcmread(f)
        ds.Modality = "CT"
        ds.save_as(f)
    mask = np.zeros(arr.shape, np.uint8)
    mask[2:5, 2:5, 1:3], mask[10:12, 10:12, 4] = 1, 2
    classes = ["background", "core", "penumbra"]
    seg = write_dicom_seg(mask, files, tmp_path / "seg.dcm", classes=classes)
    lesions = {"core": {"lesions": 1, "volume_ml": 0.036}, "penumbra": {"lesions": 1, "volume_ml": 0.008}}
    out = write_dicom_report(seg, files, tmp_path / "sr.dcm", lesions=lesions, classes=classes, version="9.9")
    sr = hd.sr.srread(str(out))
    groups = sr.content.get_volumetric_roi_measurement_groups()
    got = {g.referenced_segment.referenced_segment_numbers[0]: {m.name.meaning: m.value for m in g.get_measurements()} for g in groups}
    assert got == {1: {"Volume": 0.036, "Number of lesions": 1.0}, 2: {"Volume": 0.008, "Number of lesions": 1.0}}
    assert sr.ContentSequence[0].ConceptCodeSequence[0].CodeMeaning.startswith("English")  # language, then the rest
    procedure = [item for item in sr.ContentSequence if item.ConceptNameCodeSequence[0].CodeMeaning == "Procedure reported"]
    assert procedure and "CT" in procedure[0].ConceptCodeSequence[0].CodeMeaning
    assert {r.ReferencedSOPInstanceUID for s in sr.CurrentRequestedProcedureEvidenceSequence for r in s.ReferencedSeriesSequence[0].ReferencedSOPSequence} >= {pydicom.dcmread(str(seg)).SOPInstanceUID}
