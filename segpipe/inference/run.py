"""``segpipe infer``: inputs (manifest, NIfTI files, DICOM exports) -> masks in the inputs' own geometry.

Inputs (see :mod:`segpipe.inference.inputs`): manifests, folders and files of NIfTI images, DICOM exports.
For a DICOM export one series per model channel is chosen (see :mod:`segpipe.io.dicom`), converted to NIfTI
in a temporary folder and segmented; the result is written as NIfTI and as a DICOM SEG that references the
reference channel's series, with a DICOM SR (TID 1500) giving each segment's lesion volume and count.

Outputs in ``--out``: ``<case>.nii.gz`` (uint8 mask, the reference channel's affine and header codes),
``<case>_probabilities.nii.gz`` with ``--save-probabilities``, ``<case>_seg.dcm`` and ``<case>_sr.dcm`` for
DICOM input, and ``summary.json``. The model is loaded once; a case that fails is reported and the others go on; the exit code
is 1 when any case failed.

Several cases on a GPU go through three overlapping stages, as in nnU-Net's predictor: preprocessing
processes (``--preprocess-workers``, 3 by default on a GPU) read and preprocess the next cases while the
network segments one and a thread writes the finished ones, so reading, resampling and writing hide behind
the network. On the CPU the network needs every core, and the cases run one after the other by default.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import signal
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from segpipe.errors import SegpipeError, UsageError, debugging, did_you_mean
from segpipe.inference.inputs import CaseInput, resolve_inputs
from segpipe.io.atomic import atomic_write_text, ensure_writable_dir
from segpipe.io.nifti import save_nifti
from segpipe.resources import usable_cores

__all__ = ["CaseInput", "InferReport", "infer", "resolve_inputs"]

log = logging.getLogger(__name__)


@dataclass
class InferReport:
    done: dict[str, dict[str, Any]] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, dict[str, Any]] = field(default_factory=dict)  # outputs already there (skip_existing)
    seconds: float = 0.0


def _expected_outputs(case: CaseInput, opt: _Options) -> list[str]:
    """The files :func:`_write` makes for ``case``: all present means the case is done."""
    names = [f"{case.id}.nii.gz"]
    if opt.save_probabilities:
        names.append(f"{case.id}_probabilities.nii.gz")
    if case.dicom is not None and opt.dicom_seg:
        names += [f"{case.id}_seg.dcm", f"{case.id}_sr.dcm"]
    if case.dicom is not None and opt.dicom_overlay:
        names.append(f"{case.id}_overlay")  # a folder
    return names


def _previous_run(out: Path) -> tuple[dict[str, Any], list[str] | None]:
    """The per-case entries (done or skipped) and the model(s) of an earlier run's summary.json in ``out``
    (nothing when absent or unreadable)."""
    try:
        summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
        cases = {**summary.get("skipped", {}), **summary.get("cases", {})}
        model = summary.get("model")
    except (OSError, ValueError, AttributeError, TypeError):
        return {}, None
    models = [model] if isinstance(model, str) else model if isinstance(model, list) else None
    return cases, models


def _dicom_to_nifti(case: CaseInput, channels: Sequence[str], work: Path, rules: Mapping[str, Any] | None,
                    forced: Mapping[str, int] | None, allow_uneven: bool, reference: str) -> tuple[dict[str, Path], list[str], list[int]]:
    from segpipe.io.dicom import find_series, read_series, select_series

    assert case.dicom is not None
    series = case.series if case.series is not None else find_series(case.dicom)
    chosen = select_series(series, channels, rules, forced, where=str(case.dicom), one_study=case.one_study)
    paths = {}
    ref_files: list[str] = []
    ref_index: list[int] = []
    for ch, (info, files) in chosen.items():
        vol, ordered, index = read_series(info, files, allow_uneven=allow_uneven, what=f"channel '{ch}' series")
        paths[ch] = save_nifti(work / f"{ch}.nii.gz", vol.array, vol.affine)
        if ch == reference:
            ref_files, ref_index = ordered, index
    return paths, ref_files, ref_index


@dataclass(frozen=True)
class _Options:
    tta: bool | None  # None: the model's (or --config's) infer.tta
    min_mm3: float | None  # None: infer.min_lesion_mm3
    save_probabilities: bool
    series: dict[str, int]
    allow_uneven: bool
    dicom_seg: bool
    overlap: float | None = None  # None: the model's (or --config's) infer.overlap
    model_sha256: tuple[str, ...] = ()  # one per model, recorded in the DICOM SEG and SR
    dicom_overlay: bool = False


def _guarded(case: CaseInput, step: Any, *args: Any) -> tuple[str, Any]:
    """``("ok", step(*args))`` or ``("error", message)``: never raises for the case's own problems."""
    try:
        return "ok", step(*args)
    except SegpipeError as exc:
        log.error("case '%s' failed: %s", case.id, exc)
        return "error", str(exc)
    except Exception as exc:  # one case's bug must not stop the others; reported with its type
        if debugging():
            raise
        first = (str(exc).strip().splitlines() or [""])[0]
        log.error("case '%s' failed: unexpected %s: %s (rerun with --debug for the traceback)", case.id, type(exc).__name__, first)
        return "error", f"unexpected {type(exc).__name__}: {first}"


