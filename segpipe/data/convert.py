"""``segpipe convert``: DICOM exports with their annotations (DICOM SEG) -> a dataset in nnU-Net's raw format.

A site's own data (to fine-tune on, or to validate a model against) usually comes as a PACS export: studies of
DICOM series, with the lesions drawn in OHIF, 3D Slicer or MONAI Label and stored as DICOM SEG beside them.
This writes what both segpipe and nnU-Net read (``segpipe manifest DATASET`` discovers it as it is):

- ``imagesTr/{case}_{XXXX}.nii.gz``: per study, one series per channel, chosen and read exactly as
  ``segpipe infer`` chooses and reads them (description rules, b-values, mosaics, tilt; ``--series
  CHANNEL=NUMBER`` for every study, or a config's ``infer.dicom_rules``); XXXX is the channel's index;
- ``labelsTr/{case}.nii.gz``: the study's SEG that refers to the first channel's series (the reference
  channel, on whose grid segpipe expects labels), its segment numbers as label values, on that series' grid
  (no resampling; frames a viewer left out are background);
- ``imagesTs/``: the studies without such a SEG;
- ``dataset.json`` (``channel_names``, ``labels``, ``numTraining``, ``file_ending``).

A study that cannot be converted (a channel without a series, two SEGs for one series, a SEG on another
grid) is named with the reason and left out; the others are written. The dataset folder appears complete or
not at all (written under a temporary name, then renamed).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from segpipe.errors import SegpipeError, UsageError

__all__ = ["ConvertReport", "convert_dicom"]

log = logging.getLogger(__name__)


@dataclass
class ConvertReport:
    out: Path
    labelled: list[str] = field(default_factory=list)
    unlabelled: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


def convert_dicom(
    inputs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    channels: Sequence[str],
    *,
    classes: Sequence[str] = ("background", "lesion"),
    rules: Mapping[str, Mapping[str, Any]] | None = None,
    series: Mapping[str, int] | None = None,
    allow_uneven: bool = False,
    by_study: bool = True,
) -> ConvertReport:
    """Convert the studies of the DICOM folders ``inputs`` into an nnU-Net raw dataset at ``out`` (see the
    module's docstring). The first channel is the reference: annotations must refer to its series."""
    from segpipe.inference.inputs import dicom_cases
    from segpipe.io.archive import is_zip, unpacked
    from segpipe.io.atomic import atomic_path
    from segpipe.io.dicom import check_series_choice, is_dicom_folder, scan_export

    channels = [c.lower() for c in channels]
    series = dict(series or {})
    check_series_choice(series)
    unknown = [ch for ch in series if ch not in channels]
    if unknown:
        raise UsageError(f"--series: {unknown[0]} is not among --channels ({', '.join(channels)})")
    if not channels:
        raise UsageError("--channels: name the channels to convert, in the model's order, e.g. --channels dwi,adc,flair")
    if len(set(channels)) < len(channels):
        raise UsageError(f"--channels: a channel is named twice ({', '.join(channels)})")
    if len(classes) < 2 or classes[0].lower() != "background":
        raise UsageError(f"--classes: expected background first and at least one class, e.g. background,lesion; got {','.join(classes)}")
    out = Path(out)
    if out.exists():
        raise SegpipeError(f"--out '{out}': already exists; give a new folder for the dataset (e.g. Dataset501_Site)")
    with contextlib.ExitStack() as stack:  # unpacked ZIP archives, until the dataset is written
        folders = []  # (folder to read, as given)
        for given in map(Path, inputs):
            folder = given
            if is_zip(given):  # a PACS portal's download
                folder = stack.enter_context(unpacked(given, what="EXPORT"))
            if not folder.is_dir() or not is_dicom_folder(folder):
                found = ("not found" if not given.exists() else "a ZIP archive without DICOM files" if folder != given else
                         "a file" if given.is_file() else "a folder without DICOM files")
                raise SegpipeError(f"EXPORT '{given}': expected a folder of DICOM series (a PACS export) or its ZIP archive, found {found}")
            folders.append((folder, given))
        report = ConvertReport(out)
        with atomic_path(out, directory=True) as tmp:
            (tmp / "imagesTr").mkdir()
            (tmp / "labelsTr").mkdir()
            (tmp / "imagesTs").mkdir()
            for folder, given in folders:
                found, segs = scan_export(folder)  # one pass over the headers: series and annotations
                for case in dicom_cases(folder, by_study=by_study, series=found):
                    if case.id in report.labelled or case.id in report.unlabelled:
                        report.failed[f"{case.id} ({given})"] = f"case id '{case.id}' taken by a study of an earlier EXPORT"
                        log.error("case '%s' of '%s' left out: the id is taken by a study of an earlier EXPORT", case.id, given)
                        continue
                    try:
                        labelled = _convert_case(case, segs, tmp, channels, classes, rules, series, allow_uneven)
                    except SegpipeError as exc:
                        report.failed[case.id] = str(exc)
                        log.error("case '%s' left out: %s", case.id, exc)
                        continue
                    (report.labelled if labelled else report.unlabelled).append(case.id)
            if not report.labelled and not report.unlabelled:
                raise SegpipeError(f"convert: none of the {len(report.failed)} studies could be converted (each is named above); "
                                   "nothing was written")
            meta = {"name": out.name, "channel_names": {str(i): c for i, c in enumerate(channels)},
                    "labels": {c: i for i, c in enumerate(classes)}, "numTraining": len(report.labelled), "file_ending": ".nii.gz",
                    "description": "converted from DICOM by segpipe convert",
                    "left_out": report.failed}
            (tmp / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        return report


def _convert_case(case: Any, segs: Sequence[Any], tmp: Path, channels: Sequence[str], classes: Sequence[str],
                  rules: Mapping[str, Mapping[str, Any]] | None, forced: Mapping[str, int], allow_uneven: bool) -> bool:
    """Write one study's images (and label); whether it had a label. Nothing of it is left when it fails."""
    from segpipe.io.dicom import read_dicom_seg, read_series, select_series
    from segpipe.io.nifti import save_nifti

    chosen = select_series(case.series or [], channels, rules, forced, where=str(case.dicom), one_study=case.one_study)
    ref_info = chosen[channels[0]][0]
    studies = {info.study_uid for info, _ in chosen.values()}
    mine = [s for s in segs if s.study_uid in studies]
    on_ref = [s for s in mine if ref_info.uid in s.referenced_series]
    if len(on_ref) > 1:
        raise SegpipeError(f"{len(on_ref)} DICOM SEGs refer to the {channels[0]} series #{ref_info.number} "
                           f"({', '.join(str(s.path) for s in on_ref)}); keep the one to train on")
    if not on_ref and mine:
        other = {uid for s in mine for uid in s.referenced_series}
        names = [ch for ch, (info, _) in chosen.items() if info.uid in other]
        if names:
            raise SegpipeError(f"its DICOM SEG ({mine[0].path}) is drawn on the {names[0]} series, not on the {channels[0]} series "
                               f"of the first channel; list {names[0]} first in --channels (labels lie on the first channel's grid)")
    volumes = {}  # read once the annotations are known to fit
    for ch, (info, files) in chosen.items():
        vol, _, _ = read_series(info, files, allow_uneven=allow_uneven, what=f"channel '{ch}' series")
        volumes[ch] = vol
    written = []
    try:
        label = None
        if on_ref:
            ref = volumes[channels[0]]
            label = read_dicom_seg(on_ref[0].path, ref.array.shape, ref.affine, what="annotation")
            top = int(label.max(initial=0))
            if top >= len(classes):
                raise SegpipeError(f"annotation '{on_ref[0].path}': {top} segments, but --classes names {len(classes) - 1}; "
                                   "name one class per segment (e.g. --classes background,core,penumbra)")
        split = "imagesTr" if label is not None else "imagesTs"
        for i, ch in enumerate(channels):
            vol = volumes[ch]
            written.append(save_nifti(tmp / split / f"{case.id}_{i:04d}.nii.gz", vol.array, vol.affine))
        if label is not None:
            written.append(save_nifti(tmp / "labelsTr" / f"{case.id}.nii.gz", label.astype(np.uint8), volumes[channels[0]].affine,
                                      dtype=np.uint8))
        log.info("%s: %s%s", case.id, ", ".join(f"{ch} <- #{chosen[ch][0].number}" for ch in channels),
                 f", label <- {on_ref[0].path.name}" if label is not None else " (no annotation: imagesTs)")
        return label is not None
    except BaseException:
        for p in written:
            Path(p).unlink(missing_ok=True)
        raise
