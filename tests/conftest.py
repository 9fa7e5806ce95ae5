"""Shared fixtures: the real ISLES 2022 sample (skipped when absent), tiny NIfTI writers, the CLI runner."""

from __future__ import annotations

import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT.parent / "shared" / "data" / "isles22_sample"
SAMPLE_CASE = "sub-strokecase0009"


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    """The real ISLES 2022 case of ../shared (never copied into the project)."""
    if not (SAMPLE / "rawdata").is_dir():
        pytest.skip(f"the real ISLES 2022 sample is not at ../shared/data/isles22_sample (looked in {SAMPLE})")
    return SAMPLE


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data), np.eye(4) if affine is None else affine), str(path))
    return path


@pytest.fixture
def nifti():
    """Write a small NIfTI file: ``nifti(path, data=None, affine=None)``."""

    def make(path: Path, data: np.ndarray | None = None, affine: np.ndarray | None = None) -> Path:
        if data is None:
            data = np.zeros((4, 4, 4), dtype=np.float32)
        return write_nifti(Path(path), data, affine)

    return make


@pytest.fixture
def cli():
    """Run the CLI in-process: ``cli("manifest", "ROOT", ...)`` returns Typer's result."""
    from typer.testing import CliRunner

    from cli.main import app

    runner = CliRunner()
    logger = logging.getLogger("segpipe")
    before = (logger.level, logger.propagate)

    def run(*args: str):
        return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)

    yield run
    # the command's log handler writes to the runner's stream, closed by now: later tests' log records would
    # print "--- Logging error ---"; and caplog needs the records to propagate again
    for h in list(logger.handlers):
        if getattr(h, "_segpipe_cli", False):
            logger.removeHandler(h)
    logger.setLevel(before[0])
    logger.propagate = before[1]


@pytest.fixture(scope="session")
def synth_isles(tmp_path_factory) -> Path:
    """A small synthetic ISLES 2022 dataset (Zenodo layout), shared by the tests of a session."""
    from segpipe.data.synthetic import synthesize

    root = tmp_path_factory.mktemp("synth_isles")
    synthesize(root, "isles22", cases=3, seed=7, shape=(32, 32, 24))
    return root


@pytest.fixture(scope="session")
def synth_wmh(tmp_path_factory) -> Path:
    from segpipe.data.synthetic import synthesize

    root = tmp_path_factory.mktemp("synth_wmh")
    synthesize(root, "wmh17", cases=3, seed=3, shape=(48, 48, 16))
    return root


def toy_volume(shape=(24, 24, 16), seed=0, lesion=True):
    """A tiny 'head' (ellipsoid of ~100) with noise and, optionally, a bright cubic lesion."""
    rng = np.random.default_rng(seed)
    idx = np.indices(shape).astype(float)
    c = (np.array(shape) - 1) / 2
    r = np.sqrt(sum(((idx[i] - c[i]) / (0.42 * shape[i])) ** 2 for i in range(3)))
    img = np.where(r < 1, 100.0, 0.0) + rng.normal(0, 3, shape)
    lab = np.zeros(shape, np.float32)
    if lesion:
        s = tuple(slice(int(c[i]) - 2, int(c[i]) + 2) for i in range(3))
        lab[s] = 1
        img[s] += 80
    return img.astype(np.float32), lab


def make_toy_dataset(root: Path, n: int = 2, shape=(24, 24, 16), spacing=(1.5, 1.5, 2.0)) -> Path:
    """n cases with channels t1, flair and a label, and a manifest (root/manifest.json)."""
    import json

    aff = np.diag([-spacing[0], spacing[1], spacing[2], 1.0])  # LAS, like the real files
    cases = []
    for i in range(n):
        img, lab = toy_volume(shape, seed=i)
        cid = f"case{i}"
        write_nifti(root / cid / "t1.nii.gz", img, aff)
        write_nifti(root / cid / "flair.nii.gz", img * 0.7 + 5, aff)
        write_nifti(root / cid / "label.nii.gz", lab, aff)
        cases.append({"id": cid, "images": {"t1": f"{cid}/t1.nii.gz", "flair": f"{cid}/flair.nii.gz"}, "label": f"{cid}/label.nii.gz"})
    manifest = {
        "name": "toy", "root": ".", "channels": ["t1", "flair"],
        "label": {"classes": ["background", "lesion"], "ignore_value": None, "threshold": 0.5},
        "cases": cases, "folds": {"k": n, "seed": 0, "validation": [[f"case{i}"] for i in range(n)]},
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root / "manifest.json"


@pytest.fixture
def toy_dataset(tmp_path) -> Path:
    return make_toy_dataset(tmp_path / "toy")


TINY = [
    "plan.patch_size=[16,16,16]", "plan.batch_size=2", "plan.base_features=4", "plan.max_features=16", "plan.max_stages=3",
    "train.iterations_per_epoch=3", "train.epochs=2", "train.num_workers=0", "train.validate_every=1",
    "preprocess.target_spacing=[2.0,2.0,2.0]", "preprocess.crop_margin_mm=2",
]


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory) -> Path:
    """A preprocessed synthetic ISLES dataset (3 cases, 3 folds) with a tiny network plan, for training tests."""
    from segpipe.config import load_config
    from segpipe.data.layouts import discover
    from segpipe.data.manifest import load_manifest, write_manifest
    from segpipe.data.preprocess import preprocess_dataset
    from segpipe.data.synthetic import synthesize

    root = tmp_path_factory.mktemp("train_ds")
    synthesize(root / "raw", "isles22", cases=3, seed=5, shape=(32, 32, 24))
    m = discover(root / "raw", folds=3)
    write_manifest(m, root / "m.json")
    cfg = load_config(ROOT / "configs" / "demo.yaml", TINY)
    preprocess_dataset(load_manifest(root / "m.json"), cfg, root / "cache")
    return root / "cache"


