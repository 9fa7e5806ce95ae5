"""Patches from the memory-mapped cache, with foreground oversampling, as batches.

Each worker builds whole batches (``batch_size`` patches): the last ``max(1, round(fraction * B))`` patches
of every batch are centred on a voxel of a foreground class present in the case (nnU-Net samples a third of
each batch this way; a case without lesion falls back to a random centre), the others are centred anywhere.
A patch is cut from the memory maps directly (only the voxels it needs are read), padded where it leaves
the volume (image, label and distance maps with 0: the mean, background, no boundary term), then augmented jointly
(:mod:`segpipe.transforms.augmentation`).

Where the batch is finished: rotation and scaling resample the whole patch (``grid_sample`` on 4-5
channels), which is about half a worker's time on a CPU and nothing on a GPU. With ``defer_affine`` a worker
cuts, for a patch that is to be rotated or scaled, only the input region it samples from (and its
parameters), and :class:`BatchFinisher` resamples it and applies that patch's flips and intensity changes on
the training device, after the transfer. Each patch carries its own augmentation seed, so the two placements
give the same batches: bit for bit on a CPU (tested); on a GPU up to float rounding, and with the GPU's own
noise generator.

Randomness is a pure function of ``(seed, epoch, rank, worker, batch index)``: an epoch draws the same
patches whether or not the run was interrupted and resumed, and every DDP rank draws its own.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from segpipe.data.cache import CachedCase, CaseCache
from segpipe.transforms.augmentation import (
    JointAffined,
    build_augmentation,
    sampled_extent,
    untracked,
)

__all__ = ["BatchFinisher", "PatchBatches", "crop_padded", "label_values", "make_loader"]


def crop_padded(arr: np.ndarray, start: Sequence[int], size: Sequence[int]) -> np.ndarray:
    """``arr[..., start:start+size]`` over the last ``len(size)`` axes, 0 where it leaves the array. Reads
    only the overlapping part (memory maps stay lazy)."""
    nd = len(size)
    spatial = arr.shape[-nd:]
    lead = arr.shape[:-nd]
    lo = [min(max(s, 0), dim) for s, dim in zip(start, spatial)]
    hi = [max(min(s + n, dim), l) for s, n, dim, l in zip(start, size, spatial, lo)]
    src = (Ellipsis,) + tuple(slice(l, h) for l, h in zip(lo, hi))
    before = [l - s for s, l in zip(start, lo)]
    if all(b == 0 for b in before) and all(h - l == n for l, h, n in zip(lo, hi, size)):
        return np.array(arr[src])
    out = np.zeros(lead + tuple(size), dtype=arr.dtype)
    if any(h <= l for l, h in zip(lo, hi)):
        return out  # no overlap at all
    dst = tuple(slice(b, b + h - l) for b, l, h in zip(before, lo, hi))
    out[(Ellipsis,) + dst] = arr[src]
    return out


class PatchBatches(IterableDataset):
    """An endless (per epoch: ``batches`` long) stream of batches from the cache."""

    def __init__(
        self,
        cache_root: str | Path,
        case_ids: Sequence[str],
        patch_size: Sequence[int],
        batch_size: int,
        *,
        batches: int,
        foreground_fraction: float = 0.34,
        augment: bool = True,
        seed: int = 0,
        rank: int = 0,
        with_sdm: bool = True,
        defer_affine: bool = False,
        label_values: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        self.cache_root = str(cache_root)
        self.case_ids = list(case_ids)
        self.patch_size = tuple(int(p) for p in patch_size)
        self.batch_size = int(batch_size)
        self.batches = int(batches)
        self.foreground_fraction = float(foreground_fraction)
        self.augment = augment
        self.seed = int(seed)
        self.rank = int(rank)
        self.with_sdm = with_sdm
        self.defer_affine = bool(defer_affine and augment)
        self.label_values = label_values  # the label's values for resampling (None: read from each patch)
        self.epoch = 0
        self._cases: dict[str, CachedCase] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _open(self) -> dict[str, CachedCase]:
        if self._cases is None:  # opened lazily in each worker process: memory maps are shared, not copied
            cache = CaseCache(self.cache_root)
            self._cases = {cid: cache.load(cid, mmap=True) for cid in self.case_ids}
        return self._cases

    def _rng(self, worker: int, index: int) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence([self.seed, self.epoch, self.rank, worker, index]))

    def _centre(self, rng: np.random.Generator, case: CachedCase, force_fg: bool) -> np.ndarray:
        shape = np.asarray(case.image.shape[1:])
        if force_fg and len(case.fg):
            classes = np.unique(case.fg[:, 0])
            k = rng.choice(classes)
            rows = case.fg[case.fg[:, 0] == k]
            return rows[rng.integers(len(rows)), 1:].astype(int)
        # anywhere such that the patch overlaps the volume by at least half (nnU-Net pads similarly)
        half = np.asarray(self.patch_size) // 2
        lo = np.minimum(half, shape // 2)
        hi = np.maximum(shape - half, shape // 2 + 1)
        return np.array([rng.integers(a, max(b, a + 1)) for a, b in zip(lo, hi)])

    def sample(self, rng: np.random.Generator, force_fg: bool, affine: JointAffined | None) -> dict[str, Any]:
        """One patch (a dict of arrays), or, with ``defer_affine`` and a rotation or zoom drawn, the region it
        is sampled from under ``"region"`` with ``"angles"``, ``"zoom"`` and ``"offset"``."""
        cases = self._open()
        case = cases[self.case_ids[rng.integers(len(self.case_ids))]]
        centre = self._centre(rng, case, force_fg)
        if affine is not None:
            affine.set_random_state(int(rng.integers(2**31)))
            affine.randomize()
        if affine is None or not affine.active:
            start = [int(c) - s // 2 for c, s in zip(centre, self.patch_size)]
            item = {"image": crop_padded(case.image, start, self.patch_size)}
            if case.label is not None:
                item["label"] = crop_padded(case.label[None], start, self.patch_size)
            if self.with_sdm and case.sdm is not None:
                item["sdm"] = crop_padded(case.sdm, start, self.patch_size)
            return item
        # read only the region the rotated, zoomed patch samples from (within the volume); the sampler
        # supplies 0 outside it
        shape = np.asarray(case.image.shape[1:])
        centre_f = centre - 0.5 + 0.5 * (np.asarray(self.patch_size) % 2)  # the patch's geometric centre
        ext = sampled_extent(self.patch_size, affine.angles, affine.zoom)
        lo = np.clip(np.floor(centre_f - ext).astype(int), 0, shape - 1)
        hi = np.clip(np.ceil(centre_f + ext).astype(int) + 1, lo + 1, shape)
        box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
        region = {"image": torch.from_numpy(np.array(case.image[(slice(None),) + box]))}
        if case.label is not None:
            region["label"] = torch.from_numpy(np.array(case.label[box]))[None]
        if self.with_sdm and case.sdm is not None:
            region["sdm"] = torch.from_numpy(np.array(case.sdm[(slice(None),) + box]))
        offset = centre_f - (lo + (hi - lo - 1) / 2)
        if self.defer_affine:
            return {"region": region, "angles": torch.as_tensor(affine.angles, dtype=torch.float64),
                    "zoom": float(affine.zoom), "offset": torch.as_tensor(offset, dtype=torch.float64)}
        return affine.apply(region, affine.angles, affine.zoom, offset)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        affine = JointAffined(self.patch_size, label_values=self.label_values) if self.augment else None
        aug = build_augmentation(self.patch_size, enabled=self.augment)
        n_fg = max(1, round(self.foreground_fraction * self.batch_size)) if self.foreground_fraction > 0 else 0
        for index in range(worker, self.batches, n_workers):
            rng = self._rng(0, index)  # a batch's patches depend on its index only, not on the worker count
            batch: dict[str, Any] = {}
            deferred: list[dict[str, Any]] = []
            for i in range(self.batch_size):
                seed = int(rng.integers(2**31))  # this patch's flips and intensity changes, wherever applied
                item = self.sample(rng, force_fg=i >= self.batch_size - n_fg, affine=affine)
                if "region" in item:
                    deferred.append({**item, "index": i, "seed": seed})
                    continue
                aug.set_random_state(seed)
                with untracked():
                    item = aug({k: torch.as_tensor(v) for k, v in item.items()})
                for k, v in item.items():
                    _put(batch, k, i, torch.as_tensor(v), self.batch_size)
            if deferred:
                for k, v in deferred[0]["region"].items():  # the slots the device fills, in case no patch was cut here
                    if k not in batch:
                        batch[k] = torch.zeros((self.batch_size, v.shape[0], *self.patch_size), dtype=_DTYPES.get(k, torch.float32))
                batch["deferred"] = deferred
            yield batch

    def __len__(self) -> int:
        return self.batches


_DTYPES = {"label": torch.uint8}  # labels travel as uint8 (255 = ignore): an eighth of int64's bytes


def _put(batch: dict[str, Any], key: str, i: int, value: torch.Tensor, batch_size: int) -> None:
    if key not in batch:
        batch[key] = torch.empty((batch_size, *value.shape), dtype=_DTYPES.get(key, torch.float32), device=value.device)
    batch[key][i] = value


class BatchFinisher:
    """Moves a batch to the training device and finishes its deferred patches there (rotation and zoom,
    then that patch's flips and intensity changes, as a worker would have done): returns ``image`` (float),
    ``label`` (int64) and, if present, ``sdm``, all on ``device``."""

    def __init__(self, patch_size: Sequence[int], *, augment: bool = True, label_values: Sequence[int] | None = None) -> None:
        self.affine = JointAffined(patch_size, label_values=label_values)
        self.aug = build_augmentation(patch_size, enabled=augment)

    def __call__(self, batch: dict[str, Any], device: torch.device | str) -> dict[str, torch.Tensor]:
        out = {k: v.to(device, non_blocking=True) for k, v in batch.items() if k != "deferred"}
        for item in batch.get("deferred", ()):
            region = {k: v.to(device, non_blocking=True) for k, v in item["region"].items()}
            patch = self.affine.apply(region, item["angles"].tolist(), float(item["zoom"]), item["offset"].tolist())
            self.aug.set_random_state(int(item["seed"]))
            with untracked():
                patch = self.aug(patch)
            for k, v in patch.items():
                out[k][int(item["index"])] = torch.as_tensor(v)
        if "label" in out:
            out["label"] = out["label"].long()
        return out


def label_values(plan: Any) -> tuple[int, ...]:
    """The values other than background that the plan's cached labels hold: its classes, and the ignore
    value if the dataset has one (what resampling a rotated or zoomed label needs to know)."""
    from segpipe.transforms.preprocessing import IGNORE_INDEX

    return tuple(range(1, plan.num_classes)) + ((IGNORE_INDEX,) if plan.ignore_value is not None else ())


def make_loader(dataset: PatchBatches, *, num_workers: int, pin_memory: bool) -> DataLoader:
    """A DataLoader over whole batches; workers persist across epochs (memory maps opened once each)."""
    kwargs: dict[str, Any] = {}
    if num_workers > 0:
        kwargs.update(persistent_workers=False, prefetch_factor=max(2, math.ceil(4 / max(num_workers, 1))))
    return DataLoader(dataset, batch_size=None, num_workers=num_workers, pin_memory=pin_memory, **kwargs)
