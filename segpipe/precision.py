"""Which 16-bit type mixed precision computes in on a given device.

bfloat16 needs no gradient scaler and is what segpipe trains and predicts in on GPUs that compute in it: NVIDIA
compute capability 8.0 and up (A100, A10, RTX 30xx and later, H100, H200) and AMD GPUs. Older NVIDIA GPUs
(V100 7.0, T4 and RTX 20xx 7.5, P100 6.0: Colab's free tier and many hospital servers) only emulate it: cuDNN
has no bfloat16 convolutions there, so autocast's 3D convolutions fail or fall back to slow kernels, and
``torch.cuda.is_bf16_supported()`` still answers True (its default counts emulation). There float16 is the
type, with a gradient scaler in training, as nnU-Net trains everywhere.
"""

from __future__ import annotations

import logging

import torch

__all__ = ["autocast_dtype", "native_bfloat16", "precision_note", "training_precision"]

log = logging.getLogger(__name__)

#: NVIDIA's first compute capability with bfloat16 tensor cores (Ampere)
BF16_CAPABILITY = (8, 0)


def native_bfloat16(device: torch.device) -> bool:
    """Whether ``device`` (a CUDA device) computes in bfloat16 natively."""
    if torch.version.hip:
        return True
    props = torch.cuda.get_device_properties(device)
    return (props.major, props.minor) >= BF16_CAPABILITY


def autocast_dtype(device: torch.device, wanted: str = "auto") -> torch.dtype | None:
    """The autocast type for ``device``: None on the CPU (segpipe computes in float32 there); on a GPU
    ``wanted`` ("bfloat16" or "float16"), or with "auto" bfloat16 where native and float16 elsewhere."""
    if device.type != "cuda":
        return None
    if wanted == "bfloat16":
        return torch.bfloat16
    if wanted == "float16":
        return torch.float16
    if wanted != "auto":
        raise ValueError(f"autocast_dtype: wanted must be auto, bfloat16 or float16, got {wanted!r}")
    return torch.bfloat16 if native_bfloat16(device) else torch.float16


def precision_note(device: torch.device, wanted: str, chosen: torch.dtype) -> tuple[str, bool]:
    """A log line saying what mixed precision ``device`` computes in and why, and whether it is a warning (a
    bfloat16 asked for on a GPU that only emulates it)."""
    props = torch.cuda.get_device_properties(device)
    gpu = f"{props.name} (compute capability {props.major}.{props.minor})"
    if chosen == torch.float16:
        why = f"as asked, on {gpu}" if wanted == "float16" else f"{gpu} has no native bfloat16"
        return f"mixed precision in float16 ({why})", False
    if wanted == "bfloat16" and not native_bfloat16(device):
        return (f"train.amp_dtype=bfloat16 on {gpu}, which only emulates bfloat16 (cuDNN has no bfloat16 convolutions "
                "before compute capability 8.0): expect failing or slow convolutions; set train.amp_dtype=auto or float16"), True
    return f"mixed precision in bfloat16 on {gpu}", False


def training_precision(device: torch.device, amp: bool, wanted: str, *, announce: bool = True) -> tuple[torch.dtype | None, torch.amp.GradScaler]:
    """The trainer's autocast type (None: float32) and its gradient scaler (enabled for float16 only); with
    ``announce`` the choice is logged, as a warning where bfloat16 was asked for on a GPU that emulates it."""
    dtype = autocast_dtype(device, wanted) if amp else None
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    if dtype is not None and announce:
        note, is_warning = precision_note(device, wanted, dtype)
        (log.warning if is_warning else log.info)("%s%s", note, "; gradients scaled" if dtype == torch.float16 else "")
    return dtype, scaler
