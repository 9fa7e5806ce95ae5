"""Training: real steps lower the loss, schedules in metrics.csv, resume, torchrun, checkpoints, bad input."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from segpipe.errors import SegpipeError, UsageError
from segpipe.losses import CompositeLoss
from segpipe.models import build_network
from segpipe.planning import load_plan
from segpipe.training.checkpoint import load_checkpoint
from segpipe.training.loader import PatchBatches, make_loader
from segpipe.training.trainer import loader_bound_hint, loader_workers, resolve_train_config, train

ROOT = Path(__file__).resolve().parents[2]
def _cfg(cache, *extra):
    return resolve_train_config(cache, None, list(extra))


def _rows(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_real_steps_lower_the_loss(tiny_cache):
    torch.manual_seed(0)
    plan = load_plan(tiny_cache / "plan.json")
    net = build_network(plan)
    opt = torch.optim.AdamW(net.parameters(), lr=0.01)
    loss_fn = CompositeLoss("dice+boundary", "constant:weight=0.01", num_classes=2)
    ds = PatchBatches(tiny_cache, ["sub-strokecase0002"], plan.patch_size, 2, batches=1, augment=False, foreground_fraction=1.0)
    batch = next(iter(make_loader(ds, num_workers=0, pin_memory=False)))
    target = {"label": batch["label"].long(), "sdm": batch["sdm"]}
    losses = []
    for _ in range(25):
        opt.zero_grad()
        total, _ = loss_fn(net(batch["image"]), target, 0)
        total.backward()
        opt.step()
        losses.append(float(total.detach()))
    assert losses[-1] < 0.8 * losses[0], losses


def test_run_folder_and_schedule_weights_follow_the_formula(tiny_cache, tmp_path):
    run = tmp_path / "run"
    result = train(_cfg(tiny_cache, "train.epochs=4", "loss.schedule=rebalance:step=0.1"), tiny_cache, run)
    assert result.epochs_run == 4
    for name in ("config.yaml", "plan.json", "checkpoint_latest.pt", "checkpoint_best.pt", "metrics.csv", "progress.png", "train.log"):
        assert (run / name).is_file(), name
    rows = _rows(run)
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2, 3]
    for r in rows:
        e = int(r["epoch"])
        assert float(r["regional_weight"]) == pytest.approx(1 - 0.1 * e) and float(r["boundary_weight"]) == pytest.approx(0.1 * e)
        for col in ("loss", "dice", "boundary", "lr", "val_dice", "val_hd95", "val_lesion_f1", "val_avd_ml", "epoch_seconds",
                    "loader_wait_seconds", "val_seconds"):
            assert r[col] != ""
        assert 0 <= float(r["loader_wait_seconds"]) <= float(r["epoch_seconds"])
        assert 0 < float(r["val_seconds"]) < float(r["epoch_seconds"])
    assert float(rows[1]["lr"]) < float(rows[0]["lr"])  # poly decay
    ckpt = torch.load(run / "checkpoint_latest.pt", weights_only=True)  # tensors and plain metadata only
    assert ckpt["epoch"] == 3 and ckpt["schedule"]["name"] == "rebalance" and ckpt["plan"]["patch_size"] == [16, 16, 16]
    increase = train(_cfg(tiny_cache, "train.epochs=3", "loss.schedule=increase"), tiny_cache, tmp_path / "inc")
    assert [round(r["boundary_weight"], 6) for r in increase.history] == [0.01, 0.02, 0.03]


def test_resampling_on_the_device_trains_the_same_weights(tiny_cache, tmp_path):
    """train.augment_on=device (the default on CUDA) is the workers' augmentation moved, not changed."""
    common = ("train.epochs=2", "train.iterations_per_epoch=6", "train.deterministic=true", "train.validate_every=5")
    runs = {}
    for where in ("workers", "device"):
        train(_cfg(tiny_cache, *common, f"train.augment_on={where}"), tiny_cache, tmp_path / where)
        runs[where] = load_checkpoint(tmp_path / where / "checkpoint_latest.pt")["model"]
    for k in runs["workers"]:
        assert torch.equal(runs["workers"][k], runs["device"][k]), k


