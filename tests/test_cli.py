"""The `capsock` command, driven as a user drives it: real subprocesses on loopback.

Every command runs as `python -m capsock ...` with XDG_STATE_HOME pointing into
tmp_path (never the real home).  Checked throughout: exit codes, stdout carries
only data (it is empty for commands that only talk), errors are one line.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pty
import random
import re
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import IO, Any

import anyio
import pytest

import capsock
from capsock.keys import KeyPair
from capsock.messages import receive_message, send_message
from capsock.uri import Capability, Expires, TcpHint, ViaHint, mint_root

MiB = 1 << 20
PIPE = subprocess.PIPE
DEVNULL = subprocess.DEVNULL
GENERATOR = (
    "import random, sys\n"
    "r = random.Random(int(sys.argv[1]))\n"
    "for _ in range(int(sys.argv[2])):\n"
    "    sys.stdout.buffer.write(r.randbytes(1 << 20))\n"
)


def generated_sha256(seed: int, mib: int) -> str:
    r = random.Random(seed)
    h = hashlib.sha256()
    for _ in range(mib):
        h.update(r.randbytes(MiB))
    return h.hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(MiB):
            h.update(chunk)
    return h.hexdigest()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def one_line_error(stderr: bytes | str) -> str:
    text = stderr.decode() if isinstance(stderr, bytes) else stderr
    lines = text.strip().splitlines()
    assert len(lines) == 1, f"expected one error line, got {lines!r}"
    assert lines[0].startswith("capsock: error: "), lines[0]
    return lines[0]


class Cli:
    """Runs `python -m capsock` in ``tmp_path`` with a private state home."""

    def __init__(self, tmp_path: Path) -> None:
        self.cwd = tmp_path
        self.env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "xdg")}
        self.procs: list[subprocess.Popen[bytes]] = []

    def argv(self, args: tuple[str | Path, ...]) -> list[str]:
        return [sys.executable, "-m", "capsock", *map(str, args)]

    def run(
        self, *args: str | Path, input: bytes | None = None, cwd: Path | None = None, **kw: Any
    ) -> subprocess.CompletedProcess[bytes]:
        if input is None and "stdin" not in kw:
            kw["stdin"] = DEVNULL
        return subprocess.run(
            self.argv(args), cwd=cwd or self.cwd, env=self.env, capture_output=True,
            input=input, timeout=60, **kw,
        )  # fmt: skip

    def start(
        self,
        *args: str | Path,
        stdin: int | IO[bytes] = DEVNULL,
        stdout: int | IO[bytes] = PIPE,
        stderr: int | IO[bytes] = PIPE,
    ) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            self.argv(args), cwd=self.cwd, env=self.env, stdin=stdin, stdout=stdout, stderr=stderr
        )
        self.procs.append(proc)
        return proc

    def wait_file(self, path: Path, proc: subprocess.Popen[bytes], timeout: float = 20) -> str:
        """The content of ``path`` once ``proc`` wrote it (capability files are atomic)."""
        deadline = time.monotonic() + timeout
        while not path.exists():
            if proc.poll() is not None:
                err = proc.stderr.read().decode() if proc.stderr else ""
                pytest.fail(f"the process exited ({proc.returncode}) before writing {path}: {err}")
            assert time.monotonic() < deadline, f"{path} did not appear"
            time.sleep(0.02)
        return path.read_text().strip()

    def stop(self, proc: subprocess.Popen[bytes], sig: int = signal.SIGINT) -> tuple[bytes, bytes]:
        """Ctrl-C (exit code 130) or SIGTERM (143): a clean stop either way."""
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=20)
        assert proc.returncode == (143 if sig == signal.SIGTERM else 130), err.decode()
        return out, err

    def cleanup(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.communicate(timeout=20)


@pytest.fixture(scope="module")
def big_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """200 MiB of random bytes and their SHA-256."""
    path = tmp_path_factory.mktemp("big") / "big.bin"
    h = hashlib.sha256()
    with path.open("wb") as f:
        for _ in range(200):
            block = os.urandom(MiB)
            h.update(block)
            f.write(block)
    return path, h.hexdigest()


def read_stderr_until(proc: subprocess.Popen[bytes], pattern: str, timeout: float = 20) -> str:
    """Read ``proc``'s stderr line by line until one matches; return the match's group 1."""
    assert proc.stderr is not None
    fd = proc.stderr.fileno()
    seen = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.1)
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            seen += chunk
            match = re.search(pattern.encode(), seen)
            if match:
                return match.group(1).decode()
    pytest.fail(f"no {pattern!r} on stderr: {seen.decode()!r}")


def offline_capability(port: int | None = None, *, via: bool = False) -> Capability:
    """A well-formed capability of a node that is not running."""
    node = KeyPair.generate().node_id
    hints: list[TcpHint | ViaHint] = [TcpHint("127.0.0.1", port or free_port())]
    if via:
        relay = Capability(KeyPair.generate().node_id, mint_root(os.urandom(32), os.urandom(16)))
        hints.append(ViaHint(relay.with_hints([TcpHint("127.0.0.1", 4000)])))
    return Capability(node, mint_root(os.urandom(32), os.urandom(16)), tuple(hints))


def token_text(uri: str) -> str:
    return uri.split("/")[3].split("?")[0]


# ------------------------------------------------------------------ listen / connect


def test_listen_connect_pipe_100_mib_with_eof_both_ways(cli: Cli, tmp_path: Path) -> None:
    back = os.urandom(3 * MiB)
    (tmp_path / "back").write_bytes(back)
    with (tmp_path / "back").open("rb") as stdin, (tmp_path / "got_l").open("wb") as stdout:
        listen = cli.start("listen", "--once", "--uri-file", "uri", stdin=stdin, stdout=stdout)
    cli.wait_file(tmp_path / "uri", listen)
    gen = subprocess.Popen([sys.executable, "-c", GENERATOR, "8", "100"], stdout=PIPE)
    assert gen.stdout is not None
    with (tmp_path / "got_c").open("wb") as stdout:
        connect = cli.start("connect", "@uri", stdin=gen.stdout, stdout=stdout)
    gen.stdout.close()
    _, err_c = connect.communicate(timeout=60)
    _, err_l = listen.communicate(timeout=60)
    assert gen.wait(timeout=10) == 0
    assert connect.returncode == 0, err_c.decode()
    assert listen.returncode == 0, err_l.decode()
    # stdout carries only data: any message there would break the hashes.
    assert sha256_file(tmp_path / "got_l") == generated_sha256(8, 100)
    assert (tmp_path / "got_c").read_bytes() == back
    assert "capsock://" in err_l.decode()  # the capability goes to stderr
    assert "error" not in err_c.decode() + err_l.decode()


def test_listen_serves_streams_one_after_another_until_used_up(cli: Cli, tmp_path: Path) -> None:
    listen = cli.start("listen", "--uses", "2", "--uri-file", "uri")
    cli.wait_file(tmp_path / "uri", listen)
    for word in (b"one ", b"two"):
        result = cli.run("connect", "@uri", input=word)
        assert result.returncode == 0, result.stderr.decode()
        assert result.stdout == b""  # the listener's stdin is empty: EOF at once
    out, err = listen.communicate(timeout=20)
    assert listen.returncode == 0, err.decode()
    assert out == b"one two"
    # The listener exited after its two uses (above): nothing listens there any more.
    late = cli.run("connect", "@uri", input=b"three")
    assert late.returncode == 5, late.stderr.decode()  # unreachable: the node is gone
    assert "still running" in one_line_error(late.stderr)
    assert late.stdout == b""


def test_a_sturdy_name_on_a_random_port_gets_a_warning(cli: Cli, tmp_path: Path) -> None:
    listen = cli.start("listen", "--name", "svc", "--uri-file", "uri")
    cli.wait_file(tmp_path / "uri", listen)
    _, err = cli.stop(listen)
    assert b"--listen HOST:PORT" in err
    port = free_port()
    fixed = cli.start("listen", "--name", "svc", "--listen", f"127.0.0.1:{port}")
    read_stderr_until(fixed, r"(capsock://\S+)")
    _, err = cli.stop(fixed)
    assert b"random port" not in err


def test_ctrl_c_in_the_middle_of_a_transfer_says_one_line(cli: Cli, tmp_path: Path) -> None:
    """Regression: the thread reading stdin ran a task in the event loop that
    Ctrl-C left behind, and asyncio's shutdown printed its traceback."""
    for _ in range(3):
        listen = cli.start("listen", "--once", "--uri-file", "uri", stdout=DEVNULL)
        cli.wait_file(tmp_path / "uri", listen)
        producer = subprocess.Popen(["yes"], stdout=PIPE)
        try:
            assert producer.stdout is not None
            connect = cli.start("connect", "@uri", stdin=producer.stdout, stdout=DEVNULL)
            read_stderr_until(listen, r"(stream from)")
            time.sleep(0.3)  # stdin keeps coming: the transfer is in full flow
            _, err = cli.stop(connect)
            assert err.decode().strip().splitlines() == ["capsock: interrupted"], err.decode()
        finally:
            producer.kill()
            producer.communicate()
        listen.communicate(timeout=20)
        (tmp_path / "uri").unlink()


