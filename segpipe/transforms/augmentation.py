"""Training augmentation, applied jointly to ``image``, ``label`` and ``sdm`` (MONAI dictionary transforms).

What touches the distance map, and how:

- **flips** (each axis with p = 0.5; ``torch.flip``, all chosen axes at once): the map is flipped with the label; exact.
- **rotation and scaling** (``JointAffined``: one sampled rotation and zoom, one PyTorch ``grid_sample``
  grid for all keys, in a loader worker or on the training device, see ``segpipe.training.loader``; rotation
  p = 0.2, up to 30 degrees about z and 15 about x/y by default, scale p = 0.2 in [0.7, 1.4]):
  the image is resampled linearly, the label as nnU-Net does (each value's indicator linearly, the largest
  wins, ties to the nearest voxel: against the exactly transformed shape, 39 % fewer voxels wrong than
  nearest neighbour in the test), the map linearly (a distance field is
  smooth away from the boundary, and a rotation keeps distances), and the map's values are multiplied by the
  zoom so that they stay in mm: objects drawn ``z`` times larger are ``z`` times further from everything.
  The loader reads just the region the rotated, zoomed patch samples from (clipped to the volume), so
  rotated corners hold real data. Where the patch reaches beyond the volume, image, label and maps are 0, as
  for an unrotated patch that leaves it (and as in nnU-Net): the image at the mean, background, and no
  boundary term. (Until 2026-11-30 the image and maps took their edge values there under a background
  label: in thin CT perfusion slabs, which every tilted or zoomed-out patch leaves, a lesion reaching the
  slab's face was copied under background.)
- **intensity** (image only), nnU-Net's set with its probabilities and ranges (nnU-Net v2's default training
  transforms): Gaussian noise (p = 0.1, one sigma for all channels), Gaussian blur (p = 0.2, sigma 0.5-1 voxel,
  each channel with p = 0.5), brightness (multiplicative, p = 0.15), contrast about the mean (p = 0.15),
  simulated low resolution (p = 0.25, each channel with p = 0.5: nearest-neighbour down to 0.5-1 of the size,
  back up linearly, where nnU-Net uses cubic), gamma on the inverted image (p = 0.1) and gamma (p = 0.3).
  Brightness, contrast and gamma treat each channel on its own, with its own factor and its own range and
  statistics, as nnU-Net's do (``synchronize_channels=False``)
  (``RandGaussianNoiseTorchd``: MONAI's ``RandGaussianNoised`` drawn with PyTorch; ``RandGaussianBlurTorchd``,
  ``RandSimulateLowResolutionTorchd``: PyTorch on the patch's device; MONAI ``RandScaleIntensityd`` and
  ``RandScaleIntensityFixedMeand`` with ``channel_wise``; ``RandAdjustContrastTorchd``: gamma per channel).

Nothing else changes the map. Labels keep the ignore value 255 (one of the values resampled).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from monai.data import get_track_meta, set_track_meta
from monai.transforms import (
    Compose,
    MapTransform,
    RandAdjustContrastd,
    Randomizable,
    RandScaleIntensityd,
    RandScaleIntensityFixedMeand,
)
from monai.transforms.utils import create_rotate
from torch.nn import functional as F

__all__ = ["JointAffined", "RandAdjustContrastTorchd", "RandGaussianBlurTorchd", "RandGaussianNoiseTorchd", "RandSimulateLowResolutionTorchd",
           "build_augmentation", "resample_label", "sampled_extent", "symmetric_draw", "untracked"]


def _matrix(angles: Sequence[float], zoom: float) -> np.ndarray:
    """3x3 map from centred patch coordinates to centred input coordinates (rotation, zoom ``zoom``)."""
    rot = np.asarray(create_rotate(3, list(angles), backend="numpy"))[:3, :3]
    return rot / zoom


def sampled_extent(patch_size: Sequence[int], angles: Sequence[float], zoom: float) -> np.ndarray:
    """Half-size (voxels) of the input region that a rotated, zoomed patch samples from, plus one voxel."""
    half = (np.asarray(patch_size, dtype=float) - 1) / 2
    corners = np.array(np.meshgrid(*[[-h, h] for h in half], indexing="ij")).reshape(3, -1)
    return np.abs(_matrix(angles, zoom) @ corners).max(axis=1) + 1.0


class JointAffined(Randomizable, MapTransform):
    """Rotate and zoom image, label and distance maps with one set of sampled parameters, and crop the centre
    ``spatial_size``; the maps' values are multiplied by the zoom (see the module docstring)."""

    def __init__(
        self,
        spatial_size: Sequence[int],
        *,
        image_key: str = "image",
        label_key: str = "label",
        sdm_key: str = "sdm",
        prob_rotate: float = 0.2,
        prob_scale: float = 0.2,
        max_rotation_deg: Sequence[float] = (15.0, 15.0, 30.0),
        scale_range: tuple[float, float] = (0.7, 1.4),
        label_values: Sequence[int] | None = None,
    ) -> None:
        MapTransform.__init__(self, [image_key, label_key, sdm_key], allow_missing_keys=True)
        self.spatial_size = tuple(int(s) for s in spatial_size)
        # the label's values other than background (the classes, the ignore value); None: read from each label
        # (on a GPU that read waits for the device, so the trainer gives them)
        self.label_values = None if label_values is None else tuple(int(v) for v in label_values)
        self.image_key, self.label_key, self.sdm_key = image_key, label_key, sdm_key
        self.prob_rotate, self.prob_scale = prob_rotate, prob_scale
        self.max_rotation = np.deg2rad(np.asarray(max_rotation_deg, dtype=float))
        self.scale_range = scale_range
        self.angles: np.ndarray = np.zeros(3)
        self.zoom = 1.0

    def randomize(self, data: Any = None) -> None:
        self.angles = np.zeros(3)
        self.zoom = 1.0
        if self.R.random_sample() < self.prob_rotate:
            self.angles = self.R.uniform(-self.max_rotation, self.max_rotation)
        if self.R.random_sample() < self.prob_scale:
            self.zoom = float(self.R.uniform(*self.scale_range))

    @property
    def active(self) -> bool:
        return bool(np.any(self.angles != 0) or self.zoom != 1.0)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        self.randomize()
        return self.apply(data, self.angles, self.zoom)

    def apply(self, data: Mapping[Hashable, Any], angles: Sequence[float], zoom: float,
              offset: Sequence[float] = (0.0, 0.0, 0.0)) -> dict[Hashable, Any]:
        """Rotate by ``angles`` (radians about x, y, z), zoom by ``zoom`` (> 1 enlarges) and sample the
        ``spatial_size`` patch whose centre sits ``offset`` voxels from the input's centre. One grid serves
        all keys; image and maps are sampled together (linear), the label apart (:func:`resample_label`);
        all are 0 outside the input. The sampling is PyTorch's ``grid_sample``: MONAI's ``Affine`` builds a
        homogeneous grid per key and call, three times the work for the same result."""
        d = dict(data)
        ref = next(torch.as_tensor(d[k]) for k in (self.image_key, self.sdm_key, self.label_key) if k in d)
        grid = _sampling_grid(self.spatial_size, ref.shape[1:], _matrix(angles, zoom), offset, device=ref.device)
        smooth = [k for k in (self.image_key, self.sdm_key) if k in d]
        if smooth:
            stacked = torch.cat([torch.as_tensor(d[k], dtype=torch.float32) for k in smooth])[None]
            out = F.grid_sample(stacked, grid, mode="bilinear", padding_mode="zeros", align_corners=True)[0]
            i = 0
            for k in smooth:
                n = int(torch.as_tensor(d[k]).shape[0])
                d[k] = out[i:i + n]
                i += n
            if self.sdm_key in d:
                d[self.sdm_key] = d[self.sdm_key] * zoom
        if self.label_key in d:
            d[self.label_key] = resample_label(torch.as_tensor(d[self.label_key]), grid, self.label_values)
        return d


