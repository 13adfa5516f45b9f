"""Test helpers for capsock users (and capsock itself).

* :func:`stream_pair` -- two connected capsock streams between two fresh nodes.
* :func:`check_byte_stream` -- a conformance suite for any ``anyio.abc.ByteStream``
  pair, in the spirit of trio's ``check_two_way_stream`` and
  ``check_half_closeable_stream``.  capsock runs it against every kind of stream
  it makes; run it against your own wrappers too.
* Pumps for the sans-IO layers, with a :class:`FakeClock` instead of real time
  (no event loop, no sockets, no sleeps): :func:`handshake_pair` (two
  completed handshakes), :class:`MuxPair` (two muxes whose frames are moved by
  :meth:`MuxPair.pump`) and :class:`EnginePair` (two session engines whose
  records are moved by :meth:`EnginePair.pump`, and whose keepalive, dead-peer,
  idle and drain deadlines fire when :meth:`EnginePair.advance` moves the clock).

The suite asserts the contract capsock promises and anyio code relies on:
bytes arrive once, in order, within ``max_bytes``; ``send_eof`` half-closes
(the peer reads everything, then ``EndOfStream``, again and again, and can
still send back); ``aclose`` is idempotent, makes local use raise
``ClosedResourceError``, gives the peer a clean ``EndOfStream`` after the data
and makes the peer's further sends fail with ``BrokenResourceError``;
concurrent use of one direction raises ``BusyResourceError``; a cancelled
``receive`` loses nothing; a writer whose reader does not read is blocked
rather than buffered without bound; ``receive``, ``send``, ``send_eof`` and
``aclose`` are checkpoints (a cancellation point and a turn for other tasks on
every call, as trio's suite asserts).  It needs no real time: it waits with
``anyio.wait_all_tasks_blocked()`` and counts turns, never sleeps.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import anyio
import anyio.abc
import anyio.lowlevel

from .config import MuxConfig, SessionConfig
from .core._session_engine import SessionEngine, TimerEvent
from .core.handshake import HandshakeResult, InitiatorHandshake, ResponderHandshake
from .core.mux import Event, Mux
from .core.records import PREFIX_LEN
from .keys import KeyPair
from .net.stream import Stream
from .node import Listener, Node

__all__ = [
    "EnginePair",
    "FakeClock",
    "MuxPair",
    "StreamMaker",
    "check_byte_stream",
    "echo",
    "handshake_pair",
    "read_to_eof",
    "stream_pair",
]

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
            with anyio.CancelScope(shield=True):  # one cancelled aclose skips no other
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
        try:
            while True:  # bounded by the suite's overall deadline
                await b.send(b"y" * 65536)
                await anyio.lowlevel.checkpoint()  # even for a send that is none
        except anyio.BrokenResourceError:
            pass


async def _check_busy(make: StreamMaker) -> None:
    async with make() as (a, b), anyio.create_task_group() as tg:
        tg.start_soon(b.receive)
        await anyio.wait_all_tasks_blocked()  # the first receive is waiting
        try:
            await b.receive()
        except anyio.BusyResourceError:
            pass
        else:
            raise AssertionError("concurrent receive must raise BusyResourceError")
        # Clog the a->b direction: the second concurrent sender must be refused.
        big = b"z" * (64 << 20)
        tg.start_soon(a.send, big)
        await anyio.wait_all_tasks_blocked()  # the first send is stuck on backpressure
        try:
            await a.send(b"second writer")
        except anyio.BusyResourceError:
            pass
        else:
            raise AssertionError("concurrent send must raise BusyResourceError")
        tg.cancel_scope.cancel()


async def _check_cancelled_receive_loses_nothing(make: StreamMaker) -> None:
    async with make() as (a, b):
        scope = anyio.CancelScope()
        got: list[bytes] = []

        async def receive() -> None:
            with scope:
                got.append(await b.receive())

        async with anyio.create_task_group() as tg:
            tg.start_soon(receive)
            await anyio.wait_all_tasks_blocked()  # the receive is waiting
            scope.cancel()
        assert scope.cancelled_caught and not got, "a waiting receive was not cancelled"
        await a.send(b"after cancel")
        assert await _read_exactly(b, 12) == b"after cancel"


async def _check_backpressure(make: StreamMaker) -> None:
    limit = 256 << 20
    async with make() as (a, b):
        sent = 0

        async def write() -> None:
            nonlocal sent
            chunk = b"w" * 65536
            while sent < limit:
                await a.send(chunk)
                sent += len(chunk)

        async with anyio.create_task_group() as tg:
            tg.start_soon(write)
            await anyio.wait_all_tasks_blocked()  # the writer blocked, or wrote it all
            tg.cancel_scope.cancel()
        assert sent < limit, "a writer whose reader never reads was never blocked"
        with contextlib.suppress(Exception):
            await b.aclose()


async def _loop_turns(call: Callable[[], Awaitable[object]], calls: int) -> int:
    """How many turns a ticking task got while ``call()`` ran ``calls`` times."""
    turns = 0

    async def tick() -> None:
        nonlocal turns
        while True:
            turns += 1
            await anyio.lowlevel.checkpoint()

    async with anyio.create_task_group() as tg:
        tg.start_soon(tick)
        for _ in range(calls):
            await call()
        tg.cancel_scope.cancel()
    return turns


async def _check_checkpoints(make: StreamMaker) -> None:
    """Each method is a checkpoint (trio's rule, anyio's streams): a call in a
    cancelled scope raises the cancellation even when it could finish at once,
    and a loop of calls that never block lets other tasks run.  Turns are
    counted, never timed."""
    calls = 50
    skipped = _NO_CHECKPOINT.get()

    async def cancelled(call: Callable[[], Awaitable[object]]) -> bool:
        with anyio.CancelScope() as scope:
            scope.cancel()
            await call()
        return scope.cancelled_caught

    async def ready(a: anyio.abc.ByteStream, b: anyio.abc.ByteStream, n: int) -> None:
        # One send, one byte read: the other n bytes of it are now at b (on
        # asyncio, "all tasks blocked" does not mean loopback bytes arrived).
        await a.send(b"r" * (n + 1))
        assert await b.receive(1) == b"r"

    if "receive" not in skipped:
        async with make() as (a, b):
            await ready(a, b, 1)
            assert await cancelled(b.receive), "receive with data ready is no cancellation point"
            assert await b.receive() == b"r", "a cancelled receive lost data"
        async with make() as (a, b):
            await ready(a, b, calls)
            turns = await _loop_turns(lambda: b.receive(1), calls)
            assert turns >= calls // 2, f"{calls} ready receive() calls let others run {turns}x"
    if "send" not in skipped:
        async with make() as (a, _b):
            assert await cancelled(lambda: a.send(b"x")), "send is no cancellation point"
        async with make() as (a, _b):
            turns = await _loop_turns(lambda: a.send(b"s"), calls)
            assert turns >= calls // 2, f"{calls} send() calls let others run {turns}x"
    if "send_eof" not in skipped:
        async with make() as (a, _b):
            assert await cancelled(a.send_eof), "send_eof is no cancellation point"
        async with make() as (a, _b):
            turns = await _loop_turns(a.send_eof, calls)
            assert turns >= calls // 2, f"{calls} send_eof() calls let others run {turns}x"
    if "aclose" not in skipped:
        async with make() as (a, _b):
            assert await cancelled(a.aclose), "aclose is no cancellation point"
            try:
                await a.receive()
            except anyio.ClosedResourceError:
                pass
            else:
                raise AssertionError("a cancelled aclose must still close the stream")
        async with make() as (a, _b):
            turns = await _loop_turns(a.aclose, calls)
            assert turns >= calls // 2, f"{calls} aclose() calls let others run {turns}x"


CHECKS = (
    _check_transfer,
    _check_max_bytes,
    _check_half_close,
    _check_aclose,
    _check_busy,
    _check_cancelled_receive_loses_nothing,
    _check_backpressure,
    _check_checkpoints,
)


_SEND_AFTER_EOF: contextvars.ContextVar[tuple[type[BaseException], ...]] = contextvars.ContextVar(
    "send_after_eof", default=(anyio.ClosedResourceError,)
)
_NO_CHECKPOINT: contextvars.ContextVar[Collection[str]] = contextvars.ContextVar(
    "no_checkpoint", default=()
)


async def check_byte_stream(
    make: StreamMaker,
    *,
    send_after_eof_raises: tuple[type[BaseException], ...] = (anyio.ClosedResourceError,),
    skip: Collection[str] = (),
    no_checkpoint: Collection[str] = (),
) -> None:
    """Run every conformance check against fresh pairs from ``make``.

    Args:
        make: returns an async context manager yielding a connected pair.
        send_after_eof_raises: what ``send`` after ``send_eof`` may raise
            (capsock: ``ClosedResourceError``; anyio's asyncio TCP streams
            raise ``RuntimeError`` there).
        skip: names of checks to leave out (``"backpressure"``,
            ``"checkpoints"``, ...), for streams that knowingly do not promise them.
        no_checkpoint: methods (``"receive"``, ``"send"``, ``"send_eof"``,
            ``"aclose"``) the checkpoints check leaves out (anyio's asyncio TCP
            ``send_eof`` is no checkpoint).

    The suite never sleeps: it waits with ``anyio.wait_all_tasks_blocked()``
    and counts turns instead of timing them (one overall deadline per check
    only turns a hang into a failure).

    Raises:
        AssertionError: naming the first contract the streams break.
    """
    _SEND_AFTER_EOF.set(send_after_eof_raises)
    _NO_CHECKPOINT.set(no_checkpoint)
    for check in CHECKS:
        if check.__name__.removeprefix("_check_") in skip:
            continue
        try:
            with anyio.fail_after(60):
                await check(make)
        except AssertionError as exc:
            raise AssertionError(f"{check.__name__.removeprefix('_check_')}: {exc}") from exc


# ------------------------------------------------------------------ sans-IO pumps


class FakeClock:
    """Monotonic seconds that move only when told (:meth:`advance`); callable like
    ``anyio.current_time``."""

    def __init__(self, start: float = 0.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        """Move the clock forward by ``seconds``; returns the new time."""
        if seconds < 0:
            raise ValueError("a monotonic clock does not go back")
        self.now += seconds
        return self.now

    def __repr__(self) -> str:
        return f"FakeClock({self.now!r})"


def handshake_pair(
    dialer: KeyPair | None = None, responder: KeyPair | None = None
) -> tuple[HandshakeResult, HandshakeResult]:
    """Run a complete IK handshake in memory: ``(dialer's result, responder's result)``.

    Fresh key pairs unless given.  The results' ciphers talk to each other."""
    dialer = dialer or KeyPair.generate()
    responder = responder or KeyPair.generate()
    init = InitiatorHandshake(dialer, responder.node_id)
    resp = ResponderHandshake(responder)
    resp.read_first(init.first_record()[PREFIX_LEN:])
    record, responder_result = resp.second_record()
    return init.read_second(record[PREFIX_LEN:]), responder_result