@dataclass
class _Prepared:
    case: Any  # segpipe.inference.predictor.PreparedCase
    ref_files: list[str]  # DICOM input: the reference series' files, in slice order, and their index
    ref_index: list[int]


def _prepare(plan: Any, case: CaseInput, opt: _Options, rules: Mapping[str, Any] | None) -> _Prepared:
    """Read and preprocess one case (DICOM exports converted first); runs in a preprocessing process too."""
    from segpipe.inference.predictor import prepare_case

    with tempfile.TemporaryDirectory(prefix="segpipe-") as tmp:
        ref_files: list[str] = []
        ref_index: list[int] = []
        channels = case.channels
        t = time.perf_counter()
        if case.dicom is not None:
            channels, ref_files, ref_index = _dicom_to_nifti(case, plan.channels, Path(tmp), rules, opt.series,
                                                             opt.allow_uneven, plan.reference_channel)
        prepared = prepare_case(plan, channels)
        prepared.seconds = time.perf_counter() - t
    # as a NumPy array the image goes back from a preprocessing process through the pipe; a tensor would go
    # through shared memory, which containers limit (Docker: 64 MB by default, less than one 1 mm case)
    prepared.image = prepared.image.numpy()
    return _Prepared(prepared, ref_files, ref_index)


def _write(plan: Any, case: CaseInput, ref_files: list[str], ref_index: list[int], pred: Any, out: Path, opt: _Options) -> dict[str, Any]:
    """Write one case's outputs; the summary entry."""
    t = time.perf_counter()
    header = pred.reference.header
    written = [save_nifti(out / f"{case.id}.nii.gz", pred.mask, pred.reference.affine, header=header, dtype=np.uint8)]
    if opt.save_probabilities and pred.probabilities is not None:
        fg = pred.probabilities[1:]
        fg = fg[0] if fg.shape[0] == 1 else np.moveaxis(fg, 0, -1)
        written.append(save_nifti(out / f"{case.id}_probabilities.nii.gz", fg, pred.reference.affine, header=header,
                                  dtype=np.float32))
    stats = pred.lesion_stats(plan.classes)
    from segpipe import __version__

    # which model(s) made it, in the DICOM files themselves
    used = [opt.model_sha256[i] for i in case.members] if case.members is not None else list(opt.model_sha256)
    params = {"model_sha256": " ".join(used)} if used else None
    if case.dicom is not None and opt.dicom_seg:
        from segpipe.io.dicom import write_dicom_report, write_dicom_seg

        seg = write_dicom_seg(pred.mask, ref_files, out / f"{case.id}_seg.dcm", classes=plan.classes,
                              source_index=ref_index, version=__version__, parameters=params)
        written += [seg, write_dicom_report(seg, ref_files, out / f"{case.id}_sr.dcm", lesions=stats, classes=plan.classes,
                                            version=__version__, parameters=params)]
    if case.dicom is not None and opt.dicom_overlay:
        from segpipe.io.dicom import write_dicom_overlay

        try:
            written.append(write_dicom_overlay(pred.mask, ref_files, out / f"{case.id}_overlay", classes=plan.classes,
                                               source_index=ref_index, version=__version__, parameters=params))
        except SegpipeError as exc:  # a series DICOM gives no overlay planes: the other outputs stand
            log.warning("case '%s': no overlay series: %s", case.id, exc)
    seconds = {**pred.seconds, "write": time.perf_counter() - t}
    seconds["total"] = sum(seconds.values())
    total = ", ".join(f"{k} {v['lesions']} lesions, {v['volume_ml']:.2f} ml" for k, v in stats.items())
    log.info("%s: %s (%.1f s)", case.id, total, seconds["total"])
    return {"input": case.source, "outputs": [str(p.name) for p in written], "lesions": stats,
            "removed_small_components": pred.removed_components, "seconds": {k: round(v, 3) for k, v in seconds.items()}}


