"""A one-line progress bar on stderr (percentage, bytes, rate, ETA), and byte counts."""

from __future__ import annotations

import math
import shutil
import sys
import time

from .common import bar_drawn, quiet

__all__ = ["Progress", "human_bytes"]


def human_bytes(n: float) -> str:
    """``1536`` -> ``1.5 KiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _clock(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "--:--"
    s = int(seconds)
    if s >= 3600:
        return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
    return f"{s // 60}:{s % 60:02d}"


class Progress:
    """A one-line progress bar on stderr: percentage, bytes, rate, ETA.

    Drawn only when stderr is a terminal and ``--quiet`` was not given, at
    most ten times a second.
    """

    def __init__(self, label: str, total: int, start: int = 0) -> None:
        self.label = label
        self.total = total
        self.done = start
        self._start_bytes = start
        self._t0 = time.monotonic()
        self._drawn = 0.0
        self.enabled = not quiet() and sys.stderr.isatty()

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self._t0

    @property
    def rate(self) -> float:
        return (self.done - self._start_bytes) / max(self.elapsed, 1e-6)

    def advance(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.enabled and now - self._drawn >= 0.1:
            self._drawn = now
            self._draw()

    def line(self) -> str:
        """The bar's text (without the leading carriage return)."""
        frac = self.done / self.total if self.total else 1.0
        width = 20
        filled = int(frac * width)
        bar = "=" * filled + (">" if filled < width else "") + " " * (width - filled - 1)
        rate = self.rate
        eta = (self.total - self.done) / rate if rate > 0 else math.inf
        return (
            f"{self.label} {frac * 100:3.0f}% [{bar}] {human_bytes(self.done)}/"
            f"{human_bytes(self.total)} {human_bytes(rate)}/s ETA {_clock(eta)}"
        )

    def _draw(self) -> None:
        columns = shutil.get_terminal_size((80, 24)).columns
        sys.stderr.write("\r" + self.line()[: columns - 1].ljust(columns - 1))
        sys.stderr.flush()
        bar_drawn(True)

    def finish(self) -> None:
        if self.enabled:
            self._draw()
            sys.stderr.write("\n")
            sys.stderr.flush()
            bar_drawn(False)

    def summary(self) -> str:
        moved = self.done - self._start_bytes
        return f"{human_bytes(moved)} in {self.elapsed:.1f} s, {human_bytes(self.rate)}/s"