def test_existing_run_is_refused_without_resume_or_overwrite(tiny_cache, tmp_path):
    run = tmp_path / "run"
    train(_cfg(tiny_cache, "train.epochs=1"), tiny_cache, run)
    with pytest.raises(SegpipeError, match="--resume to continue it or --overwrite"):
        train(_cfg(tiny_cache, "train.epochs=1"), tiny_cache, run)
    train(_cfg(tiny_cache, "train.epochs=1"), tiny_cache, run, overwrite=True)
    other = tmp_path / "notarun"
    other.mkdir()
    (other / "thesis.tex").write_text("precious")
    with pytest.raises(SegpipeError, match="not a segpipe run folder"):
        train(_cfg(tiny_cache, "train.epochs=1"), tiny_cache, other, overwrite=True)
    assert (other / "thesis.tex").read_text() == "precious"


def test_resume_with_a_config_that_matters_is_refused(tiny_cache, tmp_path):
    run = tmp_path / "run"
    train(_cfg(tiny_cache, "train.epochs=1"), tiny_cache, run)
    with pytest.raises(SegpipeError, match=r"differs from the run's.*loss\.spec.*train\.learning_rate"):
        train(_cfg(tiny_cache, "train.epochs=2", "loss.spec=dice+ce", "train.learning_rate=0.5"), tiny_cache, run, resume=True)
    # more epochs is fine
    result = train(_cfg(tiny_cache, "train.epochs=2"), tiny_cache, run, resume=True)
    assert result.epochs_run == 1 and [int(r["epoch"]) for r in _rows(run)] == [0, 1]


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_cache, tmp_path, monkeypatch):
    from segpipe.losses import composite

    run = tmp_path / "run"
    train(_cfg(tiny_cache, "train.epochs=1"), tiny_cache, run)
    real = composite.boundary_loss
    monkeypatch.setattr(composite, "boundary_loss", lambda p, s, validate=True: real(p, s, validate=validate) * float("nan"))
    with pytest.raises(SegpipeError, match=r"epoch 1, iteration 0: the loss term\(s\) boundary became NaN.*last good epoch"):
        train(_cfg(tiny_cache, "train.epochs=3"), tiny_cache, run, resume=True)
    assert load_checkpoint(run / "checkpoint_latest.pt")["epoch"] == 0
    assert [int(r["epoch"]) for r in _rows(run)] == [0]