def test_an_interrupted_connect_is_not_a_clean_end(cli: Cli, tmp_path: Path) -> None:
    listen = cli.start("listen", "--once", "--uri-file", "uri")
    cli.wait_file(tmp_path / "uri", listen)
    never_ends, writer = os.pipe()  # stdin that stays open: the connect waits for it
    try:
        connect = cli.start("connect", "@uri", stdin=never_ends)
        read_stderr_until(listen, r"(stream from)")
        cli.stop(connect)
    finally:
        os.close(never_ends)
        os.close(writer)
    out, err = listen.communicate(timeout=20)
    assert listen.returncode == 1
    assert "reset by the peer" in one_line_error(err.decode().splitlines()[-1])
    assert out == b""


def test_relay_connects_nodes_without_direct_hints(cli: Cli, tmp_path: Path) -> None:
    relay = cli.start("relay", "--listen", f"tcp:127.0.0.1:{free_port()}", "--state-dir", "relay")
    assert relay.stdout is not None
    relay_uri = relay.stdout.readline().decode().strip()
    assert relay_uri.startswith("capsock://")
    (tmp_path / "pong").write_bytes(b"pong")
    with (tmp_path / "pong").open("rb") as stdin:
        listen = cli.start(
            "listen", "--once", "--relay", relay_uri, "--uri-file", "uri", stdin=stdin
        )
    uri = cli.wait_file(tmp_path / "uri", listen)
    hints = json.loads(cli.run("inspect", "--json", uri).stdout)["hints"]
    assert [h["kind"] for h in hints] == ["via"]
    result = cli.run("connect", uri, input=b"ping")
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == b"pong"
    out, err = listen.communicate(timeout=20)
    assert (listen.returncode, out) == (0, b"ping"), err.decode()
    assert b"lost the relay" not in err  # its own exit is not a lost relay
    # A relay capability the relay refuses: retrying cannot help, so exit 4 at once.
    path, _, query = relay_uri.partition("?")
    flipped = path[:-5] + ("A" if path[-5] != "A" else "B") + path[-4:]
    started = time.monotonic()
    refused = cli.run("listen", "--once", "--relay", f"{flipped}?{query}")
    assert refused.returncode == 4, refused.stderr.decode()
    *warnings, error = refused.stderr.decode().strip().splitlines()
    assert "not retrying" in warnings[-1]  # the node's own log line, then the error
    assert error.startswith("capsock: error: the relay refused the capability")
    assert time.monotonic() - started < 10
    cli.stop(relay)


