"""Segment a case with a trained model, in the input's own geometry.

The checkpoint carries the plan, so a :class:`Predictor` needs nothing but the model: it runs the training
preprocessing chain (:func:`segpipe.transforms.preprocessing.build_preprocessing`, without a label), the
sliding window (Gaussian, overlap from the config) with optional mirror test-time augmentation, and maps the
class probabilities back onto the reference channel's original grid by world coordinates (MONAI
``ResampleToMatch``, linear, on the prediction device): crop, spacing and orientation are undone in one
resampling, and voxels outside the preprocessed crop are background. Where the two grids differ only by
axis order, flips and a whole-voxel shift (the spacing was already the target's), that resampling is exact
index arithmetic, done as such (:func:`resample_to_grid`). Then the argmax, and connected components smaller than
``min_lesion_mm3`` (26-connectivity, per class) are removed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms.spatial.array import ResampleToMatch
from scipy import ndimage

from segpipe.config import InferConfig, config_from_dict
from segpipe.errors import SegpipeError
from segpipe.inference.postprocess import remove_small_components
from segpipe.inference.sliding import class_argmax, predict_volume
from segpipe.io.nifti import Geometry, read_geometry
from segpipe.models import build_network
from segpipe.planning import Plan
from segpipe.precision import autocast_dtype
from segpipe.training.checkpoint import CHECKPOINT_NAMES, load_checkpoint, resolve_checkpoint, run_subfolders
from segpipe.transforms.preprocessing import build_preprocessing, channel_key, run_chain

__all__ = ["Prediction", "PreparedCase", "Predictor", "prepare_case", "remove_small_components", "resample_to_grid", "resolve_model_path"]

log = logging.getLogger(__name__)


def _index_map(src_affine: np.ndarray, dst_affine: np.ndarray, tol: float = 1e-4) -> tuple[list[int], list[int], list[int]] | None:
    """If every destination voxel sits exactly on a source voxel by axis order, flips and a whole-voxel shift,
    return (source axis, sign, offset) per destination axis (source index = sign * destination index +
    offset); else None."""
    m = np.linalg.solve(np.asarray(src_affine, dtype=np.float64), np.asarray(dst_affine, dtype=np.float64))
    rot, shift = m[:3, :3], m[:3, 3]
    if not (np.allclose(rot, np.round(rot), atol=tol) and np.allclose(shift, np.round(shift), atol=1e-3)):
        return None
    r = np.round(rot).astype(int)
    if not (np.abs(r).sum(axis=0) == 1).all() or not (np.abs(r).sum(axis=1) == 1).all():
        return None
    axes = [int(np.flatnonzero(r[:, i])[0]) for i in range(3)]
    return axes, [int(r[axes[i], i]) for i in range(3)], [int(round(shift[axes[i]])) for i in range(3)]


def resample_to_grid(probs: torch.Tensor, src_affine: np.ndarray, dst_shape: tuple[int, ...], dst_affine: np.ndarray) -> torch.Tensor:
    """Class probabilities ``(K, ...)`` on the grid ``src_affine`` resampled linearly, in world coordinates, onto
    the grid (``dst_shape``, ``dst_affine``), zero outside the source; on the tensor's device. Exact index
    arithmetic where the grids differ by axis order, flips and whole voxels; MONAI ``ResampleToMatch`` else."""
    mapping = _index_map(src_affine, dst_affine)
    if mapping is None:
        src = MetaTensor(probs, affine=torch.as_tensor(src_affine))
        dst = MetaTensor(torch.zeros((1, *dst_shape), device=probs.device), affine=torch.as_tensor(np.asarray(dst_affine)))
        back = ResampleToMatch(mode="bilinear", padding_mode="zeros", dtype=torch.float32)(src, img_dst=dst)
        return back.as_tensor() if hasattr(back, "as_tensor") else back
    axes, signs, offsets = mapping
    arr = probs.permute(0, *[a + 1 for a in axes])  # destination axis i now runs along source axis axes[i]
    flip = [i + 1 for i in range(3) if signs[i] < 0]
    if flip:
        arr = torch.flip(arr, flip)
    # a flipped axis of length n reads source index -d + t at position d + (n - 1 - t)
    starts = [offsets[i] if signs[i] > 0 else arr.shape[i + 1] - 1 - offsets[i] for i in range(3)]
    out = torch.zeros((probs.shape[0], *dst_shape), dtype=torch.float32, device=probs.device)
    src_sl, dst_sl = [slice(None)], [slice(None)]
    for i in range(3):
        lo, hi = max(starts[i], 0), min(starts[i] + dst_shape[i], arr.shape[i + 1])
        if hi <= lo:
            return out  # no overlap: all background
        src_sl.append(slice(lo, hi))
        dst_sl.append(slice(lo - starts[i], hi - starts[i]))
    out[tuple(dst_sl)] = arr[tuple(src_sl)].float()
    return out


def resolve_model_path(model: str | Path) -> Path:
    """A run folder (its ``checkpoint_best.pt``, else ``checkpoint_latest.pt``) or a checkpoint file."""
    return resolve_checkpoint(model, option="--model")


def resolve_model_paths(models: Sequence[str | Path]) -> list[Path]:
    """The checkpoints of ``--model`` arguments: a run folder or checkpoint each, or a folder holding the runs
    of the folds of one cross-validation (each fold once, as ``segpipe train --fold F`` records it), which
    stands for all of them, as nnU-Net predicts with all its folds. A folder of runs that are not such folds
    (a fold twice, a ``--fold all`` run, unrecorded folds) is refused, naming them: its runs may be different
    experiments, not an ensemble."""
    paths: list[Path] = []
    for m in models:
        p = Path(m)
        runs = run_subfolders(p) if p.is_dir() else []
        if not p.is_dir() or any((p / n).is_file() for n in CHECKPOINT_NAMES) or len(runs) < 2:
            paths.append(resolve_model_path(p))
            continue
        found = [resolve_model_path(r) for r in runs]
        held = [held_out_cases(load_checkpoint(f, mmap=True)) for f in found]  # the metadata only: no weights read
        names = ", ".join(r.name for r in runs)
        problem = ""
        if any(h is None for h in held):
            problem = f"{runs[held.index(None)].name} does not record its fold"
        elif any(not h for h in held):
            problem = f"{runs[held.index(())].name} was trained on every case (--fold all)"
        else:
            seen: dict[str, str] = {}
            for r, h in zip(runs, held):
                twice = next((c for c in h if c in seen), None)
                if twice is not None:
                    problem = f"{seen[twice]} and {r.name} both held out case {twice}"
                    break
                seen.update({c: r.name for c in h})
        if problem:
            raise SegpipeError(f"--model '{p}': its runs ({names}) are not the folds of one cross-validation ({problem}); give the runs "
                               "to ensemble each with its own --model")
        log.info("--model %s: the %d folds in it (%s), as an ensemble", p, len(runs), names)
        paths += found
    return paths


@dataclass
class Prediction:
    mask: np.ndarray  # (x, y, z) uint8 on the reference channel's grid
    reference: Geometry  # the reference channel's grid (affine, shape, header)
    probabilities: np.ndarray | None = None  # (K, x, y, z) float32 on the same grid, when asked for
    removed_components: int = 0
    seconds: dict[str, float] = field(default_factory=dict)

    def lesion_stats(self, classes: tuple[str, ...]) -> dict[str, Any]:
        spacing = self.reference.spacing
        out = {}
        for k in range(1, len(classes)):
            m = self.mask == k
            _, n = ndimage.label(m, structure=np.ones((3, 3, 3), bool))
            out[classes[k]] = {"lesions": int(n), "volume_ml": float(m.sum()) * float(np.prod(spacing)) / 1000.0}
        return out


class Predictor:
    """A model, or an ensemble of models (e.g. the folds of a cross-validation) whose class probabilities are
    averaged, as nnU-Net does over its folds. The members share the preprocessing (one plan key); their
    networks and patch sizes may differ."""

    def __init__(self, net: torch.nn.Module, plan: Plan, *, device: torch.device, overlap: float = 0.5, sw_batch_size: int = 2,
                 amp: bool = True, source: str | Sequence[str] = "", infer_config: InferConfig | None = None,
                 others: Sequence[tuple[torch.nn.Module, Plan]] = (), held_out: Sequence[tuple[str, ...] | None] = ()) -> None:
        self.net = net.eval()
        self.plan = plan
        self.members = [(self.net, plan), *((n.eval(), p) for n, p in others)]
        self.infer_config = infer_config or InferConfig(overlap=overlap, sw_batch_size=sw_batch_size)
        self.device = device
        self.overlap = overlap
        self.sw_batch_size = sw_batch_size
        self.amp_dtype = autocast_dtype(device) if amp else None  # bfloat16, or float16 where that is only emulated
        self.sources = [source] if isinstance(source, str) else list(source)  # one per member
        # per member: the cases its training held out (its fold's validation cases), None where not recorded
        self.held_out = list(held_out) or [None] * len(self.members)

    @classmethod
    def load(cls, model: str | Path | Sequence[str | Path], device: str = "auto", infer_config: InferConfig | None = None) -> Predictor:
        """Load a model, or several as an ensemble (same preprocessing, checked); ``infer_config`` (from
        ``--config``) replaces the inference settings the first was trained with."""
        from segpipe.training.trainer import resolve_device

        models = [model] if isinstance(model, (str, Path)) else list(model)
        if not models:
            raise SegpipeError("--model: give a run folder or a checkpoint file")
        paths = resolve_model_paths(models)
        if len(set(paths)) < len(paths):
            raise SegpipeError(f"--model: the same checkpoint is given twice ({', '.join(str(p) for p in paths)}); an ensemble needs different models")
        dev = resolve_device(device)
        loaded = [_load_member(p, dev) for p in paths]
        net, plan, cfg, _ = loaded[0]
        for path, (_, other, _, _) in zip(paths[1:], loaded[1:]):
            a, b = plan.preprocessing_key(), other.preprocessing_key()
            differ = [k for k in a if a[k] != b.get(k)]
            if differ:
                raise SegpipeError(
                    f"--model '{path}': its preprocessing differs from that of '{paths[0]}' ({', '.join(differ)}); an ensemble needs "
                    "models trained on caches made with the same settings (e.g. the folds of one cache)"
                )
        if len(paths) > 1:
            log.info("ensemble of %d models: their class probabilities are averaged", len(paths))
        icfg = infer_config or cfg.infer
        return cls(net, plan, device=dev, overlap=icfg.overlap, sw_batch_size=icfg.sw_batch_size, amp=cfg.train.amp,
                   source=[str(p) for p in paths], infer_config=icfg, others=[(n, p) for n, p, _, _ in loaded[1:]],
                   held_out=[h for _, _, _, h in loaded])

    @property
    def source(self) -> str:
        """The (first) model's checkpoint."""
        return self.sources[0]

    def predict(self, channels: dict[str, str | Path], *, tta: bool = True, min_lesion_mm3: float = 0.0,
                keep_probabilities: bool = False) -> Prediction:
        """Segment one case given one file per model channel (NIfTI, or MetaImage/NRRD)."""
        return self.segment(prepare_case(self.plan, channels), tta=tta, min_lesion_mm3=min_lesion_mm3,
                            keep_probabilities=keep_probabilities)

    def segment(self, case: PreparedCase, *, tta: bool = True, min_lesion_mm3: float = 0.0,
                keep_probabilities: bool = False, members: Sequence[int] | None = None, overlap: float | None = None) -> Prediction:
        """The network and the inversion for a case :func:`prepare_case` made (possibly in another process);
        ``members``: the indices of the ensemble's members to use (default: all); ``overlap``: of the sliding
        windows (default: the model's ``infer.overlap``)."""
        t1 = time.perf_counter()
        probs = None
        chosen = [self.members[i] for i in members] if members is not None else self.members
        if not chosen:
            raise ValueError("segment: no member chosen")
        for net, plan in chosen:
            p = predict_volume(net, case.image, plan.patch_size, overlap=self.overlap if overlap is None else overlap,
                               sw_batch_size=self.sw_batch_size,
                               device=self.device, tta=tta, amp_dtype=self.amp_dtype, keep_on_device=True)
            probs = p if probs is None else probs.add_(p)
        if len(chosen) > 1:
            probs /= len(chosen)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        ref = case.reference
        back = resample_to_grid(probs, case.affine, ref.shape, ref.affine)
        mask = class_argmax(back).cpu().numpy()
        mask, removed = remove_small_components(mask, ref.spacing, min_lesion_mm3)
        t3 = time.perf_counter()
        return Prediction(mask, ref, back.cpu().numpy() if keep_probabilities else None, removed,
                          {"preprocess": case.seconds, "network": t2 - t1, "invert": t3 - t2})


