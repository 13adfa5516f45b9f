"""anyio glue: one transport + one Noise session + one mux -> many Streams.

Theory of operation
-------------------
:func:`dial_handshake` / :func:`accept_handshake` run the IK handshake over any
anyio byte stream.  A :class:`Session` then drives the sans-IO
:class:`~capsock.core._session_engine.SessionEngine` (which decides who speaks
first, keepalive, idle, GOAWAY and drain, the abort on a protocol error) and
runs three tasks: the *reader* feeds received bytes to the engine, handing the
events to :class:`~capsock.net.stream.Stream` objects; the *writer* sends what
the engine encrypted; the *timer* sleeps until the engine's one deadline.
The reader never waits for the writer, so two peers that both write a lot
cannot deadlock each other; what the reader queues for the writer (WINDOW,
PONG, REJECT) is bounded by the mux.

When the transport ends without a GOAWAY, or anything arrives that fails
authentication or the protocol, every open stream fails with
:class:`~capsock.errors.ConnectionLost` -- never a clean end of stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import struct
import warnings
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel

from .._logs import LimitedLog
from ..config import SessionConfig
from ..core._session_engine import (
    DRAIN_LIMIT,
    Ending,
    IdleExpired,
    PeerConfirmed,
    PeerSilent,
    Phase,
    SessionEngine,
    TimerEvent,
)
from ..core.handshake import HandshakeResult, InitiatorHandshake, ResponderHandshake
from ..core.mux import (
    ControlReceived,
    CreditGranted,
    DataReceived,
    EofReceived,
    Event,
    GoAwayReceived,
    OpenRequested,
    PongReceived,
    ResetReceived,
    StreamAccepted,
    StreamRejected,
)
from ..errors import (
    CapabilityRejected,
    CapsockError,
    ErrorCode,
    HandedOver,
    HandshakeError,
    LocalUsageError,
    PeerAuthenticationError,
    ProtocolError,
)
from ..keys import KeyPair, NodeId
from ..uri import Capability
from ._pushio import PushTransport, adopt
from .stream import ConnectionLostError, Stream

__all__ = ["Session", "SessionConfig", "accept_handshake", "dial_handshake"]

log = logging.getLogger("capsock.net.session")
_peer_log = LimitedLog(log, per_window=20, window=10.0)
"""Lines about sessions a peer breaks or abandons: a stranger controls how many."""

_LEN = struct.Struct(">H")
_MAX_FIRST_MESSAGE = 1024
_READ_SIZE = 1024 * 1024
_INLINE_YIELD_EVERY = 16


async def _read_exact(transport: anyio.abc.ByteStream, n: int, buf: bytearray) -> bytes:
    while len(buf) < n:
        buf += await transport.receive(max(n - len(buf), 4096))
    out = bytes(buf[:n])
    del buf[:n]
    return out


async def _read_handshake_record(
    transport: anyio.abc.ByteStream, buf: bytearray, max_len: int
) -> bytes:
    (length,) = _LEN.unpack(await _read_exact(transport, 2, buf))
    if not 0 < length <= max_len:
        raise HandshakeError(f"handshake record of {length} bytes (expected at most {max_len})")
    return await _read_exact(transport, length, buf)


async def dial_handshake(
    transport: anyio.abc.ByteStream, local: KeyPair, remote: NodeId
) -> tuple[HandshakeResult, bytes]:
    """Run the initiator's side of the IK handshake; return the result and leftover bytes.

    Raises:
        PeerAuthenticationError: the node does not hold ``remote``'s key (it hung
            up on our first message, or its answer failed authentication).
        HandshakeError: the answer was malformed.
        LocalUsageError: ``remote`` is this node's own id.
    """
    hs = InitiatorHandshake(local, remote, dialled_id=True)  # the exact id: never its twin
    await transport.send(hs.first_record())
    buf = bytearray()
    try:
        message = await _read_handshake_record(transport, buf, 65535)
    except (anyio.EndOfStream, anyio.BrokenResourceError, ConnectionError) as exc:
        raise PeerAuthenticationError(
            "what answered there hung up during the handshake: it is not the node "
            f"{remote.short()}... named in the capability (another node, or not a "
            "capsock node at all); check that the URI is complete and current"
        ) from exc
    return hs.read_second(message), bytes(buf)


async def accept_handshake(
    transport: anyio.abc.ByteStream,
    local: KeyPair,
    *,
    screen: Callable[[bytes], None] | None = None,
    hello: Callable[[anyio.abc.ByteStream, bytearray], Awaitable[None]] | None = None,
) -> tuple[HandshakeResult, bytes]:
    """Run the responder's side of the IK handshake; return the result and leftover bytes.

    ``screen(message)`` sees message 1 before any public-key work and may raise
    (a replay, a source over its rate) to drop the connection cheaply.

    ``hello(transport, buffered)``: when the connection starts with the two
    bytes ``00 00`` (a record of length 0, which no handshake starts with:
    the splice hello of protocol 10.10), it is given the transport and what
    was read after those two bytes.  It either takes the transport (returns;
    :class:`HandedOver` is raised, and the caller must leave the transport
    alone) or raises (the caller drops the connection as for a bad handshake).

    Raises:
        HandshakeError: malformed, oversized or unauthentic first message (or
            whatever ``screen`` raised).
        PeerAuthenticationError: the claimed Ed25519 key does not match the static key.
        anyio.EndOfStream: the dialer hung up.
    """
    hs = ResponderHandshake(local)
    buf = bytearray()
    if hello is not None:
        head = await _read_exact(transport, 2, buf)
        if head == b"\x00\x00":
            await hello(transport, buf)
            raise HandedOver
        buf[:0] = head  # a handshake: read its record as usual
    message = await _read_handshake_record(transport, buf, _MAX_FIRST_MESSAGE)
    if screen is not None:
        screen(message)
    hs.read_first(message)
    if buf:
        raise HandshakeError("dialer sent data before the handshake finished")
    record, result = hs.second_record()
    await transport.send(record)
    return result, bytes(buf)


class _OpenWaiter:
    __slots__ = ("capability", "event", "outcome")

    def __init__(self, capability: Capability | None) -> None:
        self.capability = capability
        self.event = anyio.Event()
        self.outcome: Stream | BaseException | None = None


OpenHandler = Callable[["Session", int, bytes], Coroutine[Any, Any, None] | None]
"""Called for each OPEN: answers it at once, or returns a coroutine that will
(run in the session's task group: waiting for a full backlog, say)."""


class Session:
    """One authenticated, encrypted connection to one peer, carrying many streams.

    The anyio driver of a :class:`~capsock.core._session_engine.SessionEngine`: the
    engine decides (who speaks first, keepalive, idle, GOAWAY and drain, the
    abort on a protocol error); the session moves bytes between the engine
    and the transport, arms one timer at :meth:`SessionEngine.next_deadline`,
    and hands the mux's events to its :class:`~capsock.net.stream.Stream` objects.
    """

    def __init__(
        self,
        transport: anyio.abc.ByteStream,
        result: HandshakeResult,
        *,
        leftover: bytes = b"",
        route: str,
        config: SessionConfig | None = None,
        on_open: OpenHandler | None = None,
        monotonic_clock: Callable[[], float] = anyio.current_time,
        clock: Callable[[], float] | None = None,
    ) -> None:
        if clock is not None:
            warnings.warn(
                "Session(clock=) is now Session(monotonic_clock=)", DeprecationWarning, stacklevel=2
            )
            monotonic_clock = clock
        self.config = config or SessionConfig()
        self.peer: NodeId = result.peer
        self.handshake_hash: bytes = result.handshake_hash
        self.route = route
        self.dialer = result.is_initiator
        # Records are written to _transport and read from _read_transport (the
        # same object, except while _replace_transport moves them).
        self._transport: anyio.abc.ByteStream | PushTransport = transport
        self._read_transport: anyio.abc.ByteStream | PushTransport = transport
        self._next_read: anyio.abc.ByteStream | PushTransport | None = None
        self._next_write: anyio.abc.ByteStream | PushTransport | None = None
        self._engine = SessionEngine(
            result.cipher, dialer=result.is_initiator, config=self.config, leftover=leftover
        )
        self._mux = self._engine.mux
        self._mux.deliver = self._deliver  # DATA alone in a record: no event object
        self._on_open = on_open
        self._clock = monotonic_clock
        self._streams: dict[int, Stream] = {}
        self._opening: dict[int, _OpenWaiter] = {}
        self._wake: anyio.Event | None = None
        self._send_busy = False  # a task is inside _flush_once (writer or inline)
        self._send_waiters: set[Stream] = set()  # blocked on session credit or buffer room
        self._send_baton: Stream | None = None  # the waiter woken last, until it runs
        self._inline_writes = 0
        self._goaway_logged = False
        # OPENs answered by a task of their own (_answer_later), by stream id.
        self._answering: dict[int, anyio.CancelScope] | None = None
        self._control_logged = False
        self.on_confirmed: Callable[[Session], None] | None = None
        """Called synchronously when the dialer's first record authenticated."""
        self.confirmed = anyio.Event()
        """Set once the dialer's first transport record authenticated (at once
        for the dialer's own side): until then the handshake may be a replay."""
        if result.is_initiator:
            self.confirmed.set()
        self._tg: anyio.abc.TaskGroup | None = None
        self._ending = False  # _end() was called
        self._timer_wake: anyio.Event | None = None
        self._armed = math.inf  # the deadline the timer sleeps until
        self._open_slots = anyio.Semaphore(self.config.max_concurrent_opens)
        self.ready = anyio.Event()
        self.finished = anyio.Event()

    def __repr__(self) -> str:
        return f"<capsock.Session peer={self.peer.short()} route={self.route}>"

    # ---------------------------------------------------------- state

    @property
    def is_usable(self) -> bool:
        """Whether new streams may be opened on this session."""
        return self._engine.is_usable

    @property
    def _closed_reason(self) -> str | None:
        """Why the session ended or is ending (the engine's word), None while it runs."""
        return self._engine.reason

    def stats(self) -> dict[str, int]:
        """Streams, bytes, buffered bytes and windows of this session."""
        stats = self._mux.stats()
        stats["stream_objects"] = len(self._streams)
        stats["buffered_unread"] = sum(s.buffered for s in self._streams.values())
        return stats

    # ---------------------------------------------------------- running

    async def run(self) -> None:
        """Pump the session until the transport ends or :meth:`aclose` is called."""
        engine = self._engine
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                engine.start(self._clock())
                tg.start_soon(self._guard, self._writer)
                tg.start_soon(self._guard, self._timer)
                if self.config.push_reads and not isinstance(self._transport, PushTransport):
                    pushed = adopt(self._transport)
                    if pushed is not None:
                        self._transport = self._read_transport = pushed
                self.ready.set()
                if engine.phase is Phase.CLOSED:  # closed before it ran (close_now)
                    self._end()
                await self._guard(self._reading)
        finally:
            self._tg = None
            engine.connection_lost("the session was closed")  # keeps an earlier reason
            self._fail_all(engine.reason or "the session was closed")
            with anyio.CancelScope(shield=True):
                closed: list[object] = []
                for t in (self._read_transport, self._transport, self._next_read, self._next_write):
                    if t is not None and not any(t is c for c in closed):
                        closed.append(t)
                        await t.aclose()
            self.finished.set()

    async def _guard(self, task: Callable[[], Awaitable[None]]) -> None:
        """Run one of the session's tasks; whatever ends it is mapped here, once."""
        engine = self._engine
        try:
            await task()
            reason = "the session was closed"
        except ProtocolError as exc:
            _peer_log.warning("session with %s closed: %s", self.peer.short(), str(exc))
            if engine.error is None:
                engine.fail(exc, self._clock())
            self._fail_all(engine.reason or f"protocol error: {exc}")
            if engine.phase is Phase.DRAINING:
                # The engine queued its GOAWAY: the writer sends it, the timer
                # bounds the wait, and either ends the session.
                self._kick()
                self._rearm()
                return
            reason = f"protocol error: {exc}"
        except anyio.EndOfStream:
            reason = "the peer closed the connection"
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            reason = _lost_reason(exc)
        engine.connection_lost(reason)
        self._end()

    def _end(self) -> None:
        """The engine is CLOSED (or the transport ended): stop every task, one
        event-loop turn from now.  The turn lets a read the loop already
        scheduled complete first: cancelling anyio's asyncio Unix-socket
        receive while its readiness callback is queued raises InvalidStateError
        in that callback."""
        tg = self._tg
        if tg is not None and not self._ending:
            self._ending = True
            tg.start_soon(self._cancel_after_a_turn, tg)

    @staticmethod
    async def _cancel_after_a_turn(tg: anyio.abc.TaskGroup) -> None:
        await anyio.lowlevel.checkpoint()
        tg.cancel_scope.cancel()

    def end(self, code: ErrorCode, reason: str) -> None:
        """End the session for the peer's behaviour: fail its streams, send
        what is queued and ``GOAWAY(code)`` (a bounded wait), then close.  The
        caller ignores the OPENs still in the record being processed; later
        ones are refused ``SHUTTING_DOWN`` by the mux, without a check."""
        if self._engine.reason is not None or self._tg is None:
            return
        self._engine.close(code, reason, self._clock(), Ending.PEER_BEHAVIOUR)
        self._fail_all(reason)
        self._after_close()

    def close_now(self) -> None:
        """Close at once, without GOAWAY or grace (unconfirmed or unwanted sessions)."""
        self._engine.close_now("the session was dropped")
        self._end()

    def abort(self) -> None:
        """Deprecated name of :meth:`close_now`."""
        warnings.warn(
            "Session.abort() is now Session.close_now()", DeprecationWarning, stacklevel=2
        )
        self.close_now()

    async def aclose(self, grace: float = 0.0) -> None:
        """Send GOAWAY, let open streams finish for up to ``grace`` seconds, then close."""
        engine = self._engine
        if engine.reason is not None or self.finished.is_set():
            return
        engine.go_away(ErrorCode.NO_ERROR)
        self._kick()
        if grace > 0:
            with anyio.move_on_after(grace):
                while self._streams or self._opening:  # noqa: ASYNC110 - cheap poll, shutdown only
                    await anyio.sleep(0.05)
        if engine.close(ErrorCode.NO_ERROR, "this node closed the session", self._clock()):
            self._after_close()
        with anyio.move_on_after(DRAIN_LIMIT + 1.0):
            await self.finished.wait()

    def _after_close(self) -> None:
        """The engine started to drain (or closed at once): let the writer and the timer see it."""
        if self._engine.phase is Phase.CLOSED:
            self._end()
        else:
            self._kick()
            self._rearm()

    def _replace_transport(self, new: anyio.abc.ByteStream) -> None:
        """Move the session's records to ``new``, between two records, both ways.

        The writer finishes the write in progress (records already taken from
        the engine), half-closes the old transport, and writes every later
        record to ``new``.  The reader reads the old transport up to its end
        (the peer's half-close, when the peer moved too), then reads ``new``:
        it switches at the point where the peer's writer switched, so no record
        is lost, duplicated or reordered.  Synchronous, so a caller reacting
        to a record switches before the reader reads anything further.  What
        agrees on the switch with the peer is not the session's business.
        """
        target: anyio.abc.ByteStream | PushTransport = new
        if self.config.push_reads:
            pushed = adopt(new)
            if pushed is not None:
                target = pushed
        self._next_read = target
        self._next_write = target
        if not self._send_busy:
            self._switch_writer()

    def _switch_writer(self) -> None:
        new = self._next_write
        if new is None:
            return
        self._next_write = None
        old, self._transport = self._transport, new
        if self._tg is not None:
            self._tg.start_soon(self._half_close, old)
        self._kick()

    async def _half_close(self, old: anyio.abc.ByteStream | PushTransport) -> None:
        with (
            anyio.CancelScope(shield=True),
            contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError, OSError),
        ):
            send_eof = getattr(old, "send_eof", None)
            if send_eof is not None:
                await send_eof()
            else:  # the asyncio fast path writes through an asyncio transport
                raw = getattr(old, "_transport", None)
                if raw is not None and raw.can_write_eof():
                    raw.write_eof()

    async def _reading(self) -> None:
        """Read the transport until it ends; at a replaced transport's end,
        go on with the new one."""
        while True:
            transport = self._read_transport
            try:
                if isinstance(transport, PushTransport):
                    await self._push_loop(transport)
                else:
                    await self._read_loop(transport)
            except anyio.EndOfStream:
                new = self._next_read
                if new is None:
                    raise
                self._next_read = None
                self._read_transport = new
                if transport is not self._transport:
                    with anyio.CancelScope(shield=True):
                        await transport.aclose()

    async def _read_loop(self, transport: anyio.abc.ByteStream) -> None:
        receive = self._engine.receive_data
        clock = self._clock
        while True:
            self._consume_records()
            receive(await transport.receive(_READ_SIZE), clock())

    async def _push_loop(self, transport: PushTransport) -> None:
        """The read loop of the asyncio fast path (:mod:`capsock.net._pushio`): records
        are consumed in the transport's callbacks; this task only waits for the
        end and raises it here, where :meth:`_guard` turns it into the reason."""
        ended = anyio.Event()
        outcome: list[BaseException] = []
        receive = self._engine.receive_data
        clock = self._clock
        if clock is anyio.current_time:  # the same clock, three calls fewer per chunk
            clock = asyncio.get_running_loop().time

        def on_data(data: bytes) -> None:
            if outcome:
                return
            try:
                receive(data, clock())
                self._consume_records()
            except Exception as exc:  # the same exceptions the read loop would raise
                outcome.append(exc)
                transport.stop_push()
                ended.set()

        def on_end(error: BaseException) -> None:
            if not outcome:
                outcome.append(error)
            ended.set()

        try:
            self._consume_records()  # the handshake's leftover
            transport.start_push(on_data, on_end)
            await ended.wait()
        finally:
            transport.stop_push()
        raise outcome[0]

    def _consume_records(self) -> None:
        """Dispatch the events of every complete record received so far."""
        engine = self._engine
        next_events = engine.next_events
        try:
            while (events := next_events()) is not None:
                if not events:
                    continue
                if type(events[0]) is PeerConfirmed:
                    self.confirmed.set()
                    if self.on_confirmed is not None:
                        self.on_confirmed(self)  # before anything the record asks for
                    continue
                self._dispatch(events)  # type: ignore[arg-type]
        except ProtocolError:
            # Fail the streams first: whatever their tasks do next (aclose, say)
            # must not queue a clean EOF behind the bad record.
            self._fail_all(engine.reason or "protocol error")
            raise
        if engine.has_output():
            self._kick()

    def _deliver(self, sid: int, data: memoryview) -> None:
        """The mux's hot path (:attr:`Mux.deliver`): what ``_dispatch`` does
        with a :class:`DataReceived`."""
        st = self._streams.get(sid)
        if st is None:
            self._mux.acknowledge_received_data(sid, len(data))
        else:
            st._on_data(data)

    def _dispatch(self, events: list[Event]) -> None:
        streams = self._streams
        for ev in events:
            if type(ev) is DataReceived:
                st = streams.get(ev.stream_id)
                if st is None:
                    self._mux.acknowledge_received_data(ev.stream_id, len(ev.data))
                else:
                    st._on_data(ev.data)
                continue
            match ev:
                case CreditGranted(0):
                    # One waiting stream at most (see _wake_senders): a flood of
                    # WINDOW(0) frames must not cost a pass over the streams each.
                    self._wake_senders()
                case CreditGranted(sid):
                    st = streams.get(sid)
                    if st is not None:
                        st._on_credit()
                case OpenRequested(sid, token):
                    if self._on_open is None or self._tg is None:
                        self._mux.reject_stream(sid, ErrorCode.REFUSED)
                    else:
                        later = self._on_open(self, sid, token)
                        if later is not None:
                            self._answer_later(sid, later)
                case StreamAccepted(sid):
                    waiter = self._opening.pop(sid, None)
                    if waiter is None:
                        self._mux.reset_stream(sid, ErrorCode.CANCELLED)
                    else:
                        st = Stream(self, sid, waiter.capability)
                        streams[sid] = st
                        waiter.outcome = st
                        waiter.event.set()
                        self._note_busy()
                case StreamRejected(sid, code):
                    waiter = self._opening.pop(sid, None)
                    if waiter is not None:
                        waiter.outcome = _rejection(self.peer, code)
                        waiter.event.set()
                        self._note_busy()
                case EofReceived(sid):
                    st = streams.get(sid)
                    if st is not None:
                        st._on_eof()
                        self._forget_if_done(sid)
                case ResetReceived(sid, code):
                    if self._answering is not None and sid not in streams:
                        # The peer gave up on an OPEN not answered yet: its
                        # answer's task ends now, not when it would have
                        # answered (a full backlog waits up to 2 s).  An
                        # accepted stream's task (a forwarded session) stays.
                        scope = self._answering.pop(sid, None)
                        if scope is not None:
                            scope.cancel()
                    waiter = self._opening.pop(sid, None)
                    if waiter is not None:
                        waiter.outcome = _rejection(self.peer, code)
                        waiter.event.set()
                        self._note_busy()
                    st = streams.get(sid)
                    if st is not None:
                        st._on_reset(code)
                        self._forget_if_done(sid)
                case GoAwayReceived(_, code):
                    # One line per session: the mux reports a GOAWAY at most
                    # twice (the first, and graceful -> error), never per frame.
                    if not self._goaway_logged:
                        self._goaway_logged = True
                        log.info("peer %s is going away (%s)", self.peer.short(), code.name)
                case PongReceived():
                    pass
                case ControlReceived():
                    if not self._control_logged:  # a flood of them: one line
                        self._control_logged = True
                        log.debug("ignoring CONTROL messages from %s", self.peer.short())

    def _answer_later(self, sid: int, answer: Coroutine[Any, Any, None]) -> None:
        """Run the answer to an OPEN in a task, cancelled if the peer resets
        the stream first.  The mux bounds pending OPENs, but a peer that
        resets each one in the same record frees its slot at once: without
        this, OPEN+RESET pairs would leave a task per frame waiting."""
        assert self._tg is not None
        scope = anyio.CancelScope()
        if self._answering is None:
            self._answering = {}
        self._answering[sid] = scope
        self._tg.start_soon(self._run_answer, sid, scope, answer)

    async def _run_answer(
        self, sid: int, scope: anyio.CancelScope, answer: Coroutine[Any, Any, None]
    ) -> None:
        try:
            with scope:
                await answer
        finally:
            if self._answering is not None and self._answering.get(sid) is scope:
                del self._answering[sid]

    def _forget_if_done(self, sid: int) -> None:
        st = self._streams.get(sid)
        if st is not None and st._closed and not self._mux.is_open(sid):
            del self._streams[sid]
            self._note_busy()

    async def _writer(self) -> None:
        # DESIGN §4.3: the engine has no output for an unconfirmed responder
        # (the first handshake message is replayable), so it waits here.
        engine = self._engine
        while True:
            while self._send_busy or not engine.has_output():
                draining = not self._send_busy and engine.phase is Phase.DRAINING
                if draining and engine.output_flushed():
                    self._end()
                event = self._wake = anyio.Event()
                await event.wait()
            self._send_busy = True
            try:
                await self._flush_once()
            finally:
                self._write_done()

    def _write_done(self) -> None:
        self._send_busy = False
        if self._next_write is not None:
            self._switch_writer()  # between two writes: see _replace_transport

    async def flush_inline(self) -> None:
        """Write what is queued from the calling task, if no write is in progress.

        Saves the hop to the writer task (an event-loop turn each way) for
        small messages.  The write is shielded from the caller's cancellation:
        records taken from the engine carry nonces, so one cut short would break
        the session; a write that cannot finish ends with the transport (the
        session closes it when it dies).  Otherwise the writer task is woken.
        """
        engine = self._engine
        if self._send_busy or engine.reason is not None or not engine.confirmed:
            self._kick()
            return
        self._send_busy = True
        try:
            transport = self._transport
            if type(transport) is PushTransport and transport.writable_now():
                # No cancel scope unless the write filled the socket's buffer:
                # then wait for it to drain, shielded, as send() does.
                self._flush_now(transport)
                if not transport.writable_now():
                    with anyio.CancelScope(shield=True):
                        await transport.drained()
            else:
                with anyio.CancelScope(shield=True):
                    await self._flush_once()
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            # What the writer task's failure would do: end the session.
            engine.connection_lost(_lost_reason(exc))
            self._end()
        finally:
            self._write_done()
        if engine.has_output() or engine.phase is Phase.DRAINING:
            self._kick()
        # The asyncio fast path writes without yielding, and a sender of many
        # small messages would otherwise hold the event loop until its credit
        # ran out: yield now and then.
        self._inline_writes += 1
        if self._inline_writes >= _INLINE_YIELD_EVERY:
            self._inline_writes = 0
            await anyio.lowlevel.cancel_shielded_checkpoint()

    def _flush_now(self, transport: PushTransport) -> None:
        """:meth:`_flush_once` for a socket with room (asyncio fast path): the
        write without the wait (the caller waits if it filled the buffer)."""
        data = self._engine.data_to_send()
        if data is not None:
            if self._send_waiters and not self._mux.send_buffer_full:
                self._wake_senders()
            transport.write_now(data)

    async def _flush_once(self) -> None:
        data = self._engine.data_to_send()
        if data is not None:
            if self._send_waiters and not self._mux.send_buffer_full:
                self._wake_senders()  # room again in the send buffer
            # A fresh buffer per write: the transport may keep a reference to it.
            await self._transport.send(data)  # type: ignore[arg-type]

    async def _timer(self) -> None:
        """The one timer: sleep until the engine's next deadline (woken when it
        moves earlier, see :meth:`_rearm`), then let the engine act."""
        engine = self._engine
        clock = self._clock
        while True:
            deadline = engine.next_deadline()
            wake = self._timer_wake = anyio.Event()
            if deadline is None:
                self._armed = math.inf
                await wake.wait()
                continue
            self._armed = deadline
            delay = deadline - clock()
            if delay > 0:
                with anyio.move_on_after(delay) as scope:
                    await wake.wait()
                if not scope.cancelled_caught:
                    continue  # the deadline moved: sleep again
            self._on_timer(engine.handle_timer(clock()))
            await anyio.lowlevel.checkpoint()  # never a busy loop, whatever the clock does

    def _on_timer(self, events: list[TimerEvent]) -> None:
        engine = self._engine
        for ev in events:
            if type(ev) is IdleExpired:
                log.info("closing idle session with %s", self.peer.short())
            elif type(ev) is PeerSilent:
                _peer_log.warning("session with %s: %s", self.peer.short(), engine.reason)
        if engine.phase is Phase.CLOSED:
            self._end()
        elif engine.has_output() or engine.phase is Phase.DRAINING:
            self._kick()

    def _rearm(self) -> None:
        """Wake the timer if the engine's next deadline moved before the armed one."""
        wake = self._timer_wake
        if wake is not None:
            deadline = self._engine.next_deadline()
            if deadline is not None and deadline < self._armed:
                self._armed = deadline
                wake.set()

    def _note_busy(self) -> None:
        """Tell the engine whether streams or opens are held (its idle rule)."""
        busy = bool(self._streams or self._opening)
        engine = self._engine
        if busy is not engine.busy:
            engine.set_busy(busy, self._clock())
            if not busy:
                self._rearm()

    def _kick(self) -> None:
        if self._wake is not None:
            self._wake.set()
            self._wake = None

    def _fail_all(self, reason: str) -> None:
        for st in list(self._streams.values()):
            st._on_lost(reason)
        self._streams.clear()
        for waiter in self._opening.values():
            waiter.outcome = _lost_error(self.peer, reason)
            waiter.event.set()
        self._opening.clear()

    # ---------------------------------------------------------- used by Node

    async def open_stream(self, token: bytes, capability: Capability | None = None) -> Stream:
        """Send OPEN and wait for the endpoint's answer.

        Raises:
            CapabilityRejected: the endpoint refused the capability.
            ConnectionLost: the session ended before the answer.
            TimeoutError: no answer within ``open_timeout``.
        """
        if not self.is_usable:
            raise _lost_error(self.peer, self._engine.reason or "the session is going away")
        async with self._open_slots:
            return await self._open_stream(token, capability)

    async def _open_stream(self, token: bytes, capability: Capability | None) -> Stream:
        if not self.is_usable:
            raise _lost_error(self.peer, self._engine.reason or "the session is going away")
        sid = self._mux.open_stream(token)
        waiter = _OpenWaiter(capability)
        self._opening[sid] = waiter
        self._note_busy()
        self._kick()
        try:
            with anyio.fail_after(self.config.open_timeout):
                await waiter.event.wait()
        except BaseException:
            self._opening.pop(sid, None)
            st = self._streams.pop(sid, None)
            self._note_busy()
            if self._engine.reason is None and (st is not None or self._mux.is_open(sid)):
                self._mux.reset_stream(sid, ErrorCode.CANCELLED)
                self._kick()
            raise
        outcome = waiter.outcome
        if isinstance(outcome, Stream):
            return outcome
        assert isinstance(outcome, BaseException)
        raise outcome

    def accept(self, sid: int, capability: Capability | None) -> Stream | None:
        """Accept a pending OPEN; None if the peer gave up meanwhile."""
        if not self._mux.is_open(sid) or self._engine.reason is not None:
            return None
        self._mux.accept_stream(sid)
        st = Stream(self, sid, capability)
        self._streams[sid] = st
        self._note_busy()
        self._kick()
        return st

    def reject(self, sid: int, code: ErrorCode = ErrorCode.REFUSED) -> None:
        """Refuse a pending OPEN."""
        self._mux.reject_stream(sid, code)
        self._kick()

    # ---------------------------------------------------------- used by Stream

    def wait_to_send(self, stream: Stream) -> None:
        """``stream`` found no credit or no buffer room.  Out of its own credit,
        it waits for its own WINDOW (which wakes it directly); otherwise it was
        the session's credit or the send buffer, and it waits its turn here."""
        if self._mux.stream_send_credit(stream.stream_id) > 0:
            self._send_waiters.add(stream)

    def done_waiting(self, stream: Stream) -> None:
        """``stream``'s sender resumed (or gave up): if it held the baton, pass it on."""
        self._send_waiters.discard(stream)
        if self._send_baton is stream:
            self._send_baton = None
            self._wake_senders()

    def _wake_senders(self) -> None:
        """Session credit or send-buffer room appeared: wake one waiting stream.

        One at a time, as a baton: the woken sender, once it runs, wakes the
        next (in :meth:`done_waiting`) while room is left, then takes what it
        can.  So a grant wakes as many senders as can use it, plus one, and a
        peer sending WINDOW(0, 1) records wakes one sender per record, not
        every waiting stream (a waiter always has credit of its own, so each
        one woken either sends or ends the chain).
        """
        waiters = self._send_waiters
        if self._send_baton is None and waiters and self._mux.session_send_room() > 0:
            st = self._send_baton = waiters.pop()
            st._on_credit()

    def send_data(self, sid: int, data: memoryview, *, kick: bool = True) -> int:
        """Queue what the credit allows; ``kick=False``: the caller flushes."""
        if self._engine.reason is not None:
            return 0
        n = self._mux.send_data(sid, data)
        if n and kick:
            self._kick()
        return n

    def consumed(self, sid: int, amount: int) -> None:
        if self._engine.reason is not None:
            return
        self._mux.acknowledge_received_data(sid, amount)
        if self._mux.has_output():
            self._kick()

    def send_eof(self, sid: int) -> None:
        if self._engine.reason is not None:
            return
        try:
            self._mux.send_eof(sid)
        except LocalUsageError:
            return  # already reset or forgotten: the stream reports its own error
        self._kick()
        self._forget_if_done(sid)

    def reset_stream(self, sid: int, code: ErrorCode) -> None:
        """Reset a stream from this side (reset(), revocation, refusals).

        What the stream held unread is discarded and its session credit goes
        back to the peer (the mux knows how much; see Mux.reset_stream)."""
        if self._engine.reason is not None:
            return
        self._mux.reset_stream(sid, code)
        if self._streams.pop(sid, None) is not None:
            self._note_busy()
        self._kick()

    def close_stream(self, sid: int, *, send_eof: bool, reset: bool) -> None:
        """The application closed the stream: what it held unread is discarded
        (its session credit returned, also when the peer had forgotten the
        stream already), then EOF and, if asked, RESET."""
        if self._engine.reason is not None:
            self._streams.pop(sid, None)
            return
        mux = self._mux
        mux.discard_received(sid)
        if mux.is_open(sid):
            if send_eof:
                with contextlib.suppress(LocalUsageError):
                    mux.send_eof(sid)
            if reset:
                mux.reset_stream(sid, ErrorCode.CANCELLED)
        if not mux.is_open(sid) and self._streams.pop(sid, None) is not None:
            self._note_busy()
        self._kick()


def _rejection(peer: NodeId, code: ErrorCode) -> CapsockError:
    if code == ErrorCode.REFUSED:
        return CapabilityRejected(
            f"node {peer.short()} refused the capability (unknown, forged, expired, "
            "used up, revoked or bound to another peer); ask its holder for a fresh one",
            code,
        )
    return CapabilityRejected(
        f"node {peer.short()} did not accept the stream ({code.name}); try again later",
        code,
    )


def _lost_reason(exc: BaseException) -> str:
    """Why the connection ended, in words (no class names)."""
    cause = exc if isinstance(exc, OSError) else exc.__cause__ or exc.__context__
    if isinstance(cause, OSError) and cause.strerror:
        return f"connection lost: {cause.strerror.lower()}"
    if isinstance(exc, anyio.ClosedResourceError):
        return "connection lost: it was closed on this side"
    return "connection lost: the other side or the network went away"


def _lost_error(peer: NodeId, reason: str) -> BaseException:
    return ConnectionLostError(
        f"the session with {peer.short()} ended ({reason})", ErrorCode.INTERNAL_ERROR
    )
