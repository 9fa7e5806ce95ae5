"""The ``isles15`` protocol against the ISLES 2015/2016 organisers' program, rebuilt from the ITK classes it is
made of (skipped without ITK's Python wrapping, which only the optional 'compare' extra installs).

The program (``validateLabelImages-ISLES``, github.com/loli/ISLESevaluation, on Covalic's metrics) reads both
masks as unsigned short images; for the surface distances it takes each mask's border as the voxels where the
morphological gradient with a radius-1 ``BinaryBallStructuringElement`` is non-zero and the mask is set, and
reads the other mask's ``SignedMaurerDistanceMapImageFilter`` (inside negative, not squared, in mm) through a
cubic ``BSplineInterpolateImageFunction`` at each such voxel's physical point. :func:`_reference` does the same
with ITK's own classes, voxel by voxel, and segpipe's array version must give the same numbers.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from segpipe.evaluation.protocols import _sitk, evaluate_isles15

itk = pytest.importorskip("itk", reason="ITK's Python wrapping is not installed (pip install -e '.[compare]')")


def _itk_image(mask: np.ndarray, affine: np.ndarray):
    """An ITK unsigned-short image of an (x, y, z) mask, with the geometry segpipe gives SimpleITK images."""
    ref = _sitk(mask.astype(np.uint8), affine)
    img = itk.image_from_array(np.ascontiguousarray(np.transpose(mask, (2, 1, 0))).astype(np.uint16))
    img.SetSpacing(ref.GetSpacing())
    img.SetOrigin(ref.GetOrigin())
    img.SetDirection(itk.matrix_from_array(np.array(ref.GetDirection()).reshape(3, 3)))
    return img


def _directed(a, b, percentile: float | None):
    us3, f3 = itk.Image[itk.US, 3], itk.Image[itk.F, 3]
    maurer = itk.SignedMaurerDistanceMapImageFilter[us3, f3].New(Input=b, InsideIsPositive=False, SquaredDistance=False,
                                                                   UseImageSpacing=True)
    maurer.Update()
    interp = itk.BSplineInterpolateImageFunction[f3, itk.D, itk.F].New()
    interp.SetSplineOrder(3)
    interp.SetInputImage(maurer.GetOutput())
    se = itk.FlatStructuringElement[3]
    grad = itk.MorphologicalGradientImageFilter[us3, us3, se].New(Input=a, Kernel=se.Ball([1, 1, 1]))
    grad.Update()
    edge, av = itk.array_from_image(grad.GetOutput()), itk.array_from_image(a)
    dist = []
    for k, j, i in np.argwhere((edge != 0) & (av != 0)):  # arrays are (z, y, x)
        index = [int(i), int(j), int(k)]
        # the program asks IsInsideBuffer of the point; the wrapping offers only the index form, the same here
        # (both masks share one grid)
        if interp.IsInsideBuffer(index):
            dist.append(abs(interp.Evaluate(a.TransformIndexToPhysicalPoint(index))))
    if not dist:
        return math.inf
    if percentile is None:  # AverageDistanceImageToImageMetric
        return sum(dist) / len(dist)
    return sorted(dist)[int(percentile * (len(dist) - 1))]  # HausdorffDistanceImageToImageMetric


def _reference(gt: np.ndarray, pred: np.ndarray, affine: np.ndarray) -> dict[str, float]:
    fixed, moving = _itk_image(gt != 0, affine), _itk_image(pred != 0, affine)
    n_g, n_p = int((gt != 0).sum()), int((pred != 0).sum())
    if n_g == 0 or n_p == 0:
        assd = hd = 0.0 if n_g == n_p else math.inf
    else:
        d12, d21 = _directed(fixed, moving, None), _directed(moving, fixed, None)
        assd = math.inf if math.isinf(d12) or math.isinf(d21) else 0.5 * (d12 + d21)
        hd = max(_directed(fixed, moving, 1.0), _directed(moving, fixed, 1.0))
    return {"assd": assd, "hd": hd}


def test_the_ball_is_binary_balls_19_voxels():
    """ITK's radius-1 ``BinaryBallStructuringElement`` holds the voxels whose centres lie in the ellipsoid of
    axes 3 around the middle one (corners out, edges in); the wrapped ``FlatStructuringElement.Ball`` must too."""
    us3 = itk.Image[itk.US, 3]
    dot = np.zeros((5, 5, 5), np.uint16)
    dot[2, 2, 2] = 1
    se = itk.FlatStructuringElement[3]
    dil = itk.GrayscaleDilateImageFilter[us3, us3, se].New(Input=itk.image_from_array(dot), Kernel=se.Ball([1, 1, 1]))
    dil.Update()
    grid = np.indices((3, 3, 3)) - 1
    expected = np.zeros((5, 5, 5), bool)
    expected[1:4, 1:4, 1:4] = (grid ** 2).sum(axis=0) <= 1.5 ** 2
    assert int(expected.sum()) == 19
    np.testing.assert_array_equal(itk.array_from_image(dil.GetOutput()) != 0, expected)


def _blob(shape, centre, radii) -> np.ndarray:
    idx = np.indices(shape).astype(float)
    return (sum(((idx[a] - centre[a]) / radii[a]) ** 2 for a in range(3)) <= 1.0)


CASES = {
    "grown": lambda g: ndimage.binary_dilation(g),
    "shrunk": lambda g: ndimage.binary_erosion(g),
    "shifted": lambda g: np.roll(g, 3, axis=0),
    "a lesion of its own": lambda g: g | _blob(g.shape, (8, 9, 4), (3, 2, 1.5)),
    "a lesion dropped": lambda g: g & (ndimage.label(g)[0] != 1),
    "exact": lambda g: g.copy(),
    "empty": np.zeros_like,
}


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.9, 0.9, 3.0)], ids=["isotropic", "thick slices"])
@pytest.mark.parametrize("case", list(CASES))
def test_isles15_distances_equal_the_programs(case, spacing):
    shape = (40, 36, 18)
    gt = _blob(shape, (20, 18, 9), (7, 5, 3.5)) | _blob(shape, (30, 8, 12), (3, 3, 2))
    pred = CASES[case](gt)
    affine = np.diag([-spacing[0], spacing[1], spacing[2], 1.0])  # a flipped axis and an origin off zero
    affine[:3, 3] = (12.5, -40.0, 7.0)
    ours = evaluate_isles15(gt, pred, affine)
    theirs = _reference(gt, pred, affine)
    for key in ("assd", "hd"):
        if math.isinf(theirs[key]):
            assert math.isinf(ours[key]), (key, ours[key])
        else:
            assert ours[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-5), (key, ours[key], theirs[key])


def test_isles15_distances_on_the_real_case(sample_dir):
    import nibabel as nib

    img = nib.load(str(next(sample_dir.glob("derivatives/**/*_msk.nii.gz"))))
    gt = np.asanyarray(img.dataobj) > 0
    pred = ndimage.binary_dilation(gt) & ~ndimage.binary_erosion(gt, iterations=2)  # a hollow, grown lesion
    ours, theirs = evaluate_isles15(gt, pred, img.affine), _reference(gt, pred, img.affine)
    assert ours["assd"] == pytest.approx(theirs["assd"], rel=1e-5)
    assert ours["hd"] == pytest.approx(theirs["hd"], rel=1e-5)
    assert ours["assd"] > 0
