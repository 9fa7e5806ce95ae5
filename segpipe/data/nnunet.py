"""Datasets already in nnU-Net's raw format, and nnU-Net's fold splits.

Many users have their data converted for nnU-Net (``DatasetXXX_Name/`` with ``dataset.json``, ``imagesTr/``,
``labelsTr/``, ``imagesTs/``). :func:`discover_nnunet` reads such a folder as it is:

- ``dataset.json`` of nnU-Net v2 (``channel_names``, ``labels`` name -> value, ``file_ending``, optionally
  ``dataset`` listing each case's files) or of v1 (``modality``, ``labels`` value -> name);
- images ``imagesTr/{CASE}_{XXXX}{file_ending}`` (XXXX: the channel index), labels ``labelsTr/{CASE}{file_ending}``;
  ``imagesTs`` cases come without a label (``labelsTs`` is used where someone added one);
- channel names: ``channel_names`` in lower case (``DWI`` -> ``dwi``, so segpipe's configs and models find them);
- labels: classes by value; nnU-Net v2's ``ignore`` label becomes the ignored value (excluded from losses and
  metrics, like WMH 2017's "other pathology"). Region-based labels (lists of values) are refused: segpipe trains
  one class per label value.

:func:`read_splits` takes nnU-Net's ``splits_final.json`` (a list of ``{"train": [...], "val": [...]}``) as the
manifest's folds, so that a cross-validation of segpipe and one of nnU-Net score the same cases with the same
models' held-out sets; :func:`splits_json` writes a manifest's folds in that format for the opposite direction.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from segpipe.data.manifest import DEFAULT_FOLDS, Case, LabelSpec, Manifest, make_folds
from segpipe.errors import SegpipeError, UsageError, did_you_mean, problems_error

__all__ = ["find_nnunet_dataset", "discover_nnunet", "read_splits", "splits_json"]

log = logging.getLogger(__name__)

#: file endings segpipe's readers take (nibabel; SimpleITK for MetaImage and NRRD)
READABLE = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd")
_CHANNEL_FILE = re.compile(r"^(?P<case>.+)_(?P<index>\d{4})$")


def _is_dataset(folder: Path) -> bool:
    """A dataset.json of nnU-Net (v2: channel_names, v1 and the Decathlon: modality) with its labels."""
    path = folder / "dataset.json"
    if not path.is_file():
        return False
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return (folder / "imagesTr").is_dir()  # broken, but meant as one: read it to say what is wrong
    return isinstance(meta, dict) and "labels" in meta and ("channel_names" in meta or "modality" in meta)


def find_nnunet_dataset(root: Path) -> Path | None:
    """``root`` itself when it is an nnU-Net raw dataset folder; the one dataset folder under it when ``root`` is
    an ``nnUNet_raw`` folder holding a single dataset; None otherwise. Several datasets under ``root``: an error
    naming them (which one is meant cannot be guessed)."""
    if _is_dataset(root):
        return root
    try:
        subs = sorted(d for d in root.iterdir() if d.is_dir() and _is_dataset(d))
    except OSError:
        return None
    if len(subs) > 1:
        raise SegpipeError(
            f"ROOT '{root}': {len(subs)} nnU-Net datasets in it ({', '.join(d.name for d in subs[:6])}"
            f"{' ...' if len(subs) > 6 else ''}); give the folder of one of them"
        )
    return subs[0] if subs else None


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SegpipeError(f"{what} '{path}': file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SegpipeError(f"{what} '{path}': cannot be read ({exc})") from None
    except json.JSONDecodeError as exc:
        raise SegpipeError(f"{what} '{path}': invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None


def _channel_names(raw: Any, where: str) -> list[str]:
    """Channel names by index, lower case, made unique (``T1``, ``T1`` -> ``t1``, ``t1_1``)."""
    if not isinstance(raw, dict) or not raw:
        raise SegpipeError(f"{where}: 'channel_names' (v2) or 'modality' (v1) must map channel indices to names, found {raw!r}")
    try:
        indexed = sorted((int(k), v) for k, v in raw.items())
    except (TypeError, ValueError):
        raise SegpipeError(f"{where}: channel indices must be integers 0, 1, ..., found {sorted(raw)}") from None
    if [i for i, _ in indexed] != list(range(len(indexed))):
        raise SegpipeError(f"{where}: channel indices must be 0..{len(indexed) - 1} without gaps, found {[i for i, _ in indexed]}")
    names: list[str] = []
    for i, v in indexed:
        base = re.sub(r"[^a-z0-9]+", "_", str(v).strip().lower()).strip("_") or f"channel{i}"
        name, n = base, 1
        while name in names:
            name, n = f"{base}_{n}", n + 1
        names.append(name)
    return names


def _label_spec(raw: Any, where: str) -> LabelSpec:
    """nnU-Net's labels as classes by value; v2 maps names to values, v1 values to names."""
    if not isinstance(raw, dict) or not raw:
        raise SegpipeError(f"{where}: 'labels' must map label names to values (v2) or values to names (v1), found {raw!r}")
    v1 = all(isinstance(k, str) and k.strip().isdigit() for k in raw)
    by_value: dict[int, str] = {}
    ignore: int | None = None
    for k, v in raw.items():
        name, value = (v, k) if v1 else (k, v)
        if isinstance(value, (list, tuple)):
            raise SegpipeError(
                f"{where}: label '{name}' is a region ({list(value)}); segpipe trains one class per label value, not nnU-Net's "
                "region-based training; give each class its own value"
            )
        try:
            value = int(value)
        except (TypeError, ValueError):
            raise SegpipeError(f"{where}: label '{name}': expected an integer value, found {value!r}") from None
        if not v1 and str(name).lower() == "ignore":
            ignore = value
            continue
        if value in by_value:
            raise SegpipeError(f"{where}: labels '{by_value[value]}' and '{name}' share the value {value}")
        by_value[value] = str(name)
    if sorted(by_value) != list(range(len(by_value))) or len(by_value) < 2:
        raise SegpipeError(f"{where}: label values must be 0 (background), 1, ... without gaps, found {sorted(by_value)}")
    if ignore is not None and ignore != len(by_value):
        raise SegpipeError(f"{where}: the 'ignore' label must have the value after the last class ({len(by_value)}), found {ignore}")
    classes = tuple(by_value[i] for i in range(len(by_value)))
    return LabelSpec(classes, ignore, 0.5 if len(classes) == 2 else None)


