"""DICOM scanner exports: find the series of a study, choose one per model channel, read it as a volume;
write synthetic exports (for tests and the demo) and DICOM SEG results (highdicom).

Reading: every file under the input is read once for its header (pydicom, without pixels) and grouped by
SeriesInstanceUID; the headers give SeriesNumber, SeriesDescription, Modality,
ImageType and the b-value (standard tag or the vendors' private ones). A DWI series that holds several
b-values is split and its highest b (at least ``min_b_value``) is used. Slices are sorted along the slice
normal; uneven spacing or a missing slice is an error naming the gap, unless ``allow_uneven``, which
resamples the slices linearly onto their median spacing with a warning.

Choosing: per channel, rules (a SeriesDescription pattern, an exclusion pattern, a modality, a minimum
b-value; defaults below, overridable in the config's ``infer.dicom_rules``) or ``--series CHANNEL=NUMBER``.
No candidate or several candidates is an error that lists the series found. The chosen series must belong
to one study of one patient (StudyInstanceUID, PatientID): series from several are an error naming which
channel came from where, never a silent mix (``segpipe infer`` makes one case per study of a folder). Enhanced multi-frame images (one file per series,
the geometry of each frame in its functional groups; a DWI file with several b-values gives its highest)
are read like a classic series. Siemens mosaic images (a volume's slices tiled into one image) are unpacked
(:func:`_read_mosaic`).
"""

from __future__ import annotations

import datetime
import logging
import os
import re
from collections.abc import Mapping, Sequence
from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from segpipe.errors import SegpipeError, UsageError
from segpipe.io.nifti import Volume

__all__ = [
    "DEFAULT_RULES",
    "SeriesInfo",
    "check_series_choice",
    "find_segmentations",
    "find_series",
    "format_series_table",
    "is_dicom_folder",
    "mosaic_tiles",
    "read_dicom_seg",
    "read_dicom_seg_pair",
    "read_series",
    "scan_export",
    "select_series",
    "write_dicom_overlay",
    "write_dicom_report",
    "write_dicom_seg",
    "write_dicom_series",
    "write_enhanced_dicom",
]

log = logging.getLogger(__name__)

DEFAULT_RULES: dict[str, dict[str, Any]] = {
    "dwi": {"description": r"dwi|diff|trace|b\s?=?\s?\d{3,4}|ep2d", "exclude": r"adc|apparent|\bexp\b|\bfa\b|colfa|tensor", "modality": "MR", "min_b_value": 500},
    "adc": {"description": r"\badc\b|apparent|_adc", "exclude": r"^$", "modality": "MR"},
    "flair": {"description": r"flair|dark.?fluid|t2.?fl|ir.?fse", "exclude": r"^$", "modality": "MR"},
    "t1": {"description": r"\bt1|mprage|spgr|tfl|bravo", "exclude": r"flair|\bt1c|gad|\+c\b|post", "modality": "MR"},
    "t2": {"description": r"\bt2", "exclude": r"flair|\bt2\*|swi|dwi|diff", "modality": "MR"},
    "ct": {"description": r"", "exclude": r"perf|ctp|4d|dynamic|cbf|cbv|mtt|(?<![a-z])t.?max(?![a-z])|ttp|blood|transit|time.?to|cta|angio|mip",
           "modality": "CT"},
    # perfusion maps (ISLES 2018's channels), from CT or MR perfusion software: no modality asked for; the names
    # stand alone or after an underscore (CT_CBF), not inside a word
    "cbf": {"description": r"(?<![a-z])r?cbf(?![a-z])|blood.?flow", "exclude": r"^$"},
    "cbv": {"description": r"(?<![a-z])r?cbv(?![a-z])|blood.?vol", "exclude": r"^$"},
    "mtt": {"description": r"(?<![a-z])mtt(?![a-z])|mean.?transit", "exclude": r"^$"},
    "tmax": {"description": r"(?<![a-z])t.?max(?![a-z])|time.?to.?max", "exclude": r"^$"},
}
_B_TAGS = ((0x0018, 0x9087), (0x0019, 0x100C), (0x2001, 0x1003), (0x0043, 0x1039))


@dataclass
class SeriesInfo:
    uid: str
    number: int | None
    description: str
    modality: str
    files: list[str]
    image_type: str = ""
    b_values: dict[str, float] = field(default_factory=dict)  # file -> b-value, where known
    study_uid: str = ""
    patient: str = ""  # PatientID
    study: str = ""  # date and description, for messages
    multiframe: bool = False  # an enhanced multi-frame image: one file, geometry in per-frame functional groups
    frame_b_values: list[float | None] = field(default_factory=list)  # multi-frame: each frame's b-value
    directionality: dict[str, str] = field(default_factory=dict)  # file -> "isotropic" or "directional", where known
    frame_directionality: list[str | None] = field(default_factory=list)  # multi-frame: each frame's, where known

    @property
    def all_b_values(self) -> list[float]:
        return [*self.b_values.values(), *(b for b in self.frame_b_values if b is not None)]

    @property
    def study_label(self) -> str:
        return f"study {self.study or self.study_uid or '?'} of patient {self.patient or '?'}"

    @property
    def label(self) -> str:
        kind = "enhanced multi-frame file" if self.multiframe else f"{len(self.files)} files"
        return f"#{self.number if self.number is not None else '?'} '{self.description}' ({self.modality}, {kind})"


def _is_dicom_file(path: Path) -> bool:
    """A DICOM file: the Part 10 preamble ('DICM' at byte 128), or a bare data set as older systems wrote it
    (starting with an element of group 0008)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    if len(head) == 132 and head[128:132] == b"DICM":
        return True
    if head[:2] != b"\x08\x00":
        return False
    import pydicom

    try:
        return "SOPClassUID" in pydicom.dcmread(str(path), stop_before_pixels=True, force=True)
    except Exception:
        return False


_NOT_DICOM = (".nii", ".nii.gz", ".json", ".txt", ".bval", ".bvec", ".csv", ".xml", ".pdf", ".png", ".jpg", ".jpeg", ".zip", ".gz",
              ".html", ".htm", ".exe", ".dll", ".ini", ".log")


def _scan_file(path: Path) -> tuple[Any, str]:
    """One file's header (pydicom; the pixel data left on disk) and what it is: "image" (an image whose pixel
    data the file holds in full), "damaged" (a DICOM image whose pixel data or header is cut short: GDCM cannot
    read it either), "other" (DICOM but no image: a DICOMDIR, a structured report, a presentation state) or
    "none" (not DICOM)."""
    import pydicom

    try:
        ds = pydicom.dcmread(str(path), defer_size=256, force=True)
    except Exception:
        return None, "damaged" if _is_dicom_file(path) else "none"
    if "SOPClassUID" not in ds and "SeriesInstanceUID" not in ds:
        return None, "none"  # force=True reads any file: this one is not DICOM
    pixels = ds.get_item(0x7FE00010, keep_deferred=True)
    if pixels is None:  # a truncated file loses its pixel data element (cut inside the header: more than that)
        image_class = "Image Storage" in str(getattr(ds.get("SOPClassUID"), "name", ""))
        return ds, "damaged" if ("Rows" in ds or "NumberOfFrames" in ds or image_class) else "other"
    length, start = getattr(pixels, "length", None), getattr(pixels, "value_tell", None)
    if length not in (None, 0xFFFFFFFF) and start is not None and start + length > path.stat().st_size:
        return ds, "damaged"
    return ds, "image" if "SeriesInstanceUID" in ds else "other"


def is_dicom_folder(folder: Path, probe: int = 50) -> bool:
    """True when the tree holds DICOM files (the first ``probe`` files are looked at)."""
    n = 0
    for dirpath, _, files in os.walk(folder):
        for name in sorted(files):
            if name.lower().endswith((".nii", ".nii.gz", ".json", ".txt")):
                continue
            if _is_dicom_file(Path(dirpath) / name):
                return True
            n += 1
            if n >= probe:
                return False
    return False


def _b_value(ds: Any) -> float | None:
    for tag in _B_TAGS:
        if tag in ds:
            v = ds[tag].value
            try:
                if isinstance(v, (bytes, bytearray)):
                    v = v.decode(errors="ignore")
                if isinstance(v, str):
                    v = v.split("\\")[0]
                if isinstance(v, (list, tuple)) or hasattr(v, "__iter__") and not isinstance(v, str):
                    v = list(v)[0]
                b = float(v)
                if tag == (0x0043, 0x1039) and b > 1e8:  # GE stores b + 1e9
                    b = b % 1e9
                return b
            except (TypeError, ValueError, IndexError):
                continue
    return None


def _directionality(ds: Any) -> str | None:
    """A diffusion image's kind: "isotropic" (the trace, which scanners compute from the directions) or
    "directional"; the standard DiffusionDirectionality (0018,9075), else Philips' (2001,1004) ('I': isotropic)."""
    value = ds.get((0x0018, 0x9075))
    text = str(value.value if value is not None else "").strip().upper()
    if text:
        return "isotropic" if text == "ISOTROPIC" else "directional" if text in ("DIRECTIONAL", "BMATRIX") else None
    private = ds.get((0x2001, 0x1004))
    if private is not None:
        raw = private.value.decode(errors="ignore") if isinstance(private.value, bytes) else str(private.value)
        raw = raw.strip().upper()
        return "isotropic" if raw == "I" else "directional" if raw else None
    return None


