"""Tests that kill surviving mutants of mux.py (scripts/mutation mux; docs/testing.md).

Each test names, in its docstring, the mutants it was written against.  The
mux is sans-IO, so these drive two engines against each other in memory.
"""

from __future__ import annotations
