"""`capsock receive` checks every field a sender sends before it acts on it.

A hand-made sender (``send_peer``) offers one bad field at a time: the offer
is declined with a reason (no local path in it), the receive fails with one
clear error line (exit code 1, never "internal error"), and nothing is left
in the receive directory.  Bad fields inside a directory transfer's ENTRY
messages end the transfer the same way, the partial directory removed.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import pytest

from tests.send_peer import DELETE, dir_sender, error_line, file_sender, receive_from
from tests.test_cli import Cli

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    """The receiver is a subprocess; the hand-made sender's backend does not matter here."""
    return "asyncio"


DATA = b"z" * 5000

BAD_FILE_OFFERS: list[tuple[str, Any]] = [
    ("mtime", math.nan),
    ("mtime", math.inf),
    ("mtime", -math.inf),
    ("mtime", 1e300),
    ("mtime", -1),
    ("mtime", 2**40),
    ("mtime", "yesterday"),
    ("mtime", True),
    ("mtime", [1]),
    ("mtime", DELETE),
    ("size", -1),
    ("size", 2**63),
    ("size", "5000"),
    ("size", 5000.0),
    ("size", True),
    ("size", DELETE),
    ("mode", -1),
    ("mode", 0o10000),
    ("mode", "644"),
    ("mode", 420.0),
    ("mode", DELETE),
    ("name", ".."),
    ("name", "."),
    ("name", ""),
    ("name", "/etc/passwd"),
    ("name", "../escape"),
    ("name", "a/b"),
    ("name", "a\x00b"),
    ("name", "é" * 200),  # 400 bytes
    ("name", 5),
    ("name", b"x.bin"),
    ("name", DELETE),
    ("kind", "symlink"),
    ("kind", 1),
    ("kind", DELETE),
]


def _ids(cases: list[tuple[str, Any]]) -> list[str]:
    return [f"{k}={'missing' if v is DELETE else repr(v)[:20]}" for k, v in cases]


def _nothing_left(directory: Path, allowed: set[str]) -> None:
    assert {p.name for p in directory.iterdir()} <= allowed


def _no_local_path(text: object, tmp_path: Path) -> None:
    assert str(tmp_path) not in str(text)
    assert str(Path.cwd()) not in str(text)


@pytest.mark.parametrize(("key", "value"), BAD_FILE_OFFERS, ids=_ids(BAD_FILE_OFFERS))
async def test_a_bad_offer_field_is_declined_before_anything_is_written(
    tmp_path: Path, key: str, value: Any
) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    result, answer = await receive_from(
        file_sender(DATA, overrides={key: value}), tmp_path, cwd=dest
    )
    assert result.returncode == 1, result.stderr
    line = error_line(result.stderr)
    assert any(word in line for word in ("malformed", "unsafe", "unknown kind")), line
    assert "declined" in line
    assert isinstance(answer, dict) and isinstance(answer.get("decline"), str), answer
    _no_local_path(answer["decline"], tmp_path)
    _nothing_left(dest, set())
    assert not (tmp_path / "escape").exists()


BAD_DIR_OFFERS: list[tuple[str, Any]] = [
    ("entries", -1),
    ("entries", 2**40),
    ("entries", "1"),
    ("entries", 1.0),
    ("entries", DELETE),
    ("mtime", math.nan),
    ("mode", "755"),
]


@pytest.mark.parametrize(("key", "value"), BAD_DIR_OFFERS, ids=_ids(BAD_DIR_OFFERS))
async def test_a_bad_directory_offer_is_declined(tmp_path: Path, key: str, value: Any) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    entries: list[tuple[dict[str, Any], bytes | None]] = [
        ({"path": "f", "type": "file", "mode": 0o644, "size": 1, "mtime": 1.0}, b"1")
    ]
    sender = dir_sender(entries, overrides={key: value})
    result, answer = await receive_from(sender, tmp_path, "-o", str(dest))
    assert result.returncode == 1, result.stderr
    assert "malformed" in error_line(result.stderr)
    assert isinstance(answer, dict) and isinstance(answer.get("decline"), str), answer
    _no_local_path(answer["decline"], tmp_path)
    _nothing_left(dest, set())


