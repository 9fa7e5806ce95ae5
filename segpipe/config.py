"""Typed, frozen experiment configuration.

A config is a YAML file (``configs/*.yaml``) with the sections below; every key has a default, unknown keys are
rejected with a "did you mean", and every value is type-checked with the dotted name in the message. On the
command line, ``section.key=value`` overrides a value (the value is read as YAML: ``plan.patch_size=[64,64,32]``).

Sections: ``data`` (which channel is the reference grid), ``preprocess`` (what shapes the cache), ``plan``
(network, patch and batch overrides; ``null`` means "from the dataset fingerprint"), ``train`` (optimisation),
``loss`` (spec, schedule, term options), ``infer`` (inference defaults).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from segpipe.errors import SegpipeError, UsageError, did_you_mean

__all__ = [
    "Config",
    "DataConfig",
    "InferConfig",
    "LossConfig",
    "PlanConfig",
    "PreprocessConfig",
    "TrainConfig",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "load_config",
]


@dataclass(frozen=True)
class _Range:
    """The values a numeric key may take (each element, for a tuple); checked when a config is read."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def describe(self) -> str:
        def num(v: float) -> str:
            return str(int(v)) if float(v).is_integer() else f"{v:g}"

        lo = None if self.lo is None else num(self.lo)
        hi = None if self.hi is None else num(self.hi)
        if hi is None:
            return f"more than {lo}" if self.lo_open else f"at least {lo}"
        if lo is None:
            return f"less than {hi}" if self.hi_open else f"at most {hi}"
        return f"a value in {'(' if self.lo_open else '['}{lo}, {hi}{')' if self.hi_open else ']'}"

    def check(self, value: Any, where: str) -> None:
        if isinstance(value, (tuple, list)):
            for i, v in enumerate(value):
                self.check(v, f"{where}[{i}]")
            return
        if value is None:
            return
        bad = (self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo)) or \
              (self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi))
        if bad:
            raise UsageError(f"config '{where}': expected {self.describe()}, got {value!r}")


def _ranged(default: Any, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False) -> Any:
    return field(default=default, metadata={"range": _Range(lo, hi, lo_open, hi_open)})


@dataclass(frozen=True)
class DataConfig:
    #: channel whose grid every other channel and the label are resampled onto (default: the first)
    reference_channel: str | None = None


@dataclass(frozen=True)
class PreprocessConfig:
    #: target voxel size in mm (x, y, z in RAS order); null: from the fingerprint (median, nnU-Net's anisotropy rule)
    target_spacing: tuple[float, float, float] | None = _ranged(None, 0, lo_open=True)
    orientation: str = "RAS"
    #: margin kept around the head when cropping to it (mm)
    crop_margin_mm: float = _ranged(8.0, 0)
    #: a voxel is head when some channel exceeds this fraction of its 99th percentile (before smoothing)
    head_threshold: float = _ranged(0.08, 0, 1, hi_open=True)
    #: intensity normalisation per channel (nnU-Net's schemes). "zscore": each case over its head mask, 0 outside
    #: the head. "ct": one transform for every case, from the training set's lesion voxels: clip to their 0.5 and
    #: 99.5 percentiles, subtract their mean, divide by their standard deviation (Hounsfield units mean the same in
    #: every scan, so a case's own statistics would throw information away). "none": as read. "auto" (the default):
    #: nnU-Net's rule by channel name, "ct" for a channel named ct, "zscore" for the others. A mapping
    #: {channel: scheme} sets channels one by one; the others follow "auto".
    normalization: Literal["auto", "zscore", "ct", "none"] | dict[str, Literal["zscore", "ct", "none"]] = "auto"
    #: interpolation of image channels when resampling (labels always use nearest neighbour)
    image_interpolation: Literal["bilinear", "nearest"] = "bilinear"
    #: relative tolerance when comparing affines of channels and label (real files differ by ~1e-7)
    affine_tolerance: float = _ranged(1e-4, 0, lo_open=True)


@dataclass(frozen=True)
class PlanConfig:
    """Overrides of the plan derived from the fingerprint; ``null`` keeps the derived value."""

    patch_size: tuple[int, int, int] | None = _ranged(None, 1)
    batch_size: int | None = _ranged(None, 1)
    #: per-stage convolution kernel sizes and strides (nnU-Net style); null: from spacing and patch size
    kernel_sizes: tuple[tuple[int, int, int], ...] | None = _ranged(None, 1)
    strides: tuple[tuple[int, int, int], ...] | None = _ranged(None, 1)
    #: feature maps of the first stage, doubled per stage up to ``max_features``
    base_features: int = _ranged(32, 1)
    max_features: int = _ranged(320, 1)
    #: GPU memory the patch and batch size are planned for (GiB)
    gpu_memory_gb: float = _ranged(10.0, 0, lo_open=True)
    #: smallest edge of the bottleneck feature map (voxels)
    min_feature_map: int = _ranged(4, 1)
    max_stages: int = _ranged(6, 1)
    deep_supervision: bool = True
    #: "plain": one block of two convolutions per encoder stage (nnU-Net's default U-Net); "resenc": residual
    #: blocks, 1, 3, 4, 6, 6, ... per stage (nnU-Net's residual encoder presets, its recommended configuration
    #: since v2.5; raise gpu_memory_gb to 24 for the size of its ResEnc L)
    architecture: Literal["plain", "resenc"] = "plain"


