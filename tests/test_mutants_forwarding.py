"""Tests that kill the mutants of scripts/mutation forwarding (docs/testing.md)."""

from __future__ import annotations
