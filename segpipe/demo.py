"""``segpipe demo``: the whole job on built-in synthetic data, on a CPU in minutes.

1. synthesise a small ISLES 2022-like dataset (training cases, and held-out cases never seen in training);
2. discover it into a manifest;
3. preprocess it, with the signed distance maps (``configs/demo.yaml``: a tiny network, 32^3 patches);
4. train a 3D U-Net with ``dice+boundary`` under the ``rebalance`` schedule (on the GPU when there is one);
5. segment the held-out cases with ``infer``;
6. score them with the ``isles22`` protocol (``evaluation.json``), and print the table and where everything is.
"""

from __future__ import annotations

import logging
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from segpipe.config import builtin_configs, load_config
from segpipe.data.layouts import discover
from segpipe.data.manifest import load_manifest, write_manifest
from segpipe.data.preprocess import preprocess_dataset
from segpipe.data.synthetic import synthesize
from segpipe.errors import SegpipeError
from segpipe.evaluation.protocols import evaluate, format_table, write_report
from segpipe.inference.run import infer
from segpipe.io.atomic import ensure_writable_dir
from segpipe.training.trainer import resolve_train_config, train

__all__ = ["DemoResult", "run_demo"]

log = logging.getLogger(__name__)

# (training cases, held-out cases, label-grid shape, epochs, iterations per epoch, test-time augmentation)
SETTINGS = {
    "quick": (6, 3, (48, 48, 32), 7, 20, False),
    "full": (12, 4, (56, 56, 36), 20, 40, True),
}


@dataclass
class DemoResult:
    out: Path
    report: dict[str, Any] = field(default_factory=dict)
    empty_dice: float = 0.0
    empty_f1: float = 0.0
    seconds: dict[str, float] = field(default_factory=dict)
    peak_rss_mb: float = 0.0


def _empty_baseline(test_manifest: Path) -> tuple[float, float]:
    """Mean Dice and lesion F1 that an empty prediction scores on the held-out cases: the floor to beat."""
    import nibabel as nib
    import numpy as np

    from segpipe.evaluation.protocols import evaluate_isles22

    m = load_manifest(test_manifest)
    scores = []
    for case in m.labelled:
        img = nib.load(str(m.label_path(case)))
        gt = np.asanyarray(img.dataobj)
        scores.append(evaluate_isles22(gt, np.zeros_like(gt), float(np.prod(img.header.get_zooms()[:3])) / 1000))
    return float(np.mean([s["dice"] for s in scores])), float(np.mean([s["lesion_f1"] for s in scores]))


def _config_path() -> Path:
    path = builtin_configs().get("demo")
    if path is not None:
        return path
    raise SegpipeError("segpipe demo needs its config demo.yaml, installed with segpipe as segpipe/configs/demo.yaml (from "
                       "configs/ of the source tree) and not found; reinstall segpipe")


def run_demo(out: str | Path = "demo_out", *, quick: bool = False, device: str = "auto", seed: int = 0) -> DemoResult:
    from segpipe.training.trainer import resolve_device

    n_train, n_test, shape, epochs, iters, tta = SETTINGS["quick" if quick else "full"]
    resolve_device(device)  # a bad --device fails now, not after minutes of work
    out = ensure_writable_dir(out, what="--out demo folder")
    result = DemoResult(out)
    t = time.perf_counter()
    log.info("1/6 synthesising %d training and %d held-out ISLES-like cases", n_train, n_test)
    synthesize(out / "data" / "train", "isles22", n_train, seed=seed, shape=shape)
    synthesize(out / "data" / "test", "isles22", n_test, seed=seed + 1000, shape=shape)
    result.seconds["synthesise"] = time.perf_counter() - t

    t = time.perf_counter()
    log.info("2/6 discovering the datasets into manifests")
    write_manifest(discover(out / "data" / "train", "isles22", name="demo_train", folds=5, seed=seed), out / "train.json")
    write_manifest(discover(out / "data" / "test", "isles22", name="demo_test", folds=1, seed=seed), out / "test.json")

    log.info("3/6 preprocessing (with signed distance maps)")
    overrides = [f"train.epochs={epochs}", f"train.iterations_per_epoch={iters}", f"train.seed={seed}"]
    cfg = load_config(_config_path(), overrides)
    preprocess_dataset(load_manifest(out / "train.json"), cfg, out / "cache", workers=1)
    result.seconds["preprocess"] = time.perf_counter() - t

    t = time.perf_counter()
    log.info("4/6 training %d epochs x %d iterations with dice+boundary under rebalance", epochs, iters)
    run = out / "run"
    train(resolve_train_config(out / "cache", _config_path(), overrides), out / "cache", run, fold="0", overwrite=True, device=device)
    result.seconds["train"] = time.perf_counter() - t

    t = time.perf_counter()
    log.info("5/6 segmenting the %d held-out cases", n_test)
    report = infer(run, [out / "test.json"], out / "predictions", tta=tta, device=device)
    if report.failed:
        raise RuntimeError(f"demo: inference failed on {sorted(report.failed)}")
    result.seconds["infer"] = time.perf_counter() - t

    t = time.perf_counter()
    log.info("6/6 evaluating with the isles22 protocol")
    result.report = evaluate(out / "predictions", out / "test.json", "isles22")
    write_report(result.report, out / "evaluation.json", out / "evaluation.csv")
    result.empty_dice, result.empty_f1 = _empty_baseline(out / "test.json")
    result.seconds["evaluate"] = time.perf_counter() - t
    result.peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def summary(result: DemoResult) -> str:
    out = result.out
    lines = [
        "held-out synthetic cases, isles22 protocol:",
        format_table(result.report),
        f"(an empty prediction scores mean Dice {result.empty_dice:.2f} and lesion F1 {result.empty_f1:.2f} on these cases)",
        "",
        "time: " + ", ".join(f"{k} {v:.0f} s" for k, v in result.seconds.items()) + f"; peak memory {result.peak_rss_mb:.0f} MB",
        f"data:         {out / 'data'} (train/, test/), manifests {out / 'train.json'}, {out / 'test.json'}",
        f"cache:        {out / 'cache'} (segpipe inspect {out / 'cache'})",
        f"run:          {out / 'run'} (progress.png, metrics.csv, checkpoint_best.pt)",
        f"predictions:  {out / 'predictions'}",
        f"evaluation:   {out / 'evaluation.json'}, {out / 'evaluation.csv'}",
    ]
    return "\n".join(lines)
