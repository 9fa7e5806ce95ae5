"""Networks: a MONAI DynUNet planned from the dataset (nnU-Net-style kernels and strides)."""

from segpipe.models.unet import SegUNet, build_network

__all__ = ["SegUNet", "build_network"]
