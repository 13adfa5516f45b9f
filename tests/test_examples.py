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
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
BACKENDS = ("asyncio", "trio")

ASYNCIO_ONLY = {
    "rpc_calculator": "Cap'n Proto RPC: pycapnp runs on asyncio only",
    "asyncio_echo": "capsock.aio bridges asyncio streams: on trio it says so and exits",
    "tutorial_server": "without arguments it prints its usage and exits (no event loop)",
    "tutorial_client": "without arguments it prints its usage and exits (no event loop)",
}
DRIVEN = {"hello", "tutorial_pair"}
STDERR_ONLY = {"intro", "ftp", "matchmaking", "no_listener"}
"""Examples whose stdout must stay empty (they talk on stderr)."""

EXPECTED: dict[str, tuple[str, list[str | re.Pattern[str]]]] = {
    "ftp": (
        "stderr",
        [
            "has a control stream to the server",
            "got readme.txt (39 bytes, sha256 checked)",
            "got random.bin (3145728 bytes, sha256 checked)",
            "reusing the data capability is refused",
            "another node holding the data capability is refused",
            "the client still got its file",
            "error on the control stream: no such file: 'missing.txt'",
        ],
    ),
    "asyncio_echo": ("stdout", [re.compile(r"hello [a-z2-7]{12}"), "CAPABILITIES NOT PORTS"]),
    "hello": ("stdout", ["b'hello'"]),
    "http_app": (
        "stdout",
        [
            "alice: 20 concurrent requests answered, counter 20",
            "bob: counter 1, client address None",
        ],
    ),
    "intro": (
        "stderr",
        [
            "R received an introduction: capsock://",
            "R -> E over tcp=127.0.0.1:",
            "I has left (its node is closed)",
            "R -> E still works after I left",
            "a stranger holding the same URI is refused",
        ],
    ),
    "matchmaking": (
        "stderr",
        [
            # who joins first, and so hosts, is up to the scheduler
            re.compile(r"lobby: (alice|bob) joined"),
            re.compile(r"lobby: (alice|bob) joined"),
            re.compile(r"lobby: paired (alice|bob) \(host\) with (alice|bob); leaving"),
            "lobby: closed",
            re.compile(r"sent e4, got '(alice|bob) answers e4 with e5'"),
            re.compile(r"(alice and bob|bob and alice) played after the lobby had closed"),
        ],
    ),
    "no_listener": (
        "stderr",
        [
            "carries no route hints and there is no open session to that node",
            "I forwards ciphertext it cannot read",
            "I left: the forwarded stream failed with ConnectionLost",
        ],
    ),
    "rpc_calculator": (
        "stdout",
        [
            "123 -> 123.0",
            "(2 * 3) + 4 -> 10.0",
            "1048576 bytes of Data round-tripped",
            "minted through Cap'n Proto: capsock://",
            "echo: over a socket handed out by Cap'n Proto",
            "done",
        ],
    ),
    "rpc_kv_watch": (
        "stdout",
        [
            "watch: {'key': 'color', 'value': 'red'}",
            "subscriber: color = 'green' (version 2)",
            "subscriber: color = 'blue' (version 3)",
            "watch: {'key': 'color', 'value': None, 'version': 4}",
            "opening the watch a second time: refused, as it should be",
            "done",
        ],
    ),
    "tutorial_client": ("stderr", ["Tutorial, part 2", "python examples/tutorial_client.py"]),
    "tutorial_server": ("stderr", ["Tutorial, part 1", "python examples/tutorial_server.py"]),
    "tutorial_pair": ("stdout", ["hello, capsock", "first use", "second use refused: node"]),
}
"""What each example must print (substrings, in order, on that stream): an
example that exits 0 without doing its job fails."""

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
    assert script.stem in EXPECTED, f"say in EXPECTED what examples/{script.name} prints"
    stream, lines = EXPECTED[script.stem]
    text = result.stdout if stream == "stdout" else result.stderr
    position = 0
    for line in lines:
        match = (line if isinstance(line, re.Pattern) else re.compile(re.escape(line))).search(
            text, position
        )
        assert match, f"{line!r} missing or out of order in {script.name} {stream}:\n{text}"
        position = match.end()
    assert "Traceback" not in result.stderr, result.stderr


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
