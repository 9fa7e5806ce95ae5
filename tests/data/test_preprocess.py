"""The case cache and `segpipe preprocess`: atomic entries, staleness, resume after kill -9, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from segpipe.config import load_config
from segpipe.data.cache import CaseCache
from segpipe.data.manifest import load_manifest
from segpipe.data.preprocess import preprocess_dataset
from segpipe.errors import SegpipeError
from tests.conftest import make_toy_dataset, toy_volume, write_nifti

ROOT = Path(__file__).resolve().parents[2]


def _run(manifest, out, *overrides, **kw):
    return preprocess_dataset(load_manifest(manifest), load_config(None, list(overrides)), out, **kw)


def test_cache_layout_and_memory_maps(toy_dataset, tmp_path):
    out = tmp_path / "cache"
    report = _run(toy_dataset, out)
    assert sorted(report.processed) == ["case0", "case1"] and not report.failed
    for name in ("plan.json", "fingerprint.json", "cache.json"):
        assert (out / name).is_file()
    index = json.loads((out / "cache.json").read_text())
    assert index["cases"] == ["case0", "case1"] and index["folds"] == [["case0"], ["case1"]]
    c = CaseCache(out).load("case0")
    assert isinstance(c.image, np.memmap) and isinstance(c.sdm, np.memmap)
    assert c.image.dtype == np.float32 and c.label.dtype == np.uint8 and c.sdm.dtype == np.float32
    assert c.image.shape[1:] == c.label.shape == c.sdm.shape[1:]
    assert c.fg.shape[1] == 4 and (c.label[tuple(c.fg[:, 1:].T)] == c.fg[:, 0]).all()
    fp = json.loads((out / "fingerprint.json").read_text())
    st = fp["cases"]["case0"]["stats"]
    assert set(st["intensity"]) == {"t1", "flair"} and st["label"]["classes"][0]["lesions"] == 1


def test_rerun_is_incremental_and_settings_make_entries_stale(toy_dataset, tmp_path):
    out = tmp_path / "cache"
    _run(toy_dataset, out)
    mtime = (out / "cases" / "case0" / "image.npy").stat().st_mtime_ns
    again = _run(toy_dataset, out)
    assert sorted(again.up_to_date) == ["case0", "case1"] and not again.processed
    assert (out / "cases" / "case0" / "image.npy").stat().st_mtime_ns == mtime
    # a changed setting never reuses a stale entry
    changed = _run(toy_dataset, out, "preprocess.crop_margin_mm=2")
    assert sorted(changed.processed) == ["case0", "case1"]
    # a changed input file makes its case stale, and only that one
    p = toy_dataset.parent / "case1" / "t1.nii.gz"
    img, _ = toy_volume(seed=9)
    write_nifti(p, img, nib.load(str(p)).affine)
    os.utime(p, ns=(time.time_ns(), time.time_ns() + 10**9))
    later = _run(toy_dataset, out, "preprocess.crop_margin_mm=2")
    assert later.processed == ["case1"] and later.up_to_date == ["case0"]


def test_entries_are_atomic(toy_dataset, tmp_path, monkeypatch):
    out = tmp_path / "cache"
    cache = CaseCache(out)
    original = np.save

    def failing_save(path, arr, **kw):
        if str(path).endswith("sdm.npy"):
            raise OSError(28, "No space left on device")
        return original(path, arr, **kw)

    monkeypatch.setattr(np, "save", failing_save)
    report = _run(toy_dataset, out, keep_going=True)
    assert set(report.failed) == {"case0", "case1"}
    assert "the device is full or over quota" in report.failed["case0"] and "free some space" in report.failed["case0"]
    assert not any(p.name for p in (out / "cases").iterdir())  # no half-written entry, no temporary left
    assert cache.meta("case0") is None


def test_entries_and_files_get_the_umask_permissions(toy_dataset, tmp_path, monkeypatch):
    """A cache shared by a group (umask 007), or read by a container's other user, needs its entries readable:
    written under a private temporary name, they must not stay private (mkdtemp's 0700) when renamed."""
    from segpipe.io import atomic

    monkeypatch.setattr(atomic, "_UMASK", None)
    old = os.umask(0o007)
    try:
        _run(toy_dataset, tmp_path / "cache")
    finally:
        os.umask(old)
    entry = tmp_path / "cache" / "cases" / "case0"
    assert entry.stat().st_mode & 0o777 == 0o770
    assert (entry / "image.npy").stat().st_mode & 0o777 == 0o660 and (tmp_path / "cache" / "cache.json").stat().st_mode & 0o777 == 0o660


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), OSError("211968 requested and 211936 written"),
                                   RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing "
                                                "file data/0: file write failed")])