def test_damaged_cache_is_caught_on_the_first_batch(tiny_cache, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(tiny_cache, cache)
    for sdm in (cache / "cases").glob("*/sdm.npy"):
        arr = np.load(sdm)
        arr[:] = np.nan
        np.save(sdm, arr)
    with pytest.raises(SegpipeError, match=r"sdm: expected finite values.*segpipe preprocess"):
        train(_cfg(cache, "train.epochs=1"), cache, tmp_path / "run")


def test_bad_input(tiny_cache, tmp_path):
    with pytest.raises(SegpipeError, match="no cache.json; run `segpipe preprocess"):
        resolve_train_config(tmp_path / "nocache", None, [])
    with pytest.raises(UsageError, match=r"--fold: the cache has 3 folds \(0..2\), got 7"):
        train(_cfg(tiny_cache), tiny_cache, tmp_path / "r1", fold="7")
    with pytest.raises(SegpipeError, match="--device cuda: no CUDA GPU") if not torch.cuda.is_available() else pytest.raises(Exception):
        train(_cfg(tiny_cache), tiny_cache, tmp_path / "r2", device="cuda")
    other = tmp_path / "other.yaml"
    other.write_text("preprocess:\n  crop_margin_mm: 12\n")
    with pytest.raises(SegpipeError, match=r"preprocess\.crop_margin_mm.*segpipe preprocess --config"):
        resolve_train_config(tiny_cache, other, [])
    with pytest.raises(SegpipeError, match="--resume: no checkpoint_latest.pt"):
        train(_cfg(tiny_cache), tiny_cache, tmp_path / "r3", resume=True)


def test_cuda_out_of_memory_names_the_setting(tiny_cache, tmp_path, monkeypatch):
    from segpipe.models import unet

    def boom(self, x):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(unet.SegUNet, "forward", boom)
    with pytest.raises(SegpipeError, match=r"out of memory.*plan\.batch_size"):
        train(_cfg(tiny_cache), tiny_cache, tmp_path / "oom")
    assert not (tmp_path / "oom").exists()  # nothing to resume: no half-made run in the way of the next start


def test_a_start_that_fails_before_its_first_checkpoint_leaves_no_run(tiny_cache, tmp_path, monkeypatch):
    from segpipe.losses import composite

    real = composite.boundary_loss
    monkeypatch.setattr(composite, "boundary_loss", lambda p, s, validate=True: real(p, s, validate=validate) * float("nan"))
    run = tmp_path / "run"
    with pytest.raises(SegpipeError, match="boundary became NaN.*no epoch had ended, so the run folder is removed"):
        train(_cfg(tiny_cache, "train.epochs=1"), tiny_cache, run)
    assert not run.exists()
    # a run killed in its first epoch (config.yaml and the log, no checkpoint): both ways out are named
    run.mkdir()
    (run / "config.yaml").write_text("name: x\n")
    (run / "train.log").write_text("")
    with pytest.raises(SegpipeError, match="stopped before its first epoch ended.*--overwrite to start it over"):
        train(_cfg(tiny_cache, "train.epochs=1"), tiny_cache, run)
    with pytest.raises(SegpipeError, match="--resume: no checkpoint_latest.pt.*nothing to continue; start it over with --overwrite"):
        train(_cfg(tiny_cache, "train.epochs=1"), tiny_cache, run, resume=True)
    assert (run / "config.yaml").is_file()


def _cli(*args, env=None):
    return [sys.executable, "-c", "from cli.main import main; main()", *map(str, args)]


def test_resume_after_kill_gives_the_same_weights(tiny_cache, tmp_path):
    args = ["train", "--cache", tiny_cache, "--deterministic", "train.epochs=5", "train.iterations_per_epoch=4"]
    straight = subprocess.run(_cli(*args, "--out", tmp_path / "straight"), cwd=ROOT, capture_output=True, text=True)
    assert straight.returncode == 0, straight.stderr
    run = tmp_path / "killed"
    proc = subprocess.Popen(_cli(*args, "--out", run), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (run / "metrics.csv").exists() and len(_rows(run)) >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert load_checkpoint(run / "checkpoint_latest.pt")["epoch"] < 4  # it really was cut short
    resumed = subprocess.run(_cli(*args, "--out", run, "--resume"), cwd=ROOT, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    a = load_checkpoint(tmp_path / "straight" / "checkpoint_latest.pt")
    b = load_checkpoint(run / "checkpoint_latest.pt")
    assert a["epoch"] == b["epoch"] == 4
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert [r["loss"] for r in _rows(tmp_path / "straight")] == [r["loss"] for r in _rows(run)]


@pytest.mark.parametrize("stop", ["sigterm_to_group", pytest.param("worker_killed", marks=pytest.mark.slow)])
def test_stopped_from_outside_is_one_line_and_resumable(tiny_cache, tmp_path, stop):
    """SIGTERM to the process group (docker stop, a cluster's pre-emption, timeout) killed the trainer without a
    word, or, with loader workers, ended in 'unexpected RuntimeError: DataLoader worker ... killed by signal:
    Terminated ... a bug in segpipe' and a traceback from the loader's clean-up. A worker killed alone (the
    out-of-memory killer) is named as such. Both are one line, and the run continues with --resume."""
    import os

    run = tmp_path / "run"
    args = ["train", "--cache", tiny_cache, "--out", run, "train.epochs=50", "train.iterations_per_epoch=4", "train.num_workers=2"]
    proc = subprocess.Popen(_cli(*args), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not (run / "checkpoint_latest.pt").exists():
        time.sleep(0.05)
    workers: list[int] = []
    while time.time() < deadline and proc.poll() is None and not workers:  # the loader's processes of an epoch
        workers = [int(p) for p in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()]
        time.sleep(0.05)
    assert workers, "no loader worker seen"
    if stop == "sigterm_to_group":
        os.killpg(proc.pid, signal.SIGTERM)
    else:
        os.kill(workers[0], signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert "Traceback" not in err and "Exception ignored" not in err, err
    if stop == "sigterm_to_group":
        assert proc.returncode == 143 and lines == ["error: terminated (SIGTERM); outputs that were complete are kept, "
                                                    "nothing half-written was left"], err
    else:
        assert proc.returncode == 1 and len(lines) == 1 and ("killed by signal Killed" in lines[0] or "ended unexpectedly" in lines[0]) and "out-of-memory" in lines[0], err
    assert not [p for p in run.iterdir() if p.name.startswith(".tmp-")]
    done = load_checkpoint(run / "checkpoint_latest.pt")["epoch"]
    resumed = subprocess.run(_cli(*args[:-3], f"train.epochs={done + 2}", "train.iterations_per_epoch=4", "--resume"), cwd=ROOT,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr


def test_torchrun_two_processes_train_and_write_once(tiny_cache, tmp_path):
    run = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "cli.main",
           "train", "--cache", str(tiny_cache), "--out", str(run), "--device", "cpu", "train.epochs=2",
           "train.augment_on=device"]  # each rank finishes its own batches, as on GPUs
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [int(r["epoch"]) for r in _rows(run)] == [0, 1]
    log = (run / "train.log").read_text()
    assert log.count("training fold 0") == 1 and "x 2 processes" in log and "resampled on the device" in log
    assert load_checkpoint(run / "checkpoint_latest.pt")["world_size"] == 2
    assert not list(run.glob(".tmp-*"))


def test_loader_workers_setting_and_automatic(monkeypatch):
    assert loader_workers(3, torch.device("cpu")) == 3 and loader_workers(0, torch.device("cuda")) == 0
    assert loader_workers(None, torch.device("cpu")) == 2
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert loader_workers(None, torch.device("cuda")) == 12  # 16 cores less 2, capped at nnU-Net's 12
    assert loader_workers(None, torch.device("cuda"), world=4) == 3  # four local ranks share the cores
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert loader_workers(None, torch.device("cuda")) == 1
    with pytest.raises(UsageError, match="train.num_workers"):
        loader_workers(-1, torch.device("cpu"))


def test_bad_worker_count_writes_nothing(tiny_cache, tmp_path):
    with pytest.raises(UsageError, match="train.num_workers"):
        train(_cfg(tiny_cache, "train.num_workers=-1"), tiny_cache, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_loader_bound_hint():
    assert loader_bound_hint(1.0, 10.0, 12) is None  # 10 % waiting: the GPU is the limit
    hint = loader_bound_hint(4.0, 10.0, 6)
    assert hint is not None and "40 %" in hint and "train.num_workers (now 6)" in hint
    assert loader_bound_hint(0.0, 0.0, 2) is None


def test_residual_encoder_trains_resumes_and_segments(tiny_cache, tmp_path):
    """plan.architecture=resenc: a real run, its checkpoint rebuilds the same network for inference, and a resume
    that would change the architecture is refused."""
    from segpipe.inference.predictor import Predictor
    from segpipe.training.runlog import summarize_run
    from tests.inference.test_infer import _nifti_case

    run = tmp_path / "run"
    result = train(_cfg(tiny_cache, "train.epochs=2", "plan.architecture=resenc"), tiny_cache, run)
    assert result.epochs_run == 2
    ckpt = load_checkpoint(run / "checkpoint_latest.pt")
    blocks = ckpt["plan"]["network"]["encoder_blocks"]
    assert blocks[:3] == [1, 3, 4]
    assert any(k.startswith("input_block.") for k in ckpt["model"]) and any(".1.conv1.conv.weight" in k for k in ckpt["model"])
    losses = [float(r["loss"]) for r in _rows(run)]
    assert all(np.isfinite(losses))
    assert "residual encoder [1, 3, 4" in summarize_run(run)
    with pytest.raises(SegpipeError, match=r"differs from the run's.*plan\.architecture"):
        train(_cfg(tiny_cache, "train.epochs=3"), tiny_cache, run, resume=True)
    predictor = Predictor.load(run, device="cpu")
    assert predictor.net.state_dict().keys() == ckpt["model"].keys()
    src = _nifti_case(tmp_path / "in")
    pred = predictor.predict({ch: src / f"subj_{ch}.nii.gz" for ch in ("dwi", "adc", "flair")}, tta=False)
    assert pred.mask.shape == (40, 40, 24)


def test_a_cache_without_any_lesion_is_named_before_training(tmp_path, caplog):
    """Masks stored at 0.4 where the label threshold is 0.5 (a header scale factor, probabilities) become empty labels:
    preprocess warns, and train refuses rather than run epochs that cannot learn anything."""
    import logging

    import nibabel as nib

    from segpipe.config import load_config
    from segpipe.data.manifest import load_manifest
    from segpipe.data.preprocess import preprocess_dataset
    from tests.conftest import TINY, make_toy_dataset

    manifest = make_toy_dataset(tmp_path / "toy", n=3)
    for lab in (tmp_path / "toy").glob("case*/label.nii.gz"):
        img = nib.load(str(lab))
        nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj).astype(np.float32) * 0.4, img.affine), str(lab))
    cfg = load_config(None, TINY)
    with caplog.at_level(logging.WARNING):
        preprocess_dataset(load_manifest(manifest), cfg, tmp_path / "cache")
    assert "none of the 3 cached cases has a lesion voxel" in caplog.text
    with pytest.raises(SegpipeError, match="none of the 2 training cases has a lesion voxel.*nothing to learn"):
        train(_cfg(tmp_path / "cache"), tmp_path / "cache", tmp_path / "run")
    assert not (tmp_path / "run").exists()
