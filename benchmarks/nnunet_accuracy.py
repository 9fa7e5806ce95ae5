"""Accuracy at the same budget: segpipe against nnU-Net v2 itself, trained and run on the same files with the
same network, scored on the same held-out cases.

Synthetic cases (the loss study's data: ISLES-like DWI and ADC at 2 mm, or with ``--data wmh`` WMH-like FLAIR
and T1 with label 2 "other pathology", nnU-Net's ignore label, or with ``--data ctp`` ISLES 2018-like CT
perfusion slabs, whose CT both tools normalise with nnU-Net's CT scheme) are written once in nnU-Net's raw format, a
training and a test dataset, which both tools read as they are. Each tool plans and preprocesses the
training dataset its own way at one target spacing (2 mm; WMH 1 x 1 x 3 mm); nnU-Net's plan is then set to
segpipe's demo-sized network (segpipe's plan for the patch and spacing: 4 stages of 8-64 features, its
kernels and strides, 32^3 patches or 32x32x16 for WMH, batch 2), so that the networks are the same and what
differs is the rest of each pipeline: preprocessing, patch sampling, augmentation, loss, training loop,
sliding-window inference. Both train on every training case (fold ``all``) for the same number of
iterations with their own defaults: nnU-Net's trainer (SGD 0.01, Nesterov, poly, Dice + cross-entropy, its
augmentation, a third of each batch on foreground), segpipe's config for the data (``isles22``: SGD 0.01,
Nesterov, poly, ``dice+boundary`` under ``rebalance``; ``wmh17``: ``dice+ce+boundary``; ``isles18`` as ``isles22``) and the same with
``dice+ce`` (nnU-Net's loss: the pipelines alone). Both predict the test cases without mirroring, windows
overlapping by half; the predictions are scored with the data's protocol (isles22, wmh17, isles15) and compared case
by case (``segpipe evaluate --baseline``'s paired test). Everything runs on the CPU, nnU-Net's augmentation in
its main process (``nnUNet_n_proc_DA=0``), seeds set, so that each seed's run is one draw of the same budget
for every tool.

Needs nnU-Net (``pip install -e ".[compare]"``); without it says so and exits 0.

    python -m benchmarks.nnunet_accuracy [--data isles|wmh|ctp]   # about 20 minutes on 2 CPU cores (3 seeds)
    python -m benchmarks.nnunet_accuracy --smoke              # about a minute: checks that it runs
    python -m benchmarks.nnunet_accuracy --data ctp --segpipe-set train.augmentation=false   # an ablation
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks._common import have_compare, link_nnunet_dataset, nnunet_paths, save

TRAIN_ID, TEST_ID = 995, 996
SIZES = {
    # training cases, test cases, shape, epochs, iterations per epoch, seeds
    "smoke": (4, 2, (40, 40, 28), 2, 5, 1),
    "default": (10, 6, (48, 48, 32), 20, 25, 3),
}
#: per kind of data: segpipe's synthetic layout, the channels both tools read, nnU-Net's labels, segpipe's config
#: and protocol, the target spacing and patch (x, y, z; both tools get the same)
DATA = {
    "isles": {"layout": "isles22", "channels": ("dwi", "adc"), "labels": {"background": 0, "lesion": 1}, "config": "isles22",
              "spacing": (2.0, 2.0, 2.0), "patch": (32, 32, 32)},
    "wmh": {"layout": "wmh17", "channels": ("flair", "t1"), "labels": {"background": 0, "wmh": 1, "ignore": 2}, "config": "wmh17",
            "spacing": (1.0, 1.0, 3.0), "patch": (32, 32, 16)},
    # ISLES 2018-like CT perfusion slabs: both tools give the channel named CT their CT normalisation (clip and
    # scale by the training set's foreground statistics) and z-score the maps; scored as ISLES 2015/2018 were
    "ctp": {"layout": "isles18", "channels": ("ct", "cbf", "cbv", "mtt", "tmax"), "labels": {"background": 0, "lesion": 1},
            "config": "isles18", "protocol": "isles15", "spacing": (2.0, 2.0, 5.0), "patch": (32, 32, 16), "shape": (56, 56, 16)},
}
#: the shared network's widths: segpipe's demo plan, and the same written into nnU-Net's plan
FEATURES = (8, 16, 32, 64)


def _preprocess_overrides(d: dict) -> list[str]:
    """segpipe's preprocessing settings (its config's, at the shared spacing)."""
    return [f"data.reference_channel={d['channels'][0]}", f"preprocess.target_spacing={list(d['spacing'])}"]


def _network_overrides(d: dict) -> list[str]:
    return [f"plan.patch_size={list(d['patch'])}", "plan.batch_size=2", f"plan.base_features={FEATURES[0]}",
            f"plan.max_features={FEATURES[-1]}", f"plan.max_stages={len(FEATURES)}"]


def _write_raw(work: Path, size: tuple, d: dict) -> None:
    """The training and test datasets in nnU-Net's raw format (links to segpipe's synthetic cases)."""
    from segpipe.data.layouts import discover
    from segpipe.data.synthetic import synthesize

    n_train, n_test, shape, *_ = size
    shape = d.get("shape", shape)  # a slab keeps its few slices
    for dataset_id, n, seed in ((TRAIN_ID, n_train, 7), (TEST_ID, n_test, 1007)):
        src = work / f"synth_{dataset_id}"
        synthesize(src, d["layout"], n, seed=seed, shape=shape)
        m = discover(src, d["layout"])
        link_nnunet_dataset(work / "raw" / f"Dataset{dataset_id}_Acc", m, [(c.id, c) for c in m.labelled], d["channels"], d["labels"])


def _seed(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _segpipe_plan(d: dict):
    """segpipe's network plan at the shared size (kernels and strides, x y z), which nnU-Net's plan is set to."""
    from segpipe.config import load_config
    from segpipe.planning import make_plan

    cfg = load_config(d["config"], [*_preprocess_overrides(d), *_network_overrides(d)])
    return make_plan(cfg, d["channels"], tuple(d["labels"])[:2], 2 if "ignore" in d["labels"] else None, 0.5, [d["spacing"]],
                     [(200, 200, 200)]).network


def _nnunet_prepare(work: Path, d: dict) -> dict:
    """nnU-Net's fingerprint and plan of the training dataset, its 3d_fullres spacing and network set to the
    shared ones (nnU-Net's axes are z, y, x: reversed), then its preprocessing; returns its own choices."""
    nnunet_paths(work)
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints, plan_experiments, preprocess

    with contextlib.redirect_stdout(io.StringIO()):
        extract_fingerprints([TRAIN_ID], num_processes=2, check_dataset_integrity=True, verbose=False, show_progress_bar=False)
        plan_experiments([TRAIN_ID])
    plans_file = work / "nnunet_pre" / f"Dataset{TRAIN_ID}_Acc" / "nnUNetPlans.json"
    plans = json.loads(plans_file.read_text())
    cfg = plans["configurations"]["3d_fullres"]
    own = {"spacing": cfg["spacing"], "normalization": cfg["normalization_schemes"]}
    net = _segpipe_plan(d)
    n = len(net.filters)
    cfg["spacing"] = list(reversed(d["spacing"]))
    cfg["patch_size"] = list(reversed(d["patch"]))
    cfg["batch_size"] = 2
    cfg["architecture"]["arch_kwargs"].update(
        n_stages=n, features_per_stage=list(net.filters), kernel_sizes=[list(reversed(k)) for k in net.kernel_sizes],
        strides=[list(reversed(st)) for st in net.strides], n_conv_per_stage=[2] * n, n_conv_per_stage_decoder=[2] * (n - 1))
    plans_file.write_text(json.dumps(plans, indent=2))
    with contextlib.redirect_stdout(io.StringIO()):
        preprocess([TRAIN_ID], configurations=("3d_fullres",), num_processes=(2,), verbose=False, show_progress_bar=False)
    return {"nnunet_own_spacing": own["spacing"], "normalization": own["normalization"], "kernel_sizes_xyz": [list(k) for k in net.kernel_sizes],
            "strides_xyz": [list(st) for st in net.strides]}


def _nnunet_run(work: Path, seed: int, epochs: int, iters: int, out: Path) -> float:
    """nnU-Net's own trainer, its budget cut to ``epochs`` x ``iters``, then its predictor on the test cases;
    returns the training time (s)."""
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    cpu = torch.device("cpu")

    class Budget(nnUNetTrainer):
        # nnU-Net reads its constructor's arguments by name from the signature: the same names here
        def __init__(self, plans: dict, configuration: str, fold, dataset_json: dict, device: torch.device = cpu):
            super().__init__(plans, configuration, fold, dataset_json, device)
            self.num_epochs, self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = epochs, iters, 2

    # the checkpoint names its trainer class, which the predictor looks up among nnU-Net's own to build the
    # network; the budget changes nothing there, so it goes by the name of the trainer it extends
    Budget.__name__ = Budget.__qualname__ = "nnUNetTrainer"
    os.environ["nnUNet_n_proc_DA"] = "0"  # augmentation in this process: 2 cores, and reproducible with the seed
    pre = work / "nnunet_pre" / f"Dataset{TRAIN_ID}_Acc"
    _seed(seed)
    plans = load_json(str(pre / "nnUNetPlans.json"))
    plans["continue_training"] = False  # what nnU-Net's run_training adds before building its trainer
    with contextlib.redirect_stdout(io.StringIO()):
        trainer = Budget(plans, "3d_fullres", "all", load_json(str(pre / "dataset.json")), device=cpu)
        t = time.perf_counter()
        trainer.run_training()
        seconds = time.perf_counter() - t
        predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False, device=cpu,
                                    perform_everything_on_device=False, allow_tqdm=False)
        predictor.initialize_from_trained_model_folder(trainer.output_folder_base, use_folds=("all",), checkpoint_name="checkpoint_final.pth")
        predictor.predict_from_files(str(work / "raw" / f"Dataset{TEST_ID}_Acc" / "imagesTr"), str(out), save_probabilities=False,
                                     overwrite=True, num_processes_preprocessing=1, num_processes_segmentation_export=1)
    shutil.rmtree(trainer.output_folder_base)  # the next seed starts from nothing
    return seconds


