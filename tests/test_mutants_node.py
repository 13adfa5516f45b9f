"""Tests that kill the mutants of scripts/mutation node (docs/testing.md)."""

from __future__ import annotations
