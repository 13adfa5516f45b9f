"""Tests that kill the mutants of scripts/mutation config (docs/testing.md)."""

from __future__ import annotations
