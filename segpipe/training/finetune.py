"""Fine-tuning: a new run's network starts from another run's weights (``--init-from``, ``train.init_from``),
as nnU-Net's ``-pretrained_weights``: e.g. a model trained on a public dataset, adapted to a site's own scans.

The run takes the model's network, patch size and batch size (its plan fitted them together); the
preprocessing stays the run's cache's. Every weight is taken from the model except the output heads (the
final layer and the deep-supervision heads) when their shapes differ: a run with other classes gets fresh
heads. The number of input channels must match; their names may differ (they are taken in order, with a
warning). Weights that do not fit the model's own network (a damaged or foreign checkpoint) are refused,
rather than silently training most of the network from scratch.
"""

from __future__ import annotations

import dataclasses
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


def initial_weights(source: str | Path, plan: Plan) -> tuple[dict[str, torch.Tensor], list[str], Plan]:
    """The weights of ``source`` (a run folder or checkpoint) for a run planned as ``plan``: the state to
    load (``load_state_dict(..., strict=False)``), the keys left as initialised (output heads whose shape
    differs), and the run's plan with the model's network, patch and batch size. Raises
    :class:`SegpipeError` naming what does not fit."""
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
    adopted = dataclasses.replace(plan, network=dataclasses.replace(theirs.network, deep_supervision=plan.network.deep_supervision),
                                  patch_size=theirs.patch_size, batch_size=theirs.batch_size)
    if (adopted.network, adopted.patch_size, adopted.batch_size) != (plan.network, plan.patch_size, plan.batch_size):
        log.info("--init-from: the model's network (features %s), patch %s and batch %d replace this cache's plan (features %s, patch "
                 "%s, batch %d)", list(theirs.network.filters), "x".join(map(str, theirs.patch_size)), theirs.batch_size,
                 list(plan.network.filters), "x".join(map(str, plan.patch_size)), plan.batch_size)
    plan = adopted
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
        raise SegpipeError(f"--init-from '{path}': its weights do not fit the network of its own plan ({len(differ)} of them, e.g. "
                           f"{differ[0]}); give a checkpoint of `segpipe train`")
    if tuple(theirs.channels) != tuple(plan.channels):
        log.warning("--init-from: the model was trained on channels %s, this run has %s: they are taken in that order",
                    ", ".join(theirs.channels), ", ".join(plan.channels))
    if fresh:
        log.info("--init-from %s: every weight but the output heads (the model's classes %s, this run's %s), which start fresh",
                 path, ", ".join(theirs.classes), ", ".join(plan.classes))
    else:
        log.info("--init-from %s: every weight of the model (epoch %s)", path, ckpt.get("epoch"))
    return load, fresh, plan
