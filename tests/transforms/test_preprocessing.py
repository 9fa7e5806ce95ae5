"""Each step of the preprocessing chain on tiny synthetic volumes, and the whole chain on the real sample."""

from __future__ import annotations

import gzip
import logging

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from segpipe.config import load_config
from segpipe.data.manifest import load_manifest
from segpipe.errors import SegpipeError
from segpipe.planning import make_plan
from segpipe.transforms import signed_distance_maps
from segpipe.transforms.preprocessing import (
    IGNORE_INDEX,
    CleanLabeld,
    LoadVolumed,
    MatchReferenceGridd,
    ZScored,
    build_preprocessing,
    channel_key,
    head_mask,
    run_chain,
)
from tests.conftest import toy_volume, write_nifti


def _mt(arr, affine=None):
    return MetaTensor(torch.as_tensor(np.asarray(arr, dtype=np.float32))[None], affine=torch.as_tensor(np.eye(4) if affine is None else affine))


def _plan(channels=("t1", "flair"), overrides=(), classes=("background", "lesion"), ignore=None):
    cfg = load_config(None, list(overrides))
    return make_plan(cfg, channels, classes, ignore, 0.5 if len(classes) == 2 else None, [(1.5, 1.5, 2.0)], [(24, 24, 16)])


# -- loading ---------------------------------------------------------------------------------------------


def test_load_channel_first_with_affine(tmp_path):
    aff = np.diag([-2.0, 2.0, 3.0, 1.0])
    p = write_nifti(tmp_path / "a.nii.gz", np.arange(24, dtype=np.float32).reshape(2, 3, 4), aff)
    out = LoadVolumed(["x"], {"x": "channel 'x'"})({"x": str(p)})["x"]
    assert tuple(out.shape) == (1, 2, 3, 4) and np.allclose(out.affine, aff)
    # a 4D file holding a single volume is accepted
    p4 = write_nifti(tmp_path / "b.nii.gz", np.ones((2, 3, 4, 1), np.float32) * np.arange(2)[:, None, None, None], aff)
    assert tuple(LoadVolumed(["x"], {})({"x": str(p4)})["x"].shape) == (1, 2, 3, 4)


def test_a_file_without_orientation_is_read_with_a_warning(tmp_path, caplog):
    """qform and sform codes 0 (an Analyze-style conversion): the position in the scanner is unknown; nibabel's
    centred default is used, and the user is told, since channels on other grids may then not line up."""
    img = nib.Nifti1Image(np.arange(120, dtype=np.float32).reshape(4, 5, 6), np.diag([2.0, 2.0, 3.0, 1.0]))
    img.set_qform(None, code=0)
    img.set_sform(None, code=0)
    nib.save(img, str(tmp_path / "nocode.nii.gz"))
    with caplog.at_level(logging.WARNING):
        out = LoadVolumed(["x"], {"x": "channel 'flair'"})({"x": str(tmp_path / "nocode.nii.gz")})["x"]
    assert tuple(out.shape) == (1, 4, 5, 6)
    assert "channel 'flair'" in caplog.text and "no orientation in its header" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        LoadVolumed(["x"], {})({"x": str(write_nifti(tmp_path / "coded.nii.gz", np.arange(120, dtype=np.float32).reshape(4, 5, 6)))})
    assert "orientation" not in caplog.text

    sheared = np.diag([2.0, 2.0, 3.0, 1.0])
    sheared[1, 2] = 3 * np.tan(np.radians(15.0))  # each slice 0.8 mm further along y: a tilted CT stacked as acquired
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        LoadVolumed(["x"], {})({"x": str(write_nifti(tmp_path / "tilted.nii.gz", np.arange(120, dtype=np.float32).reshape(4, 5, 6), sheared))})
    assert "sheared by 15.0 degrees" in caplog.text


