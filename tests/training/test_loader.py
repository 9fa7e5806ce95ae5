"""Patch loader: foreground oversampling, padding, fallback without lesion, determinism, workers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from segpipe.data.cache import CaseCache, foreground_locations
from segpipe.training.loader import BatchFinisher, PatchBatches, crop_padded, make_loader
from segpipe.transforms import signed_distance_maps


@pytest.fixture
def small_cache(tmp_path):
    cache = CaseCache(tmp_path / "cache")
    rng = np.random.default_rng(0)
    for cid, lesion in (("a", True), ("b", True), ("empty", False)):
        shape = (30, 34, 26)
        img = rng.normal(0, 1, (2, *shape)).astype(np.float32)
        lab = np.zeros(shape, np.uint8)
        if lesion:
            lab[5:8, 25:28, 3:5] = 1  # small, off-centre
        sdm = signed_distance_maps(lab, 2, (1, 1, 1))
        cache.write(cid, {"image": img, "label": lab, "sdm": sdm, "fg": foreground_locations(lab, 2, rng)},
                    {"key": "k", "affine": np.eye(4).tolist(), "spacing": [1, 1, 1], "channels": ["a", "b"], "shape": list(shape)})
    return cache.root


def test_crop_padded_reads_and_pads():
    arr = np.arange(5 * 6, dtype=np.float32).reshape(1, 5, 6)
    out = crop_padded(arr, (-1, 4), (3, 4))
    assert out.shape == (1, 3, 4) and (out[0, 0] == 0).all() and out[0, 1, 0] == arr[0, 0, 4]
    assert crop_padded(arr, (10, 10), (2, 2)).sum() == 0


def test_batches_shapes_dtypes_and_foreground_oversampling(small_cache):
    ds = PatchBatches(small_cache, ["a", "b"], (16, 16, 16), 3, batches=12, augment=False, foreground_fraction=0.34)
    n_fg = 0
    for batch in make_loader(ds, num_workers=0, pin_memory=False):
        assert batch["image"].shape == (3, 2, 16, 16, 16) and batch["image"].dtype == torch.float32
        assert batch["label"].shape == (3, 1, 16, 16, 16) and batch["label"].dtype == torch.uint8
        assert batch["sdm"].shape == (3, 1, 16, 16, 16)
        # the last patch of each batch (round(0.34 * 3) = 1) is centred on a lesion voxel
        assert batch["label"][-1, 0, 8, 8, 8] == 1
        n_fg += int(batch["label"][-1].any())
    assert n_fg == 12


def test_patch_larger_than_the_volume_is_padded(small_cache):
    ds = PatchBatches(small_cache, ["a"], (48, 48, 32), 2, batches=2, augment=True)
    for batch in make_loader(ds, num_workers=0, pin_memory=False):
        assert batch["image"].shape == (2, 2, 48, 48, 32)
        assert int((batch["label"] == 1).sum()) > 0


def test_case_without_lesion_falls_back(small_cache):
    ds = PatchBatches(small_cache, ["empty"], (16, 16, 16), 2, batches=3, augment=False)
    batches = list(make_loader(ds, num_workers=0, pin_memory=False))
    assert len(batches) == 3 and all(int(b["label"].sum()) == 0 for b in batches)


def test_deterministic_per_epoch_and_independent_of_workers(small_cache):
    def run(workers, epoch, seed=0):
        ds = PatchBatches(small_cache, ["a", "b"], (16, 16, 16), 2, batches=4, augment=True, seed=seed)
        ds.set_epoch(epoch)
        return [b["image"] for b in make_loader(ds, num_workers=workers, pin_memory=False)]

    a, b = run(0, 3), run(0, 3)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    c = run(2, 3)  # two worker processes: same batches (order may interleave)
    assert sorted(float(x.sum()) for x in a) == pytest.approx(sorted(float(x.sum()) for x in c))
    d = run(0, 4)
    assert not all(torch.equal(x, y) for x, y in zip(a, d))
    e = PatchBatches(small_cache, ["a", "b"], (16, 16, 16), 2, batches=4, augment=True, seed=0, rank=1)
    e.set_epoch(3)
    assert not torch.equal(next(iter(e))["image"], a[0])  # another DDP rank draws other patches


@pytest.mark.parametrize("workers", [0, 2])
def test_deferred_resampling_gives_the_same_batches(small_cache, workers):
    """Rotated/scaled patches finished on the training device (here the CPU) equal the workers' own, bit for bit."""
    def run(defer):
        ds = PatchBatches(small_cache, ["a", "b"], (16, 16, 12), 3, batches=10, augment=True, seed=5, defer_affine=defer)
        ds.set_epoch(2)
        return list(make_loader(ds, num_workers=workers, pin_memory=False))

    plain, deferred = run(False), run(True)
    n_deferred = sum(len(b.get("deferred", ())) for b in deferred)
    assert n_deferred >= 3  # about a third of the patches are rotated or scaled
    assert all("deferred" not in b for b in plain)
    finish = BatchFinisher((16, 16, 12))
    key = lambda b: float(b["image"].double().sum())  # noqa: E731 (two workers may interleave batches)
    a = sorted((finish(b, "cpu") for b in plain), key=key)
    b = sorted((finish(b, "cpu") for b in deferred), key=key)
    for x, y in zip(a, b):
        assert set(x) == set(y) == {"image", "label", "sdm"}
        assert x["label"].dtype == torch.int64
        for k in x:
            assert torch.equal(x[k], y[k]), k


def test_deferred_region_holds_what_the_patch_needs(small_cache):
    ds = PatchBatches(small_cache, ["a"], (16, 16, 12), 2, batches=30, augment=True, seed=1, defer_affine=True)
    items = [d for b in ds for d in b.get("deferred", ())]
    assert items
    for d in items:
        assert set(d["region"]) == {"image", "label", "sdm"} and d["region"]["image"].shape[0] == 2
        assert d["region"]["label"].dtype == torch.uint8 and 0 <= d["index"] < 2
        assert d["zoom"] != 1.0 or bool(d["angles"].abs().sum() > 0)
