"""The 3D U-Net: MONAI's ``DynUNet`` with the plan's kernels and strides, instance norm and leaky ReLU.

With deep supervision, MONAI's ``DynUNet`` interpolates every supervision head up to full resolution and
stacks them. segpipe returns the heads at their own resolutions instead (full resolution first), so the
regional losses run on labels downsampled once, as nnU-Net does, instead of on several full-size outputs:
less memory and less time per step. In evaluation mode the network returns the full-resolution logits only.

``plan.architecture=resenc`` gives the encoder nnU-Net's residual blocks (1, 3, 4, 6, 6, ... per stage).
"""

from __future__ import annotations

from typing import Any

import torch
from monai.networks.blocks.dynunet_block import UnetBasicBlock, UnetResBlock
from monai.networks.nets import DynUNet

__all__ = ["SegUNet", "build_network"]


class _OneConv(torch.nn.Module):
    """The first half of MONAI's ``UnetBasicBlock``: convolution, instance norm, leaky ReLU."""

    def __init__(self, block: UnetBasicBlock) -> None:
        super().__init__()
        self.conv1, self.norm1, self.lrelu = block.conv1, block.norm1, block.lrelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lrelu(self.norm1(self.conv1(x)))


class SegUNet(DynUNet):
    """``DynUNet`` returning the supervision heads at their own resolutions, and optionally nnU-Net's residual
    encoder U-Net: ``encoder_blocks[i]`` residual blocks (MONAI's ``UnetResBlock``: two convolutions, instance
    norm, leaky ReLU, a 1x1 projection where the stride or width changes) at encoder stage ``i``, the first one
    strided, and one convolution per decoder stage after the transposed convolution and the skip concatenation
    (the plain network has two)."""

    def __init__(self, *args: Any, encoder_blocks: tuple[int, ...] = (), **kwargs: Any) -> None:
        # read by the get_* builders below, which DynUNet.__init__ calls; set before nn.Module's own __init__
        object.__setattr__(self, "_encoder_blocks", tuple(encoder_blocks))
        if encoder_blocks:
            kwargs["res_block"] = True
        super().__init__(*args, **kwargs)

    def _stage(self, index: int, block: torch.nn.Module) -> torch.nn.Module:
        """The encoder stage ``index``: ``block`` (strided), then further residual blocks at stride 1."""
        n = self._encoder_blocks[index] if self._encoder_blocks else 1
        if n <= 1:
            return block
        width, kernel = self.filters[index], self.kernel_size[index]
        more = [UnetResBlock(self.spatial_dims, width, width, kernel, 1, self.norm_name, self.act_name, dropout=self.dropout)
                for _ in range(n - 1)]
        return torch.nn.Sequential(block, *more)

    def get_input_block(self) -> torch.nn.Module:
        return self._stage(0, super().get_input_block())

    def get_downsamples(self) -> torch.nn.ModuleList:
        return torch.nn.ModuleList([self._stage(i + 1, b) for i, b in enumerate(super().get_downsamples())])

    def get_bottleneck(self) -> torch.nn.Module:
        return self._stage(len(self.strides) - 1, super().get_bottleneck())

    def get_upsamples(self) -> torch.nn.ModuleList:
        ups = super().get_upsamples()
        if self._encoder_blocks:
            for up in ups:
                up.conv_block = _OneConv(up.conv_block)
        return ups

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
        encoder_blocks=net.encoder_blocks,
    )
