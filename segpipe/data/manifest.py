"""Dataset manifests: which cases exist, where their channels and labels are, what the labels mean, folds.

A manifest is a JSON file (schema in README.md, section "Manifest format")::

    {
      "format": "segpipe-manifest",
      "version": 1,
      "name": "isles22",
      "layout": "isles22",
      "root": "../data/ISLES-2022",
      "channels": ["dwi", "adc", "flair"],
      "label": {"classes": ["background", "lesion"], "ignore_value": null, "threshold": 0.5},
      "cases": [
        {"id": "sub-strokecase0001",
         "images": {"dwi": "sub-strokecase0001/ses-0001/dwi/sub-strokecase0001_ses-0001_dwi.nii.gz", ...},
         "label": "derivatives/sub-strokecase0001/ses-0001/sub-strokecase0001_ses-0001_msk.nii.gz"}
      ],
      "folds": {"k": 5, "seed": 0, "validation": [["sub-strokecase0001", ...], ...]}
    }

``root`` is absolute or relative to the manifest's own folder; every case path is relative to ``root``
and may not leave it. The folds are written once, when the manifest is made, so that they never change
when the code or the file order does. :func:`load_manifest` checks everything and reports every problem
at once.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from segpipe.errors import SegpipeError, UsageError, did_you_mean, problems_error
from segpipe.io.atomic import atomic_write_text, ensure_writable_dir

__all__ = [
    "FORMAT",
    "VERSION",
    "Case",
    "LabelSpec",
    "Manifest",
    "load_manifest",
    "make_folds",
    "write_manifest",
]

log = logging.getLogger(__name__)

FORMAT = "segpipe-manifest"
VERSION = 1
DEFAULT_FOLDS = 5
_TOP_KEYS = {"format", "version", "name", "layout", "root", "channels", "label", "cases", "folds", "description"}
_CASE_KEYS = {"id", "images", "label", "meta"}
_LABEL_KEYS = {"classes", "ignore_value", "threshold"}
_FOLD_KEYS = {"k", "seed", "validation"}


@dataclass(frozen=True)
class LabelSpec:
    """What the values of a label file mean.

    ``classes[i]`` is the name of label value ``i`` (``classes[0]`` is the background). ``ignore_value``
    is a value that is neither (WMH 2017's 2, "other pathology"): it is excluded from losses and metrics.
    ``threshold``: for two classes, a voxel is foreground when its value is ``> threshold`` (real masks
    store 0.99999999977 or 255); ``None`` reads values as class indices after rounding.
    """

    classes: tuple[str, ...] = ("background", "lesion")
    ignore_value: int | None = None
    threshold: float | None = 0.5

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def foreground(self) -> tuple[str, ...]:
        return self.classes[1:]

    def to_json(self) -> dict[str, Any]:
        return {"classes": list(self.classes), "ignore_value": self.ignore_value, "threshold": self.threshold}


@dataclass(frozen=True)
class Case:
    """One case: a path per channel and an optional label, relative to the manifest root."""

    id: str
    images: Mapping[str, str]
    label: str | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "images": dict(self.images)}
        if self.label is not None:
            out["label"] = self.label
        if self.meta:
            out["meta"] = dict(self.meta)
        return out


@dataclass(frozen=True)
class Manifest:
    name: str
    root: Path
    channels: tuple[str, ...]
    cases: tuple[Case, ...]
    label: LabelSpec = LabelSpec()
    folds: tuple[tuple[str, ...], ...] = ()
    fold_seed: int = 0
    layout: str | None = None
    path: Path | None = None  # where it was loaded from, for messages

    # -- access -------------------------------------------------------------------------------------
    def case(self, case_id: str) -> Case:
        for c in self.cases:
            if c.id == case_id:
                return c
        raise SegpipeError(
            f"manifest '{self.where}': no case '{case_id}'{did_you_mean(case_id, [c.id for c in self.cases])}; "
            f"it has {len(self.cases)} cases"
        )

    @property
    def where(self) -> str:
        return str(self.path) if self.path else self.name

    def image_path(self, case: Case, channel: str) -> Path:
        return self.root / case.images[channel]

    def label_path(self, case: Case) -> Path | None:
        return None if case.label is None else self.root / case.label

    @property
    def labelled(self) -> tuple[Case, ...]:
        return tuple(c for c in self.cases if c.label is not None)

    def split(self, fold: int | str) -> tuple[list[str], list[str]]:
        """(training ids, validation ids) for ``fold`` (0..k-1), or ``"all"``: train on every labelled case
        and validate on none."""
        labelled = [c.id for c in self.labelled]
        if fold == "all":
            return labelled, []
        try:
            f = int(fold)
        except (TypeError, ValueError):
            raise UsageError(f"--fold: expected a fold number 0..{len(self.folds) - 1} or 'all', got '{fold}'") from None
        if not 0 <= f < len(self.folds):
            raise UsageError(
                f"--fold: manifest '{self.where}' has {len(self.folds)} folds (0..{len(self.folds) - 1}), got {f}; "
                "pick one of those or 'all'"
            )
        val = list(self.folds[f])
        val_set = set(val)
        return [c for c in labelled if c not in val_set], val

    # -- serialisation --------------------------------------------------------------------------------
    def to_json(self, relative_to: Path | None = None) -> dict[str, Any]:
        root: str = str(self.root)
        if relative_to is not None:
            try:
                root = os.path.relpath(self.root, relative_to)
            except ValueError:  # other drive on Windows
                root = str(self.root)
            root = root.replace(os.sep, "/")
        return {
            "format": FORMAT,
            "version": VERSION,
            "name": self.name,
            "layout": self.layout,
            "root": root,
            "channels": list(self.channels),
            "label": self.label.to_json(),
            "cases": [c.to_json() for c in self.cases],
            "folds": {"k": len(self.folds), "seed": self.fold_seed, "validation": [list(f) for f in self.folds]},
        }


def make_folds(case_ids: Iterable[str], k: int = DEFAULT_FOLDS, seed: int = 0) -> tuple[tuple[str, ...], ...]:
    """Seeded k-fold split of ``case_ids``: the validation ids of each fold.

    The ids are sorted, shuffled with ``random.Random(seed)`` (stable across Python and NumPy versions)
    and dealt out in turn. With fewer cases than ``k``, there is one fold per case.
    """
    ids = sorted(case_ids)
    if k < 1:
        raise UsageError(f"--folds: expected at least 1, got {k}")
    if not ids:
        return ()
    random.Random(seed).shuffle(ids)
    k = min(k, len(ids))
    return tuple(tuple(sorted(ids[i::k])) for i in range(k))


def write_manifest(manifest: Manifest, out: str | os.PathLike) -> Path:
    """Write ``manifest`` atomically to ``out``; ``root`` is stored relative to the file's folder."""
    out = Path(out)
    ensure_writable_dir(out.parent, what=f"folder of '{out}'")
    data = manifest.to_json(relative_to=out.parent.resolve())
    atomic_write_text(out, json.dumps(data, indent=2) + "\n")
    return out


# -- loading and validation ----------------------------------------------------------------------------


def _is_inside(rel: str) -> bool:
    p = PurePosixPath(rel.replace("\\", "/"))
    if p.is_absolute() or (len(rel) > 1 and rel[1] == ":"):
        return False
    depth = 0
    for part in p.parts:
        depth += -1 if part == ".." else (0 if part == "." else 1)
        if depth < 0:
            return False
    return True


def _check_path(problems: list[str], root: Path, rel: Any, what: str, check_files: bool) -> str | None:
    if not isinstance(rel, str) or not rel:
        problems.append(f"{what}: expected a relative path (string), found {rel!r}")
        return None
    if not _is_inside(rel):
        problems.append(f"{what}: path '{rel}' leaves the manifest root; give it relative to the root, without '..'")
        return None
    if check_files and not (root / rel).is_file():
        problems.append(f"{what}: file not found: '{root / rel}'")
    return rel


def _parse_label(raw: Any, problems: list[str]) -> LabelSpec:
    if raw is None:
        return LabelSpec()
    if not isinstance(raw, dict):
        problems.append(f"'label': expected an object with {sorted(_LABEL_KEYS)}, found {type(raw).__name__}")
        return LabelSpec()
    for key in raw:
        if key not in _LABEL_KEYS:
            problems.append(f"'label': unknown key '{key}'{did_you_mean(key, _LABEL_KEYS)}")
    classes = raw.get("classes", ["background", "lesion"])
    if not (isinstance(classes, list) and len(classes) >= 2 and all(isinstance(c, str) and c for c in classes)):
        problems.append(f"'label.classes': expected a list of at least 2 class names, background first; found {classes!r}")
        classes = ["background", "lesion"]
    if len(set(classes)) != len(classes):
        problems.append(f"'label.classes': names must be unique, found {classes!r}")
    ignore = raw.get("ignore_value")
    if ignore is not None and (isinstance(ignore, bool) or not isinstance(ignore, int) or 0 <= ignore < len(classes)):
        problems.append(
            f"'label.ignore_value': expected null or an integer label value that is not a class (>= {len(classes)}), found {ignore!r}"
        )
        ignore = None
    threshold = raw.get("threshold", 0.5 if len(classes) == 2 else None)
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))):
        problems.append(f"'label.threshold': expected a number or null, found {threshold!r}")
        threshold = 0.5
    if threshold is not None and len(classes) != 2:
        problems.append(f"'label.threshold': only binary labels (2 classes) are thresholded; set it to null for {len(classes)} classes")
    return LabelSpec(tuple(classes), ignore, None if threshold is None else float(threshold))


