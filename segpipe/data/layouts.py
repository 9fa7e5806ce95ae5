"""Discovery of datasets in the layouts their challenges distribute them in.

Each layout turns the list of image files under a root into cases (channel -> file, optional label).
Matching is on names that carry meaning (BIDS entities, modality tokens, fixed file names), case-insensitive,
never on numeric ids, so renumbered or re-nested copies of a dataset are still found.

- ``isles22``: ISLES 2022, both the Zenodo zip (``sub-*/ses-*/anat/*_FLAIR.nii.gz``, ``dwi/*_dwi``, ``dwi/*_adc``)
  and the organisers' flat sample (``rawdata/sub-*/ses-*/*_flair.nii.gz``); masks ``derivatives/**/*_msk.nii.gz``.
- ``isles15``: ISLES 2015 SISS, ``<case>/VSD.Brain.XX.O.MR_<Flair|T1|T2|DWI>.<id>/*.nii``, label ``...O.OT.<id>``.
- ``isles18``: ISLES 2018, ``<case>/SMIR.Brain.XX.O.CT_<CBF|CBV|MTT|Tmax>.<id>/*.nii``, ``...O.CT.<id>`` (NCCT),
  label ``...O.OT.<id>``.
- ``wmh17``: WMH 2017, ``<site>/<id>/pre/{FLAIR,T1}.nii.gz``, label ``<site>/<id>/wmh.nii.gz`` (2 = other pathology).
- ``nnunet``: a dataset already in nnU-Net's raw format (``dataset.json``, ``imagesTr/CASE_XXXX``, ``labelsTr``,
  ``imagesTs``); its channels and classes come from ``dataset.json`` (:mod:`segpipe.data.nnunet`).
"""

from __future__ import annotations

import logging
import os
import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from segpipe.data.manifest import DEFAULT_FOLDS, Case, LabelSpec, Manifest, make_folds
from segpipe.data.nnunet import discover_nnunet, find_nnunet_dataset
from segpipe.errors import SegpipeError, UsageError, did_you_mean, problems_error

__all__ = ["LAYOUTS", "LAYOUT_NAMES", "Found", "Layout", "discover", "image_files"]

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".nii", ".nii.gz", ".mha", ".mhd", ".nrrd")


@dataclass
class Found:
    """A case as discovered: candidate files per channel (more than one is a problem) and labels."""

    key: tuple[str, ...]
    images: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    labels: list[str] = field(default_factory=list)
    meta: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Layout:
    name: str
    title: str
    channels: tuple[str, ...]
    label: LabelSpec
    expects: str
    find: Callable[[Sequence[PurePosixPath]], dict[tuple[str, ...], Found]]


def image_files(root: Path) -> list[PurePosixPath]:
    """Every image file under ``root`` (relative, POSIX), sorted; hidden folders are skipped."""
    out: list[PurePosixPath] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = PurePosixPath(Path(dirpath).relative_to(root).as_posix())
        for name in filenames:
            if name.lower().endswith(IMAGE_SUFFIXES) and not name.startswith("."):
                out.append(rel / name)
    return sorted(out)


# -- ISLES 2022 ------------------------------------------------------------------------------------------

_ISLES22_IMG = re.compile(r"^(sub-[^_/]+)_(ses-[^_/]+)_(dwi|adc|flair)\.nii(\.gz)?$", re.I)
_ISLES22_MSK = re.compile(r"^(sub-[^_/]+)_(ses-[^_/]+)_msk\.nii(\.gz)?$", re.I)


def _find_isles22(files: Sequence[PurePosixPath]) -> dict[tuple[str, ...], Found]:
    found: dict[tuple[str, ...], Found] = {}
    for f in files:
        in_derivatives = any(p.lower() == "derivatives" for p in f.parts[:-1])
        m = _ISLES22_MSK.match(f.name) if in_derivatives else _ISLES22_IMG.match(f.name)
        if not m:
            continue
        key = (m.group(1), m.group(2))
        case = found.setdefault(key, Found(key))
        if in_derivatives:
            case.labels.append(str(f))
        else:
            case.images[m.group(3).lower()].append(str(f))
    return found


# -- ISLES 2015 / 2018: modality tokens in SMIR-style names ----------------------------------------------

_TOKEN = re.compile(r"\.O\.(MR_[A-Za-z0-9]+|CT_[A-Za-z0-9]+|CT|OT)\.\d+(\.(nii|nii\.gz|mha|mhd|nrrd))?$", re.I)


