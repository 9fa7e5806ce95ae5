"""Loss study: does adding the boundary loss help on small, highly unbalanced lesions?

On synthetic ISLES-like (stroke: DWI/ADC/FLAIR) and WMH-like (FLAIR/T1, label 2 ignored) data, the same
network is trained for the same budget with each loss, 3 seeds each, and scored on held-out cases:

- ``dice``, ``dice+ce``, ``gdl`` (regional only);
- ``gdl+boundary``, ``dice+boundary``, ``focal+boundary`` under ``rebalance`` (the paper's schedule,
  compressed to the run: alpha falls from 1 to the floor over the epochs, as the paper's 0.01 per epoch
  does over its first 100 epochs);
- with label noise injected into the training masks (lesions randomly grown or shrunk by a voxel, one in
  five small lesions dropped): ``bitempered`` (t1 0.8, t2 1.2) against ``ce`` trained on the same noisy masks.

Held-out metrics: Dice, HD95 (mm, 3D borders) and lesion-wise F1 (ISLES 2022 definition), mean and standard
deviation over the 3 seeds (each seed: the mean over the held-out cases). HD95 is undefined for an empty
prediction: it is averaged over the cases with one, and the share of empty predictions is reported apart. Each
boundary loss is also compared with the regional loss it extends case by case (:func:`paired`: held-out case x
seed pairs, bootstrap interval and Wilcoxon p of the difference). Writes
``benchmarks/results/loss_study.json``, ``loss_study.md`` and ``loss_study.png``.

    python -m benchmarks.loss_study            # about an hour on 2 CPU cores
    python -m benchmarks.loss_study --full     # larger volumes, network and budget, for a GPU machine
    python -m benchmarks.loss_study --smoke    # a minute: checks that it runs
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

from benchmarks._common import RESULTS, machine
from segpipe.config import load_config
from segpipe.data.cache import CaseCache, foreground_locations
from segpipe.data.layouts import discover
from segpipe.data.manifest import load_manifest, write_manifest
from segpipe.data.preprocess import preprocess_dataset
from segpipe.data.synthetic import synthesize
from segpipe.evaluation.metrics import dice, hausdorff95, lesion_f1
from segpipe.inference.run import infer
from segpipe.training.trainer import resolve_train_config, train
from segpipe.transforms import signed_distance_maps

log = logging.getLogger("segpipe.loss_study")
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"

LOSSES = [
    ("dice", "dice", False),
    ("dice+ce", "dice+ce", False),
    ("gdl", "gdl", False),
    ("gdl+boundary", "gdl+boundary", False),
    ("dice+boundary", "dice+boundary", False),
    ("focal+boundary", "focal+boundary", False),
    ("ce, noisy masks", "ce", True),
    ("bitempered, noisy masks", "bitempered", True),
]

SIZES = {
    # train cases, test cases, shape, epochs, iterations/epoch, patch, base features, seeds
    "smoke": (4, 2, (40, 40, 28), 2, 4, 32, 8, 1),
    "default": (10, 6, (48, 48, 32), 12, 25, 32, 8, 3),
    "full": (40, 20, (96, 96, 64), 100, 250, 96, 32, 3),
}


def add_label_noise(cache_root: Path, seed: int) -> None:
    """Noisy training masks, in place: each lesion grown or shrunk by one voxel at random, one in five
    lesions under 30 voxels dropped (missed by the annotator); distance maps made again from the noisy masks."""
    cache = CaseCache(cache_root)
    index = cache.read_json("cache.json")
    rng = np.random.default_rng(seed)
    for cid in index["cases"]:
        c = cache.load(cid, mmap=False)
        label = np.array(c.label)
        ignore = label == 255
        lab, n = ndimage.label(label == 1, structure=np.ones((3, 3, 3)))
        noisy = np.zeros_like(label)
        for k in range(1, n + 1):
            comp = lab == k
            if comp.sum() < 30 and rng.random() < 0.2:
                continue
            r = rng.random()
            if r < 0.4:
                comp = ndimage.binary_dilation(comp)
            elif r < 0.8 and comp.sum() > 8:
                comp = ndimage.binary_erosion(comp)
            noisy[comp] = 1
        noisy[ignore] = 255
        sdm = signed_distance_maps(noisy, 2, tuple(c.spacing), ignore_index=255)
        meta = dict(c.meta)
        cache.write(cid, {"image": np.asarray(c.image), "label": noisy, "sdm": sdm,
                          "fg": foreground_locations(noisy, 2, rng)}, meta)


def _dataset(root: Path, kind: str, size: tuple, seed: int) -> tuple[Path, Path, Path]:
    n_train, n_test, shape, *_ = size
    layout = "isles22" if kind == "isles" else "wmh17"
    synthesize(root / "train", layout, n_train, seed=seed, shape=shape)
    synthesize(root / "test", layout, n_test, seed=seed + 1000, shape=shape)
    write_manifest(discover(root / "train", layout, folds=5), root / "train.json")
    write_manifest(discover(root / "test", layout, folds=1), root / "test.json")
    return root / "train.json", root / "test.json", root


def _score(pred_dir: Path, test_manifest: Path) -> tuple[dict[str, float], dict[str, list[float]]]:
    import nibabel as nib

    m = load_manifest(test_manifest)
    scores = {"dice": [], "hd95": [], "lesion_f1": [], "empty": []}
    for case in m.labelled:
        gt_img = nib.load(str(m.label_path(case)))
        gt = np.asanyarray(gt_img.dataobj)
        pred = np.asanyarray(nib.load(str(pred_dir / f"{case.id}.nii.gz")).dataobj) > 0
        valid = ~np.isclose(gt, 2) if m.label.ignore_value == 2 else np.ones(gt.shape, bool)
        g = (gt > 0.5) & (gt < 1.5) & valid
        p = pred & valid
        scores["dice"].append(dice(g, p))
        scores["hd95"].append(hausdorff95(g, p, gt_img.affine, inplane=False))
        scores["lesion_f1"].append(lesion_f1(g, p))
        scores["empty"].append(float(not p.any()))  # HD95 is undefined (NaN) for these: counted apart
    means = {k: float(np.nanmean(v)) if not all(math.isnan(x) for x in v) else math.nan for k, v in scores.items()}
    return means, {k: [float(x) for x in v] for k, v in scores.items()}


def run(size_name: str, out: Path, device: str) -> dict:
    size = SIZES[size_name]
    n_train, n_test, shape, epochs, iters, patch, features, seeds = size
    results: dict = {"size": size_name, "machine": machine(), "epochs": epochs, "iterations_per_epoch": iters, "datasets": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for kind in ("isles", "wmh"):
            train_m, test_m, root = _dataset(tmp / kind, kind, size, seed=7 if kind == "isles" else 11)
            target = "[2.0,2.0,2.0]" if kind == "isles" else "[1.0,1.0,3.0]"
            ref = "dwi" if kind == "isles" else "flair"
            base = [f"preprocess.target_spacing={target}", f"data.reference_channel={ref}", f"plan.patch_size=[{patch},{patch},{patch // 2 if kind == 'wmh' else patch}]",
                    f"plan.base_features={features}", f"train.epochs={epochs}", f"train.iterations_per_epoch={iters}",
                    "train.validate_every=1000"]
            cfg = load_config(CONFIG, base)
            cache = root / "cache"
            preprocess_dataset(load_manifest(train_m), cfg, cache)
            noisy = root / "cache_noisy"
            shutil.copytree(cache, noisy)
            add_label_noise(noisy, seed=3)
            results["datasets"][kind] = {}
            for label, spec, use_noise in LOSSES:
                per_seed, per_case = [], []
                for s in range(seeds):
                    t = time.perf_counter()
                    c = noisy if use_noise else cache
                    schedule = f"rebalance:step={1.0 / epochs:.4f},floor=0.01" if "boundary" in spec else "constant:weight=0"
                    over = base + [f"loss.spec={spec}", f"loss.schedule={schedule}", f"train.seed={s}"]
                    run_dir = root / "runs" / f"{spec}_{int(use_noise)}_{s}"
                    train(resolve_train_config(c, CONFIG, over), c, run_dir, fold="all", overwrite=True, device=device)
                    pred = root / "pred" / run_dir.name
                    infer(run_dir, [test_m], pred, tta=False, device=device)
                    sc, cases = _score(pred, test_m)
                    per_seed.append(sc)
                    per_case.append(cases)
                    log.warning("%s %-24s seed %d: dice %.3f hd95 %.1f f1 %.3f (%.0f s)", kind, label, s, sc["dice"], sc["hd95"],
                                sc["lesion_f1"], time.perf_counter() - t)
                agg = {}
                for k in ("dice", "hd95", "lesion_f1", "empty"):
                    vals = np.array([p[k] for p in per_seed], dtype=float)
                    agg[k] = {"mean": float(np.nanmean(vals)), "std": float(np.nanstd(vals)), "seeds": vals.tolist(),
                              "cases": [c[k] for c in per_case]}  # per seed, the held-out cases in the manifest's order
                results["datasets"][kind][label] = agg
    results["paired"] = paired(results)
    return results


#: each loss with a boundary term (or the noise-robust one) against the regional loss it extends
PAIRS = [("dice+boundary", "dice"), ("gdl+boundary", "gdl"), ("bitempered, noisy masks", "ce, noisy masks")]
HIGHER = {"dice": True, "hd95": False, "lesion_f1": True}


def paired(results: dict) -> dict[str, list[dict]]:
    """Per dataset, each pair of :data:`PAIRS` compared case by case: the same held-out case scored by the two
    losses' networks of the same seed (same initialisation and patches) is a pair, over all seeds and cases;
    :func:`segpipe.evaluation.protocols.paired_difference` per metric (HD95 pairs with an empty prediction
    left out). A difference of seed means over 3 seeds cannot tell noise from effect; this can."""
    from segpipe.evaluation.protocols import paired_difference

    out: dict[str, list[dict]] = {}
    for kind, table in results["datasets"].items():
        rows = []
        for loss, base in PAIRS:
            if loss not in table or base not in table or "cases" not in table[loss]["dice"]:
                continue
            for metric, higher in HIGHER.items():
                a = [v for seed in table[loss][metric]["cases"] for v in seed]
                b = [v for seed in table[base][metric]["cases"] for v in seed]
                rows.append({"loss": loss, "baseline": base, "metric": metric, **paired_difference(a, b, higher_is_better=higher)})
        out[kind] = rows
    return out


def write_outputs(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "loss_study.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [f"Loss study ({results['size']}: {results['epochs']} epochs x {results['iterations_per_epoch']} iterations; {results['machine']})", ""]
    for kind, table in results["datasets"].items():
        lines += [f"**{'ISLES-like' if kind == 'isles' else 'WMH-like'}** (held-out cases; mean ± sd over seeds)", "",
                  "| loss | Dice | HD95 (mm) | lesion F1 | empty predictions |", "|---|---|---|---|---|"]
        for label, agg in table.items():
            def cell(k: str, agg: dict = agg) -> str:
                digits = 1 if k == "hd95" else 3
                return f"{agg[k]['mean']:.{digits}f} ± {agg[k]['std']:.{digits}f}"

            lines.append(f"| {label} | {cell('dice')} | {cell('hd95')} | {cell('lesion_f1')} | {100 * agg['empty']['mean']:.0f} % |")
        lines.append("")
        rows = results.get("paired", {}).get(kind, [])
        if rows:
            lines += ["Paired, case by case (held-out case x seed; difference = loss minus baseline, 95 % bootstrap interval, "
                      "Wilcoxon signed-rank p, pairs better/worse):", "",
                      "| loss vs baseline | metric | pairs | difference | interval | p | better/worse |", "|---|---|---|---|---|---|---|"]
            for r in rows:
                digits = 1 if r["metric"] == "hd95" else 3
                lines.append(f"| {r['loss']} vs {r['baseline']} | {r['metric']} | {r['cases']} | {r['difference']:+.{digits}f} | "
                             f"[{r['ci_low']:+.{digits}f}, {r['ci_high']:+.{digits}f}] | {r['p_value']:.3g} | {r['better']}/{r['worse']} |")
            lines.append("")
    (out / "loss_study.md").write_text("\n".join(lines))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(results["datasets"])
    fig, axes = plt.subplots(len(kinds), 3, figsize=(13, 3.6 * len(kinds)), squeeze=False)
    for r, kind in enumerate(kinds):
        table = results["datasets"][kind]
        labels = list(table)
        for c, (key, title) in enumerate((("dice", "Dice ↑"), ("hd95", "HD95 mm ↓"), ("lesion_f1", "lesion F1 ↑"))):
            ax = axes[r][c]
            means = [table[lab][key]["mean"] for lab in labels]
            stds = [table[lab][key]["std"] for lab in labels]
            colors = ["tab:orange" if "boundary" in lab else ("tab:purple" if "noisy" in lab else "tab:blue") for lab in labels]
            ax.barh(range(len(labels)), means, xerr=stds, color=colors, alpha=0.85)
            ax.set_yticks(range(len(labels)))
            ax.set_yticklabels(labels if c == 0 else [""] * len(labels), fontsize=8)
            ax.invert_yaxis()
            ax.set_title(f"{'ISLES-like' if kind == 'isles' else 'WMH-like'}: {title}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "loss_study.png", dpi=90)
    plt.close(fig)
    print("\n".join(lines))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--full", action="store_true", help="the larger version, for a GPU machine")
    group.add_argument("--smoke", action="store_true", help="a tiny run that checks the study works")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("segpipe").setLevel(logging.ERROR)
    log.setLevel(logging.WARNING)
    size = "full" if args.full else ("smoke" if args.smoke else "default")
    t = time.perf_counter()
    results = run(size, args.out, args.device)
    results["seconds"] = round(time.perf_counter() - t, 1)
    write_outputs(results, args.out)
    return results


if __name__ == "__main__":
    main()
