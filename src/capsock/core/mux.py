"""The sans-IO session engine: streams, credit windows, open/accept, close/reset.

Theory of operation
-------------------
A :class:`Mux` is one side of a session's multiplexer.  It never touches a
socket or a clock.  The owner feeds it each decrypted transport message with
:meth:`Mux.receive_message`, which returns past-tense events
(:class:`DataReceived`, :class:`StreamAccepted`, ...), and drains the bytes it
wants sent with :meth:`Mux.data_to_send`, one record's plaintext at a time.
Local actions (:meth:`open_stream`, :meth:`send_data`, :meth:`send_eof`,
:meth:`reset_stream`, ...) only queue frames.

Stream ids: the session's dialer uses odd ids, the listener even ones; each
side's ids only grow.  A stream is *opening* (we sent OPEN), *pending* (the
peer sent OPEN, the application has not decided) or *open*.  It is forgotten
when both directions have seen EOF, or on REJECT or RESET; late frames for a
forgotten id are ignored (DATA still returns its session credit).

Every byte counted against the session's receive window is returned exactly
once: when the application acknowledges it, when the stream is reset from
this side (what it had not acknowledged is discarded), or at once for DATA on
a forgotten stream.  The engine knows how many bytes of each stream the
application holds (delivered, not acknowledged), also for a stream the peer
forgot while the application still reads it, so acknowledging more than that
returns nothing extra: the peer never gets credit beyond the window.

Work per received frame is O(1), amortised: no frame causes a pass over the
streams or the queues.  A GOAWAY that lowers ``last_stream_id`` forgets only
the streams above it, popped from a list of this side's ids in order.

Flow control follows h2: a sender may only send DATA within the credit the
receiver granted, per stream and per session.  Both sides start from the
protocol constants :data:`INITIAL_STREAM_WINDOW` and
:data:`INITIAL_SESSION_WINDOW`; a receiver configured for larger windows
grants the difference with a WINDOW frame right after OPEN / ACCEPT (or at
session start).  Credit is given back only when the *application* acknowledges
that it consumed bytes (:meth:`acknowledge_received_data`), batched until half
a window is due, so a slow reader slows the writer and buffers stay bounded.

Everything the remote side can do wrong raises :class:`~capsock.errors.ProtocolError`
(or its :class:`~capsock.errors.ResourceLimitExceeded` subclass) out of
:meth:`receive_message`; the session must then be closed.  Local misuse raises
:class:`~capsock.errors.LocalUsageError`.
"""

from __future__ import annotations

import struct
import warnings
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum, IntEnum

from ..config import (
    INITIAL_SESSION_WINDOW,
    INITIAL_STREAM_WINDOW,
    MAX_MESSAGE_PLAINTEXT,
    MAX_WINDOW,
    MuxConfig,
)
from ..errors import ErrorCode, LocalUsageError, ProtocolError, ResourceLimitExceeded
from .frames import (
    HEADER,
    HEADER_LEN,
    MAX_TOKEN_LEN,
    Accept,
    Control,
    Data,
    Eof,
    Frame,
    FrameType,
    GoAway,
    Open,
    Ping,
    Pong,
    Reject,
    Reset,
    Window,
    decode_frames,
    encode_frame,
)

__all__ = [
    "INITIAL_SESSION_WINDOW",
    "INITIAL_STREAM_WINDOW",
    "ControlReceived",
    "CreditGranted",
    "DataReceived",
    "EofReceived",
    "Event",
    "GoAwayReceived",
    "Mux",
    "MuxConfig",
    "OpenRequested",
    "PongReceived",
    "ResetReceived",
    "StreamAccepted",
    "StreamRejected",
]

_MAX_STREAM_ID = 2**32 - 1

# Precompiled encoders of the frames the engine itself queues (a header and a
# fixed payload in one pack: no frame object, no match, no concatenation).
_pack_header = HEADER.pack
_unpack_header = HEADER.unpack_from
_pack_window = struct.Struct(">BIHI").pack
_pack_code = struct.Struct(">BIHH").pack  # REJECT, RESET
_DATA = FrameType.DATA.value
_WINDOW = FrameType.WINDOW.value


# ---------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class OpenRequested:
    """The peer asks to open ``stream_id`` with ``token``; accept or reject it."""

    stream_id: int
    token: bytes


@dataclass(frozen=True, slots=True)
class StreamAccepted:
    """The endpoint accepted a stream we opened."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamRejected:
    """The endpoint refused a stream we opened."""

    stream_id: int
    code: ErrorCode


@dataclass(frozen=True, slots=True)
class DataReceived:
    """Bytes arrived; acknowledge them once the application consumed them."""

    stream_id: int
    data: bytes | memoryview
    """A zero-copy view of the decrypted record; copy it out before keeping it."""


@dataclass(frozen=True, slots=True)
class EofReceived:
    """The peer half-closed the stream: no more data will come."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class ResetReceived:
    """The stream was reset by the peer (or dropped by its GOAWAY)."""

    stream_id: int
    code: ErrorCode


