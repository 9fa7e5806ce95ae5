"""Synthetic datasets in the official ISLES 2022, ISLES 2018 and WMH 2017 layouts.

A head phantom (scalp, skull, CSF, cortex with gyri, white matter, ventricles) is defined analytically in
world millimetres and sampled on each image grid, so the channels of one case agree in anatomy even when they
live on different grids (ISLES 2022: DWI/ADC/mask on one 2 mm grid, FLAIR on a finer in-plane, 5 mm
thick-slice grid, tilted and shifted against it, as in the real data). Lesions are drawn on the mask grid
in voxels: several small, highly unbalanced blobs (0.05 to 2 % of the brain volume in all), one pair of them
touching only at a corner (one component with 26-connectivity, two with 6-connectivity). Contrasts follow
the modalities (DWI bright and ADC dark lesions; FLAIR bright white matter hyperintensities, WMH label 2
for other pathology), with a smooth multiplicative bias field, a slight blur and Rician noise. Images are
written in LAS orientation with slightly oblique affines and the header codes of the real files.

ISLES 2018 cases are CT perfusion slabs: a few thick slices through the middle of the head, a CT in Hounsfield
units (air -1000, bone above 1000, grey matter about 38, the infarct a few units darker) with Gaussian noise,
and perfusion maps (CBF, CBV, MTT, Tmax) that are 0 outside the brain, low in the lesion's blood flow and
volume and long in its transit times.

Everything is deterministic for a seed: case ``i`` draws from ``SeedSequence([seed, i])``, so a case does
not change when the number of cases does.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from segpipe.errors import UsageError
from segpipe.io.nifti import save_nifti

__all__ = ["DEFAULT_SHAPES", "SYNTH_LAYOUTS", "SynthCase", "make_head_case", "synthesize"]

log = logging.getLogger(__name__)

SYNTH_LAYOUTS = ("isles22", "isles18", "wmh17")
DEFAULT_SHAPES = {"isles22": (64, 64, 40), "isles18": (64, 64, 16), "wmh17": (96, 96, 24)}

# tissue codes of the phantom
AIR, SCALP, SKULL, CSF, GM, WM, VENTRICLE = range(7)

# per-modality intensity of each tissue (arbitrary scanner units; ADC in 1e-3 mm^2/s like the real files)
_CONTRAST = {
    #          air   scalp  skull  csf   gm     wm     ventricle
    "dwi": (0.0, 60.0, 5.0, 25.0, 110.0, 90.0, 25.0),
    "adc": (0.0, 1.0, 0.1, 3.0, 0.85, 0.70, 3.0),
    "flair": (0.0, 90.0, 10.0, 20.0, 95.0, 75.0, 15.0),
    "t1": (0.0, 120.0, 15.0, 25.0, 70.0, 100.0, 20.0),
}
_LESION = {"dwi": 260.0, "adc": 0.42, "flair": 150.0, "t1": 60.0}
# CT perfusion (ISLES 2018): CT in Hounsfield units; CBF in ml/100 g/min, CBV in ml/100 g, MTT and Tmax in s. The
# maps are computed in the brain only (0 elsewhere). Noise: Gaussian, sigma in the modality's units.
_CT_CONTRAST = {
    #          air      scalp  skull   csf  gm    wm    ventricle  lesion  noise
    "ct": (-1000.0, 40.0, 1200.0, 8.0, 38.0, 29.0, 8.0, 24.0, 4.0),
    "cbf": (0.0, 0.0, 0.0, 2.0, 60.0, 25.0, 2.0, 8.0, 3.0),
    "cbv": (0.0, 0.0, 0.0, 0.3, 4.0, 2.2, 0.3, 1.0, 0.2),
    "mtt": (0.0, 0.0, 0.0, 0.0, 4.0, 4.8, 0.0, 9.0, 0.4),
    "tmax": (0.0, 0.0, 0.0, 0.0, 0.8, 1.2, 0.0, 10.0, 0.3),
}
_OTHER_PATHOLOGY = {"flair": 35.0, "t1": 35.0}  # WMH label 2: an old lacune, CSF-like
_NOISE = 0.03  # Rician noise sigma relative to the white-matter intensity

_WMH_SITES = (
    ("Utrecht", 0, (0.96, 0.96, 3.0)),
    ("Singapore", 50, (1.0, 1.0, 3.0)),
    ("Amsterdam/GE3T", 100, (0.98, 0.98, 1.2)),
)


@dataclass
class SynthCase:
    """One synthetic case: image channels and label, each with its affine, ready to write."""

    images: dict[str, tuple[np.ndarray, np.ndarray]]
    label: np.ndarray
    label_affine: np.ndarray
    lesion_fraction: float  # lesion voxels / brain voxels on the label grid


# -- geometry ----------------------------------------------------------------------------------------------


def _rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    ax, ay, az = np.deg2rad(rng.uniform(-max_deg, max_deg, size=3))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _las_affine(shape: Sequence[int], spacing: Sequence[float], center: np.ndarray, rot: np.ndarray) -> np.ndarray:
    """An LAS affine (x runs to the left) whose grid centre sits at ``center`` (world mm)."""
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag([-spacing[0], spacing[1], spacing[2]])
    mid = (np.asarray(shape, dtype=float) - 1) / 2
    aff[:3, 3] = center - aff[:3, :3] @ mid
    return aff


def _world(shape: Sequence[int], affine: np.ndarray) -> np.ndarray:
    """World coordinates (3, *shape) of every voxel centre."""
    idx = np.indices(shape, dtype=np.float32).reshape(3, -1)
    xyz = affine[:3, :3].astype(np.float32) @ idx + affine[:3, 3:4].astype(np.float32)
    return xyz.reshape(3, *shape)


@dataclass
class _Head:
    center: np.ndarray  # world mm
    axes: np.ndarray  # semi-axes (mm)
    gyri: np.ndarray  # (amplitude, frequency u, frequency v, phase)
    ventricle: float  # ventricle scale

    def tissue(self, xyz: np.ndarray) -> np.ndarray:
        d = (xyz - self.center[:, None, None, None]) / self.axes[:, None, None, None]
        r = np.sqrt((d**2).sum(axis=0))
        theta = np.arctan2(d[1], d[0])
        phi = np.arccos(np.clip(d[2] / np.maximum(r, 1e-6), -1, 1))
        amp, fu, fv, ph = self.gyri
        wobble = amp * np.sin(fu * theta + ph) * np.sin(fv * phi)
        t = np.full(r.shape, AIR, dtype=np.uint8)
        t[r <= 1.0] = SCALP
        t[r <= 0.93] = SKULL
        t[r <= 0.86] = CSF
        t[r <= 0.83 + wobble * 0.5] = GM
        t[r <= 0.70 + wobble] = WM
        # two lateral ventricles: ellipsoids either side of the midline
        for side in (-1.0, 1.0):
            c = np.array([side * 0.12, 0.05, 0.08])
            a = np.array([0.09, 0.30, 0.14]) * self.ventricle
            v = (((d - c[:, None, None, None]) / a[:, None, None, None]) ** 2).sum(axis=0)
            t[v <= 1.0] = VENTRICLE
        return t


def _head(rng: np.random.Generator, fov: np.ndarray, center: np.ndarray, ventricle: float) -> _Head:
    axes = fov / 2 * np.array([0.86, 0.92, 0.88]) * rng.uniform(0.95, 1.0, size=3)
    gyri = np.array([rng.uniform(0.02, 0.04), rng.integers(10, 16), rng.integers(6, 10), rng.uniform(0, 2 * np.pi)])
    return _Head(center + rng.uniform(-2, 2, size=3), axes, gyri, ventricle)


# -- lesions -----------------------------------------------------------------------------------------------


def _blob(rng: np.random.Generator, shape, center, radii_vox, allowed: np.ndarray) -> np.ndarray:
    """An irregular ellipsoidal blob (boolean, full shape) limited to ``allowed``."""
    r = np.maximum(np.asarray(radii_vox, dtype=float), 0.5)
    lo = np.maximum(np.floor(center - 2 * r).astype(int), 0)
    hi = np.minimum(np.ceil(center + 2 * r).astype(int) + 1, shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    grid = np.indices(tuple(hi - lo), dtype=np.float32)
    d2 = sum(((grid[i] + lo[i] - center[i]) / r[i]) ** 2 for i in range(3))
    noise = ndimage.gaussian_filter(rng.standard_normal(d2.shape).astype(np.float32), sigma=1.0)
    noise /= max(float(np.abs(noise).max()), 1e-6)
    out = np.zeros(shape, dtype=bool)
    out[box] = (d2 + 0.35 * noise < 1.0) & allowed[box]
    return out


def _random_voxel(rng: np.random.Generator, mask: np.ndarray) -> np.ndarray:
    idx = np.flatnonzero(mask)
    return np.array(np.unravel_index(idx[rng.integers(len(idx))], mask.shape), dtype=float)


def _diagonal_pair(rng: np.random.Generator, lesion: np.ndarray, allowed: np.ndarray) -> bool:
    """Add two single voxels that touch only at a corner, away from other lesions."""
    free = ndimage.binary_erosion(allowed, iterations=2) & ~ndimage.binary_dilation(lesion, iterations=3)
    if not free.any():
        return False
    p = _random_voxel(rng, free).astype(int)
    q = p + 1
    if np.any(q >= np.array(lesion.shape)) or not free[tuple(q)]:
        return False
    lesion[tuple(p)] = True
    lesion[tuple(q)] = True
    return True


def _lesions(rng: np.random.Generator, tissue: np.ndarray, spacing: Sequence[float], kind: str):
    """Label 1 (and, for WMH, label 2) on the label grid; returns (lesion, other)."""
    brain = np.isin(tissue, (GM, WM))
    n_brain = int(brain.sum())
    spacing = np.asarray(spacing, dtype=float)
    voxel_ml = float(np.prod(spacing))
    target = n_brain * 10 ** rng.uniform(np.log10(0.001), np.log10(0.015))  # voxels, 0.1 .. 1.5 % of the brain
    lesion = np.zeros(tissue.shape, dtype=bool)
    other = np.zeros(tissue.shape, dtype=bool)
    if kind == "wmh":
        wm = tissue == WM
        # periventricular caps: the white matter nearest to the ventricles, where a smooth field is high,
        # about 60 % of the burden
        dist = ndimage.distance_transform_edt(tissue != VENTRICLE, sampling=spacing)
        field = ndimage.gaussian_filter(rng.standard_normal(tissue.shape).astype(np.float32), sigma=2.0)
        field /= max(float(field.std()), 1e-6)
        candidates = np.flatnonzero(wm & (dist < 8.0))
        score = field.ravel()[candidates] - dist.ravel()[candidates] / 2.0
        n_cap = min(int(0.6 * target), len(candidates))
        lesion.ravel()[candidates[np.argsort(-score)[:n_cap]]] = True
        # a lacune of other pathology (label 2) in the white matter, away from the WMH
        c = _random_voxel(rng, wm & ~ndimage.binary_dilation(lesion, iterations=3))
        other = _blob(rng, tissue.shape, c, rng.uniform(2.0, 3.5) / spacing, wm) & ~lesion
        allowed = wm & ~ndimage.binary_dilation(other, iterations=2)
        n_small = int(rng.integers(3, 8))
        small_mm = (1.0, 3.0)
    else:
        allowed = brain
        # one larger territorial lesion holding most of the volume
        main_vol = 0.7 * target
        r_mm = (main_vol * voxel_ml * 3 / (4 * np.pi)) ** (1 / 3)
        c = _random_voxel(rng, ndimage.binary_erosion(brain, iterations=2))
        lesion |= _blob(rng, tissue.shape, c, r_mm * rng.uniform(0.7, 1.3, size=3) / spacing, brain)
        n_small = int(rng.integers(3, 8))
        small_mm = (2.0, 4.0)
    for _ in range(n_small):
        if lesion.sum() >= target * 1.3:
            break
        c = _random_voxel(rng, allowed & ~ndimage.binary_dilation(lesion, iterations=2))
        lesion |= _blob(rng, tissue.shape, c, rng.uniform(*small_mm) / spacing, allowed)
    _diagonal_pair(rng, lesion, allowed)
    # keep the burden inside 0.05 .. 2 % of the brain: trim the largest component if too large
    limit = 0.02 * n_brain
    if lesion.sum() > limit:
        lab, n = ndimage.label(lesion)
        sizes = ndimage.sum_labels(lesion, lab, index=np.arange(1, n + 1))
        big = int(np.argmax(sizes)) + 1
        excess = int(np.ceil(lesion.sum() - limit))
        comp = np.flatnonzero(lab == big)
        order = np.argsort(ndimage.distance_transform_edt(lab == big).ravel()[comp])
        lesion.ravel()[comp[order[:excess]]] = False
    if lesion.sum() < 0.0005 * n_brain:  # too small: grow the largest blob a little
        lesion = ndimage.binary_dilation(lesion, mask=allowed, iterations=1)
    return lesion & ~other, other


# -- images ------------------------------------------------------------------------------------------------


def _bias(xyz: np.ndarray, center: np.ndarray, scale: float, coef: np.ndarray) -> np.ndarray:
    d = (xyz - center[:, None, None, None]) / scale
    poly = coef[0] * d[0] + coef[1] * d[1] + coef[2] * d[2] + coef[3] * d[0] * d[1] + coef[4] * d[2] ** 2
    return np.exp(poly).astype(np.float32)


def _render(
    rng: np.random.Generator,
    modality: str,
    tissue: np.ndarray,
    lesion_frac: np.ndarray,
    other_frac: np.ndarray | None,
    bias: np.ndarray,
    spacing: Sequence[float],
) -> np.ndarray:
    lut = np.asarray(_CONTRAST[modality], dtype=np.float32)
    img = lut[tissue]
    img = img * (1 - lesion_frac) + _LESION[modality] * lesion_frac
    if other_frac is not None and modality in _OTHER_PATHOLOGY:
        img = img * (1 - other_frac) + _OTHER_PATHOLOGY[modality] * other_frac
    # a little texture inside the brain, then the scanner: blur, bias, Rician noise
    texture = ndimage.gaussian_filter(rng.standard_normal(tissue.shape).astype(np.float32), 1.5)
    img = img * (1 + 0.04 * texture / max(float(texture.std()), 1e-6) * np.isin(tissue, (GM, WM)))
    img = ndimage.gaussian_filter(img, sigma=0.5 / np.asarray(spacing) * min(spacing))
    img = img * bias
    sigma = _NOISE * _CONTRAST[modality][WM]
    real = img + rng.normal(0, sigma, img.shape).astype(np.float32)
    imag = rng.normal(0, sigma, img.shape).astype(np.float32)
    return np.sqrt(real**2 + imag**2).astype(np.float32)


def _render_ct(rng: np.random.Generator, modality: str, tissue: np.ndarray, lesion_frac: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """A CT perfusion image (:data:`_CT_CONTRAST`): no bias field, Gaussian noise; the perfusion maps 0 outside
    the brain and never negative."""
    *lut, lesion, sigma = _CT_CONTRAST[modality]
    img = np.asarray(lut, dtype=np.float32)[tissue]
    img = img * (1 - lesion_frac) + lesion * lesion_frac
    img = ndimage.gaussian_filter(img, sigma=0.5 / np.asarray(spacing) * min(spacing))
    img = img + rng.normal(0, sigma, img.shape).astype(np.float32)
    if modality != "ct":
        img = np.where(np.isin(tissue, (CSF, GM, WM, VENTRICLE)), np.maximum(img, 0), 0)
    return img.astype(np.float32)


def _resample_fraction(mask: np.ndarray, mask_affine: np.ndarray, shape, affine: np.ndarray) -> np.ndarray:
    """Partial-volume fraction of ``mask`` on another grid (trilinear)."""
    m = np.linalg.inv(mask_affine) @ affine
    return ndimage.affine_transform(mask.astype(np.float32), m[:3, :3], m[:3, 3], output_shape=tuple(shape), order=1)


def make_head_case(
    rng: np.random.Generator,
    kind: str,
    shape: Sequence[int],
    spacing: Sequence[float],
    *,
    channels: Sequence[str],
    second_grid: tuple[Sequence[int], Sequence[float]] | None = None,
    second_grid_channels: Sequence[str] = (),
    head_extent: Sequence[float] | None = None,
) -> SynthCase:
    """Draw one case. ``kind`` is ``"stroke"`` or ``"wmh"``. Channels in ``second_grid_channels`` are sampled
    on a second grid (shape, spacing) with its own tilt and shift, the others on the label grid. The head
    fills the field of view, or ``head_extent`` (mm) when given (a slab through a larger head)."""
    shape = tuple(int(s) for s in shape)
    spacing = np.asarray(spacing, dtype=float)
    fov = np.asarray(shape) * spacing
    world_center = np.array([0.0, -18.0, 12.0]) + rng.uniform(-5, 5, size=3)
    extent = fov if head_extent is None else np.asarray(head_extent, dtype=float)
    head = _head(rng, extent, world_center, ventricle=rng.uniform(1.0, 1.3) if kind == "wmh" else rng.uniform(0.8, 1.05))
    label_aff = _las_affine(shape, spacing, world_center, _rotation(rng, 4.0))
    xyz = _world(shape, label_aff)
    tissue = head.tissue(xyz)
    lesion, other = _lesions(rng, tissue, spacing, kind)
    n_brain = int(np.isin(tissue, (GM, WM)).sum())
    bias_coef = rng.uniform(-0.12, 0.12, size=5)
    scale = float(fov.max() / 2)

    label = lesion.astype(np.uint8)
    if kind == "wmh":
        label[other] = 2
    images: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for ch in channels:
        if ch in second_grid_channels and second_grid is not None:
            s2, sp2 = tuple(int(v) for v in second_grid[0]), np.asarray(second_grid[1], dtype=float)
            aff2 = _las_affine(s2, sp2, world_center + rng.uniform(-3, 3, size=3), _rotation(rng, 3.0))
            xyz2 = _world(s2, aff2)
            t2 = head.tissue(xyz2)
            lf = _resample_fraction(lesion, label_aff, s2, aff2)
            of = _resample_fraction(other, label_aff, s2, aff2) if kind == "wmh" else None
            img = _render(rng, ch, t2, lf, of, _bias(xyz2, world_center, scale, bias_coef), sp2)
            images[ch] = (img, aff2)
        elif ch in _CT_CONTRAST:
            images[ch] = (_render_ct(rng, ch, tissue, lesion.astype(np.float32), spacing), label_aff)
        else:
            of = other.astype(np.float32) if kind == "wmh" else None
            img = _render(rng, ch, tissue, lesion.astype(np.float32), of, _bias(xyz, world_center, scale, bias_coef), spacing)
            images[ch] = (img, label_aff)
    return SynthCase(images, label, label_aff, float(lesion.sum()) / max(n_brain, 1))


# -- dataset writers ---------------------------------------------------------------------------------------


def _check_shape(shape: Sequence[int] | None, layout: str) -> tuple[int, int, int]:
    if shape is None:
        return DEFAULT_SHAPES[layout]
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 16 or max(shape) > 512:
        raise UsageError(f"--shape: expected three sizes X,Y,Z between 16 and 512, got {','.join(map(str, shape))}")
    return shape  # type: ignore[return-value]


def _write_isles22(root: Path, index: int, rng: np.random.Generator, shape) -> str:
    spacing = (2.0, 2.0, 2.0)
    fov = np.asarray(shape) * spacing
    flair_spacing = (1.0, 1.0, 5.0)
    flair_shape = tuple(int(np.ceil(f / s)) + 2 for f, s in zip(fov * 1.05, flair_spacing))
    case = make_head_case(
        rng, "stroke", shape, spacing, channels=("dwi", "adc", "flair"),
        second_grid=(flair_shape, flair_spacing), second_grid_channels=("flair",),
    )
    sub = f"sub-strokecase{index + 1:04d}"
    base = root / "ISLES-2022"
    # header codes as in the real files: DWI/ADC qform 2 / sform 1, FLAIR 1/1, mask qform 0 / sform 2
    dwi_dir = base / sub / "ses-0001" / "dwi"
    save_nifti(dwi_dir / f"{sub}_ses-0001_dwi.nii.gz", *case.images["dwi"], qform_code=2, sform_code=1)
    save_nifti(dwi_dir / f"{sub}_ses-0001_adc.nii.gz", *case.images["adc"], qform_code=2, sform_code=1)
    save_nifti(base / sub / "ses-0001" / "anat" / f"{sub}_ses-0001_FLAIR.nii.gz", *case.images["flair"], qform_code=1, sform_code=1)
    # real masks come as uint16 {0, 1} or as float with foreground 0.99999999977: write both kinds
    if index % 2 == 0:
        mask = case.label.astype(np.uint16)
    else:
        mask = case.label.astype(np.float64) * 0.99999999977
    save_nifti(base / "derivatives" / sub / "ses-0001" / f"{sub}_ses-0001_msk.nii.gz", mask, case.label_affine, qform_code=0, sform_code=2)
    return sub


#: ISLES 2018's folder tokens of each channel (``SMIR.Brain.XX.O.<token>.<id>``)
_ISLES18_TOKENS = {"ct": "CT", "cbf": "CT_CBF", "cbv": "CT_CBV", "mtt": "CT_MTT", "tmax": "CT_Tmax"}


def _isles18_case(rng: np.random.Generator, shape) -> SynthCase:
    spacing = (2.0, 2.0, 5.0)
    fov = np.asarray(shape) * spacing
    # the slab cuts a head as wide as the field of view and 150 mm high
    case = make_head_case(rng, "stroke", shape, spacing, channels=tuple(_ISLES18_TOKENS), head_extent=(fov[0], fov[1], max(150.0, fov[2])))
    ct, affine = case.images["ct"]
    case.images["ct"] = (np.round(ct), affine)  # whole Hounsfield units, as a scanner stores them
    return case


def _write_isles18(root: Path, index: int, rng: np.random.Generator, shape) -> str:
    case = _isles18_case(rng, shape)
    name = f"case_{index + 1}"
    folder = root / "ISLES2018" / "TRAINING" / name
    uid = 345000 + 10 * index
    for k, (ch, token) in enumerate(_ISLES18_TOKENS.items()):
        series = f"SMIR.Brain.XX.O.{token}.{uid + k}"
        data = case.images[ch][0].astype(np.int16) if ch == "ct" else case.images[ch][0]
        save_nifti(folder / series / f"{series}.nii", data, case.images[ch][1])
    series = f"SMIR.Brain.XX.O.OT.{uid + 9}"
    save_nifti(folder / series / f"{series}.nii", case.label.astype(np.uint8), case.label_affine)
    return name


def _write_wmh17(root: Path, index: int, rng: np.random.Generator, shape) -> str:
    site, first_id, spacing = _WMH_SITES[index % len(_WMH_SITES)]
    ref_spacing = _WMH_SITES[0][2]
    site_shape = tuple(max(16, int(round(s * r / p))) for s, r, p in zip(shape, ref_spacing, spacing))
    case = make_head_case(rng, "wmh", site_shape, spacing, channels=("flair", "t1"))
    cid = str(first_id + index // len(_WMH_SITES))
    folder = root / site / cid
    save_nifti(folder / "pre" / "FLAIR.nii.gz", *case.images["flair"])
    save_nifti(folder / "pre" / "T1.nii.gz", *case.images["t1"])
    save_nifti(folder / "wmh.nii.gz", case.label.astype(np.float32), case.label_affine)
    return f"{site}/{cid}"


_DICOM_SERIES = {
    "isles22": (("dwi", "ep2d_diff_tra TRACEW b1000", 5, 1000.0), ("adc", "ep2d_diff_tra_ADC", 6, None),
                ("flair", "t2_flair_tra", 3, None)),
    "wmh17": (("flair", "t2_flair_3d_tra", 4, None), ("t1", "t1_mprage_tra", 2, None)),
    # a CT perfusion study as the scanner's perfusion software exports it: the plain head CT, the 4D source
    # series left out (it is not an input), one series per map
    "isles18": (("ct", "Head 5.0 H31s", 2, None), ("cbf", "CT Perfusion CBF", 11, None), ("cbv", "CT Perfusion CBV", 12, None),
                ("mtt", "CT Perfusion MTT", 13, None), ("tmax", "CT Perfusion Tmax", 14, None)),
}


def _write_dicom_case(root: Path, index: int, rng: np.random.Generator, shape, *, layout: str, enhanced: bool = False) -> str:
    """One case as a scanner export: ``ROOT/<case>/DICOM/<series>/IM...`` (one folder per series, DWI and
    ADC together, as many scanners write them) and the label as ``ROOT/labels/<case>.nii.gz`` on the
    reference series' grid. ``enhanced``: each series one enhanced multi-frame file, the DWI with its b0
    frames as well, as newer scanners export."""
    from pydicom.uid import generate_uid

    from segpipe.io.dicom import write_dicom_series, write_enhanced_dicom

    if layout == "isles22":
        spacing = (2.0, 2.0, 2.0)
        fov = np.asarray(shape) * spacing
        flair_spacing = (1.0, 1.0, 5.0)
        flair_shape = tuple(int(np.ceil(f / s)) + 2 for f, s in zip(fov * 1.05, flair_spacing))
        case = make_head_case(rng, "stroke", shape, spacing, channels=("dwi", "adc", "flair"),
                              second_grid=(flair_shape, flair_spacing), second_grid_channels=("flair",))
        name = f"strokecase{index + 1:04d}"
    elif layout == "isles18":
        case = _isles18_case(rng, shape)
        name = f"ctpcase{index + 1:04d}"
    else:
        case = make_head_case(rng, "wmh", shape, _WMH_SITES[0][2], channels=("flair", "t1"))
        name = f"wmhcase{index + 1:04d}"
    study, frame = generate_uid(), generate_uid()
    patient = ("Synthetic^Case", f"SYN{index + 1:04d}")
    for ch, description, number, b_value in _DICOM_SERIES[layout]:
        folder = root / name / "DICOM" / ("S0001" if ch in ("dwi", "adc") else f"S{number:04d}")
        image, affine = case.images[ch]
        if enhanced:
            stacks = [(image, b_value)]
            if b_value:  # the b0 images: T2-weighted, the lesion fainter than at high b
                stacks.insert(0, (0.5 * image + 0.5 * float(np.percentile(image, 90)), 0.0))
            write_enhanced_dicom(stacks, affine, folder / f"{ch.upper()}_{number:03d}", description=description,
                                 series_number=number, study_uid=study, frame_uid=frame, patient=patient)
        else:
            write_dicom_series(image, affine, folder, description=description, series_number=number, study_uid=study,
                               frame_uid=frame, b_value=b_value, prefix=f"{ch.upper()}_", patient=patient,
                               modality="CT" if layout == "isles18" else "MR")
    save_nifti(root / "labels" / f"{name}.nii.gz", case.label.astype(np.uint8), case.label_affine)
    return name


def synthesize(
    root: str | os.PathLike,
    layout: str = "isles22",
    cases: int = 4,
    seed: int = 0,
    shape: Sequence[int] | None = None,
    fmt: str = "nifti",
) -> list[str]:
    """Write ``cases`` synthetic cases under ``root``: in the official ``layout`` (``fmt="nifti"``), or as
    DICOM scanner exports, one study folder per case (``fmt="dicom"``; ``"dicom-enhanced"``: one enhanced
    multi-frame file per series); returns their names."""
    if layout not in SYNTH_LAYOUTS:
        from segpipe.errors import did_you_mean

        raise UsageError(f"--layout: synth writes {', '.join(SYNTH_LAYOUTS)}, got '{layout}'{did_you_mean(layout, SYNTH_LAYOUTS)}")
    if cases < 1:
        raise UsageError(f"--cases: expected at least 1, got {cases}")
    if seed < 0:
        raise UsageError(f"--seed: expected 0 or more (NumPy's generators take no negative seed), got {seed}")
    if fmt not in ("nifti", "dicom", "dicom-enhanced"):
        raise UsageError(f"--format: expected nifti, dicom or dicom-enhanced, got '{fmt}'")
    if fmt == "dicom-enhanced" and layout == "isles18":
        raise UsageError("--format dicom-enhanced: synth writes CT perfusion exports as classic series (one file per slice); "
                         "use --format dicom for isles18")
    shape = _check_shape(shape, layout)
    root = Path(root)
    if fmt.startswith("dicom"):  # the same case drawing, written as a scanner export
        writer = functools.partial(_write_dicom_case, layout=layout, enhanced=fmt == "dicom-enhanced")
    else:
        writer = {"isles22": _write_isles22, "isles18": _write_isles18, "wmh17": _write_wmh17}[layout]
    from segpipe.progress import track

    names = []
    for i in track(range(cases), f"synthesising {layout}"):
        rng = np.random.default_rng(np.random.SeedSequence([seed, i]))
        names.append(writer(root, i, rng, shape))
    log.info("wrote %d synthetic %s cases under %s", cases, layout, root)
    return names
