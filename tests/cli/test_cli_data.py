"""`segpipe --help/--version`, `segpipe manifest`, `segpipe synth` through Typer's runner and as a process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from segpipe import __version__


def _no_traceback(result) -> None:
    assert "Traceback" not in result.output


def test_version_and_help(cli):
    r = cli("--version")
    assert r.exit_code == 0 and r.output.strip() == f"segpipe {__version__}"
    r = cli("--help")
    assert r.exit_code == 0 and "manifest" in r.output and "synth" in r.output


@pytest.mark.parametrize("command", ["manifest", "synth", "convert", "preprocess", "inspect", "train", "infer", "evaluate", "demo"])
def test_every_command_has_help(cli, command):
    r = cli(command, "--help")
    assert r.exit_code == 0
    assert "Usage" in r.output and len(r.output.splitlines()) > 8


def test_help_texts_keep_their_placeholders():
    """The help is rendered as Markdown, where `<case>` is an HTML tag and vanishes ("image_.nii.gz"): the
    texts name placeholders in capitals (CASE.nii.gz) or inside backticks."""
    import re

    import typer

    from cli.main import app

    group = typer.main.get_command(app)
    texts = []
    for name, command in group.commands.items():
        texts.append((name, command.help or ""))
        texts += [(f"{name} {p.name}", getattr(p, "help", None) or "") for p in command.params]
    eaten = [(where, m.group(0)) for where, text in texts for m in re.finditer(r"<[A-Za-z][^>]*>", re.sub(r"`[^`]*`", "", text))]
    assert not eaten


def test_synth_then_manifest(cli, tmp_path):
    r = cli("synth", tmp_path / "ds", "--layout", "wmh17", "--cases", "2", "--seed", "1", "--shape", "32,32,16")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "ds" / "Utrecht" / "0" / "pre" / "FLAIR.nii.gz").is_file()
    out = tmp_path / "m.json"
    r = cli("manifest", tmp_path / "ds", "--out", out)
    assert r.exit_code == 0, r.output
    assert "2 cases (2 labelled), layout wmh17" in r.output
    data = json.loads(out.read_text())
    assert data["label"]["ignore_value"] == 2 and data["channels"] == ["flair", "t1"]


def test_manifest_refuses_to_overwrite(cli, tmp_path, synth_isles):
    out = tmp_path / "m.json"
    assert cli("manifest", synth_isles, "--out", out).exit_code == 0
    before = out.read_text()
    r = cli("manifest", synth_isles, "--out", out, "--folds", "2")
    assert r.exit_code == 1 and "--overwrite" in r.output and out.read_text() == before
    _no_traceback(r)
    assert cli("manifest", synth_isles, "--out", out, "--folds", "2", "--overwrite").exit_code == 0
    assert out.read_text() != before


@pytest.mark.parametrize(
    "args, code, needle",
    [
        (["manifest", "{tmp}/none", "--out", "{tmp}/m.json"], 1, "folder not found"),
        (["manifest", "{tmp}", "--out", "{tmp}/m.json"], 1, "no known dataset layout"),
        (["manifest", "{tmp}", "--out", "{tmp}/m.json", "--layout", "isles2022"], 2, "did you mean 'isles22'"),
        (["manifest", "{tmp}", "--out", "{tmp}/m.json", "--folds", "many"], 2, "--folds"),
        (["synth", "{tmp}/s", "--shape", "10,10"], 2, "--shape"),
        (["synth", "{tmp}/s", "--layout", "isles15"], 2, "synth writes isles22, isles18, wmh17"),
        (["synth", "{tmp}/s", "--cases", "0"], 2, "--cases"),
        (["synth", "{tmp}/s", "--seed", "-1"], 2, "--seed: expected 0 or more"),
        (["manifest", "{tmp}", "--out", "{tmp}", "--overwrite"], 1, "--out '{tmp}': expected a file to write, found a folder"),
        (["manifest", "{tmp}", "--out", "{tmp}/m.json", "--write-splits", "{tmp}"], 1, "--write-splits '{tmp}': expected a file"),
    ],
)
def test_bad_input_is_one_line(cli, tmp_path, args, code, needle):
    r = cli(*[a.format(tmp=tmp_path) for a in args])
    assert r.exit_code == code, r.output
    assert needle.format(tmp=tmp_path) in r.output
    _no_traceback(r)
    assert not (tmp_path / "m.json").exists()


def test_output_under_a_file(cli, tmp_path, synth_isles):
    (tmp_path / "file").write_text("x")
    r = cli("manifest", synth_isles, "--out", tmp_path / "file" / "m.json")
    assert r.exit_code == 1 and "expected a folder, found a file" in r.output
    _no_traceback(r)


def test_unwritable_output_folder(cli, tmp_path, synth_isles):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as a user who can write anywhere (root)")
        r = cli("manifest", synth_isles, "--out", ro / "m.json")
        assert r.exit_code == 1 and "not writable" in r.output
    finally:
        ro.chmod(0o700)


def test_console_script_usage_error_is_one_line(tmp_path):
    """The installed entry point prints usage errors as one `error:` line with exit code 2."""
    proc = subprocess.run(
        [sys.executable, "-c", "from cli.main import main; main()", "synth", str(tmp_path), "--cases", "x"],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--cases" in lines[0]


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_shows_traceback(tmp_path, where):
    """--debug before the command, or added at the end of the command line (as a user rerunning what failed
    types it; the parser refused it there: 'No such option: --debug')."""
    args = ["manifest", str(tmp_path / "x"), "--out", str(tmp_path / "m.json")]
    args = ["--debug", *args] if where == "before" else [*args, "--debug"]
    proc = subprocess.run([sys.executable, "-c", "from cli.main import main; main()", *args], capture_output=True, text=True)
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "folder not found" in proc.stderr


def test_global_flags_after_the_command_are_moved_before_it():
    from cli.main import hoist_global_flags

    commands = {"infer", "train"}
    assert hoist_global_flags(["infer", "x", "-q", "--out", "o", "--debug"], commands) == ["-q", "--debug", "infer", "x", "--out", "o"]
    assert hoist_global_flags(["-v", "train", "--epochs", "2"], commands) == ["-v", "train", "--epochs", "2"]
    assert hoist_global_flags(["train", "a", "--", "--debug"], commands) == ["train", "a", "--", "--debug"]  # after --: an argument
    assert hoist_global_flags(["--help"], commands) == ["--help"]