@dataclass(frozen=True, slots=True)
class CreditGranted:
    """Send credit grew on ``stream_id`` (0: on the session, so on every stream)."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class PongReceived:
    """The answer to one of our PINGs."""

    opaque: bytes


@dataclass(frozen=True, slots=True)
class GoAwayReceived:
    """The peer is shutting down; streams above ``last_stream_id`` were reset."""

    last_stream_id: int
    code: ErrorCode


@dataclass(frozen=True, slots=True)
class ControlReceived:
    """A CONTROL message (msgpack body, interpreted by the node)."""

    body: bytes


Event = (
    OpenRequested
    | StreamAccepted
    | StreamRejected
    | DataReceived
    | EofReceived
    | ResetReceived
    | CreditGranted
    | PongReceived
    | GoAwayReceived
    | ControlReceived
)


# ---------------------------------------------------------------- streams


class _State(IntEnum):
    """Where a stream is, as seen by the frames it may still receive.

    IntEnum, not Enum: a table key hashes in C (Enum's hash is Python code),
    which the per-frame lookup in :meth:`Mux._step` notices."""

    OPENING = 0
    PENDING = 1
    OPEN = 2
    EOF_SENT = 3
    EOF_RECEIVED = 4
    FORGOTTEN = 5
    NEVER_OPENED = 6

    @property
    def label(self) -> str:
        """The state's name in docs/protocol.md section 6.3."""
        return self.name.lower().replace("_", " ").replace("eof", "EOF")


class _Input(IntEnum):
    """A received frame that names a stream (DATA, WINDOW and the lifecycle)."""

    ACCEPT = 0
    REJECT = 1
    DATA = 2
    WINDOW = 3
    EOF = 4
    RESET = 5


class _Action(Enum):
    """What the engine does with a received frame (see :data:`TRANSITIONS`)."""

    ERROR = "error"
    IGNORE = "ignore"
    ACCEPTED = "accepted"
    REJECTED = "rejected"
    DELIVER = "deliver"
    DISCARD = "discard, return session credit"
    CREDIT = "credit"
    EOF = "eof"
    RESET = "reset"


def _build_table() -> dict[tuple[_State, _Input], tuple[_Action, _State]]:
    # One row per received frame, one cell per state in _State's order:
    # (action, next state), None meaning "stays where it is".
    st, inp, act = _State, _Input, _Action
    err: tuple[_Action, _State | None] = (act.ERROR, None)
    ign: tuple[_Action, _State | None] = (act.IGNORE, None)
    gone = st.FORGOTTEN
    credit: tuple[_Action, _State | None] = (act.CREDIT, None)
    deliver: tuple[_Action, _State | None] = (act.DELIVER, None)
    reset: tuple[_Action, _State | None] = (act.RESET, gone)
    rows: dict[_Input, tuple[tuple[_Action, _State | None], ...]] = {
        # opening, pending, open, EOF sent, EOF received, forgotten, never opened
        inp.ACCEPT: ((act.ACCEPTED, st.OPEN), err, err, err, err, ign, err),
        inp.REJECT: ((act.REJECTED, gone), err, err, err, err, ign, err),
        inp.DATA: (err, err, deliver, deliver, err, (act.DISCARD, None), err),
        inp.WINDOW: (credit, credit, credit, credit, credit, ign, err),
        inp.EOF: (err, err, (act.EOF, st.EOF_RECEIVED), (act.EOF, gone), err, ign, err),
        inp.RESET: (reset, reset, reset, reset, reset, ign, err),
    }
    table: dict[tuple[_State, _Input], tuple[_Action, _State]] = {}
    for frame, cells in rows.items():
        for state, (action, nxt) in zip(_State, cells, strict=True):
            table[state, frame] = (action, state if nxt is None else nxt)
    return table


TRANSITIONS = _build_table()
"""The stream lifecycle, ``(state, received frame) -> (action, next state)``:
docs/protocol.md section 6.3 is this table in prose, and a test checks that
the two agree.  Local actions move a stream too (:meth:`Mux.accept_stream`:
pending to open; :meth:`Mux.send_eof`: open to EOF sent, EOF received to
forgotten), as do REJECT/RESET sent and a GOAWAY received."""

_LIVE = frozenset(
    {_State.OPENING, _State.PENDING, _State.OPEN, _State.EOF_SENT, _State.EOF_RECEIVED}
)
_SENDING = frozenset({_State.OPEN, _State.EOF_RECEIVED})
# TRANSITIONS indexed [input][state] (both are small ints): what _step reads.
_BY_INPUT = tuple(tuple(TRANSITIONS[s, i] for s in _State) for i in _Input)
# The live states in which received DATA is delivered: the hot path's shortcut
# through the table (read from it, so the two cannot disagree).
_DELIVERING = frozenset(s for s in _State if TRANSITIONS[s, _Input.DATA] == (_Action.DELIVER, s))


def _error_text(inp: _Input, state: _State, sid: int) -> str:
    if state is _State.NEVER_OPENED:
        if inp is _Input.DATA:
            return f"DATA on stream {sid}, which was never opened"
        return f"frame for stream {sid}, which was never opened"
    if inp is _Input.DATA:
        if state is _State.EOF_RECEIVED:
            return f"DATA on stream {sid} after its EOF"
        return f"DATA on stream {sid} before it was accepted"
    if inp is _Input.EOF:
        return f"unexpected EOF on stream {sid}"
    return f"{inp.name} for stream {sid}, which is not opening"


class _RecvWindow:
    """Receive-side credit of one window (the session's, or a stream's).

    ``recv_window`` is what the peer may still send; ``recv_unacked`` what the
    application consumed and this side has not yet given back.  Credit goes
    back in batches: :meth:`release` returns the increment to send in one
    WINDOW frame once ``threshold`` bytes are due (half the window), else 0.
    """

    __slots__ = ("recv_unacked", "recv_window")

    def __init__(self, window: int) -> None:
        self.recv_window = window
        self.recv_unacked = 0

    def take(self, n: int) -> bool:
        """Count ``n`` received bytes; False (and nothing counted) if over the window."""
        if n > self.recv_window:
            return False
        self.recv_window -= n
        return True

    def release(self, n: int, threshold: int) -> int:
        """``n`` bytes were consumed: the increment to grant now (0: batched)."""
        unacked = self.recv_unacked + n
        if unacked >= threshold:
            self.recv_window += unacked
            self.recv_unacked = 0
            return unacked
        self.recv_unacked = unacked
        return 0


class _Stream(_RecvWindow):
    """One stream's state (its receive window is the base class).
    ``recv_window + recv_unacked`` plus the bytes the application holds
    (delivered, not acknowledged) is always the configured stream window, so
    what it holds needs no counter of its own."""

    __slots__ = ("send_credit", "state")

    def __init__(self, state: _State, recv_window: int) -> None:
        self.state = state
        self.send_credit = INITIAL_STREAM_WINDOW
        self.recv_window = recv_window
        self.recv_unacked = 0


class _Chunk:
    __slots__ = ("stream_id", "view")

    def __init__(self, stream_id: int, view: memoryview) -> None:
        self.stream_id = stream_id
        self.view = view


class Mux:
    """One side of a session's stream multiplexer (sans-IO)."""

    def __init__(self, *, dialer: bool, config: MuxConfig | None = None) -> None:
        self.config = config or MuxConfig()
        self.dialer = dialer
        self._streams: dict[int, _Stream] = {}
        self._next_local = 1 if dialer else 2
        self._highest_remote = 0
        self._pending_opens = 0
        self._send_session_credit = INITIAL_SESSION_WINDOW
        self._recv_session = _RecvWindow(self.config.session_window)
        # Ordered frames: bytes (a complete frame) or a _Chunk of DATA.
        self._fifo: deque[bytes | _Chunk] = deque()
        # Frames that may overtake the FIFO: WINDOW (coalesced), PING, PONG.
        self._windows: dict[int, int] = {}
        # A list, not a deque: it is usually empty, and an empty deque costs
        # ~600 bytes in every idle session (the bench's memory row).
        self._urgent: list[bytes] = []
        self._queued_control = 0
        self._queued_data = 0
        self._goaway_last = 0
        self._goaway_code = ErrorCode.NO_ERROR
        # The ids this side opened, ascending (it opens them in order); ids of
        # forgotten streams stay until a GOAWAY pops them or open_stream
        # compacts the list.  None until the first open: most sessions a
        # node accepts never open a stream themselves.
        self._local_ids: list[int] | None = None
        # Forgotten streams whose delivered bytes the application still holds
        # (the peer reset them, or both sides sent EOF): id -> bytes held.
        self._orphans: dict[int, int] | None = None
        self.goaway_sent = False
        self.goaway_received = False
        # The error that ended input (h11's rule): once a record broke the
        # protocol, possibly after earlier frames of it changed state, every
        # later receive_message raises it again and reads nothing.
        self._error: ProtocolError | None = None
        self.bytes_sent = 0
        self.bytes_received = 0
        self.deliver: Callable[[int, memoryview], None] | None = None
        """If set, called with ``(stream_id, data)`` for a message that is one
        DATA frame for an open stream, instead of returning a
        :class:`DataReceived` for it (no event object on the hottest path).
        The owner must then handle each message's events before it feeds the
        next message (as the session does), so the order stays the wire's;
        the data is a zero-copy view of the message, as in :class:`DataReceived`."""
        extra = self.config.session_window - INITIAL_SESSION_WINDOW
        if extra:
            self._windows[0] = extra

    # ------------------------------------------------------------ queries

    def send_credit(self, stream_id: int) -> int:
        """How many bytes :meth:`send_data` would take right now on ``stream_id``."""
        st = self._streams.get(stream_id)
        if st is None or st.state not in _SENDING:
            return 0
        return max(0, min(st.send_credit, self._send_session_credit, self._send_room()))

    def stream_send_credit(self, stream_id: int) -> int:
        """The credit the peer left ``stream_id`` itself (0 if not open for sending)."""
        st = self._streams.get(stream_id)
        if st is None or st.state not in _SENDING:
            return 0
        return st.send_credit

    def session_send_room(self) -> int:
        """What the session credit and the local send buffer still allow, over all streams."""
        return min(self._send_session_credit, self._send_room())

    @property
    def send_buffer_full(self) -> bool:
        """Whether :meth:`send_data` takes nothing for lack of local room
        (``max_queued_data``), whatever the credit."""
        return self._send_room() <= 0

    def _send_room(self) -> int:
        """DATA bytes the local send buffer still takes (``max_queued_data``)."""
        return self.config.max_queued_data - self._queued_data

    def is_open(self, stream_id: int) -> bool:
        """Whether the engine still tracks ``stream_id``."""
        return stream_id in self._streams

    def has_output(self) -> bool:
        """Whether :meth:`data_to_send` would return something."""
        return bool(self._fifo or self._urgent or self._windows)

    def stats(self) -> dict[str, int]:
        """Counters for tests and operators (no secrets)."""
        return {
            "streams": len(self._streams),
            "pending_opens": self._pending_opens,
            "send_session_credit": self._send_session_credit,
            "recv_session_window": self._recv_session.recv_window,
            "recv_unacked": self._recv_session.recv_unacked,
            "queued_data": self._queued_data,
            "queued_control": self._queued_control,
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
        }

    # ------------------------------------------------------------ local actions

    def open_stream(self, token: bytes) -> int:
        """Queue an OPEN for a new stream and return its id.

        Raises:
            LocalUsageError: the session is going away, the token is too long,
                or ``max_streams`` streams are open.
        """
        if self.goaway_sent or self.goaway_received:
            raise LocalUsageError("this session is shutting down; open the stream on a new one")
        if not 0 < len(token) <= MAX_TOKEN_LEN:
            raise LocalUsageError("capability token length out of range")
        if len(self._streams) >= self.config.max_streams:
            raise LocalUsageError(
                f"too many streams on this session (max_streams={self.config.max_streams})"
            )
        sid = self._next_local
        if sid > _MAX_STREAM_ID:
            raise LocalUsageError("stream ids exhausted on this session; use a new session")
        self._next_local += 2
        streams = self._streams
        ids = self._local_ids
        if ids is None:
            ids = self._local_ids = []
        elif len(ids) >= 2 * len(streams) + 64:
            # Drop the ids of forgotten streams: this pass removes at least as
            # many ids as it keeps, so it costs O(1) per id ever appended.
            ids = self._local_ids = [s for s in ids if s in streams]
        ids.append(sid)
        streams[sid] = _Stream(_State.OPENING, self.config.stream_window)
        self._queue(_pack_header(FrameType.OPEN, sid, len(token)) + token)
        self._queue_initial_window(sid)
        return sid

    def accept_stream(self, stream_id: int) -> None:
        """Accept a stream the peer asked for (:class:`OpenRequested`).

        Raises:
            LocalUsageError: the stream is not pending.
        """
        st = self._pending(stream_id)
        st.state = _State.OPEN
        self._pending_opens -= 1
        self._queue(_pack_header(FrameType.ACCEPT, stream_id, 0))
        self._queue_initial_window(stream_id)

    def reject_stream(self, stream_id: int, code: ErrorCode = ErrorCode.REFUSED) -> None:
        """Refuse a pending stream with ``code`` (REFUSED for any capability failure).

        A stream that is no longer pending (the peer reset it) is ignored.
        """
        st = self._streams.get(stream_id)
        if st is None or st.state is not _State.PENDING:
            return
        del self._streams[stream_id]
        self._pending_opens -= 1
        self._queue(_pack_code(FrameType.REJECT, stream_id, 2, code))

    def send_data(self, stream_id: int, data: bytes | memoryview) -> int:
        """Queue as much of ``data`` as the credit allows; return how much was taken.

        The engine keeps a reference to ``data`` until sent: pass immutable bytes.

        Raises:
            LocalUsageError: the stream is unknown, not open, or already half-closed.
        """
        st = self._streams.get(stream_id)
        if st is None or st.state not in _SENDING:
            if st is not None and st.state is _State.EOF_SENT:
                raise LocalUsageError(f"stream {stream_id} was half-closed (send_eof) already")
            raise LocalUsageError(f"stream {stream_id} is not open")
        n = min(len(data), st.send_credit, self._send_session_credit, self._send_room())
        if n <= 0:
            return 0
        st.send_credit -= n
        self._send_session_credit -= n
        view = memoryview(data)
        self._fifo.append(_Chunk(stream_id, view[:n] if n < len(view) else view))
        self._queued_data += n
        return n

    def send_eof(self, stream_id: int) -> None:
        """Queue an EOF: this side sends no more data on the stream.

        Raises:
            LocalUsageError: the stream is not open or was half-closed already.
        """
        st = self._streams.get(stream_id)
        if st is None or st.state not in _SENDING:
            if st is not None and st.state is _State.EOF_SENT:
                raise LocalUsageError(f"stream {stream_id} was half-closed already")
            raise LocalUsageError(f"stream {stream_id} is not open")
        self._queue(_pack_header(FrameType.EOF, stream_id, 0))
        if st.state is _State.EOF_RECEIVED:
            self._forget(stream_id, st)
        else:
            st.state = _State.EOF_SENT

    def reset_stream(self, stream_id: int, code: ErrorCode = ErrorCode.CANCELLED) -> None:
        """Abort a stream in both directions; a forgotten stream is ignored.

        The bytes of the stream the application had not acknowledged are
        discarded: their session credit is returned (exactly once), also for
        a stream the peer had already forgotten.
        """
        st = self._streams.pop(stream_id, None)
        if st is None:
            self.discard_received(stream_id)
            return
        held = self.config.stream_window - st.recv_window - st.recv_unacked
        if held:
            self._return_session_credit(held)
        if st.state is _State.PENDING:
            self._pending_opens -= 1
        self._queue(_pack_code(FrameType.RESET, stream_id, 2, code))

    def discard_received(self, stream_id: int) -> None:
        """The application dropped what it held of ``stream_id`` unread:
        acknowledge all of it (nothing if it held nothing)."""
        st = self._streams.get(stream_id)
        if st is not None:
            held = self.config.stream_window - st.recv_window - st.recv_unacked
        elif self._orphans is not None:
            held = self._orphans.get(stream_id, 0)
        else:
            return
        if held:
            self.acknowledge_received_data(stream_id, held)

    def held(self, stream_id: int) -> int:
        """Bytes of ``stream_id`` delivered and not yet acknowledged."""
        st = self._streams.get(stream_id)
        if st is not None:
            return self.config.stream_window - st.recv_window - st.recv_unacked
        return self._orphans.get(stream_id, 0) if self._orphans is not None else 0

    def acknowledge_received_data(self, stream_id: int, amount: int) -> None:
        """The application consumed ``amount`` bytes of ``stream_id``: give credit back.

        Credit is batched: a WINDOW frame is queued once half a window is due.
        Bytes of forgotten streams still return their session credit.  At most
        the bytes the application holds on the stream count (see :meth:`held`):
        acknowledging more, or twice, returns nothing more.
        """
        if amount <= 0:
            return
        st = self._streams.get(stream_id)
        if st is None:
            self._acknowledge_forgotten(stream_id, amount)
            return
        config = self.config
        window = config.stream_window
        recv_window = st.recv_window
        unacked = st.recv_unacked + amount
        if unacked + recv_window > window:  # more than the application holds
            amount = window - recv_window - st.recv_unacked
            if amount <= 0:
                return
            unacked = window - recv_window
        # After the peer's EOF no stream credit is returned any more.
        if st.state is _State.EOF_RECEIVED:
            st.recv_unacked = unacked
        elif grant := st.release(amount, config.half_stream_window):
            self._grant(stream_id, grant)
        self._return_session_credit(amount)

    def _acknowledge_forgotten(self, stream_id: int, amount: int) -> None:
        orphans = self._orphans
        held = orphans.get(stream_id, 0) if orphans is not None else 0
        if held <= 0:
            return
        assert orphans is not None
        if amount >= held:
            amount = held
            del orphans[stream_id]
        else:
            orphans[stream_id] = held - amount
        self._return_session_credit(amount)

    def _return_session_credit(self, amount: int) -> None:
        if grant := self._recv_session.release(amount, self.config.half_session_window):
            self._grant(0, grant)

    def ping(self, opaque: bytes) -> None:
        """Queue a PING with 8 opaque bytes; the peer answers with a PONG."""
        if len(opaque) != 8:
            raise LocalUsageError("PING carries exactly 8 bytes")
        self._queue(encode_frame(Ping(opaque)), urgent=True)

    def send_control(self, body: bytes) -> None:
        """Queue a CONTROL message (msgpack body)."""
        if not 0 < len(body) <= MAX_MESSAGE_PLAINTEXT - HEADER_LEN:
            raise LocalUsageError("CONTROL body size out of range")
        self._queue(encode_frame(Control(body)))

    def goaway(self, code: ErrorCode = ErrorCode.NO_ERROR) -> None:
        """Queue a GOAWAY: refuse new streams from now on, let open ones finish."""
        if self.goaway_sent:
            return
        self.goaway_sent = True
        self._queue(encode_frame(GoAway(self._highest_remote, code)))

    def fail_with_goaway(self, code: ErrorCode) -> None:
        """The session is failing: drop everything queued, forget every stream,
        and queue only a GOAWAY carrying ``code``.  Nothing a stream does later
        can put an EOF (a clean end) on the wire."""
        self._fifo.clear()
        self._urgent.clear()
        self._windows.clear()
        self._queued_control = 0
        self._queued_data = 0
        self._streams.clear()
        self._local_ids = None
        self._orphans = None
        self._pending_opens = 0
        self.goaway_sent = False
        self.goaway(code)

    def abort(self, code: ErrorCode) -> None:
        """Deprecated name of :meth:`fail_with_goaway` (``abort`` also meant two
        other things in capsock)."""
        warnings.warn("Mux.abort() is now Mux.fail_with_goaway()", DeprecationWarning, stacklevel=2)
        self.fail_with_goaway(code)

    # ------------------------------------------------------------ output

    def data_to_send(self, limit: int = MAX_MESSAGE_PLAINTEXT) -> bytes | None:
        """Pop up to ``limit`` bytes of whole frames (one record's plaintext), or None."""
        parts = self.data_to_send_parts(limit)
        return None if parts is None else b"".join(parts)

    def data_to_send_parts(
        self, limit: int = MAX_MESSAGE_PLAINTEXT
    ) -> list[bytes | memoryview] | None:
        """Like :meth:`data_to_send`, as pieces to concatenate (saves a copy)."""
        parts: list[bytes | memoryview] = []
        self._fill_record(parts, limit)
        return parts or None

    def data_to_send_records(
        self, budget: int, limit: int = MAX_MESSAGE_PLAINTEXT
    ) -> tuple[list[list[bytes | memoryview]], list[int]]:
        """Whole records for about ``budget`` plaintext bytes in one call: each
        record's pieces (as :meth:`data_to_send_parts`) and, in a second list,
        each record's size.  Empty lists when nothing is queued.  Every record
        is filled up to ``limit`` before the next one starts, so frames queued
        since the last flush share records."""
        records: list[list[bytes | memoryview]] = []
        sizes: list[int] = []
        total = 0
        fill = self._fill_record
        while total < budget:
            parts: list[bytes | memoryview] = []
            size = fill(parts, limit)
            if not size:
                break
            records.append(parts)
            sizes.append(size)
            total += size
        return records, sizes

    def _fill_record(self, parts: list[bytes | memoryview], limit: int) -> int:
        """Append one record's frames (at most ``limit`` bytes) to ``parts``; its size."""
        size = 0
        windows = self._windows
        if windows:
            streams = self._streams
            for sid in list(windows):
                if size + HEADER_LEN + 4 > limit:
                    break
                inc = windows.pop(sid)
                if sid == 0 or sid in streams:
                    parts.append(_pack_window(_WINDOW, sid, 4, inc))
                    size += HEADER_LEN + 4
        urgent = self._urgent
        if urgent:
            taken = 0
            for frame in urgent:
                if size + len(frame) > limit:
                    break
                self._queued_control -= len(frame)
                parts.append(frame)
                size += len(frame)
                taken += 1
            if taken:
                del urgent[:taken]
        fifo = self._fifo
        if not fifo:
            return size
        max_data = self.config.max_frame_data
        sent = 0
        while fifo:
            item = fifo[0]
            if type(item) is bytes:
                n = len(item)
                if size + n > limit:
                    break
                fifo.popleft()
                self._queued_control -= n
                parts.append(item)
                size += n
                continue
            assert type(item) is _Chunk  # for mypy: the FIFO holds bytes or chunks
            room = limit - size - HEADER_LEN
            if room > max_data:
                room = max_data
            if room <= 0:
                break
            sid, view = item.stream_id, item.view
            n = len(view)
            if n <= room:
                fifo.popleft()
                parts.append(_pack_header(_DATA, sid, n))
                parts.append(view)
                size += HEADER_LEN + n
                sent += n
                continue
            parts.append(_pack_header(_DATA, sid, room))
            parts.append(view[:room])
            item.view = view[room:]
            size += HEADER_LEN + room
            sent += room
            break
        if sent:
            self._queued_data -= sent
            self.bytes_sent += sent
        return size

    # ------------------------------------------------------------ input

    def receive_message(self, message: bytes | bytearray | memoryview) -> list[Event]:
        """Process one decrypted transport message; return the events it caused.

        Raises:
            ProtocolError: the peer broke the protocol; close the session.
            ResourceLimitExceeded: the peer is abusive (does not read its answers).

        After either, the engine is poisoned: every later call raises the same
        error at once and processes nothing (:attr:`error`); only the output
        side (:meth:`fail_with_goaway`, :meth:`data_to_send`) still works.
        """
        if self._error is not None:
            raise self._error.with_traceback(None)  # no growing chain of old frames
        # The hot path: a message made only of DATA frames for one stream that
        # delivers (open, or EOF sent), within both windows -- one frame, or a
        # few when the sender's writes do not line up with full records.  Every
        # check of the general path below is made before anything changes, so
        # the outcome is the same; anything else (an error included) takes the
        # general path.
        end = len(message)
        if end > HEADER_LEN and message[0] == _DATA:
            unpack = _unpack_header
            _, sid, total = unpack(message, 0)
            pos = HEADER_LEN + total
            frames = 1
            while total and end - pos > HEADER_LEN:
                kind, other, length = unpack(message, pos)
                if kind != _DATA or other != sid or not length:
                    break
                total += length
                pos += HEADER_LEN + length
                frames += 1
            st = self._streams.get(sid)
            session = self._recv_session
            if (
                pos == end  # so no frame is empty (the loop stops at an empty one)
                and st is not None
                and st.state in _DELIVERING
                and total <= session.recv_window
                and total <= st.recv_window
                and self._queued_control <= self.config.max_queued_control
            ):
                session.recv_window -= total
                st.recv_window -= total
                self.bytes_received += total
                view = memoryview(message)
                deliver = self.deliver
                if frames == 1:
                    if deliver is None:
                        return [DataReceived(sid, view[HEADER_LEN:])]
                    deliver(sid, view[HEADER_LEN:])
                    return []
                return self._deliver_run(sid, view, deliver)
        events: list[Event] = []
        try:
            for frame in decode_frames(message):
                if type(frame) is Data:
                    self._on_data(frame.stream_id, frame.data, events)
                else:
                    self._on_frame(frame, events)
            if self._queued_control > self.config.max_queued_control:
                raise ResourceLimitExceeded(
                    "peer does not read the session's answers (control queue full)"
                )
        except ProtocolError as exc:
            self._error = exc
            raise
        return events

    @staticmethod
    def _deliver_run(
        sid: int, view: memoryview, deliver: Callable[[int, memoryview], None] | None
    ) -> list[Event]:
        """The payloads of a message of several DATA frames of one stream, checked
        and counted by :meth:`receive_message`: handed over in order, or as events."""
        events: list[Event] = []
        end = len(view)
        pos = 0
        unpack = _unpack_header
        while pos < end:
            length = unpack(view, pos)[2]
            data = view[pos + HEADER_LEN : pos + HEADER_LEN + length]
            pos += HEADER_LEN + length
            if deliver is None:
                events.append(DataReceived(sid, data))
            else:
                deliver(sid, data)
        return events

    @property
    def error(self) -> ProtocolError | None:
        """The protocol error that poisoned input, or None while input is good."""
        return self._error

    def _on_data(self, sid: int, data: bytes | memoryview, events: list[Event]) -> None:
        n = len(data)
        if not self._recv_session.take(n):
            raise ProtocolError(
                "peer sent more than the session window", ErrorCode.FLOW_CONTROL_ERROR
            )
        self.bytes_received += n
        st = self._streams.get(sid)
        if st is None or st.state not in _DELIVERING:
            st, _, _ = self._step(sid, _Input.DATA)
            if st is None:  # DISCARD: a stream we forgot (reset, closed)
                self._return_session_credit(n)
                return
        if not st.take(n):
            raise ProtocolError(
                f"peer sent more than stream {sid}'s window", ErrorCode.FLOW_CONTROL_ERROR
            )
        events.append(DataReceived(sid, data))

    def _on_frame(self, frame: Frame, events: list[Event]) -> None:
        # Dispatch on the exact type (one identity test each, most frequent
        # first): a class-pattern ``match`` costs an isinstance per case.
        if type(frame) is Window:
            sid, inc = frame.stream_id, frame.increment
            if sid == 0:
                self._send_session_credit += inc
                if self._send_session_credit > MAX_WINDOW:
                    raise ProtocolError("session credit overflow", ErrorCode.FLOW_CONTROL_ERROR)
                events.append(CreditGranted(0))
                return
            st, _, _ = self._step(sid, _Input.WINDOW)
            if st is not None:
                st.send_credit += inc
                if st.send_credit > MAX_WINDOW:
                    raise ProtocolError(
                        f"stream {sid} credit overflow", ErrorCode.FLOW_CONTROL_ERROR
                    )
                events.append(CreditGranted(sid))
        elif type(frame) is Open:
            self._on_open(frame.stream_id, frame.token, events)
        elif type(frame) is Accept:
            sid = frame.stream_id
            if self._step(sid, _Input.ACCEPT)[1] is _Action.ACCEPTED:
                events.append(StreamAccepted(sid))
        elif type(frame) is Eof:
            sid = frame.stream_id
            if self._step(sid, _Input.EOF)[1] is _Action.EOF:
                events.append(EofReceived(sid))
        elif type(frame) is Reset:
            sid = frame.stream_id
            _, action, before = self._step(sid, _Input.RESET)
            if action is _Action.RESET:
                if before is _State.PENDING:
                    self._pending_opens -= 1
                events.append(ResetReceived(sid, ErrorCode.from_wire(frame.code)))
        elif type(frame) is Reject:
            sid = frame.stream_id
            if self._step(sid, _Input.REJECT)[1] is _Action.REJECTED:
                events.append(StreamRejected(sid, ErrorCode.from_wire(frame.code)))
        elif type(frame) is Ping:
            self._queue(_pack_header(FrameType.PONG, 0, 8) + frame.opaque, urgent=True)
        elif type(frame) is Pong:
            events.append(PongReceived(frame.opaque))
        elif type(frame) is GoAway:
            self._on_goaway(frame.last_stream_id, ErrorCode.from_wire(frame.code), events)
        elif type(frame) is Control:
            events.append(ControlReceived(frame.body))

    def _on_open(self, sid: int, token: bytes, events: list[Event]) -> None:
        if (sid % 2 == 1) == self.dialer:
            raise ProtocolError(f"peer opened stream {sid}, which has this side's parity")
        if sid <= self._highest_remote:
            raise ProtocolError(f"peer reused or reordered stream id {sid}")
        self._highest_remote = sid
        if self.goaway_sent:
            self._queue(_pack_code(FrameType.REJECT, sid, 2, ErrorCode.SHUTTING_DOWN))
            return
        if (
            self._pending_opens >= self.config.max_pending_opens
            or len(self._streams) >= self.config.max_streams
        ):
            self._queue(_pack_code(FrameType.REJECT, sid, 2, ErrorCode.BUSY))
            return
        self._streams[sid] = _Stream(_State.PENDING, self.config.stream_window)
        self._pending_opens += 1
        events.append(OpenRequested(sid, token))

    def _on_goaway(self, last: int, code: ErrorCode, events: list[Event]) -> None:
        # Only the first GOAWAY, and one that lowers ``last``, can forget streams,
        # and each forgets only this side's streams above ``last``: their ids
        # are popped from the top of the ordered id list, so a record full of
        # GOAWAYs each lowering ``last`` by one costs O(1) per frame plus O(1)
        # per stream forgotten, never a pass over every stream per frame.
        first = not self.goaway_received
        if first or last < self._goaway_last:
            self.goaway_received = True
            self._goaway_last = last
            ids = self._local_ids
            streams = self._streams
            while ids and ids[-1] > last:
                sid = ids.pop()
                st = streams.get(sid)
                if st is not None:
                    self._forget(sid, st)
                    events.append(ResetReceived(sid, ErrorCode.SHUTTING_DOWN))
        # Reported at most twice per session: the first GOAWAY, and the step
        # from graceful to an error (section 7).  Lowering repeats and
        # alternating codes must not buy an event (a log line) per frame.
        if first:
            self._goaway_code = code
            events.append(GoAwayReceived(last, code))
        elif self._goaway_code == ErrorCode.NO_ERROR and code != ErrorCode.NO_ERROR:
            self._goaway_code = code
            events.append(GoAwayReceived(self._goaway_last, code))

    # ------------------------------------------------------------ helpers

    def _forget(self, sid: int, st: _Stream) -> None:
        """Forget a live stream whose delivered bytes the application may still
        read: keep count of them, so acknowledging them returns their credit."""
        del self._streams[sid]
        held = self.config.stream_window - st.recv_window - st.recv_unacked
        if held > 0:
            if self._orphans is None:
                self._orphans = {}
            self._orphans[sid] = held

    def _was_opened(self, sid: int) -> bool:
        if (sid % 2 == 1) == self.dialer:
            return sid < self._next_local
        return sid <= self._highest_remote

    def _step(self, sid: int, inp: _Input) -> tuple[_Stream | None, _Action, _State]:
        """Drive :data:`TRANSITIONS` for a received frame: raise for an error,
        move the stream, and return it (None unless live), the action and the
        state it was in."""
        st = self._streams.get(sid)
        if st is not None:
            state = st.state
        elif self._was_opened(sid):
            state = _State.FORGOTTEN
        else:
            state = _State.NEVER_OPENED
        action, nxt = _BY_INPUT[inp][state]
        if action is _Action.ERROR:
            raise ProtocolError(_error_text(inp, state, sid))
        if st is not None and nxt is not state:
            if nxt is _State.FORGOTTEN:
                self._forget(sid, st)
            else:
                st.state = nxt
        return st, action, state

    def _pending(self, sid: int) -> _Stream:
        st = self._streams.get(sid)
        if st is None or st.state is not _State.PENDING:
            raise LocalUsageError(f"stream {sid} is not waiting to be accepted")
        return st

    def _queue(self, frame: bytes, *, urgent: bool = False) -> None:
        if urgent:
            self._urgent.append(frame)
        else:
            self._fifo.append(frame)
        self._queued_control += len(frame)

    def _queue_initial_window(self, sid: int) -> None:
        extra = self.config.stream_window - INITIAL_STREAM_WINDOW
        if extra:
            self._queue(_pack_window(_WINDOW, sid, 4, extra))

    def _grant(self, sid: int, amount: int) -> None:
        self._windows[sid] = self._windows.get(sid, 0) + amount
