"""Preprocessing a dataset, segpipe against nnU-Net v2 itself, in the same process on the same files.

The dataset is written once in nnU-Net's raw format (``dataset.json``, ``imagesTr/CASE_XXXX.nii.gz``,
``labelsTr``), which segpipe reads as it is (``--layout nnunet``), so both tools start from the same bytes:

- ``isles``: the real ISLES 2022 case of ../shared (DWI and ADC, 112x112x73 at 2 mm; FLAIR lies on another grid,
  which nnU-Net does not accept) in copies (links), else synthetic ISLES cases of that size;
- ``wmh``: synthetic WMH 2017 cases (FLAIR and T1 on the three sites' grids, so both tools resample).

Two dataset sizes (``--cases 8 24``) separate what a run costs once from what each case costs. Timed, each
from an empty output folder: nnU-Net's ``extract_fingerprints`` + ``plan_experiments`` +
``preprocess`` (3d_fullres), as ``nnUNetv2_plan_and_preprocess -c 3d_fullres`` runs them, against segpipe's
``preprocess_dataset`` (fingerprint, plan, preprocessed cases with their signed distance maps), both with
``--workers`` processes. What each writes differs: nnU-Net resamples with third-order splines and keeps
sampled foreground locations; segpipe adds the head mask crop and the distance maps the boundary loss needs.

Needs nnU-Net in the environment (``pip install -e ".[compare]"``: nnunetv2 with the torch segpipe pins; not one of segpipe's
dependencies): without it the benchmark says so and exits 0.

    python -m benchmarks.nnunet_preprocess [--data isles|wmh] [--cases 8 24] [--workers 2]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import shutil
import tempfile
import time
from pathlib import Path

from benchmarks._common import have_compare, link_nnunet_dataset, nnunet_paths, save

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "isles22_sample"
SMALL_ID, LARGE_ID = 990, 991


def _write_raw(raw: Path, data: str, sizes: tuple[int, int]) -> tuple[str, list[str]]:
    """Two datasets in nnU-Net's raw format, of ``sizes`` cases (the smaller one a subset of the larger);
    returns (description, channel names)."""
    from segpipe.data.layouts import discover
    from segpipe.data.synthetic import synthesize

    n = max(sizes)
    if data == "isles" and (SAMPLE / "rawdata").is_dir():
        m = discover(SAMPLE)
        sources = [m.cases[0]] * n
        what = "the real ISLES 2022 case (DWI, ADC; 112x112x73, 2 mm), copies"
    else:
        layout = "isles22" if data == "isles" else "wmh17"
        shape = (112, 112, 73) if data == "isles" else (240, 240, 48)
        synthesize(raw.parent / "synth", layout, cases=n, seed=0, shape=shape)
        m = discover(raw.parent / "synth", layout)
        sources = list(m.labelled)
        what = f"synthetic {layout} cases ({'x'.join(map(str, shape))}" + (", three sites' spacings)" if data == "wmh" else ", 2 mm)")
    channels = ["dwi", "adc"] if data == "isles" else ["flair", "t1"]
    labels = {"background": 0, "lesion": 1} if data == "isles" else {"background": 0, "wmh": 1, "ignore": 2}
    for dataset_id, size in zip((SMALL_ID, LARGE_ID), sizes):  # new ids: the real case is there several times
        link_nnunet_dataset(raw / f"Dataset{dataset_id}_Bench", m, [(f"case{k:03d}", c) for k, c in enumerate(sources[:size])],
                            channels, labels)
    return what, channels


def _nnunet(work: Path, dataset_id: int, workers: int) -> float:
    nnunet_paths(work)
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints, plan_experiments, preprocess

    shutil.rmtree(work / "nnunet_pre", ignore_errors=True)
    t = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        extract_fingerprints([dataset_id], num_processes=workers, check_dataset_integrity=False, verbose=False, show_progress_bar=False)
        plan_experiments([dataset_id])
        preprocess([dataset_id], configurations=("3d_fullres",), num_processes=(workers,), verbose=False, show_progress_bar=False)
    seconds = time.perf_counter() - t
    written = list((work / "nnunet_pre").glob("*/nnUNetPlans_3d_fullres/*"))
    assert written, "nnU-Net wrote no preprocessed case"
    return seconds


def _segpipe(work: Path, dataset_id: int, workers: int, config: str) -> float:
    from segpipe.config import load_config
    from segpipe.data.layouts import discover
    from segpipe.data.preprocess import preprocess_dataset

    shutil.rmtree(work / "segpipe_cache", ignore_errors=True)
    t = time.perf_counter()
    m = discover(work / "raw" / f"Dataset{dataset_id}_Bench")
    report = preprocess_dataset(m, load_config(config, [f"data.reference_channel={m.channels[0]}"]), work / "segpipe_cache", workers=workers)
    seconds = time.perf_counter() - t
    assert len(report.processed) == len(m.cases) and not report.failed, report
    return seconds


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", choices=("isles", "wmh"), default="isles")
    ap.add_argument("--cases", type=int, nargs=2, default=(8, 24), metavar=("SMALL", "LARGE"),
                    help="two dataset sizes: the time per case beyond the fixed costs is the difference over the difference")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args(argv)
    small, large = sorted(args.cases)
    if small >= large:
        ap.error("--cases: two different sizes, e.g. 8 24")
    if not have_compare("nnunetv2"):
        return
    from importlib.metadata import version

    config = "isles22" if args.data == "isles" else "wmh17"
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        what, channels = _write_raw(work / "raw", args.data, (small, large))
        times = {}
        for n, dataset_id in ((small, SMALL_ID), (large, LARGE_ID)):  # alternated: a busy moment does not hit one tool only
            times[n] = (_nnunet(work, dataset_id, args.workers), _segpipe(work, dataset_id, args.workers, config))
    nn_case = (times[large][0] - times[small][0]) / (large - small)
    sp_case = (times[large][1] - times[small][1]) / (large - small)
    for n in (small, large):
        nn, sp = times[n]
        print(f"{what}, {n} cases, {args.workers} processes: nnU-Net {version('nnunetv2')} {nn:.1f} s, segpipe {sp:.1f} s "
              f"(distance maps included): {nn / sp:.1f}x")
    print(f"   per case beyond the fixed costs: nnU-Net {nn_case:.2f} s, segpipe {sp_case:.2f} s: {nn_case / sp_case:.1f}x")
    save(f"nnunet_preprocess_{args.data}", {
        "data": what, "channels": channels, "workers": args.workers, "nnunet_version": version("nnunetv2"),
        "seconds": {str(n): {"nnunet": t[0], "segpipe": t[1]} for n, t in times.items()},
        "seconds_per_case": {"nnunet": nn_case, "segpipe": sp_case}, "ratio_per_case": nn_case / sp_case,
    })


if __name__ == "__main__":
    main()