# ------------------------------------------------------------------ share / forward


class EchoServer:
    """A TCP echo server that half-closes after the client did."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    def _echo(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):  # a reset client: the tests check it
            while data := conn.recv(65536):
                conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.sock.close()


def _echo_through(port: int, payload: bytes, results: list[bool]) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        sender = threading.Thread(target=lambda: (s.sendall(payload), s.shutdown(socket.SHUT_WR)))
        sender.start()
        got = bytearray()
        while data := s.recv(65536):
            got += data
        sender.join()
    results.append(bytes(got) == payload)


def test_share_and_forward_splice_tcp_with_half_close(cli: Cli, tmp_path: Path) -> None:
    echo = EchoServer()
    try:
        share = cli.start("share", f"tcp:127.0.0.1:{echo.port}", "--uri-file", "uri")
        cli.wait_file(tmp_path / "uri", share)
        forward = cli.start("forward", "@uri", "--listen", "127.0.0.1:0")
        port = int(read_stderr_until(forward, r"forwarding tcp:127\.0\.0\.1:(\d+)"))
        results: list[bool] = []
        clients = [
            threading.Thread(target=_echo_through, args=(port, os.urandom(2 * MiB), results))
            for _ in range(3)
        ]
        for t in clients:
            t.start()
        for t in clients:
            t.join(timeout=60)
        assert results == [True, True, True]
        for proc, sig in ((forward, signal.SIGTERM), (share, signal.SIGINT)):
            out, _ = cli.stop(proc, sig)
            assert out == b""  # these commands only talk
    finally:
        echo.close()


def test_a_dead_service_resets_the_forwarded_connection(cli: Cli, tmp_path: Path) -> None:
    share = cli.start("share", f"tcp:127.0.0.1:{free_port()}", "--uri-file", "uri")
    cli.wait_file(tmp_path / "uri", share)
    forward = cli.start("forward", "@uri")
    port = int(read_stderr_until(forward, r"forwarding tcp:127\.0\.0\.1:(\d+)"))
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        with pytest.raises(ConnectionResetError):  # not a clean, empty answer
            s.recv(1)
    _, err = cli.stop(share)
    assert "cannot connect to tcp:127.0.0.1" in err.decode()
    cli.stop(forward)


def test_share_and_forward_a_real_http_server(cli: Cli, tmp_path: Path) -> None:
    www = tmp_path / "www"
    www.mkdir()
    page = os.urandom(MiB)
    (www / "file.bin").write_bytes(page)
    http_port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(http_port), "--bind", "127.0.0.1"],
        cwd=www, stdout=DEVNULL, stderr=DEVNULL,
    )  # fmt: skip
    cli.procs.append(server)
    share = cli.start("share", f"127.0.0.1:{http_port}", "--uri-file", "uri")
    cli.wait_file(tmp_path / "uri", share)
    forward = cli.start("forward", "@uri")
    port = int(read_stderr_until(forward, r"forwarding tcp:127\.0\.0\.1:(\d+)"))
    deadline = time.monotonic() + 20
    while True:  # the HTTP server may still be starting
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/file.bin", timeout=20) as r:
                assert r.read() == page
            break
        except OSError:
            assert time.monotonic() < deadline
            time.sleep(0.1)
    cli.stop(forward)
    cli.stop(share)


# ------------------------------------------------------------------ send / receive


def test_send_receive_200_mib_and_one_shot_refuses_a_second_receiver(
    cli: Cli, tmp_path: Path, big_file: tuple[Path, str]
) -> None:
    path, digest = big_file
    send = cli.start("send", path, "--uri-file", "uri")
    cli.wait_file(tmp_path / "uri", send)
    first = cli.start("receive", "@uri", "-o", "-")
    assert first.stdout is not None
    head = first.stdout.read(1)  # the first receiver holds the one use now; its pipe is full
    second = cli.run("receive", "@uri", "-o", "second.bin")
    assert second.returncode == 4, second.stderr.decode()
    line = one_line_error(second.stderr)
    assert "refused" in line and "once" in line
    assert second.stdout == b""
    h = hashlib.sha256(head)
    while chunk := first.stdout.read(MiB):
        h.update(chunk)
    assert first.wait(timeout=60) == 0
    assert h.hexdigest() == digest
    out, err = send.communicate(timeout=30)
    assert send.returncode == 0, err.decode()
    assert out == b""
    assert "verified" in err.decode()
    assert "\r" not in err.decode() and "ETA" not in err.decode()  # no bar without a tty
    gone = cli.run("receive", "@uri")
    assert gone.returncode == 5  # the sender exited after its single use
    assert "still running" in one_line_error(gone.stderr)


def test_receive_resumes_after_the_receiver_was_killed(
    cli: Cli, tmp_path: Path, big_file: tuple[Path, str]
) -> None:
    path, digest = big_file
    part = tmp_path / "big.bin.capsock-part"
    send = cli.start("send", path, "--uri-file", "uri")
    cli.wait_file(tmp_path / "uri", send)
    receiver = cli.start("receive", "@uri")
    while not (part.exists() and part.stat().st_size >= 8 * MiB):
        assert receiver.poll() is None, "the transfer ended before it could be interrupted"
        time.sleep(0.002)
    receiver.kill()
    receiver.communicate(timeout=20)
    _, err = send.communicate(timeout=30)
    assert send.returncode == 1  # its one transfer failed
    assert "receiver resumes" in one_line_error(err.decode().splitlines()[-1])
    kept = part.stat().st_size
    assert 0 < kept < 200 * MiB
    (tmp_path / "uri").unlink()
    send = cli.start("send", path, "--uri-file", "uri")
    cli.wait_file(tmp_path / "uri", send)
    result = cli.run("receive", "@uri")
    assert result.returncode == 0, result.stderr.decode()
    assert "resuming big.bin" in result.stderr.decode()
    assert sha256_file(tmp_path / "big.bin") == digest
    assert not part.exists()
    assert send.wait(timeout=30) == 0


def test_a_partial_file_of_another_file_starts_over(cli: Cli, tmp_path: Path) -> None:
    data = os.urandom(3 * MiB)
    (tmp_path / "doc.bin").write_bytes(data)
    out = tmp_path / "out"
    out.mkdir()
    (out / "doc.bin.capsock-part").write_bytes(os.urandom(MiB))
    send = cli.start("send", "doc.bin", "--uri-file", "uri")
    cli.wait_file(tmp_path / "uri", send)
    result = cli.run("receive", "@uri", "-o", out)
    assert result.returncode == 0, result.stderr.decode()
    assert "starting over" in result.stderr.decode()
    assert (out / "doc.bin").read_bytes() == data
    assert send.wait(timeout=30) == 0


def test_send_receive_a_directory(cli: Cli, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "a" / "b").mkdir(parents=True)
    (tree / "empty").mkdir()
    files = {
        "top.txt": b"hello\n",
        "a/b/data.bin": os.urandom(300_000),
        "a/zero": b"",
        "run.sh": b"#!/bin/sh\necho hi\n",
    }
    for rel, content in files.items():
        (tree / rel).write_bytes(content)
    (tree / "run.sh").chmod(0o755)
    (tree / "link").symlink_to("top.txt")
    dest = tmp_path / "dest"
    dest.mkdir()
    send = cli.start("send", "tree", "--uri-file", "uri")
    cli.wait_file(tmp_path / "uri", send)
    result = cli.run("receive", f"@{tmp_path / 'uri'}", cwd=dest)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == b""
    got = dest / "tree"
    for rel, content in files.items():
        assert (got / rel).read_bytes() == content
    assert (got / "empty").is_dir()
    assert stat.S_IMODE((got / "run.sh").stat().st_mode) & 0o100
    assert not (got / "link").exists()  # symlinks are skipped, with a message
    out, err = send.communicate(timeout=30)
    assert send.returncode == 0 and out == b""
    assert "skipping" in err.decode()


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_receive_rejects_a_digest_mismatch(tmp_path: Path, anyio_backend: str) -> None:
    """A sender written from docs/cli.md's protocol, lying about the digest."""
    answers: list[object] = []

    async def lying_sender(listener: capsock.Listener) -> None:
        stream = await listener.accept()
        async with stream:
            offer = {"proto": "capsock-send/1", "kind": "file", "name": "x.bin", "size": 1000}
            await send_message(stream, offer | {"mode": 0o644, "mtime": 0})
            assert await receive_message(stream) == {"offset": 0}
            await send_message(stream, {"offset": 0})
            await stream.send(b"a" * 1000)
            await send_message(stream, {"sha256": hashlib.sha256(b"b" * 1000).digest()})
            answers.append(await receive_message(stream))

    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "xdg")}
    async with capsock.Node(listen=["tcp:127.0.0.1:0"]) as node, anyio.create_task_group() as tg:
        listener = await node.listen()
        tg.start_soon(lying_sender, listener)
        argv = [sys.executable, "-m", "capsock", "receive", str(listener.uri), "-o", "x.bin"]
        result = await anyio.run_process(argv, cwd=tmp_path, env=env, check=False)
    assert result.returncode == 3
    assert "SHA-256" in one_line_error(result.stderr)
    assert answers == [{"ok": False, "error": "SHA-256 mismatch"}]
    assert not (tmp_path / "x.bin").exists()
    assert not (tmp_path / "x.bin.capsock-part").exists()