class MuxPair:
    """Two connected :class:`~capsock.core.mux.Mux` objects: ``dialer`` and ``responder``.

    :meth:`pump` moves what each queued to the other, message by message, until
    both are quiet, and returns the events each side received."""

    def __init__(
        self, config: MuxConfig | None = None, *, responder_config: MuxConfig | None = None
    ) -> None:
        self.dialer = Mux(dialer=True, config=config)
        self.responder = Mux(dialer=False, config=responder_config or config)

    def pump(self, *, max_rounds: int = 10_000) -> tuple[list[Event], list[Event]]:
        """``(events at the dialer, events at the responder)`` until no output is left.

        Raises:
            ProtocolError: what a side's ``receive_message`` raised.
            RuntimeError: still not quiet after ``max_rounds`` messages.
        """
        at_dialer: list[Event] = []
        at_responder: list[Event] = []
        for _ in range(max_rounds):
            moved = False
            if (out := self.dialer.data_to_send()) is not None:
                at_responder += self.responder.receive_message(out)
                moved = True
            if (out := self.responder.data_to_send()) is not None:
                at_dialer += self.dialer.receive_message(out)
                moved = True
            if not moved:
                return at_dialer, at_responder
        raise RuntimeError(f"the muxes were still talking after {max_rounds} messages")


