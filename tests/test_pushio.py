"""The asyncio fast path (capsock.pushio): used where it should be, loses nothing.

Most of its behaviour is covered by the whole suite, whose asyncio variants run
every session through it; these tests pin what is specific to it.
"""

from __future__ import annotations

import socket
from pathlib import Path

import anyio
import anyio.abc
import anyio.lowlevel
import pytest

import capsock
from capsock.net._pushio import PushTransport, adopt
from capsock.net.session import Session, SessionConfig

from .helpers import echo, read_all

pytestmark = pytest.mark.anyio


def _sessions(node: capsock.Node) -> list[Session]:
    return list(node._sessions.values())


@pytest.mark.parametrize("listen", ["tcp:127.0.0.1:0", "unix"])
async def test_sessions_use_the_fast_path_on_asyncio_only(
    anyio_backend_name: str, listen: str, tmp_path: Path
) -> None:
    """If an anyio upgrade changes the internals pushio relies on, this fails
    instead of the fast path silently turning itself off."""
    address = f"unix:{tmp_path}/s" if listen == "unix" else listen
    async with capsock.Node(listen=[address]) as server, capsock.Node() as client:
        listener = await server.listen()
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: listener.serve(echo))
            stream = await client.connect(listener.uri)
            await stream.send(b"ping")
            await stream.send_eof()
            assert await read_all(stream) == b"ping"
            # anyio's asyncio Unix streams use sock_recv, not a transport
            expected = anyio_backend_name == "asyncio" and listen != "unix"
            for node in (client, server):
                (session,) = _sessions(node)
                assert isinstance(session._transport, PushTransport) is expected
            tg.cancel_scope.cancel()


async def test_push_reads_can_be_turned_off(anyio_backend_name: str) -> None:
    config = capsock.NodeConfig(session=SessionConfig(push_reads=False))
    async with (
        capsock.Node(listen=["tcp:127.0.0.1:0"], config=config) as server,
        capsock.Node(config=config) as client,
    ):
        listener = await server.listen()
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: listener.serve(echo))
            stream = await client.connect(listener.uri)
            await stream.send(b"x" * 100_000)
            await stream.send_eof()
            assert await read_all(stream) == b"x" * 100_000
            (session,) = _sessions(client)
            assert not isinstance(session._transport, PushTransport)
            tg.cancel_scope.cancel()


async def _tcp_pair() -> tuple[anyio.abc.SocketStream, anyio.abc.SocketStream]:
    multi = await anyio.create_tcp_listener(local_host="127.0.0.1")
    async with multi:
        port = multi.extra(anyio.abc.SocketAttribute.local_port)
        a = await anyio.connect_tcp("127.0.0.1", port)
        b = await multi.listeners[0].accept()
    return a, b


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_bytes_already_received_are_delivered_then_the_end() -> None:
    a, b = await _tcp_pair()
    async with a:
        await b.send(b"queued before the takeover")
        assert await a.receive(7) == b"queued "  # the rest stays in anyio's buffer
        pushed = adopt(a)
        assert pushed is not None
        got: list[bytes] = []
        ends: list[BaseException] = []
        pushed.start_push(got.append, ends.append)
        assert got == [b"before the takeover"]
        await b.send(b" and after")
        await b.aclose()  # EOF
        with anyio.fail_after(5):
            while not ends:
                await anyio.sleep(0.01)
        assert b"".join(got) == b"before the takeover and after"
        assert [type(e) for e in ends] == [anyio.EndOfStream]
        await pushed.aclose()


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_reset_connection_is_broken_not_ended() -> None:
    a, b = await _tcp_pair()
    pushed = adopt(a)
    assert pushed is not None
    ends: list[BaseException] = []
    pushed.start_push(lambda data: None, ends.append)
    raw = b.extra(anyio.abc.SocketAttribute.raw_socket)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    await b.aclose()  # RST
    with anyio.fail_after(5):
        while not ends:
            await anyio.sleep(0.01)
    assert isinstance(ends[0], anyio.BrokenResourceError), ends  # a reset is no clean end
    with pytest.raises(anyio.BrokenResourceError):
        for _ in range(100):  # the kernel may accept a write or two first
            await pushed.send(b"x" * 65536)
            await anyio.sleep(0.01)
    await pushed.aclose()


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_send_waits_while_the_socket_is_full_and_resumes() -> None:
    a, b = await _tcp_pair()
    pushed = adopt(a)
    assert pushed is not None
    pushed.start_push(lambda data: None, lambda error: None)
    chunk = b"y" * 65536
    sent = 0
    with anyio.move_on_after(1) as blocked:
        while True:  # nobody reads b: the kernel buffers fill, then send waits
            await pushed.send(chunk)
            sent += len(chunk)
    assert blocked.cancelled_caught and sent > 0
    received = 0
    async with anyio.create_task_group() as tg:

        async def drain() -> None:
            nonlocal received
            while received < sent + len(chunk):
                received += len(await b.receive())

        tg.start_soon(drain)
        with anyio.fail_after(10):
            await pushed.send(chunk)  # returns once the reader made room
    assert received >= sent
    await pushed.aclose()
    await b.aclose()


async def test_a_sender_of_small_messages_lets_other_tasks_run() -> None:
    """The fast path writes without yielding; the stream must still yield now
    and then, or a loop of small sends would hold the event loop."""
    async with capsock.Node(listen=["tcp:127.0.0.1:0"]) as server, capsock.Node() as client:
        listener = await server.listen()
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: listener.serve(echo))
            stream = await client.connect(listener.uri)
            ticks = 0

            async def ticker() -> None:
                nonlocal ticks
                while True:
                    ticks += 1
                    await anyio.lowlevel.checkpoint()

            tg.start_soon(ticker)
            await anyio.sleep(0.01)
            before = ticks
            for _ in range(200):  # 200 KiB, well inside the credit: no waiting
                await stream.send(b"z" * 1024)
            assert ticks > before
            tg.cancel_scope.cancel()
