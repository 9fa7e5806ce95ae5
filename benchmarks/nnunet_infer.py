"""Inference end to end, segpipe against nnU-Net v2's own predictor, in the same process on the same files and
with the same network.

The dataset of ``nnunet_preprocess`` (the real ISLES 2022 case's DWI and ADC, in nnU-Net's raw format) is planned
and preprocessed by nnU-Net; its trainer builds its network (5 stages of 32-320 features for this case) and
saves it untrained, and segpipe trains one iteration of the same topology with nnU-Net's patch size: the
weights do not matter for the time, the number and size of the windows do. Timed: nnU-Net's
``nnUNetPredictor.predict_from_files`` (1 preprocessing and 1 export process, as few as it allows) against
``segpipe.inference.run.infer``, on 1, 3 and 6 cases (``--cases``), no mirroring, step 0.5, float32 on the CPU
(``--device cuda``: the GPU). The cost of a case is the difference of the two largest sizes: nnU-Net's
background processes start during its first case and its export of the last case is not hidden, so a
difference that starts at one case counts part of that start-up as per-case work (on 2 cores its first
measurement, 1 to 3 cases, gave 3.4-3.7 s per case, less than one forward of its network).

Needs nnU-Net (``pip install -e ".[compare]"``); without it says so and exits 0.

    python -m benchmarks.nnunet_infer [--repeat 2] [--cases 1 3 6] [--device cpu] [--preprocess-workers N]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks._common import have_compare, nnunet_paths, parameters, save
from benchmarks.nnunet_preprocess import LARGE_ID, SMALL_ID, _write_raw


def _nnunet_model(work: Path) -> tuple[Path, list[int]]:
    """nnU-Net's plan for the small dataset and its network saved untrained, as a model folder its predictor loads."""
    import shutil

    import torch
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints, plan_experiments, preprocess
    from nnunetv2.run.run_training import get_trainer_from_args

    with contextlib.redirect_stdout(io.StringIO()):
        extract_fingerprints([SMALL_ID], num_processes=2, check_dataset_integrity=False, verbose=False, show_progress_bar=False)
        plan_experiments([SMALL_ID])
        preprocess([SMALL_ID], configurations=("3d_fullres",), num_processes=(2,), verbose=False, show_progress_bar=False)
        trainer = get_trainer_from_args(str(SMALL_ID), "3d_fullres", 0, device=torch.device("cpu"))
        trainer.initialize()
    folder = Path(trainer.output_folder_base)
    Path(trainer.output_folder).mkdir(parents=True, exist_ok=True)
    trainer.save_checkpoint(str(Path(trainer.output_folder) / "checkpoint_final.pth"))
    pre = work / "nnunet_pre" / f"Dataset{SMALL_ID}_Bench"
    shutil.copy(pre / "dataset.json", folder / "dataset.json")  # what its training would have copied there
    shutil.copy(pre / "nnUNetPlans.json", folder / "plans.json")
    return folder, [int(v) for v in trainer.configuration_manager.patch_size]


