"""The preprocessing chain: one function builds it for ``segpipe preprocess``, training validation and
``segpipe infer``, so the three can never drift apart.

Steps (MONAI dictionary transforms; segpipe writes only what MONAI has no transform for):

1. ``LoadVolumed`` (segpipe): read each channel and the label (nibabel; SimpleITK for MetaImage/NRRD),
   channel-first, with one-line errors naming the file (unreadable, 4D, NaN/inf voxels, constant image).
2. ``CleanLabeld`` (segpipe): the ignore value becomes 255, binary labels are thresholded (``> 0.5``: real
   masks store 0.99999999977 or 255), values outside the declared classes are an error.
3. ``MatchReferenceGridd`` (segpipe, resampling by MONAI's ``ResampleToMatch``): channels on another grid
   (ISLES 2022 FLAIR: 0.45x0.45x5 mm, 512x512x29) are resampled in world coordinates onto the reference
   channel's grid; the label must already lie on that grid (shape equal, affine within a tolerance).
4. MONAI ``ConcatItemsd``, ``Orientationd`` (RAS), ``Spacingd`` (target spacing; the label by nearest
   neighbour: on the real ISLES case the lesion volume stays within 3 % at 1, 2 or 3 mm, where linear
   interpolation of the one-hot label and a 0.5 threshold loses up to 20 % by shaving the tiny lesions).
5. ``HeadMaskd`` (segpipe): head foreground (any smoothed channel above a fraction of its intensity range;
   largest component, closed, holes filled). The channels are smoothed and normalised (7.) side by side in
   threads, with SciPy's results bit for bit.
6. MONAI ``CropForegroundd`` on the head mask with a margin in mm.
7. ``ZScored`` (segpipe): per-channel normalisation: z-score over the head, 0 outside it; or, for CT ("ct"),
   nnU-Net's clip and scale by the training set's lesion-voxel statistics (the plan's ``intensity``).
8. ``SignedDistanced`` (segpipe): one signed distance map per foreground class on the whole preprocessed
   volume, in mm (:func:`segpipe.transforms.signed_distance_map`); ignored voxels get 0.

The output dictionary holds ``image`` (C, X, Y, Z) float32, ``label`` (1, X, Y, Z) uint8 (255 = ignore),
``sdm`` (K-1, X, Y, Z) float32, all MONAI ``MetaTensor`` with the preprocessed affine, and ``stats``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (
    CastToTyped,
    Compose,
    ConcatItemsd,
    CropForegroundd,
    DeleteItemsd,
    MapTransform,
    Orientationd,
    Spacingd,
)
from monai.transforms.spatial.array import ResampleToMatch
from scipy import ndimage

from segpipe.errors import SegpipeError
from segpipe.io.nifti import read_volume, spacing_of
from segpipe.transforms.distance import signed_distance_maps

__all__ = [
    "IGNORE_INDEX",
    "CleanLabeld",
    "HeadMaskd",
    "LoadVolumed",
    "loading_steps",
    "MatchReferenceGridd",
    "SignedDistanced",
    "ZScored",
    "build_preprocessing",
    "run_chain",
    "channel_key",
    "head_mask",
]

log = logging.getLogger(__name__)

IGNORE_INDEX = 255


def channel_key(name: str) -> str:
    return f"image_{name}"


def _affine(t: Any) -> np.ndarray:
    return np.asarray(t.affine if isinstance(t, MetaTensor) else t, dtype=np.float64)


def _meta(t: MetaTensor) -> dict[str, Any]:
    """The meta data of ``t`` without its affine (given separately when a new tensor is made)."""
    return {k: v for k, v in t.meta.items() if k != "affine"}


def thread_map(fn: Callable[[Any], Any], items: Iterable[Any]) -> list[Any]:
    """``[fn(x) for x in items]`` in up to ``torch.get_num_threads()`` threads: SciPy's filters and NumPy's
    arithmetic and sorting release the GIL, so a case's channels are filtered and normalised side by side.
    With one thread (DataLoader workers, the processes of a preprocessing pool) they run in turn, as before.
    In order; the first item's error is raised first."""
    items = list(items)
    n = min(len(items), torch.get_num_threads())
    if n <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(n, thread_name_prefix="segpipe-prep") as pool:
        return list(pool.map(fn, items))


