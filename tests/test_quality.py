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
    "errors", "keys", "config", "_logs", "uri", "uri._caveats", "uri._hints", "uri._token",
    "uri._compact", "core", "core.frames", "core.handshake", "core.mux", "core.noise",
    "core.records", "core._noise_crypto", "core._noise_handshake", "core._noise_transport",
    "core.direct", "core._session_engine", "core._path_switch", "core._path_auth",
]  # fmt: skip
"""The sans-IO core, as module names under ``capsock``."""
FORBIDDEN = {"anyio", "trio", "asyncio", "socket", "selectors", "sniffio"}


def _path(module: str) -> Path:
    base = PKG.joinpath(*module.split("."))
    return base / "__init__.py" if base.is_dir() else base.with_suffix(".py")


def _imports(module: str) -> tuple[set[str], set[str]]:
    """(third-party/stdlib top-level names, capsock modules) imported by a module."""
    path = _path(module)
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    tree = ast.parse(path.read_text())
    external: set[str] = set()
    siblings: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            external.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level > 0:
                base = package[: len(package) - (node.level - 1)]
                target = [*base, *(node.module.split(".") if node.module else [])]
                for alias in node.names:
                    sub = [*target, alias.name]
                    as_module = PKG.joinpath(*sub)
                    is_module = as_module.is_dir() or as_module.with_suffix(".py").exists()
                    siblings.add(".".join(sub if is_module else target))
            elif node.module:
                external.add(node.module.split(".")[0])
    return external, {s for s in siblings if s}


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
