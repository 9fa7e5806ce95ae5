"""Patch loader throughput on the CPU: patches per second per worker.

128^3 patches with 2 channels, label and distance map, augmentation on (flips, rotation and zoom with
nnU-Net's probabilities, intensity), from a cache of two 160x192x160 cases. segpipe's loader (memory maps,
region-limited sampling, one grid per patch) against the MONAI way in the same process: whole volumes in
memory, ``RandCropByPosNegLabeld`` (a third positive), ``RandAffined`` (same probabilities and ranges),
``RandFlipd`` and the same intensity transforms (MONAI's own blur and low-resolution transforms, which act on
all channels at once, at half the probability: the same expected work as nnU-Net's per-channel draws). One thread, as in a DataLoader worker. Target: >= 4
patches/s per worker (so 16 workers feed a GPU training at about 50 patches/s).

Also the worker's share when rotated and scaled patches are resampled on the training device
(``train.augment_on: device``, the default on CUDA): the workers cut regions and leave the resampling, and
those patches' flips and intensity changes, to the GPU.

    python -m benchmarks.loader [--batches 20]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks._common import save
from segpipe.data.cache import CaseCache, foreground_locations
from segpipe.training.loader import PatchBatches
from segpipe.transforms import signed_distance_maps

PATCH = (128, 128, 128)


def make_cache(root: Path, shape=(160, 192, 160)) -> CaseCache:
    cache = CaseCache(root)
    rng = np.random.default_rng(0)
    for cid in ("a", "b"):
        img = rng.normal(0, 1, (2, *shape)).astype(np.float32)
        lab = np.zeros(shape, np.uint8)
        for _ in range(6):
            c = rng.integers(20, np.array(shape) - 20)
            r = rng.integers(2, 8, 3)
            lab[c[0] - r[0]:c[0] + r[0], c[1] - r[1]:c[1] + r[1], c[2] - r[2]:c[2] + r[2]] = 1
        sdm = signed_distance_maps(lab, 2, (1.0, 1.0, 1.0))
        cache.write(cid, {"image": img, "label": lab, "sdm": sdm, "fg": foreground_locations(lab, 2, rng)},
                    {"key": "bench", "affine": np.eye(4).tolist(), "spacing": [1, 1, 1], "channels": ["a", "b"], "shape": list(shape)})
    return cache


def segpipe_rate(root: Path, batches: int, defer_affine: bool = False) -> float:
    ds = PatchBatches(root, ["a", "b"], PATCH, 2, batches=batches + 1, augment=True, seed=1, defer_affine=defer_affine,
                      label_values=(1,))
    it = iter(ds)
    next(it)  # open the memory maps
    t = time.perf_counter()
    n = 0
    for b in it:
        n += b["image"].shape[0]
    return n / (time.perf_counter() - t)


def monai_rate(root: Path, batches: int) -> float:
    from monai.transforms import (
        Compose,
        RandAdjustContrastd,
        RandAffined,
        RandCropByPosNegLabeld,
        RandFlipd,
        RandGaussianNoised,
        RandGaussianSmoothd,
        RandScaleIntensityd,
        RandScaleIntensityFixedMeand,
        RandSimulateLowResolutiond,
    )

    keys = ["image", "label", "sdm"]
    cache = CaseCache(root)
    data = []
    for cid in ("a", "b"):
        c = cache.load(cid, mmap=False)
        data.append({"image": torch.from_numpy(np.asarray(c.image)), "label": torch.from_numpy(np.asarray(c.label))[None],
                     "sdm": torch.from_numpy(np.asarray(c.sdm))})
    chain = Compose([
        RandCropByPosNegLabeld(keys, "label", spatial_size=PATCH, pos=1, neg=2, num_samples=1),
        RandAffined(keys, prob=0.36, rotate_range=(np.deg2rad(15), np.deg2rad(15), np.deg2rad(30)), scale_range=(0.3, 0.3, 0.3),
                    mode=("bilinear", "nearest", "bilinear"), padding_mode=("zeros", "zeros", "border")),
        RandFlipd(keys, prob=0.5, spatial_axis=0), RandFlipd(keys, prob=0.5, spatial_axis=1), RandFlipd(keys, prob=0.5, spatial_axis=2),
        RandGaussianNoised("image", prob=0.1, std=0.1),
        RandGaussianSmoothd("image", sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0), sigma_z=(0.5, 1.0), prob=0.1),  # p 0.2 x half the channels
        RandScaleIntensityd("image", factors=0.25, prob=0.15),
        RandScaleIntensityFixedMeand("image", factors=0.25, prob=0.15, preserve_range=True),
        RandSimulateLowResolutiond("image", prob=0.125, zoom_range=(0.5, 1.0)),  # p 0.25 x half the channels
        RandAdjustContrastd("image", prob=0.1, gamma=(0.7, 1.5), retain_stats=True, invert_image=True),
        RandAdjustContrastd("image", prob=0.3, gamma=(0.7, 1.5), retain_stats=True),
    ])
    chain.set_random_state(1)
    chain(data[0])
    t = time.perf_counter()
    n = 2 * batches
    for i in range(n):
        chain(data[i % 2])
    return n / (time.perf_counter() - t)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=20)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "cache"
        make_cache(root)
        ours = segpipe_rate(root, args.batches)
        deferred = segpipe_rate(root, args.batches, defer_affine=True)
        base = monai_rate(root, args.batches)
    result = {"patch": list(PATCH), "channels": 2, "segpipe_patches_per_s_per_worker": round(ours, 2),
              "monai_patches_per_s_per_worker": round(base, 2), "ratio": round(ours / base, 2),
              "segpipe_resampling_on_device_patches_per_s_per_worker": round(deferred, 2)}
    print(f"loader, 128^3 patches (2 channels + label + distance map), augmentation on, one thread: segpipe {ours:.2f} "
          f"patches/s per worker, MONAI RandCropByPosNegLabeld + RandAffined on in-memory volumes {base:.2f} -> "
          f"{ours / base:.2f}x (target >= 4 patches/s); with the resampling left to the GPU (train.augment_on=device) "
          f"{deferred:.2f} patches/s per worker")
    save("loader", result)
    return result


if __name__ == "__main__":
    main()