def _load_member(path: Path, dev: torch.device) -> tuple[torch.nn.Module, Plan, Any, tuple[str, ...] | None]:
    ckpt = load_checkpoint(path, map_location="cpu")
    try:
        plan = Plan.from_json(ckpt["plan"])
        cfg = config_from_dict(ckpt["config"])
    except (KeyError, TypeError, ValueError) as exc:
        raise SegpipeError(f"--model '{path}': the checkpoint has no usable plan/config ({exc}); train it again with this segpipe") from None
    net = build_network(plan)
    try:
        net.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise SegpipeError(f"--model '{path}': weights do not fit the network of its plan ({str(exc).splitlines()[0]})") from None
    net.to(dev)
    log.info("model %s (epoch %s): channels %s, classes %s, on %s", path, ckpt.get("epoch"), ", ".join(plan.channels),
             ", ".join(plan.classes), dev)
    return net, plan, cfg, held_out_cases(ckpt)


def held_out_cases(ckpt: dict[str, Any]) -> tuple[str, ...] | None:
    """The cases a checkpoint's training held out (its fold's validation cases; none for ``--fold all``), or
    None when the checkpoint does not record them (made by an earlier segpipe)."""
    held = ckpt.get("validation_cases")
    return tuple(str(c) for c in held) if isinstance(held, list) else None


