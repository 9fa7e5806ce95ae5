"""The training loss built from a spec (``dice+boundary``), a schedule and, optionally, deep supervision.

``total = r * sum_i w_i * regional_i + b * w_b * boundary`` where ``(r, b) = schedule.weights(epoch)`` and
``w_i`` are the spec's weights. Terms read named batch entries: ``batch["label"]`` (class indices, ignore label
allowed) for regional terms and ``batch["sdm"]`` (``(B, K-1, *spatial)`` signed distance maps in mm) for the
boundary term, so arguments cannot be swapped.

Deep supervision (``logits`` a list, full resolution first, then each coarser output): every output gets the
weight ``1/2^i``, normalised to sum to 1 (nnU-Net's weighting). Regional terms at a coarser output use the label
downsampled by nearest neighbour. The boundary term, by default (``ds_boundary="all"``), is applied at every
output against the distance maps average-pooled to that output's size: values stay in mm (the map is a field in
mm, sampled more coarsely), so the term keeps its meaning and scale at every resolution.
``ds_boundary="full"`` applies it at full resolution only, with weight 1.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from segpipe.errors import did_you_mean
from segpipe.losses.bitempered import bi_tempered_loss
from segpipe.losses.boundary import boundary_loss
from segpipe.losses.cross_entropy import cross_entropy_loss
from segpipe.losses.dice import dice_loss
from segpipe.losses.focal import focal_loss
from segpipe.losses.generalized_dice import generalized_dice_loss
from segpipe.losses.schedule import Schedule, parse_schedule
from segpipe.losses.spec import LossSpec, parse_loss_spec

__all__ = ["DEFAULT_OPTIONS", "CompositeLoss", "deep_supervision_weights", "downsample_label", "downsample_sdm"]

# per-term options and their defaults (overridable from the config: loss_options: {focal: {gamma: 1}})
DEFAULT_OPTIONS: dict[str, dict[str, Any]] = {
    "dice": {"include_background": False, "batch": True, "smooth_nr": 1e-5, "smooth_dr": 1e-5},
    "gdl": {"include_background": True, "batch": False, "smooth_nr": 1e-5, "smooth_dr": 1e-5},
    "ce": {},
    "focal": {"gamma": 2.0, "alpha": None},
    "bitempered": {"t1": 0.8, "t2": 1.2, "label_smoothing": 0.0, "num_iters": 5},
    "boundary": {},
}
_ON_PROBS = {"dice": dice_loss, "gdl": generalized_dice_loss}
_ON_LOGITS = {"ce": cross_entropy_loss, "focal": focal_loss, "bitempered": bi_tempered_loss}


def deep_supervision_weights(n: int) -> list[float]:
    """``1/2^i`` for ``i = 0..n-1``, normalised to sum to 1."""
    w = [0.5**i for i in range(n)]
    s = sum(w)
    return [x / s for x in w]


def downsample_label(label: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Nearest-neighbour resize of a ``(B, 1, *spatial)`` class-index label (the ignore label survives)."""
    if tuple(label.shape[2:]) == tuple(size):
        return label
    return F.interpolate(label.float(), size=tuple(size), mode="nearest-exact").to(label.dtype)