def resample_label(label: torch.Tensor, grid: torch.Tensor, values: Sequence[int] | None = None) -> torch.Tensor:
    """A (1, X, Y, Z) label map sampled at ``grid`` as nnU-Net does: each value's indicator interpolated
    linearly, the largest score wins, a tie goes to the nearest voxel; outside the input is background (0).
    Nearest-neighbour sampling alone moves a boundary by up to half a voxel against the linearly sampled
    image, a half voxel that in 5 mm slices is 2.5 mm of lesion. ``values``: the values other than 0 the
    label can hold (None: those it holds)."""
    values = [int(v) for v in (torch.unique(label).tolist() if values is None else values) if int(v) != 0]

    def nearest() -> torch.Tensor:
        out = F.grid_sample(label[None].float(), grid, mode="nearest", padding_mode="zeros", align_corners=True)[0]
        return out.round().to(label.dtype)

    if not values:
        return nearest()
    indicators = torch.stack([label[0] == v for v in values]).float()[None]
    scores = F.grid_sample(indicators, grid, mode="bilinear", padding_mode="zeros", align_corners=True)[0]
    if len(values) == 1:  # one class: its score against the background's, 1 - score (the usual case, in one pass)
        out = torch.where(scores > 0.5, values[0], 0).to(label.dtype)
        tied = (scores - 0.5).abs() < 1e-5
    else:
        scores = torch.cat([1.0 - scores.sum(0, keepdim=True), scores])  # background's: all the rest, outside included
        best, index = scores.max(0, keepdim=True)
        out = torch.tensor([0, *values], dtype=label.dtype, device=label.device)[index]
        tied = (scores >= best - 1e-5).sum(0, keepdim=True) > 1
    # ties need the nearest voxel; on the CPU it is sampled only if there is one (rare unless the grid falls
    # halfway between voxels), on a GPU always (asking would make the host wait)
    if label.device.type != "cpu" or bool(tied.any()):
        out = torch.where(tied, nearest(), out)
    return out


