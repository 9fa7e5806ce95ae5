"""Dataset fingerprint -> plan: target spacing, patch size, batch size and U-Net topology.

The rules follow nnU-Net's (Isensee et al., Nature Methods 2021), re-derived here:

- **Target spacing**: the median spacing per axis. When the data is anisotropic (the coarsest axis more than
  3x the others in spacing, and fewer than a third as many voxels along it), that axis gets the 10th
  percentile of its spacings instead (no finer than the other axes), so thick-slice cases are not
  interpolated into many fake slices.
- **Topology** (nnU-Net's ``get_pool_and_conv_props``, decision for decision; a test compares them where nnU-Net
  is installed): stage by stage, among the axes whose feature map is at least ``2 * min_feature_map`` voxels,
  those whose current spacing is less than twice the finest of them are downsampled (stride 2; a lone axis only
  while at least ``3 * min_feature_map`` voxels); the kernel is 3 along an axis from the first stage at which
  its spacing is less than twice the finest current spacing, 1 before that; the bottleneck's kernel is 3. So
  thick-slice data is not pooled along z until the in-plane resolution has caught up. segpipe stops at
  ``plan.max_stages`` stages (nnU-Net: when the feature map is exhausted).
- **Patch and batch**: the patch starts near the median shape (at most 256^3-voxel-equivalent in mm), is
  shrunk along the axis with the largest patch/median ratio until a batch of 2 fits the GPU memory budget,
  then the batch grows while it fits, but never beyond 5 % of the dataset's voxels per step.

Every value can be overridden in the config's ``plan`` and ``preprocess`` sections.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from segpipe.config import Config, PlanConfig
from segpipe.errors import SegpipeError, UsageError, did_you_mean

__all__ = [
    "PLAN_VERSION",
    "NetworkPlan",
    "Plan",
    "describe_normalization",
    "estimate_memory_gb",
    "load_plan",
    "encoder_blocks_for",
    "make_plan",
    "normalization_schemes",
    "plan_topology",
    "target_spacing_from",
]

PLAN_VERSION = 1
ANISOTROPY = 3.0


#: residual blocks per encoder stage of nnU-Net's residual encoder U-Net (ResEnc M/L/XL, 3D): stages beyond the
#: sixth repeat the last value
RESENC_BLOCKS = (1, 3, 4, 6, 6, 6)


def encoder_blocks_for(architecture: str, stages: int) -> tuple[int, ...]:
    """Residual blocks per encoder stage for ``architecture`` ("plain": none, the empty tuple)."""
    if architecture == "plain":
        return ()
    return tuple(RESENC_BLOCKS[min(i, len(RESENC_BLOCKS) - 1)] for i in range(stages))


@dataclass(frozen=True)
class NetworkPlan:
    kernel_sizes: tuple[tuple[int, ...], ...]
    strides: tuple[tuple[int, ...], ...]
    filters: tuple[int, ...]
    deep_supervision: bool = True
    #: residual blocks per encoder stage (the residual encoder); empty: one plain block of two convolutions
    encoder_blocks: tuple[int, ...] = ()

    @property
    def divisor(self) -> tuple[int, ...]:
        """The patch size must be a multiple of this along each axis."""
        return tuple(int(np.prod([s[a] for s in self.strides])) for a in range(len(self.strides[0])))


@dataclass(frozen=True)
class Plan:
    """Everything that shapes the preprocessed data and the network. Saved as ``plan.json`` in the cache and
    in every checkpoint, so inference needs nothing else."""

    channels: tuple[str, ...]
    reference_channel: str
    classes: tuple[str, ...]
    ignore_value: int | None
    threshold: float | None
    target_spacing: tuple[float, ...]
    orientation: str
    crop_margin_mm: float
    head_threshold: float
    #: one scheme for every channel, or {channel: scheme} when they differ (see :func:`normalization_schemes`)
    normalization: str | dict[str, str]
    image_interpolation: str
    affine_tolerance: float
    patch_size: tuple[int, ...]
    batch_size: int
    network: NetworkPlan
    median_shape: tuple[int, ...] = ()
    memory_estimate_gb: float = 0.0
    version: int = PLAN_VERSION
    notes: tuple[str, ...] = field(default=(), compare=False)
    #: the "ct" scheme's statistics per channel, from the training set's lesion voxels (mean, std, p00_5, median,
    #: p99_5, samples, cases); empty when no channel uses it
    intensity: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def scheme(self, channel: str) -> str:
        """The normalisation scheme of ``channel``."""
        return self.normalization if isinstance(self.normalization, str) else self.normalization[channel]

    def preprocessing_key(self) -> dict[str, Any]:
        """The settings that shape a preprocessed case (part of the cache key). The ct statistics join it only
        when a channel uses them, so caches made before they existed stay fresh."""
        keys = ("channels", "reference_channel", "classes", "ignore_value", "threshold", "target_spacing", "orientation",
                "crop_margin_mm", "head_threshold", "normalization", "image_interpolation", "affine_tolerance", "version")
        key = {k: _jsonable(getattr(self, k)) for k in keys}
        if self.intensity:
            key["intensity"] = _jsonable(self.intensity)
        return key

    def to_json(self) -> dict[str, Any]:
        return _jsonable(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Plan:
        d = dict(data)
        if d.get("version") != PLAN_VERSION:
            raise SegpipeError(f"plan version {d.get('version')} is not supported by this segpipe (expects {PLAN_VERSION}); preprocess again")
        net = d.pop("network")
        network = NetworkPlan(
            kernel_sizes=tuple(tuple(int(v) for v in k) for k in net["kernel_sizes"]),
            strides=tuple(tuple(int(v) for v in s) for s in net["strides"]),
            filters=tuple(int(f) for f in net["filters"]),
            deep_supervision=bool(net.get("deep_supervision", True)),
            encoder_blocks=tuple(int(b) for b in net.get("encoder_blocks", ())),  # absent in plans before the residual encoder
        )
        tuples = ("channels", "classes", "target_spacing", "patch_size", "median_shape", "notes")
        for k in tuples:
            if k in d and d[k] is not None:
                d[k] = tuple(d[k])
        d["patch_size"] = tuple(int(v) for v in d["patch_size"])
        d["target_spacing"] = tuple(float(v) for v in d["target_spacing"])
        return cls(network=network, **d)


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.generic):
        return v.item()
    return v


def load_plan(path: str | Path) -> Plan:
    path = Path(path)
    try:
        return Plan.from_json(json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        raise SegpipeError(f"plan '{path}': not found; run `segpipe preprocess` first") from None
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise SegpipeError(f"plan '{path}': damaged or not a segpipe plan ({exc}); run `segpipe preprocess` again") from None


# -- rules ----------------------------------------------------------------------------------------------------


def describe_normalization(plan: Plan | dict[str, Any]) -> str:
    """One line on how a plan (or its JSON) normalises each channel, for ``inspect``."""
    d = plan.to_json() if isinstance(plan, Plan) else plan
    setting, stats = d.get("normalization"), d.get("intensity") or {}
    channels = list(d.get("channels") or [])
    per = setting if isinstance(setting, dict) else {c: setting for c in channels}

    def one(scheme: Any, chans: list[str]) -> str:
        if scheme == "zscore":
            return "z-score in the head mask"
        if scheme == "ct":
            parts = [f"{c + ' ' if len(chans) > 1 else ''}clipped to [{st['p00_5']:g}, {st['p99_5']:g}], minus {st['mean']:g}, "
                     f"over {st['std']:g}" for c in chans if (st := stats.get(c))]
            return "CT (" + ", ".join(parts) + "; the training set's lesion voxels)"
        return str(scheme)

    groups: dict[Any, list[str]] = {}
    for c in channels:
        groups.setdefault(per.get(c), []).append(c)
    if len(groups) == 1 and not isinstance(setting, dict):
        return f"normalisation: {one(setting, channels)}"
    return "normalisation: " + "; ".join(f"{', '.join(chans)}: {one(scheme, chans)}" for scheme, chans in groups.items())


def normalization_schemes(setting: str | dict[str, str], channels: Sequence[str]) -> str | dict[str, str]:
    """The scheme of each channel for the config's ``preprocess.normalization``: one name for all channels when
    they agree (so plans and cache keys read as before), else ``{channel: scheme}``. "auto" is nnU-Net's rule
    by name (``ct`` for a channel named ct in any case, ``zscore`` otherwise); a mapping names channels one by
    one and leaves the others to that rule."""
    def auto(ch: str) -> str:
        return "ct" if ch.casefold() == "ct" else "zscore"

    if isinstance(setting, dict):
        unknown = [k for k in setting if k not in channels]
        if unknown:
            raise UsageError(f"config 'preprocess.normalization': {', '.join(repr(k) for k in unknown)} "
                             f"{'is not a channel' if len(unknown) == 1 else 'are not channels'} of the dataset"
                             f"{did_you_mean(unknown[0], channels)}; its channels are {', '.join(channels)}")
        per = {ch: setting.get(ch) or auto(ch) for ch in channels}
    elif setting == "auto":
        per = {ch: auto(ch) for ch in channels}
    else:
        per = {ch: setting for ch in channels}
    schemes = set(per.values())
    return schemes.pop() if len(schemes) == 1 else per


def target_spacing_from(spacings: Sequence[Sequence[float]], shapes: Sequence[Sequence[int]]) -> tuple[float, ...]:
    """Median spacing, with nnU-Net's rule for anisotropic data (see the module docstring)."""
    sp = np.asarray(spacings, dtype=float)
    sz = np.asarray(shapes, dtype=float)
    target = np.percentile(sp, 50, axis=0)
    target_size = np.percentile(sz, 50, axis=0)
    worst = int(np.argmax(target))
    others = [i for i in range(len(target)) if i != worst]
    aniso_spacing = target[worst] > ANISOTROPY * max(target[i] for i in others)
    aniso_voxels = target_size[worst] * ANISOTROPY < min(target_size[i] for i in others)
    if aniso_spacing and aniso_voxels:
        t = float(np.percentile(sp[:, worst], 10))
        t = max(t, max(target[i] for i in others) + 1e-5)
        target[worst] = t
    return tuple(round(float(v), 6) for v in target)