@dataclass(frozen=True)
class LossConfig:
    spec: str = "dice+boundary"
    schedule: str = "rebalance"
    #: per-term options, e.g. {focal: {gamma: 2.0}, dice: {batch: true}}
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: boundary term at every deep-supervision output ("all") or at full resolution only ("full")
    ds_boundary: Literal["all", "full"] = "all"


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = _ranged(100, 1)
    iterations_per_epoch: int = _ranged(250, 1)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    learning_rate: float = _ranged(0.01, 0)
    weight_decay: float = _ranged(3e-5, 0)
    momentum: float = _ranged(0.99, 0, 1, hi_open=True)
    #: poly learning-rate decay exponent (nnU-Net: 0.9)
    poly_exponent: float = _ranged(0.9, 0)
    grad_clip: float = _ranged(12.0, 0, lo_open=True)
    #: share of each batch centred on a lesion voxel (nnU-Net: a third)
    foreground_fraction: float = _ranged(0.34, 0, 1)
    #: loader processes per training process; null (the default): 2 on the CPU (the step needs the cores), on
    #: CUDA the machine's cores less two, shared by the local ranks, at most 12 (nnU-Net's default)
    num_workers: int | None = _ranged(None, 0)
    amp: bool = True
    #: auto: bfloat16 on GPUs that compute in it (NVIDIA compute capability 8.0 and up), else float16 with a
    #: gradient scaler (V100, T4: cuDNN has no bfloat16 convolutions there)
    amp_dtype: Literal["auto", "bfloat16", "float16"] = "auto"
    compile: bool = False
    deterministic: bool = False
    seed: int = _ranged(0, 0, 2**32 - 1)
    validate_every: int = _ranged(1, 1)
    #: validation cases per epoch at most (0: all of the fold's)
    max_validation_cases: int = _ranged(0, 0)
    best_metric: str = "dice"
    augmentation: bool = True
    #: where a rotated or scaled patch is resampled: "device" (the training device, after the transfer: a GPU
    #: does it in well under a millisecond, and the workers are freed of half their work), "workers" (the
    #: loader's CPU processes), or "auto" (device on CUDA, workers otherwise)
    augment_on: Literal["auto", "workers", "device"] = "auto"
    log_every: int = _ranged(50, 1)
    #: fine-tuning: start from this run folder's or checkpoint's weights (output heads fresh when the classes
    #: differ; see segpipe.training.finetune); null: a fresh network
    init_from: str | None = None


@dataclass(frozen=True)
class InferConfig:
    overlap: float = _ranged(0.5, 0, 1, hi_open=True)
    tta: bool = True
    min_lesion_mm3: float = _ranged(0.0, 0)
    sw_batch_size: int = _ranged(2, 1)
    #: DICOM series rules per channel, on top of the built-in ones (segpipe.io.dicom.DEFAULT_RULES), e.g.
    #: {dwi: {description: "diff|trace", exclude: "adc", modality: MR, min_b_value: 800}}
    dicom_rules: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class Config:
    name: str = "experiment"
    data: DataConfig = DataConfig()
    preprocess: PreprocessConfig = PreprocessConfig()
    plan: PlanConfig = PlanConfig()
    train: TrainConfig = TrainConfig()
    loss: LossConfig = LossConfig()
    infer: InferConfig = InferConfig()
    #: where it was loaded from (not part of the config's content)
    source: str | None = field(default=None, compare=False)