def manifest_from_dict(data: Any, *, base_dir: Path, where: str, check_files: bool = True) -> Manifest:
    """Validate a parsed manifest and build a :class:`Manifest`; every problem is reported at once."""
    problems: list[str] = []
    if not isinstance(data, dict):
        raise SegpipeError(f"manifest '{where}': expected a JSON object at the top level, found {type(data).__name__}")
    for key in data:
        if key not in _TOP_KEYS:
            problems.append(f"unknown key '{key}'{did_you_mean(key, _TOP_KEYS)}")
    if data.get("format", FORMAT) != FORMAT:
        problems.append(f"'format': expected '{FORMAT}', found {data.get('format')!r}")
    if data.get("version", VERSION) != VERSION:
        problems.append(f"'version': this segpipe reads version {VERSION}, found {data.get('version')!r}")
    name = data.get("name")
    if not isinstance(name, str) or not name:
        problems.append(f"'name': expected a non-empty string, found {name!r}")
        name = "?"
    root_raw = data.get("root")
    root = base_dir
    if not isinstance(root_raw, str) or not root_raw:
        problems.append(f"'root': expected the dataset folder (absolute, or relative to the manifest's folder), found {root_raw!r}")
    else:
        root = (base_dir / root_raw).resolve()
        if check_files and not root.is_dir():
            problems.append(f"'root': folder not found: '{root}' (relative paths are taken from the manifest's folder)")
            check_files = False  # every file would be missing: one problem is enough
    channels = data.get("channels")
    if not (isinstance(channels, list) and channels and all(isinstance(c, str) and c for c in channels)):
        problems.append(f"'channels': expected a non-empty list of channel names, found {channels!r}")
        channels = []
    elif len(set(channels)) != len(channels):
        problems.append(f"'channels': names must be unique, found {channels!r}")
    label = _parse_label(data.get("label"), problems)

    cases: list[Case] = []
    seen: dict[str, int] = {}
    raw_cases = data.get("cases")
    if not isinstance(raw_cases, list):
        problems.append(f"'cases': expected a list of cases, found {type(raw_cases).__name__}")
        raw_cases = []
    for i, rc in enumerate(raw_cases):
        if not isinstance(rc, dict):
            problems.append(f"cases[{i}]: expected an object with 'id' and 'images', found {type(rc).__name__}")
            continue
        cid = rc.get("id")
        tag = f"case '{cid}'" if isinstance(cid, str) and cid else f"cases[{i}]"
        if not isinstance(cid, str) or not cid:
            problems.append(f"{tag}: 'id' must be a non-empty string, found {cid!r}")
            cid = f"#{i}"
        elif cid in seen:
            problems.append(f"{tag}: duplicate id (also cases[{seen[cid]}]); ids must be unique")
        seen.setdefault(cid, i)
        for key in rc:
            if key not in _CASE_KEYS:
                problems.append(f"{tag}: unknown key '{key}'{did_you_mean(key, _CASE_KEYS)}")
        images = rc.get("images")
        if not isinstance(images, dict):
            problems.append(f"{tag}: 'images' must map channel names to paths, found {images!r}")
            images = {}
        checked: dict[str, str] = {}
        for ch in channels:
            if ch not in images:
                problems.append(f"{tag}: missing channel '{ch}' (the manifest's channels are {channels})")
        for ch, rel in images.items():
            if ch not in channels:
                problems.append(f"{tag}: unknown channel '{ch}'{did_you_mean(ch, channels)}; the manifest's channels are {channels}")
                continue
            ok = _check_path(problems, root, rel, f"{tag}, channel '{ch}'", check_files)
            if ok is not None:
                checked[ch] = ok
        lab = rc.get("label")
        if lab is not None:
            lab = _check_path(problems, root, lab, f"{tag}, label", check_files)
        # one file in two roles is a discovery or editing slip (a pattern that matched twice), never a dataset
        roles: dict[str, list[str]] = {}
        for role, rel in [*((f"channel '{ch}'", r) for ch, r in checked.items()), *([("label", lab)] if lab else [])]:
            roles.setdefault(str(PurePosixPath(rel)), []).append(role)
        for rel, named in roles.items():
            if len(named) > 1:
                problems.append(f"{tag}: {' and '.join(named)} are the same file '{rel}'; each needs its own")
        meta = rc.get("meta", {})
        if not isinstance(meta, dict):
            problems.append(f"{tag}: 'meta' must be an object, found {meta!r}")
            meta = {}
        cases.append(Case(cid, {ch: checked[ch] for ch in channels if ch in checked}, lab, meta))

    labelled = [c.id for c in cases if c.label is not None]
    folds, fold_seed = _parse_folds(data.get("folds"), labelled, set(seen), problems)
    if problems:
        raise problems_error(f"manifest '{where}'", problems)
    return Manifest(
        name=name,
        root=root,
        channels=tuple(channels),
        cases=tuple(cases),
        label=label,
        folds=folds,
        fold_seed=fold_seed,
        layout=data.get("layout"),
    )