class EnginePair:
    """Two connected session engines (:mod:`capsock.core._session_engine`) and one
    :class:`FakeClock`, for tests of session rules without an event loop.

    ``pump()`` moves records between them; ``advance(seconds)`` moves the clock
    and fires every deadline that falls due on the way, in order, pumping
    between them, so a keepalive PING is answered before the dead-peer deadline
    is looked at.  ``dialer_to_responder`` / ``responder_to_dialer`` set to
    False cut that direction (what is sent is lost, as on a dead path).
    """

    def __init__(
        self,
        config: SessionConfig | None = None,
        *,
        responder_config: SessionConfig | None = None,
        clock: FakeClock | None = None,
    ) -> None:
        self.clock = clock or FakeClock()
        dialer_result, responder_result = handshake_pair()
        self.dialer = SessionEngine(
            dialer_result.cipher, dialer=True, config=config or SessionConfig()
        )
        self.responder = SessionEngine(
            responder_result.cipher,
            dialer=False,
            config=responder_config or config or SessionConfig(),
        )
        self.dialer_to_responder = True
        self.responder_to_dialer = True
        self.dialer.start(self.clock.now)
        self.responder.start(self.clock.now)

    def pump(
        self, *, max_rounds: int = 10_000
    ) -> tuple[list[Event | object], list[Event | object]]:
        """Move records both ways until both are quiet: ``(events at the dialer,
        events at the responder)`` (mux events, and ``PeerConfirmed``).

        Raises:
            ProtocolError: a side broke the protocol (that engine is poisoned).
        """
        at_dialer: list[Event | object] = []
        at_responder: list[Event | object] = []
        for _ in range(max_rounds):
            moved = self._move(self.dialer, self.responder, self.dialer_to_responder, at_responder)
            moved |= self._move(self.responder, self.dialer, self.responder_to_dialer, at_dialer)
            if not moved:
                return at_dialer, at_responder
        raise RuntimeError(f"the engines were still talking after {max_rounds} writes")

    def _move(
        self, src: SessionEngine, dst: SessionEngine, open_: bool, events: list[Event | object]
    ) -> bool:
        data = src.data_to_send()
        if data is None:
            src.output_flushed()
            return False
        if open_:
            dst.receive_data(bytes(data), self.clock.now)
            while (got := dst.next_events()) is not None:
                events += got
        return True

    def next_deadline(self) -> float | None:
        """The earlier of the two engines' next deadlines."""
        both = (self.dialer.next_deadline(), self.responder.next_deadline())
        deadlines = [d for d in both if d is not None]
        return min(deadlines) if deadlines else None

    def advance(self, seconds: float) -> list[tuple[str, TimerEvent]]:
        """Move the clock by ``seconds``, firing each deadline due on the way (and
        pumping after each); returns ``(side, event)`` pairs, side ``"dialer"``
        or ``"responder"``."""
        end = self.clock.now + seconds
        fired: list[tuple[str, TimerEvent]] = []
        stalled = 0
        while (deadline := self.next_deadline()) is not None and deadline <= end:
            if deadline <= self.clock.now:
                stalled += 1
                if stalled > 100:
                    raise RuntimeError(f"a deadline at {deadline} keeps firing without effect")
            self.clock.now = max(self.clock.now, deadline)
            for side, engine in (("dialer", self.dialer), ("responder", self.responder)):
                fired += [(side, ev) for ev in engine.handle_timer(self.clock.now)]
            self.pump()
        self.clock.now = end
        return fired