@pytest.fixture(scope="session")
def tiny_model(tiny_cache, tmp_path_factory) -> Path:
    """A run folder with a checkpoint of the tiny network (1 epoch), for inference tests."""
    from segpipe.training.trainer import resolve_train_config, train

    run = tmp_path_factory.mktemp("tiny_run") / "run"
    train(resolve_train_config(tiny_cache, None, ["train.epochs=1"]), tiny_cache, run)
    return run


def write_dicom_series_sitk(volume: np.ndarray, affine: np.ndarray, folder: Path, *, description: str, series_number: int,
                            study_uid: str, frame_uid: str, b_value: float | None = None, prefix: str = "IM") -> list[Path]:
    """Write an (x, y, z) volume with a RAS affine as a DICOM series with SimpleITK's writer (one file per
    slice, the geometry tags set explicitly), as a scanner export stores it."""
    import SimpleITK as sitk
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    spacing = np.sqrt((lps[:3, :3] ** 2).sum(axis=0))
    direction = lps[:3, :3] / spacing
    img = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(np.asarray(volume, np.float32), (2, 1, 0))))
    img = sitk.Cast(sitk.RescaleIntensity(img, 0, 4000), sitk.sitkInt16)
    img.SetSpacing(tuple(float(s) for s in spacing))
    img.SetOrigin(tuple(float(v) for v in lps[:3, 3]))
    img.SetDirection(tuple(float(v) for v in direction.ravel()))
    series_uid = generate_uid()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    paths = []
    iop = "\\".join(f"{v:.10f}" for v in (*direction[:, 0], *direction[:, 1]))
    for k in range(img.GetDepth()):
        sl = img[:, :, k]
        tags = {
            "0008|0060": "MR", "0008|0016": "1.2.840.10008.5.1.4.1.1.4", "0008|0018": generate_uid(),
            "0020|000d": study_uid, "0020|000e": series_uid, "0020|0052": frame_uid, "0020|0011": str(series_number),
            "0008|103e": description, "0020|0013": str(k + 1), "0010|0010": "Synthetic^Patient", "0010|0020": "SYN0001",  # as write_dicom_series: one patient
            "0020|0032": "\\".join(f"{v:.6f}" for v in img.TransformIndexToPhysicalPoint((0, 0, k))),
            "0020|0037": iop, "0028|0030": f"{spacing[1]:.6f}\\{spacing[0]:.6f}", "0018|0050": f"{spacing[2]:.6f}",
            "0008|0070": "segpipe-tests", "0008|0020": "20240101", "0008|0030": "120000",
        }
        if b_value is not None:
            tags["0018|9087"] = str(b_value)
        for tag, value in tags.items():
            sl.SetMetaData(tag, value)
        path = folder / f"{prefix}{series_number:03d}_{k + 1:04d}.dcm"
        writer.SetFileName(str(path))
        writer.Execute(sl)
        paths.append(path)
    return paths


@pytest.fixture
def nnunet(tmp_path, monkeypatch):
    """nnU-Net itself, for the tests that check segpipe against it: skipped without it (the 'compare' extra);
    its three folders point at ``tmp_path`` (nnU-Net warns, or fails, without them)."""
    pytest.importorskip("nnunetv2", reason="nnU-Net is not installed (pip install -e '.[compare]')")
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(var, str(tmp_path))
