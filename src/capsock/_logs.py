"""Log lines whose number a peer controls, rate-limited.

A stranger decides how many connections fail, how many sessions break the
protocol or go silent, how many OPENs are refused: each of those writes a
line, so each goes through a :class:`LimitedLog`, which lets ``per_window``
lines through per ``window`` seconds and reports how many it held back with
the next line that gets through.  No anyio, no capsock imports: every layer
may use it.
"""

from __future__ import annotations

import logging
import time

__all__ = ["LimitedLog"]


class LimitedLog:
    """At most ``per_window`` lines per ``window`` seconds; the rest are counted
    and the count is reported with the next line that gets through."""

    __slots__ = ("_lines", "_log", "_per_window", "_start", "_suppressed", "_window")

    def __init__(self, logger: logging.Logger, *, per_window: int, window: float) -> None:
        self._log = logger
        self._per_window = per_window
        self._window = window
        self._start = -1e9
        self._lines = 0
        self._suppressed = 0

    def info(self, msg: str, *args: object) -> None:
        self._emit(logging.INFO, msg, args)

    def warning(self, msg: str, *args: object) -> None:
        self._emit(logging.WARNING, msg, args)

    def _emit(self, level: int, msg: str, args: tuple[object, ...]) -> None:
        if not self._log.isEnabledFor(level):
            return
        now = time.monotonic()
        if now - self._start >= self._window:
            self._start, self._lines = now, 0
        if self._lines >= self._per_window:
            self._suppressed += 1
            return
        self._lines += 1
        if self._suppressed:
            msg += " (%d similar lines suppressed)"
            args = (*args, self._suppressed)
            self._suppressed = 0
        self._log.log(level, msg, *args)
