"""Config: YAML loading, dotted overrides, type checks and unknown keys."""

from __future__ import annotations

from pathlib import Path

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
        # values out of range are refused when the config is read, before any command writes anything
        ("train.learning_rate=-1", "config 'train.learning_rate': expected at least 0, got -1.0"),
        ("train.learning_rate=.nan", "config 'train.learning_rate': expected a finite number, got nan"),
        ("train.momentum=1.5", "config 'train.momentum': expected a value in [0, 1), got 1.5"),
        ("train.foreground_fraction=2", "expected a value in [0, 1], got 2.0"),
        ("train.iterations_per_epoch=0", "config 'train.iterations_per_epoch': expected at least 1, got 0"),
        ("train.grad_clip=0", "expected more than 0"),
        ("train.seed=-1", "expected a value in [0, 4294967295], got -1"),
        ("plan.patch_size=[0,32,32]", "config 'plan.patch_size[0]': expected at least 1, got 0"),
        ("plan.strides=[[1,1,1],[2,0,2]]", "config 'plan.strides[1][1]': expected at least 1, got 0"),
        ("preprocess.target_spacing=[1,-1,1]", "config 'preprocess.target_spacing[1]': expected more than 0"),
        ("preprocess.head_threshold=1", "expected a value in [0, 1)"),
        ("infer.overlap=1", "config 'infer.overlap': expected a value in [0, 1), got 1.0"),
        ("infer.sw_batch_size=0", "config 'infer.sw_batch_size': expected at least 1, got 0"),
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


def test_a_bad_override_is_named_as_such_not_as_the_files():
    p = Path(__file__).resolve().parents[1] / "configs" / "isles18.yaml"
    cases = {
        "train.epochs=0": r"config 'train.epochs': expected at least 1, got 0 \(from the override train.epochs=0\)$",
        "train.epoch=3": r"unknown key 'train.epoch' \(did you mean 'epochs'\?\).*\(from the override train.epoch=3\)$",
        "plan.patch_size=[64,0,32]": r"'plan.patch_size\[1\]'.*\(from the override plan.patch_size=\[64,0,32\]\)$",
        # a mapping's own key is named, not only the union of what the setting takes
        "preprocess.normalization={ct: hu}": r"config 'preprocess.normalization.ct': expected 'zscore' or 'ct' or 'none', got 'hu'",
    }
    for override, message in cases.items():
        with pytest.raises(UsageError, match=message):
            load_config(p, ["train.seed=1", override])


def test_ranges_accept_their_edges():
    cfg = load_config(None, ["train.weight_decay=0", "train.foreground_fraction=1", "train.momentum=0", "infer.overlap=0",
                             "train.num_workers=0", "plan.batch_size=null", "preprocess.target_spacing=[0.5,0.5,3]"])
    assert cfg.train.foreground_fraction == 1.0 and cfg.plan.batch_size is None and cfg.preprocess.target_spacing == (0.5, 0.5, 3.0)


def test_shipped_configs_load():
    from pathlib import Path

    for p in sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")):
        load_config(p)
