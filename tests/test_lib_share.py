"""capsock.splice / share / forward: the library half of ``capsock share`` and
``capsock forward``, with real nodes and real sockets on loopback, both backends."""

from __future__ import annotations

import hashlib
import os
import socket
import stat
from collections.abc import AsyncIterator, Iterator
from functools import partial
from pathlib import Path

import anyio
import anyio.abc
import pytest

import capsock
from capsock import ErrorCode, LocalUsageError, StreamReset, forward, share, splice

from .test_cli import Cli, free_port, read_stderr_until

pytestmark = pytest.mark.anyio

MiB = 1 << 20


async def digest_service(sock: anyio.abc.ByteStream) -> None:
    """Read until the client's half-close, then answer the SHA-256 of what came and close."""
    async with sock:
        h = hashlib.sha256()
        while True:
            try:
                h.update(await sock.receive())
            except anyio.EndOfStream:
                break
        await sock.send(h.digest())


async def read_to_end(sock: anyio.abc.ByteStream) -> bytes:
    out = bytearray()
    while True:
        try:
            out += await sock.receive()
        except anyio.EndOfStream:
            return bytes(out)


async def ask(sock: anyio.abc.ByteStream, data: bytes) -> bytes:
    """Send ``data``, half-close, return the whole answer."""
    await sock.send(data)
    await sock.send_eof()
    return await read_to_end(sock)