def find_series(root: str | os.PathLike) -> list[SeriesInfo]:
    """Every image series under ``root`` (any depth, several series per folder, a series spread over several
    folders), grouped by SeriesInstanceUID. Each file's header is read once (pydicom, without its pixel
    data): a flat export of many series costs one pass, where asking GDCM for each series' files rescanned the
    folder once per series (2000 files in 20 series: 14 s, now 1.5; `python -m benchmarks.dicom_scan`)."""
    return scan_export(root)[0]


def scan_export(root: str | os.PathLike) -> tuple[list[SeriesInfo], list[SegFile]]:
    """The image series under ``root`` (:func:`find_series`) and its DICOM SEG files
    (:func:`find_segmentations`), from one pass over the headers."""
    root = Path(root)
    found: dict[str, SeriesInfo] = {}
    segs: list[SegFile] = []
    unreadable: list[Path] = []
    for dirpath, dirnames, files in os.walk(root):
        dirnames.sort()
        for name in sorted(files):
            path = Path(dirpath) / name
            if name.lower().endswith(_NOT_DICOM) or name.startswith("."):
                continue
            ds, kind = _scan_file(path)
            if kind == "damaged":
                unreadable.append(path)
            if kind != "image":
                continue
            if str(ds.get("Modality", "")) == "SEG":
                refs = tuple(str(item.SeriesInstanceUID) for item in ds.get("ReferencedSeriesSequence", []) if "SeriesInstanceUID" in item)
                segs.append(SegFile(path, str(ds.get("StudyInstanceUID", "")), refs))
                continue
            multiframe = int(ds.get("NumberOfFrames", 1) or 1) > 1 and "PerFrameFunctionalGroupsSequence" in ds
            if "PixelSpacing" not in ds and "ImagePositionPatient" not in ds and not multiframe:
                continue  # not an image of a volume (a secondary capture without geometry)
            sid = str(ds.SeriesInstanceUID)
            info = found.get(sid)
            if info is None:
                num = ds.get("SeriesNumber")
                info = found[sid] = SeriesInfo(
                    uid=sid, number=int(num) if num not in (None, "") else None,
                    description=str(ds.get("SeriesDescription", "") or ds.get("ProtocolName", "")),
                    modality=str(ds.get("Modality", "")), files=[],
                    image_type="\\".join(str(v) for v in ds.get("ImageType", [])),
                    study_uid=str(ds.get("StudyInstanceUID", "") or ""), patient=str(ds.get("PatientID", "") or ""),
                    study=" ".join(str(ds.get(k, "") or "") for k in ("StudyDate", "StudyDescription")).strip(),
                    multiframe=multiframe,
                )
                if multiframe:
                    items = [_frame_item(ds, k, "MRDiffusionSequence") or ds for k in range(int(ds.NumberOfFrames))]
                    info.frame_b_values = [_b_value(item) for item in items]
                    info.frame_directionality = [_directionality(item) for item in items]
            info.files.append(str(path))
            b = _b_value(ds)
            if b is not None:
                info.b_values[str(path)] = b
                kind_of = _directionality(ds)
                if kind_of is not None:
                    info.directionality[str(path)] = kind_of
    # a damaged file (cut short in a copy) would leave its series a slice short, refused or resampled for a reason
    # the user could not otherwise see: say so
    if unreadable:
        log.warning("%d DICOM file(s) under '%s' cannot be read and belong to no series (damaged or cut short?), e.g. '%s'; "
                    "copy the export again", len(unreadable), root, unreadable[0])
    return sorted(found.values(), key=lambda s: (s.number if s.number is not None else 1 << 30, s.description)), segs


def format_series_table(series: Sequence[SeriesInfo]) -> list[str]:
    """One line per series; with the study and patient when the series come from more than one study."""
    several = len({(s.study_uid, s.patient) for s in series}) > 1
    lines = []
    for s in series:
        bs = sorted(set(s.all_b_values))
        b = f", b={'/'.join(f'{v:g}' for v in bs)}" if bs else ""
        lines.append(f"series {s.label}{b}" + (f", {s.study_label}" if several else ""))
    return lines


def _check_one_study(chosen: Mapping[str, tuple[SeriesInfo, list[str]]], where: str, strict: bool = True) -> None:
    """The channels of a case must come from one examination: a folder holding several patients or studies
    could otherwise give DWI from one and ADC from another. Not ``strict`` (the user declared the folder one
    case, ``--dicom-case folder``): a warning naming them."""
    patients = {s.patient for s, _ in chosen.values()}
    studies = {s.study_uid for s, _ in chosen.values()}
    if len(patients) > 1 or len(studies) > 1:
        what = "different patients" if len(patients) > 1 else "different studies"
        if not strict:
            log.warning("DICOM input '%s': the series chosen for the channels come from %s (%s); taken as one case, as "
                        "--dicom-case folder asks", where, what, "; ".join(f"{ch} <- {s.study_label}" for ch, (s, _) in chosen.items()))
            return
        raise SegpipeError(
            f"DICOM input '{where}': the series chosen for the channels come from {what}; point INPUT at the folder of one "
            "study (or choose its series with --series; if an anonymiser gave each series a study of its own, --dicom-case "
            "folder takes the folder as one case)",
            details=[f"channel {ch} <- series {s.label}, {s.study_label}" for ch, (s, _) in chosen.items()])


def _matches(series: SeriesInfo, rule: Mapping[str, Any]) -> bool:
    text = f"{series.description} {series.image_type}".lower()
    desc, excl = rule.get("description", ""), rule.get("exclude", "^$")
    if rule.get("modality") and series.modality and series.modality.upper() != str(rule["modality"]).upper():
        return False
    if desc and not re.search(desc, text, re.I):
        return False
    if excl and excl != "^$" and re.search(excl, text, re.I):
        return False
    if rule.get("min_b_value") and series.all_b_values and max(series.all_b_values) < float(rule["min_b_value"]):
        return False
    return True


def select_series(series: Sequence[SeriesInfo], channels: Sequence[str], rules: Mapping[str, Mapping[str, Any]] | None = None,
                  forced: Mapping[str, int] | None = None, where: str = "", one_study: bool = True) -> dict[str, tuple[SeriesInfo, list[str]]]:
    """One series (and the files to read from it) per channel; with ``one_study`` (the default) they must
    come from one study of one patient."""
    rules = {**DEFAULT_RULES, **{k: {**DEFAULT_RULES.get(k, {}), **v} for k, v in (rules or {}).items()}}
    forced = dict(forced or {})
    table = format_series_table(series)
    if not series:
        raise SegpipeError(f"DICOM input '{where}': no image series found; point at the folder the scanner export was unpacked into")
    check_series_choice(forced, details=table)
    chosen: dict[str, tuple[SeriesInfo, list[str]]] = {}
    # the series chosen by hand first, so that no rule picks one of them for another channel
    for ch in sorted(channels, key=lambda c: c not in forced):
        if ch in forced:
            hits = [s for s in series if s.number == forced[ch]]
            if not hits:
                raise SegpipeError(f"--series {ch}={forced[ch]}: no series with that number in '{where}'", details=table)
        else:
            if ch not in rules:
                raise SegpipeError(
                    f"DICOM input '{where}': no rule to recognise channel '{ch}'; choose its series with --series {ch}=NUMBER "
                    "or add infer.dicom_rules to the config", details=table)
            hits = [s for s in series if _matches(s, rules[ch]) and all(s is not c[0] for c in chosen.values())]
        if not hits:
            raise SegpipeError(f"DICOM input '{where}': no series found for channel '{ch}'; choose one with --series {ch}=NUMBER",
                               details=table)
        if len(hits) > 1:
            if len({(h.study_uid, h.patient) for h in hits}) > 1:
                repeat = " (series numbers repeat between studies: --series cannot tell them apart)" if ch in forced else ""
                raise SegpipeError(
                    f"DICOM input '{where}': {len(hits)} candidate series for channel '{ch}' in {len({h.study_uid for h in hits})} "
                    f"studies; point INPUT at the folder of one study{repeat}",
                    details=format_series_table(hits))
            raise SegpipeError(
                f"DICOM input '{where}': {len(hits)} candidate series for channel '{ch}'; choose one with --series {ch}=NUMBER",
                details=format_series_table(hits))
        s = hits[0]
        files = list(s.files)
        if s.b_values and len(set(s.b_values.values())) > 1:
            top = max(s.b_values.values())
            files = [f for f in files if s.b_values.get(f) == top]
            log.info("channel %s: series %s holds b-values %s; using b=%g (%d files)", ch, s.label,
                     sorted(set(s.b_values.values())), top, len(files))
        iso = [f for f in files if s.directionality.get(f) == "isotropic"]
        if iso and len(iso) < len(files):
            files = iso
            log.info("channel %s: series %s holds directional and isotropic (trace) images; using the %d isotropic ones", ch,
                     s.label, len(files))
        chosen[ch] = (s, files)
    chosen = {ch: chosen[ch] for ch in channels}
    _check_one_study(chosen, where, strict=one_study)
    for ch, (s, files) in chosen.items():
        log.info("channel %s <- series %s", ch, s.label)
    return chosen


