"""What ``segpipe infer`` is given, as cases: manifests, DICOM exports, folders and files of NIfTI images.

Inputs, each argument one of:

- a manifest (``.json``): every case in it;
- a folder holding a DICOM export (a tree of several series): one case per study in it (named after the
  study's own subfolder, else numbered; one study: the folder's name), or one case (``dicom_case="folder"``);
  or such an export as a ZIP archive (a PACS portal's or a viewer's download), read as its folder;
- NIfTI files given together, or a folder of them: one case; a file belongs to the channel whose name
  appears in its file name as a word (``..._dwi.nii.gz``, ``flair.nii.gz``), or ``--channel NAME=PATH``;
- a folder holding several cases: files named as nnU-Net names them (``CASE_0000.nii.gz``, ``CASE_0001...``:
  the channel's index in the model's order, e.g. an ``imagesTs`` folder), or channel-named files of several
  cases (``sub-01_dwi.nii.gz``, ``sub-01_adc.nii.gz``, ``sub-02_dwi.nii.gz``, ...), or one subfolder per case;
- a dataset folder in a known layout (ISLES 2022's BIDS tree, WMH 2017, an nnU-Net raw dataset with its
  ``dataset.json``, ...; see :mod:`segpipe.data.layouts`): every case in it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from segpipe.errors import SegpipeError, UsageError, did_you_mean

__all__ = ["NIFTI", "CaseInput", "dicom_cases", "resolve_inputs"]

log = logging.getLogger(__name__)
NIFTI = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd")


@dataclass
class CaseInput:
    id: str
    channels: dict[str, Path] = field(default_factory=dict)
    dicom: Path | None = None
    source: str = ""
    series: list[Any] | None = None  # DICOM: this case's series (one study), when the folder was scanned already
    members: tuple[int, ...] | None = None  # the ensemble's members that segment it (--cross-validation); None: all
    one_study: bool = True  # DICOM: the channels must come from one study (False: --dicom-case folder)


def _stem(path: Path) -> str:
    name = path.name
    for ext in NIFTI:
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return path.stem


def _match_channels(files: Sequence[Path], channels: Sequence[str], where: str) -> dict[str, Path]:
    if len(channels) == 1 and len(files) == 1:
        return {channels[0]: files[0]}
    found: dict[str, list[Path]] = {c: [] for c in channels}
    for f in files:
        words = set(re.split(r"[^a-z0-9]+", _stem(f).lower()))
        for c in channels:
            if c.lower() in words:
                found[c].append(f)
    missing = [c for c in channels if not found[c]]
    double = {c: v for c, v in found.items() if len(v) > 1}
    if missing or double:
        detail = (f"missing {', '.join(missing)}" if missing else "") + ("; " if missing and double else "") + (
            "; ".join(f"{c}: {len(v)} files ({', '.join(p.name for p in v)})" for c, v in double.items()))
        raise SegpipeError(
            f"input '{where}': the model expects channels {', '.join(channels)}, one file each, named with the channel "
            f"({detail}); name the files so, or give them with --channel NAME=PATH"
        )
    return {c: v[0] for c, v in found.items()}


#: nnU-Net's file names: CASE_XXXX, XXXX the channel's index
_NNUNET_NAME = re.compile(r"^(?P<case>.+)_(?P<index>\d{4})$")


def _nifti_files(folder: Path) -> list[Path]:
    return sorted(f for f in folder.iterdir() if f.is_file() and f.name.lower().endswith(NIFTI))


def _words(path: Path) -> list[str]:
    return [w for w in re.split(r"[^a-z0-9]+", _stem(path).lower()) if w]


def _by_channel_word(files: Sequence[Path], channels: Sequence[str]) -> dict[tuple[str, ...], list[Path]] | None:
    """The files grouped by their name without the channel word (``sub-01_dwi``, ``sub-01_adc`` -> ``sub 01``);
    files without a channel word are left out; None when a name holds two channel words (ambiguous)."""
    names = {c.lower() for c in channels}
    groups: dict[tuple[str, ...], list[Path]] = {}
    for f in files:
        words = _words(f)
        hits = {w for w in words if w in names}
        if len(hits) > 1:
            return None
        if hits:
            groups.setdefault(tuple(w for w in words if w not in hits), []).append(f)
    return groups


def _folder_cases(folder: Path, files: Sequence[Path], channels: Sequence[str]) -> list[CaseInput]:
    """The cases of a folder of NIfTI files: nnU-Net's CASE_XXXX names, channel-named files of several cases,
    or one case (named after the folder)."""
    source = str(folder)
    named = {f: _NNUNET_NAME.match(_stem(f)) for f in files}
    # every name CASE_XXXX with XXXX a channel index of this model (a date or a series number is not one)
    if all(m is not None and int(m["index"]) < len(channels) for m in named.values()):
        groups: dict[str, dict[int, Path]] = {}
        for f, m in named.items():
            groups.setdefault(m["case"], {})[int(m["index"])] = f
        want = set(range(len(channels)))
        bad = [f"{c} has {', '.join(f'{i:04d}' for i in sorted(g))}" for c, g in sorted(groups.items()) if set(g) != want]
        if bad:
            raise SegpipeError(
                f"input '{folder}': files named as nnU-Net names them (CASE_XXXX, XXXX the channel), but {len(bad)} case(s) "
                f"lack one file per channel 0000..{len(channels) - 1:04d} ({', '.join(channels)}, the model's order): "
                f"{'; '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}"
            )
        log.info("input '%s': %d cases named as nnU-Net names them (CASE_XXXX: %s)", folder, len(groups),
                 ", ".join(f"{i:04d} {c}" for i, c in enumerate(channels)))
        return [CaseInput(c, {channels[i]: g[i] for i in range(len(channels))}, source=source) for c, g in sorted(groups.items())]
    by_word = _by_channel_word(files, channels)
    if by_word and len(by_word) > 1:
        lowered = [c.lower() for c in channels]
        complete = {k: g for k, g in by_word.items() if sorted(w for f in g for w in _words(f) if w in lowered) == sorted(lowered)}
        if len(complete) > 1:
            incomplete = [k for k in by_word if k not in complete]
            if incomplete:
                detail = "; ".join(f"{'_'.join(k) or '(no name)'}: {', '.join(f.name for f in by_word[k])}" for k in incomplete[:3])
                raise SegpipeError(
                    f"input '{folder}': {len(by_word)} cases of channel-named files, {len(incomplete)} without exactly one file for "
                    f"each of {', '.join(channels)} ({detail}); complete them or move them out"
                )
            log.info("input '%s': %d cases of channel-named files", folder, len(complete))
            return [CaseInput(_common_id(g), _match_channels(g, channels, source), source=source)
                    for _, g in sorted(complete.items())]
    return [CaseInput(folder.resolve().name, _match_channels(files, channels, source), source=source)]


def _nnunet_cases(folder: Path, channels: Sequence[str]) -> list[CaseInput] | None:
    """The cases of an nnU-Net raw dataset folder (None: it is not one). Its channels are taken by name where
    dataset.json names the model's channels, else by index, as nnU-Net itself does."""
    from segpipe.data.nnunet import discover_nnunet, find_nnunet_dataset

    dataset = find_nnunet_dataset(folder)
    if dataset is None:
        return None
    m = discover_nnunet(dataset)
    if set(channels) <= set(m.channels):
        pick = {ch: ch for ch in channels}
    elif len(m.channels) == len(channels):
        log.warning("input '%s': dataset.json names the channels %s, the model %s; taken in order", dataset,
                    ", ".join(m.channels), ", ".join(channels))
        pick = dict(zip(channels, m.channels))
    else:
        raise SegpipeError(
            f"input '{dataset}': an nnU-Net dataset with {len(m.channels)} channel(s) ({', '.join(m.channels)}), but the model "
            f"takes {len(channels)} ({', '.join(channels)}); give a dataset with the model's channels"
        )
    log.info("input '%s': an nnU-Net dataset, %d cases", dataset, len(m.cases))
    return [CaseInput(c.id, {ch: m.image_path(c, src) for ch, src in pick.items()}, source=str(dataset)) for c in m.cases]