@pytest.fixture
async def service() -> AsyncIterator[int]:
    """The port of a local TCP digest service."""
    async with (
        await anyio.create_tcp_listener(local_host="127.0.0.1") as tcp,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(tcp.serve, digest_service)
        yield tcp.extra(anyio.abc.SocketAttribute.local_port)
        tg.cancel_scope.cancel()


@pytest.fixture
async def nodes() -> AsyncIterator[tuple[capsock.Node, capsock.Node]]:
    async with capsock.Node(listen=["tcp:127.0.0.1:0"]) as server, capsock.Node() as client:
        yield server, client


def mode_of(path: str) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def exists(path: str) -> bool:
    return Path(path).exists()


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_splice_a_stream_and_a_socket_with_half_close(
    service: int, nodes: tuple[capsock.Node, capsock.Node]
) -> None:
    server, client = nodes
    listener = await server.listen()
    data = os.urandom(3 * MiB)

    async def serve_one() -> None:
        stream = await listener.accept()
        sock = await anyio.connect_tcp("127.0.0.1", service)
        async with stream, sock:
            await splice(stream, sock)

    async with anyio.create_task_group() as tg:
        tg.start_soon(serve_one)
        async with await client.connect(listener.uri) as stream:
            assert await ask(stream, data) == hashlib.sha256(data).digest()


async def test_share_and_forward_over_tcp(
    service: int, nodes: tuple[capsock.Node, capsock.Node]
) -> None:
    server, client = nodes
    data = os.urandom(MiB)
    async with anyio.create_task_group() as tg:
        uri = await tg.start(share, server, f"tcp:127.0.0.1:{service}")
        where = await tg.start(forward, client, uri, "tcp:127.0.0.1:0")
        assert where.startswith("tcp:127.0.0.1:") and not where.endswith(":0")
        port = int(where.rsplit(":", 1)[1])

        async def one(i: int) -> None:
            body = data[i:]
            async with await anyio.connect_tcp("127.0.0.1", port) as sock:
                assert await ask(sock, body) == hashlib.sha256(body).digest()

        async with anyio.create_task_group() as clients:  # concurrent connections
            for i in range(4):
                clients.start_soon(one, i)
        tg.cancel_scope.cancel()


async def test_share_serves_the_given_listener_until_it_closes(
    service: int, nodes: tuple[capsock.Node, capsock.Node]
) -> None:
    server, client = nodes
    listener = await server.listen()
    async with anyio.create_task_group() as tg:
        uri = await tg.start(partial(share, server, f"127.0.0.1:{service}", listener=listener))
        assert str(uri) == str(listener.uri)
        async with await client.connect(uri) as stream:
            assert await ask(stream, b"x") == hashlib.sha256(b"x").digest()
        await listener.aclose()  # share() returns by itself
    # reaching here means share() ended when its listener closed


async def test_share_and_forward_over_unix_sockets(
    nodes: tuple[capsock.Node, capsock.Node], tmp_path: Path
) -> None:
    server, client = nodes
    service_path = str(tmp_path / "service.sock")
    local_path = str(tmp_path / "local.sock")
    async with (
        await anyio.create_unix_listener(service_path) as unix,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(unix.serve, digest_service)
        uri = await tg.start(share, server, f"unix:{service_path}")
        async with anyio.create_task_group() as fwd:
            where = await fwd.start(forward, client, uri, f"unix:{local_path}")
            assert where == f"unix:{local_path}"
            assert mode_of(local_path) == 0o600
            async with await anyio.connect_unix(local_path) as sock:
                assert await ask(sock, b"hello") == hashlib.sha256(b"hello").digest()
            fwd.cancel_scope.cancel()
        assert not exists(local_path)  # forward() removed its socket
        assert exists(service_path)  # and nothing else
        tg.cancel_scope.cancel()


async def test_a_down_service_resets_the_stream_as_unavailable(
    nodes: tuple[capsock.Node, capsock.Node],
) -> None:
    server, client = nodes
    errors: list[str] = []
    async with anyio.create_task_group() as tg:
        uri = await tg.start(
            lambda task_status: share(
                server, f"tcp:127.0.0.1:{free_tcp_port()}", on_error=errors.append,
                task_status=task_status,
            )
        )  # fmt: skip
        async with await client.connect(uri) as stream:
            with pytest.raises(StreamReset) as caught:
                await stream.receive()
        assert caught.value.code == ErrorCode.UNAVAILABLE
        assert "could not be reached" in str(caught.value)
        assert "CANCELLED" not in str(caught.value)
        tg.cancel_scope.cancel()
    assert errors and "cannot connect to tcp:127.0.0.1:" in errors[0]


async def test_forward_reports_a_down_shared_service_and_resets_the_client(
    nodes: tuple[capsock.Node, capsock.Node],
) -> None:
    server, client = nodes
    reported: list[str] = []
    async with anyio.create_task_group() as tg:
        uri = await tg.start(share, server, f"tcp:127.0.0.1:{free_tcp_port()}")
        where = await tg.start(
            lambda task_status: forward(
                client, uri, "tcp:127.0.0.1:0", on_error=reported.append,
                task_status=task_status,
            )
        )  # fmt: skip
        port = int(where.rsplit(":", 1)[1])
        async with await anyio.connect_tcp("127.0.0.1", port) as sock:
            await sock.send(b"GET / HTTP/1.0\r\n\r\n")
            with pytest.raises((anyio.BrokenResourceError, ConnectionResetError)):
                await read_to_end(sock)  # an RST, not a clean empty answer
        with anyio.fail_after(30):
            while not reported:
                await anyio.sleep(0.01)
        tg.cancel_scope.cancel()
    assert "shared service is not reachable" in reported[0]


@pytest.mark.parametrize("bad", ["localhost", "tcp:host:99999", "unix:relative", "tcp::80", ""])
async def test_bad_addresses_are_a_local_usage_error(
    bad: str, nodes: tuple[capsock.Node, capsock.Node]
) -> None:
    server, client = nodes
    with pytest.raises(LocalUsageError):
        await share(server, bad)
    with pytest.raises(LocalUsageError):
        await forward(client, (await server.listen()).uri, bad)


async def test_share_refuses_port_zero(nodes: tuple[capsock.Node, capsock.Node]) -> None:
    with pytest.raises(LocalUsageError):
        await share(nodes[0], "tcp:127.0.0.1:0")


# ------------------------------------------------------------------ the CLI on top


@pytest.fixture
def cli(tmp_path: Path) -> Iterator[Cli]:
    runner = Cli(tmp_path)
    try:
        yield runner
    finally:
        runner.cleanup()


def test_cli_forward_says_the_shared_service_is_down(cli: Cli, tmp_path: Path) -> None:
    share_proc = cli.start("share", f"tcp:127.0.0.1:{free_port()}", "--uri-file", "uri")
    cli.wait_file(tmp_path / "uri", share_proc)
    forward_proc = cli.start("forward", "@uri")
    port = int(read_stderr_until(forward_proc, r"forwarding tcp:127\.0\.0\.1:(\d+)"))
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        with pytest.raises(ConnectionResetError):
            s.recv(1)
    line = read_stderr_until(forward_proc, r"(capsock: error: .*)")
    assert "shared service is not reachable" in line
    assert "CANCELLED" not in line
    cli.stop(forward_proc)
    cli.stop(share_proc)