def check_series_choice(forced: Mapping[str, int], details: Sequence[str] = ()) -> None:
    """``--series`` gives each channel a series of its own (the same number twice is refused)."""
    by_number: dict[int, str] = {}
    for ch, number in forced.items():
        if number in by_number:
            raise UsageError(f"--series {by_number[number]}={number} and --series {ch}={number}: one series for two channels; "
                             "give each channel a series of its own", details=list(details))
        by_number[number] = ch


def _frame_item(ds: Any, frame: int, name: str) -> Any:
    """Frame ``frame``'s item of the functional group ``name`` (per-frame, else shared), or None."""
    for groups in ("PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence"):
        seq = ds.get(groups)
        if not seq:
            continue
        item = seq[frame] if groups.startswith("PerFrame") else seq[0]
        if name in item and len(item[name].value):
            return item[name].value[0]
    return None


def _plane(ds: Any, frame: int | None) -> tuple[np.ndarray, np.ndarray, list[float]] | None:
    """(ImageOrientationPatient, ImagePositionPatient, PixelSpacing) of an image or of a frame, or None."""
    if frame is None:
        if not all(k in ds for k in ("ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing")):
            return None
        return np.asarray(ds.ImageOrientationPatient, float), np.asarray(ds.ImagePositionPatient, float), [float(v) for v in ds.PixelSpacing]
    orient, pos, meas = (_frame_item(ds, frame, n) for n in ("PlaneOrientationSequence", "PlanePositionSequence", "PixelMeasuresSequence"))
    if orient is None or pos is None or meas is None or "PixelSpacing" not in meas:
        return None
    return np.asarray(orient.ImageOrientationPatient, float), np.asarray(pos.ImagePositionPatient, float), [float(v) for v in meas.PixelSpacing]


def read_series(series: SeriesInfo, files: Sequence[str], *, allow_uneven: bool = False,
                what: str = "series") -> tuple[Volume, list[str], list[int]]:
    """Read a series as a volume (x = columns, y = rows, z = slices along the normal; RAS affine). Returns
    the volume, the source files in slice order, and for each file its slice index in the volume (they differ
    only when uneven slices were resampled): what a DICOM SEG that references the files needs. An enhanced
    multi-frame series is one file: the second item is that file, the third has one entry per frame of it
    (-1 for frames left out, e.g. the lower b-values of a DWI)."""
    import pydicom

    if series.multiframe:
        return _read_multiframe(series, files[0], allow_uneven=allow_uneven, what=what)
    dss = []
    for f in files:
        try:
            dss.append((pydicom.dcmread(f, stop_before_pixels=True, force=True), f))
        except Exception as exc:
            raise SegpipeError(f"{what} {series.label}: file '{f}' cannot be read as DICOM ({exc})") from None
    planes = [_plane(d, None) for d, _ in dss]
    missing = [f for (d, f), p in zip(dss, planes) if p is None]
    if missing:
        raise SegpipeError(f"{what} {series.label}: {len(missing)} files have no slice position, orientation or pixel spacing "
                           f"(e.g. '{missing[0]}'); not a volume")
    if "MOSAIC" in series.image_type.upper().split("\\"):
        tiles = [mosaic_tiles(d) for d, _ in dss]
        if any(tiles):
            return _read_mosaic(series, dss, planes, tiles, what)  # type: ignore[arg-type]
        # Siemens XA exports that were de-mosaiced keep the word MOSAIC on ordinary slices: read those as a stack.
        # One image (or one position) without the count is a mosaic whose private header an anonymiser removed.
        if len({tuple(np.round(p[1], 3)) for p in planes}) == 1:  # type: ignore[index]
            raise SegpipeError(f"{what} {series.label}: a Siemens mosaic (slices tiled into one image) without the private header "
                               "that says how many slices it holds (removed by an anonymiser?); export it again with the "
                               "Siemens private tags kept, or convert it with dcm2niix and give the NIfTI files")
    _check_one_stack(series, dss, planes, what)  # type: ignore[arg-type]
    thickness = float(dss[0][0].get("SliceThickness", 1.0) or 1.0)
    groups = _diffusion_directions(series, planes, what) if series.b_values else None
    if groups is not None:  # n directional images per position: their geometric mean (the trace)
        first = [g[0] for g in groups]
        order, spacing_z, uneven = _slice_order(series, [planes[i][1] for i in first], planes[0][0], thickness, allow_uneven, what)  # type: ignore[index]
        arr = _trace(_pixels_sitk(series, [dss[i][1] for k in order for i in groups[k]], what), len(groups[0]))
        sorted_files = [dss[first[k]][1] for k in order]
        return _assemble(arr, [planes[first[k]] for k in order], spacing_z, uneven, Path(sorted_files[0]).parent, sorted_files)  # type: ignore[misc]
    order, spacing_z, uneven = _slice_order(series, [p[1] for p in planes], planes[0][0], thickness, allow_uneven, what)  # type: ignore[index]
    sorted_files = [dss[i][1] for i in order]
    arr = _pixels_sitk(series, sorted_files, what)
    return _assemble(arr, [planes[i] for i in order], spacing_z, uneven, Path(sorted_files[0]).parent, sorted_files)  # type: ignore[misc]


def mosaic_tiles(ds: Any) -> int | None:
    """The number of slices a Siemens mosaic image holds (its private NumberOfImagesInMosaic (0019,100A),
    else the CSA image header's), or None when ``ds`` is not a mosaic (ImageType without MOSAIC, or with it but
    no count: Siemens XA exports that were de-mosaiced keep the word on ordinary slices)."""
    if "MOSAIC" not in [str(v).upper() for v in ds.get("ImageType", [])]:
        return None
    n: int | None = None
    element = ds.get((0x0019, 0x100A))
    if element is not None:
        value = element.value
        try:
            n = int.from_bytes(value[:2], "little") if isinstance(value, bytes) else int(value)
        except (TypeError, ValueError):
            n = None
    if not n:
        csa = _csa_image_header(ds)
        n = csa.get("tags", {}).get("NumberOfImagesInMosaic", {}).get("items", [None])[0] if csa else None
    try:
        return int(n) if n and int(n) > 1 else None
    except (TypeError, ValueError):
        return None


def _csa_image_header(ds: Any) -> dict | None:
    """Siemens' private CSA image header as nibabel parses it, or None (absent or unreadable)."""
    import warnings

    try:
        with warnings.catch_warnings():  # nibabel.nicom warns on import that its DICOM *readers* are experimental
            warnings.simplefilter("ignore")
            from nibabel.nicom import csareader

            return csareader.get_csa_header(ds, "image")
    except Exception:
        return None


def _slice_normal(ds: Any, iop: np.ndarray) -> np.ndarray:
    """The direction the tiles of a mosaic advance in: the CSA header's SliceNormalVector (it may point against
    row x column), else row x column."""
    csa = _csa_image_header(ds)
    normal = csa.get("tags", {}).get("SliceNormalVector", {}).get("items") if csa else None
    if not normal or len(normal) != 3 or not np.isfinite(np.asarray(normal, float)).all() or not np.linalg.norm(normal):
        return np.cross(iop[:3], iop[3:])
    normal = np.asarray(normal, float)
    return normal / np.linalg.norm(normal)


