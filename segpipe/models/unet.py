"""The 3D U-Net: MONAI's ``DynUNet`` with the plan's kernels and strides, instance norm and leaky ReLU.

With deep supervision, MONAI's ``DynUNet`` interpolates every supervision head up to full resolution and
stacks them. segpipe returns the heads at their own resolutions instead (full resolution first), so the
regional losses run on labels downsampled once, as nnU-Net does, instead of on several full-size outputs:
less memory and less time per step. In evaluation mode the network returns the full-resolution logits only.
"""

from __future__ import annotations

from typing import Any

import torch
from monai.networks.nets import DynUNet

__all__ = ["SegUNet", "build_network"]


class SegUNet(DynUNet):
    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:  # type: ignore[override]
        out = self.output_block(self.skip_layers(x))
        if self.training and self.deep_supervision:
            return [out, *self.heads]
        return out


def build_network(plan: Any, *, deep_supervision: bool | None = None) -> SegUNet:
    """The network for ``plan`` (a :class:`segpipe.planning.Plan`): ``len(channels)`` inputs, one output per
    class; deep supervision heads on every decoder stage but the last two (MONAI allows up to stages - 2)."""
    net = plan.network
    stages = len(net.strides)
    ds = net.deep_supervision if deep_supervision is None else deep_supervision
    ds = ds and stages >= 3
    return SegUNet(
        spatial_dims=3,
        in_channels=len(plan.channels),
        out_channels=len(plan.classes),
        kernel_size=[list(k) for k in net.kernel_sizes],
        strides=[list(s) for s in net.strides],
        upsample_kernel_size=[list(s) for s in net.strides[1:]],
        filters=list(net.filters),
        norm_name=("INSTANCE", {"affine": True}),
        act_name=("leakyrelu", {"inplace": True, "negative_slope": 0.01}),
        deep_supervision=ds,
        deep_supr_num=max(1, stages - 2),
        res_block=False,
    )
