"""End-to-end inference time: read, preprocess, network, invert, write; and the share outside the network.

``--case sample`` (default): the real ISLES 2022 case (3 channels) with the network planned for it by the
default config (patch 112x112x64, 5 stages, 32..320 features), with and without mirror TTA.
``--case synthetic``: a 192x224x192 two-channel case at 1 mm with the 128^3 network, against the pure
sliding-window network time on the same preprocessed tensor (GPU goal: end-to-end <= 1.5x the network).
The weights are random: the time does not depend on them.

    python -m benchmarks.infer_e2e [--case sample|synthetic] [--device cpu|cuda] [--repeat 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks._common import save
from segpipe.config import config_to_dict, load_config
from segpipe.inference.run import infer
from segpipe.inference.sliding import predict_volume
from segpipe.io.nifti import save_nifti
from segpipe.models import build_network
from segpipe.planning import make_plan
from segpipe.precision import autocast_dtype
from segpipe.training.checkpoint import save_checkpoint
from segpipe.transforms.preprocessing import build_preprocessing, channel_key, run_chain

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "isles22_sample" / "rawdata" / "sub-strokecase0009" / "ses-0001"


def _checkpoint(path: Path, plan, cfg) -> Path:
    torch.manual_seed(0)
    net = build_network(plan)
    return save_checkpoint(path, {"model": net.state_dict(), "plan": plan.to_json(), "config": config_to_dict(cfg), "epoch": 0})


def _synthetic_case(folder: Path, shape) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    idx = np.indices(shape, dtype=np.float32)
    c = np.array(shape) / 2
    head = sum(((idx[i] - c[i]) / (0.45 * shape[i])) ** 2 for i in range(3)) < 1
    paths = {}
    for ch in ("t1", "flair"):
        img = (head * 100 + rng.normal(0, 5, shape)).astype(np.float32)
        paths[ch] = save_nifti(folder / f"case_{ch}.nii.gz", img, np.diag([-1.0, 1.0, 1.0, 1.0]))
    return paths


def main(argv=None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", choices=["sample", "synthetic"], default="sample")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--shape", type=int, nargs=3, default=(192, 224, 192))
    ap.add_argument("--tta", choices=["both", "on", "off"], default="both")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.case == "sample":
            if not SAMPLE.is_dir():
                print(f"skipped: the real ISLES 2022 sample is not at {SAMPLE}")
                return None
            channels = ("dwi", "adc", "flair")
            cfg = load_config(None, [])
            plan = make_plan(cfg, channels, ("background", "lesion"), None, 0.5, [(2, 2, 2)], [(112, 112, 73)])
            inputs = [SAMPLE]
            files = {ch: next(SAMPLE.glob(f"*_{ch}.nii.gz")) for ch in channels}
        else:
            channels = ("t1", "flair")
            cfg = load_config(None, ["plan.patch_size=[128,128,128]", "preprocess.target_spacing=[1,1,1]"])
            plan = make_plan(cfg, channels, ("background", "lesion"), None, 0.5, [(1, 1, 1)], [tuple(args.shape)])
            files = _synthetic_case(tmp / "in", tuple(args.shape))
            inputs = [tmp / "in"]
        model = _checkpoint(tmp / "model.pt", plan, cfg)
        result: dict = {"case": args.case, "device": args.device, "patch": list(plan.patch_size), "runs": {}}
        # the network alone on the preprocessed tensor (what the end-to-end time is compared with)
        image = run_chain(build_preprocessing(plan, with_label=False), {channel_key(c): str(p) for c, p in files.items()})["image"]
        net = build_network(plan).to(args.device)
        amp = autocast_dtype(torch.device(args.device))  # what the predictor computes in
        for tta in {"both": (False, True), "on": (True,), "off": (False,)}[args.tta]:
            predict_volume(net, image.as_tensor(), plan.patch_size, device=args.device, tta=tta, amp_dtype=amp)  # warm-up
            t = time.perf_counter()
            for _ in range(args.repeat):
                predict_volume(net, image.as_tensor(), plan.patch_size, device=args.device, tta=tta, amp_dtype=amp)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            network = (time.perf_counter() - t) / args.repeat
            infer(model, inputs, tmp / "warm", tta=tta, device=args.device)  # warm-up (model load, caches)
            t = time.perf_counter()
            for i in range(args.repeat):
                rep = infer(model, inputs, tmp / f"out{i}", tta=tta, device=args.device)
            total = (time.perf_counter() - t) / args.repeat
            inner = next(iter(rep.done.values()))["seconds"]
            key = "tta" if tta else "no_tta"
            result["runs"][key] = {"end_to_end_s": round(total, 3), "network_s": round(network, 3),
                                   "ratio": round(total / network, 2), "outside_network_pct": round(100 * (1 - network / total), 1),
                                   "inside": inner}
            print(f"[{args.device}] {args.case}, {'with' if tta else 'without'} TTA: end-to-end {total:.2f} s, network {network:.2f} s "
                  f"-> {total / network:.2f}x, {100 * (1 - network / total):.0f} % outside the network "
                  f"(preprocess {inner['preprocess']:.2f} s, invert {inner['invert']:.2f} s)")
    save(f"infer_e2e_{args.case}_{args.device.split(':')[0]}", result)
    return result


if __name__ == "__main__":
    main()
