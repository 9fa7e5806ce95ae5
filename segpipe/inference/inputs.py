"""What ``segpipe infer`` is given, as cases: manifests, DICOM exports, folders and files of NIfTI images.

Inputs, each argument one of:

- a manifest (``.json``): every case in it;
- a folder holding a DICOM export (a tree of several series): one case per study in it (named after the
  study's own subfolder, else numbered; one study: the folder's name);
- a folder of NIfTI files, or NIfTI files given together: one case; a file belongs to the channel whose
  name appears in its file name as a word (``..._dwi.nii.gz``, ``flair.nii.gz``), or ``--channel NAME=PATH``.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from segpipe.errors import SegpipeError, UsageError

__all__ = ["NIFTI", "CaseInput", "resolve_inputs"]

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


def _common_id(files: Sequence[Path]) -> str:
    stems = [_stem(f) for f in files]
    prefix = os.path.commonprefix(stems).rstrip("_-. ")
    return prefix or stems[0]


def resolve_inputs(inputs: Sequence[str | Path], channels: Sequence[str], channel_map: Mapping[str, str] | None = None) -> list[CaseInput]:
    """Turn the command line's inputs into cases (see the module docstring)."""
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
                cases += _dicom_cases(p)
            else:
                files = sorted(f for f in p.iterdir() if f.is_file() and f.name.lower().endswith(NIFTI))
                if not files:
                    raise SegpipeError(f"input '{p}': a folder with neither DICOM nor NIfTI files")
                cases.append(CaseInput(p.resolve().name, _match_channels(files, channels, str(p)), source=str(p)))
        elif p.name.lower().endswith(NIFTI):
            loose.append(p)
        else:
            raise SegpipeError(f"input '{p}': expected a manifest (.json), a folder, or NIfTI/MetaImage/NRRD files")
    if loose:
        cases.append(CaseInput(_common_id(loose), _match_channels(loose, channels, ", ".join(str(f) for f in loose)), source="files"))
    seen: dict[str, int] = {}
    for c in cases:  # unique output names
        n = seen.get(c.id, 0)
        seen[c.id] = n + 1
        if n:
            c.id = f"{c.id}_{n + 1}"
    return cases


def _dicom_cases(folder: Path) -> list[CaseInput]:
    """A DICOM folder: one case per study in it (a PACS export of several examinations is a batch). Each is
    named after the subfolder that holds it when the studies have subfolders of their own, else numbered."""
    from segpipe.io.dicom import find_series

    series = find_series(folder)
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