def _predict(predictor: Any, case: CaseInput, prep: _Prepared, opt: _Options) -> Any:
    icfg = predictor.infer_config
    return predictor.segment(prep.case, tta=icfg.tta if opt.tta is None else opt.tta,
                             min_lesion_mm3=icfg.min_lesion_mm3 if opt.min_mm3 is None else opt.min_mm3,
                             keep_probabilities=opt.save_probabilities, members=case.members, overlap=opt.overlap)


def _segment(predictor: Any, case: CaseInput, out: Path, opt: _Options) -> tuple[str, Any]:
    """One case, step after step: ("ok", summary) or ("error", message)."""
    status, prep = _guarded(case, _prepare, predictor.plan, case, opt, predictor.infer_config.dicom_rules)
    if status != "ok":
        return status, prep
    status, pred = _guarded(case, _predict, predictor, case, prep, opt)
    if status != "ok":
        return status, pred
    return _guarded(case, _write, predictor.plan, case, prep.ref_files, prep.ref_index, pred, out, opt)


def _init_process(level: int, threads: int) -> None:
    """A worker process logs like its parent and takes its share of the CPU threads."""
    import torch

    logging.getLogger("segpipe").setLevel(level)
    if not logging.getLogger("segpipe").handlers:
        logging.getLogger("segpipe").addHandler(logging.StreamHandler())
    torch.set_num_threads(threads)


@contextmanager
def _children_ignore_interrupt() -> Iterator[None]:
    """Processes started inside the block ignore Ctrl-C (Python keeps an inherited SIG_IGN for SIGINT): the
    terminal sends it to the whole process group, and a preprocessing process still importing would print a
    traceback; the parent handles it and stops the pool."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _preprocessing_pool(processes: int, level: int, threads: int) -> Any:
    import concurrent.futures as cf
    import multiprocessing

    # spawn: the parent may hold a CUDA context and OpenMP threads, which a forked child must not inherit
    return cf.ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"), initializer=_init_process,
                                  initargs=(level, threads))


#: about what starting the preprocessing processes costs until one takes work (a fresh interpreter importing torch
#: and MONAI: 4.7-7.3 s on the 2-core development machine, 12.8-14.3 s for 3 processes on the H200 machine, where
#: CUDA's torch is larger); the automatic setting starts them only when preparing the remaining cases here would
#: take longer (and until one has started, the cases are prepared here anyway)
POOL_START_SECONDS = 8.0


def _ready() -> int:
    """A preprocessing process's first task: done once it has imported what preparing a case needs."""
    import os

    import segpipe.inference.predictor  # noqa: F401

    return os.getpid()