def test_progress_bar_on_a_terminal(cli: Cli, tmp_path: Path) -> None:
    (tmp_path / "f.bin").write_bytes(os.urandom(16 * MiB))
    send = cli.start("send", "f.bin", "--uri-file", "uri")
    cli.wait_file(tmp_path / "uri", send)
    master, slave = pty.openpty()
    receiver = cli.start("receive", "@uri", "-o", "g.bin", stderr=slave)
    os.close(slave)
    seen = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: the terminal's other side closed
            break
        if not chunk:
            break
        seen += chunk
    os.close(master)
    assert receiver.wait(timeout=30) == 0
    text = seen.decode()
    assert "\r" in text and "100%" in text and "/s" in text and "ETA" in text
    assert send.wait(timeout=30) == 0


# ------------------------------------------------------------------ capabilities offline


def test_attenuate_and_inspect_never_show_the_secret(cli: Cli) -> None:
    cap = offline_capability(via=True)
    uri = str(cap)
    result = cli.run("attenuate", uri, "--ttl", "10m", "--uses", "3", "--label", "demo")
    assert result.returncode == 0 and result.stderr == b""
    weaker = Capability.parse(result.stdout.decode().strip())
    assert sorted(type(c).__name__ for c in weaker.caveats) == ["Expires", "Label", "Uses"]
    assert weaker.node == cap.node and weaker.hints == cap.hints
    peer = KeyPair.generate().node_id
    as_json = cli.run("attenuate", "-", "--peer", str(peer), "--json", input=str(weaker).encode())
    doc = json.loads(as_json.stdout)
    assert doc["caveats"][-1] == {"kind": "peer", "node": str(peer)}
    assert Capability.parse(doc["uri"]).caveats[:3] == weaker.caveats

    secrets = [token_text(uri), token_text(doc["uri"]), cap.token.tag.hex()]
    via = cap.hints[1]
    assert isinstance(via, ViaHint)
    secrets += [token_text(str(via.capability)), via.capability.token.tag.hex()]
    text = cli.run("inspect", doc["uri"])
    assert text.returncode == 0 and text.stderr == b""
    shown = text.stdout.decode()
    for needle in (str(cap.node), "at most 3 streams", '"demo"', "in 10 min", str(peer)):
        assert needle in shown
    assert str(via.capability.node) in shown and "tcp=127.0.0.1:4000" in shown
    described = cli.run("inspect", "--json", doc["uri"]).stdout.decode()
    info = json.loads(described)
    assert sorted(c["kind"] for c in info["caveats"]) == ["exp", "label", "peer", "uses"]
    assert info["effective"]["uses"] == 3 and not info["effective"]["expired"]
    assert info["hints"][1]["kind"] == "via" and info["hints"][1]["node"] == str(
        via.capability.node
    )
    for secret in secrets:
        assert secret not in shown and secret not in described

    expired = cap.attenuate(Expires(1))
    old = cli.run("inspect", str(expired)).stdout.decode()
    assert "expired" in old and "1970-01-01" in old


