"""``segpipe preprocess``: fingerprint a dataset, plan, and fill the case cache (in parallel, resumable)."""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import logging
import os
import shutil
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import yaml
from monai.transforms import Compose
from scipy import ndimage

from segpipe.config import Config, config_to_dict
from segpipe.data.cache import CaseCache, case_key, foreground_locations, has_foreground
from segpipe.data.manifest import Case, Manifest
from segpipe.errors import SegpipeError
from segpipe.io.atomic import atomic_write_text, ensure_writable_dir
from segpipe.io.nifti import read_geometry
from segpipe.planning import Plan, make_plan
from segpipe.progress import track
from segpipe.resources import available_memory, process_pool, usable_cores
from segpipe.transforms.preprocessing import (
    IGNORE_INDEX,
    build_preprocessing,
    channel_key,
    loading_steps,
    run_chain,
)

__all__ = ["PreprocessReport", "auto_workers", "case_inputs", "ct_statistics", "header_geometry", "preprocess_dataset", "preprocess_case"]

log = logging.getLogger(__name__)


@dataclass
class PreprocessReport:
    processed: list[str] = field(default_factory=list)
    up_to_date: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    unlabelled: list[str] = field(default_factory=list)
    seconds: float = 0.0
    plan: Plan | None = None
    workers: int = 1  # the processes used (the automatic choice resolved)


def header_geometry(path: Path, what: str = "image") -> tuple[tuple[float, ...], tuple[int, ...]]:
    """Spacing and shape of an image in the axis order it will have after reorientation (header only)."""
    geo = read_geometry(path, what=what)
    spacing = geo.spacing
    ornt = nib.orientations.io_orientation(geo.affine)
    out_sp = [0.0] * 3
    out_sh = [0] * 3
    for i in range(3):
        out_sp[int(ornt[i, 0])] = float(spacing[i])
        out_sh[int(ornt[i, 0])] = int(geo.shape[i])
    return tuple(round(v, 6) for v in out_sp), tuple(out_sh)


def case_inputs(manifest: Manifest, case: Case, with_label: bool = True) -> dict[str, str]:
    d = {channel_key(ch): str(manifest.image_path(case, ch)) for ch in manifest.channels}
    if with_label and case.label is not None:
        d["label"] = str(manifest.label_path(case))
    return d


def _label_stats(label: np.ndarray, num_classes: int, spacing: tuple[float, ...]) -> dict[str, Any]:
    voxel_mm3 = float(np.prod(spacing))
    valid = label != IGNORE_INDEX
    n = max(int(valid.sum()), 1)
    out: dict[str, Any] = {"fractions": [float((label == k).sum()) / n for k in range(num_classes)], "ignored_voxels": int((~valid).sum())}
    per_class = []
    for k in range(1, num_classes):
        lab, count = ndimage.label(label == k, structure=np.ones((3, 3, 3)))
        sizes = ndimage.sum_labels(np.ones_like(lab), lab, index=np.arange(1, count + 1)) * voxel_mm3 if count else np.zeros(0)
        per_class.append({"lesions": int(count), "sizes_mm3": sorted((round(float(s), 2) for s in sizes), reverse=True),
                          "volume_ml": float((label == k).sum()) * voxel_mm3 / 1000.0})
    out["classes"] = per_class
    return out


#: a preprocessing process's peak per float32 value of its case (channels, label and distance maps on the larger
#: of the input and the target grid): the chain's working copies; `preprocess_sample` measures 2.3-3.9x the
#: input's float32 size, this leaves room. Plus what a forked process's own pages take.
PEAK_PER_VALUE = 4 * 4
PROCESS_BYTES = 300 * 2**20


