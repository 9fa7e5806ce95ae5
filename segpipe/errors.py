"""User-facing errors.

Every problem a user can fix (a bad file, a bad option, a missing cache) is raised as a
:class:`SegpipeError`. Its message is one line that names the file or option, says what was expected,
what was found and what to do. The command line prints that line (and the ``details``, one per line,
when there are several problems found at once) and exits with ``exit_code``; ``--debug`` shows the
traceback instead.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterable, Sequence

__all__ = ["SegpipeError", "UsageError", "debugging", "did_you_mean", "problems_error"]


def debugging() -> bool:
    """Whether errors should surface with their traceback (``segpipe --debug``, or ``SEGPIPE_DEBUG=1``): an
    environment variable, so that the worker processes of preprocess and infer see it too."""
    return os.environ.get("SEGPIPE_DEBUG", "") not in ("", "0")


class SegpipeError(Exception):
    """A problem with the input or the environment that the user can fix (exit code 1)."""

    exit_code = 1

    def __init__(self, message: str, *, details: Iterable[str] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.details: tuple[str, ...] = tuple(details)

    def __str__(self) -> str:  # the headline, then one detail per line
        if not self.details:
            return self.message
        return "\n".join([self.message, *("  - " + d for d in self.details)])


class UsageError(SegpipeError):
    """A bad command-line option or option value (exit code 2)."""

    exit_code = 2


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """Return ``" (did you mean 'x'?)"`` for the closest choice, or ``""`` when none is close."""
    names = [str(c) for c in choices]
    lower = {n.lower(): n for n in reversed(names)}  # letter case is no distance: 'DWI' suggests 'dwi'
    close = difflib.get_close_matches(str(word).lower(), list(lower), n=1, cutoff=0.6)
    return f" (did you mean '{lower[close[0]]}'?)" if close else ""


def problems_error(headline: str, problems: Sequence[str], *, hint: str = "", limit: int = 50) -> SegpipeError:
    """One error for several problems found at once (all are reported, not only the first)."""
    shown = list(problems[:limit])
    if len(problems) > limit:
        shown.append(f"... and {len(problems) - limit} more")
    noun = "problem" if len(problems) == 1 else "problems"
    return SegpipeError(f"{headline}: {len(problems)} {noun}" + (f"; {hint}" if hint else ""), details=shown)