def _parse_folds(raw: Any, labelled: Sequence[str], known: set[str], problems: list[str]):
    if raw is None:
        folds = make_folds(labelled, DEFAULT_FOLDS, 0)
        if labelled:
            log.info("manifest has no 'folds': using %d folds from seed 0 (segpipe manifest writes them into the file)", len(folds))
        return folds, 0
    if not isinstance(raw, dict):
        problems.append(f"'folds': expected an object with {sorted(_FOLD_KEYS)}, found {type(raw).__name__}")
        return (), 0
    for key in raw:
        if key not in _FOLD_KEYS:
            problems.append(f"'folds': unknown key '{key}'{did_you_mean(key, _FOLD_KEYS)}")
    seed = raw.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        problems.append(f"'folds.seed': expected an integer, found {seed!r}")
        seed = 0
    val = raw.get("validation")
    if not (isinstance(val, list) and all(isinstance(f, list) for f in val)):
        problems.append(f"'folds.validation': expected a list of lists of case ids, found {val!r}")
        return (), seed
    if "k" in raw and raw["k"] != len(val):
        problems.append(f"'folds.k' is {raw['k']!r} but 'folds.validation' has {len(val)} folds")
    where: dict[str, int] = {}
    labelled_set = set(labelled)
    for f, ids in enumerate(val):
        for cid in ids:
            if cid not in known:
                problems.append(f"'folds.validation[{f}]': unknown case '{cid}'{did_you_mean(str(cid), known)}")
            elif cid not in labelled_set:
                problems.append(f"'folds.validation[{f}]': case '{cid}' has no label and cannot be validated on")
            elif cid in where:
                problems.append(f"'folds.validation[{f}]': case '{cid}' is also in fold {where[cid]}; each case belongs to one fold")
            else:
                where[cid] = f
    missing = [c for c in labelled if c not in where]
    if missing and val:
        problems.append(
            f"'folds': labelled cases in no fold: {missing[:5]}{' ...' if len(missing) > 5 else ''}; "
            "rerun `segpipe manifest` or add them to a fold"
        )
    return tuple(tuple(ids) for ids in val), seed


def load_manifest(path: str | os.PathLike, *, check_files: bool = True) -> Manifest:
    """Read and validate a manifest file. Raises :class:`SegpipeError` listing every problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SegpipeError(f"manifest '{path}': file not found; make one with `segpipe manifest ROOT --out {path}`") from None
    except IsADirectoryError:
        raise SegpipeError(f"manifest '{path}': is a folder; expected a manifest JSON file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SegpipeError(f"manifest '{path}': cannot be read ({exc})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SegpipeError(
            f"manifest '{path}': invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}; fix the file or make it again with `segpipe manifest`"
        ) from None
    manifest = manifest_from_dict(data, base_dir=path.resolve().parent, where=str(path), check_files=check_files)
    return dataclasses.replace(manifest, path=path)