def _sampling_grid(out_size: Sequence[int], in_size: Sequence[int], matrix: np.ndarray, offset: Sequence[float],
                   device: torch.device | str | None = None) -> torch.Tensor:
    """``grid_sample`` grid (1, X, Y, Z, 3) that maps each output voxel, centred, through ``matrix`` and
    ``offset`` onto input voxels (centred), normalised for ``align_corners=True``. The map is linear, so each
    component is the broadcast sum of three 1D ramps with the constants folded in: one pass over the grid per
    component (6x faster than ``F.affine_grid`` or adding full-size arrays on one CPU thread)."""
    # built where it is used: on a GPU no host-to-device copy, so no wait for the work queued before
    ramps = [torch.arange(n, dtype=torch.float64, device=device) - (n - 1) / 2 for n in out_size]
    m = np.asarray(matrix, dtype=np.float64)
    grid = torch.empty((*out_size, 3), dtype=torch.float32, device=device)
    for j in range(3):  # input axis j
        scale = 2.0 / max(in_size[j] - 1, 1)
        shift = (float(offset[j]) + (in_size[j] - 1) / 2) * scale - 1.0
        a = (ramps[0] * (m[j, 0] * scale) + shift).view(-1, 1, 1)
        b = (ramps[1] * (m[j, 1] * scale)).view(1, -1, 1)
        c = (ramps[2] * (m[j, 2] * scale)).view(1, 1, -1)
        # grid_sample indexes the last grid component along the first spatial axis: input axis j goes to 2 - j
        torch.add((a + b).float(), c.float(), out=grid[..., 2 - j])
    return grid[None]


class RandGaussianNoiseTorchd(Randomizable, MapTransform):
    """Additive Gaussian noise on ``keys`` with probability ``prob``, its standard deviation drawn from
    [0, ``std``] (as MONAI's ``RandGaussianNoised`` with ``sample_std``, and nnU-Net). The noise comes from a
    PyTorch generator seeded by this transform's random state, on the image's device: six times faster than
    MONAI's NumPy draw on a CPU, and free on a GPU."""

    def __init__(self, keys: Sequence[str], prob: float = 0.1, std: float = 0.1) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys=True)
        self.prob, self.std = prob, std
        self._do, self._std, self._seed = False, 0.0, 0

    def randomize(self, data: Any = None) -> None:
        self._do = self.R.random_sample() < self.prob
        self._std = float(self.R.uniform(0, self.std))
        self._seed = int(self.R.randint(2**31))

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        self.randomize()
        d = dict(data)
        if not self._do:
            return d
        for key in self.key_iterator(d):
            img = torch.as_tensor(d[key])
            gen = torch.Generator(device=img.device).manual_seed(self._seed)
            noise = torch.randn(img.shape, generator=gen, device=img.device, dtype=torch.float32)
            d[key] = img + (noise * self._std).to(img.dtype)
        return d


def _gaussian_weights(sigma: float) -> list[float]:
    """A normalised Gaussian kernel, as Python floats (on a GPU, weights read from a tensor would each be a
    host synchronisation); radius as SciPy's ``truncate=4``."""
    radius = max(1, int(4.0 * sigma + 0.5))
    k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    return [float(v) for v in k / k.sum()]