def _pipelined(predictor: Any, cases: list[CaseInput], out: Path, opt: _Options, processes: int, progress=None, *,
               auto: bool = False) -> tuple[dict[str, tuple[str, Any]], int]:
    """The cases through three overlapping stages, as nnU-Net's predictor does: ``processes`` processes read
    and preprocess the next cases while the network segments one, and a thread writes the finished ones.
    The first case is prepared here; with ``auto`` the processes start only if the others would take longer
    than :data:`POOL_START_SECONDS` to prepare here (small cases: not worth it). Until the first process has
    started (a fresh interpreter importing torch and MONAI: seconds), this process goes on preparing the cases
    itself, so that starting them never makes a run slower than one after the other; processes that never got
    to work are stopped at the end rather than waited for. At most ``processes + 1`` prepared cases wait at
    any time. If a preprocessing process dies (killed, out of memory), the remaining cases are prepared here,
    one after the other. Returns the results and the processes started."""
    import concurrent.futures as cf
    from concurrent.futures.process import BrokenProcessPool

    plan, rules = predictor.plan, predictor.infer_config.dicom_rules
    results: dict[str, tuple[str, Any]] = {}
    writes: list[tuple[str, cf.Future]] = []
    writer = cf.ThreadPoolExecutor(1, thread_name_prefix="segpipe-write")
    pool = None
    pending: dict[int, cf.Future] = {}
    broken = False

    probes: list[cf.Future] = []
    started = 0.0
    ready = False

    def pool_ready() -> bool:
        """Whether a preprocessing process has started (then they take the next cases); notes a broken pool."""
        nonlocal ready, broken
        if ready or broken or not probes:
            return ready
        done = [p for p in probes if p.done()]
        if not done:
            return False
        if any(isinstance(p.exception(), BrokenProcessPool) for p in done):
            log.warning("a preprocessing process stopped unexpectedly; the remaining cases are prepared one after the other")
            broken = True
            return False
        ready = True
        log.debug("preprocessing processes ready after %.1f s", time.perf_counter() - started)
        return True

    def submit(i: int) -> None:
        nonlocal broken
        if pool is not None and not broken and pool_ready() and 0 < i < len(cases) and i not in pending:
            try:
                pending[i] = pool.submit(_guarded, cases[i], _prepare, plan, cases[i], opt, rules)
            except BrokenProcessPool:  # a process died since: the pool takes no more work
                log.warning("a preprocessing process stopped unexpectedly; the remaining cases are prepared one after the other")
                broken = True

    try:
        items = progress(cases, "segmenting") if progress else cases
        for i, case in enumerate(items):
            for j in range(i + 1, i + processes + 2):  # the next cases, once the processes take work
                submit(j)
            fut, status, prep = pending.pop(i, None), "", None
            if fut is not None:
                try:
                    status, prep = _result(fut)
                except BrokenProcessPool:
                    if not broken:
                        log.warning("a preprocessing process stopped unexpectedly; the remaining cases are prepared one after the other")
                    broken = True
                except Exception as exc:  # the result did not come back (e.g. it could not be sent): prepare it here
                    log.warning("case '%s': its preprocessing process failed to return it (%s: %s); preparing it here",
                                case.id, type(exc).__name__, (str(exc).strip().splitlines() or [""])[0])
            if status == "":
                status, prep = _guarded(case, _prepare, plan, case, opt, rules)
            if i == 0 and processes > 0 and len(cases) > 1:
                rest = prep.case.seconds * (len(cases) - 1) if status == "ok" else math.inf
                if auto and rest < POOL_START_SECONDS:
                    log.debug("the other cases take about %.1f s to prepare here: no preprocessing processes", rest)
                    processes = 0
                else:
                    log.info("%d preprocessing processes prepare the next cases while the network works", processes)
                    pool = _preprocessing_pool(processes, logging.getLogger("segpipe").getEffectiveLevel(),
                                               max(1, usable_cores() // (processes + 1)))
                    started = time.perf_counter()
                    with _children_ignore_interrupt():  # the pool starts one process per submission while none is idle
                        probes = [pool.submit(_ready) for _ in range(processes)]
            if status != "ok":
                results[case.id] = (status, prep)
                continue
            status, pred = _guarded(case, _predict, predictor, case, prep, opt)
            if status != "ok":
                results[case.id] = (status, pred)
                continue
            writes.append((case.id, writer.submit(_guarded, case, _write, plan, case, prep.ref_files, prep.ref_index, pred, out, opt)))
        for cid, wfut in writes:
            results[cid] = wfut.result()
    except KeyboardInterrupt:  # Ctrl-C, SIGTERM: the preprocessing processes' cases are not waited for
        if pool is not None:
            _terminate(pool)
        raise
    finally:
        writer.shutdown(wait=True)
        if pool is not None:
            if not ready:  # none of them got to work (a few small cases): not worth waiting for their imports
                _terminate(pool)
            pool.shutdown(wait=True, cancel_futures=True)
    return {c.id: results[c.id] for c in cases}, processes if pool is not None else 0


def _terminate(pool: Any) -> None:
    for process in list((getattr(pool, "_processes", None) or {}).values()):  # CPython's; no public way before 3.14
        process.terminate()


def _result(fut: Any) -> Any:
    """``fut.result()``, waking every half second: Python runs signal handlers in the main thread between its own
    steps, and a Ctrl-C that reached another thread left a plain wait blocked until the preprocessing process
    answered (5-7 s while it starts), then the pool's shutdown waited as long again (11-12 s in all, measured)."""
    import concurrent.futures as cf

    while True:
        try:
            return fut.result(timeout=0.5)
        except cf.TimeoutError:
            continue


def _assign_held_out(cases: list[CaseInput], held_out: Sequence[tuple[str, ...] | None], sources: Sequence[str]) -> list[str]:
    """``--cross-validation``: each case is segmented by the models whose training held it out (its fold's
    model; several when several given models held it out, e.g. two configurations of one fold), never by a
    model that trained on it. Sets ``members`` on each case; returns the ids that no model held out."""
    for src, held in zip(sources, held_out):
        if held is None:
            raise SegpipeError(f"--cross-validation: '{src}' does not record which cases its training held out (made by an earlier "
                               "segpipe); train it again, or segment without --cross-validation")
        if not held:
            raise SegpipeError(f"--cross-validation: '{src}' was trained on every case (--fold all) and holds none out; give the "
                               "runs of the folds, one --model each")
    ids = {c.id for c in cases}
    absent = sorted(set().union(*held_out) - ids)
    if absent:
        log.warning("--cross-validation: %d of the models' validation cases are not among the inputs (e.g. %s)", len(absent),
                    ", ".join(absent[:3]))
    left = []
    for c in cases:
        c.members = tuple(i for i, held in enumerate(held_out) if c.id in held)
        if not c.members:
            left.append(c.id)
    if len(left) == len(cases):
        example = ", ".join(sorted(set().union(*held_out))[:3])
        raise SegpipeError(f"--cross-validation: none of the {len(cases)} input cases was held out by the given models (they held out "
                           f"e.g. {example}); give the manifest (or dataset folder) they were trained from")
    if left:
        log.info("--cross-validation: %d cases were held out by none of the given models (their training cases, or unlabelled): "
                 "not segmented", len(left))
    return left


def worker_devices(device: str, n: int) -> list[str]:
    """The device of each of ``n`` worker processes: with ``auto`` or ``cuda`` (no index) and several GPUs, the
    workers take them in turn (one process per GPU, nnU-Net's way of using several), else all the same."""
    import torch

    if device in ("auto", "cuda") and torch.cuda.is_available() and torch.cuda.device_count() > 1:
        return [f"cuda:{i % torch.cuda.device_count()}" for i in range(n)]
    return [device] * n


def default_preprocess_workers(device: Any) -> int:
    """nnU-Net's 3 on a GPU (fewer on a small machine); none on the CPU, where the network needs every core."""
    dev = str(device)
    if not dev.startswith("cuda"):
        return 0
    return max(0, min(3, usable_cores() - 1))


def _worker(model: list[str], device: str, cases: list[CaseInput], out: str, opt: _Options, threads: int, level: int,
            infer_config: Any) -> dict[str, tuple[str, Any]]:
    """A worker process of ``--workers``: its own model, a share of the cases."""
    from segpipe.inference.predictor import Predictor

    _init_process(level, threads)
    predictor = Predictor.load(model, device, infer_config)
    return {c.id: _segment(predictor, c, Path(out), opt) for c in cases}


def infer(*args: Any, **kwargs: Any) -> InferReport:
    with tempfile.TemporaryDirectory(prefix="segpipe-unpacked-") as tmp:  # ZIP inputs, for as long as their cases last
        return _infer(*args, unpack_to=Path(tmp), **kwargs)


def _infer(
    model: str | Path | Sequence[str | Path],
    inputs: Sequence[str | Path],
    out: str | Path,
    *,
    channel_map: Mapping[str, str] | None = None,
    tta: bool | None = None,
    device: str = "auto",
    min_lesion_mm3: float | None = None,
    save_probabilities: bool = False,
    series: Mapping[str, int] | None = None,
    allow_uneven: bool = False,
    dicom_seg: bool = True,
    dicom_overlay: bool = False,
    workers: int = 1,
    preprocess_workers: int | None = None,
    skip_existing: bool = False,
    cross_validation: bool = False,
    dicom_case: str = "study",
    overlap: float | None = None,
    infer_config: Any = None,
    progress=None,
    unpack_to: Path | None = None,
) -> InferReport:
    """Segment every case of ``inputs`` (see the module docstring) with ``model``, or with several models as an
    ensemble (their class probabilities averaged; see :class:`~segpipe.inference.predictor.Predictor`). With
    ``skip_existing``, cases whose outputs are all in ``out`` already (an interrupted run: every file is written
    atomically) are left as they are, listed under ``skipped``. With ``workers > 1`` the cases are split
    over that many processes, each with its own copy of the model and a share of the CPU threads. With one
    model and several cases, ``preprocess_workers`` processes prepare the next cases while the network works
    (None: 3 on a GPU when the cases are large enough to be worth it, else 0; see :func:`_pipelined`). ``tta`` and
    ``min_lesion_mm3`` left at None take the model's inference settings, or ``infer_config``'s (an
    :class:`~segpipe.config.InferConfig`, from ``--config``), which also carries the DICOM series rules. With
    ``cross_validation`` the inputs are the manifest (or dataset) the models were trained from, and each case is segmented
    only by the models whose training held it out (see :func:`_assign_held_out`): the folds' validation
    predictions, to score with ``segpipe evaluate``."""
    from segpipe.inference.predictor import Predictor, held_out_cases, resolve_model_paths
    from segpipe.planning import Plan
    from segpipe.training.checkpoint import file_sha256, load_checkpoint

    if workers < 1:
        raise UsageError(f"--workers: expected at least 1, got {workers}")
    if preprocess_workers is not None and preprocess_workers < 0:
        raise UsageError(f"--preprocess-workers: expected 0 or more, got {preprocess_workers}")
    if preprocess_workers is not None and preprocess_workers > usable_cores():
        raise UsageError(f"--preprocess-workers: at most {usable_cores()} (the CPU cores this process may use; each process holds a "
                         f"case in memory), got {preprocess_workers}")
    if preprocess_workers and workers > 1:
        raise UsageError("--preprocess-workers works with one model process; with --workers N each process prepares its own "
                         "cases: give one of the two")
    if cross_validation and channel_map:
        raise UsageError("--cross-validation: give the manifest (or the dataset folder) the models were trained from, not --channel")
    from segpipe.io.dicom import check_series_choice

    check_series_choice(series or {})
    if overlap is not None and not 0 <= overlap < 1:
        raise UsageError(f"--overlap: expected a fraction of the window in [0, 1) (nnU-Net and the default: 0.5), got {overlap:g}")
    start = time.perf_counter()
    opt = _Options(tta, float(min_lesion_mm3) if min_lesion_mm3 is not None else None, save_probabilities,
                   dict(series or {}), allow_uneven, dicom_seg, float(overlap) if overlap is not None else None,
                   dicom_overlay=dicom_overlay)
    report = InferReport()
    pre = 0
    if workers == 1:
        predictor = Predictor.load(model, device, infer_config)
        sources, plan, held_out = predictor.sources, predictor.plan, predictor.held_out
    else:
        paths = resolve_model_paths([model] if isinstance(model, (str, Path)) else list(model))
        sources = [str(p) for p in paths]
        ckpts = [load_checkpoint(p, mmap=True) for p in (paths if cross_validation else paths[:1])]  # metadata only
        plan, held_out = Plan.from_json(ckpts[0]["plan"]), [held_out_cases(c) for c in ckpts]
        del ckpts
    digests = [file_sha256(p) for p in sources]
    opt = dataclasses.replace(opt, model_sha256=tuple(digests))
    unknown = [ch for ch in (series or {}) if ch not in plan.channels]
    if unknown:
        raise UsageError(f"--series: the model has no channel {', '.join(unknown)}; its channels are {', '.join(plan.channels)}"
                         f"{did_you_mean(unknown[0], plan.channels)}")
    cases = resolve_inputs(inputs, plan.channels, channel_map, dicom_case=dicom_case, unpack_to=unpack_to)
    if dicom_overlay and not all(c.dicom for c in cases):
        log.warning("--dicom-overlay: %d of %d cases are not DICOM exports and get no overlay series (it copies the DICOM images)",
                    sum(1 for c in cases if not c.dicom), len(cases))
    if series and not any(c.dicom for c in cases):
        raise UsageError("--series chooses among the series of a DICOM export, and no INPUT is a DICOM folder; leave it out "
                         "for NIfTI inputs")
    not_held_out = None
    if cross_validation:
        not_held_out = _assign_held_out(cases, held_out, sources)
        cases = [c for c in cases if c.members]
    out = ensure_writable_dir(out, what="--out folder")  # only once model and inputs are known good
    todo = cases
    if skip_existing:
        previous, made_by = _previous_run(out)
        if made_by is not None and made_by != list(sources):
            log.warning("--skip-existing: the outputs in %s were made with %s, this run uses %s; the cases left as they are "
                        "keep the other model's masks", out, ", ".join(made_by), ", ".join(sources))
        todo = [c for c in cases if not all((out / f).exists() for f in _expected_outputs(c, opt))]
        left = {c.id for c in todo}
        report.skipped = {c.id: previous.get(c.id, {"input": c.source, "outputs": _expected_outputs(c, opt)})
                          for c in cases if c.id not in left}
        if report.skipped:
            log.info("%d of %d cases already have their outputs in %s: skipped", len(report.skipped), len(cases), out)
    results: dict[str, tuple[str, Any]] = {}
    if todo and workers == 1:
        auto = preprocess_workers is None
        pre = default_preprocess_workers(predictor.device) if auto else preprocess_workers
        results, pre = _pipelined(predictor, todo, out, opt, min(pre, len(todo) - 1), progress, auto=auto)
    elif todo:
        n = min(workers, len(todo))
        chunks = [todo[i::n] for i in range(n)]
        threads = max(1, usable_cores() // n)
        import concurrent.futures as cf
        import multiprocessing

        level = logging.getLogger("segpipe").getEffectiveLevel()
        with cf.ProcessPoolExecutor(max_workers=n, mp_context=multiprocessing.get_context("spawn")) as pool:
            devices = worker_devices(device, n)
            if len(set(devices)) > 1:
                log.info("--workers %d over %d GPUs: %s", n, len(set(devices)), ", ".join(devices))
            futures = [pool.submit(_worker, sources, dev, chunk, str(out), opt, threads, level, infer_config)
                       for dev, chunk in zip(devices, chunks)]
            for fut in cf.as_completed(futures):
                results.update(fut.result())
        results = {c.id: results[c.id] for c in todo}
    members = {c.id: c.members for c in todo}
    for cid, (status, payload) in results.items():
        if status == "ok":
            if members[cid] is not None:
                payload["model"] = [sources[i] for i in members[cid]]
            report.done[cid] = payload
        else:
            report.failed[cid] = payload
    report.seconds = time.perf_counter() - start
    summary = {"model": sources[0] if len(sources) == 1 else sources,
               "model_sha256": digests[0] if len(digests) == 1 else digests, "tta": opt.tta, "min_lesion_mm3": opt.min_mm3, "overlap": opt.overlap,
               "workers": workers,
               "preprocess_workers": pre if workers == 1 else 0, "cross_validation": cross_validation, "cases": report.done,
               "failed": report.failed, "skipped": report.skipped, "seconds": round(report.seconds, 2)}
    if not_held_out is not None:
        summary["not_held_out"] = not_held_out
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    atomic_write_text(out / "summary.csv", _summary_csv(report, plan.classes[1:]))
    return report


infer.__doc__ = _infer.__doc__
infer.__wrapped__ = _infer  # type: ignore[attr-defined]  # its signature, for help() and editors


def _summary_csv(report: InferReport, classes: Sequence[str]) -> str:
    """One row per case (done, skipped, failed): lesion count and volume per class, seconds, the error; for a
    spreadsheet or a hospital's own records."""
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["case", "status", *(f"{c}_{k}" for c in classes for k in ("lesions", "volume_ml")), "seconds", "input", "error"])
    rows = [*((c, "done", e) for c, e in report.done.items()), *((c, "skipped", e) for c, e in report.skipped.items())]
    for cid, status, entry in sorted(rows):
        lesions = entry.get("lesions", {})
        cells = [v for c in classes for v in (lesions.get(c, {}).get("lesions", ""), _ml(lesions.get(c, {}).get("volume_ml")))]
        w.writerow([cid, status, *cells, entry.get("seconds", {}).get("total", ""), entry.get("input", ""), ""])
    for cid, error in sorted(report.failed.items()):
        w.writerow([cid, "failed", *([""] * 2 * len(classes)), "", "", error])
    return buf.getvalue()


def _ml(v: Any) -> str:
    return "" if v is None else f"{float(v):.3f}"