@pytest.mark.parametrize(
    "make, needle",
    [
        (lambda p: write_nifti(p, np.ones((4, 4, 4, 3), np.float32)), "expected a 3D volume, found 4D"),
        (lambda p: write_nifti(p, np.where(np.eye(4)[:, :, None] > 0, np.nan, 1.0).repeat(4, 2).astype(np.float32)), "16 voxels are NaN or infinite"),
        (lambda p: write_nifti(p, np.zeros((4, 4, 4), np.float32)), "every voxel is 0, an empty image"),
        (lambda p: p.write_bytes(b"not an image at all"), "cannot be read"),
        (lambda p: write_nifti(p, (np.ones((4, 4, 4)) * (1 + 2j)).astype(np.complex64)), "its voxels are complex (complex64)"),
        (lambda p: nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")]), np.eye(4)), str(p)),
         "its voxels are RGB"),
    ],
)
def test_load_bad_input(tmp_path, make, needle):
    p = tmp_path / "bad.nii.gz"
    make(p)
    with pytest.raises(SegpipeError) as info:
        LoadVolumed(["x"], {"x": "channel 'dwi'"})({"x": str(p)})
    assert needle in str(info.value) and "channel 'dwi'" in str(info.value) and str(p) in str(info.value)


def test_load_truncated_gzip(tmp_path):
    img, _ = toy_volume()
    good = write_nifti(tmp_path / "good.nii.gz", img)
    data = good.read_bytes()
    bad = tmp_path / "truncated.nii.gz"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(SegpipeError, match="cannot be read"):
        LoadVolumed(["x"], {})({"x": str(bad)})
    assert gzip.decompress(data)  # the good one is fine


# -- labels ----------------------------------------------------------------------------------------------


def test_binarise_real_mask_values():
    clean = CleanLabeld("label", 2, None, 0.5)
    arr = np.array([0.0, 0.99999999977, 0.3, 0.51])
    assert clean.clean(arr, "x").tolist() == [0, 1, 0, 1]
    assert clean.clean(np.array([0.0, 255.0, 255.0]), "x").tolist() == [0, 1, 1]


def test_ignore_value_mapped_first():
    clean = CleanLabeld("label", 2, 2, 0.5)
    assert clean.clean(np.array([0.0, 1.0, 2.0, 1.0]), "x").tolist() == [0, 1, IGNORE_INDEX, 1]


def test_values_outside_classes_are_an_error():
    with pytest.raises(SegpipeError, match=r"found values \[0.0, 1.0, 2.0\].*ignore_value: 2"):
        CleanLabeld("label", 2, None, 0.5).clean(np.array([0.0, 1.0, 2.0]), "wmh.nii.gz")
    with pytest.raises(SegpipeError, match="outside the declared classes 0..2"):
        CleanLabeld("label", 3, None, None).clean(np.array([0.0, 1.0, 4.0]), "x")
    assert CleanLabeld("label", 3, None, None).clean(np.array([0.0, 2.0, 1.0]), "x").tolist() == [0, 2, 1]


# -- grids -------------------------------------------------------------------------------------------------


def test_channel_on_another_grid_lands_on_the_reference_grid():
    ref_aff = np.diag([2.0, 2.0, 2.0, 1.0])
    ref = np.zeros((20, 20, 20), np.float32)
    ref[8:12, 8:12, 8:12] = 1
    # the same cube, world 16..24 mm, on a finer, thick-slice, shifted grid
    fine_aff = np.diag([0.5, 0.5, 4.0, 1.0])
    fine_aff[:3, 3] = [0.25, 0.25, 0.0]
    world = np.indices((80, 80, 10)).astype(float)
    wx, wy, wz = (world[0] * 0.5 + 0.25, world[1] * 0.5 + 0.25, world[2] * 4.0)
    fine = ((wx > 15) & (wx < 23) & (wy > 15) & (wy < 23) & (wz > 15) & (wz < 23)).astype(np.float32)
    d = {"a": _mt(ref, ref_aff), "b": _mt(fine, fine_aff), "label": _mt(ref, ref_aff + 1e-7)}
    out = MatchReferenceGridd(["a", "b"], "a", "label")(d)
    assert tuple(out["b"].shape) == (1, 20, 20, 20) and np.allclose(out["b"].affine, ref_aff)
    b = np.asarray(out["b"][0])
    assert b[9, 9, 9] > 0.5 and b[2, 2, 2] == 0 and b[15, 9, 9] == 0
    assert np.allclose(out["label"].affine, ref_aff)  # 1e-7 differences are accepted


