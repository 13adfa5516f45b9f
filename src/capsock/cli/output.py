"""The command line's output basics: exit codes, the error type, message lines.

Conventions: stdout carries only data; every message goes to stderr, one line
each, errors as ``capsock: error: WHAT HAPPENED; WHAT TO DO``.  Re-exported
by :mod:`capsock.cli.common`.
"""

from __future__ import annotations

import sys
from enum import IntEnum

__all__ = ["CliError", "Exit", "bar_drawn", "info", "quiet", "say", "set_quiet"]


class Exit(IntEnum):
    """The exit codes of the ``capsock`` command (documented in docs/cli.md)."""

    OK = 0
    """Success."""
    ERROR = 1
    """Any other failure: a lost connection, a reset stream, a local I/O error, ..."""
    USAGE = 2
    """Bad command line: unknown option, malformed argument or capability URI."""
    INTEGRITY = 3
    """A received file or directory failed its end-to-end SHA-256 check."""
    REFUSED = 4
    """The endpoint refused the capability (expired, used up, revoked, bound to
    another node, forged) or is busy: retrying with the same URI will not help."""
    UNREACHABLE = 5
    """No route to the endpoint worked, or the node reached had the wrong key."""
    INTERRUPTED = 130
    """Interrupted (Ctrl-C, SIGINT)."""
    TERMINATED = 143
    """Stopped by SIGTERM (the same clean stop as Ctrl-C)."""


class CliError(Exception):
    """A failure the command reports as one line on stderr, with its exit code."""

    def __init__(self, message: str, code: Exit = Exit.ERROR) -> None:
        super().__init__(message)
        self.code = code


_quiet = False


def set_quiet(quiet: bool) -> None:
    """Silence :func:`info` (``--quiet``); errors still print."""
    global _quiet
    _quiet = quiet


def quiet() -> bool:
    """Whether ``--quiet`` was given."""
    return _quiet


_bar_on_line = False  # a progress bar is drawn on the current stderr line


def bar_drawn(on_line: bool) -> None:
    """The progress bar tells whether it left its line open (no newline yet)."""
    global _bar_on_line
    _bar_on_line = on_line


def say(text: str = "") -> None:
    """Print one message line on stderr (never stdout), below any progress bar."""
    global _bar_on_line
    if _bar_on_line:
        _bar_on_line = False
        text = "\n" + text
    print(text, file=sys.stderr, flush=True)


def info(text: str) -> None:
    """An informational ``capsock: ...`` line on stderr, unless ``--quiet``."""
    if not _quiet:
        say(f"capsock: {text}")