def _read_mosaic(series: SeriesInfo, dss: Sequence[tuple[Any, str]], planes: Sequence[tuple[np.ndarray, np.ndarray, list[float]]],
                 tiles: Sequence[int | None], what: str) -> tuple[Volume, list[str], list[int]]:
    """Siemens mosaic images: each file one volume, its slices tiled row by row into one image of
    ceil(sqrt(n)) x ceil(sqrt(n)) tiles. The header's position is that of the whole image's corner: the first
    tile's is half the surplus of image over tile further along rows and columns. Several files (the directions
    of the highest b-value) give their geometric mean, the trace. Returns the volume, the first file, and for
    each tile its slice in the volume (what a DICOM SEG in the mosaic's own layout needs)."""
    import SimpleITK as sitk

    (ds0, f0), (iop, ipp, ps) = dss[0], planes[0]
    size0 = (int(ds0.Rows), int(ds0.Columns))
    for (ds, f), (o, p, sp), n in zip(dss, planes, tiles):
        if n != tiles[0] or (int(ds.Rows), int(ds.Columns)) != size0 or not (np.allclose(o, iop, atol=1e-4)
                                                                             and np.allclose(p, ipp, atol=1e-3) and np.allclose(sp, ps)):
            raise SegpipeError(f"{what} {series.label}: its mosaic images differ in geometry or slice count ('{f}' and '{f0}'); "
                               "choose another series with --series")
    n = int(tiles[0])  # type: ignore[arg-type]
    if len(dss) > 1 and len(series.b_values) < len(dss):
        raise SegpipeError(f"{what} {series.label}: {len(dss)} mosaic volumes without b-values (a 4D series such as fMRI); "
                           "choose a series with one volume, with --series")
    grid = int(np.ceil(np.sqrt(n)))
    rows, cols = size0
    if rows % grid or cols % grid:
        raise SegpipeError(f"{what} {series.label}: a mosaic of {n} slices in {rows}x{cols} pixels, which {grid}x{grid} tiles "
                           "do not divide; the private header's slice count is wrong")
    rt, ct = rows // grid, cols // grid
    warn = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    volumes = []
    try:
        for _, f in dss:
            try:
                image = sitk.GetArrayFromImage(sitk.ReadImage(f)).reshape(rows, cols).astype(np.float32)
            except RuntimeError as exc:
                raise SegpipeError(f"{what} {series.label}: pixel data of '{f}' cannot be read "
                                   f"({str(exc).strip().splitlines()[-1][:160]})") from None
            # (tile row, row, tile column, column) -> (column, row, tile): x = column, y = row, z = tile
            blocks = image.reshape(grid, rt, grid, ct).transpose(3, 1, 0, 2).reshape(ct, rt, grid * grid)
            volumes.append(blocks[:, :, :n])
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(warn)
    if len(volumes) > 1:
        log.info("%s %s: %d mosaic volumes (directions of one b-value); using their geometric mean, the trace", what,
                 series.label, len(volumes))
        arr = _trace(np.stack(volumes, axis=3).reshape(ct, rt, -1), len(volumes))
    else:
        arr = volumes[0]
    row, col = iop[:3], iop[3:]
    first = ipp + row * ps[1] * (cols - ct) / 2 + col * ps[0] * (rows - rt) / 2
    dz = float(ds0.get("SpacingBetweenSlices", 0) or 0) or float(ds0.get("SliceThickness", 0) or 0) or 1.0
    normal = _slice_normal(ds0, iop)
    positions = [first + k * dz * normal for k in range(n)]
    order, _, _ = _slice_order(series, positions, iop, dz, False, what)
    vol, _, _ = _assemble(arr[:, :, order], [(iop, positions[k], ps) for k in order], dz, False, Path(f0).parent, [f0])
    slice_of = [0] * n
    for z, k in enumerate(order):
        slice_of[k] = z
    log.info("%s %s: Siemens mosaic of %d slices (%dx%d each) unpacked", what, series.label, n, ct, rt)
    return vol, [f0], slice_of


def _check_one_stack(series: SeriesInfo, dss: Sequence[tuple[Any, str]], planes: Sequence[tuple[np.ndarray, np.ndarray, list[float]]],
                     what: str) -> None:
    """The images of a classic series form one stack: one orientation, one image size and one pixel spacing
    (a localizer's three planes, or a slice of another acquisition filed under the same series, do not)."""
    first, (iop0, _, ps0) = dss[0], planes[0]
    size0 = (int(first[0].get("Rows", 0) or 0), int(first[0].get("Columns", 0) or 0))
    for (ds, f), (iop, _, ps) in zip(dss[1:], planes[1:]):
        size = (int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0))
        if not np.allclose(iop, iop0, atol=1e-4):
            odd = f"orientation {np.round(iop, 3).tolist()} where '{first[1]}' has {np.round(iop0, 3).tolist()}"
        elif size != size0:
            odd = f"{size[0]}x{size[1]} pixels (rows x columns) where '{first[1]}' has {size0[0]}x{size0[1]}"
        elif not np.allclose(ps, ps0, rtol=1e-4):
            odd = f"pixel spacing {ps} mm where '{first[1]}' has {ps0} mm"
        else:
            continue
        raise SegpipeError(f"{what} {series.label}: its images are not one stack: '{f}' has {odd} (a localizer, or images of "
                           "another acquisition in the same series); re-export the series, or choose another with --series")


def _trace(stack: np.ndarray, n: int) -> np.ndarray:
    """(x, y, z * n) images, the n of each slice together, -> (x, y, z): their geometric mean per voxel."""
    stack = np.clip(stack.reshape(stack.shape[0], stack.shape[1], -1, n).astype(np.float64), 1e-6, None)
    return np.exp(np.log(stack).mean(axis=3)).astype(np.float32)


def _diffusion_directions(series: SeriesInfo, planes: Sequence[Any], what: str) -> list[list[int]] | None:
    """Images of a diffusion series with the same number (2 or more) at every slice position (the directions
    of one b-value, without the trace image): the indices of each position's images; None otherwise (one
    image per position: the usual checks then apply)."""
    normal = np.cross(planes[0][0][:3], planes[0][0][3:])
    by_pos: dict[float, list[int]] = {}
    for i, p in enumerate(planes):
        by_pos.setdefault(round(float(p[1] @ normal), 3), []).append(i)
    counts = {len(v) for v in by_pos.values()}
    if len(counts) != 1 or counts == {1}:
        return None
    n = counts.pop()
    log.info("%s %s: %d diffusion images at each of %d slice positions (directions without their trace image); using their "
             "geometric mean, the trace", what, series.label, n, len(by_pos))
    return list(by_pos.values())


def _slice_order(series: SeriesInfo, positions: Sequence[np.ndarray], iop: np.ndarray, thickness: float, allow_uneven: bool,
                 what: str) -> tuple[list[int], float, bool]:
    """Slices sorted along the normal; their (median) spacing (one slice: its thickness); whether it is
    uneven. One image per position; uneven spacing or a missing slice is an error unless ``allow_uneven``
    (then a warning; :func:`_assemble` resamples)."""
    normal = np.cross(iop[:3], iop[3:])
    pos = np.array([p @ normal for p in positions])
    order = [int(i) for i in np.argsort(pos, kind="stable")]
    pos = pos[order]
    if len(np.unique(np.round(pos, 3))) != len(pos):
        raise SegpipeError(f"{what} {series.label}: several images share a slice position (a 4D or multi-echo series); "
                           "choose a series with one image per position")
    gaps = np.diff(pos)
    spacing_z = float(np.median(gaps)) if len(gaps) else thickness
    uneven = bool(len(gaps)) and float(np.abs(gaps - spacing_z).max()) > 0.1 * spacing_z
    if uneven:
        worst = int(np.argmax(np.abs(gaps - spacing_z)))
        msg = (f"{what} {series.label}: uneven slice spacing: slices {worst} and {worst + 1} are {gaps[worst]:.2f} mm apart where "
               f"{spacing_z:.2f} mm is the rule ({'a missing slice' if gaps[worst] > 1.5 * spacing_z else 'irregular spacing'})")
        if not allow_uneven:
            raise SegpipeError(msg + "; re-export the series, or pass --allow-uneven to resample it onto even slices")
        log.warning("%s; resampling onto even %.2f mm slices (--allow-uneven)", msg, spacing_z)
    return order, spacing_z, uneven


def _pixels_sitk(series: SeriesInfo, files: Sequence[str], what: str) -> np.ndarray:
    """The pixel data of ``files`` (slices in that order; or the frames of one multi-frame file) as (x, y, z)
    float32, rescaled; SimpleITK/GDCM decodes every transfer syntax."""
    import SimpleITK as sitk

    warn = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # the geometry is checked here, with clearer messages
    try:
        if len(files) == 1 and series.multiframe:
            img = sitk.ReadImage(files[0])
        else:
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(list(files))
            img = reader.Execute()
    except RuntimeError as exc:
        raise SegpipeError(f"{what} {series.label}: pixel data cannot be read ({str(exc).strip().splitlines()[-1][:160]})") from None
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(warn)
    return np.transpose(sitk.GetArrayFromImage(img), (2, 1, 0)).astype(np.float32)  # (x = column, y = row, z)