def _token_finder(tokens: dict[str, str]) -> Callable[[Sequence[PurePosixPath]], dict[tuple[str, ...], Found]]:
    """Cases of a layout whose folders are named ``<prefix>.O.<TOKEN>.<id>``; ``tokens`` maps a token
    (lower case) to a channel name, ``OT`` is the label. The case is the folder above the first folder
    (from the top) that carries a token, however deep the dataset sits under the root."""
    lowered = {k.lower(): v for k, v in tokens.items()}

    def find(files: Sequence[PurePosixPath]) -> dict[tuple[str, ...], Found]:
        found: dict[tuple[str, ...], Found] = {}
        for f in files:
            parts = f.parts
            tagged = [i for i, p in enumerate(parts) if _TOKEN.search(p)]
            if not tagged:
                continue
            first = tagged[0]
            token = _TOKEN.search(parts[tagged[-1]]).group(1).lower()
            if token != "ot" and token not in lowered:
                continue
            key = tuple(parts[:first]) or (".",)
            case = found.setdefault(key, Found(key))
            if token == "ot":
                case.labels.append(str(f))
            else:
                case.images[lowered[token]].append(str(f))
        # a case made only of labels or of other tokens (SPES, 4D PWI) is not one of ours
        return {k: v for k, v in found.items() if v.images}

    return find


# -- WMH 2017 --------------------------------------------------------------------------------------------

_WMH_IMG = {"flair.nii.gz": "flair", "t1.nii.gz": "t1", "flair.nii": "flair", "t1.nii": "t1"}
_WMH_LABEL = {"wmh.nii.gz", "wmh.nii"}


def _find_wmh17(files: Sequence[PurePosixPath]) -> dict[tuple[str, ...], Found]:
    found: dict[tuple[str, ...], Found] = {}
    for f in files:
        name = f.name.lower()
        if name in _WMH_IMG and len(f.parts) >= 3 and f.parts[-2].lower() == "pre":
            key = tuple(f.parts[:-2])
            found.setdefault(key, Found(key)).images[_WMH_IMG[name]].append(str(f))
    for f in files:
        if f.name.lower() in _WMH_LABEL and tuple(f.parts[:-1]) in found:
            found[tuple(f.parts[:-1])].labels.append(str(f))
    for key, case in found.items():
        if len(key) >= 2:
            case.meta["site"] = key[-2] if key[-2].lower() != "training" else ""
    return found


_BINARY = LabelSpec(("background", "lesion"), None, 0.5)

LAYOUTS: dict[str, Layout] = {
    "isles22": Layout(
        "isles22",
        "ISLES 2022",
        ("dwi", "adc", "flair"),
        _BINARY,
        "sub-*/ses-*/[anat/|dwi/]sub-*_ses-*_{dwi,adc,flair}.nii.gz and masks derivatives/sub-*/ses-*/*_msk.nii.gz",
        _find_isles22,
    ),
    "isles15": Layout(
        "isles15",
        "ISLES 2015 SISS",
        ("flair", "t1", "t2", "dwi"),
        _BINARY,
        "<case>/VSD.Brain.XX.O.MR_{Flair,T1,T2,DWI}.<id>/*.nii and label <case>/VSD.Brain.XX.O.OT.<id>/*.nii",
        _token_finder({"MR_Flair": "flair", "MR_T1": "t1", "MR_T2": "t2", "MR_DWI": "dwi"}),
    ),
    "isles18": Layout(
        "isles18",
        "ISLES 2018",
        ("ct", "cbf", "cbv", "mtt", "tmax"),
        _BINARY,
        "<case>/SMIR.Brain.XX.O.CT[_{CBF,CBV,MTT,Tmax}].<id>/*.nii and label <case>/SMIR.Brain.XX.O.OT.<id>/*.nii",
        _token_finder({"CT": "ct", "CT_CBF": "cbf", "CT_CBV": "cbv", "CT_MTT": "mtt", "CT_Tmax": "tmax"}),
    ),
    "wmh17": Layout(
        "wmh17",
        "WMH 2017",
        ("flair", "t1"),
        LabelSpec(("background", "wmh"), 2, 0.5),
        "<site>/<id>/pre/{FLAIR,T1}.nii.gz and label <site>/<id>/wmh.nii.gz",
        _find_wmh17,
    ),
}


#: what --layout takes besides "auto": the challenges' layouts and nnU-Net's raw format
LAYOUT_NAMES = (*LAYOUTS, "nnunet")


def _case_ids(found: dict[tuple[str, ...], Found], layout: str) -> dict[tuple[str, ...], str]:
    """Readable, unique ids: the subject (ISLES 2022) or the case folder's name; qualified by the session
    or the parent folders only where that name alone would repeat."""
    if layout == "isles22":
        subjects = defaultdict(int)
        for sub, _ses in found:
            subjects[sub] += 1
        return {k: k[0] if subjects[k[0]] == 1 else f"{k[0]}_{k[1]}" for k in found}
    names = defaultdict(int)
    for k in found:
        names[k[-1]] += 1
    return {k: k[-1] if names[k[-1]] == 1 else "_".join(k) for k in found}


