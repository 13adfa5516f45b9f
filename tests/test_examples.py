"""Every script in examples/ runs as a test, in a subprocess, as a user would run it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))


@pytest.mark.parametrize("script", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_runs(script: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_demo_command_runs() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "capsock", "demo"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""  # stdout carries only data; the demo only talks on stderr
    for expected in ["PeerAuthenticationError", "CapabilityRejected", "<redacted>", "own id"]:
        assert expected in result.stderr
