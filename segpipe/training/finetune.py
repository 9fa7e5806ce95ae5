"""Fine-tuning: a new run's network starts from another run's weights (``--init-from``, ``train.init_from``),
as nnU-Net's ``-pretrained_weights``: e.g. a model trained on a public dataset, adapted to a site's own scans.

Every weight is taken from the model except the output heads (the final layer and the deep-supervision
heads) when their shapes differ: a run with other classes gets fresh heads. Anything else that differs means
another network, and is refused with what differs, rather than silently training most of it from scratch.
The number of input channels must match; their names may differ (they are taken in order, with a warning).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from segpipe.errors import SegpipeError
from segpipe.models import build_network
from segpipe.planning import Plan
from segpipe.training.checkpoint import load_checkpoint, resolve_checkpoint

__all__ = ["HEAD_PARTS", "initial_weights"]

log = logging.getLogger(__name__)

#: the parts of the network's state that map features to classes (MONAI DynUNet's names)
HEAD_PARTS = ("output_block.", "deep_supervision_heads.", "super_head.")


def initial_weights(source: str | Path, plan: Plan) -> tuple[dict[str, torch.Tensor], list[str], Path]:
    """The weights of ``source`` (a run folder or checkpoint) for the network of ``plan``: the state to load
    (``load_state_dict(..., strict=False)``), the keys left as initialised (output heads whose shape
    differs), and the checkpoint's path. Raises :class:`SegpipeError` naming what does not fit."""
    path = resolve_checkpoint(source, option="--init-from")
    ckpt = load_checkpoint(path)
    try:
        state = ckpt["model"]
        theirs = Plan.from_json(ckpt["plan"])
    except (KeyError, TypeError, ValueError) as exc:
        raise SegpipeError(f"--init-from '{path}': the checkpoint has no usable model and plan ({exc}); give a checkpoint of `segpipe train`") from None
    if len(theirs.channels) != len(plan.channels):
        raise SegpipeError(f"--init-from '{path}': the model takes {len(theirs.channels)} input channels ({', '.join(theirs.channels)}), "
                           f"this run {len(plan.channels)} ({', '.join(plan.channels)}); fine-tuning needs the same number of channels")
    load: dict[str, torch.Tensor] = {}
    fresh: list[str] = []
    differ: list[str] = []
    for key, value in build_network(plan).state_dict().items():
        src = state.get(key)
        if src is not None and tuple(src.shape) == tuple(value.shape):
            load[key] = src
        elif any(part in key for part in HEAD_PARTS):
            fresh.append(key)
        else:
            differ.append(key)
    if differ:
        a, b = theirs.network, plan.network
        what = [f"{name} {list(map(list, x)) if name != 'filters' else list(x)} there, {list(map(list, y)) if name != 'filters' else list(y)} here"
                for name, x, y in ((n, getattr(a, n), getattr(b, n)) for n in ("filters", "kernel_sizes", "strides")) if x != y]
        raise SegpipeError(
            f"--init-from '{path}': its network differs from this run's ({'; '.join(what) or f'{len(differ)} weights, e.g. {differ[0]}'}); "
            "plan this run like the model: the same plan.patch_size, plan.base_features, plan.max_features and plan.max_stages, "
            "or plan.kernel_sizes and plan.strides from the model's plan.json"
        )
    if tuple(theirs.channels) != tuple(plan.channels):
        log.warning("--init-from: the model was trained on channels %s, this run has %s: they are taken in that order",
                    ", ".join(theirs.channels), ", ".join(plan.channels))
    if fresh:
        log.info("--init-from %s: every weight but the output heads (the model's classes %s, this run's %s), which start fresh",
                 path, ", ".join(theirs.classes), ", ".join(plan.classes))
    else:
        log.info("--init-from %s: every weight of the model (epoch %s)", path, ckpt.get("epoch"))
    return load, fresh, path
