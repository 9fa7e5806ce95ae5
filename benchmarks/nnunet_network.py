"""segpipe's networks against nnU-Net's own (dynamic_network_architectures), same topology: parameters and the
time of a training step, in the same process.

The plain network against nnU-Net's ``PlainConvUNet`` (two convolutions per stage, encoder and decoder), the
residual one (``plan.architecture=resenc``) against its ``ResidualEncoderUNet`` (1, 3, 4, 6, 6, ... residual
blocks per encoder stage, one convolution per decoder stage), both with deep supervision, instance norm and
leaky ReLU. Parameters for the 6-stage, 32-320-feature network of 128^3 patches; the step (forward, backward;
float32 on the CPU, bfloat16 autocast on CUDA, as segpipe trains) at ``--patch`` with at most ``--stages`` stages (a bottleneck of at least 4 voxels), batch 2,
2 channels, on the CPU or ``--device cuda``.

Needs nnU-Net's network library (``pip install -e ".[compare]"``); without it says so and exits 0.

``--forward`` times an inference forward pass instead (evaluation mode, ``torch.inference_mode``, batch 1: one
sliding window), what ``segpipe infer`` and nnU-Net's predictor spend most of a case on.

    python -m benchmarks.nnunet_network [--patch 64] [--stages 5] [--repeat 3] [--device cpu] [--forward]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

from benchmarks._common import have_compare, parameters, save


def _nnunet_net(kind: str, stages: int, features: list[int]):
    from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet

    from segpipe.planning import RESENC_BLOCKS

    common = dict(input_channels=2, n_stages=stages, features_per_stage=features, conv_op=torch.nn.Conv3d,
                  kernel_sizes=[[3, 3, 3]] * stages, strides=[[1, 1, 1]] + [[2, 2, 2]] * (stages - 1), num_classes=2,
                  conv_bias=True, norm_op=torch.nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True},
                  nonlin=torch.nn.LeakyReLU, nonlin_kwargs={"inplace": True}, deep_supervision=True)
    if kind == "plain":
        return PlainConvUNet(n_conv_per_stage=[2] * stages, n_conv_per_stage_decoder=[2] * (stages - 1), **common)
    blocks = [RESENC_BLOCKS[min(i, len(RESENC_BLOCKS) - 1)] for i in range(stages)]
    return ResidualEncoderUNet(n_blocks_per_stage=blocks, n_conv_per_stage_decoder=[1] * (stages - 1), **common)


def _segpipe_net(kind: str, stages: int, patch: int):
    from segpipe.config import load_config
    from segpipe.models import build_network
    from segpipe.planning import make_plan

    cfg = load_config(None, [f"plan.patch_size=[{patch},{patch},{patch}]", f"plan.architecture={kind}", f"plan.max_stages={stages}"])
    plan = make_plan(cfg, ("a", "b"), ("background", "lesion"), None, 0.5, [(1, 1, 1)], [(160, 192, 160)])
    return build_network(plan), list(plan.network.filters)  # fewer stages than asked where the patch is small


def _step_seconds(net: torch.nn.Module, x: torch.Tensor, repeat: int, forward_only: bool = False) -> list[float]:
    net.train(not forward_only)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if x.is_cuda else contextlib.nullcontext()

    def step():
        if forward_only:
            with torch.inference_mode(), amp:
                net(x)
        else:
            net.zero_grad(set_to_none=True)
            with amp:
                outputs = net(x)
            sum(o.float().mean() for o in outputs).backward()
        if x.is_cuda:
            torch.cuda.synchronize()

    step()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return times


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patch", type=int, default=64)
    ap.add_argument("--stages", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--forward", action="store_true", help="time an inference forward pass (batch 1) instead of a training step")
    args = ap.parse_args(argv)
    if not have_compare("dynamic_network_architectures"):
        return
    from importlib.metadata import version

    dev = torch.device(args.device)
    result: dict = {"library": f"dynamic_network_architectures {version('dynamic_network_architectures')}", "patch": args.patch,
                    "stages": args.stages, "device": str(dev), "timed": "forward" if args.forward else "training step"}
    batch = 1 if args.forward else 2
    x = torch.randn(batch, 2, args.patch, args.patch, args.patch, device=dev)
    for kind in ("plain", "resenc"):
        ours_big, feats = _segpipe_net(kind, 6, 128)
        theirs_big = _nnunet_net(kind, len(feats), feats)
        torch.manual_seed(0)
        ours, feats = _segpipe_net(kind, args.stages, args.patch)
        theirs = _nnunet_net(kind, len(feats), feats)
        t_ours, t_theirs = [], []
        for _ in range(2):  # alternated, so that a busy moment does not hit one network only
            t_theirs += _step_seconds(theirs.to(dev), x, args.repeat, args.forward)
            t_ours += _step_seconds(ours.to(dev), x, args.repeat, args.forward)
        a, b = statistics.median(t_ours), statistics.median(t_theirs)
        print(f"{kind}: parameters (6 stages, 32-320) segpipe {parameters(ours_big) / 1e6:.2f} M, nnU-Net {parameters(theirs_big) / 1e6:.2f} M; "
              f"{'forward' if args.forward else 'training step'} {batch}x2x{args.patch}^3 on {dev}: segpipe {a:.3f} s, nnU-Net {b:.3f} s ({b / a:.2f}x)")
        result[kind] = {"params_segpipe": parameters(ours_big), "params_nnunet": parameters(theirs_big), "step_seconds_segpipe": t_ours,
                        "step_seconds_nnunet": t_theirs, "ratio": b / a}
    save(f"nnunet_network_{'forward_' if args.forward else ''}{dev.type}", result)


if __name__ == "__main__":
    main()