def test_id_creates_a_private_key_once(cli: Cli, tmp_path: Path) -> None:
    first = json.loads(cli.run("id", "--json").stdout)
    assert first["created"] is True
    key = Path(first["key_file"])
    assert key.parent == tmp_path / "xdg" / "capsock"  # XDG_STATE_HOME/capsock by default
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    again = cli.run("id")
    assert again.stdout.decode().strip() == first["node_id"]
    assert again.stderr == b""
    capsock.NodeId.parse(first["node_id"])


def test_peer_bound_capability_only_opens_for_that_identity(cli: Cli, tmp_path: Path) -> None:
    bob = cli.run("id", "--state-dir", "bob").stdout.decode().strip()
    listen = cli.start("listen", "--peer", bob, "--uri-file", "uri")
    cli.wait_file(tmp_path / "uri", listen)
    carol = cli.run("connect", "@uri", "--state-dir", "carol", input=b"carol")
    assert carol.returncode == 4
    assert "refused" in one_line_error(carol.stderr)
    ok = cli.run("connect", "@uri", "--state-dir", "bob", input=b"bob")
    assert ok.returncode == 0, ok.stderr.decode()
    out, _ = cli.stop(listen)
    assert out == b"bob"


def test_revoke_a_sturdy_capability(cli: Cli, tmp_path: Path) -> None:
    state = tmp_path / "alice"
    listen = cli.start("listen", "--name", "svc", "--state-dir", state, "--uri-file", "uri")
    root = cli.wait_file(tmp_path / "uri", listen)
    busy = cli.run("revoke", root, "--state-dir", state)
    assert busy.returncode == 1
    assert "in use by another capsock process" in one_line_error(busy.stderr)
    assert f"pid {listen.pid}" in busy.stderr.decode()
    cli.stop(listen)
    weak = cli.run("attenuate", root, "--uses", "5").stdout.decode().strip()
    revoked = cli.run("revoke", weak, "--state-dir", state)
    assert revoked.returncode == 0, revoked.stderr.decode()
    assert revoked.stdout == b""
    foreign = cli.run("revoke", str(offline_capability()), "--state-dir", state)
    assert foreign.returncode == 1 and "belongs to node" in one_line_error(foreign.stderr)

    (tmp_path / "uri").unlink()
    listen = cli.start("listen", "--name", "svc", "--state-dir", state, "--uri-file", "uri")
    root2 = cli.wait_file(tmp_path / "uri", listen)
    assert token_text(root2) == token_text(root)  # sturdy: the same capability again
    weak2 = cli.run("attenuate", root2, "--uses", "5").stdout.decode().strip()
    assert token_text(weak2) == token_text(weak)
    refused = cli.run("connect", weak2, input=b"no")
    assert refused.returncode == 4, refused.stderr.decode()
    allowed = cli.run("connect", root2, input=b"yes")
    assert allowed.returncode == 0, allowed.stderr.decode()
    out, _ = cli.stop(listen)
    assert out == b"yes"


