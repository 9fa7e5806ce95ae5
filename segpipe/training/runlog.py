"""The run folder's records: ``metrics.csv``, ``progress.png``, TensorBoard events, ``train.log``."""

from __future__ import annotations

import csv
import io
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from segpipe.io.atomic import atomic_path, atomic_write_text
from segpipe.planning import describe_normalization

__all__ = ["MetricsLog", "attach_log_file", "is_run_folder", "plot_progress", "summarize_model", "summarize_run"]

log = logging.getLogger(__name__)


class MetricsLog:
    """``metrics.csv``: one row per epoch, a fixed set of columns for the run."""

    def __init__(self, path: Path, columns: Sequence[str]) -> None:
        self.path = path
        self.columns = list(columns)

    def rows(self) -> list[dict[str, str]]:
        if not self.path.is_file():
            return []
        with open(self.path, newline="") as fh:
            return list(csv.DictReader(fh))

    def truncate_after(self, epoch: int) -> None:
        """Drop rows of epochs after ``epoch`` (written before an interruption that lost their checkpoint)."""
        keep = [r for r in self.rows() if int(r["epoch"]) <= epoch]
        self._write(keep)

    def append(self, row: dict[str, Any]) -> None:
        rows = self.rows()
        rows.append({c: _fmt(row.get(c)) for c in self.columns})
        self._write(rows)

    def _write(self, rows: list[dict[str, Any]]) -> None:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self.columns, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow(r)
        atomic_write_text(self.path, buf.getvalue())


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.6g}"
    return str(v)