def test_a_full_device_is_one_line_and_leaves_nothing(tmp_path, error):
    from segpipe.io.atomic import atomic_path

    with pytest.raises(SegpipeError, match="the device is full or over quota.*free some space or write elsewhere"):
        with atomic_path(tmp_path / "x.pt") as tmp:
            tmp.write_bytes(b"partial")
            raise error
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError, match="something else"):  # other failures are not taken for a full device
        with atomic_path(tmp_path / "y.pt"):
            raise RuntimeError("something else")



def test_an_atomic_file_onto_a_folder_is_one_line(tmp_path):
    """Every file segpipe writes goes through atomic_path: a folder in the file's place is a SegpipeError naming
    it (it was an IsADirectoryError at the final rename, a traceback after all the work)."""
    from segpipe.io.atomic import atomic_write_text

    (tmp_path / "report.json").mkdir()
    with pytest.raises(SegpipeError, match=r"file '.*report.json': expected a file to write, found a folder"):
        atomic_write_text(tmp_path / "report.json", "{}")
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_keep_going_past_a_damaged_case(toy_dataset, tmp_path):
    bad = toy_dataset.parent / "case0" / "flair.nii.gz"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    out = tmp_path / "cache"
    with pytest.raises(SegpipeError, match=r"case 'case0': channel 'flair' .*cannot be read.*--keep-going"):
        _run(toy_dataset, out)
    report = _run(toy_dataset, out, keep_going=True)
    assert report.processed == ["case1"] and list(report.failed) == ["case0"]
    assert json.loads((out / "cache.json").read_text())["cases"] == ["case1"]


def test_parallel_workers_match_serial(tmp_path):
    manifest = make_toy_dataset(tmp_path / "ds", n=3)
    _run(manifest, tmp_path / "serial")
    _run(manifest, tmp_path / "parallel", workers=2)
    for cid in ("case0", "case1", "case2"):
        a, b = CaseCache(tmp_path / "serial").load(cid), CaseCache(tmp_path / "parallel").load(cid)
        assert np.array_equal(a.image, b.image) and np.array_equal(a.sdm, b.sdm) and np.array_equal(a.label, b.label)


def test_auto_workers_takes_cores_cases_and_memory(monkeypatch):
    from segpipe.data import preprocess as pp

    per = 1e6 * pp.PEAK_PER_VALUE + pp.PROCESS_BYTES
    assert pp.auto_workers(10, 1e6, memory=int(100 * per), cores=4)[0] == 4  # a process per core
    assert pp.auto_workers(3, 1e6, memory=int(100 * per), cores=16)[0] == 3  # at most one per case
    n, why = pp.auto_workers(10, 1e6, memory=int(2.5 * per), cores=16)
    assert n == 2 and "memory for 2" in why  # what the memory holds
    assert pp.auto_workers(10, 1e6, memory=0, cores=16)[0] == 1  # never fewer than one
    monkeypatch.setattr(pp, "available_memory", lambda: None)
    assert pp.auto_workers(5, 1e9, cores=3)[0] == 3  # memory unknown: cores and cases only


def test_available_memory_and_cores_are_read():
    from segpipe.data.preprocess import available_memory, usable_cores

    mem = available_memory()
    assert mem is None or 0 < mem < 2**50
    assert 1 <= usable_cores() <= (os.cpu_count() or 1)