def test_label_off_the_reference_grid_is_an_error():
    d = {"a": _mt(np.ones((8, 8, 8)), np.eye(4)), "label": _mt(np.zeros((8, 8, 7)), np.eye(4))}
    with pytest.raises(SegpipeError, match=r"not on the grid of.*shape \(8, 8, 7\) vs \(8, 8, 8\)"):
        MatchReferenceGridd(["a"], "a", "label")(d)
    aff = np.eye(4)
    aff[0, 3] = 0.5
    d = {"a": _mt(np.ones((8, 8, 8)), np.eye(4)), "label": _mt(np.zeros((8, 8, 8)), aff)}
    with pytest.raises(SegpipeError, match="largest affine difference 0.5"):
        MatchReferenceGridd(["a"], "a", "label")(d)


# -- head, normalisation ---------------------------------------------------------------------------------------


def test_head_mask_and_zscore():
    img, _ = toy_volume((32, 32, 20))
    mask = head_mask(img[None])
    assert mask[16, 16, 10] and not mask[0, 0, 0]
    d = {"image": _mt(img), "head": _mt(mask)}
    d["image"] = MetaTensor(torch.as_tensor(img)[None], affine=torch.eye(4))
    out = ZScored("image", "head", ["t1"])(d)
    z = np.asarray(out["image"][0])
    assert abs(z[mask].mean()) < 1e-4 and abs(z[mask].std() - 1) < 1e-3 and (z[~mask] == 0).all()
    assert out["stats"]["intensity"]["t1"]["mean"] == pytest.approx(float(img[mask].mean()), rel=1e-5)


# -- the whole chain ----------------------------------------------------------------------------------------


def test_chain_on_toy_case(toy_dataset):
    m = load_manifest(toy_dataset)
    plan = _plan(overrides=["preprocess.target_spacing=[1.0,1.0,1.0]", "preprocess.crop_margin_mm=2"])
    c = m.cases[0]
    inputs = {channel_key(ch): str(m.image_path(c, ch)) for ch in m.channels}
    inputs["label"] = str(m.label_path(c))
    out = build_preprocessing(plan, with_label=True)(inputs)
    img, lab, sdm = out["image"], out["label"], out["sdm"]
    assert img.dtype == torch.float32 and lab.dtype == torch.uint8 and sdm.dtype == torch.float32
    assert img.shape[0] == 2 and lab.shape[0] == 1 and sdm.shape[0] == 1
    assert nib.aff2axcodes(np.asarray(img.affine)) == ("R", "A", "S")
    assert np.allclose(np.sqrt((np.asarray(img.affine)[:3, :3] ** 2).sum(0)), 1.0)
    raw = nib.load(str(m.label_path(c)))
    raw_ml = float((np.asarray(raw.dataobj) > 0.5).sum()) * 1.5 * 1.5 * 2.0
    assert abs(float((lab == 1).sum()) - raw_ml) / raw_ml < 0.2  # 4x4x4 voxel cube resampled
    assert set(torch.unique(lab).tolist()) <= {0, 1}
    expected = signed_distance_maps(lab[0].numpy(), 2, (1.0, 1.0, 1.0))
    assert np.allclose(sdm.numpy(), expected, atol=1e-5)


def test_crop_to_head_keeps_a_margin(tmp_path):
    rng = np.random.default_rng(0)
    img = rng.normal(0, 2, (60, 50, 30)).astype(np.float32)
    img[20:36, 15:31, 10:20] += 100  # the "head": 16 x 16 x 10 voxels
    for name in ("t1", "flair"):
        write_nifti(tmp_path / f"{name}.nii.gz", img)
    plan = _plan(overrides=["preprocess.target_spacing=[1,1,1]", "preprocess.crop_margin_mm=3"])
    out = build_preprocessing(plan, with_label=False)({channel_key(c): str(tmp_path / f"{c}.nii.gz") for c in ("t1", "flair")})
    shape = np.array(out["image"].shape[1:])
    need = np.array([16, 16, 10]) + 2 * 3
    assert (shape >= need).all() and (shape <= need + 2).all(), shape  # the smoothed mask may add a voxel


