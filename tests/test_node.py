"""End to end over real loopback sockets, on asyncio and trio."""

from __future__ import annotations

import errno
import logging
import os
import random
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest

import capsock
from capsock import CapsockAttribute
from capsock.keys import KeyPair
from capsock.uri import Capability, TcpHint, Token

from .helpers import echo, read_all, receive_and_hash, send_and_hash

pytestmark = pytest.mark.anyio

MiB = 1 << 20


async def roundtrip_hash(stream: capsock.Stream, total: int) -> None:
    async with anyio.create_task_group() as tg:
        sent: list[str] = []

        async def sender() -> None:
            sent.append(await send_and_hash(stream, total))

        tg.start_soon(sender)
        got, n = await receive_and_hash(stream)
    assert n == total
    assert got == sent[0]


@pytest.mark.parametrize("transport", ["tcp", "unix"])
async def test_64mib_echo_through_one_stream(transport: str, tmp_path: Path) -> None:
    listen = "tcp:127.0.0.1:0" if transport == "tcp" else f"unix:{tmp_path}/n.sock"
    async with (
        capsock.Node(listen=[listen]) as server,
        capsock.Node() as client,
        anyio.create_task_group() as tg,
    ):
        listener = await server.listen()
        tg.start_soon(listener.serve, echo)
        assert str(listener.uri).count(f"{transport}=") == 1
        stream = await client.connect(str(listener.uri))
        assert stream.peer == server.id
        assert stream.extra(CapsockAttribute.peer_id) == server.id
        await roundtrip_hash(stream, 64 * MiB)
        await stream.aclose()
        tg.cancel_scope.cancel()


async def test_twenty_streams_at_once_share_one_session() -> None:
    async with (
        capsock.Node(listen=["tcp:127.0.0.1:0"]) as server,
        capsock.Node() as client,
        anyio.create_task_group() as tg,
    ):
        listener = await server.listen()
        tg.start_soon(listener.serve, echo)
        streams = [await client.connect(listener.uri) for _ in range(20)]
        async with anyio.create_task_group() as inner:
            for s in streams:
                inner.start_soon(roundtrip_hash, s, 256 * 1024)
        assert len({s.extra(CapsockAttribute.handshake_hash) for s in streams}) == 1
        assert server.stats()["inbound_connections"] == 1
        assert len({s.stream_id for s in streams}) == 20
        tg.cancel_scope.cancel()


async def test_both_sides_agree_on_handshake_hash_and_ids() -> None:
    async with capsock.Node(listen=["tcp:127.0.0.1:0"]) as server, capsock.Node() as client:
        listener = await server.listen()
        stream = await client.connect(listener.uri)
        accepted = await listener.accept()
        assert accepted.peer == client.id
        assert stream.peer == server.id
        h = stream.extra(CapsockAttribute.handshake_hash)
        assert accepted.extra(CapsockAttribute.handshake_hash) == h
        assert len(h) == 64
        await stream.send(b"hello")
        await stream.send_eof()
        assert await read_all(accepted) == b"hello"
        await accepted.aclose()
        await stream.aclose()


async def test_wrong_node_key_fails_before_any_token_is_sent() -> None:
    async with capsock.Node(listen=["tcp:127.0.0.1:0"]) as server, capsock.Node() as client:
        listener = await server.listen()
        impostor = Capability(KeyPair.generate().node_id, listener.uri.token, listener.uri.hints)
        with pytest.raises(capsock.PeerAuthenticationError) as info:
            await client.connect(str(impostor))
        assert str(listener.uri.token.encode().hex()) not in str(info.value)
        await anyio.sleep(0.05)
        stats = server.stats()
        assert stats["opens_received"] == 0  # the listener never saw a token
        assert stats["handshakes_failed"] == 1
        assert stats["sessions"] == {}


async def test_wrong_secret_is_rejected() -> None:
    async with capsock.Node(listen=["tcp:127.0.0.1:0"]) as server, capsock.Node() as client:
        listener = await server.listen()
        tok = listener.uri.token
        forged = Token(tok.root_id, tok.caveats, bytes([tok.tag[0] ^ 1]) + tok.tag[1:])
        with pytest.raises(capsock.CapabilityRejected) as info:
            await client.connect(Capability(server.id, forged, listener.uri.hints))
        assert info.value.code == capsock.ErrorCode.REFUSED
        unknown_root = Token(os.urandom(16), (), os.urandom(32))
        with pytest.raises(capsock.CapabilityRejected) as info2:
            await client.connect(Capability(server.id, unknown_root, listener.uri.hints))
        # Uniform rejection: the same code and the same text for both reasons.
        assert str(info.value) == str(info2.value)
        # The session survives a refusal: the real capability still works.
        stream = await client.connect(listener.uri)
        await stream.aclose()
        assert server.stats()["inbound_connections"] == 1


async def test_dialing_own_id_is_refused() -> None:
    async with capsock.Node(listen=["tcp:127.0.0.1:0"]) as node:
        listener = await node.listen()
        with pytest.raises(capsock.LocalUsageError, match="own id"):
            await node.connect(listener.uri)