def _dataset_cases(folder: Path, channels: Sequence[str]) -> list[CaseInput]:
    """A folder with no NIfTI files of its own: a dataset in a known layout, else one subfolder per case."""
    from segpipe.data.layouts import discover

    nnunet = _nnunet_cases(folder, channels)
    if nnunet is not None:
        return nnunet
    try:
        m = discover(folder, channels=list(channels))
    except SegpipeError as exc:
        subs = [(d, _nifti_files(d)) for d in sorted(folder.iterdir()) if d.is_dir()]
        subs = [(d, files) for d, files in subs if files]
        if subs:
            log.info("input '%s': %d case folders", folder, len(subs))
            return [case for d, files in subs for case in _folder_cases(d, files, channels)]
        reason = (str(exc).strip().splitlines() or [""])[0]
        raise SegpipeError(
            f"input '{folder}': neither DICOM nor NIfTI files, nor case folders holding them, and not a dataset of a known layout "
            f"({reason}); give NIfTI files, a folder of them, or a manifest (`segpipe manifest`)"
        ) from None
    log.info("input '%s': a %s dataset, %d cases", folder, m.layout, len(m.cases))
    return [CaseInput(c.id, {ch: m.image_path(c, ch) for ch in channels}, source=str(folder)) for c in m.cases]


