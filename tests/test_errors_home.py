"""Every capsock error class has one home (capsock.errors), with its wire code on it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import capsock.errors as errors
from capsock.errors import (
    CapabilityRejected,
    CapsockError,
    ConnectionLost,
    ErrorCode,
    HandshakeDecryptError,
    HandshakeError,
    ProtocolError,
    ResourceLimitExceeded,
    StreamReset,
)

SRC = Path(__file__).resolve().parents[1] / "src" / "capsock"

ELSEWHERE = {
    "net/stream.py": "StreamResetError/ConnectionLostError also derive from anyio's stream "
    "errors, and errors.py must stay free of anyio (the sans-IO core imports it)",
    "node/_direct.py": "_Stay is private control flow inside a punch round, never raised out of it",
    "http/_server.py": "ClientDisconnected is an OSError for ASGI servers, not a capsock error",
}
"""Modules of the package (rpc and cli excepted: layers of their own with their
own error modules) that may still define an exception class, by path under src/capsock."""

MODULES = sorted(p for p in SRC.rglob("*.py") if p.relative_to(SRC).parts[0] not in ("rpc", "cli"))


def _exception_classes(path: Path) -> list[str]:
    tree = ast.parse(path.read_text("utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            bases = {ast.unparse(b).rpartition(".")[2] for b in node.bases}
            if any(b.endswith(("Error", "Exception", "Reset", "Lost", "Rejected")) for b in bases):
                found.append(node.name)
                continue
            if bases & {"Unreachable", "InvalidCapability", "CapabilityRejected", "OSError"}:
                found.append(node.name)
    return found


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.relative_to(SRC).as_posix())
def test_error_classes_live_in_errors_py(path: Path) -> None:
    name = path.relative_to(SRC).as_posix()
    if name in ("errors.py", *ELSEWHERE):
        return
    assert _exception_classes(path) == [], f"{name}: move these to errors.py"


def test_the_scan_finds_error_classes() -> None:
    assert "HandshakeDecryptError" in _exception_classes(SRC / "errors.py")
    assert _exception_classes(SRC / "net" / "stream.py")  # the listed exception is real


def test_noise_reexports_the_handshake_decrypt_error() -> None:
    import capsock.core.noise

    assert capsock.core.noise.HandshakeDecryptError is HandshakeDecryptError
    assert issubclass(HandshakeDecryptError, HandshakeError)


@pytest.mark.parametrize(
    ("cls", "code"),
    [
        (ProtocolError, ErrorCode.PROTOCOL_ERROR),
        (HandshakeError, ErrorCode.PROTOCOL_ERROR),
        (HandshakeDecryptError, ErrorCode.PROTOCOL_ERROR),
        (ResourceLimitExceeded, ErrorCode.LIMIT_EXCEEDED),
        (CapabilityRejected, ErrorCode.REFUSED),
        (StreamReset, ErrorCode.INTERNAL_ERROR),
        (ConnectionLost, ErrorCode.INTERNAL_ERROR),
    ],
)
def test_wire_codes_live_on_the_classes(cls: type[CapsockError], code: ErrorCode) -> None:
    assert cls.wire_code is code
    assert cls("x").code is code  # type: ignore[attr-defined]


def test_an_explicit_code_wins_over_the_class_default() -> None:
    assert ProtocolError("x", ErrorCode.FLOW_CONTROL_ERROR).code is ErrorCode.FLOW_CONTROL_ERROR
    assert CapabilityRejected("x", ErrorCode.BUSY).code is ErrorCode.BUSY
    assert StreamReset("x", ErrorCode.CANCELLED).code is ErrorCode.CANCELLED
    assert CapsockError.wire_code is None and errors.LocalUsageError.wire_code is None
