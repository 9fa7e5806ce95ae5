"""Shared fixtures: the real ISLES 2022 sample (skipped when absent), tiny NIfTI writers, the CLI runner."""

from __future__ import annotations

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

    def run(*args: str):
        return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)

    return run


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