def plan_topology(
    spacing: Sequence[float], patch_size: Sequence[int], *, min_feature_map: int = 4, max_stages: int = 6,
    base_features: int = 32, max_features: int = 320, architecture: str = "plain",
) -> NetworkPlan:
    """Kernel sizes and strides per stage (first stage stride 1), as described in the module docstring."""
    ndim = len(spacing)
    current = [float(v) for v in spacing]
    size = [float(v) for v in patch_size]
    kernel = [1] * ndim  # once 3 along an axis, 3 in every deeper stage
    kernels: list[tuple[int, ...]] = []
    strides: list[tuple[int, ...]] = [(1,) * ndim]
    while len(strides) < max_stages:
        room = [a for a in range(ndim) if size[a] >= 2 * min_feature_map]
        if not room:
            break
        finest = min(current[a] for a in room)
        pool = [a for a in room if current[a] / finest < 2]
        if not pool or (len(pool) == 1 and size[pool[0]] < 3 * min_feature_map):
            break
        kernel = [3 if k == 3 or current[a] / min(current) < 2 else 1 for a, k in enumerate(kernel)]
        kernels.append(tuple(kernel))
        for a in pool:
            current[a] *= 2
            size[a] = float(np.ceil(size[a] / 2))
        strides.append(tuple(2 if a in pool else 1 for a in range(ndim)))
    kernels.append((3,) * ndim)  # the bottleneck
    filters = tuple(min(base_features * 2**i, max_features) for i in range(len(strides)))
    return NetworkPlan(tuple(kernels), tuple(strides), filters, encoder_blocks=encoder_blocks_for(architecture, len(strides)))


