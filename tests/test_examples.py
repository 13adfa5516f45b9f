"""Every script in examples/ runs as a test, in a subprocess, as a user would run it.

Each example runs on asyncio and on trio.  The backend is passed in the
``CAPSOCK_BACKEND`` environment variable, which the examples read
(``anyio.run(main, backend=os.environ.get("CAPSOCK_BACKEND", "asyncio"))``).
Two lists say where that does not hold:

- ``ASYNCIO_ONLY``: examples that cannot run on trio (with the reason).
- ``DRIVEN``: older examples that call ``anyio.run(main)`` (always asyncio).
  On trio the test runs their ``main()`` itself, through a three-line driver,
  instead of their ``__main__`` block.

Any other example must honour ``CAPSOCK_BACKEND``; a test checks that, so a new
example cannot silently run on asyncio under a "trio" test id.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
BACKENDS = ("asyncio", "trio")

ASYNCIO_ONLY = {
    "rpc_calculator": "Cap'n Proto RPC: pycapnp runs on asyncio only",
    "tutorial_server": "without arguments it prints its usage and exits (no event loop)",
    "tutorial_client": "without arguments it prints its usage and exits (no event loop)",
}
DRIVEN = {"hello", "tutorial_pair"}
STDERR_ONLY = {"intro", "ftp", "matchmaking", "no_listener"}
"""Examples whose stdout must stay empty (they talk on stderr)."""

# Runs the example's main() on $CAPSOCK_BACKEND, skipping its __main__ block;
# the example's directory goes first on sys.path, as when running the script.
DRIVER = (
    "import os, runpy, sys, anyio; "
    "sys.path.insert(0, os.path.dirname(sys.argv[1])); "
    "main = runpy.run_path(sys.argv[1], run_name='capsock_example')['main']; "
    "anyio.run(main, backend=os.environ['CAPSOCK_BACKEND'])"
)

CASES = [
    pytest.param(script, backend, id=f"{script.stem}-{backend}")
    for script in EXAMPLES
    for backend in BACKENDS
    if backend == "asyncio" or script.stem not in ASYNCIO_ONLY
]


@pytest.mark.parametrize(("script", "backend"), CASES)
def test_example_runs(script: Path, backend: str) -> None:
    if backend != "asyncio" and script.stem in DRIVEN:
        command = [sys.executable, "-c", DRIVER, str(script)]
    else:
        command = [sys.executable, str(script)]
    env = {**os.environ, "CAPSOCK_BACKEND": backend}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    if script.stem in STDERR_ONLY:
        assert result.stdout == "", "this example talks on stderr only"


@pytest.mark.parametrize("script", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_honours_the_backend_variable(script: Path) -> None:
    if script.stem in ASYNCIO_ONLY or script.stem in DRIVEN:
        return
    assert "CAPSOCK_BACKEND" in script.read_text("utf-8"), (
        f"examples/{script.name} ignores CAPSOCK_BACKEND, so its trio test would run "
        "asyncio: end it with anyio.run(main, backend=os.environ.get('CAPSOCK_BACKEND', "
        "'asyncio')), or list it in ASYNCIO_ONLY (with the reason) or DRIVEN in "
        "tests/test_examples.py"
    )


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