def test_automatic_workers_by_default_give_the_serial_cache(tmp_path):
    from segpipe.data.preprocess import usable_cores

    manifest = make_toy_dataset(tmp_path / "ds", n=3)
    serial = _run(manifest, tmp_path / "serial")
    auto = _run(manifest, tmp_path / "auto", workers=None)
    assert serial.workers == 1 and auto.workers == min(usable_cores(), 3)
    for cid in ("case0", "case1", "case2"):
        a, b = CaseCache(tmp_path / "serial").load(cid), CaseCache(tmp_path / "auto").load(cid)
        assert np.array_equal(a.image, b.image) and np.array_equal(a.sdm, b.sdm)
    assert _run(manifest, tmp_path / "auto", workers=None).workers == 1  # all up to date: nothing to start


def _preprocess_proc(manifest, out, workers=1):
    code = "from cli.main import main; main()"
    return subprocess.Popen(
        [sys.executable, "-c", code, "preprocess", "-m", str(manifest), "-o", str(out), "--workers", str(workers)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )


def _complete(out: Path) -> list[str]:
    cache = CaseCache(out)
    return sorted(p.name for p in (out / "cases").glob("*") if not p.name.startswith(".") and cache.meta(p.name))


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_interrupted_run_resumes(tmp_path, sig):
    manifest = make_toy_dataset(tmp_path / "ds", n=6, shape=(40, 40, 24))
    out = tmp_path / "cache"
    proc = _preprocess_proc(manifest, out)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "cases").is_dir() or len(_complete(out)) < 1:
        if proc.poll() is not None or time.time() > deadline:
            break
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    if sig == signal.SIGINT and proc.returncode not in (0,):
        assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err
    done = _complete(out)
    for cid in done:  # every complete entry loads
        CaseCache(out).load(cid)
    report = _run(manifest, out)
    assert sorted(report.up_to_date) == done
    assert sorted(report.processed) == sorted(set(f"case{i}" for i in range(6)) - set(done))
    assert not [p for p in (out / "cases").iterdir() if p.name.startswith(".tmp-")]


# -- bad input through the command line ---------------------------------------------------------------------


def _cli_preprocess(cli, manifest, out, *extra):
    return cli("preprocess", "-m", manifest, "-o", out, *extra)


def _corrupt(kind: str, root: Path) -> None:
    case = root / "case0"
    aff = nib.load(str(case / "t1.nii.gz")).affine
    img, lab = toy_volume()
    if kind == "truncated":
        data = (case / "t1.nii.gz").read_bytes()
        (case / "t1.nii.gz").write_bytes(data[:300])
    elif kind == "4d":
        write_nifti(case / "t1.nii.gz", np.stack([img, img], -1), aff)
    elif kind == "nan":
        img[3, 3, 3] = np.nan
        write_nifti(case / "t1.nii.gz", img, aff)
    elif kind == "shape":
        write_nifti(case / "label.nii.gz", lab[:, :, :-2], aff)
    elif kind == "affine":
        moved = aff.copy()
        moved[0, 3] += 3.0
        write_nifti(case / "label.nii.gz", lab, moved)
    elif kind == "values":
        lab[0, 0, 0] = 3
        write_nifti(case / "label.nii.gz", lab, aff)
    elif kind == "zeros":
        write_nifti(case / "t1.nii.gz", np.zeros_like(img), aff)


@pytest.mark.parametrize(
    "kind, needle",
    [
        ("truncated", "cannot be read"),
        ("4d", "expected a 3D volume, found 4D"),
        ("nan", "1 voxels are NaN or infinite"),
        ("shape", "not on the grid of channel 't1'"),
        ("affine", "largest affine difference 3"),
        ("values", "expected a binary mask"),
        ("zeros", "every voxel is 0"),
    ],
)
def test_bad_input_one_line_and_others_continue(cli, toy_dataset, tmp_path, kind, needle):
    _corrupt(kind, toy_dataset.parent)
    out = tmp_path / "cache"
    r = _cli_preprocess(cli, toy_dataset, out)
    assert r.exit_code == 1 and needle in r.output and "case0" in r.output and "Traceback" not in r.output
    assert r.output.count(needle) == 1, r.output  # one line, not the logged error and then the command's error
    r = _cli_preprocess(cli, toy_dataset, out, "--keep-going")
    assert r.exit_code == 1 and "1 case(s) failed: case0" in r.output
    assert CaseCache(out).meta("case1") is not None and CaseCache(out).meta("case0") is None


