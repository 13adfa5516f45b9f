"""``Session._replace_transport``: a session's records move to another transport
between two records, both ways, while streams stay open and lose nothing.

Both sides replace (what a path-switch protocol would arrange); each side's
half-close of the old transport marks the point where its records continue on
the new one.  Transports: in-memory byte pipes and loopback TCP (on asyncio,
the TCP ones are taken over by the push fast path).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import anyio
import anyio.abc
import pytest
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from capsock.config import SessionConfig
from capsock.net.session import Session
from capsock.net.stream import Stream
from capsock.testing import handshake_pair

pytestmark = pytest.mark.anyio


class Pipe(anyio.abc.ByteStream):
    """One end of an in-memory byte pipe (bounded: a full pipe blocks the writer)."""

    def __init__(
        self, send: MemoryObjectSendStream[bytes], receive: MemoryObjectReceiveStream[bytes]
    ) -> None:
        self._send = send
        self._receive = receive
        self._rest = b""
        self.sent = 0

    async def send(self, item: bytes) -> None:
        try:
            await self._send.send(bytes(item))
        except (anyio.ClosedResourceError, anyio.BrokenResourceError) as exc:
            raise anyio.BrokenResourceError from exc
        self.sent += len(item)

    async def receive(self, max_bytes: int = 65536) -> bytes:
        if not self._rest:
            self._rest = await self._receive.receive()  # EndOfStream after the peer's EOF
        out, self._rest = self._rest[:max_bytes], self._rest[max_bytes:]
        return out

    async def send_eof(self) -> None:
        await self._send.aclose()

    async def aclose(self) -> None:
        await self._send.aclose()
        await self._receive.aclose()


def pipe_pair() -> tuple[Pipe, Pipe]:
    a_send, b_receive = anyio.create_memory_object_stream[bytes](8)
    b_send, a_receive = anyio.create_memory_object_stream[bytes](8)
    return Pipe(a_send, a_receive), Pipe(b_send, b_receive)


@asynccontextmanager
async def tcp_pair() -> AsyncIterator[tuple[anyio.abc.ByteStream, anyio.abc.ByteStream]]:
    async with await anyio.create_tcp_listener(local_host="127.0.0.1") as listener:
        port = listener.extra(anyio.abc.SocketAttribute.local_port)
        accepted: list[anyio.abc.ByteStream] = []

        async def take(stream: anyio.abc.ByteStream) -> None:
            accepted.append(stream)

        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, take)
            client = await anyio.connect_tcp("127.0.0.1", port)
            while not accepted:
                await anyio.sleep(0.001)
            tg.cancel_scope.cancel()
        yield client, accepted[0]


@asynccontextmanager
async def session_pair(
    a: anyio.abc.ByteStream, b: anyio.abc.ByteStream
) -> AsyncIterator[tuple[Session, Session, Callable[[], Stream]]]:
    dialer_result, responder_result = handshake_pair()
    cfg = SessionConfig(idle_timeout=0)
    accepted: list[Stream] = []

    def on_open(session: Session, sid: int, token: bytes) -> None:
        st = session.accept(sid, None)
        assert st is not None
        accepted.append(st)

    dialer = Session(a, dialer_result, route="test a", config=cfg)
    responder = Session(b, responder_result, route="test b", config=cfg, on_open=on_open)
    async with anyio.create_task_group() as tg:
        tg.start_soon(dialer.run)
        tg.start_soon(responder.run)
        await dialer.ready.wait()
        await responder.ready.wait()
        yield dialer, responder, accepted.pop
        await dialer.aclose()
        await responder.aclose()


async def read_exactly(stream: Stream, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        out += await stream.receive()
    return bytes(out)


async def transfer_while_switching(
    old: tuple[anyio.abc.ByteStream, anyio.abc.ByteStream],
    new: tuple[anyio.abc.ByteStream, anyio.abc.ByteStream],
) -> None:
    async with session_pair(*old) as (dialer, responder, accepted):
        a = await dialer.open_stream(b"token")
        b = accepted()
        payload = os.urandom(3 << 20)
        switched = anyio.Event()

        async def send(stream: Stream) -> None:
            for i in range(0, len(payload), 100_000):
                if i >= len(payload) // 3 and not switched.is_set():
                    # Mid-transfer, with records in flight both ways.
                    dialer._replace_transport(new[0])
                    responder._replace_transport(new[1])
                    switched.set()
                await stream.send(payload[i : i + 100_000])

        async def echo_back() -> None:
            got = await read_exactly(b, len(payload))
            assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
            await b.send(b"after the switch")
            await b.send_eof()

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(send, a)
                tg.start_soon(echo_back)
            await a.send_eof()
            assert await read_exactly(a, 16) == b"after the switch"
            with pytest.raises(anyio.EndOfStream):
                await a.receive()
        assert dialer._read_transport is dialer._transport  # both directions moved
        assert dialer._transport is not old[0] and responder._transport is not old[1]
        # A new stream after the switch only ever touches the new transport.
        c = await dialer.open_stream(b"again")
        d = accepted()
        await c.send(b"ping")
        assert await d.receive() == b"ping"
        assert dialer.is_usable and responder.is_usable


async def test_records_move_between_memory_pipes_mid_transfer() -> None:
    old, new = pipe_pair(), pipe_pair()
    await transfer_while_switching(old, new)
    assert new[0].sent > 0 and new[1].sent > 0  # later records went to the new pipes
    sent_before = old[0].sent
    assert sent_before > 0  # and earlier ones to the old


async def test_records_move_from_a_pipe_to_tcp_and_back() -> None:
    async with tcp_pair() as tcp:
        old = pipe_pair()
        await transfer_while_switching(old, tcp)
    async with tcp_pair() as tcp:
        await transfer_while_switching(tcp, pipe_pair())


async def test_without_the_peer_switching_the_old_end_ends_the_session() -> None:
    """The replacement is one side's move; a peer that does not follow sees the
    old transport half-closed and the session ends as lost, never as a clean end."""
    old, new = pipe_pair(), pipe_pair()
    async with session_pair(*old) as (dialer, responder, accepted):
        a = await dialer.open_stream(b"token")
        b = accepted()
        dialer._replace_transport(new[0])
        with anyio.fail_after(10):
            await responder.finished.wait()
            with pytest.raises(anyio.BrokenResourceError):
                await b.receive()
        a.reset()
    await new[1].aclose()  # the side that never switched never took it
