"""Fine-tuning (`segpipe train --init-from`): the weights carried over, fresh heads for other classes, and the
networks that do not fit refused before anything is written."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

from segpipe.models import build_network
from segpipe.planning import Plan
from segpipe.training.checkpoint import load_checkpoint, save_checkpoint
from segpipe.training.finetune import HEAD_PARTS, initial_weights


def _model_for(tiny_model, path, **plan_change):
    """A checkpoint like the tiny model's for a changed plan: its weights where the shapes fit, fresh ones elsewhere."""
    ckpt = load_checkpoint(tiny_model / "checkpoint_best.pt")
    ckpt.pop("format")
    plan = Plan.from_json(ckpt["plan"])
    plan = dataclasses.replace(plan, **plan_change)
    torch.manual_seed(3)
    state = build_network(plan).state_dict()
    state.update({k: v for k, v in ckpt["model"].items() if k in state and v.shape == state[k].shape})
    ckpt.update(model=state, plan=plan.to_json())
    return save_checkpoint(path, ckpt)


def test_fine_tuning_starts_from_the_models_weights(cli, tiny_model, tiny_cache, tmp_path):
    # a learning rate of 0 leaves the weights where they started: the run's checkpoint is the model's
    r = cli("train", "--cache", tiny_cache, "--out", tmp_path / "ft", "--epochs", "1", "--init-from", tiny_model,
            "train.learning_rate=0")
    assert r.exit_code == 0, r.output
    start = load_checkpoint(tiny_model / "checkpoint_best.pt")["model"]
    after = load_checkpoint(tmp_path / "ft" / "checkpoint_latest.pt")
    assert after["config"]["train"]["init_from"] == str(tiny_model.resolve())  # recorded in the run's config
    for key, value in start.items():
        assert torch.equal(after["model"][key], value), key
    # without --init-from the same run starts elsewhere
    r = cli("train", "--cache", tiny_cache, "--out", tmp_path / "fresh", "--epochs", "1", "train.learning_rate=0", "train.seed=11")
    assert r.exit_code == 0, r.output
    fresh = load_checkpoint(tmp_path / "fresh" / "checkpoint_latest.pt")["model"]
    assert not all(torch.equal(fresh[k], v) for k, v in start.items())
    # resuming a fine-tuned run takes its own checkpoint, with or without --init-from on the command line
    r = cli("train", "--cache", tiny_cache, "--out", tmp_path / "ft", "--epochs", "2", "--resume", "train.learning_rate=0")
    assert r.exit_code == 0, r.output
    assert load_checkpoint(tmp_path / "ft" / "checkpoint_latest.pt")["epoch"] == 1


def test_other_classes_get_fresh_heads(tiny_model, tmp_path):
    plan = Plan.from_json(load_checkpoint(tiny_model / "checkpoint_best.pt")["plan"])
    source = _model_for(tiny_model, tmp_path / "three.pt", classes=("background", "lesion", "other"))
    load, fresh, _ = initial_weights(source, plan)
    target = build_network(plan).state_dict()
    heads = [k for k in target if any(p in k for p in HEAD_PARTS)]
    assert heads and sorted(fresh) == sorted(heads)
    assert sorted(load) == sorted(k for k in target if k not in heads)
    theirs = load_checkpoint(source)["model"]
    assert all(torch.equal(load[k], theirs[k]) for k in load)


def test_other_channel_names_are_taken_in_order_with_a_warning(tiny_model, tmp_path, caplog):
    plan = Plan.from_json(load_checkpoint(tiny_model / "checkpoint_best.pt")["plan"])
    source = _model_for(tiny_model, tmp_path / "named.pt", channels=("t1", "t2", "flair"), reference_channel="t1")
    with caplog.at_level(logging.WARNING, logger="segpipe"):
        load, fresh, _ = initial_weights(source, plan)
    assert not fresh and "trained on channels t1, t2, flair, this run has dwi, adc, flair" in caplog.text


def test_the_run_takes_the_models_network_patch_and_batch(cli, tiny_model, tiny_cache, tmp_path):
    ckpt_plan = Plan.from_json(load_checkpoint(tiny_model / "checkpoint_best.pt")["plan"])
    wider = dataclasses.replace(ckpt_plan.network, filters=(8, 16, 32))
    source = _model_for(tiny_model, tmp_path / "wide.pt", network=wider, patch_size=(24, 24, 24), batch_size=1)
    r = cli("train", "--cache", tiny_cache, "--out", tmp_path / "run", "--epochs", "1", "--init-from", source, "train.learning_rate=0")
    assert r.exit_code == 0, r.output
    after = load_checkpoint(tmp_path / "run" / "checkpoint_latest.pt")
    plan = Plan.from_json(after["plan"])
    assert plan.network == wider and plan.patch_size == (24, 24, 24) and plan.batch_size == 1
    assert plan.target_spacing == ckpt_plan.target_spacing  # the preprocessing stays the cache's
    theirs = load_checkpoint(source)["model"]
    assert all(torch.equal(after["model"][k], v) for k, v in theirs.items())


@pytest.mark.parametrize("change, needle", [
    ("channels", "the model takes 2 input channels (dwi, adc), this run 3"),
    ("damaged", "its weights do not fit the network of its own plan"),
])
def test_a_model_that_does_not_fit_is_refused(cli, tiny_model, tiny_cache, tmp_path, change, needle):
    if change == "channels":
        source = _model_for(tiny_model, tmp_path / "other.pt", channels=("dwi", "adc"))
    else:  # the plan says wider than the weights are
        ckpt = load_checkpoint(tiny_model / "checkpoint_best.pt")
        ckpt.pop("format")
        plan = Plan.from_json(ckpt["plan"])
        ckpt["plan"] = dataclasses.replace(plan, network=dataclasses.replace(plan.network, filters=(8, 16, 32))).to_json()
        source = save_checkpoint(tmp_path / "damaged.pt", ckpt)
    r = cli("train", "--cache", tiny_cache, "--out", tmp_path / "run", "--epochs", "1", "--init-from", source)
    assert r.exit_code == 1 and needle in r.output and "Traceback" not in r.output, r.output
    assert not (tmp_path / "run").exists()


def test_init_from_bad_paths(cli, tiny_cache, tmp_path):
    r = cli("train", "--cache", tiny_cache, "--out", tmp_path / "run", "--init-from", tmp_path / "nothing")
    assert r.exit_code == 1 and "--init-from" in r.output and "not found" in r.output
    (tmp_path / "empty").mkdir()
    r = cli("train", "--cache", tiny_cache, "--out", tmp_path / "run", "--init-from", tmp_path / "empty")
    assert r.exit_code == 1 and "no checkpoint_best.pt or checkpoint_latest.pt" in r.output
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    r = cli("train", "--cache", tiny_cache, "--out", tmp_path / "run", "--init-from", tmp_path / "junk.pt")
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert not (tmp_path / "run").exists()