def _segpipe_run(work: Path, cache: Path, d: dict, spec: str, seed: int, epochs: int, iters: int, out: Path,
                 extra: tuple[str, ...] = ()) -> float:
    """segpipe's trainer with the data's config at the shared size and budget, then ``infer`` on the test cases;
    returns the training time (s)."""
    from segpipe.inference.run import infer
    from segpipe.training.trainer import resolve_train_config, train

    over = [*_preprocess_overrides(d), *_network_overrides(d), f"train.epochs={epochs}", f"train.iterations_per_epoch={iters}",
            "train.validate_every=100000", "train.num_workers=0", f"train.seed={seed}", f"loss.spec={spec}", *extra]
    run_dir = work / "segpipe_runs" / f"{spec}_{seed}"
    t = time.perf_counter()
    train(resolve_train_config(cache, d["config"], over), cache, run_dir, fold="all", overwrite=True, device="cpu")
    seconds = time.perf_counter() - t
    infer(run_dir, [work / "raw" / f"Dataset{TEST_ID}_Acc"], out, tta=False, device="cpu", overlap=0.5)
    return seconds


def _pipelines(d: dict) -> dict[str, str | None]:
    """Each pipeline's name in the results, and segpipe's loss spec (None: nnU-Net, with its own Dice +
    cross-entropy): nnU-Net, segpipe with its config's loss, segpipe with nnU-Net's loss."""
    from segpipe.config import load_config

    default = load_config(d["config"]).loss.spec
    return {"nnU-Net (Dice+CE)": None, f"segpipe {default}": default, "segpipe dice+ce": "dice+ce"}


