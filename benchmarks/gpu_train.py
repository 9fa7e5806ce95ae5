"""Training speed on a GPU: the full pipeline against the bare model step, in one run.

(a) the full pipeline iteration, as ``segpipe train`` runs it: patches from a memory-mapped cache through the
    DataLoader (workers, augmentation; rotated/scaled patches resampled on the GPU, ``train.augment_on``,
    and, compiled, also all in the workers for comparison), transfer, forward with deep supervision,
    dice+boundary under the schedule, backward, clipping, SGD step;
(b) the bare model step with the same settings on random tensors already on the GPU.
Batch 2, patch 128^3, 2 channels, DynUNet planned for 1 mm isotropic data (6 stages, 32..320 features),
bfloat16 autocast, with and without ``torch.compile``. Goals: (a)/(b) <= 1.10 and (a) <= 45 ms on an H200.
Also an nnU-Net-style epoch: 250 training iterations plus 50 validation-loss iterations (nnU-Net v2.8.1's
benchmark trainer takes 19.6 s for this on an H200, 11.7 s of it GPU time; goal <= 12 s).

    python -m benchmarks.gpu_train [--out results.json] [--workers 14] [--iters 60] [--compile both|on|off]
    (CPU smoke run, as CI runs it: --device cpu --patch 32 --iters 2 --warmup 1 --epoch-iters 2 --val-iters 2 --workers 1
     --compile off --case-shape 48 48 48)
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from benchmarks._common import machine
from benchmarks.loader import make_cache
from segpipe.config import load_config
from segpipe.data.cache import CaseCache
from segpipe.losses import CompositeLoss
from segpipe.models import build_network
from segpipe.planning import make_plan
from segpipe.precision import autocast_dtype
from segpipe.training.loader import BatchFinisher, PatchBatches, make_loader
from segpipe.training.trainer import validate

CASES = ["a", "b", "c", "d"]
VAL_WORKERS = 3  # unaugmented validation patches are cheap: a few workers keep up


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _plan(patch: int):
    cfg = load_config(None, [f"plan.patch_size=[{patch},{patch},{patch}]", "plan.batch_size=2"])
    return cfg, make_plan(cfg, ("t1", "flair"), ("background", "lesion"), None, 0.5, [(1, 1, 1)], [(160, 192, 160)])


def validation_seconds_per_case(net: torch.nn.Module, cache: Path, patch: int, dev: torch.device) -> float:
    """The trainer's validation (sliding window over a whole case, 160x192x160 by default, overlap 0.5, no TTA, then Dice,
    HD95, lesion F1, volume difference on the CPU), per case: what ``train.validate_every`` costs an epoch."""
    cfg, plan = _plan(patch)
    amp = autocast_dtype(dev)  # what the trainer computes in
    validate(net, CaseCache(cache), CASES[:1], plan, cfg, dev, amp)  # warm-up
    _sync(dev)
    t = time.perf_counter()
    validate(net, CaseCache(cache), CASES, plan, cfg, dev, amp)
    _sync(dev)
    return (time.perf_counter() - t) / len(CASES)


def _setup(patch: int, dev: torch.device, compile_net: bool, channels_last: bool):
    _, plan = _plan(patch)
    torch.manual_seed(0)
    net = build_network(plan).to(dev)
    if channels_last:
        net = net.to(memory_format=torch.channels_last_3d)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.99, nesterov=True, weight_decay=3e-5)
    loss_fn = CompositeLoss("dice+boundary", "rebalance", num_classes=2)
    model = torch.compile(net) if compile_net else net
    return net, model, opt, loss_fn


def _step(setup, image, batch, dev, amp: bool):
    net, model, opt, loss_fn = setup
    opt.zero_grad(set_to_none=True)
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
        out = model(image)
    total, _ = loss_fn(out, batch, 30)
    total.backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), 12.0)
    opt.step()
    return total


def _eval_step(setup, image, batch, dev, amp: bool) -> None:
    _, model, _, loss_fn = setup
    with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
        out = model(image)
    loss_fn(out, batch, 30)


def bare_step_ms(setup, patch: int, dev: torch.device, iters: int, warmup: int, channels_last: bool) -> float:
    g = torch.Generator(device="cpu").manual_seed(0)
    image = torch.randn(2, 2, patch, patch, patch, generator=g).to(dev)
    if channels_last:
        image = image.contiguous(memory_format=torch.channels_last_3d)
    label = (torch.rand(2, 1, patch, patch, patch, generator=g) > 0.97).long().to(dev)
    sdm = torch.randn(2, 1, patch, patch, patch, generator=g).to(dev)
    batch = {"label": label, "sdm": sdm}
    amp = dev.type == "cuda"
    for _ in range(warmup):
        _step(setup, image, batch, dev, amp)
    _sync(dev)
    t = time.perf_counter()
    for _ in range(iters):
        _step(setup, image, batch, dev, amp)
    _sync(dev)
    return 1000 * (time.perf_counter() - t) / iters


def _batches(cache: Path, patch: int, workers: int, dev: torch.device, batches: int, *, augment: bool, on_device: bool, seed: int):
    """Finished batches on ``dev``, as the trainer makes them (train.augment_on: device or workers)."""
    data = PatchBatches(cache, CASES, (patch,) * 3, 2, batches=batches, augment=augment, seed=seed, defer_affine=on_device,
                        label_values=(1,))
    finish = BatchFinisher((patch,) * 3, augment=augment, label_values=(1,))  # as the trainer: no read of the label's values
    for batch in make_loader(data, num_workers=workers, pin_memory=dev.type == "cuda"):
        yield finish(batch, dev)


def pipeline(setup, cache: Path, patch: int, dev: torch.device, iters: int, warmup: int, workers: int, epoch_iters: int,
             val_iters: int, on_device: bool, channels_last: bool) -> dict:
    """(a): training iterations fed by the loader; then an nnU-Net-style epoch, whose validation-loss iterations
    draw unaugmented patches from a loader of their own (as nnU-Net's do)."""
    net = setup[0]
    amp = dev.type == "cuda"
    train_it = _batches(cache, patch, workers, dev, warmup + iters + epoch_iters, augment=True, on_device=on_device, seed=0)
    val_it = _batches(cache, patch, VAL_WORKERS, dev, val_iters + 1, augment=False, on_device=False, seed=1)

    def split(b):
        image = b.pop("image")
        return (image.contiguous(memory_format=torch.channels_last_3d) if channels_last else image), b

    for _ in range(warmup):
        _step(setup, *split(next(train_it)), dev, amp)
    net.eval()  # the evaluation graph is compiled here, not inside the timed epoch (nnU-Net's figure is a later epoch)
    _eval_step(setup, *split(next(val_it)), dev, amp)
    net.train()
    _sync(dev)
    t = time.perf_counter()
    for _ in range(iters):
        _step(setup, *split(next(train_it)), dev, amp)
    _sync(dev)
    per_iter = 1000 * (time.perf_counter() - t) / iters
    t = time.perf_counter()
    for _ in range(epoch_iters):
        _step(setup, *split(next(train_it)), dev, amp)
    net.eval()
    for _ in range(val_iters):
        _eval_step(setup, *split(next(val_it)), dev, amp)
    net.train()
    _sync(dev)
    return {"pipeline_ms": per_iter, "epoch_s": time.perf_counter() - t}


def loader_only_ms(cache: Path, patch: int, workers: int, dev: torch.device, on_device: bool, batches: int = 80) -> float:
    """The loader by itself (workers, augmentation, pinned memory, the device's share): the floor under (a)."""
    it = _batches(cache, patch, workers, dev, batches + 10, augment=True, on_device=on_device, seed=2)
    for _ in range(10):  # workers start and fill their queues
        next(it)
    _sync(dev)
    t = time.perf_counter()
    for _ in range(batches):
        next(it)
    _sync(dev)
    return 1000 * (time.perf_counter() - t) / batches


def host_syncs(cache: Path, patch: int, workers: int, dev: torch.device, iters: int = 20) -> float:
    """Synchronisations of the host with the GPU per training iteration (PyTorch's sync debug mode): each one
    stops the host from queueing the next step ahead, so the GPU idles while Python catches up."""
    import warnings

    setup = _setup(patch, dev, False, False)
    it = _batches(cache, patch, workers, dev, iters + 3, augment=True, on_device=True, seed=3)
    for _ in range(3):
        b = next(it)
        _step(setup, b.pop("image"), b, dev, True)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(iters):
                b = next(it)
                _step(setup, b.pop("image"), b, dev, True)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    for w in {f"{w.filename}:{w.lineno}" for w in syncs}:
        print("  sync at", w, flush=True)
    return len(syncs) / iters


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--patch", type=int, default=128)
    ap.add_argument("--iters", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=15)
    ap.add_argument("--workers", type=int, default=14)
    ap.add_argument("--epoch-iters", type=int, default=250)
    ap.add_argument("--val-iters", type=int, default=50)
    ap.add_argument("--compile", choices=["both", "on", "off"], default="both")
    ap.add_argument("--channels-last", action="store_true", help="channels-last 3D layout (slower eagerly on an H200: 96 vs 73 ms)")
    ap.add_argument("--case-shape", type=int, nargs=3, default=(160, 192, 160),
                    help="size of the cached cases (a CPU smoke run: 48 48 48, so that validating a whole case stays quick)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    modes = {"both": [True, False], "on": [True], "off": [False]}[args.compile]  # compiled first: the goals are for it
    cl = args.channels_last and dev.type == "cuda"
    results: dict = {"machine": machine(), "patch": args.patch, "batch": 2, "channels": 2, "workers": args.workers,
                     "val_workers": VAL_WORKERS, "channels_last": cl, "runs": {}}

    def save_now():  # after each measurement, so that a later timeout keeps what was measured
        if args.out:
            args.out.write_text(json.dumps(results, indent=2) + "\n")

    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        t = time.perf_counter()
        make_cache(cache, tuple(args.case_shape))
        for extra, src in (("c", "a"), ("d", "b")):  # four cases
            shutil.copytree(cache / "cases" / src, cache / "cases" / extra)
        results["cache_seconds"] = round(time.perf_counter() - t, 1)
        # the loader alone; with 4 workers too: what a workstation with a few cores gets
        for workers, on_device in ((args.workers, True), (args.workers, False), (4, True)):
            where = "resample_on_device" if on_device else "all_in_workers"
            key = f"loader_only_ms_per_batch_{workers}_workers_{where}"
            results[key] = round(loader_only_ms(cache, args.patch, workers, dev, on_device), 2)
            print(f"loader alone, {workers} workers, {where.replace('_', ' ')}: {results[key]:.1f} ms per batch of 2", flush=True)
        if dev.type == "cuda":
            try:  # a diagnostic: its failure must not cost the measurements below
                results["host_syncs_per_iteration"] = host_syncs(cache, args.patch, args.workers, dev)
                print(f"host-device synchronisations per training iteration (eager, resampling on the device): "
                      f"{results['host_syncs_per_iteration']:.2f}", flush=True)
            except Exception as exc:  # noqa: BLE001
                print(f"(sync count failed: {exc!r})", flush=True)
        save_now()
        for compile_net in modes:
            mode = "compile" if compile_net else "eager"
            setup = _setup(args.patch, dev, compile_net, cl)  # one model per mode: compiled once
            bare = bare_step_ms(setup, args.patch, dev, args.iters, args.warmup, cl)
            # eager: the default placement only; compiled: both (how much the GPU-side resampling buys)
            for on_device in (True, False) if compile_net else (True,):
                full = pipeline(setup, cache, args.patch, dev, args.iters, args.warmup, args.workers, args.epoch_iters,
                                args.val_iters, on_device, cl)
                key = f"{mode}, resampling {'on the device' if on_device else 'in the workers'}"
                run = {"bare_step_ms": round(bare, 2), "pipeline_ms": round(full["pipeline_ms"], 2),
                       "ratio": round(full["pipeline_ms"] / bare, 3), "epoch_250_plus_50_s": round(full["epoch_s"], 2)}
                results["runs"][key] = run
                print(f"[{key}] bare step {bare:.1f} ms, full pipeline {full['pipeline_ms']:.1f} ms -> ratio {run['ratio']:.3f} "
                      f"(goal <= 1.10, pipeline <= 45 ms); epoch of {args.epoch_iters}+{args.val_iters} iterations "
                      f"{full['epoch_s']:.1f} s (nnU-Net 19.6 s; goal <= 12 s)", flush=True)
                save_now()
            if not compile_net:  # the trainer validates with the eager network (a compiled one is unwrapped)
                per_case = validation_seconds_per_case(setup[0], cache, args.patch, dev)
                results["validation_seconds_per_case"] = round(per_case, 3)
                print(f"validation of a whole {'x'.join(map(str, args.case_shape))} case (sliding window, metrics): {per_case:.2f} s; an ISLES 2022 "
                      f"fold's 50 cases add {50 * per_case:.0f} s to each validated epoch (train.validate_every)", flush=True)
                save_now()
    return results


if __name__ == "__main__":
    main()