# ------------------------------------------------------------------ errors and completion


def test_errors_are_one_line_with_an_exit_code(cli: Cli, tmp_path: Path) -> None:
    closed = str(offline_capability())
    (tmp_path / "exists.bin").write_bytes(b"x")
    cases: list[tuple[tuple[str, ...], int, str]] = [
        (("connect", "capsock://nope"), 2, "not a capsock:// capability"),
        (("connect", closed), 5, "could not reach"),
        (("connect", "-"), 2, "stdin carries data"),
        (("listen", "--bogus"), 2, "unrecognized arguments"),
        (("listen", "--ttl", "0"), 2, "not a duration"),
        (("listen", "--peer", "bob"), 2, "node id"),
        (("send", "missing.bin"), 1, "cannot send"),
        (("receive", closed, "-o", "exists.bin"), 1, "exists"),
        (("attenuate", closed), 2, "nothing to add"),
        (("inspect", "@missing.txt"), 2, "cannot read"),
        (("revoke", closed, "--state-dir", "nobody"), 1, "no identity"),
        (("share", "nowhere"), 2, "not an address"),
        (("completion", "tcsh"), 2, "invalid choice"),
    ]
    for args, code, text in cases:
        result = cli.run(*args)
        assert result.returncode == code, (args, result.stderr.decode())
        assert text in one_line_error(result.stderr), args
        assert result.stdout == b"", args
    bare = cli.run()
    assert bare.returncode == 2 and bare.stdout == b""