def _segpipe_model(work: Path, patch_zyx: list[int]) -> Path:
    """A segpipe run with nnU-Net's patch (its axes are z, y, x: reversed) and topology, after one iteration."""
    from segpipe.config import load_config
    from segpipe.data.layouts import discover
    from segpipe.data.preprocess import preprocess_dataset
    from segpipe.training.trainer import resolve_train_config, train

    m = discover(work / "raw" / f"Dataset{SMALL_ID}_Bench")
    preprocess_dataset(m, load_config("isles22", ["data.reference_channel=dwi"]), work / "segpipe_cache")
    patch = list(reversed(patch_zyx))
    cfg = resolve_train_config(work / "segpipe_cache", None, [f"plan.patch_size={patch}", "plan.batch_size=2", "plan.max_stages=5",
                                                              "train.epochs=1", "train.iterations_per_epoch=1", "train.num_workers=0"])
    train(cfg, work / "segpipe_cache", work / "segpipe_run", fold="all")
    return work / "segpipe_run"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cases", type=int, nargs="+", default=[1, 3, 6], help="numbers of cases per call (at least two sizes)")
    ap.add_argument("--preprocess-workers", type=int, default=None,
                    help="segpipe infer's --preprocess-workers (default: its own choice, 0 on the CPU)")
    args = ap.parse_args(argv)
    sizes = sorted(set(args.cases))
    if len(sizes) < 2 or sizes[0] < 1:
        ap.error(f"--cases: give at least two different numbers of cases, each 1 or more; got {' '.join(map(str, args.cases))}")
    if not have_compare("nnunetv2"):
        return
    from importlib.metadata import version

    import torch

    from segpipe.inference.run import infer
    from segpipe.training.checkpoint import load_checkpoint

    dev = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        what, _ = _write_raw(work / "raw", "isles", (2, sizes[-1]))
        nnunet_paths(work)
        folder, patch = _nnunet_model(work)
        run = _segpipe_model(work, patch)
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

        predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False, perform_everything_on_device=dev.type == "cuda",
                                    device=dev, verbose=False, verbose_preprocessing=False, allow_tqdm=False)
        predictor.initialize_from_trained_model_folder(str(folder), use_folds=(0,), checkpoint_name="checkpoint_final.pth")
        ours_net = load_checkpoint(run / "checkpoint_latest.pt")["plan"]["network"]
        images = work / "raw" / f"Dataset{LARGE_ID}_Bench" / "imagesTr"
        cases = [[str(images / f"case{k:03d}_{i:04d}.nii.gz") for i in range(2)] for k in range(sizes[-1])]
        folders = []  # segpipe takes a folder per case (channel-named files)
        for k, (dwi, adc) in enumerate(cases):
            f = work / "segpipe_in" / f"case{k:03d}"
            f.mkdir(parents=True)
            os.symlink(dwi, f / f"case{k:03d}_dwi.nii.gz")
            os.symlink(adc, f / f"case{k:03d}_adc.nii.gz")
            folders.append(f)
        times: dict[str, dict[int, list[float]]] = {tool: {n: [] for n in sizes} for tool in ("nnunet", "segpipe")}
        stages: dict[str, list[float]] = {}  # segpipe's own per-case seconds by stage (summary.json's)
        for _ in range(args.repeat):  # alternated, so that a busy moment does not hit one tool only
            for n in sizes:
                out = Path(tempfile.mkdtemp(dir=work))
                t = time.perf_counter()
                with contextlib.redirect_stdout(io.StringIO()):
                    predictor.predict_from_files(cases[:n], [str(out / f"nn{k}") for k in range(n)], save_probabilities=False, overwrite=True,
                                                 num_processes_preprocessing=1, num_processes_segmentation_export=1)
                times["nnunet"][n].append(time.perf_counter() - t)
                assert len(list(out.glob("nn*.nii.gz"))) == n, "nnU-Net wrote fewer masks than cases"
                t = time.perf_counter()
                report = infer(run, folders[:n], out / "segpipe", tta=False, device=args.device,
                               preprocess_workers=args.preprocess_workers)
                times["segpipe"][n].append(time.perf_counter() - t)
                assert len(report.done) == n and not report.failed, report
                for entry in report.done.values():
                    for k, v in entry["seconds"].items():
                        stages.setdefault(k, []).append(v)
    med = {tool: {n: statistics.median(v) for n, v in d.items()} for tool, d in times.items()}
    a, b = sizes[-2], sizes[-1]
    per_case = {tool: (m[b] - m[a]) / (b - a) for tool, m in med.items()}
    nn_params = parameters(predictor.network)
    print(f"{what}, no TTA, step 0.5, {dev}: same topology (segpipe {ours_net['filters']}, nnU-Net {nn_params / 1e6:.1f} M parameters), "
          f"patch {'x'.join(map(str, patch))} (nnU-Net's axes)")
    for n in sizes:
        print(f"   {n} case(s): nnU-Net {version('nnunetv2')} predictor {med['nnunet'][n]:.1f} s, segpipe infer {med['segpipe'][n]:.1f} s: "
              f"{med['nnunet'][n] / med['segpipe'][n]:.1f}x")
    print(f"   per case beyond the fixed costs ({a} to {b} cases): nnU-Net {per_case['nnunet']:.2f} s, segpipe {per_case['segpipe']:.2f} s")
    stage_med = {k: statistics.median(v) for k, v in stages.items()}
    print("   segpipe per case by stage (median): " + ", ".join(f"{k} {v:.2f} s" for k, v in stage_med.items()))
    save(f"nnunet_infer_{dev.type}", {"data": what, "segpipe_preprocess_workers": args.preprocess_workers, "patch_nnunet_axes": patch, "nnunet_version": version("nnunetv2"),
                                      "seconds": {t: {str(n): v for n, v in d.items()} for t, d in times.items()},
                                      "seconds_per_case": per_case, "segpipe_stage_seconds": stage_med})


if __name__ == "__main__":
    main()
