"""What every command shares: error handling, logging set-up, option parsing helpers."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import typer

from segpipe.errors import SegpipeError, UsageError, debugging

F = TypeVar("F", bound=Callable[..., Any])


class _State:
    debug: bool = debugging()


state = _State()


def echo_error(text: str) -> None:
    typer.echo(f"error: {text}", err=True)


def handle_errors(fn: F) -> F:
    """Turn known errors into one line on stderr and an exit code; ``--debug`` re-raises instead."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except SegpipeError as exc:
            if state.debug:
                raise
            echo_error(str(exc))
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            if state.debug:
                raise
            echo_error("interrupted; outputs that were complete are kept, nothing half-written was left")
            raise typer.Exit(130) from None
        except MemoryError:
            if state.debug:
                raise
            echo_error("out of memory; use fewer workers or smaller patches/batches (see --help)")
            raise typer.Exit(1) from None
        except Exception as exc:  # a bug: still one line, with the way to get the traceback
            if state.debug:
                raise
            first = (str(exc).strip().splitlines() or [""])[0]
            echo_error(
                f"unexpected {type(exc).__name__}: {first} — this is a bug in segpipe; "
                "rerun with `segpipe --debug ...` and report the traceback"
            )
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.levelno >= logging.WARNING:
            return f"{record.levelname.lower()}: {msg}"
        return msg


def setup_logging(verbose: int = 0, quiet: bool = False) -> None:
    """Library code logs through ``logging``; the command line prints INFO and up to stderr."""
    level = logging.WARNING if quiet else (logging.DEBUG if verbose else logging.INFO)
    root = logging.getLogger("segpipe")
    for h in list(root.handlers):
        if getattr(h, "_segpipe_cli", False):
            root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    handler._segpipe_cli = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False


def parse_ints(text: str | None, option: str, n: int | None = None) -> tuple[int, ...] | None:
    """``"64,64,40"`` -> ``(64, 64, 40)``; a clear usage error otherwise."""
    if text is None:
        return None
    try:
        values = tuple(int(v) for v in text.replace("x", ",").split(",") if v.strip())
    except ValueError:
        raise UsageError(f"{option}: expected whole numbers separated by commas (e.g. 64,64,40), got '{text}'") from None
    if n is not None and len(values) != n:
        raise UsageError(f"{option}: expected {n} numbers separated by commas, got {len(values)} in '{text}'")
    return values


def parse_names(text: str | None, option: str) -> tuple[str, ...] | None:
    if text is None:
        return None
    names = tuple(v.strip() for v in text.split(",") if v.strip())
    if not names:
        raise UsageError(f"{option}: expected names separated by commas, got '{text}'")
    return names