def downsample_sdm(sdm: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Average-pool ``(B, C, *spatial)`` distance maps to ``size``; the values stay in mm."""
    if tuple(sdm.shape[2:]) == tuple(size):
        return sdm
    pool = F.adaptive_avg_pool3d if sdm.ndim == 5 else F.adaptive_avg_pool2d
    return pool(sdm, tuple(size))


class CompositeLoss(nn.Module):
    """The training loss. ``forward(logits, batch, epoch)`` returns ``(total, terms)`` where ``terms`` maps each
    term's name to its unweighted value (detached), deep-supervision outputs combined."""

    def __init__(
        self,
        spec: str | LossSpec = "dice+boundary",
        schedule: str | Schedule = "rebalance",
        *,
        num_classes: int = 2,
        ignore_index: int | None = None,
        options: Mapping[str, Mapping[str, Any]] | None = None,
        ds_boundary: str = "all",
    ) -> None:
        super().__init__()
        self.spec = parse_loss_spec(spec) if isinstance(spec, str) else spec
        self.schedule = parse_schedule(schedule) if isinstance(schedule, str) else schedule
        if num_classes < 2:
            raise ValueError(f"num_classes: expected at least 2 (background and one class), got {num_classes}")
        if ds_boundary not in ("all", "full"):
            raise ValueError(f"ds_boundary: expected 'all' or 'full', got {ds_boundary!r}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.ds_boundary = ds_boundary
        self.options: dict[str, dict[str, Any]] = {}
        for name, opts in (options or {}).items():
            if name not in DEFAULT_OPTIONS:
                raise ValueError(f"loss options: unknown term '{name}'{did_you_mean(name, DEFAULT_OPTIONS)}")
            for key in opts:
                if key not in DEFAULT_OPTIONS[name]:
                    valid = ", ".join(DEFAULT_OPTIONS[name]) or "none"
                    raise ValueError(f"loss options of '{name}': unknown option '{key}'{did_you_mean(key, DEFAULT_OPTIONS[name])}; valid: {valid}")
        for term in self.spec.terms:
            self.options[term.name] = {**DEFAULT_OPTIONS[term.name], **dict((options or {}).get(term.name, {}))}

    @property
    def needs_sdm(self) -> bool:
        return self.spec.boundary is not None

    def _label(self, batch: Mapping[str, torch.Tensor], ref: torch.Tensor) -> torch.Tensor:
        if "label" not in batch:
            raise ValueError(f"batch: the regional loss terms read batch['label']; this batch has keys {sorted(batch)}")
        label = batch["label"]
        if label.ndim == ref.ndim - 1:
            label = label.unsqueeze(1)
        if label.shape[0] != ref.shape[0] or tuple(label.shape[2:]) != tuple(ref.shape[2:]) or label.shape[1] != 1:
            raise ValueError(
                f"batch['label']: expected shape (B, 1, *spatial) matching logits {tuple(ref.shape)}, got {tuple(batch['label'].shape)}"
            )
        return label

    def _sdm(self, batch: Mapping[str, torch.Tensor], ref: torch.Tensor) -> torch.Tensor:
        if "sdm" not in batch:
            raise ValueError(
                f"batch: the 'boundary' term reads batch['sdm'] (the cached signed distance maps); this batch has keys {sorted(batch)}"
            )
        sdm = batch["sdm"]
        want = (ref.shape[0], self.num_classes - 1, *ref.shape[2:])
        if tuple(sdm.shape) != want:
            raise ValueError(f"batch['sdm']: expected shape {want} (one map per foreground class), got {tuple(sdm.shape)}")
        return sdm

    def forward(
        self,
        logits: torch.Tensor | Sequence[torch.Tensor],
        batch: Mapping[str, torch.Tensor],
        epoch: int = 0,
        *,
        validate: bool = False,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        outputs = [logits] if isinstance(logits, torch.Tensor) else list(logits)
        if not outputs:
            raise ValueError("logits: expected a tensor or a non-empty list of tensors (deep supervision)")
        full = outputs[0]
        if full.shape[1] != self.num_classes:
            raise ValueError(f"logits: expected {self.num_classes} channels (classes), got shape {tuple(full.shape)}")
        label_full = self._label(batch, full)
        sdm_full = self._sdm(batch, full) if self.needs_sdm else None
        ds_w = deep_supervision_weights(len(outputs))
        values: dict[str, torch.Tensor] = {}
        for s, (w_s, out) in enumerate(zip(ds_w, outputs)):
            out = out.float()
            label = downsample_label(label_full, out.shape[2:])[:, 0]
            probs = torch.softmax(out, dim=1) if (set(self.options) & (set(_ON_PROBS) | {"boundary"})) else None
            check = validate and s == 0
            for term in self.spec.regional:
                opts = self.options[term.name]
                if term.name in _ON_PROBS:
                    v = _ON_PROBS[term.name](probs, label, ignore_index=self.ignore_index, validate=check, **opts)
                else:
                    v = _ON_LOGITS[term.name](out, label, ignore_index=self.ignore_index, validate=check, **opts)
                values[term.name] = values.get(term.name, 0.0) + w_s * v
            if sdm_full is not None and (self.ds_boundary == "all" or s == 0):
                sdm = downsample_sdm(sdm_full, out.shape[2:])
                w_b = w_s if self.ds_boundary == "all" else 1.0
                v = boundary_loss(probs[:, 1:], sdm, validate=check)
                values["boundary"] = values.get("boundary", 0.0) + w_b * v
        r, b = self.schedule.weights(epoch)
        total = full.new_zeros((), dtype=torch.float32)
        for term in self.spec.terms:
            total = total + (b if term.is_boundary else r) * term.weight * values[term.name]
        return total, {k: v.detach() for k, v in values.items()}
