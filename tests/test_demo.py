"""The demo end to end (slow: about a minute on 2 cores; CI runs `segpipe demo --quick` itself)."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_demo_quick_learns(cli, tmp_path):
    r = cli("demo", "--quick", "--out", tmp_path / "demo")
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "demo" / "evaluation.json").read_text())
    assert report["mean"]["dice"] > 0.3  # an empty prediction scores 0
    for name in ("run/progress.png", "run/checkpoint_best.pt", "predictions/summary.json", "evaluation.csv", "train.json"):
        assert (tmp_path / "demo" / name).is_file(), name
    assert "held-out synthetic cases" in r.output and "mean" in r.output


def test_demo_help(cli):
    r = cli("demo", "--help")
    assert r.exit_code == 0 and "--quick" in r.output
