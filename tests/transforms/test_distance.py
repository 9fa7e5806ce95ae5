"""Signed distance maps: the convention of DESIGN.md, pinned on hand-computed and analytic cases."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from segpipe.transforms import signed_distance_map, signed_distance_maps


def one_hot2dist_reference(mask: np.ndarray, resolution=None) -> np.ndarray:
    """The boundary-loss paper's convention for one class (outside: distance to the object; inside:
    -(distance to the background - 1)), written from its description."""
    pos = mask.astype(bool)
    if not pos.any():
        return np.zeros(mask.shape)
    neg = ~pos
    return ndimage.distance_transform_edt(neg, sampling=resolution) * neg - (ndimage.distance_transform_edt(pos, sampling=resolution) - 1) * pos


def test_1d_hand_computed():
    m = np.array([0, 0, 1, 1, 1, 1, 0, 0, 0], bool)
    assert signed_distance_map(m).tolist() == [2, 1, 0, -1, -1, 0, 1, 2, 3]
    assert signed_distance_map(m, [0.5]).tolist() == [1.0, 0.5, 0, -0.5, -0.5, 0, 0.5, 1.0, 1.5]


def test_2d_hand_computed():
    m = np.zeros((5, 5), bool)
    m[1:4, 1:4] = True
    r2 = np.sqrt(2)
    expected = np.array(
        [
            [r2, 1, 1, 1, r2],
            [1, 0, 0, 0, 1],
            [1, 0, -1, 0, 1],
            [1, 0, 0, 0, 1],
            [r2, 1, 1, 1, r2],
        ]
    )
    np.testing.assert_allclose(signed_distance_map(m), expected, atol=1e-6)


def test_dtype_and_sign():
    m = np.zeros((6, 7, 8), bool)
    m[2:5, 2:5, 2:6] = True
    d = signed_distance_map(m, (1, 1, 2))
    assert d.dtype == np.float32 and d.shape == m.shape
    assert (d[~m] > 0).all() and (d[m] <= 0).all()


@pytest.mark.parametrize("shape", [(30,), (17, 19), (13, 14, 15)])
def test_unit_spacing_equals_reference(shape):
    rng = np.random.default_rng(sum(shape))
    for _ in range(20):
        m = ndimage.binary_dilation(rng.random(shape) > 0.97, iterations=int(rng.integers(0, 3)))
        m[tuple(int(rng.integers(0, s)) for s in shape)] = True
        if m.all():
            continue
        np.testing.assert_allclose(signed_distance_map(m), one_hot2dist_reference(m), atol=1e-4)
        # isotropic spacing s: s times the reference
        np.testing.assert_allclose(signed_distance_map(m, 2.5), 2.5 * one_hot2dist_reference(m), atol=1e-4)


def test_empty_and_full_class_give_zeros():
    assert not signed_distance_map(np.zeros((4, 5, 6), bool), (1, 1, 3)).any()
    assert not signed_distance_map(np.ones((4, 5, 6), bool), (1, 1, 3)).any()


def test_thick_slice_offset_scales_with_the_slice():
    """Pinned: the inner boundary layer is 0 in every direction; n slices deep along z is -(n - 1) * dz."""
    m = np.zeros((6, 6, 10), bool)
    m[:, :, 2:8] = True  # a slab filling the plane: the nearest background is along z
    d = signed_distance_map(m, (1.0, 1.0, 3.0))
    assert d[3, 3].tolist() == [6, 3, 0, -3, -6, -6, -3, 0, 3, 6]
    # the reference's literal 1 mm leaves the boundary slices at -2
    assert one_hot2dist_reference(m, (1.0, 1.0, 3.0))[3, 3, 2] == pytest.approx(-2.0)
    blob = np.zeros((20, 20, 9), bool)
    zz = np.indices(blob.shape)
    blob[((zz[0] - 10) ** 2 + (zz[1] - 10) ** 2) / 36 + ((zz[2] - 4) * 3) ** 2 / 100 <= 1] = True
    d = signed_distance_map(blob, (1.0, 1.0, 3.0))
    layer = blob & ~ndimage.binary_erosion(blob, border_value=1)
    assert (d[layer] == 0).all() and (d[blob & ~layer] < 0).all()
    assert (one_hot2dist_reference(blob, (1.0, 1.0, 3.0))[layer] < -0.5).any()


def test_anisotropic_sphere_against_analytic_distance():
    spacing = np.array([0.9, 1.1, 3.0])
    shape = (64, 56, 24)
    center = np.array(shape) * spacing / 2
    radius = 18.0
    pos = np.indices(shape).reshape(3, -1).T * spacing
    r = np.linalg.norm(pos - center, axis=1).reshape(shape)
    m = r <= radius
    d = signed_distance_map(m, spacing)
    analytic = r - radius
    err = d - analytic
    # the maps measure to voxel centres, which lie up to one voxel step (3 mm along z) off the true surface
    assert np.abs(err).max() <= spacing.max() + 1e-3
    near = np.abs(analytic) < 10
    assert np.abs(err[near]).mean() < 0.8
    # deep inside, the value is the distance to the surface less about one voxel step
    deep = analytic < -8
    assert np.abs(err[deep]).max() <= spacing.max() + 1e-3 and err[deep].mean() > 0


def test_maps_per_class_and_ignore_label():
    label = np.zeros((8, 8, 8), np.uint8)
    label[1:3, 1:3, 1:3] = 1
    label[5:7, 5:7, 5:7] = 2
    label[0, :, :] = 255
    maps = signed_distance_maps(label, 3, (1, 1, 1), ignore_index=255)
    assert maps.shape == (2, 8, 8, 8) and maps.dtype == np.float32
    np.testing.assert_allclose(maps[1][1:], signed_distance_map(label == 2)[1:], atol=1e-6)
    assert (maps[:, 0] == 0).all()


def test_bad_input():
    with pytest.raises(ValueError, match="mask: expected a boolean"):
        signed_distance_map(np.array([0, 2, 1]))
    with pytest.raises(ValueError, match="spacing: expected 2 positive voxel sizes"):
        signed_distance_map(np.zeros((3, 3), bool), (1, 0))
    with pytest.raises(ValueError, match="1D, 2D or 3D"):
        signed_distance_map(np.zeros((2, 2, 2, 2), bool))