def _common_id(files: Sequence[Path]) -> str:
    stems = [_stem(f) for f in files]
    prefix = os.path.commonprefix(stems).rstrip("_-. ")
    return prefix or stems[0]


DICOM_CASE = ("study", "folder")


def resolve_inputs(inputs: Sequence[str | Path], channels: Sequence[str], channel_map: Mapping[str, str] | None = None, *,
                   dicom_case: str = "study", unpack_to: Path | None = None) -> list[CaseInput]:
    """Turn the command line's inputs into cases (see the module docstring). ``dicom_case``: a DICOM folder
    is one case per study ("study"), or one case whatever its studies and patients ("folder": for exports an
    anonymiser gave a study per series). A ZIP archive of a DICOM export is unpacked into a folder under
    ``unpack_to`` (the caller's temporary folder, which must outlive the cases) and read as that folder; its
    cases are named after the archive."""
    if dicom_case not in DICOM_CASE:
        raise UsageError(f"--dicom-case: expected study or folder, got '{dicom_case}'{did_you_mean(dicom_case, DICOM_CASE)}")
    from segpipe.io.archive import is_zip, unpack_zip
    from segpipe.io.dicom import is_dicom_folder

    cases: list[CaseInput] = []
    if channel_map:
        if inputs:
            raise UsageError("--channel NAME=PATH gives one case's files; give no other INPUT with it")
        paths = {c: Path(p) for c, p in channel_map.items()}
        for c, p in paths.items():
            if not p.is_file():
                raise SegpipeError(f"--channel {c}={p}: file not found")
        unknown = [c for c in paths if c not in channels]
        if unknown:
            raise UsageError(f"--channel: the model has no channel {', '.join(unknown)}; its channels are {', '.join(channels)}")
        missing = [c for c in channels if c not in paths]
        if missing:
            raise UsageError(f"--channel: the model expects channels {', '.join(channels)}; give also {', '.join(missing)}")
        by_file: dict[Path, list[str]] = {}
        for c, p in paths.items():
            by_file.setdefault(p.resolve(), []).append(c)
        twice = next((names for names in by_file.values() if len(names) > 1), None)
        if twice:
            raise UsageError(f"--channel: {' and '.join(twice)} are the same file '{paths[twice[0]]}'; give each channel its own")
        return [CaseInput(_common_id(list(paths.values())), paths, source="--channel")]
    if not inputs:
        raise UsageError("give INPUT: a manifest, a DICOM export folder, a folder of NIfTI files or NIfTI files")
    loose: list[Path] = []
    for raw in inputs:
        p = Path(raw)
        if not p.exists():
            raise SegpipeError(f"input '{p}': not found")
        if p.is_file() and p.suffix.lower() == ".json":
            from segpipe.data.manifest import load_manifest

            m = load_manifest(p)
            if set(m.channels) != set(channels):
                raise SegpipeError(f"manifest '{p}': channels {', '.join(m.channels)} do not match the model's {', '.join(channels)}")
            cases += [CaseInput(c.id, {ch: m.image_path(c, ch) for ch in channels}, source=str(p)) for c in m.cases]
        elif p.is_dir():
            if is_dicom_folder(p):
                cases += dicom_cases(p, by_study=dicom_case == "study")
            else:
                files = _nifti_files(p)
                cases += _folder_cases(p, files, channels) if files else _dataset_cases(p, channels)
        elif p.name.lower().endswith(NIFTI):
            loose.append(p)
        elif is_zip(p):
            if unpack_to is None:
                raise UsageError(f"input '{p}': a ZIP archive; unpack it and give the folder")
            folder = unpack_zip(p, unpack_to / str(len(cases)), what="input")
            if not is_dicom_folder(folder):
                raise SegpipeError(f"input '{p}': a ZIP archive without DICOM files; give a DICOM export (folder or ZIP), or "
                                   "unpack NIfTI files and give them")
            for c in dicom_cases(folder, by_study=dicom_case == "study"):
                cases.append(dataclasses.replace(c, source=str(p)))
        else:
            raise SegpipeError(f"input '{p}': expected a manifest (.json), a folder, a DICOM export as ZIP archive, or "
                               "NIfTI/MetaImage/NRRD files")
    if loose:
        cases.append(CaseInput(_common_id(loose), _match_channels(loose, channels, ", ".join(str(f) for f in loose)), source="files"))
    seen: dict[str, int] = {}
    for c in cases:  # unique output names
        n = seen.get(c.id, 0)
        seen[c.id] = n + 1
        if n:
            c.id = f"{c.id}_{n + 1}"
    return cases