async def test_malformed_uri_raises_invalid_capability() -> None:
    async with capsock.Node() as node:
        with pytest.raises(capsock.InvalidCapability):
            await node.connect("capsock://nope")
        with pytest.raises(ValueError):
            await node.connect("http://example.org/")


async def test_unreachable_lists_every_route(tmp_path: Path) -> None:
    async with capsock.Node(listen=["tcp:127.0.0.1:0"]) as server, capsock.Node() as client:
        listener = await server.listen()
        await server.aclose()
        with pytest.raises(capsock.Unreachable) as info:
            await client.connect(listener.uri)
        assert "tcp=127.0.0.1:" in str(info.value)
        assert len(info.value.attempts) == 1


async def test_a_bare_host_port_listens_on_tcp() -> None:
    async with capsock.Node(listen=["127.0.0.1:0"]) as node:
        (hint,) = node.hints
        assert isinstance(hint, TcpHint) and hint.host == "127.0.0.1" and hint.port > 0


async def test_a_failed_bind_names_the_address() -> None:
    async with capsock.Node(listen=["tcp:127.0.0.1:0"]) as first:
        (hint,) = first.hints
        assert isinstance(hint, TcpHint)
        with pytest.raises(OSError, match=rf"cannot listen on tcp:127\.0\.0\.1:{hint.port}") as exc:
            async with capsock.Node(listen=[f"tcp:127.0.0.1:{hint.port}"]):
                pass
        assert exc.value.errno == errno.EADDRINUSE


async def test_garbage_to_the_port_is_dropped_and_others_are_served(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="capsock")
    async with (
        capsock.Node(listen=["tcp:127.0.0.1:0"]) as server,
        capsock.Node() as client,
        anyio.create_task_group() as tg,
    ):
        listener = await server.listen()
        tg.start_soon(listener.serve, echo)
        hint = listener.uri.hints[0]
        junks = [os.urandom(4096), b"\x00\x00", b"\xff\xff" + os.urandom(100)]
        junks.append(b"GET / HTTP/1.1\r\n\r\n")
        for junk in junks:
            sock = await anyio.connect_tcp(hint.host, hint.port)  # type: ignore[union-attr]
            await sock.send(junk)
            with anyio.fail_after(15):
                try:
                    while await sock.receive():
                        pass
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    pass  # the node hung up on us
            await sock.aclose()
        stream = await client.connect(listener.uri)
        await stream.send(b"still here")
        await stream.send_eof()
        assert await read_all(stream) == b"still here"
        assert server.stats()["handshakes_failed"] == 4
        assert "dropped inbound connection" in caplog.text
        tg.cancel_scope.cancel()


async def test_stream_errors_map_to_anyio() -> None:
    async with capsock.Node(listen=["tcp:127.0.0.1:0"]) as server, capsock.Node() as client:
        listener = await server.listen()
        stream = await client.connect(listener.uri)
        accepted = await listener.accept()
        await accepted.aclose()  # closes without reading: EOF, then RESET
        with pytest.raises(anyio.EndOfStream):
            await stream.receive()
        with pytest.raises(anyio.BrokenResourceError) as info:
            for _ in range(100):
                await stream.send(b"x" * 65536)
                await anyio.sleep(0.01)
        assert isinstance(info.value, capsock.StreamReset)
        await stream.aclose()
        with pytest.raises(anyio.ClosedResourceError):
            await stream.send(b"x")


async def test_cancelled_small_sends_never_break_the_session() -> None:
    """Small sends write from the caller's task; cancelling it must not cut a record.

    Half the senders run in an already-cancelled scope.  A send is a
    cancellation point before it queues anything (so a cancelled one sends
    nothing), and once it queued, its write is shielded: every byte of the
    sends that returned arrives, in order, and the session stays the same one
    (a record cut short would desynchronise it and force a re-dial).
    """
    async with (
        capsock.Node(listen=["tcp:127.0.0.1:0"]) as server,
        capsock.Node() as client,
        anyio.create_task_group() as tg,
    ):
        listener = await server.listen()
        received: list[bytes] = []

        async def collect(stream: capsock.Stream) -> None:
            received.append(await read_all(stream))

        tg.start_soon(listener.serve, collect)
        stream = await client.connect(listener.uri)
        sent = bytearray()
        rng = random.Random(5)
        for i in range(400):
            piece = bytes([i % 251]) * rng.randint(1, 2048)
            with anyio.CancelScope() as scope:
                if i % 2:
                    scope.cancel()
                await stream.send(piece)  # cancelled: raises at once, nothing queued
                sent += piece
                await anyio.lowlevel.checkpoint()
        await stream.send_eof()
        with anyio.fail_after(10):
            while not received:
                await anyio.sleep(0.01)
        assert received[0] == bytes(sent)
        again = await client.connect(listener.uri)
        await again.aclose()
        assert server.stats()["inbound_connections"] == 1, "the session was re-dialed"
        tg.cancel_scope.cancel()