def test_bash_completion(cli: Cli, tmp_path: Path) -> None:
    script = cli.run("completion", "bash")
    assert script.returncode == 0 and script.stderr == b""
    (tmp_path / "c.bash").write_bytes(script.stdout)
    probe = (
        "source c.bash\n"
        'COMP_WORDS=(capsock se); COMP_CWORD=1; _capsock; echo "${COMPREPLY[*]}"\n'
        'COMP_WORDS=(capsock -v receive --o); COMP_CWORD=3; _capsock; echo "${COMPREPLY[*]}"\n'
        "COMP_WORDS=(capsock completion ''); COMP_CWORD=2; _capsock; echo \"${COMPREPLY[*]}\"\n"
    )
    bash = shutil.which("bash")
    assert bash is not None
    result = subprocess.run([bash, "-c", probe], cwd=tmp_path, capture_output=True, timeout=30)
    assert result.stdout.decode().splitlines() == ["send", "--output", "bash zsh fish"]


def test_zsh_completion(cli: Cli, tmp_path: Path) -> None:
    script = cli.run("completion", "zsh")
    assert script.returncode == 0
    text = script.stdout.decode()
    assert text.startswith("#compdef capsock")
    for name in ("listen", "connect", "share", "forward", "send", "receive", "revoke", "--ttl"):
        assert name in text
    zsh = shutil.which("zsh")
    if zsh is None:
        pytest.skip("zsh is not installed: only the script's content was checked")
    (tmp_path / "_capsock").write_bytes(script.stdout)
    assert subprocess.run([zsh, "-n", str(tmp_path / "_capsock")], timeout=30).returncode == 0
    load = "autoload -U compinit; compinit -u -D; source ./_capsock; print -r -- $_comps[capsock]"
    loaded = subprocess.run([zsh, "-f", "-c", load], cwd=tmp_path, capture_output=True, timeout=30)
    assert loaded.stdout.decode().strip() == "_capsock", loaded.stderr.decode()