def dicom_cases(folder: Path, by_study: bool = True, series: list[Any] | None = None) -> list[CaseInput]:
    """A DICOM folder: one case per study in it (a PACS export of several examinations is a batch). Each is
    named after the subfolder that holds it when the studies have subfolders of their own, else numbered.
    Not ``by_study``: the folder is one case. ``series``: the folder's, when already found."""
    from segpipe.io.dicom import find_series

    if series is None:
        series = find_series(folder)
    if not by_study:
        return [CaseInput(folder.resolve().name, dicom=folder, source=str(folder), series=series or None, one_study=False)]
    studies: dict[str, list[Any]] = {}
    for s in series:
        studies.setdefault(s.study_uid, []).append(s)
    name = folder.resolve().name
    if len(studies) <= 1:
        return [CaseInput(name, dicom=folder, source=str(folder), series=series or None)]

    def top(s: Any) -> str:
        rel = Path(os.path.relpath(s.files[0], folder)).parts
        return rel[0] if len(rel) > 1 else ""

    tops = [{top(s) for s in group} for group in studies.values()]
    own = all(len(t) == 1 and "" not in t for t in tops) and len({next(iter(t)) for t in tops}) == len(tops)
    log.info("DICOM input '%s' holds %d studies: one case each", folder, len(studies))
    cases = [CaseInput(f"{name}_{next(iter(t))}" if own else f"{name}_study{k + 1}", dicom=folder, source=str(folder), series=group)
             for k, (t, group) in enumerate(zip(tops, studies.values()))]
    return sorted(cases, key=lambda c: c.id)
