"""The README's Python example runs as written (on the synthetic case it names)."""

from __future__ import annotations

import re
import runpy
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _python_api_example() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Python API", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks, "README: no python block under '## Python API'"
    return blocks[0]


def test_python_api_example_runs(tmp_path, monkeypatch, capsys):
    from segpipe.data.synthetic import synthesize

    synthesize(tmp_path / "demo_data", "isles22", cases=1, seed=0)
    script = tmp_path / "example.py"
    script.write_text(_python_api_example(), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        runpy.run_path(str(script), run_name="__main__")
    out = capsys.readouterr().out
    match = re.search(r"\{'dice': ([\d.]+), 'boundary': (-?[\d.]+)\} weights \(regional, boundary\): \(0\.9, 0\.0999", out)
    assert match, out
    assert 0 < float(match.group(1)) <= 1  # the patch is centred on the lesion: Dice below 1


def test_signed_distance_transform_refuses_a_mask_that_is_not_class_indices():
    import numpy as np
    import torch
    from monai.data import MetaTensor

    from segpipe.transforms import SignedDistanced

    mask = MetaTensor(torch.zeros(1, 8, 8, 8, dtype=torch.float64), affine=torch.eye(4))
    mask[0, 2:4, 2:4, 2:4] = 0.99999999977  # as real ISLES masks store it (read as float64)
    with pytest.raises(ValueError, match="must hold class indices, found 0.99999"):
        SignedDistanced("label", "sdm")({"label": mask})
    mask[0, 2:4, 2:4, 2:4] = 255  # a 0/255 mask
    with pytest.raises(ValueError, match=r"holds values \[255\], not classes 0..1"):
        SignedDistanced("label", "sdm")({"label": mask})
    mask[0, 2:6, 2:6, 2:6] = 1.0  # class indices: a map, negative deeper than the boundary layer
    out = SignedDistanced("label", "sdm")({"label": mask})
    assert tuple(out["sdm"].shape) == (1, 8, 8, 8) and float(np.min(np.asarray(out["sdm"]))) < 0