def _num(v: str) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def plot_progress(metrics: MetricsLog, out: Path, terms: Sequence[str]) -> None:
    """Loss terms, the schedule's weights and the validation Dice over epochs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = metrics.rows()
    if not rows:
        return
    ep = [int(r["epoch"]) for r in rows]
    fig, axes = plt.subplots(3, 1, figsize=(7, 8), sharex=True)
    for name in ["loss", *terms]:
        axes[0].plot(ep, [_num(r.get(name, "")) for r in rows], label=name, lw=2 if name == "loss" else 1)
    axes[0].set_ylabel("training loss")
    axes[0].legend(fontsize=8)
    axes[1].plot(ep, [_num(r.get("regional_weight", "")) for r in rows], label="regional weight")
    axes[1].plot(ep, [_num(r.get("boundary_weight", "")) for r in rows], label="boundary weight")
    axes[1].set_ylabel("schedule")
    axes[1].legend(fontsize=8)
    val = [(e, _num(r.get("val_dice", ""))) for e, r in zip(ep, rows) if not math.isnan(_num(r.get("val_dice", "")))]
    if val:
        axes[2].plot([v[0] for v in val], [v[1] for v in val], "o-", label="validation Dice")
        f1 = [(e, _num(r.get("val_lesion_f1", ""))) for e, r in zip(ep, rows) if not math.isnan(_num(r.get("val_lesion_f1", "")))]
        axes[2].plot([v[0] for v in f1], [v[1] for v in f1], "s--", label="validation lesion F1")
        axes[2].legend(fontsize=8)
    axes[2].set_ylabel("validation")
    axes[2].set_xlabel("epoch")
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)


def attach_log_file(path: Path) -> logging.Handler:
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("segpipe").addHandler(handler)
    if logging.getLogger("segpipe").level > logging.INFO or logging.getLogger("segpipe").level == logging.NOTSET:
        logging.getLogger("segpipe").setLevel(logging.INFO)
    return handler


def is_run_folder(folder: str | Path) -> bool:
    folder = Path(folder)
    return folder.is_dir() and (folder / "metrics.csv").is_file() and (folder / "config.yaml").is_file()


def summarize_run(folder: str | Path, last: int = 10) -> str:
    """A run folder in a few lines, for a terminal (where ``progress.png`` cannot be looked at): the fold and
    its cases, loss and schedule, progress, the best validation score, and the last epochs of ``metrics.csv``."""
    import yaml

    from segpipe.errors import SegpipeError
    from segpipe.training.checkpoint import CHECKPOINT_NAMES, file_sha256, load_checkpoint

    folder = Path(folder)
    if not is_run_folder(folder):
        raise SegpipeError(f"run folder '{folder}': no metrics.csv and config.yaml; give the --out folder of `segpipe train`")
    try:
        config = yaml.safe_load((folder / "config.yaml").read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise SegpipeError(f"run folder '{folder}': config.yaml cannot be read ({exc})") from None
    train, loss = config.get("train", {}), config.get("loss", {})
    rows = MetricsLog(folder / "metrics.csv", []).rows()
    lines = []
    latest = folder / "checkpoint_latest.pt"
    ckpt = load_checkpoint(latest, mmap=True) if latest.is_file() else {}  # its metadata: the weights stay on disk
    fold = ckpt.get("fold", "?")
    held = ckpt.get("validation_cases")
    cases = (f" ({len(ckpt['training_cases'])} training, {len(held)} validation cases)"
             if isinstance(held, list) and isinstance(ckpt.get("training_cases"), list) else "")
    done = len(rows)
    total = train.get("epochs", "?")
    state = "finished" if isinstance(total, int) and done >= total else "running or stopped: --resume continues it"
    lines.append(f"run {folder}: fold {fold}{cases}, {loss.get('spec', '?')} under {loss.get('schedule', '?')}; "
                 f"{done} of {total} epochs ({state})")
    plan = ckpt.get("plan") or {}
    network = plan.get("network") or {}
    if plan:
        residual = f", residual encoder {network['encoder_blocks']}" if network.get("encoder_blocks") else ""
        lines.append(f"network: features {network.get('filters')}{residual}, patch {'x'.join(map(str, plan.get('patch_size', [])))}, "
                     f"batch {plan.get('batch_size')}, {train.get('optimizer', '?')} lr {train.get('learning_rate', '?')}"
                     + (f"; fine-tuned from {train['init_from']}" if train.get("init_from") else ""))
    if ckpt.get("best_metric") is not None:
        lines.append(f"best validation {ckpt.get('best_metric_name', 'score')} {ckpt['best_metric']:.4f} at epoch {ckpt.get('best_epoch')} "
                     "(checkpoint_best.pt)")
    model = next((folder / n for n in CHECKPOINT_NAMES if (folder / n).is_file()), None)
    if model is not None:  # what `segpipe infer --model` takes from the folder; its results record this digest
        lines.append(f"model for `segpipe infer`: {model.name}, sha256 {file_sha256(model)}")
    if rows:
        cols = [c for c in ("epoch", "lr", "loss", "regional_weight", "boundary_weight", "val_dice", "val_hd95", "val_lesion_f1",
                            "epoch_seconds", "val_seconds") if c in rows[0]]
        widths = [max(8, len(c)) for c in cols]
        lines += ["", "  ".join(c.rjust(w) for c, w in zip(cols, widths))]
        for r in rows[-last:]:
            lines.append("  ".join(_short(r.get(c, "")).rjust(w) for c, w in zip(cols, widths)))
    return "\n".join(lines)


def summarize_model(model: str | Path) -> str:
    """What ``segpipe infer --model MODEL`` would run, for whoever deploys it (a checkpoint baked into a
    container says nothing by its path): each checkpoint's SHA-256 (the value the DICOM SEG and SR record),
    fold, training progress and best validation score; then the channels and classes it expects, the
    preprocessing, the network, the loss, and the inference settings it brings. ``model``: a checkpoint, a
    run folder, or a folder of the folds' runs (an ensemble), as ``--model`` takes them."""
    from segpipe.errors import SegpipeError
    from segpipe.inference.predictor import resolve_model_paths
    from segpipe.training.checkpoint import file_sha256, load_checkpoint

    try:
        paths = resolve_model_paths([model])
    except SegpipeError as exc:
        raise SegpipeError(f"{exc} (`segpipe infer` would refuse it too)") from None
    ckpts = [load_checkpoint(p, mmap=True) for p in paths]  # the metadata: the weights stay on disk
    root = Path(model) if Path(model).is_dir() else Path(model).parent
    kind = f"an ensemble of {len(paths)} checkpoints (the folds of one cross-validation)" if len(paths) > 1 else "one checkpoint"
    lines = [f"model {model}: {kind}"]

    def shown(p: Path) -> Path:
        return p.relative_to(root) if p.is_relative_to(root) else p

    for path, ckpt in zip(paths, ckpts):
        epochs = (ckpt.get("config") or {}).get("train", {}).get("epochs", "?")
        held, trained = ckpt.get("validation_cases"), ckpt.get("training_cases")
        cases = f", {len(trained)} training / {len(held)} held-out cases" if isinstance(held, list) and isinstance(trained, list) else ""
        best = (f", best validation {ckpt.get('best_metric_name', 'score')} {ckpt['best_metric']:.4f} at epoch {ckpt.get('best_epoch')}"
                if isinstance(ckpt.get("best_metric"), float) and not math.isnan(ckpt["best_metric"]) else "")
        done = ckpt["epoch"] + 1 if isinstance(ckpt.get("epoch"), int) else "?"  # epochs count from 0, as in metrics.csv
        lines.append(f"  {shown(path)}: fold {ckpt.get('fold', '?')}, saved after {done} of {epochs} epochs{cases}{best}")
        lines.append(f"    sha256 {file_sha256(path)}, {path.stat().st_size / 1e6:.1f} MB")
    plan, config = ckpts[0].get("plan") or {}, ckpts[0].get("config") or {}
    differ = [str(shown(p)) for p, c in zip(paths[1:], ckpts[1:])
              if (c.get("plan") or {}).get("channels") != plan.get("channels") or (c.get("plan") or {}).get("classes") != plan.get("classes")]
    if differ:
        lines.append(f"  warning: {', '.join(differ)} expect other channels or classes than the first: `segpipe infer` refuses the ensemble")
    network = plan.get("network") or {}
    spacing = "x".join(f"{v:g}" for v in plan.get("target_spacing", []))
    lines.append(f"channels {', '.join(plan.get('channels', []))} (reference {plan.get('reference_channel')}); "
                 f"classes {', '.join(plan.get('classes', []))}" + (f"; label {plan['ignore_value']} ignored" if plan.get("ignore_value") is not None else ""))
    lines.append(f"preprocessing: {spacing} mm, {plan.get('orientation')}, {plan.get('image_interpolation')} interpolation, "
                 f"{describe_normalization(plan)}")
    residual = f", residual encoder {network['encoder_blocks']}" if network.get("encoder_blocks") else ""
    lines.append(f"network: {len(network.get('filters', []))} stages, features {network.get('filters')}{residual}, "
                 f"patch {'x'.join(map(str, plan.get('patch_size', [])))}, batch {plan.get('batch_size')}")
    loss = config.get("loss") or {}
    schedule = ckpts[0].get("schedule") or {}
    params = ", ".join(f"{k}={v}" for k, v in (schedule.get("params") or {}).items())
    lines.append(f"trained with {ckpts[0].get('loss_spec', loss.get('spec', '?'))} under "
                 f"{schedule.get('name', loss.get('schedule', '?'))}{f'({params})' if params else ''}")
    icfg = config.get("infer") or {}
    if icfg:
        rules = f", DICOM series rules for {', '.join(icfg['dicom_rules'])}" if icfg.get("dicom_rules") else ""
        lines.append(f"inference defaults: TTA {'on' if icfg.get('tta') else 'off'}, overlap {icfg.get('overlap')}, "
                     + (f"lesions under {icfg['min_lesion_mm3']:g} mm^3 removed" if icfg.get("min_lesion_mm3") else "no lesion removed by size")
                     + rules)
    return "\n".join(lines)


def _short(v: str) -> str:
    try:
        f = float(v)
    except ValueError:
        return v or "-"
    return "-" if math.isnan(f) else f"{f:.4g}"
