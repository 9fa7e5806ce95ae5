"""What every command shares: error handling, logging set-up, option parsing helpers."""

from __future__ import annotations

import functools
import logging
import re
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import typer

from segpipe.errors import SegpipeError, UsageError, debugging

F = TypeVar("F", bound=Callable[..., Any])


class _State:
    debug: bool = debugging()


class Terminated(KeyboardInterrupt):
    """SIGTERM (``docker stop``, a cluster's pre-emption, torchrun stopping the other ranks), raised in the main
    thread like Ctrl-C, so that the same clean-up runs: temporary files removed, the log closed."""


_MAIN_PID: int | None = None


def _on_sigterm(signum: int, frame: Any) -> None:
    import os
    import signal

    if os.getpid() != _MAIN_PID:  # a forked worker process inherited the handler: end as SIGTERM means
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    _quiet_children()
    raise Terminated()


def _quiet_children() -> None:
    """Stop PyTorch's SIGCHLD handler from raising again while the data loader shuts its workers down (they
    were stopped too): the clean-up would print 'Exception ignored ... killed by signal' after the error line.

    A Python handler that does nothing, not SIG_DFL: a SIGCHLD that arrived just before, whose Python handler has
    not run yet, would find no handler and CPython would print 'OSError: Signal 17 ignored due to race condition'
    with a traceback (seen once in about ten SIGTERM stops)."""
    import signal

    signal.signal(signal.SIGCHLD, _ignore_signal)


def _ignore_signal(signum: int, frame: object) -> None:
    return None


def catch_sigterm() -> None:
    """Turn SIGTERM into :class:`Terminated` in this process (the command-line entry point calls it)."""
    import os
    import signal

    global _MAIN_PID
    _MAIN_PID = os.getpid()
    signal.signal(signal.SIGTERM, _on_sigterm)


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
        except KeyboardInterrupt as exc:
            if state.debug:
                raise
            terminated = isinstance(exc, Terminated)
            echo_error(f"{'terminated (SIGTERM)' if terminated else 'interrupted'}; {_STOPPED}")
            raise typer.Exit(143 if terminated else 130) from None
        except MemoryError:
            if state.debug:
                raise
            echo_error("out of memory; use fewer workers or smaller patches/batches (see --help)")
            raise typer.Exit(1) from None
        except Exception as exc:  # a bug: still one line, with the way to get the traceback
            if state.debug:
                raise
            lost = _lost_loader_worker(exc)
            if lost is not None:
                echo_error(lost[1])
                raise typer.Exit(lost[0]) from None
            first = (str(exc).strip().splitlines() or [""])[0]
            echo_error(
                f"unexpected {type(exc).__name__}: {first} — this is a bug in segpipe; "
                "rerun with `segpipe --debug ...` and report the traceback"
            )
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


_STOPPED = "outputs that were complete are kept, nothing half-written was left"


def _lost_loader_worker(exc: Exception) -> tuple[int, str] | None:
    """PyTorch's error for a data loader process that died, as (exit code, message); None for other errors.
    Killed with its process group by SIGTERM: the command was terminated. Killed alone (SIGKILL, or gone
    without a signal it could report): most often the out-of-memory killer."""
    found = re.search(r"DataLoader worker \(pid:? ?(\d+)\) is killed by signal: (\w+)", str(exc)) or \
        re.search(r"DataLoader worker \(pid\(s\) ([\d, ]+)\) exited (unexpectedly)", str(exc))
    if found is None:
        return None
    _quiet_children()
    pid, how = found.groups()
    if how == "Terminated":
        return 143, f"terminated (SIGTERM); {_STOPPED}"
    why = ("most often the system's out-of-memory killer: lower train.num_workers, plan.batch_size or plan.patch_size"
           if how in ("Killed", "unexpectedly") else "look at the system log (dmesg) for why")
    return 1, f"a data loader process (pid {pid}) {'ended unexpectedly' if how == 'unexpectedly' else f'was killed by signal {how}'}; {why}"


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
    # the level on the handler too: a training run lowers the logger's to INFO for its train.log, which must not
    # bring INFO back to a terminal that asked for -q
    handler.setLevel(level)
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


def parse_pairs(values: list[str] | None, option: str, *, as_int: bool = False) -> dict:
    """``NAME=VALUE`` options (``--channel``, ``--series``) as a dict."""
    out = {}
    for v in values or []:
        name, eq, rest = v.partition("=")
        if not eq or not name or not rest:
            raise UsageError(f"{option}: expected NAME=VALUE, got '{v}'")
        if as_int:
            try:
                out[name] = int(rest)
            except ValueError:
                raise UsageError(f"{option}: expected NAME=SERIESNUMBER (a whole number), got '{v}'") from None
        else:
            out[name] = rest
    return out
