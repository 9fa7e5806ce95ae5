"""Reading and writing volumes (NIfTI through nibabel; MetaImage/NRRD through SimpleITK).

Every read problem becomes one :class:`~segpipe.errors.SegpipeError` line that names the file. Arrays are
indexed ``(x, y, z)`` in voxel order, as nibabel gives them; ``affine`` maps voxel indices to RAS+ world
millimetres (the NIfTI convention).

A diffusion series converted by dcm2niix is one 4D file with a ``.bval`` sidecar (one b-value per volume, the
BIDS convention): it is read as its diffusion-weighted image at the highest b-value, the geometric mean of
the volumes at that b (the trace image scanners compute from the directions; a single volume is taken as it
is), the image the ISLES DWI channel holds.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from segpipe.errors import SegpipeError
from segpipe.io.atomic import atomic_path

__all__ = ["Geometry", "Volume", "bval_sidecar", "read_geometry", "read_volume", "save_nifti", "spacing_of"]

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
log = logging.getLogger(__name__)


@dataclass
class Volume:
    """A 3D volume with its geometry. ``header`` keeps the NIfTI header (codes, units) when there is one."""

    array: np.ndarray
    affine: np.ndarray
    path: Path | None = None
    header: nib.Nifti1Header | None = field(default=None, repr=False)

    @property
    def spacing(self) -> tuple[float, ...]:
        return spacing_of(self.affine)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)


@dataclass
class Geometry:
    """Where a volume lies, read from its header alone (no voxel data)."""

    affine: np.ndarray
    shape: tuple[int, ...]
    path: Path
    header: nib.Nifti1Header | None = field(default=None, repr=False)

    @property
    def spacing(self) -> tuple[float, ...]:
        return spacing_of(self.affine)


def read_geometry(path: str | os.PathLike, *, what: str = "image") -> Geometry:
    """Affine, 3D shape and (NIfTI) header of an image file, without reading its voxels."""
    path = Path(path)
    if not path.is_file():
        raise SegpipeError(f"{what} '{path}': file not found")
    try:
        if path.name.lower().endswith((".nii", ".nii.gz", ".img", ".hdr")):
            img = nib.load(str(path))
            return Geometry(np.asarray(img.affine, dtype=np.float64), _shape3(img.shape), path, img.header)
        import SimpleITK as sitk

        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        return Geometry(_sitk_affine(reader), _shape3(reader.GetSize()), path)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0]
        raise SegpipeError(
            f"{what} '{path}': cannot be read (its header: {type(exc).__name__}: {first}); the file is damaged or not an "
            "image: export or download it again"
        ) from None


def _shape3(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The 3D grid of a header's shape: a single slice (2D file) is one voxel deep, as :func:`read_volume`
    reads it; a 4D file's later axes are not part of the grid."""
    return tuple(int(s) for s in (*shape[:3], 1, 1)[:3])


def spacing_of(affine: np.ndarray) -> tuple[float, ...]:
    """Voxel size in mm along each array axis (the norms of the affine's columns)."""
    return tuple(float(v) for v in np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0)))


def _sitk_affine(obj) -> np.ndarray:
    """RAS affine of a SimpleITK image or of an image reader's header (ITK stores LPS geometry)."""
    dim = min(obj.GetDimension(), 3)
    direction = np.asarray(obj.GetDirection()).reshape(obj.GetDimension(), obj.GetDimension())[:dim, :dim]
    affine = np.eye(4)
    affine[:dim, :dim] = direction * np.asarray(obj.GetSpacing()[:dim])[None, :]
    affine[:dim, 3] = obj.GetOrigin()[:dim]
    return _LPS_TO_RAS @ affine


