"""Test helpers for capsock users (and capsock itself).

* :func:`stream_pair` -- two connected capsock streams between two fresh nodes.
* :func:`check_byte_stream` -- a conformance suite for any ``anyio.abc.ByteStream``
  pair, in the spirit of trio's ``check_two_way_stream`` and
  ``check_half_closeable_stream``.  capsock runs it against every kind of stream
  it makes; run it against your own wrappers too.

The suite asserts the contract capsock promises and anyio code relies on:
bytes arrive once, in order, within ``max_bytes``; ``send_eof`` half-closes
(the peer reads everything, then ``EndOfStream``, again and again, and can
still send back); ``aclose`` is idempotent, makes local use raise
``ClosedResourceError``, gives the peer a clean ``EndOfStream`` after the data
and makes the peer's further sends fail with ``BrokenResourceError``;
concurrent use of one direction raises ``BusyResourceError``; a cancelled
``receive`` loses nothing; a writer whose reader does not read is blocked
rather than buffered without bound.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import AsyncIterator, Callable, Collection
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import anyio
import anyio.abc
import anyio.lowlevel

from .node import Listener, Node
from .stream import Stream

__all__ = ["StreamMaker", "check_byte_stream", "echo", "read_to_eof", "stream_pair"]

StreamMaker = Callable[
    [], AbstractAsyncContextManager[tuple[anyio.abc.ByteStream, anyio.abc.ByteStream]]
]
"""A zero-argument callable returning an async context manager that yields a
connected ``(a, b)`` pair and cleans up on exit."""


@asynccontextmanager
async def stream_pair(
    transport: str = "tcp", *, socket_path: str | None = None
) -> AsyncIterator[tuple[Stream, Stream]]:
    """Two fresh nodes on loopback and one stream between them: ``(dialer, acceptor)``.

    Args:
        transport: ``"tcp"`` (127.0.0.1, any port) or ``"unix"`` (needs ``socket_path``).
    """
    if transport == "unix":
        if socket_path is None:
            raise ValueError("stream_pair('unix') needs socket_path=")
        listen = f"unix:{socket_path}"
    else:
        listen = "tcp:127.0.0.1:0"
    async with Node(listen=[listen]) as server, Node() as client:
        listener: Listener = await server.listen()
        a = await client.connect(listener.uri)
        b = await listener.accept()
        try:
            yield a, b
        finally:
            await a.aclose()
            await b.aclose()


async def _read_exactly(stream: anyio.abc.ByteReceiveStream, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        out += await stream.receive(n - len(out))
    return bytes(out)


async def echo(stream: anyio.abc.ByteStream) -> None:
    """A stream handler that echoes everything back, then half-closes."""
    while True:
        try:
            data = await stream.receive()
        except anyio.EndOfStream:
            await stream.send_eof()
            return
        await stream.send(data)


async def read_to_eof(stream: anyio.abc.ByteReceiveStream) -> bytes:
    """Everything the stream delivers until its clean end."""
    out = bytearray()
    while True:
        try:
            out += await stream.receive()
        except anyio.EndOfStream:
            return bytes(out)


async def _check_transfer(make: StreamMaker) -> None:
    async with make() as (a, b):
        await a.send(b"x")
        assert await b.receive() == b"x", "a single byte did not arrive"
        await b.send(b"yz")
        assert await _read_exactly(a, 2) == b"yz", "bytes did not arrive in order"
        payload = os.urandom(3 << 20)

        async def pump(src: anyio.abc.ByteStream, dst: anyio.abc.ByteStream) -> None:
            async with anyio.create_task_group() as tg:
                tg.start_soon(src.send, payload)
                got = await _read_exactly(dst, len(payload))
            assert got == payload, "a large transfer was corrupted or reordered"

        async with anyio.create_task_group() as tg:  # both directions at once
            tg.start_soon(pump, a, b)
            tg.start_soon(pump, b, a)


async def _check_max_bytes(make: StreamMaker) -> None:
    async with make() as (a, b):
        await a.send(b"abcdef")
        first = await b.receive(1)
        assert first == b"a", "receive(1) must return exactly one byte"
        rest = await _read_exactly(b, 5)
        assert rest == b"bcdef"
        for size in (1, 7, 1000, 65536):
            await a.send(os.urandom(size * 3))
            remaining = size * 3
            while remaining:
                chunk = await b.receive(size)
                assert 0 < len(chunk) <= size, "receive(max_bytes) returned too much"
                remaining -= len(chunk)


async def _check_half_close(make: StreamMaker) -> None:
    async with make() as (a, b):
        await a.send(b"last words")
        await a.send_eof()
        await a.send_eof()  # idempotent
        assert await read_to_eof(b) == b"last words"
        for _ in range(2):  # EndOfStream again and again
            try:
                await b.receive()
            except anyio.EndOfStream:
                pass
            else:
                raise AssertionError("receive after EndOfStream returned data")
        try:
            await a.send(b"more")
        except _SEND_AFTER_EOF.get():
            pass
        else:
            raise AssertionError("send after send_eof must raise ClosedResourceError")
        await b.send(b"reply after half-close")  # the other direction still works
        await b.send_eof()
        assert await read_to_eof(a) == b"reply after half-close"


async def _check_aclose(make: StreamMaker) -> None:
    async with make() as (a, b):
        await a.send(b"before close")
        await a.aclose()
        await a.aclose()  # idempotent
        for op in (a.receive, lambda: a.send(b"x")):
            try:
                await op()
            except anyio.ClosedResourceError:
                pass
            else:
                raise AssertionError("use after aclose must raise ClosedResourceError")
        assert await read_to_eof(b) == b"before close", "data sent before aclose was lost"
        with anyio.fail_after(10):
            try:
                while True:
                    await b.send(b"y" * 65536)
                    await anyio.lowlevel.checkpoint()
            except anyio.BrokenResourceError:
                pass


async def _check_busy(make: StreamMaker) -> None:
    async with make() as (a, b), anyio.create_task_group() as tg:
        tg.start_soon(b.receive)
        await anyio.sleep(0.05)
        try:
            await b.receive()
        except anyio.BusyResourceError:
            pass
        else:
            raise AssertionError("concurrent receive must raise BusyResourceError")
        # Clog the a->b direction: the second concurrent sender must be refused.
        big = b"z" * (64 << 20)
        tg.start_soon(a.send, big)
        await anyio.sleep(0.2)
        try:
            await a.send(b"second writer")
        except anyio.BusyResourceError:
            pass
        else:
            raise AssertionError("concurrent send must raise BusyResourceError")
        tg.cancel_scope.cancel()


async def _check_cancelled_receive_loses_nothing(make: StreamMaker) -> None:
    async with make() as (a, b):
        with anyio.move_on_after(0.05):
            await b.receive()
        await a.send(b"after cancel")
        assert await _read_exactly(b, 12) == b"after cancel"


async def _check_backpressure(make: StreamMaker) -> None:
    async with make() as (a, b):
        sent = 0
        chunk = b"w" * 65536
        with anyio.move_on_after(1.0):
            while sent < 256 << 20:
                await a.send(chunk)
                sent += len(chunk)
        assert sent < 256 << 20, "a writer whose reader never reads was never blocked"
        with contextlib.suppress(Exception):
            await b.aclose()


CHECKS = (
    _check_transfer,
    _check_max_bytes,
    _check_half_close,
    _check_aclose,
    _check_busy,
    _check_cancelled_receive_loses_nothing,
    _check_backpressure,
)


_SEND_AFTER_EOF: contextvars.ContextVar[tuple[type[BaseException], ...]] = contextvars.ContextVar(
    "send_after_eof", default=(anyio.ClosedResourceError,)
)


async def check_byte_stream(
    make: StreamMaker,
    *,
    send_after_eof_raises: tuple[type[BaseException], ...] = (anyio.ClosedResourceError,),
    skip: Collection[str] = (),
) -> None:
    """Run every conformance check against fresh pairs from ``make``.

    Args:
        make: returns an async context manager yielding a connected pair.
        send_after_eof_raises: what ``send`` after ``send_eof`` may raise
            (capsock: ``ClosedResourceError``; anyio's asyncio TCP streams
            raise ``RuntimeError`` there).
        skip: names of checks to leave out (``"backpressure"``, ...), for
            streams that knowingly do not promise them.

    Raises:
        AssertionError: naming the first contract the streams break.
    """
    _SEND_AFTER_EOF.set(send_after_eof_raises)
    for check in CHECKS:
        if check.__name__.removeprefix("_check_") in skip:
            continue
        try:
            with anyio.fail_after(60):
                await check(make)
        except AssertionError as exc:
            raise AssertionError(f"{check.__name__.removeprefix('_check_')}: {exc}") from exc
