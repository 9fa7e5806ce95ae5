"""What the boundary term costs in a training step, and against MONAI's ``BoundaryLoss``.

(a) One training step (forward, deep-supervised loss, backward, SGD update) of a U-Net on a 2x2x96^3 batch
    with ``dice`` alone and with ``dice+boundary`` on the cached maps; reports the overhead (target <= 3 %).
    The added time is measured where it arises, on the loss's forward and backward over the network's
    (deep-supervised) outputs, many times, and divided by the step time: a difference of two whole steps
    drowns in their noise on a busy CPU. Both whole steps are reported too.
(b) The boundary term alone per step: segpipe (cached, spacing-aware maps) against MONAI 1.6's
    ``BoundaryLoss``, which recomputes the distance transforms of the target at every call (no spacing).

    python -m benchmarks.loss_overhead [--device cpu|cuda] [--repeat 5] [--size 96]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from benchmarks._common import save, timed
from segpipe.config import load_config
from segpipe.losses import CompositeLoss, boundary_loss
from segpipe.models import build_network
from segpipe.planning import make_plan
from segpipe.transforms import signed_distance_maps


def _batch(size: int, device: str):
    g = np.random.default_rng(0)
    label = np.zeros((2, size, size, size), np.uint8)
    for b in range(2):
        for _ in range(6):
            c = g.integers(8, size - 8, 3)
            r = g.integers(2, 6, 3)
            label[b, c[0] - r[0]:c[0] + r[0], c[1] - r[1]:c[1] + r[1], c[2] - r[2]:c[2] + r[2]] = 1
    sdm = np.stack([signed_distance_maps(label[b], 2, (1.0, 1.0, 1.0)) for b in range(2)])
    image = torch.randn(2, 2, size, size, size)
    return image.to(device), torch.from_numpy(label)[:, None].long().to(device), torch.from_numpy(sdm).to(device)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeat", type=int, default=5 if torch.cuda.is_available() else 2)
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--base-features", type=int, default=32 if torch.cuda.is_available() else 8,
                    help="first-stage features (smaller on CPU, which makes the step shorter and the overhead look larger)")
    args = ap.parse_args(argv)
    dev = args.device
    size = args.size
    cfg = load_config(None, [f"plan.patch_size=[{size},{size},{size}]", "plan.batch_size=2", f"plan.base_features={args.base_features}"])
    plan = make_plan(cfg, ("a", "b"), ("background", "lesion"), None, 0.5, [(1, 1, 1)], [(size, size, size)])
    torch.manual_seed(0)
    net = build_network(plan).to(dev)
    net.train()
    opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9, nesterov=True)
    image, label, sdm = _batch(size, dev)
    batch = {"label": label, "sdm": sdm}
    losses = {spec: CompositeLoss(spec, "constant", num_classes=2) for spec in ("dice", "dice+boundary")}

    def sync():
        if dev.startswith("cuda"):
            torch.cuda.synchronize()

    def step(spec):
        def run():
            opt.zero_grad(set_to_none=True)
            total, _ = losses[spec](net(image), batch, 5)
            total.backward()
            opt.step()
            sync()
        return run

    times = {}
    for _ in range(2):  # interleave to even out drift
        for spec in losses:
            t, _ = timed(step(spec), repeat=args.repeat, warmup=1)
            times.setdefault(spec, []).append(t)
    t_dice, t_both = min(times["dice"]), min(times["dice+boundary"])
    outputs = [o.detach().requires_grad_() for o in net(image)]

    def loss_only(spec):
        def run():
            total, _ = losses[spec](outputs, batch, 5)
            total.backward()
            sync()
        return run

    loss_t = {spec: [] for spec in losses}
    for _ in range(3):
        for spec in losses:
            loss_t[spec].append(timed(loss_only(spec), repeat=10, warmup=2)[0])
    added = min(loss_t["dice+boundary"]) - min(loss_t["dice"])
    overhead = 100 * added / t_dice

    # (b) the boundary term alone
    from monai.losses import BoundaryLoss as MonaiBoundary

    logits = torch.randn(2, 2, size, size, size, device=dev)
    probs = torch.softmax(logits, 1)
    monai_loss = MonaiBoundary(softmax=True, to_onehot_y=True, include_background=False)
    t_ours, _ = timed(lambda: (boundary_loss(probs[:, 1:], sdm, validate=False).item(), sync()), repeat=args.repeat, warmup=1)
    t_monai, _ = timed(lambda: (monai_loss(logits, label).item(), sync()), repeat=max(2, args.repeat // 2), warmup=1)
    result = {
        "device": dev, "batch": [2, 2, size, size, size], "base_features": args.base_features,
        "step_dice_s": round(t_dice, 4), "step_dice_boundary_s": round(t_both, 4),
        "loss_dice_s": round(min(loss_t["dice"]), 5), "loss_dice_boundary_s": round(min(loss_t["dice+boundary"]), 5),
        "boundary_overhead_pct": round(overhead, 2),
        "boundary_term_segpipe_s": round(t_ours, 5), "boundary_term_monai_s": round(t_monai, 4),
        "monai_over_segpipe": round(t_monai / t_ours, 1),
    }
    print(f"[{dev}] training step 2x2x{size}^3: dice {t_dice * 1000:.1f} ms, dice+boundary {t_both * 1000:.1f} ms; "
          f"the boundary term adds {added * 1000:.2f} ms to the loss's forward+backward -> {overhead:+.2f} % of a step (target <= 3 %)")
    print(f"[{dev}] boundary term per step: segpipe {t_ours * 1000:.2f} ms, MONAI BoundaryLoss {t_monai * 1000:.1f} ms "
          f"-> {t_monai / t_ours:.0f}x")
    save(f"loss_overhead_{dev.split(':')[0]}", result)
    return result


if __name__ == "__main__":
    main()