def _read_sitk(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import SimpleITK as sitk

    img = sitk.ReadImage(str(path))
    arr = sitk.GetArrayFromImage(img)  # (z, y, x)
    arr = np.ascontiguousarray(np.transpose(arr, tuple(range(arr.ndim))[::-1]))
    return arr, _sitk_affine(img)


def read_volume(path: str | os.PathLike, *, what: str = "image", dtype: np.dtype | None = np.float32) -> Volume:
    """Read a 3D volume. A 4D file with a single volume is accepted; more volumes are an error.

    ``what`` names the role of the file in messages ("image", "label", "channel 'dwi'").
    """
    path = Path(path)
    if not path.is_file():
        raise SegpipeError(f"{what} '{path}': file not found; check the path (or the manifest that names it)")
    name = path.name.lower()
    header = None
    try:
        if name.endswith((".nii", ".nii.gz", ".img", ".hdr")):
            img = nib.load(str(path))
            if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
                img = nib.Nifti1Image.from_image(img)
            header = img.header
            affine = np.asarray(img.affine, dtype=np.float64)
            arr = np.asanyarray(img.dataobj)
            if int(header["qform_code"]) == 0 and int(header["sform_code"]) == 0:
                log.warning("%s '%s': no orientation in its header (qform and sform codes are 0): where it lies in the "
                            "scanner is unknown, so it is taken as centred on its own grid (nibabel's default); channels "
                            "on other grids may not line up: convert the scan again with its geometry (e.g. dcm2niix)",
                            what, path)
        else:
            arr, affine = _read_sitk(path)
    except SegpipeError:
        raise
    except Exception as exc:  # nibabel/zlib/SimpleITK raise many types for damaged files
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SegpipeError(
            f"{what} '{path}': cannot be read ({type(exc).__name__}: {reason}); the file is damaged or not an image: "
            "export or download it again"
        ) from exc
    if arr.dtype.kind not in "biuf":
        kind = {"c": "complex", "V": "RGB or structured"}.get(arr.dtype.kind, str(arr.dtype))
        raise SegpipeError(
            f"{what} '{path}': its voxels are {kind} ({arr.dtype}), expected one real number per voxel; export the "
            "magnitude (or a grey-scale image) instead"
        )
    if arr.ndim == 4 and arr.shape[3] == 1:
        arr = arr[..., 0]
    if arr.ndim == 4 and (bval := bval_sidecar(path)) is not None:
        arr = _highest_b_trace(np.asarray(arr), bval, path, what)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3:
        raise SegpipeError(
            f"{what} '{path}': expected a 3D volume, found {arr.ndim}D with shape {tuple(arr.shape)}; "
            "split multi-volume files (e.g. keep one b-value or one time point) before using them; a diffusion series "
            "converted by dcm2niix is read when its .bval file lies next to it"
        )
    shear = shear_degrees(affine)
    if shear > 0.5:
        log.warning("%s '%s': its voxel grid is sheared by %.1f degrees (a gantry-tilted CT converted without tilt "
                    "correction?); the network would see the head sheared: convert it with tilt correction (dcm2niix's "
                    "default) or give segpipe the DICOM series, which it corrects", what, path, shear)
    if dtype is not None:
        arr = np.asarray(arr, dtype=dtype)
    return Volume(arr, affine, path, header)


def shear_degrees(affine: np.ndarray) -> float:
    """How far the axes of a voxel grid are from square to each other (0 for any rotation, flip or scaling)."""
    cols = np.asarray(affine, float)[:3, :3]
    cols = cols / np.maximum(np.linalg.norm(cols, axis=0), 1e-12)
    cosines = np.abs(cols.T @ cols - np.eye(3)).max()
    return float(np.degrees(np.arcsin(min(cosines, 1.0))))


def bval_sidecar(path: Path) -> Path | None:
    """The ``.bval`` sidecar of a NIfTI file (``dwi.nii.gz`` -> ``dwi.bval``), when there is one."""
    name = path.name
    for ext in (".nii.gz", ".nii"):
        if name.lower().endswith(ext):
            side = path.with_name(name[: -len(ext)] + ".bval")
            return side if side.is_file() else None
    return None


def _highest_b_trace(arr: np.ndarray, bval: Path, path: Path, what: str) -> np.ndarray:
    """The volumes of a 4D diffusion file at its highest b-value, combined as their geometric mean."""
    try:
        bvals = [float(v) for v in bval.read_text(encoding="utf-8").split()]
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise SegpipeError(f"{what} '{path}': its b-values '{bval}' cannot be read ({type(exc).__name__}); expected numbers "
                           "separated by spaces, one per volume (as dcm2niix writes them)") from None
    if len(bvals) != arr.shape[3]:
        raise SegpipeError(f"{what} '{path}': {arr.shape[3]} volumes but {len(bvals)} b-values in '{bval}'; the two must come "
                           "from the same conversion")
    top = max(bvals)
    picked = [i for i, b in enumerate(bvals) if abs(b - top) <= 0.01 * max(top, 1.0)]
    if len(picked) == 1:
        out = arr[..., picked[0]].astype(np.float32)
    else:
        vols = np.clip(arr[..., picked].astype(np.float64), 1e-6, None)  # intensities are >= 0; a 0 keeps the mean at ~0
        out = np.exp(np.log(vols).mean(axis=3)).astype(np.float32)
    log.info("%s '%s': %d volumes with b-values %s; using b=%g (%s)", what, path.name, len(bvals),
             ", ".join(f"{b:g}" for b in sorted(set(bvals))), top,
             "one volume" if len(picked) == 1 else f"geometric mean of its {len(picked)} volumes")
    return out


def save_nifti(
    path: str | os.PathLike,
    array: np.ndarray,
    affine: np.ndarray,
    *,
    header: nib.Nifti1Header | None = None,
    dtype: np.dtype | type | None = None,
    qform_code: int | None = None,
    sform_code: int | None = None,
) -> Path:
    """Write ``array`` as NIfTI, atomically.

    With ``header`` (the input's header) the codes, units and intent are kept, so that a mask written for an
    input opens in the same place as the input in any viewer; the data type is ``dtype`` (default: the
    array's). Without a header, both codes default to 1 (scanner anatomical).
    """
    path = Path(path)
    arr = np.asarray(array) if dtype is None else np.asarray(array, dtype=dtype)
    if header is not None:
        hdr = header.copy()
        hdr.set_data_dtype(arr.dtype)
        hdr.set_slope_inter(1.0, 0.0)
        img = nib.Nifti1Image(arr, affine, header=hdr)
        q_code = int(header["qform_code"]) if qform_code is None else qform_code
        s_code = int(header["sform_code"]) if sform_code is None else sform_code
    else:
        img = nib.Nifti1Image(arr, affine)
        img.header.set_xyzt_units("mm", "sec")
        q_code = 1 if qform_code is None else qform_code
        s_code = 1 if sform_code is None else sform_code
    # set both even when a code is 0, so that the stored matrices are the given affine
    img.set_qform(affine, code=q_code)
    img.set_sform(affine, code=s_code)
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
    return path