def test_empty_label_is_allowed(cli, toy_dataset, tmp_path, caplog):
    aff = nib.load(str(toy_dataset.parent / "case0" / "label.nii.gz")).affine
    write_nifti(toy_dataset.parent / "case0" / "label.nii.gz", np.zeros((24, 24, 16), np.float32), aff)
    out = tmp_path / "cache"
    r = _cli_preprocess(cli, toy_dataset, out)
    assert r.exit_code == 0, r.output
    c = CaseCache(out).load("case0")
    assert not np.asarray(c.sdm).any() and len(c.fg) == 0


def test_unwritable_and_missing(cli, toy_dataset, tmp_path):
    (tmp_path / "file").write_text("x")
    r = _cli_preprocess(cli, toy_dataset, tmp_path / "file" / "cache")
    assert r.exit_code == 1 and "cannot be created" in r.output
    r = _cli_preprocess(cli, tmp_path / "none.json", tmp_path / "c")
    assert r.exit_code == 1 and "manifest" in r.output and "not found" in r.output
    r = _cli_preprocess(cli, toy_dataset, tmp_path / "c", "--workers", "0")
    assert r.exit_code == 2 and "--workers" in r.output
    r = _cli_preprocess(cli, toy_dataset, tmp_path / "c", "plan.patch_size=[7,7]")
    assert r.exit_code == 2 and "plan.patch_size" in r.output
    # a config's reference channel the dataset lacks (the demo's dwi on an ISLES 2018 or WMH dataset): the override to add
    channels = load_manifest(toy_dataset).channels
    r = _cli_preprocess(cli, toy_dataset, tmp_path / "c", "data.reference_channel=dwi")
    assert r.exit_code == 1 and f"add the override data.reference_channel={channels[0]}" in r.output
    assert not (tmp_path / "c" / "cache.json").exists()


def test_inspect(cli, toy_dataset, tmp_path):
    out = tmp_path / "cache"
    assert _cli_preprocess(cli, toy_dataset, out).exit_code == 0
    r = cli("inspect", out)
    assert r.exit_code == 0 and "case0" in r.output and "case1" in r.output and "lesion %" in r.output
    r = cli("inspect", out, "case0", "--export-nifti", tmp_path / "nii", "--png", tmp_path / "p.png")
    assert r.exit_code == 0, r.output
    names = sorted(p.name for p in (tmp_path / "nii").iterdir())
    assert names == ["image_flair.nii.gz", "image_t1.nii.gz", "label.nii.gz", "sdm_lesion.nii.gz"]
    meta = CaseCache(out).meta("case0")
    img = nib.load(str(tmp_path / "nii" / "sdm_lesion.nii.gz"))
    assert np.allclose(img.affine, meta["affine"], atol=1e-5)
    assert np.allclose(np.asanyarray(img.dataobj), CaseCache(out).load("case0").sdm[0])
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    r = cli("inspect", out, "case9")
    assert r.exit_code == 1 and "no case 'case9'" in r.output
    r = cli("inspect", tmp_path / "nothing")
    assert r.exit_code == 1 and "segpipe preprocess" in r.output


def test_a_changed_bval_sidecar_makes_the_case_stale(tmp_path):
    import os

    from segpipe.data.cache import case_key

    img = tmp_path / "dwi.nii.gz"
    img.write_bytes(b"x")
    key = case_key({"a": 1}, {"dwi": img})
    (tmp_path / "dwi.bval").write_text("0 1000\n")
    with_bval = case_key({"a": 1}, {"dwi": img})
    assert with_bval != key
    (tmp_path / "dwi.bval").write_text("0 2000\n")
    os.utime(tmp_path / "dwi.bval", ns=(1, 1))
    assert case_key({"a": 1}, {"dwi": img}) != with_bval


def test_an_output_folder_that_is_a_file_is_named_so(tmp_path):
    from segpipe.io.atomic import ensure_writable_dir

    (tmp_path / "afile").write_text("")
    with pytest.raises(SegpipeError, match="--out folder '.*afile': expected a folder, found a file"):
        ensure_writable_dir(tmp_path / "afile", what="--out folder")