def gaussian_blur(volume: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian smoothing of a (X, Y, Z) volume, ``sigma`` in voxels, edges mirrored as SciPy's
    ``gaussian_filter`` does (``reflect``, ``truncate=4``; tested against it). A weighted sum of shifted
    views per axis: 3x faster on a CPU than ``conv3d`` with a one-axis kernel, as fast as SciPy."""
    weights = _gaussian_weights(sigma)
    r = (len(weights) - 1) // 2
    out = volume.float()
    for axis in range(3):
        n = out.shape[axis]
        # SciPy's "reflect" repeats the edge voxel (d c b a | a b c d); PyTorch's "reflect" padding does not
        idx = torch.cat([torch.arange(r - 1, -1, -1, device=out.device), torch.arange(n, device=out.device),
                         torch.arange(n - 1, n - 1 - r, -1, device=out.device)]).clamp(0, n - 1)
        padded = torch.index_select(out, axis, idx)
        acc = padded.narrow(axis, 0, n) * weights[0]
        for i, w in enumerate(weights[1:], start=1):
            acc.add_(padded.narrow(axis, i, n), alpha=w)
        out = acc
    return out.to(volume.dtype)


class _RandPerChannel(Randomizable, MapTransform):
    """nnU-Net's per-channel image transforms: with probability ``prob`` per patch, each channel with
    probability ``prob_per_channel``, each with its own value drawn from ``value_range``; subclasses say what
    a value does to a channel (:meth:`channel`)."""

    def __init__(self, keys: Sequence[str], prob: float, value_range: tuple[float, float], prob_per_channel: float) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys=True)
        self.prob, self.value_range, self.prob_per_channel = prob, value_range, prob_per_channel
        self._do = False
        self._draws: list[tuple[bool, float]] = []

    def randomize(self, channels: int) -> None:
        self._do = self.R.random_sample() < self.prob
        self._draws = [(self.R.random_sample() < self.prob_per_channel, float(self.R.uniform(*self.value_range)))
                       for _ in range(channels)]

    def channel(self, ch: torch.Tensor, value: float) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        key = next(iter(self.key_iterator(d)), None)
        self.randomize(int(torch.as_tensor(d[key]).shape[0]) if key is not None else 0)
        if not self._do:
            return d
        for key in self.key_iterator(d):
            img = torch.as_tensor(d[key])
            img = img.as_tensor() if hasattr(img, "as_tensor") else img
            d[key] = torch.stack([self.channel(ch, value) if on else ch for ch, (on, value) in zip(img, self._draws)])
        return d


class RandGaussianBlurTorchd(_RandPerChannel):
    """Gaussian blur, each blurred channel with its own sigma (voxels) drawn from ``sigma``: nnU-Net's
    ``GaussianBlurTransform`` defaults."""

    def __init__(self, keys: Sequence[str], prob: float = 0.2, sigma: tuple[float, float] = (0.5, 1.0), prob_per_channel: float = 0.5) -> None:
        super().__init__(keys, prob, sigma, prob_per_channel)

    def channel(self, ch: torch.Tensor, value: float) -> torch.Tensor:
        return gaussian_blur(ch, value)


class RandSimulateLowResolutionTorchd(_RandPerChannel):
    """Simulated low resolution: a channel is taken down to ``zoom`` (drawn from ``zoom_range``) of its size by
    nearest neighbour and back up to its size by linear interpolation (nnU-Net's
    ``SimulateLowResolutionTransform``, which interpolates cubically on the way up; PyTorch has no cubic 3D
    interpolation)."""

    def __init__(self, keys: Sequence[str], prob: float = 0.25, zoom_range: tuple[float, float] = (0.5, 1.0),
                 prob_per_channel: float = 0.5) -> None:
        super().__init__(keys, prob, zoom_range, prob_per_channel)

    def channel(self, ch: torch.Tensor, value: float) -> torch.Tensor:
        size = tuple(ch.shape)
        small = [max(1, int(round(s * value))) for s in size]
        low = F.interpolate(ch[None, None].float(), size=small, mode="nearest")
        return F.interpolate(low, size=size, mode="trilinear", align_corners=False)[0, 0].to(ch.dtype)


def symmetric_draw(rng: np.random.RandomState, lo: float, hi: float) -> float:
    """A factor from ``(lo, hi)`` drawn as nnU-Net's ``BGContrast`` draws it: below 1 and above 1 with equal
    chance (when the range straddles 1), uniform within each side; so (0.7, 1.5) darkens as often as it brightens."""
    if rng.random_sample() < 0.5 and lo < 1:
        return float(rng.uniform(lo, 1.0))
    return float(rng.uniform(max(lo, 1.0), hi))


class RandAdjustContrastTorchd(RandAdjustContrastd):
    """Gamma, as nnU-Net's ``GammaTransform`` applies it: each channel with its own gamma (drawn by
    :func:`symmetric_draw`) over its own intensity range, optionally keeping its own mean and standard deviation;
    ``invert_image``: on the negated channel. MONAI's ``RandAdjustContrastd`` draws one gamma for the whole
    image and takes the range and statistics of all channels together, so with DWI and ADC, or CT and
    perfusion maps, one channel's range bent the others. Kept on the device (no ``float()`` of the range: on a
    GPU that is a host synchronisation for every patch drawn for gamma); per channel it computes MONAI's
    ``AdjustContrast`` in MONAI's order (a test compares them)."""

    def __init__(self, keys: Sequence[str] | str, prob: float = 0.1, gamma: tuple[float, float] = (0.7, 1.5),
                 invert_image: bool = False, retain_stats: bool = False) -> None:
        super().__init__(keys, prob=prob, gamma=gamma, invert_image=invert_image, retain_stats=retain_stats)
        self.gamma_range = (float(min(gamma)), float(max(gamma)))
        self.gammas: list[float] = []

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        for key in self.key_iterator(d):
            img = torch.as_tensor(d[key])
            img = img.as_tensor() if hasattr(img, "as_tensor") else img
            self.gammas = [symmetric_draw(self.R, *self.gamma_range) for _ in range(img.shape[0])]
            out = torch.empty_like(img)
            for c, gamma in enumerate(self.gammas):
                x = -img[c] if self.invert_image else img[c]
                if self.adjuster.retain_stats:
                    mean, std = x.mean(), x.std()
                low = x.min()
                span = x.max() - low
                y = x - low  # MONAI's operations in MONAI's order, in place
                y.div_(span + 1e-7).pow_(gamma).mul_(span).add_(low)
                if self.adjuster.retain_stats:
                    y.sub_(y.mean())
                    y.div_(y.std() + 1e-8).mul_(std).add_(mean)
                out[c] = y.neg_() if self.invert_image else y
            d[key] = out
        return d