def _scan(folder: Path, ending: str) -> list[str]:
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.is_file() and p.name.endswith(ending) and not p.name.startswith("."))


def discover_nnunet(
    root: str | os.PathLike,
    channels: Sequence[str] | None = None,
    *,
    name: str | None = None,
    folds: int = DEFAULT_FOLDS,
    seed: int = 0,
    skip_incomplete: bool = False,
) -> Manifest:
    """The cases of an nnU-Net raw dataset folder as a manifest (see the module docstring); every problem is
    reported at once, like :func:`segpipe.data.layouts.discover`."""
    root = Path(root)
    where = f"'{root / 'dataset.json'}'"
    meta = _read_json(root / "dataset.json", "nnU-Net dataset.json")
    if not isinstance(meta, dict):
        raise SegpipeError(f"{where}: expected a JSON object, found {type(meta).__name__}")
    names = _channel_names(meta.get("channel_names", meta.get("modality")), where)
    label = _label_spec(meta.get("labels"), where)
    ending = meta.get("file_ending", ".nii.gz")
    if not isinstance(ending, str) or not ending.lower().endswith(READABLE):
        raise SegpipeError(
            f"{where}: file_ending {ending!r} is not an image format segpipe reads ({', '.join(READABLE)}); "
            "2D images (.png, .tif) are not for a 3D pipeline"
        )
    if channels:
        for ch in channels:
            if ch not in names:
                raise UsageError(f"--channels: '{ch}' is not a channel of {where}{did_you_mean(ch, names)}; choose from {', '.join(names)}")
        if len(set(channels)) != len(channels):
            raise UsageError(f"--channels: each channel once, got {','.join(channels)}")
    chosen = tuple(channels) if channels else tuple(names)
    index = {n: i for i, n in enumerate(names)}

    problems: list[str] = []
    found: dict[str, dict[int, str]] = defaultdict(dict)
    labels: dict[str, str] = {}
    base = root  # the manifest's root
    unlabelled_tr: set[str] = set()  # training cases whose label is missing
    if isinstance(meta.get("dataset"), dict):
        # nnU-Net v2's explicit file list: {case: {"images": [...], "label": ...}}, paths relative to the dataset folder
        for cid, entry in meta["dataset"].items():
            imgs = entry.get("images") if isinstance(entry, dict) else None
            if not isinstance(imgs, list) or len(imgs) != len(names):
                problems.append(f"case '{cid}': 'dataset' entry needs {len(names)} images (one per channel), found {imgs!r}")
                continue
            paths = [*imgs, entry["label"]] if entry.get("label") else list(imgs)
            absent = [str(p) for p in paths if not (root / str(p)).is_file()]
            if absent:
                problems.append(f"case '{cid}': file(s) of its 'dataset' entry not found: {', '.join(absent[:3])}")
                continue
            found[cid] = {i: os.path.abspath(root / str(p)) for i, p in enumerate(imgs)}
            if entry.get("label"):
                labels[cid] = os.path.abspath(root / str(entry["label"]))
        # paths relative to the dataset folder or absolute (nnU-Net takes both): the manifest's root is the folder
        # that holds them all, so that every path stays inside it
        everything = [os.path.abspath(root), *(f for files in found.values() for f in files.values()), *labels.values()]
        base = Path(os.path.commonpath(everything))
        found = defaultdict(dict, {cid: {i: Path(f).relative_to(base).as_posix() for i, f in files.items()} for cid, files in found.items()})
        labels = {cid: Path(f).relative_to(base).as_posix() for cid, f in labels.items()}
    else:
        twice: set[str] = set()
        for split in ("imagesTr", "imagesTs"):
            stray: list[str] = []
            scanned = _scan(root / split, ending)
            for fname in scanned:
                m = _CHANNEL_FILE.match(fname[: -len(ending)])
                if not m:
                    stray.append(fname)
                    continue
                cid, i = m.group("case"), int(m.group("index"))
                if i >= len(names):
                    problems.append(f"'{split}/{fname}': channel index {i:04d}, but dataset.json names {len(names)} channel(s)")
                    continue
                if i in found[cid] and not found[cid][i].startswith(split + "/"):
                    twice.add(cid)
                    continue
                found[cid][i] = f"{split}/{fname}"
            if stray:
                hint = ("a multi-channel 4D file of the Medical Segmentation Decathlon: split it into one file per channel "
                        "(nnUNetv2_convert_MSD_dataset does)") if len(stray) == len(scanned) else \
                       "nnU-Net names images CASE_XXXX (XXXX: the channel index)"
                problems.append(f"'{split}': {len(stray)} file(s) without a channel index ({', '.join(stray[:3])}"
                                f"{' ...' if len(stray) > 3 else ''}); {hint}")
        problems += [f"case '{cid}': in both imagesTr and imagesTs; case identifiers must be unique" for cid in sorted(twice)]
        for split, images in (("labelsTr", "imagesTr"), ("labelsTs", "imagesTs")):
            for fname in _scan(root / split, ending):
                cid = fname[: -len(ending)]
                if cid not in found:
                    problems.append(f"'{split}/{fname}': a label without images (no {images}/{cid}_0000{ending})")
                    continue
                labels[cid] = f"{split}/{fname}"
        unlabelled_tr = {cid for cid, files in found.items()
                         if cid not in labels and any(f.startswith("imagesTr/") for f in files.values())}
    if not found and not problems:
        raise SegpipeError(f"{where}: no images named CASE_XXXX{ending} in imagesTr or imagesTs")

    cases: list[Case] = []
    skipped: list[str] = []
    for cid in sorted(found):
        files = found[cid]
        missing = [ch for ch in chosen if index[ch] not in files]
        if missing or cid in unlabelled_tr:
            if skip_incomplete:
                skipped.append(cid)
            elif missing:
                problems.append(f"case '{cid}': no file for channel(s) {', '.join(f'{ch} (_{index[ch]:04d})' for ch in missing)}")
            else:
                problems.append(f"case '{cid}': in imagesTr without a label (labelsTr/{cid}{ending})")
            continue
        cases.append(Case(cid, {ch: files[index[ch]] for ch in chosen}, labels.get(cid)))
    if problems:
        incomplete = any("no file for" in p or "without a label" in p for p in problems)
        raise problems_error(f"ROOT '{root}' (nnU-Net raw dataset)", problems,
                             hint="pass --skip-incomplete to leave out cases that miss a channel or their label" if incomplete else "")
    if skipped:
        log.warning("left out %d case(s) that miss a channel or their label: %s", len(skipped), ", ".join(skipped))
    if not cases:
        raise SegpipeError(f"ROOT '{root}': every case misses one of the channels {', '.join(chosen)}")
    n_train = meta.get("numTraining")
    n_labelled_tr = sum(1 for c in cases if c.label is not None and c.label.startswith("labelsTr/"))
    if isinstance(n_train, int) and n_train != n_labelled_tr and not isinstance(meta.get("dataset"), dict):
        log.warning("%s: numTraining is %d, but labelsTr holds %d cases", where, n_train, n_labelled_tr)
    labelled = [c.id for c in cases if c.label is not None]
    default_name = meta.get("name") if isinstance(meta.get("name"), str) and meta.get("name") else root.name
    return Manifest(
        name=name or default_name,
        root=base.resolve(),
        channels=chosen,
        cases=tuple(cases),
        label=label,
        folds=make_folds(labelled, folds, seed),
        fold_seed=seed,
        layout="nnunet",
    )


