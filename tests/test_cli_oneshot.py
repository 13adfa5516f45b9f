"""Issue 18, CLI friction 1, 2 and 9: a one-shot is not burned by simple mistakes,
a sturdy ``send --name`` keeps one URI until the item is complete, and a
listening command says it waits for a relay and gives up after ``--timeout``.

The real ``capsock`` in subprocesses, on loopback.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from capsock.cli import Exit
from tests.test_cli import (  # noqa: F401  (big_file is a fixture)
    Cli,
    MiB,
    big_file,
    free_port,
    offline_capability,
    one_line_error,
    read_stderr_until,
    sha256_file,
)

DATA = os.urandom(300_000)


def _send(cli: Cli, tmp_path: Path, *args: str | Path) -> tuple[subprocess.Popen[bytes], str]:
    proc = cli.start("send", *args, "--uri-file", "send.uri")
    uri = cli.wait_file(tmp_path / "send.uri", proc)
    return proc, uri


def _listen(cli: Cli, tmp_path: Path, data: bytes) -> subprocess.Popen[bytes]:
    """`capsock listen --once` that sends ``data`` to whoever connects."""
    (tmp_path / "in.bin").write_bytes(data)
    with (tmp_path / "in.bin").open("rb") as stdin:
        listen = cli.start("listen", "--once", "--uri-file", "l.uri", stdin=stdin)
    cli.wait_file(tmp_path / "l.uri", listen)
    return listen


# ------------------------------------------------------------------ 1. simple mistakes


def test_a_receive_into_a_folder_that_has_the_file_keeps_the_one_shot(
    cli: Cli, tmp_path: Path
) -> None:
    (tmp_path / "doc.bin").write_bytes(DATA)
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "doc.bin").write_bytes(b"mine")
    send, _ = _send(cli, tmp_path, "doc.bin")
    first = cli.run("receive", "@send.uri", "-o", dest)
    assert first.returncode == Exit.ERROR
    line = one_line_error(first.stderr)
    assert "exists" in line and "not used" in line and "receive again" in line
    assert (dest / "doc.bin").read_bytes() == b"mine"
    second = cli.run("receive", "@send.uri", "-o", dest / "copy.bin")  # the same URI
    assert second.returncode == 0, second.stderr.decode()
    assert (dest / "copy.bin").read_bytes() == DATA
    _, err = send.communicate(timeout=30)
    assert send.returncode == 0, err.decode()
    assert "not counted" in err.decode()


def test_a_directory_to_stdout_keeps_the_one_shot(cli: Cli, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "f.txt").write_bytes(b"in the tree")
    send, _ = _send(cli, tmp_path, tree)
    first = cli.run("receive", "@send.uri", "-o", "-")
    assert first.returncode == Exit.ERROR and first.stdout == b""
    line = one_line_error(first.stderr)
    assert "-o DIR" in line and "not used" in line
    dest = tmp_path / "dest"
    dest.mkdir()
    second = cli.run("receive", "@send.uri", "-o", dest)
    assert second.returncode == 0, second.stderr.decode()
    assert (dest / "tree" / "f.txt").read_bytes() == b"in the tree"
    assert send.wait(timeout=30) == 0


def test_connect_on_a_send_uri_prints_no_msgpack_and_keeps_the_one_shot(
    cli: Cli, tmp_path: Path
) -> None:
    (tmp_path / "doc.bin").write_bytes(DATA)
    send, _ = _send(cli, tmp_path, "doc.bin")
    wrong = cli.run("connect", "@send.uri")
    assert wrong.returncode == Exit.USAGE
    assert wrong.stdout == b""  # the offer is not dumped to the terminal
    assert "capsock receive" in one_line_error(wrong.stderr)
    right = cli.run("receive", "@send.uri", "-o", "got.bin")
    assert right.returncode == 0, right.stderr.decode()
    assert (tmp_path / "got.bin").read_bytes() == DATA
    assert send.wait(timeout=30) == 0


def test_connect_still_pipes_a_listen_stream(cli: Cli, tmp_path: Path) -> None:
    """The offer check reads ahead only what an offer could be, then passes it all on."""
    listen = _listen(cli, tmp_path, b"\0\0\0\x05not an offer, just bytes")  # a length prefix
    got = cli.run("connect", "@l.uri")
    assert got.returncode == 0, got.stderr.decode()
    assert got.stdout == b"\0\0\0\x05not an offer, just bytes"
    listen.communicate(timeout=30)


def test_receive_on_a_listen_uri_says_what_to_do(cli: Cli, tmp_path: Path) -> None:
    listen = _listen(cli, tmp_path, b"hello\n")
    result = cli.run("receive", "@l.uri")
    assert result.returncode == Exit.ERROR
    line = one_line_error(result.stderr)
    assert "not a `capsock send` capability" in line and "capsock connect" in line
    listen.communicate(timeout=30)


# ------------------------------------------------------------------ 2. the same URI until complete


def test_send_name_keeps_the_uri_until_the_file_is_complete(
    cli: Cli,
    tmp_path: Path,
    big_file: tuple[Path, str],  # noqa: F811
) -> None:
    path, digest = big_file
    port = free_port()
    part = tmp_path / "big.bin.capsock-part"
    args = ("--name", "big", "--state-dir", "st", "--listen", f"tcp:127.0.0.1:{port}")
    send, uri = _send(cli, tmp_path, path, *args)
    receiver = cli.start("receive", "@send.uri")
    while not (part.exists() and part.stat().st_size >= 8 * MiB):
        assert receiver.poll() is None, "the transfer ended before it could be interrupted"
        time.sleep(0.002)
    receiver.kill()
    receiver.communicate(timeout=20)
    time.sleep(0.5)
    assert send.poll() is None  # still offering, same URI
    # A restart of send keeps the URI too (the sturdy name, the same address).
    cli.stop(send, signal.SIGTERM)
    (tmp_path / "send.uri").unlink()
    send, again = _send(cli, tmp_path, path, *args)
    assert again == uri
    result = cli.run("receive", "@send.uri")
    assert result.returncode == 0, result.stderr.decode()
    assert "resuming big.bin" in result.stderr.decode()
    assert sha256_file(tmp_path / "big.bin") == digest
    _, err = send.communicate(timeout=30)
    assert send.returncode == 0, err.decode()
    assert "complete and revoked" in err.decode()
    (tmp_path / "send.uri").unlink()
    late = cli.run("receive", f"{uri}", "-o", "late.bin")
    assert late.returncode in (Exit.REFUSED, Exit.UNREACHABLE)  # it was one-shot
    send, fresh = _send(cli, tmp_path, path, *args)
    assert fresh != uri  # complete: the name's old capability was revoked
    cli.stop(send)


# ------------------------------------------------------------------ 9. a relay that is down


def test_send_says_it_waits_for_a_relay_and_gives_up_after_timeout(
    cli: Cli, tmp_path: Path
) -> None:
    (tmp_path / "f.txt").write_bytes(b"x")
    dead = str(offline_capability())
    started = time.monotonic()
    result = cli.run("send", "f.txt", "--relay", dead, "--timeout", "2")
    assert result.returncode == Exit.UNREACHABLE, result.stderr.decode()
    err = result.stderr.decode()
    assert "waiting for relay" in err and "--timeout" in err
    assert "not reachable within 2 s" in err.splitlines()[-1]
    assert "capsock://" not in err  # no capability was handed out
    assert time.monotonic() - started < 50  # generous: it gave up, it did not hang


def test_listen_says_at_once_that_it_waits_for_a_relay(cli: Cli, tmp_path: Path) -> None:
    listen = cli.start("listen", "--relay", str(offline_capability()))
    line = read_stderr_until(listen, r"capsock: (waiting for relay \S+ .*)", timeout=10)
    assert "Ctrl-C" in line and "--timeout" in line
    cli.stop(listen)
