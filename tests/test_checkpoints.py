"""Stream.receive, send, send_eof and aclose are checkpoints, like anyio's own streams.

Each is a cancellation point (a call in a cancelled scope raises the backend's
cancellation, also when it could finish at once) and a scheduling point (a loop
of calls that never block lets another task run).  Scheduling is counted, not
timed: a ticker task counts its turns while the loop runs.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import anyio
import anyio.lowlevel
import pytest

import capsock
from capsock.net.stream import Stream
from capsock.testing import read_to_eof, stream_pair

pytestmark = pytest.mark.anyio

CALLS = 200


@asynccontextmanager
async def ticker() -> AsyncIterator[list[int]]:
    """A task that counts its turns in ``counter[0]`` while the body runs."""
    counter = [0]

    async def tick() -> None:
        while True:
            counter[0] += 1
            await anyio.lowlevel.checkpoint()

    async with anyio.create_task_group() as tg:
        tg.start_soon(tick)
        yield counter
        tg.cancel_scope.cancel()


async def loop_lets_others_run(call: Callable[[], Awaitable[object]]) -> int:
    async with ticker() as turns:
        for _ in range(CALLS):
            await call()
        return turns[0]


async def buffered(stream: Stream, n: int) -> None:
    with anyio.fail_after(30):
        while stream.buffered < n:
            await anyio.wait_all_tasks_blocked()


async def test_receive_with_data_ready_is_a_cancellation_point_and_loses_nothing() -> None:
    async with stream_pair() as (a, b):
        await a.send(b"ready")
        await buffered(b, 5)
        with anyio.CancelScope() as scope:
            scope.cancel()
            await b.receive()
        assert scope.cancelled_caught, "receive() returned data in a cancelled scope"
        assert b.buffered == 5
        assert await b.receive() == b"ready"


async def test_receive_at_eof_is_a_cancellation_point() -> None:
    async with stream_pair() as (a, b):
        await a.send_eof()
        with anyio.fail_after(30):
            while not b._eof:
                await anyio.wait_all_tasks_blocked()
        with anyio.CancelScope() as scope:
            scope.cancel()
            await b.receive()
        assert scope.cancelled_caught
        with pytest.raises(anyio.EndOfStream):
            await b.receive()


async def test_a_busy_loop_of_receive_lets_other_tasks_run() -> None:
    async with stream_pair() as (a, b):
        await a.send(b"r" * CALLS)
        await buffered(b, CALLS)
        turns = await loop_lets_others_run(lambda: b.receive(1))
        assert turns >= CALLS // 2, f"{CALLS} receive() calls gave another task {turns} turns"


async def test_send_is_a_cancellation_point_and_queues_nothing_then() -> None:
    async with stream_pair() as (a, b):
        with anyio.CancelScope() as scope:
            scope.cancel()
            await a.send(b"never")
        assert scope.cancelled_caught, "send() finished in a cancelled scope"
        await a.send(b"after")
        await a.send_eof()
        assert await read_to_eof(b) == b"after"


async def test_a_busy_loop_of_send_lets_other_tasks_run() -> None:
    async with stream_pair() as (a, b):
        turns = await loop_lets_others_run(lambda: a.send(b"s"))
        assert turns >= CALLS // 2, f"{CALLS} send() calls gave another task {turns} turns"
        await a.send_eof()
        assert await read_to_eof(b) == b"s" * CALLS


async def test_send_eof_is_a_cancellation_point_and_does_not_half_close_then() -> None:
    async with stream_pair() as (a, b):
        with anyio.CancelScope() as scope:
            scope.cancel()
            await a.send_eof()
        assert scope.cancelled_caught, "send_eof() finished in a cancelled scope"
        await a.send(b"still open")  # not half-closed
        await a.send_eof()
        assert await read_to_eof(b) == b"still open"


async def test_a_loop_of_send_eof_lets_other_tasks_run() -> None:
    async with stream_pair() as (a, b):
        turns = await loop_lets_others_run(a.send_eof)
        assert turns >= CALLS // 2, f"{CALLS} send_eof() calls gave another task {turns} turns"
        assert await read_to_eof(b) == b""


async def test_aclose_is_a_cancellation_point_and_closes_even_then() -> None:
    async with stream_pair() as (a, b):
        await a.send(b"sent before")
        with anyio.CancelScope() as scope:
            scope.cancel()
            await a.aclose()
        assert scope.cancelled_caught, "aclose() finished in a cancelled scope"
        with pytest.raises(anyio.ClosedResourceError):
            await a.receive()
        assert await read_to_eof(b) == b"sent before"  # closed cleanly, data first


async def test_a_loop_of_aclose_lets_other_tasks_run() -> None:
    async with stream_pair() as (a, _b):
        turns = await loop_lets_others_run(a.aclose)
        assert turns >= CALLS // 2, f"{CALLS} aclose() calls gave another task {turns} turns"


async def test_a_listener_closed_in_a_cancelled_scope_closes_every_queued_stream() -> None:
    """Stream.aclose can now raise the caller's cancellation: closing a
    listener's queue of unaccepted streams must not stop at the first."""
    async with capsock.Node(listen=["tcp:127.0.0.1:0"]) as server, capsock.Node() as client:
        listener = await server.listen()
        dialed = [await client.connect(listener.uri) for _ in range(3)]
        with anyio.CancelScope() as scope:
            scope.cancel()
            await listener.aclose()
        with pytest.raises(anyio.ClosedResourceError):
            await listener.accept()
        for stream in dialed:  # each queued stream was closed: its dialer sees the end
            with (
                anyio.fail_after(30),
                pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)),
            ):
                while True:
                    await stream.receive()
            await stream.aclose()
