"""`segpipe train` through Typer's runner: a short run, and bad input as one line."""

from __future__ import annotations

import pytest


def test_train_short_run(cli, tiny_cache, tmp_path):
    r = cli("train", "--cache", tiny_cache, "--out", tmp_path / "run", "--epochs", "1", "--loss", "0.5*ce+dice+boundary",
            "--schedule", "increase:step=0.05")
    assert r.exit_code == 0, r.output
    assert "trained 1 epochs" in r.output and (tmp_path / "run" / "checkpoint_best.pt").is_file()
    header = (tmp_path / "run" / "metrics.csv").read_text().splitlines()[0]
    assert "ce,dice,boundary" in header


def test_quiet_training_prints_no_epochs_but_logs_them(cli, tiny_cache, tmp_path):
    """-q showed every epoch line anyway: the run's log file lowered the logger's level to INFO."""
    r = cli("-q", "train", "--cache", tiny_cache, "--out", tmp_path / "run", "--epochs", "1")
    assert r.exit_code == 0, r.output
    assert "epoch 0:" not in r.output and "training fold" not in r.output
    assert "epoch 0:" in (tmp_path / "run" / "train.log").read_text()


@pytest.mark.parametrize(
    "args, code, needle",
    [
        (["--loss", "dice+boundry"], 2, "did you mean 'boundary'"),
        (["--schedule", "rebalance:floor=2"], 2, "'floor' expected a number in [0, 1]"),
        (["--fold", "9"], 2, "--fold: the cache has 3 folds"),
        (["--fold", "x"], 2, "--fold: expected a fold number"),
        (["--epochs", "0"], 2, "--epochs"),
        (["train.epocs=3"], 2, "did you mean 'epochs'"),
        (["--device", "tpu"], 2, "--device: expected auto, cpu or cuda"),
    ],
)
def test_bad_input_is_one_line(cli, tiny_cache, tmp_path, args, code, needle):
    r = cli("train", "--cache", tiny_cache, "--out", tmp_path / "run", *args)
    assert r.exit_code == code, r.output
    assert needle in r.output and "Traceback" not in r.output


def test_missing_cache(cli, tmp_path):
    r = cli("train", "--cache", tmp_path / "none", "--out", tmp_path / "run")
    assert r.exit_code == 1 and "segpipe preprocess" in r.output


def test_inspect_a_run_folder(cli, tiny_model, tmp_path):
    r = cli("inspect", tiny_model)
    assert r.exit_code == 0, r.output
    assert "fold 0 (2 training, 1 validation cases), dice+boundary under rebalance" in r.output
    assert "1 of 1 epochs (finished)" in r.output and "best validation dice" in r.output
    import hashlib

    digest = hashlib.sha256((tiny_model / "checkpoint_best.pt").read_bytes()).hexdigest()
    assert f"model for `segpipe infer`: checkpoint_best.pt, sha256 {digest}" in r.output
    header = next(line for line in r.output.splitlines() if line.strip().startswith("epoch"))
    assert "val_dice" in header and "boundary_weight" in header and "val_seconds" in header
    r = cli("inspect", tiny_model, "some_case")
    assert r.exit_code == 2 and "is a run folder" in r.output
    r = cli("inspect", tiny_model.parent)  # the folder above the run
    assert r.exit_code == 2 and "neither a cache" in r.output and f"it holds the run {tiny_model.name}: inspect that" in r.output
    r = cli("inspect", tiny_model / "config.yaml")  # a file of the run, not a checkpoint
    assert r.exit_code == 1 and "config.yaml': not a readable PyTorch checkpoint" in r.output and "Traceback" not in r.output


def test_inspect_a_model_says_what_infer_would_run(cli, tiny_model, tmp_path):
    """A checkpoint as deployed (renamed, copied into a container): its SHA-256, the value the DICOM SEG and
    SR record, and what it expects."""
    import hashlib

    ckpt = tmp_path / "deployed.pt"
    ckpt.write_bytes((tiny_model / "checkpoint_best.pt").read_bytes())
    r = cli("inspect", ckpt)
    assert r.exit_code == 0, r.output
    assert f"sha256 {hashlib.sha256(ckpt.read_bytes()).hexdigest()}" in r.output
    assert "one checkpoint" in r.output and "fold 0, saved after 1 of 1 epochs, 2 training / 1 held-out cases" in r.output
    assert "channels dwi, adc, flair (reference dwi); classes background, lesion" in r.output
    assert "trained with dice+boundary under rebalance(" in r.output and "inference defaults: TTA" in r.output
    r = cli("inspect", ckpt, "some_case")
    assert r.exit_code == 2 and "is a file" in r.output