def tilt_shifts(positions: Sequence[np.ndarray], iop: np.ndarray, ps: Sequence[float], tolerance: float = 0.01) -> np.ndarray | None:
    """How far (in voxels, (column, row)) each slice lies along its plane from the first one, or None when no
    slice does by more than ``tolerance`` voxel. Slices stacked square to their plane have none; a CT series
    acquired with a gantry tilt (head CT often is, to spare the eyes) steps sideways from slice to slice, and
    stacking its slices as they are would shear the head."""
    row, col = iop[:3], iop[3:]
    d = np.asarray(positions, float) - np.asarray(positions[0], float)
    shifts = np.stack([d @ row / ps[1], d @ col / ps[0]], axis=1)
    return shifts if float(np.abs(shifts).max(initial=0.0)) > tolerance else None


def _shift_slices(arr: np.ndarray, shifts: np.ndarray, order: int) -> np.ndarray:
    """Slice k of ``arr`` (x, y, z) moved by ``shifts[k]`` voxels (x, y): what lay at (i, j) is then at
    (i, j) + shift: with :func:`tilt_shifts`, the slices of a tilted series on a grid square to them (with
    ``-shifts``, back onto the slices); outside filled with 0."""
    from scipy import ndimage

    out = np.empty_like(arr)
    for k in range(arr.shape[2]):
        out[:, :, k] = ndimage.shift(arr[:, :, k], shifts[k], order=order, mode="constant", cval=0)
    return out


def _assemble(arr: np.ndarray, planes: Sequence[tuple[np.ndarray, np.ndarray, list[float]]], spacing_z: float, uneven: bool,
              where: Path, sources: list[str], frames: Sequence[int] | None = None,
              n_frames: int = 0) -> tuple[Volume, list[str], list[int]]:
    """The volume and its RAS affine from slices in order along the normal (``arr`` (x, y, z), one plane each);
    ``uneven`` slices resampled linearly onto ``spacing_z``. With ``frames`` (the multi-frame file's frame of each
    slice), the index maps every one of the ``n_frames`` frames to its slice (-1: not in the volume)."""
    iop, first_pos, ps = planes[0]
    row, col = iop[:3], iop[3:]
    normal = np.cross(row, col)
    pos = np.array([p[1] @ normal for p in planes])
    index = list(range(len(planes)))
    shifts = tilt_shifts([p[1] for p in planes], iop, ps)
    if shifts is not None:
        arr = _shift_slices(arr, shifts, order=1)
        step = np.linalg.norm(shifts[-1] * [ps[1], ps[0]]) / max(pos[-1] - pos[0], 1e-6)
        log.info("%s: each slice lies %.2f mm further along its plane than the one before (a gantry tilt of %.1f degrees): "
                 "shifted onto a grid square to the slices, as dcm2niix corrects it", where, step * spacing_z,
                 np.degrees(np.arctan(step)))
    if uneven:
        target = pos[0] + spacing_z * np.arange(int(round((pos[-1] - pos[0]) / spacing_z)) + 1)
        idx = np.clip(np.searchsorted(pos, target, side="right") - 1, 0, len(pos) - 2)
        w = ((target - pos[idx]) / (pos[idx + 1] - pos[idx]))[None, None, :]
        arr = (arr[:, :, idx] * (1 - w) + arr[:, :, idx + 1] * w).astype(np.float32)
        index = [int(round((p - pos[0]) / spacing_z)) for p in pos]
    if frames is not None:
        by_frame = [-1] * n_frames
        for f, i in zip(frames, index):
            by_frame[f] = i
        index = by_frame
    lps = np.eye(4)
    lps[:3, 0] = row * ps[1]  # PixelSpacing is (row spacing, column spacing)
    lps[:3, 1] = col * ps[0]
    lps[:3, 2] = normal * spacing_z
    lps[:3, 3] = first_pos
    return Volume(arr, np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps, where), sources, index


def _read_multiframe(series: SeriesInfo, path: str, *, allow_uneven: bool, what: str) -> tuple[Volume, list[str], list[int]]:
    """An enhanced multi-frame image: the frames of its highest b-value (all frames when there is none),
    sorted along the normal; one orientation and one image per position, as for a classic series."""
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    except Exception as exc:
        raise SegpipeError(f"{what} {series.label}: file '{path}' cannot be read as DICOM ({exc})") from None
    n = int(ds.NumberOfFrames)
    frames = list(range(n))
    bs = series.frame_b_values if len(series.frame_b_values) == n else [None] * n
    known = [b for b in bs if b is not None]
    if known and len(set(known)) > 1:
        top = max(known)
        frames = [k for k in frames if bs[k] == top]
        log.info("%s %s holds b-values %s; using b=%g (%d frames)", what, series.label, sorted(set(known)), top, len(frames))
    dirs = series.frame_directionality if len(series.frame_directionality) == n else [None] * n
    iso = [k for k in frames if dirs[k] == "isotropic"]
    if iso and len(iso) < len(frames):
        frames = iso
        log.info("%s %s holds directional and isotropic (trace) frames; using the %d isotropic ones", what, series.label, len(frames))
    planes = [_plane(ds, k) for k in frames]
    if any(p is None for p in planes):
        raise SegpipeError(f"{what} {series.label}: frames without position, orientation or pixel spacing in their functional "
                           "groups; not a volume (convert the export with dcm2niix)")
    if any(not np.allclose(p[0], planes[0][0], atol=1e-4) for p in planes):  # type: ignore[index]
        raise SegpipeError(f"{what} {series.label}: the frames have several orientations (a localizer or a multi-stack file); "
                           "choose a series with one stack")
    meas = _frame_item(ds, frames[0], "PixelMeasuresSequence")
    thickness = float(meas.get("SliceThickness", 1.0) or 1.0) if meas is not None else 1.0
    arr = _pixels_sitk(series, [path], what)
    if arr.shape[2] != n:
        raise SegpipeError(f"{what} {series.label}: {arr.shape[2]} frames of pixel data for {n} frames in the header")
    groups = _diffusion_directions(series, planes, what) if known else None
    if groups is not None:  # n directional frames per position: their geometric mean (the trace)
        first = [g[0] for g in groups]
        order, spacing_z, uneven = _slice_order(series, [planes[i][1] for i in first], planes[0][0], thickness, allow_uneven, what)  # type: ignore[index]
        traced = _trace(arr[:, :, [frames[i] for k in order for i in groups[k]]], len(groups[0]))
        chosen = [frames[first[k]] for k in order]
        return _assemble(traced, [planes[first[k]] for k in order], spacing_z, uneven, Path(path).parent, [path], chosen, n)  # type: ignore[misc]
    order, spacing_z, uneven = _slice_order(series, [p[1] for p in planes], planes[0][0], thickness, allow_uneven, what)  # type: ignore[index]
    chosen = [frames[i] for i in order]
    return _assemble(arr[:, :, chosen], [planes[i] for i in order], spacing_z, uneven, Path(path).parent, [path], chosen, n)  # type: ignore[misc]


# -- writing ---------------------------------------------------------------------------------------------------