def auto_workers(jobs: int, values_per_case: float, memory: int | None = None, cores: int | None = None) -> tuple[int, str]:
    """nnU-Net-like default for ``--workers``: a process per core, at most one per case, and no more than the
    memory holds (``values_per_case``: float32 values of the largest case, see :data:`PEAK_PER_VALUE`).
    Returns the number and the reason, for the log."""
    cores = usable_cores() if cores is None else cores
    memory = available_memory() if memory is None else memory
    per_process = values_per_case * PEAK_PER_VALUE + PROCESS_BYTES
    by_memory = max(1, int(memory // per_process)) if memory is not None else cores
    n = max(1, min(cores, jobs, by_memory))
    why = f"{cores} cores, {jobs} cases to make"
    if memory is not None:
        why += f", memory for {by_memory} ({memory / 2**30:.1f} GiB available, about {per_process / 2**30:.1f} GiB each)"
    return n, why


#: lesion voxels sampled for the "ct" scheme's statistics, over all cases together (nnU-Net samples 1e8; at 1e7
#: the sampling error of a 0.5 % percentile is a small fraction of a Hounsfield unit, and the parent holds 40 MB
#: per CT channel instead of 400)
CT_SAMPLES = 10**7


def ct_channels(plan: Plan) -> list[str]:
    return [c for c in plan.channels if plan.scheme(c) == "ct"]


def _ct_samples(job: dict[str, Any]) -> tuple[str, str, dict[str, np.ndarray] | str]:
    """One case's lesion voxels of the ct channels (on the reference grid, as read), ``job["samples"]`` of them
    drawn with replacement (every case weighs the same, as in nnU-Net's fingerprint); none when it has no lesion."""
    case_id = job["case"]
    try:
        plan = Plan.from_json(job["plan"])
        channels = ct_channels(plan)
        sub = dataclasses.replace(plan, channels=tuple(dict.fromkeys([*channels, plan.reference_channel])))
        inputs = {k: v for k, v in job["inputs"].items() if k == "label" or k in {channel_key(c) for c in sub.channels}}
        d = run_chain(Compose(loading_steps(sub, with_label=True), map_items=False), inputs)
        label = np.asarray(d["label"][0])
        fg = (label > 0) & (label != IGNORE_INDEX)
        rng = np.random.default_rng(zlib.crc32(case_id.encode()))
        pick = rng.integers(0, int(fg.sum()), size=job["samples"]) if fg.any() else np.zeros(0, dtype=np.int64)
        return "ok", case_id, {c: np.asarray(d[channel_key(c)][0], dtype=np.float32)[fg][pick] for c in channels}
    except SegpipeError as exc:
        return "error", case_id, str(exc)
    except Exception as exc:  # a bug: reported per case, as in _work
        first = (str(exc).strip().splitlines() or [""])[0]
        return "error", case_id, f"unexpected {type(exc).__name__}: {first} (a bug in segpipe; rerun with --debug --workers 1)"


def ct_statistics(plan: Plan, jobs: list[dict[str, Any]], workers: int) -> tuple[dict[str, dict[str, float]], dict[str, str]]:
    """The "ct" scheme's statistics of each ct channel of ``plan`` from the lesion voxels of the cases in ``jobs``
    (``case``, ``inputs``): mean, std, 0.5/50/99.5 percentiles, as nnU-Net's fingerprint computes them. Returns
    them and the cases that could not be read (case -> message)."""
    channels = ct_channels(plan)
    per_case = max(1000, CT_SAMPLES // max(len(jobs), 1))
    plan_json = plan.to_json()
    work = [{"case": j["case"], "inputs": j["inputs"], "plan": plan_json, "samples": per_case} for j in jobs]
    drawn: dict[str, dict[str, np.ndarray]] = {}
    failed: dict[str, str] = {}

    def take(result: tuple[str, str, Any]) -> None:
        status, case_id, payload = result
        if status == "ok":
            drawn[case_id] = payload
        else:
            failed[case_id] = payload

    if workers <= 1 or len(work) <= 1:
        for job in track(work, "ct statistics"):
            take(_ct_samples(job))
    else:
        with process_pool(min(workers, len(work))) as pool:
            for fut in track(cf.as_completed([pool.submit(_ct_samples, job) for job in work]), "ct statistics", total=len(work)):
                take(fut.result())
    with_lesion = sum(bool(len(next(iter(d.values())))) for d in drawn.values())
    if not with_lesion:
        if failed:
            return {}, failed
        raise SegpipeError(f"config 'preprocess.normalization': the ct scheme of channel{'s' if len(channels) > 1 else ''} "
                           f"{', '.join(channels)} takes its statistics from lesion voxels, and none of the {len(work)} labelled "
                           "cases has one; set preprocess.normalization=zscore (or check the label files with `segpipe inspect`)")

    def rounded(v: float) -> float:  # 7 digits: the statistics are part of every case's cache key
        return float(f"{v:.7g}")

    stats = {}
    for c in channels:
        # in the cases' order, not the processes' finishing order: the same dataset gives the same numbers
        values = np.concatenate([drawn[j["case"]][c] for j in jobs if j["case"] in drawn]).astype(np.float64)
        p = np.percentile(values, [0.5, 50, 99.5])
        stats[c] = {"mean": rounded(values.mean()), "std": rounded(values.std()), "p00_5": rounded(p[0]),
                    "median": rounded(p[1]), "p99_5": rounded(p[2]), "samples": int(values.size), "cases": int(with_lesion)}
    return stats, failed


def preprocess_case(plan: Plan, inputs: dict[str, str]) -> dict[str, Any]:
    """Run the chain on one case; returns the chain's output dictionary."""
    chain = build_preprocessing(plan, with_label="label" in inputs)
    return run_chain(chain, inputs)


def _work(job: dict[str, Any], raise_errors: bool = False) -> tuple[str, str, dict[str, Any] | str]:
    """One case, in a worker process: preprocess, then write the cache entry atomically. Errors come back
    as messages (``raise_errors``: raised, for ``--debug``)."""
    case_id = job["case"]
    try:
        if job.get("single_thread"):
            import SimpleITK as sitk
            import torch

            torch.set_num_threads(1)
            sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
        start = time.perf_counter()
        plan = Plan.from_json(job["plan"])
        out = preprocess_case(plan, job["inputs"])
        image = np.asarray(out["image"], dtype=np.float32)
        label = np.asarray(out["label"][0], dtype=np.uint8)
        sdm = np.asarray(out["sdm"], dtype=np.float32)
        affine = np.asarray(out["image"].affine, dtype=np.float64)
        spacing = tuple(float(v) for v in np.sqrt((affine[:3, :3] ** 2).sum(axis=0)))
        rng = np.random.default_rng(zlib.crc32(case_id.encode()))
        fg = foreground_locations(label, plan.num_classes, rng)
        if len(fg) == 0:
            log.info("case '%s': the label has no foreground; its distance maps are all zero", case_id)
        meta = {
            "key": job["key"],
            "case": case_id,
            "channels": list(plan.channels),
            "shape": list(image.shape[1:]),
            "spacing": list(spacing),
            "affine": affine.tolist(),
            "crop": {"start": np.asarray(out.get("foreground_start_coord", [])).tolist(),
                     "end": np.asarray(out.get("foreground_end_coord", [])).tolist()},
            "inputs": job["inputs"],
            "stats": {"intensity": out.get("stats", {}).get("intensity", {}), "label": _label_stats(label, plan.num_classes, spacing)},
            "seconds": round(time.perf_counter() - start, 3),
        }
        CaseCache(job["cache"]).write(case_id, {"image": image, "label": label, "sdm": sdm, "fg": fg}, meta)
        return "ok", case_id, meta
    except SegpipeError as exc:
        if raise_errors:
            raise
        return "error", case_id, str(exc)
    except MemoryError:
        if raise_errors:
            raise
        return "error", case_id, "out of memory; use fewer --workers"
    except Exception as exc:
        if raise_errors:
            raise  # a bug, reported per case so the others go on with --keep-going
        first = (str(exc).strip().splitlines() or [""])[0]
        return "error", case_id, f"unexpected {type(exc).__name__}: {first} (a bug in segpipe; rerun with --debug --workers 1)"


def _plan_dataset(manifest: Manifest, config: Config, labelled: list[Case], report: PreprocessReport, *, workers: int | None,
                  keep_going: bool) -> tuple[Plan, dict[str, tuple[tuple[float, ...], tuple[int, ...]]]]:
    """The fingerprint from the headers of the reference channel, the plan, and the CT statistics its channels
    need; the geometry of each readable case. Cases that fail go into ``report`` under ``keep_going``."""
    if not labelled:
        raise SegpipeError(f"manifest '{manifest.where}': no case has a label; nothing to preprocess for training")

    # 1. fingerprint from the headers of the reference channel, then the plan
    ref = config.data.reference_channel or manifest.channels[0]
    if ref not in manifest.channels:
        raise SegpipeError(f"config 'data.reference_channel': '{ref}' is not a channel of the manifest {list(manifest.channels)}; "
                           f"add the override data.reference_channel={manifest.channels[0]} (the grid every channel is resampled onto) "
                           "to the command, or use a config made for this dataset")
    geometry: dict[str, tuple[tuple[float, ...], tuple[int, ...]]] = {}
    for case in labelled:
        try:
            geometry[case.id] = header_geometry(manifest.image_path(case, ref), f"channel '{ref}'")
        except SegpipeError as exc:
            if not keep_going:
                raise SegpipeError(f"case '{case.id}': {exc.message}") from None
            report.failed[case.id] = exc.message
    if not geometry:
        raise SegpipeError("no case could be read; see the errors above")
    plan = make_plan(
        config, manifest.channels, manifest.label.classes, manifest.label.ignore_value, manifest.label.threshold,
        [g[0] for g in geometry.values()], [g[1] for g in geometry.values()],
    )
    if ct_channels(plan):
        ct_jobs = [{"case": c.id, "inputs": case_inputs(manifest, c)} for c in labelled if c.id in geometry]
        if workers is None:  # as for the cases below: cores, cases and memory (reading takes less than making)
            values = max(_values(plan, len(manifest.channels), g) for g in geometry.values())
            ct_workers = auto_workers(len(ct_jobs), values)[0]
        else:
            ct_workers = workers
        stats, failed = ct_statistics(plan, ct_jobs, ct_workers)
        for case_id, message in failed.items():
            if not keep_going:
                raise SegpipeError(f"case '{case_id}': {message} (pass --keep-going to continue past failing cases)")
            report.failed[case_id] = message
            geometry.pop(case_id, None)
            log.error("case '%s': %s", case_id, message)
        if not stats:
            raise SegpipeError("no case could be read; see the errors above")
        plan = dataclasses.replace(plan, intensity=stats)
        for c, st in stats.items():
            log.info("ct normalisation of channel '%s': clip to [%.1f, %.1f], mean %.1f, std %.1f (%d lesion voxels sampled "
                     "from %d cases)", c, st["p00_5"], st["p99_5"], st["mean"], st["std"], st["samples"], st["cases"])
    return plan, geometry


def _first_missing(path: Path) -> Path | None:
    """The outermost folder of ``path`` that does not exist yet, or None."""
    path = path.absolute()
    if path.exists():
        return None
    while not path.parent.exists():
        path = path.parent
    return path


def _remove_empty_tree(root: Path) -> None:
    """Remove ``root`` if it holds folders only (what a failed run made), never a file."""
    if root.is_dir() and not any(p.is_file() or p.is_symlink() for p in root.rglob("*")):
        shutil.rmtree(root, ignore_errors=True)


def preprocess_dataset(
    manifest: Manifest,
    config: Config,
    out: str | os.PathLike,
    *,
    workers: int | None = 1,
    keep_going: bool = False,
    debug: bool = False,
) -> PreprocessReport:
    """Fingerprint, plan and preprocess every labelled case of ``manifest`` into the cache at ``out``.

    ``workers`` processes make the cases side by side (None: :func:`auto_workers`; 1: one after the other in
    this process, each case's channels filtered side by side in threads).
    Cases already in the cache with the same key are kept; others are (re)made. With ``keep_going`` a failing
    case is reported and the others continue; otherwise the first failure stops the run (finished cases
    stay cached). Returns a report; the caller decides the exit code.
    """
    start = time.perf_counter()
    made = _first_missing(Path(out))  # the folder this run creates (with --out a/b/c and no a: a), if any
    root = ensure_writable_dir(out, what="--out cache folder")
    cache = CaseCache(root)
    ensure_writable_dir(cache.cases_dir, what="cache folder")
    if (n := cache.clean_temporary()):
        log.info("removed %d unfinished entries of an interrupted run", n)
    report = PreprocessReport()
    labelled = [c for c in manifest.cases if c.label is not None]
    report.unlabelled = [c.id for c in manifest.cases if c.label is None]
    if report.unlabelled:
        log.info("%d cases without a label are not preprocessed (training needs labels; `segpipe infer` preprocesses on the fly)", len(report.unlabelled))
    try:
        plan, geometry = _plan_dataset(manifest, config, labelled, report, workers=workers, keep_going=keep_going)
    except BaseException:
        if made is not None:  # nothing was made: no empty cache folder left behind to be mistaken for one
            _remove_empty_tree(made)
        raise
    report.plan = plan
    cache.write_json("plan.json", plan.to_json())
    # the config the cache was made with: `segpipe train` without --config trains with it
    atomic_write_text(root / "config.yaml", yaml.safe_dump(config_to_dict(config), sort_keys=False))

    # 2. the cases
    jobs = []
    for case in labelled:
        if case.id not in geometry:
            continue
        inputs = case_inputs(manifest, case)
        key = case_key(plan.preprocessing_key(), {k: Path(v) for k, v in inputs.items()})
        if cache.is_fresh(case.id, key):
            report.up_to_date.append(case.id)
            continue
        jobs.append({"case": case.id, "inputs": inputs, "key": key, "plan": plan.to_json(), "cache": str(root)})
    if report.up_to_date:
        log.info("%d of %d cases are up to date in the cache", len(report.up_to_date), len(labelled))
    if workers is None:
        values = max(_values(plan, len(manifest.channels), geometry[job["case"]]) for job in jobs) if jobs else 0.0
        workers, why = auto_workers(len(jobs), values)
        if jobs:
            log.info("%d preprocessing process%s (%s)", workers, "es" if workers > 1 else "", why)
    report.workers = min(workers, max(len(jobs), 1))
    for job in jobs:
        job["single_thread"] = workers > 1

    def handle(status: str, case_id: str, payload: Any) -> None:
        if status == "ok":
            report.processed.append(case_id)
            return
        report.failed[case_id] = payload
        if not keep_going:
            raise _Stop(case_id, payload)  # its message is the command's one line: not logged as well
        log.error("case '%s': %s", case_id, payload)

    try:
        if workers <= 1 or len(jobs) <= 1:
            for job in track(jobs, "preprocessing"):
                handle(*_work(job, raise_errors=debug))
        else:
            with process_pool(workers) as pool:
                futures = [pool.submit(_work, job) for job in jobs]
                try:
                    for fut in track(cf.as_completed(futures), "preprocessing", total=len(futures)):
                        handle(*fut.result())
                except BaseException:
                    for f in futures:
                        f.cancel()
                    raise
    except _Stop as stop:
        report.seconds = time.perf_counter() - start
        _write_index(cache, manifest, plan, report)
        raise SegpipeError(
            f"case '{stop.case_id}': {stop.message}" + (f" ({len(report.processed)} other cases were cached; " if report.processed else " (")
            + "pass --keep-going to continue past failing cases)"
        ) from None
    report.seconds = time.perf_counter() - start
    _write_index(cache, manifest, plan, report)
    return report


def _values(plan: Plan, channels: int, geometry: tuple[tuple[float, ...], tuple[int, ...]]) -> float:
    """The float32 values a case's preprocessing holds: channels, label and distance maps, on the larger of its
    own grid and the target grid."""
    spacing, shape = geometry
    voxels = float(np.prod(shape)) * max(1.0, float(np.prod(spacing) / np.prod(plan.target_spacing)))
    return voxels * (channels + 1 + max(plan.num_classes - 1, 1))


class _Stop(Exception):
    def __init__(self, case_id: str, message: str) -> None:
        super().__init__(message)
        self.case_id = case_id
        self.message = message


def _write_index(cache: CaseCache, manifest: Manifest, plan: Plan, report: PreprocessReport) -> None:
    """fingerprint.json and cache.json from every complete, fresh entry."""
    ok = [c.id for c in manifest.cases if c.id in set(report.processed) | set(report.up_to_date)]
    per_case = {}
    for cid in ok:
        meta = cache.meta(cid) or {}
        per_case[cid] = {"spacing": meta.get("spacing"), "shape": meta.get("shape"), "stats": meta.get("stats", {}),
                         "seconds": meta.get("seconds")}
    fractions = [per_case[c]["stats"].get("label", {}).get("fractions", []) for c in ok]
    if ok and not any(has_foreground(per_case[c]) for c in ok):
        log.warning("none of the %d cached cases has a lesion voxel: a network cannot learn from them; check the label "
                    "files (masks stored as probabilities below label.threshold %s, or scaled by a header factor?) with "
                    "`segpipe inspect %s`", len(ok), plan.threshold, cache.root)
    summary = {
        "cases": len(ok),
        "median_shape": np.median([per_case[c]["shape"] for c in ok], axis=0).tolist() if ok else [],
        "mean_class_fractions": np.mean(fractions, axis=0).tolist() if fractions and all(fractions) else [],
    }
    cache.write_json("fingerprint.json", {"summary": summary, "cases": per_case})
    folds = [[c for c in fold if c in set(ok)] for fold in manifest.folds]
    cache.write_json("cache.json", {
        "format": "segpipe-cache",
        "version": 1,
        "name": manifest.name,
        "manifest": str(manifest.path) if manifest.path else None,
        "channels": list(plan.channels),
        "classes": list(plan.classes),
        "ignore_value": plan.ignore_value,
        "cases": ok,
        "failed": report.failed,
        "folds": folds,
        "preprocessing": plan.preprocessing_key(),
    })
