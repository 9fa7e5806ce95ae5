"""What `pip install` puts in place: every package of the source tree, and the built-in configs, which must
work from an installed wheel (the container installs one) and not only from a checkout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from segpipe.config import builtin_configs, load_config
from segpipe.errors import SegpipeError

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_is_listed_in_pyproject():
    tomllib = pytest.importorskip("tomllib")
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "segpipe").rglob("__init__.py")}
    found.add("cli")
    assert found <= listed, f"packages missing from pyproject.toml: {sorted(found - listed)}"


def test_builtin_configs_by_name(tmp_path, monkeypatch):
    assert set(builtin_configs()) >= {"demo", "isles18", "isles22", "wmh17"}
    assert load_config("isles22").name == "isles22"
    (tmp_path / "isles22").write_text("name: mine\n")  # a file of that name wins over the built-in one
    assert load_config(tmp_path / "isles22").name == "mine"
    with pytest.raises(SegpipeError, match="did you mean 'isles22'.*built-in config \\(demo, isles18, isles22, wmh17\\)"):
        load_config("isles2")

    # a folder named like a built-in in the working directory (the demo's output, a dataset) does not hide it
    (tmp_path / "work" / "demo").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "work")
    assert load_config("demo").name == "demo"
    with pytest.raises(SegpipeError, match="--config '../work': expected a YAML file, found a folder"):
        load_config(Path("..") / "work")


def test_the_wheel_carries_the_configs(tmp_path):
    """Build the wheel, install it alone into a folder, and load the built-in configs from there."""
    src = tmp_path / "src"  # a copy: building in the checkout would leave a build/ folder whose stale files later wheels pick up
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for name in ("segpipe", "cli", "configs"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    wheels = tmp_path / "wheels"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(src)],
                       capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        pytest.skip(f"no wheel could be built here: {r.stderr.strip().splitlines()[-1:]}")
    wheel = next(wheels.glob("segpipe-*.whl"))
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile", "--target", str(target), str(wheel)],
                   check=True, timeout=300)
    code = ("import segpipe, segpipe.config as c; print(segpipe.__file__); print(sorted(c.builtin_configs())); "
            "print(c.load_config('demo').name)")
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=True)
    where, names, demo = out.stdout.strip().splitlines()
    assert where.startswith(str(target)), where  # the installed copy, not the checkout
    assert names == "['demo', 'isles18', 'isles22', 'wmh17']" and demo == "demo"