def _like(t: MetaTensor, data: torch.Tensor | np.ndarray, affine: Any = None) -> MetaTensor:
    """A new MetaTensor holding ``data`` with the geometry and meta data of ``t`` (or ``affine``)."""
    if isinstance(data, np.ndarray):
        data = torch.from_numpy(data)
    return MetaTensor(data, affine=t.affine if affine is None else affine, meta=_meta(t))


class LoadVolumed(MapTransform):
    """Read the files named by ``keys`` into channel-first ``MetaTensor`` with their affine.

    ``what`` maps a key to its role in messages ("channel 'dwi'", "label"). Images must be finite and not
    constant; labels are read as they are stored.
    """

    def __init__(self, keys: Sequence[str], what: Mapping[str, str], label_keys: Sequence[str] = ("label",)) -> None:
        super().__init__(keys, allow_missing_keys=True)
        self.what = dict(what)
        self.label_keys = set(label_keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        # one file after the other: read side by side (zlib releases the GIL), two gzipped 1 mm volumes took 0.55
        # instead of 0.94 s, but each reading thread's malloc arena kept its freed buffers: +120 MB peak on the
        # real ISLES case, whose small files read no faster
        for key in list(self.key_iterator(d)):
            d[key] = self._load(key, Path(d[key]))
        return d

    def _load(self, key: Hashable, path: Path) -> MetaTensor:
        what = self.what.get(key, str(key))
        is_label = key in self.label_keys
        vol = read_volume(path, what=what, dtype=np.float64 if is_label else np.float32)
        arr = vol.array
        if not is_label:
            finite = np.isfinite(arr)
            if not finite.all():
                bad = int((~finite).sum())
                raise SegpipeError(
                    f"{what} '{path}': {bad} voxels are NaN or infinite; repair or re-export the image "
                    "(e.g. replace them by 0 with a viewer or nibabel)"
                )
            lo, hi = float(arr.min()), float(arr.max())
            if lo == hi:
                raise SegpipeError(
                    f"{what} '{path}': every voxel is {lo:g}, an empty image; check the export (wrong series or file)"
                )
        else:
            if not np.isfinite(arr).all():
                raise SegpipeError(f"{what} '{path}': NaN or infinite values in the label; repair the mask")
        meta = {"filename_or_obj": str(path)}
        if vol.header is not None:
            meta["qform_code"] = int(vol.header["qform_code"])
            meta["sform_code"] = int(vol.header["sform_code"])
        t = torch.from_numpy(np.ascontiguousarray(arr if not is_label else arr.astype(np.float32)))[None]
        return MetaTensor(t, affine=torch.as_tensor(vol.affine, dtype=torch.float64), meta=meta)


class CleanLabeld(MapTransform):
    """Map the stored label values to class indices (see the module docstring)."""

    def __init__(self, key: str, num_classes: int, ignore_value: int | None, threshold: float | None, what: str = "label") -> None:
        super().__init__([key], allow_missing_keys=True)
        self.num_classes = num_classes
        self.ignore_value = ignore_value
        self.threshold = threshold
        self.what = what

    def clean(self, arr: np.ndarray, where: str) -> np.ndarray:
        ignore = np.zeros(arr.shape, dtype=bool) if self.ignore_value is None else np.isclose(arr, self.ignore_value)
        rest = arr[~ignore]
        if self.threshold is not None:
            values = np.unique(rest)
            two_level = len(values) <= 2 and values.min(initial=0) >= 0
            if rest.size and (rest.min() < 0 or (rest.max() > 1 + 1e-6 and not two_level)):
                shown = [float(v) for v in values[:6]]
                hint = (
                    f"declare them in the manifest's 'label' (classes, ignore_value{', e.g. ignore_value: 2' if 2 in values else ''})"
                    if len(values) > 2 else "check the file"
                )
                raise SegpipeError(
                    f"{self.what} '{where}': expected a binary mask (values in [0, 1], or two levels), found values {shown}; {hint}"
                )
            top = rest.max(initial=0)
            cut = self.threshold if top <= 1 + 1e-6 else self.threshold * top
            out = (arr > cut).astype(np.uint8)
        else:
            rounded = np.rint(rest)
            if not np.allclose(rest, rounded, atol=1e-3) or rounded.min(initial=0) < 0 or rounded.max(initial=0) >= self.num_classes:
                bad = np.unique(rest[(rounded < 0) | (rounded >= self.num_classes) | ~np.isclose(rest, rounded, atol=1e-3)])
                raise SegpipeError(
                    f"{self.what} '{where}': values {[float(v) for v in bad[:6]]} are outside the declared classes "
                    f"0..{self.num_classes - 1}; fix the manifest's 'label' (classes, ignore_value) or the file"
                )
            out = np.rint(arr).astype(np.uint8)
        out[ignore] = IGNORE_INDEX
        return out

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            t = d[key]
            where = t.meta.get("filename_or_obj", key) if isinstance(t, MetaTensor) else key
            cleaned = self.clean(np.asarray(t[0]), str(where))
            d[key] = _like(t, torch.from_numpy(cleaned)[None].float())
        return d


class MatchReferenceGridd(MapTransform):
    """Resample channels that live on another grid onto the reference channel's grid (MONAI's
    ``ResampleToMatch``, world coordinates); check that the label lies on the reference grid."""

    def __init__(self, channel_keys: Sequence[str], ref_key: str, label_key: str | None, *, tolerance: float = 1e-4,
                 mode: str = "bilinear", what: Mapping[str, str] | None = None) -> None:
        super().__init__(list(channel_keys), allow_missing_keys=True)
        self.ref_key = ref_key
        self.label_key = label_key
        self.tolerance = tolerance
        self.mode = mode
        self.what = dict(what or {})
        self.resampler = ResampleToMatch(mode=mode, padding_mode="zeros", dtype=np.float32)

    def same_grid(self, a: MetaTensor, b: MetaTensor) -> bool:
        if tuple(a.shape[1:]) != tuple(b.shape[1:]):
            return False
        aa, ab = _affine(a), _affine(b)
        scale = max(1.0, float(np.abs(ab).max()))
        return bool(np.abs(aa - ab).max() <= self.tolerance * scale)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        ref = d[self.ref_key]
        resampled = []
        for key in self.key_iterator(d):
            if key == self.ref_key or self.same_grid(d[key], ref):
                if key != self.ref_key:  # tiny header differences: take the reference geometry
                    d[key] = _like(d[key], d[key].as_tensor(), ref.affine)
                continue
            out = self.resampler(d[key], img_dst=ref)
            d[key] = _like(d[key], out.as_tensor().float(), ref.affine)
            resampled.append(key)
        if resampled:
            log.debug("resampled %s onto the grid of %s", resampled, self.ref_key)
        if self.label_key and self.label_key in d:
            lab = d[self.label_key]
            if not self.same_grid(lab, ref):
                ref_name = self.what.get(self.ref_key, self.ref_key)
                diff = float(np.abs(_affine(lab) - _affine(ref)).max())
                raise SegpipeError(
                    f"label '{lab.meta.get('filename_or_obj')}': not on the grid of {ref_name} "
                    f"'{ref.meta.get('filename_or_obj')}': shape {tuple(lab.shape[1:])} vs {tuple(ref.shape[1:])}, "
                    f"largest affine difference {diff:.3g} (tolerance {self.tolerance:g}); the mask must be drawn on "
                    "the reference channel (set data.reference_channel) or resampled onto it first"
                )
            d[self.label_key] = _like(lab, lab.as_tensor(), ref.affine)
        return d


def head_mask(image: np.ndarray, threshold: float = 0.08) -> np.ndarray:
    """Head foreground of a (C, X, Y, Z) image: after a light smoothing (so that noise in the air does not
    count), a voxel is head when some channel exceeds ``threshold`` of its 1st-99th percentile range; then
    the largest component, closed and with its holes filled. Each channel is smoothed in slabs side by side
    (:func:`smooth`), one channel after the other, so that one smoothed copy is alive at a time."""
    fg = np.zeros(image.shape[1:], dtype=bool)
    for ch in image:
        sm = smooth(np.asarray(ch, dtype=np.float32), sigma=1.0)
        lo, hi = (float(v) for v in np.percentile(sm, [1, 99]))
        if hi > lo:
            fg |= sm > lo + threshold * (hi - lo)
        del sm
    if not fg.any():
        return np.ones(image.shape[1:], dtype=bool)
    return tidy_mask(fg)


def smooth(volume: np.ndarray, sigma: float) -> np.ndarray:
    """``scipy.ndimage.gaussian_filter(volume, sigma)`` bit for bit, computed in slabs along the first axis side
    by side (:func:`thread_map`): a slab carries SciPy's kernel radius (``truncate=4``) of its neighbours' rows,
    so each of its own voxels sees exactly the rows it would on the whole volume (the later axes are filtered
    within a row; the volume's own edges are the slabs' edges there)."""
    radius = int(4.0 * sigma + 0.5)
    n = volume.shape[0]
    parts = max(1, min(torch.get_num_threads(), n // (4 * radius + 1)))
    bounds = np.linspace(0, n, parts + 1).round().astype(int)
    out = np.empty_like(volume)

    def one(a: int, b: int) -> None:
        lo, hi = max(a - radius, 0), min(b + radius, n)
        out[a:b] = ndimage.gaussian_filter(volume[lo:hi], sigma)[a - lo:b - lo]

    thread_map(lambda ab: one(*ab), [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a])
    return out


def tidy_mask(fg: np.ndarray) -> np.ndarray:
    """The largest component of ``fg``, closed (2 iterations) and with its holes filled."""
    lab, n = ndimage.label(fg)
    if n > 1:
        sizes = np.bincount(lab.ravel(), minlength=n + 1)[1:]
        fg = lab == (int(np.argmax(sizes)) + 1)
    # closing and hole filling in the head's box with a margin (4 voxels; the closing's dilation reaches 2 beyond
    # the head): the same result as on the whole volume (tested), since nothing beyond the margin can change and
    # the margin is background connected to the outside (17 % less time for a 1 mm head when it came in)
    box = tuple(slice(max(sl.start - 4, 0), min(sl.stop + 4, size)) for sl, size in zip(ndimage.find_objects(fg.astype(np.uint8))[0], fg.shape))
    sub = fg[box]
    out = np.zeros_like(fg)
    out[box] = fill_holes(binary_closing(sub, iterations=2) | sub)
    return out


def _faces(ndim: int, axis: int) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    """The index tuples of all but the first and all but the last position along ``axis``."""
    later = tuple(slice(1, None) if a == axis else slice(None) for a in range(ndim))
    earlier = tuple(slice(None, -1) if a == axis else slice(None) for a in range(ndim))
    return later, earlier


def binary_closing(mask: np.ndarray, iterations: int = 1) -> np.ndarray:
    """``scipy.ndimage.binary_closing(mask, iterations=iterations, border_value=0)`` with its default cross
    structure (the same result, tested), as shifted in-place ORs and ANDs of whole arrays: 5x faster on a head
    (0.07 instead of 0.36 s at 1 mm), where SciPy visits each voxel's neighbours one by one. Beyond the border
    is background, for the dilation and for the erosion (which so removes the border voxels)."""
    out = np.array(mask, dtype=bool)
    for combine in [np.bitwise_or] * iterations + [np.bitwise_and] * iterations:
        src = out.copy()
        for axis in range(out.ndim):
            later, earlier = _faces(out.ndim, axis)
            combine(out[later], src[earlier], out=out[later])
            combine(out[earlier], src[later], out=out[earlier])
            if combine is np.bitwise_and:
                out[tuple(0 if a == axis else slice(None) for a in range(out.ndim))] = False
                out[tuple(-1 if a == axis else slice(None) for a in range(out.ndim))] = False
    return out


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """``scipy.ndimage.binary_fill_holes`` (same result, same connectivity), by labelling the background once
    and keeping what does not touch the border: 3x faster on a head-sized volume than SciPy's iterated dilation."""
    background, n = ndimage.label(~mask)
    if n == 0:
        return mask.copy()
    faces = [background[(slice(None),) * a + (i,)] for a in range(mask.ndim) for i in (0, -1)]
    outside = np.zeros(n + 1, dtype=bool)
    outside[np.concatenate([f.ravel() for f in faces])] = True
    outside[0] = False  # label 0 is the mask itself
    return ~outside[background]


class HeadMaskd(MapTransform):
    def __init__(self, key: str = "image", out_key: str = "head", threshold: float = 0.08) -> None:
        super().__init__([key])
        self.out_key = out_key
        self.threshold = threshold

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        img = d[self.keys[0]]
        mask = head_mask(np.asarray(img), self.threshold)
        d[self.out_key] = _like(img, torch.from_numpy(mask)[None])
        return d


class ZScored(MapTransform):
    """Per-channel intensity normalisation by each channel's scheme (``schemes``: one for all, or one per
    channel): "zscore" over the head mask, 0 outside the head; "ct" with the dataset's statistics in
    ``intensity[channel]`` (clip to ``p00_5``..``p99_5``, subtract ``mean``, divide by ``std``; the whole volume,
    as nnU-Net's CT normalisation: 0 is the mean lesion voxel, not air, so the outside is not zeroed); "none"
    leaves the values. Records each channel's statistics over the head in ``stats`` (before normalising)."""

    def __init__(self, key: str = "image", mask_key: str = "head", channels: Sequence[str] = (),
                 schemes: str | Sequence[str] = "zscore", intensity: Mapping[str, Mapping[str, float]] | None = None) -> None:
        super().__init__([key])
        self.mask_key = mask_key
        self.channels = list(channels)
        self.schemes = [schemes] * len(self.channels) if isinstance(schemes, str) else list(schemes)
        self.default = schemes if isinstance(schemes, str) else "zscore"
        self.intensity = dict(intensity or {})
        for ch, scheme in zip(self.channels, self.schemes):
            if scheme == "ct" and not {"mean", "std", "p00_5", "p99_5"} <= set(self.intensity.get(ch, {})):
                raise ValueError(f"ZScored: channel '{ch}' uses the ct scheme but intensity['{ch}'] lacks mean, std, p00_5, p99_5")

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        img = d[self.keys[0]]
        arr = np.asarray(img, dtype=np.float32).copy()
        mask = np.asarray(d[self.mask_key][0], dtype=bool)
        stats = d.setdefault("stats", {}).setdefault("intensity", {})
        outside = ~mask

        def one(c: int) -> dict[str, float]:  # the channels side by side (thread_map)
            values = arr[c][mask]
            mean, std = float(values.mean()), float(values.std())
            p = np.percentile(values, [0.5, 50, 99.5], overwrite_input=True)  # values is a copy of its own: no second one
            scheme = self.schemes[c] if c < len(self.schemes) else self.default
            if scheme == "zscore":
                arr[c] = (arr[c] - mean) / max(std, 1e-8)
                arr[c][outside] = 0.0
            elif scheme == "ct":
                ct = self.intensity[self.channels[c]]
                np.clip(arr[c], ct["p00_5"], ct["p99_5"], out=arr[c])
                arr[c] = (arr[c] - ct["mean"]) / max(ct["std"], 1e-8)
            return {"mean": mean, "std": std, "p00_5": float(p[0]), "median": float(p[1]), "p99_5": float(p[2])}

        for c, entry in enumerate(thread_map(one, range(arr.shape[0]))):
            stats[self.channels[c] if c < len(self.channels) else str(c)] = entry
        d[self.keys[0]] = _like(img, arr)
        return d


class SignedDistanced(MapTransform):
    """One signed distance map per foreground class of ``label`` (mm, from the label's own affine). ``label``
    holds class indices; voxels of ``ignore_index`` (segpipe's chain: 255, where WMH's label 2 goes) get 0.
    Other values are an error, not silently a class without maps."""

    def __init__(self, key: str = "label", out_key: str = "sdm", num_classes: int = 2, ignore_index: int | None = None) -> None:
        super().__init__([key], allow_missing_keys=True)
        self.out_key = out_key
        self.num_classes = num_classes
        self.ignore_index = ignore_index

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            lab = d[key]
            raw = np.asarray(lab[0])
            if raw.dtype.kind == "f" and not np.array_equal(raw, np.round(raw)):
                odd = float(raw[raw != np.round(raw)].flat[0])
                raise ValueError(f"SignedDistanced: '{key}' must hold class indices, found {odd!r}; threshold or round it first "
                                 "(e.g. MONAI's AsDiscreted(threshold=0.5) for a binary mask)")
            arr = raw.astype(np.uint8)
            present = np.flatnonzero(np.bincount(arr.ravel(), minlength=256))
            stray = [int(v) for v in present if v >= self.num_classes and v != self.ignore_index]
            if stray:
                ignored = f" or {self.ignore_index} (ignored)" if self.ignore_index is not None else ""
                raise ValueError(f"SignedDistanced: '{key}' holds values {stray[:5]}, not classes 0..{self.num_classes - 1}{ignored}; "
                                 "map them first (e.g. AsDiscreted(threshold=0.5) for a 0/255 mask)")
            spacing = spacing_of(_affine(lab))
            maps = signed_distance_maps(arr, self.num_classes, spacing, ignore_index=self.ignore_index)
            d[self.out_key] = _like(lab, maps)
            d[key] = _like(lab, torch.from_numpy(arr)[None])
        return d


def run_chain(chain: Compose, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
    """Apply ``chain``; MONAI wraps a transform's exception in ``RuntimeError("applying transform ...")``:
    a user-facing error inside is raised as it is, so its one-line message reaches the user."""
    try:
        return chain(dict(data))
    except RuntimeError as exc:
        cause: BaseException | None = exc
        while cause is not None:
            if isinstance(cause, SegpipeError):
                raise cause from None
            cause = cause.__cause__
        raise


def loading_steps(plan: Any, *, with_label: bool) -> list[MapTransform]:
    """Steps 1-3 (read, clean the label, match the reference grid): each channel under ``channel_key(name)`` on
    the reference channel's grid, as read; the label's class indices under ``"label"``."""
    keys = [channel_key(c) for c in plan.channels]
    what = {channel_key(c): f"channel '{c}'" for c in plan.channels}
    what["label"] = "label"
    steps: list[MapTransform] = [LoadVolumed(keys + (["label"] if with_label else []), what)]
    if with_label:
        steps.append(CleanLabeld("label", len(plan.classes), plan.ignore_value, plan.threshold))
    steps.append(MatchReferenceGridd(keys, channel_key(plan.reference_channel), "label" if with_label else None,
                                     tolerance=plan.affine_tolerance, mode=plan.image_interpolation, what=what))
    return steps


def build_preprocessing(plan: Any, *, with_label: bool, with_sdm: bool | None = None) -> Compose:
    """The chain for ``plan`` (a :class:`segpipe.planning.Plan`). Input: a dict with one file path per
    channel under ``channel_key(name)`` and, with ``with_label``, the label path under ``"label"``."""
    keys = [channel_key(c) for c in plan.channels]
    spatial = ["image", "label"] if with_label else ["image"]
    modes = [plan.image_interpolation, "nearest"] if with_label else [plan.image_interpolation]
    margin = [int(np.ceil(plan.crop_margin_mm / s)) for s in plan.target_spacing]
    with_sdm = with_label if with_sdm is None else with_sdm
    steps: list[Any] = [
        *loading_steps(plan, with_label=with_label),
        ConcatItemsd(keys, "image"),
        DeleteItemsd(keys),
        Orientationd(spatial, axcodes=plan.orientation, labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        Spacingd(spatial, pixdim=plan.target_spacing, mode=modes, dtype=np.float32),
        HeadMaskd("image", "head", plan.head_threshold),
        CropForegroundd(spatial + ["head"], source_key="head", margin=margin, allow_smaller=True),
        ZScored("image", "head", plan.channels, [plan.scheme(c) for c in plan.channels], plan.intensity),
    ]
    if with_label and with_sdm:
        steps.append(SignedDistanced("label", "sdm", len(plan.classes), IGNORE_INDEX))
    elif with_label:
        steps.append(CastToTyped("label", dtype=np.uint8))
    steps.append(DeleteItemsd(["head"]))
    return Compose(steps, map_items=False)