FILE_ENTRY = {"path": "f.txt", "type": "file", "mode": 0o644, "size": 3, "mtime": 1.0}
BAD_ENTRIES: list[tuple[str, Any]] = [
    ("mtime", math.nan),
    ("mtime", 1e300),
    ("mtime", -5),
    ("mtime", "now"),
    ("mtime", DELETE),
    ("size", -1),
    ("size", "3"),
    ("size", 2**62),
    ("size", DELETE),
    ("mode", "x"),
    ("mode", -1),
    ("mode", 0o10000),
    ("mode", DELETE),
    ("path", "../evil"),
    ("path", "/abs/evil"),
    ("path", "a//b"),
    ("path", "sub/"),
    ("path", "nul\x00"),
    ("path", ""),
    ("path", "x" * 5000),
    ("path", 7),
    ("path", DELETE),
    ("type", "symlink"),
    ("type", DELETE),
]


@pytest.mark.parametrize(("key", "value"), BAD_ENTRIES, ids=_ids(BAD_ENTRIES))
async def test_a_bad_entry_field_ends_the_transfer_and_removes_the_partial_directory(
    tmp_path: Path, key: str, value: Any
) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    header = dict(FILE_ENTRY)
    if value is DELETE:
        del header[key]
    else:
        header[key] = value
    entries: list[tuple[dict[str, Any], bytes | None]] = [
        ({"path": "ok.txt", "type": "file", "mode": 0o644, "size": 2, "mtime": 1.0}, b"ok"),
        (header, b"bad"),
    ]
    result, answer = await receive_from(dir_sender(entries), tmp_path, "-o", str(dest))
    assert result.returncode == 1, result.stderr
    line = error_line(result.stderr)
    assert any(w in line for w in ("malformed", "unsafe", "stopped")), line
    assert not isinstance(answer, dict) or answer.get("ok") is not True
    _nothing_left(dest, set())
    assert not (tmp_path / "evil").exists()


async def test_extreme_but_valid_values_are_accepted(tmp_path: Path) -> None:
    """The bounds themselves are fine: mtime 0 and 2**34, mode 0o7777 (masked), size 0."""
    dest = tmp_path / "dest"
    dest.mkdir()
    overrides = {"mtime": 2**34, "mode": 0o7777}
    result, answer = await receive_from(file_sender(DATA, overrides=overrides), tmp_path, cwd=dest)
    assert result.returncode == 0, result.stderr
    assert answer == {"ok": True}
    got = dest / "x.bin"
    assert got.read_bytes() == DATA
    assert 1.5e10 <= got.stat().st_mtime <= 2**34  # a file system may clamp it (ext4: 2446)
    assert got.stat().st_mode & 0o7000 == 0  # no setuid, setgid or sticky bit from a peer
    result, answer = await receive_from(
        file_sender(b"", name="empty", overrides={"mtime": 0}), tmp_path, cwd=dest
    )
    assert result.returncode == 0, result.stderr
    assert (dest / "empty").read_bytes() == b""


def test_send_clamps_its_own_odd_mtime(tmp_path: Path) -> None:
    """An honest sender never offers what receivers decline: a pre-1970 mtime becomes 0."""
    cli = Cli(tmp_path)
    try:
        source = tmp_path / "old.txt"
        source.write_bytes(b"from before 1970")
        os.utime(source, (-86400, -86400))
        dest = tmp_path / "dest"
        dest.mkdir()
        send = cli.start("send", source, "--uri-file", "send.uri")
        cli.wait_file(tmp_path / "send.uri", send)
        result = cli.run("receive", f"@{tmp_path / 'send.uri'}", cwd=dest)
        assert result.returncode == 0, result.stderr
        assert (dest / "old.txt").stat().st_mtime == 0
        send.communicate(timeout=30)
        assert send.returncode == 0
    finally:
        cli.cleanup()
