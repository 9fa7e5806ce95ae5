"""The composite training loss: spec weights, schedule, named batch entries, deep supervision."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from segpipe.losses import (
    CompositeLoss,
    boundary_loss,
    cross_entropy_loss,
    deep_supervision_weights,
    dice_loss,
)
from segpipe.losses.composite import downsample_label, downsample_sdm
from segpipe.transforms import signed_distance_maps


def _batch(seed=0, shape=(8, 8, 8), ignore=False):
    g = torch.Generator().manual_seed(seed)
    label = (torch.rand((2, 1, *shape), generator=g) > 0.85).long()
    if ignore:
        label[0, 0, :2] = 255
    sdm = torch.stack([torch.from_numpy(signed_distance_maps(label[b, 0].numpy(), 2, (1, 1, 2), ignore_index=255 if ignore else None)) for b in range(2)])
    logits = torch.randn((2, 2, *shape), generator=g, dtype=torch.float32)
    return logits, {"label": label, "sdm": sdm}


def test_total_follows_spec_and_schedule():
    logits, batch = _batch()
    loss = CompositeLoss("0.5*ce+dice+boundary", "rebalance", num_classes=2)
    probs = logits.softmax(1)
    ce = cross_entropy_loss(logits, batch["label"])
    dice = dice_loss(probs, batch["label"])
    bnd = boundary_loss(probs[:, 1:], batch["sdm"])
    for epoch in (0, 30, 150):
        total, terms = loss(logits, batch, epoch)
        a = max(1 - 0.01 * epoch, 0.01)
        assert total.item() == pytest.approx(a * (0.5 * ce.item() + dice.item()) + (1 - a) * bnd.item(), rel=1e-5)
        assert set(terms) == {"ce", "dice", "boundary"}
        assert terms["boundary"].item() == pytest.approx(bnd.item(), rel=1e-5)


def test_increase_schedule_and_gradients_flow():
    logits, batch = _batch(1)
    logits.requires_grad_()
    loss = CompositeLoss("dice+boundary", "increase", num_classes=2)
    total, terms = loss(logits, batch, 9)
    assert total.item() == pytest.approx(terms["dice"].item() + 0.1 * terms["boundary"].item(), rel=1e-5)
    total.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_terms_read_named_entries():
    logits, batch = _batch()
    loss = CompositeLoss("dice+boundary", num_classes=2)
    with pytest.raises(ValueError, match=r"'boundary' term reads batch\['sdm'\]"):
        loss(logits, {"label": batch["label"]})
    with pytest.raises(ValueError, match=r"read batch\['label'\]"):
        loss(logits, {"sdm": batch["sdm"]})
    with pytest.raises(ValueError, match=r"batch\['sdm'\]: expected shape \(2, 1, 8, 8, 8\)"):
        loss(logits, {"label": batch["label"], "sdm": batch["sdm"].repeat(1, 2, 1, 1, 1)})
    # a spec without the boundary term needs no maps
    CompositeLoss("dice+ce", num_classes=2)(logits, {"label": batch["label"]})


def test_ignore_label_everywhere():
    logits, batch = _batch(2, ignore=True)
    loss = CompositeLoss("dice+ce+focal+gdl+bitempered+boundary", num_classes=2, ignore_index=255)
    total, terms = loss(logits, batch, 3, validate=True)
    assert torch.isfinite(total) and len(terms) == 6
    assert (batch["sdm"][0, 0, :2] == 0).all()  # ignored voxels contribute nothing to the boundary term


def test_deep_supervision_weights():
    assert deep_supervision_weights(1) == [1.0]
    w = deep_supervision_weights(4)
    assert w == pytest.approx([8 / 15, 4 / 15, 2 / 15, 1 / 15]) and sum(w) == pytest.approx(1.0)


def test_deep_supervision_regional_on_downsampled_labels():
    logits, batch = _batch(3, shape=(8, 8, 8))
    low = torch.randn(2, 2, 4, 4, 4)
    loss = CompositeLoss("dice", num_classes=2)
    total, _ = loss([logits, low], batch)
    lab_low = F.interpolate(batch["label"].float(), size=(4, 4, 4), mode="nearest-exact").long()
    expected = 2 / 3 * dice_loss(logits.softmax(1), batch["label"]) + 1 / 3 * dice_loss(low.softmax(1), lab_low)
    assert total.item() == pytest.approx(expected.item(), rel=1e-5)


def test_deep_supervision_boundary_all_scales_in_mm():
    logits, batch = _batch(4)
    low = torch.randn(2, 2, 4, 4, 4)
    total, terms = CompositeLoss("boundary", "constant", num_classes=2)([logits, low], batch)
    sdm_low = F.avg_pool3d(batch["sdm"], 2)
    expected = 2 / 3 * boundary_loss(logits.softmax(1)[:, 1:], batch["sdm"]) + 1 / 3 * boundary_loss(low.softmax(1)[:, 1:], sdm_low)
    assert terms["boundary"].item() == pytest.approx(expected.item(), rel=1e-5)
    # full-resolution only: weight 1 on the full-resolution term
    _, terms_full = CompositeLoss("boundary", "constant", num_classes=2, ds_boundary="full")([logits, low], batch)
    assert terms_full["boundary"].item() == pytest.approx(boundary_loss(logits.softmax(1)[:, 1:], batch["sdm"]).item(), rel=1e-5)


def test_downsampled_map_keeps_millimetres():
    # a plane boundary: the pooled map of the true label is the true map sampled coarser (same mm scale)
    lab = np.zeros((16, 4, 4), dtype=np.int64)
    lab[:8] = 1
    sdm = torch.from_numpy(signed_distance_maps(lab, 2, (1.0, 1.0, 1.0)))[None]
    low = downsample_sdm(sdm, (8, 2, 2))[0, 0, :, 0, 0]
    assert low[0].item() == pytest.approx(-6.5) and low[-1].item() == pytest.approx(7.5)
    # a perfect coarse prediction still minimises the coarse boundary term
    lab_low = downsample_label(torch.from_numpy(lab)[None, None], (8, 2, 2))
    perfect = F.one_hot(lab_low[:, 0], 2).permute(0, 4, 1, 2, 3).float()
    assert boundary_loss(perfect[:, 1:], downsample_sdm(sdm, (8, 2, 2))) < boundary_loss(1 - perfect[:, 1:], downsample_sdm(sdm, (8, 2, 2)))


def test_constructor_errors():
    with pytest.raises(ValueError, match="did you mean 'dice'"):
        CompositeLoss("dise+boundary")
    with pytest.raises(ValueError, match="unknown option 'gama'"):
        CompositeLoss("focal", options={"focal": {"gama": 2}})
    with pytest.raises(ValueError, match="did you mean 'rebalance'"):
        CompositeLoss("dice", "rebalanse")
    logits, batch = _batch()
    with pytest.raises(ValueError, match="expected 3 channels"):
        CompositeLoss("dice", num_classes=3)(logits, batch)