def _reset_is_fine(port: int, size: int) -> None:
    """Echo ``size`` bytes through ``port``; a stop in the middle resets the connection."""

    def send() -> None:
        with contextlib.suppress(OSError):
            s.sendall(os.urandom(size))
            s.shutdown(socket.SHUT_WR)

    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port)) as s:
        sender = threading.Thread(target=send)
        sender.start()
        try:
            while s.recv(65536):
                pass
        finally:
            sender.join()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_at_any_moment_is_a_clean_stop(
    cli: Cli, tmp_path: Path, sig: signal.Signals
) -> None:
    """The signal lands wherever the process is: in the middle of transfers, or
    just after they ended, while streams and sessions wind down (a regression:
    a SIGTERM raised inside another task left the process hanging in asyncio's
    shutdown, or ended it as an "internal error")."""
    echo = EchoServer()
    try:
        share = cli.start("share", f"tcp:127.0.0.1:{echo.port}", "--uri-file", "uri")
        cli.wait_file(tmp_path / "uri", share)
        for round_ in range(8):
            forward = cli.start("forward", "@uri", "--listen", "127.0.0.1:0")
            port = int(read_stderr_until(forward, r"forwarding tcp:127\.0\.0\.1:(\d+)"))
            middle = round_ % 2 == 0
            clients = [
                threading.Thread(
                    target=_reset_is_fine, args=(port, (8 if middle else 2) * MiB), daemon=True
                )
                for _ in range(2)
            ]
            for t in clients:
                t.start()
            if middle:
                time.sleep(0.02 * round_)
            else:
                for t in clients:
                    t.join(timeout=30)
            cli.stop(forward, sig)
            for t in clients:
                t.join(timeout=30)
        cli.stop(share, sig)
    finally:
        echo.close()


# ------------------------------------------------------------------ remote text


def test_a_peers_text_is_shown_without_its_control_characters() -> None:
    """A receiver's decline or a forwarder's refusal is the remote side's text:
    no terminal escape sequence from it may reach the user's terminal."""
    from capsock.messages import printable

    assert printable("\x1b]0;owned\x07\x1b[2Jbad\nname") == "?]0;owned??[2Jbad?name"
    assert printable("x" * 500).endswith("...") and len(printable("x" * 500)) == 203
    assert printable(None) == "no reason given"


@pytest.mark.parametrize("name", ["\x1b[2J.txt", "a\nb", "tab\there"])
def test_offered_names_with_control_characters_are_refused(name: str) -> None:
    from capsock.transfer import TransferDeclined, check_name

    with pytest.raises(TransferDeclined, match="unsafe"):
        check_name(name, "file name")
    assert check_name("résumé 2.pdf", "file name") == "résumé 2.pdf"
