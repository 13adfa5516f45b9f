"""The asyncio fast path's write without a wait (issue 17): ``PushTransport.write_now``.

``Session.flush_inline`` writes a small send from the caller's task without a
cancel scope when the socket has room.  What must hold: a ``Stream.send`` that
returned left nothing in asyncio's user-space buffer (the session aborts the
transport at close, which would drop such bytes), also when that very write
filled the socket; and ``write_now`` fails like ``send`` once the transport is
closed or lost.
"""

from __future__ import annotations

import contextlib

import anyio
import anyio.abc
import anyio.lowlevel
import pytest

from capsock.net._pushio import PushTransport, adopt
from capsock.net.session import Session
from capsock.testing import handshake_pair

pytestmark = [pytest.mark.anyio, pytest.mark.parametrize("anyio_backend", ["asyncio"])]


async def _tcp_pair() -> tuple[anyio.abc.SocketStream, anyio.abc.SocketStream]:
    multi = await anyio.create_tcp_listener(local_host="127.0.0.1")
    async with multi:
        port = multi.extra(anyio.abc.SocketAttribute.local_port)
        a = await anyio.connect_tcp("127.0.0.1", port)
        b = await multi.listeners[0].accept()
    return a, b


async def test_write_now_writes_and_fails_like_send_once_closed() -> None:
    a, b = await _tcp_pair()
    pushed = adopt(a)
    assert pushed is not None
    pushed.start_push(lambda data: None, lambda error: None)
    async with b:
        assert pushed.writable_now()
        pushed.write_now(b"hello")
        await pushed.drained()  # room: returns at once
        assert await b.receive(5) == b"hello"
        await pushed.aclose()
        assert not pushed.writable_now()
        with pytest.raises(anyio.ClosedResourceError):
            pushed.write_now(b"x")
        with pytest.raises(anyio.ClosedResourceError):
            await pushed.drained()


async def test_drained_waits_while_the_socket_is_full() -> None:
    a, b = await _tcp_pair()
    pushed = adopt(a)
    assert pushed is not None
    pushed.start_push(lambda data: None, lambda error: None)
    chunk = b"f" * (8 << 20)  # more than loopback's socket buffers hold
    done = anyio.Event()
    async with b, anyio.create_task_group() as tg:
        pushed.write_now(chunk)
        assert not pushed.writable_now()  # the write filled the socket

        async def wait() -> None:
            await pushed.drained()
            done.set()

        tg.start_soon(wait)
        await anyio.wait_all_tasks_blocked()
        assert not done.is_set()
        got = 0
        while got < len(chunk):
            got += len(await b.receive(1 << 20))
        with anyio.fail_after(30):
            await done.wait()
    await pushed.aclose()


async def test_a_send_that_returned_left_nothing_in_asyncio_buffers() -> None:
    """Small sends go through ``flush_inline``; the peer stops reading its
    socket, so the sender's socket fills.  Every send that returns must find
    asyncio's write buffer empty (the kernel holds the bytes)."""
    a, b = await _tcp_pair()
    dialer_result, responder_result = handshake_pair()

    def on_open(session: Session, sid: int, token: bytes) -> None:
        session.accept(sid, None)

    sa = Session(a, dialer_result, route="a")
    sb = Session(b, responder_result, route="b", on_open=on_open)
    buffered_after_send: list[int] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(sa.run)
        tg.start_soon(sb.run)
        await sa.ready.wait()
        await sb.ready.wait()
        stream = await sa.open_stream(b"token")
        reader = sb._read_transport
        writer = sa._transport
        assert type(reader) is PushTransport and type(writer) is PushTransport
        reader._transport.pause_reading()  # the peer stops reading its socket
        raw = writer._transport
        chunk = b"s" * 16384  # small: written inline

        async def sender() -> None:
            with contextlib.suppress(anyio.BrokenResourceError):  # the sessions end first
                while True:
                    await stream.send(chunk)
                    buffered_after_send.append(raw.get_write_buffer_size())

        tg.start_soon(sender)
        with anyio.move_on_after(20):
            while raw.get_write_buffer_size() == 0:
                await anyio.sleep(0.01)
        await anyio.wait_all_tasks_blocked()
        assert raw.get_write_buffer_size() > 0  # the socket filled: a write waits
        tg.cancel_scope.cancel()
    assert len(buffered_after_send) > 10  # it sent a lot before the socket filled
    assert set(buffered_after_send) == {0}
