"""Every anyio internal the asyncio fast path relies on, checked one by one.

The fast path (``capsock.pushio``) takes the asyncio transport out from under
anyio's ``SocketStream``.  That is only correct while anyio's asyncio backend
looks exactly as pushio assumes; if an anyio upgrade changes any of it, one of
these tests fails and names the assumption, instead of the fast path quietly
turning itself off (``adopt`` returns ``None``) or, worse, losing bytes.

The assumptions:

1. ``SocketStream._transport`` is the connection's ``asyncio.Transport`` and
   ``SocketStream._protocol`` its protocol object.
2. The protocol keeps bytes received but not yet read in ``read_queue`` (a
   deque of ``bytes``), the end in ``is_at_eof`` / ``exception``, and whether a
   writer may go on in ``write_event`` (an ``asyncio.Event``; cleared, or
   replaced by an unset one, in ``pause_writing``).
3. anyio pauses reading between ``receive()`` calls (pushio resumes it).
4. anyio sets the transport's write-buffer limits to zero, so ``pause_writing``
   fires as soon as one byte waits in user space.  pushio keeps these limits:
   its ``send`` returns only once asyncio's buffer is empty, i.e. the kernel
   holds every byte, which is why aborting the transport in ``aclose`` loses
   nothing that ``send`` acknowledged.  The last test checks that property
   itself, by counting bytes rather than timing.
"""

from __future__ import annotations

import asyncio
import collections
import importlib
from types import ModuleType

import anyio
import anyio.abc
import anyio.lowlevel
import pytest

pytestmark = [pytest.mark.anyio, pytest.mark.parametrize("anyio_backend", ["asyncio"])]


def _pushio() -> ModuleType:
    """The fast-path module, under its private name once it has one."""
    for name in ("capsock.net._pushio", "capsock.pushio"):
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError:
            continue
    raise AssertionError("capsock's asyncio fast-path module is missing")


async def _tcp_pair() -> tuple[anyio.abc.SocketStream, anyio.abc.SocketStream]:
    multi = await anyio.create_tcp_listener(local_host="127.0.0.1")
    async with multi:
        port = multi.extra(anyio.abc.SocketAttribute.local_port)
        a = await anyio.connect_tcp("127.0.0.1", port)
        b = await multi.listeners[0].accept()
    return a, b


async def test_the_stream_exposes_its_transport_and_protocol() -> None:
    a, b = await _tcp_pair()
    async with a, b:
        transport = getattr(a, "_transport", None)
        protocol = getattr(a, "_protocol", None)
        assert isinstance(transport, asyncio.Transport), "anyio renamed SocketStream._transport"
        assert protocol is not None, "anyio renamed SocketStream._protocol"
        assert transport.get_protocol() is protocol


async def test_the_protocol_keeps_what_pushio_takes_over() -> None:
    a, b = await _tcp_pair()
    async with a, b:
        protocol = a._protocol  # type: ignore[attr-defined]
        assert isinstance(protocol.read_queue, collections.deque)
        assert isinstance(protocol.write_event, asyncio.Event)
        assert protocol.write_event.is_set()  # nothing waits to be written yet
        assert protocol.is_at_eof is False
        assert getattr(protocol, "exception", None) is None
        await b.send(b"abc")
        assert await a.receive(1) == b"a"
        assert list(protocol.read_queue) == [b"bc"], "unread bytes are no longer in read_queue"
        await b.send_eof()
        assert await a.receive() == b"bc"
        with pytest.raises(anyio.EndOfStream):
            await a.receive()
        assert protocol.is_at_eof is True, "anyio no longer records the end in is_at_eof"


async def test_pause_writing_unsets_the_write_event() -> None:
    a, b = await _tcp_pair()
    async with a, b:
        protocol = a._protocol  # type: ignore[attr-defined]
        protocol.pause_writing()
        assert not protocol.write_event.is_set(), "pushio reads a set write_event as 'not paused'"
        protocol.resume_writing()
        assert protocol.write_event.is_set()


async def test_anyio_pauses_reading_between_receives() -> None:
    a, b = await _tcp_pair()
    async with a, b:
        await b.send(b"x")
        assert await a.receive() == b"x"
        transport = a._transport  # type: ignore[attr-defined]
        assert not transport.is_reading(), "anyio no longer pauses reading; pushio resumes it"


async def test_the_write_buffer_limit_is_zero_before_and_after_adopt() -> None:
    a, b = await _tcp_pair()
    async with b:
        transport = a._transport  # type: ignore[attr-defined]
        assert transport.get_write_buffer_limits() == (0, 0), (
            "anyio changed the write-buffer limits that pushio's 'nothing written is lost' rests on"
        )
        pushed = _pushio().adopt(a)
        assert pushed is not None, "adopt() refused anyio's own TCP stream"
        assert transport.get_write_buffer_limits() == (0, 0)
        await pushed.aclose()


async def test_send_returns_only_when_asyncio_buffers_nothing() -> None:
    """What the zero limit buys: each ``send`` that returns left nothing in
    asyncio's user-space buffer (the kernel has it all), also while the peer
    reads slowly and the socket is full most of the time."""
    a, b = await _tcp_pair()
    pushed = _pushio().adopt(a)
    assert pushed is not None
    pushed.start_push(lambda data: None, lambda error: None)
    transport = a._transport  # type: ignore[attr-defined]
    chunk = b"z" * (1 << 20)
    total = 24 * len(chunk)
    received = 0
    buffered_after_send: list[int] = []
    async with b, anyio.create_task_group() as tg:

        async def slow_reader() -> None:
            nonlocal received
            while received < total:
                received += len(await b.receive(16384))
                await anyio.lowlevel.checkpoint()

        tg.start_soon(slow_reader)
        with anyio.fail_after(120):
            for _ in range(total // len(chunk)):
                await pushed.send(chunk)
                buffered_after_send.append(transport.get_write_buffer_size())
    assert received == total
    assert buffered_after_send == [0] * len(buffered_after_send)
    await pushed.aclose()
