"""Project-wide checks: the sans-IO core stays free of I/O, and the code is typed and linted."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "src" / "capsock"
SANS_IO = [
    "errors", "frames", "handshake", "keys", "mux", "noise", "uri",
    "records", "config", "_noise_crypto", "_noise_handshake", "_noise_transport",
    "_uri_caveats", "_uri_hints", "_uri_token", "direct", "_logs", "_session_engine",
    "_path_switch", "_path_auth",
]  # fmt: skip
FORBIDDEN = {"anyio", "trio", "asyncio", "socket", "selectors", "sniffio"}


def _imports(module: str) -> tuple[set[str], set[str]]:
    """(third-party/stdlib top-level names, sibling capsock modules) imported by a module."""
    tree = ast.parse((PKG / f"{module}.py").read_text())
    external: set[str] = set()
    siblings: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            external.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level > 0:
                if node.module:
                    siblings.add(node.module.split(".")[0])
                else:
                    siblings.update(alias.name for alias in node.names)
            elif node.module:
                external.add(node.module.split(".")[0])
    return external, siblings


@pytest.mark.parametrize("module", SANS_IO)
def test_sans_io_modules_never_import_io(module: str) -> None:
    seen: set[str] = set()
    todo = [module]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        external, siblings = _imports(current)
        bad = external & FORBIDDEN
        assert not bad, f"{current} (reached from {module}) imports {bad}"
        todo.extend(siblings)
    assert seen <= set(SANS_IO), f"{module} pulls in non-core modules: {seen - set(SANS_IO)}"


def _tool(name: str) -> str:
    exe = Path(sys.executable).parent / name
    if exe.exists():
        return str(exe)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed; install the test extra: pip install -e '.[test]'")
    return found


def test_mypy_strict_is_clean() -> None:
    result = subprocess.run(
        [_tool("mypy"), "--strict", "src"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_is_clean() -> None:
    result = subprocess.run(
        [_tool("ruff"), "check", "src", "tests", "examples", "bench"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
