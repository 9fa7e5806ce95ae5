"""Joint augmentation: the distance map of an augmented patch is the map of the augmented label."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from segpipe.transforms import signed_distance_maps
from segpipe.transforms.augmentation import (
    JointAffined,
    RandJointFlipd,
    _matrix,
    _sampling_grid,
    build_augmentation,
    resample_label,
    sampled_extent,
)


def _blob(shape=(40, 40, 40)):
    idx = np.indices(shape).astype(float)
    c = np.array(shape) / 2
    lab = ((((idx[0] - c[0]) / 9) ** 2 + ((idx[1] - c[1] - 3) / 6) ** 2 + ((idx[2] - c[2]) / 7) ** 2) < 1).astype(np.uint8)
    lab[8:11, 8:12, 20:23] = 1  # a small second lesion off-centre
    return lab


def _item(lab):
    sdm = signed_distance_maps(lab, 2, (1.0, 1.0, 1.0))
    img = torch.from_numpy(lab.astype(np.float32))[None].repeat(2, 1, 1, 1)
    return {"image": img, "label": torch.from_numpy(lab)[None], "sdm": torch.from_numpy(sdm)}


def test_flips_keep_the_map_exact():
    lab = _blob()
    flip = RandJointFlipd(["image", "label", "sdm"], prob=1.0)
    out = flip(_item(lab))
    assert flip.axes == [0, 1, 2]
    new_lab = out["label"][0].numpy()
    assert np.array_equal(new_lab, lab[::-1, ::-1, ::-1])
    np.testing.assert_allclose(out["sdm"].numpy(), signed_distance_maps(new_lab, 2, (1, 1, 1)), atol=1e-5)


def test_quarter_turn_is_exact():
    lab = _blob()
    aff = JointAffined((40, 40, 40))
    out = aff.apply(_item(lab), (0.0, 0.0, np.pi / 2), 1.0)
    new_lab = out["label"][0].numpy()
    assert new_lab.sum() == lab.sum() and not np.array_equal(new_lab, lab)
    np.testing.assert_allclose(out["sdm"].numpy(), signed_distance_maps(new_lab, 2, (1, 1, 1)), atol=1e-3)


def test_arbitrary_rotation_keeps_the_map_within_interpolation_error():
    lab = _blob()
    out = JointAffined((40, 40, 40)).apply(_item(lab), (0.2, -0.1, 0.5), 1.0)
    new_lab = out["label"][0].numpy()
    err = np.abs(out["sdm"].numpy() - signed_distance_maps(new_lab, 2, (1, 1, 1)))[0]
    r = np.sqrt(((np.indices(lab.shape) - 19.5) ** 2).sum(0))
    inside = r < 16  # where the rotated patch samples inside the input (the loader reads a larger region)
    assert err[inside].mean() < 0.3 and np.percentile(err[inside], 99) < 1.5


@pytest.mark.parametrize("zoom", [0.8, 1.3])
def test_zoom_multiplies_the_map_so_it_stays_in_mm(zoom):
    lab = _blob()
    item = _item(lab)
    out = JointAffined((40, 40, 40)).apply(item, (0.0, 0.0, 0.0), zoom)
    new_lab = out["label"][0].numpy()
    truth = signed_distance_maps(new_lab, 2, (1, 1, 1))
    r = np.sqrt(((np.indices(lab.shape) - 19.5) ** 2).sum(0))[None]
    near = (np.abs(truth) > 3) & (np.abs(truth) < 10) & (r < 14 * min(zoom, 1.0))  # away from the padded border
    err = np.abs(out["sdm"].numpy() - truth)[near]
    err_unscaled = np.abs(out["sdm"].numpy() / zoom - truth)[near]
    assert err.mean() < 0.6
    assert err.mean() < 0.5 * err_unscaled.mean()  # without the zoom factor the map is off by (zoom - 1) * d
    assert abs(new_lab.sum() / lab.sum() - zoom**3) < 0.15 * zoom**3


def test_offset_samples_the_requested_place():
    lab = np.zeros((30, 30, 30), np.uint8)
    lab[20:24, 5:9, 10:14] = 1
    item = _item(lab)
    out = JointAffined((10, 10, 10)).apply(item, (0.0, 0.0, 0.0), 1.0, offset=(21.5 - 14.5, 6.5 - 14.5, 11.5 - 14.5))
    assert out["label"][0].numpy().sum() == 64 and out["label"][0, 3:7, 3:7, 3:7].all()


def test_beyond_the_volume_a_patch_is_zero_not_the_edge_copied():
    """A zoomed-out patch of a thin slab (CT perfusion: 16 slices of 5 mm, the patch as deep) reaches beyond
    it: there the image is 0 (the mean), the label background and the map 0, not the last slices copied (a
    lesion that reaches the slab's faces would be copied under a background label)."""
    lab = np.zeros((20, 20, 8), np.uint8)
    lab[6:14, 6:14, :] = 1  # through every slice
    item = _item(lab)
    item["image"] = item["image"] * 4 + 1
    out = JointAffined((20, 20, 8)).apply(item, (0.0, 0.0, 0.0), 0.7)
    # output slice 0 samples input slice (0 - 3.5) / 0.7 + 3.5 = -1.5: beyond the volume
    assert (out["image"][..., 0] == 0).all() and (out["label"][..., 0] == 0).all() and (out["sdm"][..., 0] == 0).all()
    assert out["label"][0, 10, 10, 4] == 1 and abs(float(out["image"][0, 10, 10, 4]) - 5) < 1e-4 and out["sdm"][0, 10, 10, 4] < 0  # inside: the data


def test_a_resampled_label_follows_the_shape_closer_than_nearest_neighbour():
    """nnU-Net's label resampling (each value's indicator linearly, the largest wins): against the exact
    rotated and zoomed ball, fewer wrong voxels than nearest-neighbour sampling (929 against 1523 here)."""
    rng = np.random.default_rng(0)
    shape = (24, 24, 12)
    wrong = {"linear": 0, "nearest": 0}
    for _ in range(20):
        c, r = np.array(shape) / 2 - 0.5 + rng.uniform(-1, 1, 3), rng.uniform(3, 6)
        lab = (((np.indices(shape) - c[:, None, None, None]) ** 2).sum(0) < r * r).astype(np.uint8)
        m = _matrix(rng.uniform(-0.3, 0.3, 3), rng.uniform(0.7, 1.4))
        grid = _sampling_grid(shape, shape, m, (0, 0, 0))
        half = ((np.array(shape) - 1) / 2)[:, None]
        q = m @ (np.indices(shape).reshape(3, -1) - half) + half  # where each output voxel samples the input
        truth = (((q - c[:, None]) ** 2).sum(0) < r * r).reshape(shape)
        t = torch.from_numpy(lab)[None]
        linear = resample_label(t, grid, (1,))[0].numpy().astype(bool)
        nearest = torch.nn.functional.grid_sample(t[None].float(), grid, mode="nearest", align_corners=True)[0, 0].numpy() > 0.5
        wrong["linear"] += int((linear != truth).sum())
        wrong["nearest"] += int((nearest != truth).sum())
    assert wrong["linear"] < 0.75 * wrong["nearest"], wrong


def test_label_resampling_keeps_every_value_ties_to_the_nearest_and_background_outside():
    lab = np.zeros((12, 12, 6), np.uint8)
    lab[2:6, 2:6, 1:5] = 1
    lab[7:10, 7:10, 1:5] = 2
    lab[5:7, 2:4, :] = 255  # the ignore value
    t = torch.from_numpy(lab)[None]
    same = _sampling_grid(lab.shape, lab.shape, np.eye(3), (0, 0, 0))
    assert torch.equal(resample_label(t, same, (1, 2, 255)), t)  # on the voxels: the label itself
    assert torch.equal(resample_label(t, same), t)  # the values read from the label
    shifted = _sampling_grid(lab.shape, lab.shape, np.eye(3), (0.5, 0, 0))  # halfway between voxels: ties everywhere
    nearest = torch.nn.functional.grid_sample(t[None].float(), shifted, mode="nearest", align_corners=True)[0].round().to(t.dtype)
    assert torch.equal(resample_label(t, shifted, (1, 2, 255)), nearest)
    out = resample_label(t, _sampling_grid(lab.shape, lab.shape, np.eye(3), (0, 0, 3)), (1, 2, 255))
    assert set(torch.unique(out).tolist()) <= {0, 1, 2, 255} and (out[..., 3:] == 0).all()  # beyond the volume: background


def test_extent_covers_the_rotated_patch():
    ext = sampled_extent((64, 64, 32), (0.0, 0.0, np.pi / 4), 0.8)
    assert ext[0] > 32 * np.sqrt(2) / 0.8 - 1 and ext[2] == pytest.approx(15.5 / 0.8 + 1)


def test_intensity_changes_touch_the_image_only():
    lab = _blob()
    item = _item(lab)
    aug = build_augmentation((40, 40, 40))
    aug.set_random_state(3)
    changed = 0
    for _ in range(8):
        out = aug(dict(item))
        lab = out["label"][0].numpy()
        assert set(np.unique(lab)) <= {0, 1} and lab.sum() == _blob().sum()
        np.testing.assert_allclose(out["sdm"].numpy(), signed_distance_maps(lab, 2, (1, 1, 1)), atol=1e-4)
        # the image is the label, flipped the same way, unless an intensity change touched it
        changed += not np.allclose(out["image"][0].numpy(), lab.astype(np.float32))
    assert changed >= 1


def _channels_of_other_ranges(gen: torch.Generator) -> torch.Tensor:
    """Three channels as different as CT in units of its lesion std, a perfusion map and an ADC in mm^2/s."""
    x = torch.randn((3, 9, 8, 7), generator=gen)
    return torch.stack([x[0] * 3 + 1, x[1].abs() * 400 + 20, x[2] * 1e-4 + 8e-4])


@pytest.mark.parametrize("retain_stats,invert", [(True, False), (False, False), (True, True)])
def test_gamma_is_monais_on_each_channel_with_a_gamma_of_its_own(retain_stats, invert):
    from monai.transforms import AdjustContrast

    from segpipe.transforms.augmentation import RandAdjustContrastTorchd

    ours = RandAdjustContrastTorchd("image", prob=1.0, gamma=(0.7, 1.5), retain_stats=retain_stats, invert_image=invert)
    ours.set_random_state(11)
    gen = torch.Generator().manual_seed(0)
    gammas = []
    for _ in range(20):
        image = _channels_of_other_ranges(gen)
        out = ours({"image": image})["image"]
        assert len(set(ours.gammas)) == 3  # nnU-Net's synchronize_channels=False
        for c, g in enumerate(ours.gammas):  # each channel over its own range, as MONAI does it for one channel
            want = torch.as_tensor(AdjustContrast(g, invert_image=invert, retain_stats=retain_stats)(image[c:c + 1]))[0]
            torch.testing.assert_close(out[c], want, rtol=1e-5, atol=1e-6 * float(image[c].abs().max()))
        gammas += ours.gammas
    below = sum(g < 1 for g in gammas) / len(gammas)
    assert all(0.7 <= g <= 1.5 for g in gammas) and 0.35 < below < 0.65  # nnU-Net's BGContrast: darker as often as brighter
    never = RandAdjustContrastTorchd("image", prob=0.0)
    image = _channels_of_other_ranges(gen)
    assert never({"image": image})["image"] is image


def test_brightness_and_contrast_treat_each_channel_on_its_own():
    from segpipe.transforms.augmentation import build_augmentation

    brightness, contrast = build_augmentation((9, 8, 7)).transforms[3:5]
    gen = torch.Generator().manual_seed(1)
    for t in (brightness, contrast):
        t.set_random_state(3)
        t.prob = 1.0
        image = _channels_of_other_ranges(gen)
        out = torch.as_tensor(t({"image": image})["image"])
        ratios = [float((out[c] - (image[c].mean() if t is contrast else 0)).std() / image[c].std()) for c in range(3)]
        assert len({round(r, 4) for r in ratios}) == 3, ratios  # a factor per channel
        if t is contrast:  # about each channel's own mean, within its own range
            for c in range(3):
                assert abs(float(out[c].mean() - image[c].mean())) < 1e-3 * float(image[c].std()) + 1e-6
                assert out[c].min() >= image[c].min() - 1e-6 and out[c].max() <= image[c].max() + 1e-6


@pytest.mark.parametrize("sigma", [0.5, 0.73, 1.0])
def test_gaussian_blur_equals_scipy(sigma):
    from scipy import ndimage

    from segpipe.transforms.augmentation import gaussian_blur

    x = np.random.default_rng(3).normal(size=(17, 12, 10)).astype(np.float32)
    expected = ndimage.gaussian_filter(x, sigma, mode="reflect", truncate=4.0)
    np.testing.assert_allclose(gaussian_blur(torch.from_numpy(x), sigma).numpy(), expected, atol=2e-6)


def test_blur_and_low_resolution_draws():
    from segpipe.transforms.augmentation import RandGaussianBlurTorchd, RandSimulateLowResolutionTorchd, gaussian_blur

    img = torch.from_numpy(np.random.default_rng(4).normal(size=(2, 16, 16, 12)).astype(np.float32))
    label = torch.zeros(1, 16, 16, 12, dtype=torch.uint8)
    blur = RandGaussianBlurTorchd(["image"], prob=1.0, prob_per_channel=1.0)
    blur.set_random_state(5)
    out = blur({"image": img, "label": label})
    for c, (on, sigma) in enumerate(blur._draws):  # each channel with its own sigma
        assert on and 0.5 <= sigma <= 1.0
        assert torch.equal(out["image"][c], gaussian_blur(img[c], sigma))
    assert out["label"] is label and blur._draws[0][1] != blur._draws[1][1]
    assert torch.equal(RandGaussianBlurTorchd(["image"], prob=0.0)({"image": img})["image"], img)
    same = RandSimulateLowResolutionTorchd(["image"], prob=1.0, zoom_range=(1.0, 1.0), prob_per_channel=1.0)
    assert torch.allclose(same({"image": img})["image"], img, atol=1e-6)  # full resolution: nothing changes
    low = RandSimulateLowResolutionTorchd(["image"], prob=1.0, zoom_range=(0.5, 0.5), prob_per_channel=1.0)
    got = low({"image": img})["image"]
    assert got.shape == img.shape and not torch.allclose(got, img, atol=1e-3)
    assert got.std() < img.std()  # half the resolution, interpolated back: smoother
    assert torch.equal(RandSimulateLowResolutionTorchd(["image"], prob=0.0)({"image": img})["image"], img)


def test_the_augmentation_is_nnunets_set():
    from segpipe.transforms.augmentation import build_augmentation

    names = [type(t).__name__ for t in build_augmentation((16, 16, 16)).transforms]
    assert names == ["RandJointFlipd", "RandGaussianNoiseTorchd", "RandGaussianBlurTorchd", "RandScaleIntensityd",
                     "RandScaleIntensityFixedMeand", "RandSimulateLowResolutionTorchd", "RandAdjustContrastTorchd",
                     "RandAdjustContrastTorchd"]
    gammas = build_augmentation((16, 16, 16)).transforms[-2:]
    assert [(g.prob, g.invert_image) for g in gammas] == [(0.1, True), (0.3, False)]
