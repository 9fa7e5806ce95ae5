"""Inference throughput on a dataset: the three overlapping stages (preprocessing processes, network,
writer thread; ``--preprocess-workers``) against the same cases one after the other, in the same process.

Synthetic two-channel cases of ``--shape`` at 1 mm, gzipped NIfTI, as a scanner export converted. On a GPU
the network is the 128^3 one (6 stages, 32..320 features), where reading and preprocessing (about 2.6 s a
case on the H200 machine's CPU) dwarf the network (0.25 s). On the CPU the default is a small network
(``--network small``: 4 stages, 8..64 features, 64^3 patches), so that the network takes a GPU-like share
of the time on 2 cores; ``--network full`` is the GPU one. The time includes starting the processes. The
weights are random: the time does not depend on them.

    python -m benchmarks.infer_dataset [--cases 6] [--device cpu|cuda] [--preprocess-workers 2] [--network small|full]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from concurrent.futures import FIRST_COMPLETED, wait
from pathlib import Path

import torch

from benchmarks._common import save
from benchmarks.infer_e2e import _checkpoint, _synthetic_case
from segpipe.config import load_config
from segpipe.inference.run import infer
from segpipe.planning import make_plan

NETWORKS = {
    "full": ["plan.patch_size=[128,128,128]"],
    "small": ["plan.patch_size=[64,64,64]", "plan.base_features=8", "plan.max_features=64", "plan.max_stages=4"],
}


def pool_start_seconds(processes: int) -> float:
    """How long ``processes`` preprocessing processes take from their start until one has imported what
    preparing a case needs (what a run waits before they take work)."""
    from segpipe.inference.run import _preprocessing_pool, _ready

    t = time.perf_counter()
    pool = _preprocessing_pool(processes, 30, 1)
    try:
        wait([pool.submit(_ready) for _ in range(processes)], return_when=FIRST_COMPLETED)
        return time.perf_counter() - t
    finally:
        pool.shutdown(wait=True)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=6)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--preprocess-workers", type=int, default=None, help="default: 3 on a GPU, 2 on the CPU")
    ap.add_argument("--network", choices=sorted(NETWORKS), default=None, help="default: full on a GPU, small on the CPU")
    ap.add_argument("--shape", type=int, nargs=3, default=(192, 224, 192))
    args = ap.parse_args(argv)
    gpu = args.device.startswith("cuda")
    network = args.network or ("full" if gpu else "small")
    workers = args.preprocess_workers if args.preprocess_workers is not None else (3 if gpu else 2)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        channels = ("t1", "flair")
        cfg = load_config(None, [*NETWORKS[network], "preprocess.target_spacing=[1,1,1]"])
        plan = make_plan(cfg, channels, ("background", "lesion"), None, 0.5, [(1, 1, 1)], [tuple(args.shape)])
        _synthetic_case(tmp / "c0", tuple(args.shape))
        folders = [tmp / "c0"]
        for i in range(1, args.cases):  # the same content under other names: the time does not depend on it
            shutil.copytree(tmp / "c0", tmp / f"c{i}")
            folders.append(tmp / f"c{i}")
        model = _checkpoint(tmp / "model.pt", plan, cfg)
        infer(model, folders[:1], tmp / "warm", tta=False, device=args.device, preprocess_workers=0)  # warm-up
        times = {}
        for n in (0, workers):
            t = time.perf_counter()
            rep = infer(model, folders, tmp / f"out{n}", tta=False, device=args.device, preprocess_workers=n)
            times[n] = time.perf_counter() - t
            assert not rep.failed, rep.failed
        inner = next(iter(rep.done.values()))["seconds"]
    start = pool_start_seconds(workers)
    seq, par = times[0] / args.cases, times[workers] / args.cases
    result = {"device": args.device, "network": network, "cases": args.cases, "shape": list(args.shape), "preprocess_workers": workers,
              "sequential_s_per_case": round(seq, 3), "pipelined_s_per_case": round(par, 3), "speedup": round(seq / par, 2),
              "stages_of_one_case_s": inner, "process_start_s": round(start, 2)}
    print(f"[{args.device}] {args.cases} cases {'x'.join(map(str, args.shape))}, {network} network: one after the other "
          f"{seq:.2f} s/case, with {workers} preprocessing processes {par:.2f} s/case -> {seq / par:.2f}x "
          f"(one case: preprocess {inner['preprocess']:.2f} s, network {inner['network']:.2f} s, invert {inner['invert']:.2f} s, "
          f"write {inner['write']:.2f} s; {workers} processes ready to work {start:.1f} s after their start)")
    save(f"infer_dataset_{args.device.split(':')[0]}", result)
    return result


if __name__ == "__main__":
    main()