def main(argv=None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", choices=tuple(DATA), default="isles",
                    help="synthetic ISLES-like (DWI, ADC), WMH-like (FLAIR, T1, label 2 ignored) or ISLES 2018-like CT perfusion (ctp)")
    ap.add_argument("--smoke", action="store_true", help="tiny data and budget: checks that it runs")
    ap.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (default 3)")
    ap.add_argument("--epochs", type=int, default=None, help="a longer budget than the default 20 epochs ...")
    ap.add_argument("--iters", type=int, default=None, help="... of 25 iterations (nnU-Net's own default: 1000 x 250)")
    ap.add_argument("--segpipe-set", action="append", default=[], metavar="KEY=VALUE",
                    help="a training override for segpipe's runs, e.g. train.augmentation=false (an ablation; saved apart)")
    args = ap.parse_args(argv)
    if not have_compare("nnunetv2"):
        return None
    import logging
    from importlib.metadata import version

    import torch

    from segpipe.config import load_config
    from segpipe.data.layouts import discover
    from segpipe.data.preprocess import preprocess_dataset
    from segpipe.evaluation.protocols import PROTOCOLS, compare, evaluate

    logging.getLogger("segpipe").setLevel(logging.WARNING)
    torch.set_num_threads(os.cpu_count() or 1)
    size = SIZES["smoke" if args.smoke else "default"]
    n_train, n_test, shape, epochs, iters, seeds = size
    seeds, epochs, iters = args.seeds or seeds, args.epochs or epochs, args.iters or iters
    d = DATA[args.data]
    protocol, loss = d.get("protocol", d["layout"]), _pipelines(d)
    keys = PROTOCOLS[protocol]
    tools = tuple(loss)
    reports: dict[str, dict[str, dict]] = {tool: {} for tool in tools}
    seconds: dict[str, list[float]] = {tool: [] for tool in tools}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        _write_raw(work, size, d)
        planned = _nnunet_prepare(work, d)
        cache = work / "segpipe_cache"
        preprocess_dataset(discover(work / "raw" / f"Dataset{TRAIN_ID}_Acc"), load_config(d["config"], _preprocess_overrides(d)), cache)
        gt = work / "raw" / f"Dataset{TEST_ID}_Acc"
        for seed in range(seeds):
            for k, tool in enumerate(tools):  # alternated per seed: a busy moment of the machine does not hit one tool only
                out = work / "pred" / f"{k}_{seed}"
                spec = loss[tool]
                s = (_nnunet_run(work, seed, epochs, iters, out) if spec is None
                     else _segpipe_run(work, cache, d, spec, seed, epochs, iters, out, tuple(args.segpipe_set)))
                seconds[tool].append(s)
                report = evaluate(out, gt, protocol)
                reports[tool][str(seed)] = report
                print(f"seed {seed} {tool:26s} " + "  ".join(f"{key} {report['mean'][key]:.3f}" for key in keys)
                      + f"  training {s:.0f} s", flush=True)

    def pooled(tool: str) -> dict:
        """One report whose cases are every (seed, case) pair: the paired test's units."""
        cases = {f"{seed}/{cid}": v for seed, r in reports[tool].items() for cid, v in r["cases"].items()}
        return {"protocol": protocol, "cases": cases}

    base = pooled(tools[0])
    summary = {}
    for tool in tools:
        per_seed = {k: [r["mean"][k] for r in reports[tool].values()] for k in keys}
        summary[tool] = {"mean": {k: float(np.mean(v)) for k, v in per_seed.items()}, "std": {k: float(np.std(v)) for k, v in per_seed.items()},
                         "seeds": per_seed, "training_seconds": float(np.mean(seconds[tool])), "cases": pooled(tool)["cases"]}
    comparisons = {tool: compare(pooled(tool), base) for tool in tools[1:]}
    print(f"\n{n_train} training and {n_test} held-out synthetic {args.data.upper()}-like cases, {epochs} x {iters} iterations, "
          f"{seeds} seeds, {protocol} protocol; nnU-Net {version('nnunetv2')} (its own plan's spacing: {planned['nnunet_own_spacing']})")
    for tool in tools:
        m, s = summary[tool]["mean"], summary[tool]["std"]
        print(f"{tool:26s} " + "  ".join(f"{key} {m[key]:.3f} ± {s[key]:.3f}" for key in keys)
              + f"  training {summary[tool]['training_seconds']:.0f} s  (Dice by seed: "
              + ", ".join(f"{v:.3f}" for v in summary[tool]["seeds"]["dice"]) + ")")
    for tool, rows in comparisons.items():
        for r in rows:
            print(f"{tool} vs nnU-Net, {r['metric']}: {r['difference']:+.4f} [{r['ci_low']:+.4f}, {r['ci_high']:+.4f}], "
                  f"p {r['p_value']:.3g}, better/worse {r['better']}/{r['worse']} of {r['cases']}")
    result = {"data": args.data, "protocol": protocol, "size": "smoke" if args.smoke else "default", "training_cases": n_train,
              "test_cases": n_test, "shape": list(d.get("shape", shape)), "epochs": epochs, "iterations_per_epoch": iters, "seeds": seeds,
              "nnunet_version": version("nnunetv2"), "nnunet_plan": planned,
              "network": {"patch_xyz": list(d["patch"]), "spacing_xyz": list(d["spacing"]), "features": list(FEATURES)},
              "segpipe_overrides": list(args.segpipe_set), "tools": summary, "paired_vs_nnunet": comparisons}
    save("nnunet_accuracy" + ("" if args.data == "isles" else f"_{args.data}") + ("_ablation" if args.segpipe_set else "")
         + ("_smoke" if args.smoke else ""), result)
    return result


if __name__ == "__main__":
    main()