def discover(
    root: str | os.PathLike,
    layout: str = "auto",
    channels: Sequence[str] | None = None,
    *,
    name: str | None = None,
    folds: int = DEFAULT_FOLDS,
    seed: int = 0,
    skip_incomplete: bool = False,
) -> Manifest:
    """Find the cases of a dataset under ``root`` and return a manifest (folds included).

    ``layout="auto"`` takes an nnU-Net raw dataset (``dataset.json``) as such, else tries every known layout
    and takes the one that finds cases (the one that finds the most, should several). ``channels`` picks and orders the channels (default: all of the layout's).
    Every problem (a case missing a channel, two files for one channel, two labels) is reported at once;
    ``skip_incomplete`` leaves out cases that miss a channel instead.
    """
    root = Path(root)
    if not root.is_dir():
        raise SegpipeError(f"ROOT '{root}': folder not found; give the folder the dataset was unpacked into")
    if layout != "auto" and layout not in LAYOUT_NAMES:
        raise UsageError(f"--layout: unknown layout '{layout}'{did_you_mean(layout, LAYOUT_NAMES)}; choose from auto, {', '.join(LAYOUT_NAMES)}")
    if layout in ("auto", "nnunet"):
        dataset = find_nnunet_dataset(root)
        if dataset is not None:
            return discover_nnunet(dataset, channels, name=name, folds=folds, seed=seed, skip_incomplete=skip_incomplete)
        if layout == "nnunet":
            raise SegpipeError(f"ROOT '{root}': not an nnU-Net raw dataset; expected dataset.json next to imagesTr/ (and labelsTr/), "
                               "as in nnUNet_raw/DatasetXXX_Name")
    files = image_files(root)
    if layout == "auto":
        results = {n: L.find(files) for n, L in LAYOUTS.items()}
        hits = {n: r for n, r in results.items() if r}
        if not hits:
            tried = [f"{L.name} ({L.title}): {L.expects}" for L in LAYOUTS.values()]
            tried.append("nnunet (nnU-Net raw dataset): dataset.json, imagesTr/CASE_XXXX.nii.gz, labelsTr/CASE.nii.gz")
            raise SegpipeError(
                f"ROOT '{root}': no known dataset layout found among {len(files)} image files; "
                "point ROOT at the unpacked dataset or write a manifest by hand (README: Manifest format); layouts tried",
                details=tried,
            )
        layout = max(hits, key=lambda n: len(hits[n]))
        if len(hits) > 1:
            log.warning("several layouts match under %s: %s; using %s (pass --layout to choose)", root, sorted(hits), layout)
        found = hits[layout]
    else:
        found = LAYOUTS[layout].find(files)
        if not found:
            L = LAYOUTS[layout]
            raise SegpipeError(
                f"ROOT '{root}': no {L.title} cases found among {len(files)} image files; expected {L.expects} "
                "(try --layout auto)"
            )
    spec = LAYOUTS[layout]
    if channels:
        for ch in channels:
            if ch not in spec.channels:
                raise UsageError(
                    f"--channels: '{ch}' is not a {spec.title} channel{did_you_mean(ch, spec.channels)}; "
                    f"choose from {', '.join(spec.channels)}"
                )
        if len(set(channels)) != len(channels):
            raise UsageError(f"--channels: each channel once, got {','.join(channels)}")
        chosen = tuple(channels)
    else:
        chosen = spec.channels
    ids = _case_ids(found, layout)
    problems: list[str] = []
    cases: list[Case] = []
    skipped: list[str] = []
    for key in sorted(found, key=lambda k: ids[k]):
        f = found[key]
        cid = ids[key]
        missing = [ch for ch in chosen if not f.images.get(ch)]
        if missing:
            if skip_incomplete:
                skipped.append(cid)
                continue
            problems.append(f"case '{cid}': no file for channel(s) {', '.join(missing)} (found: {', '.join(sorted(f.images)) or 'none'})")
            continue
        for ch in chosen:
            if len(f.images[ch]) > 1:
                problems.append(f"case '{cid}': {len(f.images[ch])} files for channel '{ch}': {', '.join(f.images[ch])}; keep one")
        if len(f.labels) > 1:
            problems.append(f"case '{cid}': {len(f.labels)} label files: {', '.join(f.labels)}; keep one")
        meta = {k: v for k, v in f.meta.items() if v}
        cases.append(Case(cid, {ch: f.images[ch][0] for ch in chosen}, f.labels[0] if f.labels else None, meta))
    if problems:
        incomplete = any("no file for" in p for p in problems)
        raise problems_error(
            f"ROOT '{root}' ({spec.title})",
            problems,
            hint="pass --skip-incomplete to leave out cases that miss a channel, or --channels to use fewer" if incomplete else "",
        )
    if skipped:
        log.warning("left out %d case(s) that miss a channel: %s", len(skipped), ", ".join(skipped))
    if not cases:
        raise SegpipeError(f"ROOT '{root}': every {spec.title} case misses one of the channels {', '.join(chosen)}")
    unlabelled = sum(c.label is None for c in cases)
    if unlabelled:
        log.info("%d of %d cases have no label (usable for inference only)", unlabelled, len(cases))
    labelled = [c.id for c in cases if c.label is not None]
    return Manifest(
        name=name or layout,
        root=root.resolve(),
        channels=chosen,
        cases=tuple(cases),
        label=spec.label,
        folds=make_folds(labelled, folds, seed),
        fold_seed=seed,
        layout=layout,
    )
