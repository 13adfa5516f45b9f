"""`capsock forward --listen unix:PATH`: a tunnel only its user can enter.

A loopback TCP port is open to every local user and process; a unix socket
with mode 0600 is not.  End to end: a local TCP echo service behind
`capsock share`, reached through `capsock forward` on a unix socket.
"""

from __future__ import annotations

import os
import signal
import socket
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.send_peer import snapshot
from tests.test_cli import Cli, EchoServer, read_stderr_until


@pytest.fixture
def shared(cli: Cli, tmp_path: Path) -> Iterator[Path]:
    """A running `capsock share` of a TCP echo service; the path of its URI file."""
    echo = EchoServer()
    share = cli.start("share", f"tcp:127.0.0.1:{echo.port}", "--uri-file", "share.uri")
    cli.wait_file(tmp_path / "share.uri", share)
    try:
        yield tmp_path / "share.uri"
    finally:
        cli.stop(share)
        echo.close()


def _echo_over_unix(path: Path, payload: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect(str(path))
        sender = threading.Thread(target=lambda: (s.sendall(payload), s.shutdown(socket.SHUT_WR)))
        sender.start()
        got = bytearray()
        while data := s.recv(65536):
            got += data
        sender.join()
    return bytes(got)


def test_forward_on_a_unix_socket_end_to_end(cli: Cli, tmp_path: Path, shared: Path) -> None:
    path = tmp_path / "tunnel.sock"
    old = os.umask(0)  # the socket is 0600 whatever the umask
    try:
        forward = cli.start("forward", f"@{shared}", "--listen", f"unix:{path}")
    finally:
        os.umask(old)
    read_stderr_until(forward, r"forwarding (unix:\S+)")
    st = path.lstat()
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    for size in (0, 1, 3 << 20):
        payload = os.urandom(size)
        assert _echo_over_unix(path, payload) == payload
    out, _ = cli.stop(forward, signal.SIGTERM)
    assert out == b""
    assert not path.exists()  # cleaned up on exit


def test_a_stale_socket_is_replaced(cli: Cli, tmp_path: Path, shared: Path) -> None:
    path = tmp_path / "tunnel.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # the file stays; nobody accepts on it
    forward = cli.start("forward", f"@{shared}", "--listen", f"unix:{path}")
    read_stderr_until(forward, r"forwarding (unix:\S+)")
    assert _echo_over_unix(path, b"hello") == b"hello"
    cli.stop(forward)
    assert not path.exists()


@pytest.mark.parametrize("kind", ["file", "link", "directory", "live socket"])
def test_anything_but_a_stale_socket_is_not_replaced(
    cli: Cli, tmp_path: Path, shared: Path, kind: str
) -> None:
    path = tmp_path / "tunnel.sock"
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious")
    live = None
    if kind == "file":
        path.write_bytes(b"not a socket")
    elif kind == "link":
        path.symlink_to(victim)
    elif kind == "directory":
        path.mkdir()
    else:
        live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        live.bind(str(path))
        live.listen(1)
    before = snapshot(path)
    victim_before = snapshot(victim)
    try:
        result = cli.run("forward", f"@{shared}", "--listen", f"unix:{path}")
    finally:
        if live is not None:
            live.close()
    assert result.returncode == 1, result.stderr
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("capsock: error: cannot listen on unix:")
    assert snapshot(path) == before
    assert snapshot(victim) == victim_before


def test_a_tcp_forward_says_who_can_use_it(cli: Cli, tmp_path: Path, shared: Path) -> None:
    forward = cli.start("forward", f"@{shared}")
    line = read_stderr_until(forward, r"(forwarding tcp:127\.0\.0\.1:\d+.*)")
    assert "every local user" in line and "unix:" in line
    cli.stop(forward)