# -- conversion ---------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " or ".join(repr(a) for a in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin is tuple:
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of ({_type_name(args[0])})"
        return f"a list of {len(args)} ({', '.join(_type_name(a) for a in args)})"
    if origin is dict:
        return "a mapping"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, where: str) -> Any:
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        mappings = [a for a in args if get_origin(a) is dict]
        if isinstance(value, Mapping) and len(mappings) == 1:  # its own message names the key that is wrong
            return _convert(value, mappings[0], where)
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, where)
            except UsageError as exc:
                errors.append(exc)
        raise UsageError(f"config '{where}': expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in get_args(tp):
            raise UsageError(f"config '{where}': expected {_type_name(tp)}, got {value!r}{did_you_mean(str(value), [str(a) for a in get_args(tp)])}")
        return value
    if origin is tuple:
        args = get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise UsageError(f"config '{where}': expected {_type_name(tp)}, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise UsageError(f"config '{where}': expected {_type_name(tp)}, got {len(value)} values: {value!r}")
        return tuple(_convert(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise UsageError(f"config '{where}': expected a mapping, got {value!r}")
        key_t, val_t = get_args(tp)
        return {str(k): (_convert(v, val_t, f"{where}.{k}") if val_t is not Any else _plain(v)) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return _from_dict(tp, value, where)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise UsageError(f"config '{where}': expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UsageError(f"config '{where}': expected a whole number, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UsageError(f"config '{where}': expected a number, got {value!r}")
        if not math.isfinite(value):
            raise UsageError(f"config '{where}': expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise UsageError(f"config '{where}': expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp!r} at {where}")


def _plain(v: Any) -> Any:
    if isinstance(v, Mapping):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def _from_dict(cls: type, data: Any, where: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise UsageError(f"config '{where or 'top level'}': expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "source"}
    kwargs = {}
    for key, value in data.items():
        dotted = f"{where}.{key}" if where else str(key)
        if key not in fields:
            raise UsageError(f"config: unknown key '{dotted}'{did_you_mean(str(key), fields)}; valid keys here: {', '.join(fields)}")
        kwargs[key] = _convert(value, hints[key], dotted)
        if "range" in fields[key].metadata:
            fields[key].metadata["range"].check(kwargs[key], dotted)
    return cls(**kwargs)


def config_from_dict(data: Mapping[str, Any], source: str | None = None) -> Config:
    cfg = _from_dict(Config, data, "")
    return dataclasses.replace(cfg, source=source)


def config_to_dict(cfg: Any) -> Any:
    """Plain (YAML/JSON-able) dict of a config or any of its sections."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: config_to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.name != "source"}
    if isinstance(cfg, tuple):
        return [config_to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: config_to_dict(v) for k, v in cfg.items()}
    return cfg


def _parse_override(text: str) -> tuple[list[str], Any]:
    key, eq, value = text.partition("=")
    if not eq or not key.strip():
        raise UsageError(f"override '{text}': expected section.key=value, e.g. train.epochs=10")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    return key.strip().split("."), parsed


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides to a plain config dict (a copy is returned)."""
    out = json.loads(json.dumps(data, default=list))
    for text in overrides:
        path, value = _parse_override(text)
        node = out
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise UsageError(f"override '{text}': '{part}' is a value, not a section")
            node = child
        node[path[-1]] = value
    return out


def builtin_configs() -> dict[str, Path]:
    """The configs that come with segpipe (``configs/*.yaml``), by name: installed as ``segpipe/configs``, or,
    in a source checkout, next to the package."""
    here = Path(__file__).resolve().parent
    for folder in (here / "configs", here.parent / "configs"):
        found = {p.stem: p for p in sorted(folder.glob("*.yaml"))}
        if found:
            return found
    return {}


def resolve_config_path(path: str | Path) -> Path:
    """A config file, or the name of a built-in one (``isles22``, ``wmh17``, ``demo``)."""
    p = Path(path)
    # a folder of the same name in the working directory (the demo's, a dataset's) does not hide a built-in
    if not p.is_file() and p.suffix == "" and len(p.parts) == 1:
        builtin = builtin_configs()
        if p.name in builtin:
            return builtin[p.name]
    return p


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML config, given as a file or as the name of a built-in one (or the defaults when ``path`` is
    None), and apply dotted overrides."""
    data: dict[str, Any] = {}
    source = None
    if path is not None:
        p = resolve_config_path(path)
        source = str(p)
        try:
            text = p.read_text(encoding="utf-8")
        except FileNotFoundError:
            builtin = builtin_configs()
            hint = did_you_mean(p.name, builtin) if p.suffix == "" and len(p.parts) == 1 else ""
            raise SegpipeError(f"--config '{p}': file not found{hint}; give a YAML file or the name of a built-in config "
                               f"({', '.join(builtin) or 'none found'})") from None
        except IsADirectoryError:
            raise SegpipeError(f"--config '{p}': expected a YAML file, found a folder; give the config file in it, or the name "
                               f"of a built-in config ({', '.join(builtin_configs()) or 'none found'})") from None
        except OSError as exc:
            raise SegpipeError(f"--config '{p}': cannot be read ({exc})") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            raise SegpipeError(f"--config '{p}': invalid YAML{at}: {getattr(exc, 'problem', exc)}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise SegpipeError(f"--config '{p}': expected a mapping of sections at the top level, found {type(loaded).__name__}")
        data = loaded
    data = apply_overrides(data, overrides)
    try:
        return config_from_dict(data, source)
    except UsageError as exc:
        where = re.match(r"config(?: '([^']+)'|: unknown key '([^']+)')", exc.message)
        key = where and (where.group(1) or where.group(2))
        given = [o for o in overrides if key and re.match(re.escape(o.partition("=")[0].strip()) + r"($|[.\[])", key)]
        if given:
            raise UsageError(f"{exc.message} (from the override {given[-1]})") from None
        if source is not None:
            raise UsageError(f"{exc.message} (in {source})") from None
        raise