def _image_dataset(path: Path, sop_class: str, uids: tuple[str, str, str], patient: tuple[str, str], modality: str,
                   series_number: int, instance: int, description: str, rows: int, columns: int) -> Any:
    """The header both synthetic writers share: file meta, (study, series, frame of reference) ``uids``,
    patient and study as a scanner fills them, signed 16-bit monochrome pixels."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_class, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = uids
    ds.PatientName, ds.PatientID = patient
    ds.PatientBirthDate, ds.PatientSex = "19600101", "O"
    now = datetime.datetime(2024, 1, 1, 12, 0, 0)
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
    ds.AccessionNumber, ds.StudyID, ds.ReferringPhysicianName = "SYN1", "1", ""
    ds.Modality, ds.Manufacturer, ds.ManufacturerModelName = modality, "segpipe", "synthetic"
    ds.SeriesNumber, ds.InstanceNumber, ds.SeriesDescription = series_number, instance, description
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    return ds


def write_dicom_series(
    volume: np.ndarray,
    affine: np.ndarray,
    folder: str | os.PathLike,
    *,
    description: str,
    series_number: int,
    study_uid: str,
    frame_uid: str,
    patient: tuple[str, str] = ("Synthetic^Patient", "SYN0001"),
    modality: str = "MR",
    b_value: float | None = None,
    prefix: str = "IM",
) -> list[Path]:
    """Write an (x, y, z) volume with a RAS ``affine`` as one DICOM file per slice (MR/CT Image Storage),
    the way a scanner export stores it: 16-bit pixels with rescale slope and intercept, LPS geometry."""
    import pydicom
    from pydicom.uid import generate_uid

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vol, lps, (sx, sy, sz) = _slice_geometry(volume, affine)
    row, col, normal = lps[:3, 0] / sx, lps[:3, 1] / sy, lps[:3, 2] / sz
    stored, slope, intercept = _encode16(vol)
    sop_class = "1.2.840.10008.5.1.4.1.1.4" if modality == "MR" else "1.2.840.10008.5.1.4.1.1.2"
    series_uid = generate_uid()
    written = []
    for k in range(vol.shape[2]):
        path = folder / f"{prefix}{series_number:03d}_{k + 1:04d}"
        ds = _image_dataset(path, sop_class, (study_uid, series_uid, frame_uid), patient, modality, series_number, k + 1,
                            description, stored.shape[1], stored.shape[0])
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
        ds.ImagePositionPatient = [float(v) for v in (lps[:3, 3] + normal * sz * k)]
        ds.ImageOrientationPatient = [float(v) for v in (*row, *col)]
        ds.PixelSpacing = [sy, sx]
        ds.SliceThickness = ds.SpacingBetweenSlices = sz
        ds.SliceLocation = float(np.dot(lps[:3, 3] + normal * sz * k, normal))
        ds.RescaleSlope, ds.RescaleIntercept = f"{slope:.10g}", f"{intercept:.10g}"
        if b_value is not None:
            ds.add_new((0x0018, 0x9087), "FD", float(b_value))
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()  # rows = y, columns = x
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
        written.append(path)
    return written


def _slice_geometry(volume: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """The volume as DICOM slices store it and its LPS affine: slices follow row x column, so when the RAS
    axes make a left-handed LPS frame the rows run the other way (same voxels, same world positions)."""
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(affine, float)
    vol = np.asarray(volume, dtype=np.float64)
    if np.dot(np.cross(lps[:3, 0], lps[:3, 1]), lps[:3, 2]) < 0:
        vol = vol[:, ::-1, :]
        lps[:3, 3] = lps[:3, 3] + lps[:3, 1] * (vol.shape[1] - 1)
        lps[:3, 1] = -lps[:3, 1]
    spacing = tuple(float(np.linalg.norm(lps[:3, i])) for i in range(3))
    return vol, lps, spacing  # type: ignore[return-value]


def _encode16(vol: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Signed 16-bit stored values with the rescale slope and intercept that give ``vol`` back."""
    lo, hi = float(vol.min()), float(vol.max())
    slope = max((hi - lo) / 60000.0, 1e-6)
    intercept = lo + 30000.0 * slope
    return np.clip(np.round((vol - intercept) / slope), -32768, 32767).astype(np.int16), slope, intercept


def write_enhanced_dicom(
    stacks: Sequence[tuple[np.ndarray, float | None]],
    affine: np.ndarray,
    path: str | os.PathLike,
    *,
    description: str,
    series_number: int,
    study_uid: str,
    frame_uid: str,
    patient: tuple[str, str] = ("Synthetic^Patient", "SYN0001"),
    frame_order: Sequence[int] | None = None,
    directionality: Sequence[str] | None = None,
    per_frame_geometry: bool = False,
) -> Path:
    """Write (x, y, z) volumes on one grid (RAS ``affine``), each with its b-value (or None), as one enhanced
    multi-frame MR file, as newer scanners export: every frame's position in its functional groups, the
    orientation, spacing and rescale shared, the b-value per frame. ``frame_order`` permutes the frames
    (stack-major order by default): readers must sort by position, not trust the file order. ``directionality``
    (per stack: ISOTROPIC, DIRECTIONAL, NONE) replaces the default: ISOTROPIC for b > 0, else NONE. With
    ``per_frame_geometry`` orientation and spacing are repeated in every frame's groups instead of shared, as
    Philips exports them."""
    import pydicom
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence as DicomSequence
    from pydicom.uid import generate_uid

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    geo = [_slice_geometry(v, affine) for v, _ in stacks]
    lps, (sx, sy, sz) = geo[0][1], geo[0][2]
    row, col, normal = lps[:3, 0] / sx, lps[:3, 1] / sy, lps[:3, 2] / sz
    stored, slope, intercept = _encode16(np.stack([g[0] for g in geo]))
    frames = [(s, k) for s in range(len(stacks)) for k in range(stored.shape[3])]
    if frame_order is not None:
        frames = [frames[i] for i in frame_order]
    ds = _image_dataset(path, "1.2.840.10008.5.1.4.1.1.4.1",  # Enhanced MR Image Storage
                        (study_uid, generate_uid(), frame_uid), patient, "MR", series_number, 1, description,
                        stored.shape[2], stored.shape[1])
    diffusion_weighted = any(b is not None for _, b in stacks)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "DIFFUSION" if diffusion_weighted else "M", "NONE"]
    ds.NumberOfFrames = len(frames)
    measures, orientation, transform = Dataset(), Dataset(), Dataset()
    measures.PixelSpacing, measures.SliceThickness, measures.SpacingBetweenSlices = [sy, sx], sz, sz
    orientation.ImageOrientationPatient = [float(v) for v in (*row, *col)]
    transform.RescaleSlope, transform.RescaleIntercept, transform.RescaleType = f"{slope:.10g}", f"{intercept:.10g}", "US"
    shared = Dataset()
    if not per_frame_geometry:
        shared.PixelMeasuresSequence = DicomSequence([measures])
        shared.PlaneOrientationSequence = DicomSequence([orientation])
    shared.PixelValueTransformationSequence = DicomSequence([transform])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    per = []
    for s, k in frames:
        item, position = Dataset(), Dataset()
        if per_frame_geometry:
            item.PixelMeasuresSequence = DicomSequence([deepcopy(measures)])
            item.PlaneOrientationSequence = DicomSequence([deepcopy(orientation)])
        position.ImagePositionPatient = [float(v) for v in (lps[:3, 3] + normal * sz * k)]
        item.PlanePositionSequence = DicomSequence([position])
        if stacks[s][1] is not None:
            diffusion = Dataset()
            diffusion.DiffusionBValue = float(stacks[s][1])
            diffusion.DiffusionDirectionality = directionality[s] if directionality else "ISOTROPIC" if stacks[s][1] else "NONE"
            item.MRDiffusionSequence = DicomSequence([diffusion])
        per.append(item)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(per)
    ds.PixelData = np.ascontiguousarray(np.stack([stored[s, :, :, k].T for s, k in frames])).tobytes()
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path