def test_chain_without_label_for_inference(toy_dataset):
    m = load_manifest(toy_dataset)
    c = m.cases[0]
    out = build_preprocessing(_plan(), with_label=False)({channel_key(ch): str(m.image_path(c, ch)) for ch in m.channels})
    assert "label" not in out and "sdm" not in out and out["image"].shape[0] == 2


def test_empty_label_gives_zero_maps(tmp_path):
    img, _ = toy_volume()
    write_nifti(tmp_path / "t1.nii.gz", img)
    write_nifti(tmp_path / "flair.nii.gz", img)
    write_nifti(tmp_path / "lab.nii.gz", np.zeros(img.shape, np.float32))
    inputs = {channel_key("t1"): str(tmp_path / "t1.nii.gz"), channel_key("flair"): str(tmp_path / "flair.nii.gz"), "label": str(tmp_path / "lab.nii.gz")}
    out = build_preprocessing(_plan(), with_label=True)(inputs)
    assert not out["sdm"].any() and not out["label"].any()


def test_real_sample(sample_dir):
    """FLAIR lands on the DWI grid, orientation RAS, lesion volume in ml preserved within 5 %."""
    from segpipe.data.layouts import discover

    m = discover(sample_dir)
    c = m.cases[0]
    raw = nib.load(str(m.label_path(c)))
    raw_ml = float((np.asarray(raw.dataobj) > 0.5).sum()) * float(np.prod(raw.header.get_zooms()[:3])) / 1000
    assert raw_ml == pytest.approx(4.184, abs=1e-3)
    for spacing in ([2.0, 2.0, 2.0], [1.0, 1.0, 1.0], [3.0, 3.0, 3.0]):
        cfg = load_config(None, [f"preprocess.target_spacing={spacing}"])
        plan = make_plan(cfg, m.channels, m.label.classes, None, 0.5, [(2, 2, 2)], [(112, 112, 73)])
        inputs = {channel_key(ch): str(m.image_path(c, ch)) for ch in m.channels}
        inputs["label"] = str(m.label_path(c))
        chain = build_preprocessing(plan, with_label=True)
        out = run_chain(chain, inputs)
        aff = np.asarray(out["image"].affine)
        assert nib.aff2axcodes(aff) == ("R", "A", "S")
        ml = float((out["label"] == 1).sum()) * float(np.prod(spacing)) / 1000
        assert abs(ml - raw_ml) / raw_ml < 0.05, (spacing, ml)
        flair = np.asarray(out["image"][2])
        dwi = np.asarray(out["image"][0])
        head = dwi != 0
        # the FLAIR is on the DWI grid: its brain overlaps the DWI's and it correlates with it
        assert np.corrcoef(flair[head], dwi[head])[0, 1] > 0.3
        assert out["image"].shape[1:] == out["label"].shape[1:] == out["sdm"].shape[1:]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fill_holes_matches_scipy(seed):
    from scipy import ndimage

    from segpipe.transforms.preprocessing import fill_holes

    rng = np.random.default_rng(seed)
    mask = ndimage.binary_opening(rng.random((24, 20, 18)) > 0.35)  # many cavities, some touching the border
    mask[8:14, 6:12, 5:11] = True
    mask[10:12, 8:10, 7:9] = False  # one closed cavity
    ours = fill_holes(mask)
    assert np.array_equal(ours, ndimage.binary_fill_holes(mask))
    assert ours[10, 8, 7] and not np.array_equal(ours, mask)
    for edge in (np.zeros((4, 5, 6), bool), np.ones((4, 5, 6), bool)):
        assert np.array_equal(fill_holes(edge), ndimage.binary_fill_holes(edge))


def _tidy_on_the_whole_volume(fg):
    from scipy import ndimage

    lab, n = ndimage.label(fg)
    if n > 1:
        fg = lab == int(np.argmax(np.bincount(lab.ravel())[1:])) + 1
    return ndimage.binary_fill_holes(ndimage.binary_closing(fg, iterations=2, border_value=0) | fg)


