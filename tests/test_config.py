"""Config: YAML loading, dotted overrides, type checks and unknown keys."""

from __future__ import annotations

import pytest

from segpipe.config import config_to_dict, load_config
from segpipe.errors import SegpipeError, UsageError


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: x\ntrain:\n  epochs: 5\nplan:\n  patch_size: [32, 32, 16]\n")
    cfg = load_config(p, ["train.epochs=7", "loss.spec=dice+ce", "preprocess.target_spacing=[1, 1, 3]"])
    assert cfg.name == "x" and cfg.train.epochs == 7 and cfg.plan.patch_size == (32, 32, 16)
    assert cfg.loss.spec == "dice+ce" and cfg.preprocess.target_spacing == (1.0, 1.0, 3.0)
    assert load_config(None, []).train.epochs == 100  # defaults
    d = config_to_dict(cfg)
    assert d["plan"]["patch_size"] == [32, 32, 16]


@pytest.mark.parametrize(
    "override, needle",
    [
        ("train.epocs=3", "unknown key 'train.epocs' (did you mean 'epochs'?)"),
        ("train.epochs=many", "config 'train.epochs': expected a whole number, got 'many'"),
        ("plan.patch_size=[32,32]", "expected a list of 3"),
        ("train.optimizer=adam", "did you mean 'adamw'"),
        ("train.amp=maybe", "expected true or false"),
        ("nosection.x=1", "unknown key 'nosection'"),
        ("train", "expected section.key=value"),
    ],
)
def test_bad_overrides(override, needle):
    with pytest.raises(UsageError) as info:
        load_config(None, [override])
    assert needle in str(info.value)


def test_bad_files(tmp_path):
    with pytest.raises(SegpipeError, match="file not found"):
        load_config(tmp_path / "none.yaml")
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  epochs: [1\n")
    with pytest.raises(SegpipeError, match="invalid YAML at line"):
        load_config(p)
    p.write_text("- a\n- b\n")
    with pytest.raises(SegpipeError, match="expected a mapping"):
        load_config(p)
    p.write_text("train:\n  epochz: 1\n")
    with pytest.raises(UsageError, match=r"\(in .*bad.yaml\)"):
        load_config(p)


def test_shipped_configs_load():
    from pathlib import Path

    for p in sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")):
        load_config(p)
