"""The ``segpipe`` application: global options and the list of commands."""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from cli import data, demo, evaluate, infer, preprocess, train
from cli._common import Terminated, catch_sigterm, setup_logging, state
from segpipe import __version__

app = typer.Typer(
    name="segpipe",
    help="3D lesion segmentation for brain MRI (ISLES, WMH) with the boundary loss, Dice and cross-entropy.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"segpipe {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show the full traceback of an error.")] = False,
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, help="More log output.")] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Warnings and errors only.")] = False,
) -> None:
    state.debug = state.debug or debug
    if debug:  # the library's per-case guards and worker processes read it there
        os.environ["SEGPIPE_DEBUG"] = "1"
    setup_logging(verbose, quiet)


app.command("manifest")(data.manifest)
app.command("synth")(data.synth)
app.command("convert")(data.convert)
app.command("preprocess")(preprocess.preprocess)
app.command("inspect")(preprocess.inspect)
app.command("train")(train.train)
app.command("infer")(infer.infer)
app.command("evaluate")(evaluate.evaluate)
app.command("demo")(demo.demo)


_GLOBAL_FLAGS = {"--debug", "--quiet", "-q", "--verbose", "-v", "-vv", "-vvv"}


def hoist_global_flags(argv: list[str], commands: set[str]) -> list[str]:
    """The global flags (--debug, --quiet, --verbose) moved before the command when they were typed after it:
    an error says "rerun with --debug", and the natural way is to add it at the end of the command line,
    which the parser would refuse ("No such option: --debug"). Nothing after a ``--`` is touched."""
    at = next((i for i, a in enumerate(argv) if a in commands), None)
    if at is None:
        return argv
    rest = argv[at + 1:]
    end = rest.index("--") if "--" in rest else len(rest)
    moved = [a for a in rest[:end] if a in _GLOBAL_FLAGS]
    if not moved:
        return argv
    return [*argv[:at], *moved, argv[at], *[a for a in rest[:end] if a not in _GLOBAL_FLAGS], *rest[end:]]


def main(argv: list[str] | None = None) -> None:
    """Console entry point: usage errors become one line (``error: ...``) and exit code 2."""
    catch_sigterm()
    command = typer.main.get_command(app)
    argv = hoist_global_flags(list(sys.argv[1:] if argv is None else argv), set(getattr(command, "commands", {})))
    try:
        rv = command.main(args=argv, prog_name="segpipe", standalone_mode=False)
    except KeyboardInterrupt as exc:
        terminated = isinstance(exc, Terminated)
        typer.echo(f"error: {'terminated (SIGTERM)' if terminated else 'interrupted'}", err=True)
        sys.exit(143 if terminated else 130)
    except Exception as exc:
        fmt = getattr(exc, "format_message", None)
        code = getattr(exc, "exit_code", None)
        if callable(fmt) and isinstance(code, int):  # the parser's usage errors
            ctx = getattr(exc, "ctx", None)
            hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
            typer.echo(f"error: {fmt()}{hint}", err=True)
            sys.exit(code)
        if type(exc).__name__ == "Abort":
            typer.echo("error: aborted", err=True)
            sys.exit(1)
        raise
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":
    main()