@pytest.mark.parametrize("seed", range(12))
def test_head_mask_in_its_box_equals_the_whole_volume_computation(seed):
    """The closing and hole filling run in the head's box (with a margin); the result must be what they
    give on the whole volume (SciPy's closing and binary_fill_holes), also for heads touching the border."""
    from scipy import ndimage

    from segpipe.transforms.preprocessing import tidy_mask

    rng = np.random.default_rng(seed)
    shape = tuple(int(v) for v in rng.integers(10, 28, 3))
    img = ndimage.gaussian_filter(rng.normal(size=shape), 2)
    img[:, :, int(rng.integers(0, shape[2]))] += 3 * rng.normal()  # a bright slab, often at an edge
    fg = img > np.percentile(img, 40)
    assert np.array_equal(tidy_mask(fg), _tidy_on_the_whole_volume(fg))


def test_head_mask_box_keeps_the_closing_at_the_heads_faces():
    """A groove in the top face of the head: the closing fills its lower part only when the box leaves room
    above the face for the dilation (cut at the face, the erosion eats into the groove)."""
    from segpipe.transforms.preprocessing import tidy_mask

    fg = np.zeros((16, 16, 16), dtype=bool)
    fg[2:12, 2:12, 2:10] = True
    fg[6, 2:12, 8:10] = False  # a groove, 1 voxel wide and 2 deep, along the top face
    expected = _tidy_on_the_whole_volume(fg)
    assert expected[6, 5, 8] and not fg[6, 5, 8]  # the whole-volume closing fills the groove's lower voxel
    assert np.array_equal(tidy_mask(fg), expected)


# -- the same results, side by side ---------------------------------------------------------------------------


@pytest.fixture
def threads():
    """Run with ``n`` torch threads (the budget of segpipe's preprocessing threads), restored afterwards."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.mark.parametrize("seed", range(20))
def test_binary_closing_matches_scipy(seed):
    from scipy import ndimage

    from segpipe.transforms.preprocessing import binary_closing

    rng = np.random.default_rng(seed)
    shape = tuple(int(v) for v in rng.integers(1, 14, 3))  # axes of length 1 and 2 included
    mask = rng.random(shape) < rng.uniform(0.2, 0.9)
    for iterations in (1, 2, 3):
        assert np.array_equal(binary_closing(mask, iterations), ndimage.binary_closing(mask, iterations=iterations, border_value=0))


@pytest.mark.parametrize("n_threads", [1, 2, 5])
def test_smooth_in_slabs_is_scipys_gaussian_bit_for_bit(threads, n_threads):
    from scipy import ndimage

    from segpipe.transforms.preprocessing import smooth

    threads(n_threads)
    rng = np.random.default_rng(n_threads)
    volumes = [rng.normal(size=(n, 11, 7)).astype(np.float32) for n in (3, 9, 40, 61)]  # shorter and longer than the slabs' halo
    for sigma in (1.0, 0.6, 2.0):
        for v in volumes:
            assert smooth(v, sigma).tobytes() == ndimage.gaussian_filter(v, sigma).tobytes()


def test_head_mask_and_zscore_are_the_same_with_threads(threads):
    img, _ = toy_volume((40, 32, 20))
    img = np.stack([img, img[::-1] * 2 + 5, np.sqrt(np.abs(img))]).astype(np.float32)
    results = []
    for n in (1, 3):
        threads(n)
        mask = head_mask(img)
        out = ZScored("image", "head", ["a", "b", "c"])({"image": _mt(img[0]).new_tensor(img), "head": _mt(mask)})
        results.append((mask, np.asarray(out["image"]), out["stats"]))
    (m1, z1, s1), (m3, z3, s3) = results
    assert m1.any() and np.array_equal(m1, m3)
    assert z1.tobytes() == z3.tobytes() and s1 == s3


def test_thread_map_keeps_the_order_and_raises_the_first_error(threads):
    from segpipe.transforms.preprocessing import thread_map

    threads(4)
    assert thread_map(lambda x: x * x, range(9)) == [x * x for x in range(9)]

    def fail_on_odd(x):
        if x % 2:
            raise SegpipeError(f"item {x}")
        return x

    with pytest.raises(SegpipeError, match="item 1"):
        thread_map(fail_on_odd, range(6))