def _share_geometry(sources: Sequence[Any]) -> None:
    """Make the source datasets (in memory) state their orientation and pixel spacing the way highdicom wants
    them: one exact value for all. Multi-frame files that repeat them in every frame's groups instead of the
    shared ones (Philips does) get them moved to the shared groups; classic slices whose values differ only in
    their decimal digits (slices rewritten by another tool) get the first slice's. Callers have checked that
    the values agree (one stack)."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence as DicomSequence

    first = sources[0]
    if len(sources) == 1 and "PerFrameFunctionalGroupsSequence" in first:
        if not first.get("SharedFunctionalGroupsSequence"):
            first.SharedFunctionalGroupsSequence = DicomSequence([Dataset()])
        shared, per = first.SharedFunctionalGroupsSequence[0], first.PerFrameFunctionalGroupsSequence
        for name in ("PlaneOrientationSequence", "PixelMeasuresSequence"):
            if name not in shared and all(name in item for item in per):
                shared[name] = deepcopy(per[0][name])
                for item in per:
                    del item[name]
        return
    for ds in sources[1:]:
        for key in ("ImageOrientationPatient", "PixelSpacing"):
            if key in ds and key in first and ds[key].value != first[key].value:
                ds[key].value = first[key].value


def _source_frames(mask: np.ndarray, sources: Sequence[Any], source_index: Sequence[int] | None) -> tuple[np.ndarray, Any, list[int]]:
    """``mask`` (on the grid :func:`read_series` gives) as the source images' own frames, (frames, rows,
    columns): one per classic file, the tiled frame of a Siemens mosaic, or the segmented frames of an
    enhanced multi-frame file (then also their plane positions and frame numbers, 0-based). A tilted series
    was shifted onto a grid square to its slices when read: the mask is shifted back onto them."""
    import highdicom as hd

    mask = np.asarray(mask, dtype=np.uint8)
    positions, used = None, []
    tiles = mosaic_tiles(sources[0]) if len(sources) == 1 else None
    if tiles and source_index is not None:
        # a Siemens mosaic: the SEG has the source image's own layout (one frame of tiles), so that it lies over
        # the image as viewers show it
        grid, rows, cols = int(np.ceil(np.sqrt(tiles))), int(sources[0].Rows), int(sources[0].Columns)
        rt, ct = rows // grid, cols // grid
        tiled = np.zeros((grid * grid, rt, ct), np.uint8)
        tiled[:tiles] = np.transpose(mask[:, :, list(source_index)], (2, 1, 0))
        mask = np.transpose(tiled.reshape(grid, grid, rt, ct).transpose(0, 2, 1, 3).reshape(rows, cols), (1, 0))[:, :, None]
        source_index = None
    if source_index is not None:
        index = list(source_index)
        if min(index) < 0:  # frames of a multi-frame source left out of the volume (other b-values at the same places)
            used = [f for f, i in enumerate(index) if i >= 0]
            per_frame = sources[0].PerFrameFunctionalGroupsSequence
            positions = [hd.PlanePositionSequence(hd.CoordinateSystemNames.PATIENT,
                                                  per_frame[f].PlanePositionSequence[0].ImagePositionPatient) for f in used]
            index = [index[f] for f in used]
        mask = mask[:, :, index]
        # a tilted series was shifted onto a grid square to its slices when read: shift the mask back onto them
        multiframe = len(sources) == 1 and "PerFrameFunctionalGroupsSequence" in sources[0]
        planes = [_plane(sources[0], f) for f in (used or range(len(index)))] if multiframe else [_plane(d, None) for d in sources]
        if all(p is not None for p in planes) and 0 in index:
            iop, _, ps = planes[0]  # type: ignore[misc]
            shifts = tilt_shifts([planes[index.index(0)][1], *(p[1] for p in planes)], iop, ps)  # type: ignore[index]
            if shifts is not None:
                mask = _shift_slices(mask, -shifts[1:], order=0)
    return np.transpose(mask, (2, 1, 0)), positions, used  # (frames, rows, columns)


def write_dicom_seg(
    mask: np.ndarray,
    source_files: Sequence[str],
    out: str | os.PathLike,
    *,
    classes: Sequence[str],
    series_number: int = 900,
    algorithm: str = "segpipe",
    version: str = "0",
    source_index: Sequence[int] | None = None,
    parameters: Mapping[str, str] | None = None,
) -> Path:
    """A binary DICOM SEG (one segment per foreground class) that references the source series. ``mask`` is
    on the source series' grid as :func:`read_series` gives it ((x, y, z), z in ``source_files`` order, or
    the slice ``source_index`` gives for each file (each frame of a multi-frame file; -1: empty)). ``parameters``
    go into the algorithm's identification (AlgorithmParameters, ``key=value`` joined by commas)."""
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    from segpipe.io.atomic import atomic_path

    sources = [pydicom.dcmread(f, force=True) for f in source_files]
    for ds in sources:  # highdicom copies these; anonymised exports may lack them (type 2: present, possibly empty)
        for key in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "StudyID",
                    "AccessionNumber", "ReferringPhysicianName"):
            if key not in ds:
                setattr(ds, key, "")
    _share_geometry(sources)
    frames, positions, used = _source_frames(mask, sources, source_index)
    algo = hd.AlgorithmIdentificationSequence(name=algorithm, version=version, family=codes.cid7162.ArtificialIntelligence,
                                              parameters=dict(parameters) if parameters else None)
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=k, segment_label=classes[k][:64], segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=codes.SCT.Lesion, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algo,
        )
        for k in range(1, len(classes))
    ]
    if len(classes) == 2:
        pixel = (frames == 1).astype(np.uint8)
    else:
        pixel = np.stack([(frames == k) for k in range(1, len(classes))], axis=-1).astype(np.uint8)
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=pixel, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=series_number,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="segpipe", manufacturer_model_name=algorithm, plane_positions=positions,
        software_versions=version, device_serial_number="0", series_description=f"{algorithm} lesion segmentation",
        omit_empty_frames=False,
    )
    if positions is not None:
        # highdicom refers each SEG frame to the first source frame at its position, which for a DWI file is
        # the b0 frame: point it at the frame that was segmented (positions are unique among those)
        frame_at = {tuple(np.round(np.asarray(p[0].ImagePositionPatient, float), 3)): f + 1 for p, f in zip(positions, used)}
        for item in seg.PerFrameFunctionalGroupsSequence:
            key = tuple(np.round(np.asarray(item.PlanePositionSequence[0].ImagePositionPatient, float), 3))
            for derivation in item.get("DerivationImageSequence", []):
                for ref in derivation.get("SourceImageSequence", []):
                    ref.ReferencedFrameNumber = frame_at[key]
    out = Path(out)
    with atomic_path(out) as tmp:
        seg.save_as(tmp)
    return out