def read_splits(path: str | os.PathLike, manifest: Manifest) -> tuple[tuple[str, ...], ...]:
    """nnU-Net's ``splits_final.json`` as the manifest's folds (each fold's validation ids). Each case of the
    manifest with a label must be validated in exactly one fold and trained on in all the others, as in
    nnU-Net's own 5-fold split; custom splits that differ are refused, naming the fold."""
    path = Path(path)
    where = f"--splits '{path}'"
    raw = _read_json(path, "--splits")
    if not (isinstance(raw, list) and raw and all(isinstance(f, dict) and isinstance(f.get("train"), list)
                                                  and isinstance(f.get("val"), list) for f in raw)):
        raise SegpipeError(f"{where}: expected nnU-Net's splits_final.json, a list of {{\"train\": [...], \"val\": [...]}} per fold")
    labelled = [c.id for c in manifest.labelled]
    known = set(labelled)
    problems: list[str] = []
    seen: dict[str, int] = {}
    for f, fold in enumerate(raw):
        val, train = [str(c) for c in fold["val"]], {str(c) for c in fold["train"]}
        unknown = sorted((set(val) | train) - known)
        if unknown:
            problems.append(f"fold {f}: {len(unknown)} case(s) not among the dataset's labelled cases: {', '.join(unknown[:4])}"
                            f"{' ...' if len(unknown) > 4 else ''}{did_you_mean(unknown[0], labelled)}")
            continue
        for cid in val:
            if cid in seen:
                problems.append(f"fold {f}: case '{cid}' is also validated in fold {seen[cid]}; segpipe's folds hold each case once")
            seen.setdefault(cid, f)
        expected = known - set(val)
        if train != expected:
            odd = sorted(expected - train)[:3] + sorted(train & set(val))[:3]
            problems.append(f"fold {f}: its training cases are not all the others ({', '.join(odd)} differ); segpipe trains a fold "
                            "on every labelled case it does not validate on")
    missing = sorted(known - set(seen))
    if missing and not problems:
        problems.append(f"{len(missing)} labelled case(s) validated in no fold: {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}")
    if problems:
        raise problems_error(where, problems, hint="make the splits with the same dataset, or leave out --splits for segpipe's own")
    return tuple(tuple(sorted(str(c) for c in fold["val"])) for fold in raw)


def splits_json(manifest: Manifest) -> list[dict[str, list[str]]]:
    """The manifest's folds in nnU-Net's ``splits_final.json`` format."""
    out = []
    for f in range(len(manifest.folds)):
        train, val = manifest.split(f)
        out.append({"train": sorted(train), "val": sorted(val)})
    return out