class RandJointFlipd(Randomizable, MapTransform):
    """Flip every key along each spatial axis with probability ``prob`` (independently per axis), all chosen
    axes in one ``torch.flip`` per key: one copy per key, where three ``RandFlipd`` make up to three. (MONAI's
    ``Flip`` gives the same values but its metadata bookkeeping costs 4 ms a call, which on a GPU is the
    training process's time: patches are never inverted, so there is nothing to track.)"""

    def __init__(self, keys: Sequence[str], prob: float = 0.5) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys=True)
        self.prob = prob
        self.axes: list[int] = []

    def randomize(self, data: Any = None) -> None:
        self.axes = [a for a in range(3) if self.R.random_sample() < self.prob]

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        self.randomize()
        d = dict(data)
        if self.axes:
            dims = [a + 1 for a in self.axes]  # channel-first arrays
            for key in self.key_iterator(d):
                t = torch.as_tensor(d[key])
                d[key] = torch.flip(t.as_tensor() if hasattr(t, "as_tensor") else t, dims)
        return d


@contextmanager
def untracked() -> Iterator[None]:
    """MONAI transforms without metadata tracking (plain tensors in and out) inside the block: training
    patches are never inverted, and the bookkeeping doubled the time of a patch's flips and intensity
    changes (5.7 -> 2.7 ms on small tensors), time that on a GPU comes out of the training process."""
    previous = get_track_meta()
    set_track_meta(False)
    try:
        yield
    finally:
        set_track_meta(previous)


def build_augmentation(patch_size: Sequence[int], *, enabled: bool = True) -> Compose:
    """The training augmentation after :class:`JointAffined` (which the loader applies while cutting the
    patch): flips on all keys, intensity changes on the image only."""
    keys = ["image", "label", "sdm"]
    if not enabled:
        return Compose([])
    return Compose(
        [
            RandJointFlipd(keys, prob=0.5),
            RandGaussianNoiseTorchd(["image"], prob=0.1, std=0.1),
            RandGaussianBlurTorchd(["image"], prob=0.2, sigma=(0.5, 1.0), prob_per_channel=0.5),
            # brightness and contrast per channel, each its own factor (nnU-Net: synchronize_channels=False), the
            # contrast about the channel's own mean and within its own range
            RandScaleIntensityd("image", factors=0.25, prob=0.15, channel_wise=True),
            RandScaleIntensityFixedMeand("image", factors=0.25, prob=0.15, preserve_range=True, channel_wise=True),
            RandSimulateLowResolutionTorchd(["image"], prob=0.25, zoom_range=(0.5, 1.0), prob_per_channel=0.5),
            RandAdjustContrastTorchd("image", prob=0.1, gamma=(0.7, 1.5), retain_stats=True, invert_image=True),
            RandAdjustContrastTorchd("image", prob=0.3, gamma=(0.7, 1.5), retain_stats=True),
        ],
        map_items=False,
    )