def write_dicom_overlay(
    mask: np.ndarray,
    source_files: Sequence[str],
    out: str | os.PathLike,
    *,
    classes: Sequence[str],
    series_number: int = 902,
    algorithm: str = "segpipe",
    version: str = "0",
    source_index: Sequence[int] | None = None,
    parameters: Mapping[str, str] | None = None,
) -> Path:
    """A derived copy of the source series in the folder ``out``: each image as it was (pixels, geometry,
    window), in a new series, with each foreground class's outline as a DICOM overlay plane (groups 6000,
    6002, ...; drawn just outside the lesion, so that its own pixels stay visible). For PACS viewers that do
    not display DICOM SEG: overlays are part of the MR and CT image objects since ACR-NEMA, and viewers show
    and hide them. ``mask`` and ``source_index`` as for :func:`write_dicom_seg`. Classic series (one file
    per slice) and Siemens mosaics; enhanced multi-frame images have no overlay planes in DICOM: refused."""
    import pydicom
    from pydicom.dataset import Dataset
    from pydicom.pixels import pack_bits
    from pydicom.sequence import Sequence as DicomSequence
    from pydicom.uid import generate_uid
    from scipy import ndimage

    from segpipe.io.atomic import atomic_path

    if len(classes) - 1 > 16:
        raise SegpipeError(f"DICOM overlay: {len(classes) - 1} classes, but DICOM has 16 overlay planes; write the DICOM SEG instead")
    sources = [pydicom.dcmread(f, force=True) for f in source_files]
    if len(sources) == 1 and "PerFrameFunctionalGroupsSequence" in sources[0]:
        raise SegpipeError(f"DICOM overlay: the series of '{source_files[0]}' is an enhanced multi-frame image, which has no overlay "
                           "planes in DICOM; its DICOM SEG holds the mask")
    frames, _, _ = _source_frames(mask, sources, source_index)
    tiles = mosaic_tiles(sources[0]) if len(sources) == 1 and source_index is not None else None
    grid = int(np.ceil(np.sqrt(tiles))) if tiles else 1
    cross = ndimage.generate_binary_structure(2, 1)[None, None]  # in-plane, and within a mosaic's tile

    def outline(lesion: np.ndarray) -> np.ndarray:  # the pixels just outside the lesion
        rows, cols = lesion.shape
        split = lesion.reshape(grid, rows // grid, grid, cols // grid).transpose(0, 2, 1, 3)
        ring = ndimage.binary_dilation(split, cross) & ~split
        return ring.transpose(0, 2, 1, 3).reshape(rows, cols)

    series_uid = generate_uid()
    described = "; ".join(f"{k}={v}" for k, v in (parameters or {}).items())
    out = Path(out)
    with atomic_path(out, directory=True) as tmp:
        for n, (ds, frame) in enumerate(zip(sources, frames)):
            ref_class, ref_uid = ds.SOPClassUID, ds.SOPInstanceUID
            for tag in [t for t in ds.keys() if 0x6000 <= t.group <= 0x601E]:  # overlays the image had: not ours
                del ds[tag]
            ds.SOPInstanceUID = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.SeriesInstanceUID = series_uid
            ds.SeriesNumber = series_number
            ds.SeriesDescription = f"{algorithm} lesion outline (overlay)"[:64]
            ds.ImageType = ["DERIVED", "SECONDARY", *list(ds.get("ImageType", []))[2:]]
            ds.DerivationDescription = f"{algorithm} {version} lesion outlines as overlay planes{'; ' + described if described else ''}"[:1024]
            ref = Dataset()
            ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = ref_class, ref_uid
            ds.SourceImageSequence = DicomSequence([ref])
            for k in range(1, len(classes)):
                ring = outline(frame == k)
                group = 0x6000 + 2 * (k - 1)
                ds.add_new((group, 0x0010), "US", int(ds.Rows))
                ds.add_new((group, 0x0011), "US", int(ds.Columns))
                ds.add_new((group, 0x0022), "LO", f"{algorithm} {classes[k]} outline"[:64])
                ds.add_new((group, 0x0040), "CS", "G")
                ds.add_new((group, 0x0050), "SS", [1, 1])
                ds.add_new((group, 0x0100), "US", 1)
                ds.add_new((group, 0x0102), "US", 0)
                ds.add_new((group, 0x1500), "LO", classes[k][:64])
                ds.add_new((group, 0x3000), "OW", pack_bits(ring.astype(np.uint8).ravel()))
            ds.save_as(tmp / f"IM{n + 1:04d}.dcm", enforce_file_format=True)
    return out


@dataclass
class SegFile:
    """A DICOM SEG file: its study and the series it refers to."""

    path: Path
    study_uid: str
    referenced_series: tuple[str, ...]



def find_segmentations(folder: str | os.PathLike) -> list[SegFile]:
    """The DICOM SEG files under ``folder``, with their study and the series they refer to (headers only;
    :func:`scan_export` gives them with the image series from the same pass)."""
    return scan_export(folder)[1]


def _seg_volume(path: Path, what: str) -> Any:
    """A DICOM SEG as one highdicom label volume on its own grid (segment numbers as labels)."""
    import highdicom as hd

    try:
        seg = hd.seg.segread(str(path))
    except Exception as exc:  # pydicom and highdicom raise many types for files that are not a SEG
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise SegpipeError(f"{what} '{path}': not a readable DICOM SEG ({reason}); export the mask again (DICOM SEG or NIfTI)") from None
    try:
        return seg.get_volume(combine_segments=True)
    except Exception as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise SegpipeError(f"{what} '{path}': its segments cannot be combined into one label map ({reason}); a voxel may belong "
                           "to two segments: export one label per voxel") from None


def _to_grid(volume: Any, grid: Any, path: Path, what: str, other: str) -> Any:
    try:
        return volume.match_geometry(grid, tol=1e-3)
    except (RuntimeError, ValueError):
        raise SegpipeError(f"{what} '{path}': its frames do not lie on the grid {tuple(grid.spatial_shape)} of {other} "
                           "(another series, or resampled); both must refer to the same series") from None


def read_dicom_seg(path: str | os.PathLike, shape: Sequence[int], affine: np.ndarray, *, what: str = "mask") -> np.ndarray:
    """The label map of a DICOM SEG (OHIF, 3D Slicer, MONAI Label, segpipe itself) on the grid ``shape`` /
    ``affine`` (NIfTI's world convention) of an image of the same series: its segment numbers are the labels,
    frames it leaves out (empty slices, as many writers omit them) are background. The SEG must lie on that
    grid up to axis order, flips, padding and cropping (highdicom's ``Volume.match_geometry``; no resampling)."""
    import highdicom as hd
    import nibabel as nib

    path = Path(path)
    volume = _seg_volume(path, what)
    grid = hd.Volume.from_nibabel(nib.Nifti1Image(np.zeros(tuple(shape), np.uint8), np.asarray(affine, np.float64)))
    matched = _to_grid(volume, grid, path, what, "the image it is compared with")
    return np.asarray(matched.to_nibabel().dataobj).astype(np.uint8)


def read_dicom_seg_pair(first: str | os.PathLike, second: str | os.PathLike, *, what: tuple[str, str] = ("mask", "mask"),
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two DICOM SEGs of the same series (a prediction and its ground truth, say) as label maps on one grid:
    the smallest box of that series' grid that holds the frames of both (each SEG alone spans only the frames
    it stores), and that grid's affine (NIfTI's world convention), axes (column, row, frame) as a series is read.
    Frames neither stores are background."""
    a_path, b_path = Path(first), Path(second)
    a, b = _seg_volume(a_path, what[0]), _seg_volume(b_path, what[1])
    # b's corners in a's voxel indices: both lie on one series' grid, so they are whole numbers
    corners = np.array([[i, j, k, 1.0] for i in (0, b.spatial_shape[0] - 1) for j in (0, b.spatial_shape[1] - 1)
                        for k in (0, b.spatial_shape[2] - 1)]).T
    index = (np.linalg.inv(a.affine) @ b.affine @ corners)[:3]
    if not np.allclose(index, np.round(index), atol=1e-2):
        raise SegpipeError(f"{what[1]} '{b_path}': its frames do not lie on the grid of {what[0]} '{a_path}' (another series, or "
                           "resampled); both must refer to the same series")
    index = np.round(index).astype(int)
    shape = np.asarray(a.spatial_shape)
    before = np.maximum(-index.min(axis=1), 0)
    after = np.maximum(index.max(axis=1) - (shape - 1), 0)
    union = a.pad([[int(x), int(y)] for x, y in zip(before, after)], constant_value=0)
    b = _to_grid(b, union, b_path, what[1], f"{what[0]} '{a_path}'")
    # highdicom's axes are (frame, row, column); the arrays come out as a series is read (and as dcm2niix
    # stores it): (column, row, frame), so that slice-wise measures (WMH's in-plane borders) see the slices
    a_img, b_img = union.to_nibabel(), b.to_nibabel()
    swap = np.array([[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], np.float64)
    return (np.asarray(a_img.dataobj).astype(np.uint8).transpose(2, 1, 0), np.asarray(b_img.dataobj).astype(np.uint8).transpose(2, 1, 0),
            np.asarray(a_img.affine, np.float64) @ swap)


#: the lesion count's concept: no standard code names it, so a private coding scheme (DICOM PS3.16 allows
#: "99" + an organisation's name) says plainly what it is
LESION_COUNT = ("lesion-count", "99SEGPIPE", "Number of lesions")


def write_dicom_report(
    seg_file: str | os.PathLike,
    source_files: Sequence[str],
    out: str | os.PathLike,
    *,
    lesions: Mapping[str, Mapping[str, float]],
    classes: Sequence[str],
    series_number: int = 901,
    algorithm: str = "segpipe",
    version: str = "0",
    parameters: Mapping[str, str] | None = None,
) -> Path:
    """A DICOM Structured Report (Comprehensive 3D SR, TID 1500 measurement report) that gives, per segment
    of the DICOM SEG ``seg_file``, the lesion volume in ml (SNOMED CT "Volume", UCUM "ml") and the number of
    lesions (26-connected), each group referencing its segment and the source series: the numbers a stroke
    team reads, in the form PACS and reporting systems take in. ``lesions`` maps a class name to
    ``{"lesions": n, "volume_ml": v}`` (:meth:`segpipe.inference.predictor.Prediction.lesion_stats`);
    ``parameters`` are the algorithm's, one text item ``key=value`` each."""
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    from segpipe.io.atomic import atomic_path

    seg = pydicom.dcmread(seg_file)
    # the evidence: the SEG and the source images it references (their headers are enough)
    sources = [pydicom.dcmread(f, stop_before_pixels=True, force=True) for f in dict.fromkeys(source_files)]
    series_uid = str(sources[0].SeriesInstanceUID)
    algo = hd.sr.AlgorithmIdentification(name=algorithm, version=version,
                                         parameters=[f"{k}={v}" for k, v in parameters.items()] if parameters else None)
    milliliter = hd.sr.CodedConcept("ml", "UCUM", "milliliter")
    count = hd.sr.CodedConcept(*LESION_COUNT)
    groups = []
    for k in range(1, len(classes)):
        stats = lesions[classes[k]]
        groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=f"{classes[k]} (all lesions)"[:64]),
            referenced_segment=hd.sr.ReferencedSegment(sop_class_uid=seg.SOPClassUID, sop_instance_uid=seg.SOPInstanceUID,
                                                       segment_number=k, source_series=hd.sr.SourceSeriesForSegmentation(series_uid)),
            finding_type=codes.SCT.Lesion, algorithm_id=algo,
            measurements=[
                hd.sr.Measurement(name=codes.SCT.Volume, value=float(stats["volume_ml"]), unit=milliliter, algorithm_id=algo),
                hd.sr.Measurement(name=count, value=float(stats["lesions"]), unit=hd.sr.CodedConcept("{lesions}", "UCUM", "lesions"),
                                  algorithm_id=algo),
            ],
        ))
    modality = str(sources[0].get("Modality", ""))
    procedure = {"MR": codes.cid100.MRIUnspecifiedBodyRegion, "CT": codes.cid100.CTUnspecifiedBodyRegion}.get(modality,
                                                                                                                codes.cid100.ImagingProcedure)
    device = hd.sr.ObserverContext(observer_type=codes.DCM.Device,
                                   observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(uid=hd.UID(), name=algorithm))
    report = hd.sr.MeasurementReport(observation_context=hd.sr.ObservationContext(observer_device_context=device),
                                     procedure_reported=procedure, imaging_measurements=groups,
                                     title=codes.cid7021.ImagingMeasurementReport)
    sr = hd.sr.Comprehensive3DSR(
        evidence=[seg, *sources], content=report[0], series_instance_uid=hd.UID(), series_number=series_number,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="segpipe", is_complete=True,
        series_description=f"{algorithm} lesion volumes",
    )
    out = Path(out)
    with atomic_path(out) as tmp:
        sr.save_as(tmp)
    return out
