"""``segpipe train``: a 3D U-Net from the plan, trained on cached patches with the scheduled loss.

One epoch = ``train.iterations_per_epoch`` batches from :class:`~segpipe.training.loader.PatchBatches`;
SGD with Nesterov momentum and the poly learning rate (nnU-Net's default) or AdamW; mixed precision on CUDA
(bfloat16, or float16 with a gradient scaler where the GPU only emulates bfloat16); gradient clipping; optional ``torch.compile``; validation by
sliding window on the fold's validation cases every ``train.validate_every`` epochs; ``checkpoint_latest.pt``
after every epoch and ``checkpoint_best.pt`` on improvement, both written atomically. ``--resume`` continues
exactly where the last checkpoint left off (model, optimiser, scaler, epoch, RNG states; the learning rate
and the loss schedule are pure functions of the epoch, and the patches of an epoch are a pure function of
the seed and the epoch). Under ``torchrun`` every rank draws its own patches and only rank 0 writes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from segpipe.config import Config, config_from_dict, config_to_dict
from segpipe.data.cache import CaseCache, has_foreground
from segpipe.errors import SegpipeError, UsageError, did_you_mean
from segpipe.evaluation.metrics import (
    absolute_volume_difference_ml,
    dice,
    hausdorff95,
    lesion_f1,
)
from segpipe.evaluation.protocols import HIGHER_IS_BETTER
from segpipe.inference.sliding import class_argmax, predict_volume
from segpipe.io.atomic import ensure_writable_dir
from segpipe.losses import CompositeLoss, parse_loss_spec, parse_schedule
from segpipe.models import build_network
from segpipe.planning import Plan, load_plan, make_plan
from segpipe.precision import training_precision
from segpipe.progress import track
from segpipe.resources import usable_cores
from segpipe.training.checkpoint import (
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from segpipe.training.distributed import Dist, setup_distributed, teardown_distributed
from segpipe.training.finetune import initial_weights
from segpipe.training.loader import BatchFinisher, PatchBatches, label_values, make_loader
from segpipe.training.runlog import MetricsLog, attach_log_file, plot_progress
from segpipe.transforms.preprocessing import IGNORE_INDEX

__all__ = ["TrainResult", "loader_bound_hint", "loader_workers", "resolve_device", "resolve_train_config", "train"]

log = logging.getLogger(__name__)

# config keys that may change when resuming: they do not change what is being trained
RESUMABLE = ("name", "train.epochs", "train.num_workers", "train.augment_on", "train.log_every", "train.validate_every",
             "train.max_validation_cases", "train.compile", "train.amp", "train.amp_dtype", "train.deterministic", "infer.",
             "train.init_from")  # init_from: a resumed run's weights come from its own checkpoint
#: the validation metrics a best checkpoint can be chosen by (their direction: the evaluation's HIGHER_IS_BETTER)
BEST_METRICS = ("dice", "lesion_f1", "hd95", "avd_ml")
RUN_MARKERS = ("config.yaml", "checkpoint_latest.pt", "metrics.csv", "plan.json")


@dataclass
class TrainResult:
    out: Path
    epochs_run: int = 0
    last_epoch: int = -1
    best_metric: float | None = None
    best_epoch: int | None = None
    history: list[dict[str, Any]] = field(default_factory=list)


class _Diverged(Exception):
    pass


_KEPT = "checkpoint_latest.pt (the last good epoch) is kept"


def loader_workers(setting: int | None, dev: torch.device, world: int = 1) -> int:
    """``train.num_workers``, or for None: 2 on the CPU; on CUDA the usable cores less two (the training
    process and the pinning thread), shared by the processes of this machine (torchrun), at most 12."""
    if setting is not None:
        if setting < 0:
            raise UsageError(f"config 'train.num_workers': expected 0 or more (or null for automatic), got {setting}")
        return setting
    if dev.type != "cuda":
        return 2
    cores = usable_cores()
    local = max(1, min(world, torch.cuda.device_count() or 1))
    return max(1, min(12, (cores - 2) // local))


def loader_bound_hint(wait: float, seconds: float, workers: int, share: float = 0.2) -> str | None:
    """A hint when the training loop spent more than ``share`` of an epoch's training time waiting for batches
    (on a GPU the step runs ahead of the host, so that wait is the loader falling behind), else None."""
    if seconds <= 0 or wait <= share * seconds:
        return None
    return (f"{100 * wait / seconds:.0f} % of the epoch was spent waiting for batches: the loader limits training; "
            f"raise train.num_workers (now {workers}) if the machine has idle cores, keep train.augment_on=auto, or "
            "lower the augmentation's cost (train.augmentation=false to check)")


def _augment_on_device(where: str, dev: torch.device) -> bool:
    """``train.augment_on``: resample rotated and scaled patches on the training device (see training.loader)."""
    return where == "device" or (where == "auto" and dev.type == "cuda")


def resolve_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SegpipeError("--device cuda: no CUDA GPU is visible to PyTorch here; use --device cpu (or auto), or install a CUDA build of torch")
        return torch.device(requested)
    if requested == "cpu":
        return torch.device("cpu")
    raise UsageError(f"--device: expected auto, cpu or cuda[:N], got '{requested}'")


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and k != "options":
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    fa, fb = _flatten(a), _flatten(b)
    return sorted(k for k in set(fa) | set(fb) if fa.get(k) != fb.get(k))


def _cache_config(cache: CaseCache) -> Config | None:
    path = cache.root / "config.yaml"
    return config_from_dict(yaml.safe_load(path.read_text(encoding="utf-8")), str(path)) if path.is_file() else None


def resolve_train_config(cache_root: str | Path, config_path: str | Path | None, overrides: list[str]) -> Config:
    """The config to train with: ``--config`` (checked against the cache's preprocessing), or the config the
    cache was made with; dotted overrides on top either way."""
    from segpipe.config import apply_overrides, load_config

    cache = CaseCache(cache_root)
    cache.read_json("cache.json")  # a clear error when there is no cache
    cached = _cache_config(cache)
    if config_path is not None:
        config = load_config(config_path, overrides)
        if cached is not None:
            diff = [f"preprocess.{k}" for k in _differences(config_to_dict(config.preprocess), config_to_dict(cached.preprocess))]
            if config.data.reference_channel != cached.data.reference_channel:
                diff.append("data.reference_channel")
            if diff:
                raise SegpipeError(
                    f"cache '{cache.root}' was made with other preprocessing settings ({', '.join(diff)} differ from "
                    f"--config); run `segpipe preprocess --config {config_path} --out {cache.root}` again (it redoes only what changed)"
                )
        return config
    if cached is None:
        return load_config(None, overrides)
    return config_from_dict(apply_overrides(config_to_dict(cached), overrides), cached.source)


def _training_plan(cache: CaseCache, config: Config, cached_plan: Plan) -> Plan:
    """The cached plan, or (when the config's ``plan`` section differs from the one the cache was made with)
    a network, patch and batch planned anew on the cached cases at the cache's spacing."""
    cached_cfg = _cache_config(cache)
    if cached_cfg is not None and cached_cfg.plan == config.plan:
        return cached_plan
    index = cache.read_json("cache.json")
    shapes = [cache.meta(c)["shape"] for c in index["cases"]]
    target = list(cached_plan.target_spacing)
    cfg = dataclasses.replace(config, preprocess=dataclasses.replace(config.preprocess, target_spacing=tuple(target)),
                              data=dataclasses.replace(config.data, reference_channel=cached_plan.reference_channel))
    plan = make_plan(cfg, cached_plan.channels, cached_plan.classes, cached_plan.ignore_value, cached_plan.threshold,
                     [target] * len(shapes), shapes)
    keep = cached_plan.preprocessing_key()
    return dataclasses.replace(plan, **{k: (tuple(v) if isinstance(v, list) else v) for k, v in keep.items()})


def _lr(config: Config, epoch: int) -> float:
    t = config.train
    return t.learning_rate * (1 - epoch / max(t.epochs, 1)) ** t.poly_exponent


def _unwrap(net: torch.nn.Module) -> torch.nn.Module:
    net = getattr(net, "module", net)
    return getattr(net, "_orig_mod", net)


def validate(net: torch.nn.Module, cache: CaseCache, case_ids: list[str], plan: Plan, config: Config,
             device: torch.device, amp_dtype: torch.dtype | None) -> dict[str, float]:
    """Sliding-window prediction of whole preprocessed validation cases; mean Dice, HD95 (mm), lesion F1,
    absolute volume difference (ml) of the foreground (all foreground classes together)."""
    scores: dict[str, list[float]] = {"dice": [], "hd95": [], "lesion_f1": [], "avd_ml": []}
    for cid in case_ids:
        case = cache.load(cid)
        probs = predict_volume(_unwrap(net), torch.from_numpy(np.array(case.image)), plan.patch_size, overlap=config.infer.overlap,
                               sw_batch_size=config.infer.sw_batch_size, device=device, tta=False, amp_dtype=amp_dtype)
        pred = class_argmax(probs).numpy()
        label = np.asarray(case.label)
        valid = label != IGNORE_INDEX
        gt = (label > 0) & valid
        pr = (pred > 0) & valid
        voxel_ml = float(np.prod(case.spacing)) / 1000.0
        scores["dice"].append(dice(gt, pr))
        scores["hd95"].append(hausdorff95(gt, pr, case.spacing, inplane=False))
        scores["lesion_f1"].append(lesion_f1(gt, pr))
        scores["avd_ml"].append(absolute_volume_difference_ml(gt, pr, voxel_ml))
    return {k: (float(np.nanmean(v)) if v and not all(math.isnan(x) for x in v) else math.nan) for k, v in scores.items()}


def _prepare_run_folder(out: Path, resume: bool, overwrite: bool, is_main: bool) -> None:
    checkpoint = (out / "checkpoint_latest.pt").is_file()
    is_run = any((out / m).exists() for m in RUN_MARKERS)
    if out.exists() and any(out.iterdir()) and not resume:
        if not overwrite:
            if is_run and not checkpoint:
                raise SegpipeError(f"--out '{out}': a run that stopped before its first epoch ended (no checkpoint) is there; pass "
                                   "--overwrite to start it over, or choose another --out")
            raise SegpipeError(f"--out '{out}': a run folder already exists there; pass --resume to continue it or --overwrite to start over")
        if not is_run:
            raise SegpipeError(f"--out '{out}': not empty and not a segpipe run folder; --overwrite only replaces run folders, choose another --out")
        if is_main:
            shutil.rmtree(out)
    if resume and not checkpoint:
        if is_run:
            raise SegpipeError(f"--resume: no checkpoint_latest.pt in '{out}': the run stopped before its first epoch ended, so there is "
                               "nothing to continue; start it over with --overwrite")
        raise SegpipeError(f"--resume: no checkpoint_latest.pt in '{out}'; start the run without --resume")
    if is_main:
        ensure_writable_dir(out, what="--out run folder")


#: what a start writes into its run folder before the first checkpoint (removed again when it fails that early)
_FIRST_FILES = ("config.yaml", "plan.json", "train.log", "metrics.csv", "progress.png", "tensorboard")


def _discard_unfinished(out: Path) -> None:
    """A fresh run that failed before its first checkpoint leaves no folder behind: nothing in it could be
    resumed, and a half-made run would stand in the way of the next start."""
    if (out / "checkpoint_latest.pt").exists():
        return
    for name in _FIRST_FILES:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists():
            path.unlink(missing_ok=True)
    try:
        out.rmdir()  # only when empty: nothing of the user's is removed
    except OSError:
        pass


def train(
    config: Config,
    cache_root: str | Path,
    out: str | Path,
    *,
    fold: str = "0",
    resume: bool = False,
    overwrite: bool = False,
    device: str = "auto",
) -> TrainResult:
    """Train; see the module docstring. Raises :class:`SegpipeError` for every user-facing problem."""
    dev = resolve_device(device)
    dist = setup_distributed(dev.type)
    if dist.enabled and dev.type == "cuda":
        dev = torch.device("cuda", dist.local_rank)
    try:
        return _train(config, Path(cache_root), Path(out), fold, resume, overwrite, dev, dist)
    finally:
        teardown_distributed(dist)


def _train(config: Config, cache_root: Path, out: Path, fold: str, resume: bool, overwrite: bool, dev: torch.device, dist: Dist) -> TrainResult:
    cache = CaseCache(cache_root)
    index = cache.read_json("cache.json")
    cached_plan = load_plan(cache.plan_path)
    try:
        spec = parse_loss_spec(config.loss.spec)
        schedule = parse_schedule(config.loss.schedule)
    except ValueError as exc:
        raise UsageError(f"--loss/--schedule: {exc}") from None
    plan = _training_plan(cache, config, cached_plan)
    folds = index["folds"]
    cases = index["cases"]
    if fold == "all":
        train_ids, val_ids = list(cases), []
    else:
        try:
            f = int(fold)
        except ValueError:
            raise UsageError(f"--fold: expected a fold number 0..{len(folds) - 1} or 'all', got '{fold}'") from None
        if not 0 <= f < len(folds):
            raise UsageError(f"--fold: the cache has {len(folds)} folds (0..{len(folds) - 1}), got {f}; or use --fold all")
        val_ids = list(folds[f])
        train_ids = [c for c in cases if c not in set(val_ids)]
    if not train_ids:
        raise SegpipeError(f"fold {fold}: no training cases left (the cache has {len(cases)} cases); use --fold all to train on every case")
    if not any(has_foreground(cache.meta(c)) for c in train_ids):
        raise SegpipeError(f"fold {fold}: none of the {len(train_ids)} training cases has a lesion voxel in the cache, so there is "
                           f"nothing to learn; check the labels (`segpipe inspect {cache_root}`): e.g. masks stored as probabilities "
                           "below label.threshold, or scaled by a header factor")
    if config.train.best_metric not in BEST_METRICS:
        raise UsageError(f"config 'train.best_metric': expected one of {', '.join(BEST_METRICS)}, got '{config.train.best_metric}'"
                         f"{did_you_mean(config.train.best_metric, BEST_METRICS)}")
    workers = loader_workers(config.train.num_workers, dev, dist.world)  # checked before anything is written
    init = None
    if config.train.init_from and not resume:  # a resumed run's weights come from its own checkpoint
        init, _, plan = initial_weights(config.train.init_from, plan)

    _prepare_run_folder(out, resume, overwrite, dist.is_main)
    dist.barrier()
    resolved = config_to_dict(config)
    start_epoch, best, best_epoch = 0, None, None
    ckpt = None
    if resume:
        ckpt = load_checkpoint(out / "checkpoint_latest.pt", map_location="cpu")
        old = ckpt["config"]
        diff = [k for k in _differences(old, resolved) if not any(k == r or (r.endswith(".") and k.startswith(r)) for r in RESUMABLE)]
        if ckpt.get("fold") != str(fold):
            diff.append(f"fold ({ckpt.get('fold')} -> {fold})")
        if diff:
            raise SegpipeError(f"--resume: the config differs from the run's in ways that change the training: {', '.join(diff)}; "
                               "resume with the run's config.yaml, or start a new run")
        plan = Plan.from_json(ckpt["plan"])
        start_epoch = int(ckpt["epoch"]) + 1
        best, best_epoch = ckpt.get("best_metric"), ckpt.get("best_epoch")

    t = config.train
    if t.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=False)
        torch.backends.cudnn.benchmark = False
    elif dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(t.seed)
    np.random.seed(t.seed)

    log_handler = attach_log_file(out / "train.log") if dist.is_main else None
    try:
        if dist.is_main:
            (out / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False), encoding="utf-8")
            (out / "plan.json").write_text(json.dumps(plan.to_json(), indent=2), encoding="utf-8")
        net: torch.nn.Module = build_network(plan)
        if init is not None:
            net.load_state_dict(init, strict=False)
        net = net.to(dev)
        if t.optimizer == "sgd":
            opt = torch.optim.SGD(net.parameters(), lr=t.learning_rate, momentum=t.momentum, nesterov=True, weight_decay=t.weight_decay)
        else:
            opt = torch.optim.AdamW(net.parameters(), lr=t.learning_rate, weight_decay=t.weight_decay)
        use_amp = t.amp and dev.type == "cuda"
        # bfloat16, or float16 with a gradient scaler where the GPU only emulates bfloat16 (V100, T4)
        amp_dtype, scaler = training_precision(dev, use_amp, t.amp_dtype, announce=dist.is_main)
        if t.amp and dev.type != "cuda" and dist.is_main:
            log.info("mixed precision is for CUDA GPUs: training in float32 on %s", dev.type)
        if ckpt is not None:
            net.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
            if ckpt.get("scaler"):
                scaler.load_state_dict(ckpt["scaler"])
            set_rng_state(ckpt["rng"])
        model: torch.nn.Module = net
        if dist.enabled:
            model = torch.nn.parallel.DistributedDataParallel(net, device_ids=[dev.index] if dev.type == "cuda" else None)
        if t.compile:
            model = torch.compile(model)
        ignore = IGNORE_INDEX if plan.ignore_value is not None else None
        loss_fn = CompositeLoss(spec, schedule, num_classes=plan.num_classes, ignore_index=ignore,
                                options=config.loss.options, ds_boundary=config.loss.ds_boundary)
        values = label_values(plan)
        data = PatchBatches(cache.root, train_ids, plan.patch_size, plan.batch_size, batches=t.iterations_per_epoch,
                            foreground_fraction=t.foreground_fraction, augment=t.augmentation, seed=t.seed, rank=dist.rank,
                            with_sdm=loss_fn.needs_sdm, defer_affine=_augment_on_device(t.augment_on, dev), label_values=values)
        loader = make_loader(data, num_workers=workers, pin_memory=dev.type == "cuda")
        finish = BatchFinisher(plan.patch_size, augment=t.augmentation, label_values=values)
        terms = [term.name for term in spec.terms]
        columns = ["epoch", "lr", "loss", *terms, "regional_weight", "boundary_weight",
                   "val_dice", "val_hd95", "val_lesion_f1", "val_avd_ml", "epoch_seconds", "loader_wait_seconds", "val_seconds"]
        metrics = MetricsLog(out / "metrics.csv", columns)
        if resume and dist.is_main:
            metrics.truncate_after(start_epoch - 1)
        tb = _tensorboard(out) if dist.is_main else None
        if dist.is_main:
            log.info("training fold %s: %d training and %d validation cases, patch %s, batch %d, %s under %s, on %s%s, "
                     "%d loader workers%s", fold, len(train_ids), len(val_ids), "x".join(map(str, plan.patch_size)), plan.batch_size,
                     spec, schedule, dev, f" x {dist.world} processes" if dist.enabled else "", workers,
                     " (rotation/zoom resampled on the device)" if data.defer_affine else "")
        result = TrainResult(out, best_metric=best, best_epoch=best_epoch)
        higher = HIGHER_IS_BETTER[t.best_metric]
        warned = False
        for epoch in range(start_epoch, t.epochs):
            t0 = time.perf_counter()
            lr = _lr(config, epoch)
            for g in opt.param_groups:
                g["lr"] = lr
            data.set_epoch(epoch)
            model.train()
            sums = torch.zeros(len(terms) + 1, device=dev, dtype=torch.float64)
            steps = 0
            first = epoch == start_epoch
            iterator = track(loader, f"epoch {epoch}", total=t.iterations_per_epoch, enabled=dist.is_main)
            wait, t_wait = 0.0, time.perf_counter()  # time spent waiting for batches: is the loader the limit?
            for it, batch in enumerate(iterator):
                wait += time.perf_counter() - t_wait
                tb_batch = finish(batch, dev)
                image = tb_batch.pop("image")
                opt.zero_grad(set_to_none=True)
                try:
                    with torch.autocast(dev.type, dtype=amp_dtype) if use_amp else nullcontext():
                        outputs = model(image)
                    try:
                        total, values = loss_fn(outputs, tb_batch, epoch, validate=first and it == 0)
                    except ValueError as exc:  # the first batch is checked in full: damaged cache entries
                        raise SegpipeError(
                            f"epoch {epoch}, iteration {it}: the loss's input check failed ({exc}); the cache may be damaged: "
                            "look at it with `segpipe inspect`, or make it again with `segpipe preprocess`"
                        ) from None
                    scaler.scale(total).backward()
                    scaler.unscale_(opt)
                    torch.nn.utils.clip_grad_norm_(net.parameters(), t.grad_clip)
                    scaler.step(opt)
                    scaler.update()
                except torch.cuda.OutOfMemoryError:
                    raise SegpipeError(
                        f"CUDA out of memory at patch {'x'.join(map(str, plan.patch_size))}, batch {plan.batch_size}: lower "
                        "plan.batch_size or plan.patch_size (e.g. `plan.batch_size=1`), or keep train.amp=true"
                    ) from None
                row = torch.stack([total.detach().double(), *[values[n].double() for n in terms]])
                sums += row
                steps += 1
                if dev.type == "cpu" or (it + 1) % max(t.log_every, 1) == 0:
                    _check_finite(row, terms, epoch, it)
                t_wait = time.perf_counter()
            train_seconds = time.perf_counter() - t0
            dist.all_reduce_sum(sums)
            steps_all = steps * dist.world
            means = (sums / max(steps_all, 1)).tolist()
            _check_finite(torch.tensor(means), terms, epoch, steps - 1)
            r_w, b_w = schedule.weights(epoch)
            record: dict[str, Any] = {"epoch": epoch, "lr": lr, "loss": means[0], **dict(zip(terms, means[1:])),
                                      "regional_weight": r_w, "boundary_weight": b_w, "loader_wait_seconds": wait}
            hint = loader_bound_hint(wait, train_seconds, workers) if dev.type == "cuda" and not first else None
            if hint and dist.is_main and not warned:
                log.warning("epoch %d: %s", epoch, hint)
                warned = True
            is_last = epoch == t.epochs - 1
            improved = False
            if val_ids and ((epoch + 1) % max(t.validate_every, 1) == 0 or is_last):
                if dist.is_main:
                    chosen = val_ids[: t.max_validation_cases] if t.max_validation_cases > 0 else val_ids
                    t_val = time.perf_counter()
                    v = validate(model, cache, chosen, plan, config, dev, amp_dtype)
                    record.update({f"val_{k}": x for k, x in v.items()})
                    record["val_seconds"] = time.perf_counter() - t_val  # its share of the epoch: see validate_every
                    score = v[t.best_metric]
                    if not math.isnan(score) and (best is None or (score > best if higher else score < best)):
                        best, best_epoch, improved = score, epoch, True
                dist.barrier()
            record["epoch_seconds"] = time.perf_counter() - t0
            if dist.is_main:
                metrics.append(record)
                payload = {
                    "model": net.state_dict(), "optimizer": opt.state_dict(), "scaler": scaler.state_dict() if scaler.is_enabled() else {},
                    "epoch": epoch, "fold": str(fold), "training_cases": train_ids, "validation_cases": val_ids,
                    "config": resolved, "plan": plan.to_json(), "schedule": schedule.to_json(),
                    "loss_spec": str(spec), "best_metric": best, "best_epoch": best_epoch, "best_metric_name": t.best_metric,
                    "rng": rng_state(), "world_size": dist.world,
                }
                save_checkpoint(out / "checkpoint_latest.pt", payload)
                if improved:
                    save_checkpoint(out / "checkpoint_best.pt", payload)
                plot_progress(metrics, out / "progress.png", terms)
                if tb is not None:
                    for k, x in record.items():
                        if k != "epoch" and isinstance(x, float) and not math.isnan(x):
                            tb.add_scalar(k, x, epoch)
                    tb.flush()
                val_txt = f", val dice {record['val_dice']:.3f} ({record['val_seconds']:.1f} s)" if "val_dice" in record else ""
                log.info("epoch %d: loss %.4f (%s), weights %.2f/%.2f%s, %.1f s", epoch, means[0],
                         ", ".join(f"{n} {x:.4f}" for n, x in zip(terms, means[1:])), r_w, b_w, val_txt, record["epoch_seconds"])
            result.history.append(record)
            result.epochs_run += 1
            result.last_epoch = epoch
            result.best_metric, result.best_epoch = best, best_epoch
            dist.barrier()
        if dist.is_main and not (out / "checkpoint_best.pt").exists() and (out / "checkpoint_latest.pt").exists():
            shutil.copyfile(out / "checkpoint_latest.pt", out / "checkpoint_best.pt")  # no validation: the last is the best known
        if tb is not None:
            tb.close()
        return result
    except BaseException as exc:
        unfinished = dist.is_main and not resume and not (out / "checkpoint_latest.pt").exists()
        if unfinished:
            _detach_log(log_handler)  # closed before its file is removed
            log_handler = None
            _discard_unfinished(out)
        if isinstance(exc, _Diverged):
            msg = str(exc)
            raise SegpipeError(msg.replace(_KEPT, "no epoch had ended, so the run folder is removed") if unfinished else msg) from None
        raise
    finally:
        _detach_log(log_handler)


def _detach_log(handler: logging.Handler | None) -> None:
    if handler is not None:
        logging.getLogger("segpipe").removeHandler(handler)
        handler.close()


def _check_finite(row: torch.Tensor, terms: list[str], epoch: int, it: int) -> None:
    values = row.detach().cpu().tolist()
    if all(math.isfinite(v) for v in values):
        return
    bad = [n for n, v in zip(terms, values[1:]) if not math.isfinite(v)] or ["the total"]
    raise _Diverged(
        f"training diverged at epoch {epoch}, iteration {it}: the loss term(s) {', '.join(bad)} became NaN or infinite; "
        f"{_KEPT}; lower train.learning_rate, or check the cache with `segpipe inspect`"
    )


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard is optional
        return None
    return SummaryWriter(str(out / "tensorboard"))