def estimate_memory_gb(patch_size: Sequence[int], network: NetworkPlan, batch_size: int, channels: int) -> float:
    """Rough training memory (GiB) of a U-Net at ``patch_size``: activations kept for the backward pass,
    about 20 tensors of the stage's features per voxel and stage (two convolutions with norm and nonlinearity,
    encoder and decoder, mixed precision), 7 more per further residual block of the encoder (two convolutions,
    norms, nonlinearities and the sum), plus the parameters and the optimiser state."""
    vox = float(np.prod(patch_size))
    total = vox * channels
    scale = 1.0
    blocks = network.encoder_blocks or (1,) * len(network.filters)
    for stride, feats, n in zip(network.strides, network.filters, blocks):
        scale *= float(np.prod(stride))
        total += (20 + 7 * (n - 1)) * feats * vox / scale
    activations = total * batch_size * 2  # bytes (16-bit)
    params = sum(27 * f * f * (n + 1) for f, n in zip(network.filters, blocks)) * 4 * 4  # weights, grads, momentum, fp32
    return (activations + params) / 2**30 + 0.5  # + CUDA context and workspace


def _fit_patch(median: np.ndarray, spacing: Sequence[float], channels: int, pc: PlanConfig) -> tuple[tuple[int, ...], NetworkPlan]:
    sp = np.asarray(spacing, dtype=float)
    inv = 1.0 / sp
    initial = inv * (256**3 / np.prod(inv)) ** (1 / 3)
    patch = np.minimum(np.round(initial), median).astype(int)
    patch = np.maximum(patch, 8)
    while True:
        net = plan_topology(sp, patch, min_feature_map=pc.min_feature_map, max_stages=pc.max_stages,
                            base_features=pc.base_features, max_features=pc.max_features, architecture=pc.architecture)
        div = np.asarray(net.divisor)
        rounded = np.maximum((patch // div) * div, div)
        if estimate_memory_gb(rounded, net, 2, channels) <= pc.gpu_memory_gb or rounded.prod() <= 16**3:
            return tuple(int(v) for v in rounded), net
        ratio = patch / np.maximum(median, 1)
        axis = int(np.argmax(ratio))
        patch[axis] = max(int(patch[axis] - div[axis]), int(div[axis]))


def make_plan(
    config: Config,
    channels: Sequence[str],
    classes: Sequence[str],
    ignore_value: int | None,
    threshold: float | None,
    spacings: Sequence[Sequence[float]],
    shapes: Sequence[Sequence[int]],
) -> Plan:
    """A plan from the fingerprint (``spacings`` and ``shapes`` of the cases in RAS axis order, after cropping
    when known) and the config's overrides."""
    pp, pc = config.preprocess, config.plan
    if not spacings:
        raise SegpipeError("plan: no cases to plan from; the manifest lists none")
    ref = config.data.reference_channel or channels[0]
    if ref not in channels:
        raise UsageError(f"config 'data.reference_channel': '{ref}' is not one of the channels {list(channels)}")
    notes = []
    if pp.target_spacing is not None:
        target = tuple(float(v) for v in pp.target_spacing)
        if min(target) <= 0:
            raise UsageError(f"config 'preprocess.target_spacing': expected positive sizes in mm, got {list(target)}")
        notes.append("target spacing from the config")
    else:
        target = target_spacing_from(spacings, shapes)
    sp = np.asarray(spacings, dtype=float)
    sz = np.asarray(shapes, dtype=float)
    resampled = sz * sp / np.asarray(target)
    median = np.round(np.median(resampled, axis=0)).astype(int)
    if pc.patch_size is not None:
        patch = tuple(int(v) for v in pc.patch_size)
        net = plan_topology(target, patch, min_feature_map=pc.min_feature_map, max_stages=pc.max_stages,
                            base_features=pc.base_features, max_features=pc.max_features, architecture=pc.architecture)
        notes.append("patch size from the config")
    else:
        patch, net = _fit_patch(median, target, len(channels), pc)
    if pc.kernel_sizes is not None or pc.strides is not None:
        if pc.kernel_sizes is None or pc.strides is None or len(pc.kernel_sizes) != len(pc.strides):
            raise UsageError("config 'plan.kernel_sizes' and 'plan.strides': give both, with one entry per stage")
        filters = tuple(min(pc.base_features * 2**i, pc.max_features) for i in range(len(pc.strides)))
        net = NetworkPlan(tuple(pc.kernel_sizes), tuple(pc.strides), filters,
                          encoder_blocks=encoder_blocks_for(pc.architecture, len(pc.strides)))
        notes.append("topology from the config")
    net = dataclasses.replace(net, deep_supervision=pc.deep_supervision)
    div = net.divisor
    if any(p % d for p, d in zip(patch, div)):
        raise UsageError(
            f"config 'plan.patch_size' {list(patch)}: must be a multiple of {list(div)} along each axis for this topology "
            f"(strides {[list(s) for s in net.strides]}); e.g. {[max(d, (p // d) * d) for p, d in zip(patch, div)]}"
        )
    if pc.batch_size is not None:
        batch = pc.batch_size
        notes.append("batch size from the config")
    else:
        batch = 2
        cap = max(2, int(0.05 * float(np.sum(np.prod(resampled, axis=1))) / float(np.prod(patch))))
        while batch < cap and estimate_memory_gb(patch, net, batch + 1, len(channels)) <= pc.gpu_memory_gb:
            batch += 1
    if batch < 1:
        raise UsageError(f"config 'plan.batch_size': expected at least 1, got {batch}")
    return Plan(
        channels=tuple(channels),
        reference_channel=ref,
        classes=tuple(classes),
        ignore_value=ignore_value,
        threshold=threshold,
        target_spacing=tuple(float(v) for v in target),
        orientation=pp.orientation,
        crop_margin_mm=pp.crop_margin_mm,
        head_threshold=pp.head_threshold,
        normalization=normalization_schemes(pp.normalization, channels),
        image_interpolation=pp.image_interpolation,
        affine_tolerance=pp.affine_tolerance,
        patch_size=tuple(int(v) for v in patch),
        batch_size=int(batch),
        network=net,
        median_shape=tuple(int(v) for v in median),
        memory_estimate_gb=round(estimate_memory_gb(patch, net, batch, len(channels)), 2),
        notes=tuple(notes),
    )