@dataclass
class PreparedCase:
    """A case preprocessed for the network: what :meth:`Predictor.segment` needs, picklable (a preprocessing
    process can make it while the network works on the case before)."""

    image: torch.Tensor | np.ndarray  # (C, X, Y, Z) float32 on the CPU
    affine: np.ndarray  # the preprocessed grid
    reference: Geometry  # the reference channel's original grid, where the mask goes
    seconds: float = 0.0


def prepare_case(plan: Plan, channels: dict[str, str | Path]) -> PreparedCase:
    """Run the training preprocessing chain (without a label) on one file per model channel."""
    missing = [c for c in plan.channels if c not in channels]
    extra = [c for c in channels if c not in plan.channels]
    if missing or extra:
        raise SegpipeError(
            f"the model expects channels {', '.join(plan.channels)}; got {', '.join(channels) or 'none'}"
            + (f" (missing {', '.join(missing)})" if missing else "") + (f" (unknown {', '.join(extra)})" if extra else "")
        )
    t0 = time.perf_counter()
    chain = build_preprocessing(plan, with_label=False)
    data = run_chain(chain, {channel_key(c): str(channels[c]) for c in plan.channels})
    image = data["image"]
    ref = read_geometry(channels[plan.reference_channel], what=f"channel '{plan.reference_channel}'")
    return PreparedCase(image.as_tensor().contiguous(), np.asarray(image.affine, dtype=np.float64), ref, time.perf_counter() - t0)
