"""The session engine: one session's protocol rules and time, sans-IO.

:class:`SessionEngine` owns what a session *decides*; the anyio driver
(:class:`capsock.net.session.Session`) only moves bytes, arms one timer and maps
errors.  The engine holds the transport cipher, the record splitter and the
:class:`~capsock.core.mux.Mux`, and decides

- **who may speak first** (protocol.md 3.5): the dialer queues its first
  record at once (:meth:`SessionEngine.start`); the responder is
  :attr:`Phase.UNCONFIRMED` and sends nothing, not even a GOAWAY, until a record
  from the dialer authenticated (:class:`PeerConfirmed` is then the first event);
- **keepalive**: a PING after ``keepalive_interval`` without an authenticated
  record, the **dead-peer** end after ``keepalive_timeout``;
- the **idle** end: ``idle_timeout`` after the driver reported the session
  had no streams (:meth:`SessionEngine.set_busy`);
- **GOAWAY and drain**: :meth:`SessionEngine.go_away` refuses new streams;
  :meth:`SessionEngine.close` queues the GOAWAY and drains (what is queued
  is written, bounded by :data:`DRAIN_LIMIT` seconds) before
  :attr:`Phase.CLOSED`;
- **abort on a protocol error**: the engine is poisoned (h11's rule: every
  later input raises the same error and reads nothing), drops everything
  queued and queues its own GOAWAY with the error's code (h2's), then drains.

Inputs are received bytes (:meth:`SessionEngine.receive_data`), local
actions, and ``now``, a float the caller passes in (monotonic seconds; the
engine never reads a clock).  Outputs are records to send
(:meth:`SessionEngine.data_to_send`), events (the mux's, plus
:class:`PeerConfirmed`, and the timer's), and :meth:`SessionEngine.next_deadline`
with :meth:`SessionEngine.handle_timer` (aioquic's shape).  The engine does
not know what carries its records.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from enum import Enum, IntEnum
from typing import TYPE_CHECKING

from ..config import SessionConfig
from ..errors import ErrorCode, ProtocolError
from .mux import Event, Mux
from .records import RecordReader

if TYPE_CHECKING:
    from ._noise_transport import TransportCipher

__all__ = [
    "DRAIN_LIMIT",
    "WRITE_BATCH",
    "DrainExpired",
    "Ending",
    "IdleExpired",
    "PeerConfirmed",
    "PeerSilent",
    "Phase",
    "PingQueued",
    "SessionEngine",
    "TimerEvent",
]

DRAIN_LIMIT = 1.0
"""Seconds an ending session waits for what is queued to be written."""
WRITE_BATCH = 1024 * 1024
"""Plaintext bytes :meth:`SessionEngine.data_to_send` encrypts into one write, at most."""


class Phase(IntEnum):
    """Where a session is in its life (ordered: it only moves forward)."""

    UNCONFIRMED = 0
    """Responder only: no record from the dialer has authenticated yet, and the
    handshake may be a replay; this side sends nothing at all."""
    OPEN = 1
    """Streams open and close in both directions."""
    GOING_AWAY = 2
    """This side queued GOAWAY: no new streams; open streams continue."""
    DRAINING = 3
    """Ending: what is queued is written (up to :data:`DRAIN_LIMIT` s), then CLOSED."""
    CLOSED = 4
    """Over: :attr:`SessionEngine.reason` says why; the driver closes the transport."""


class Ending(Enum):
    """Why a session ended (with :attr:`SessionEngine.reason`, the words)."""

    LOCAL = "local"  # this node closed it (aclose)
    IDLE = "idle"  # no streams for idle_timeout
    PEER_SILENT = "peer_silent"  # keepalive_timeout without an authenticated record
    PROTOCOL_ERROR = "protocol_error"  # the peer broke the protocol
    PEER_BEHAVIOUR = "peer_behaviour"  # ended for the peer's behaviour (refusal budget)
    DROPPED = "dropped"  # closed at once, without GOAWAY (close_now)
    TRANSPORT = "transport"  # what carried the records ended or failed


@dataclass(frozen=True, slots=True)
class PeerConfirmed:
    """The dialer's first transport record authenticated (responder only):
    from now on the handshake is known not to be a replay.  Comes alone, before
    that record's own events."""


@dataclass(frozen=True, slots=True)
class PingQueued:
    """The peer was silent for ``keepalive_interval``: a PING is queued."""


@dataclass(frozen=True, slots=True)
class PeerSilent:
    """No authenticated record for ``seconds``: the session is CLOSED (no GOAWAY)."""

    seconds: float


@dataclass(frozen=True, slots=True)
class IdleExpired:
    """No streams for ``idle_timeout``: GOAWAY(NO_ERROR) is queued and the session drains."""


@dataclass(frozen=True, slots=True)
class DrainExpired:
    """The drain's :data:`DRAIN_LIMIT` passed with output unwritten: CLOSED."""


TimerEvent = PingQueued | PeerSilent | IdleExpired | DrainExpired


def _enabled(seconds: float) -> bool:
    return math.isfinite(seconds) and seconds > 0


class SessionEngine:
    """The protocol side of one session (see the module docstring).

    Args:
        cipher: the handshake's transport cipher (encrypts and decrypts records).
        dialer: whether this side dialled (it speaks first; odd stream ids).
        config: keepalive, idle and mux settings.
        leftover: bytes received after the handshake, before the session started.
    """

    __slots__ = (
        "_arrival",
        "_cipher",
        "_confirmed",
        "_drain_deadline",
        "_held",
        "_idle",
        "_idle_since",
        "_interval",
        "_last_heard",
        "_pinged",
        "_reader",
        "_timeout",
        "busy",
        "cause",
        "dialer",
        "error",
        "mux",
        "phase",
        "reason",
    )

    def __init__(
        self,
        cipher: TransportCipher,
        *,
        dialer: bool,
        config: SessionConfig,
        leftover: bytes = b"",
    ) -> None:
        self.dialer = dialer
        self.mux = Mux(dialer=dialer, config=config.mux)
        self.phase = Phase.OPEN if dialer else Phase.UNCONFIRMED
        self.reason: str | None = None
        """Why the session ended or is ending (None while it runs)."""
        self.cause: Ending | None = None
        self.error: ProtocolError | None = None
        """The protocol error that poisoned the engine, if one did."""
        self.busy = False
        """Whether the driver holds streams or pending opens (see :meth:`set_busy`)."""
        self._confirmed = dialer
        self._cipher = cipher
        self._reader = RecordReader()
        self._held: bytes | bytearray | None = None  # the first record, held past PeerConfirmed
        self._interval = config.keepalive_interval if _enabled(config.keepalive_interval) else 0.0
        self._timeout = config.keepalive_timeout
        self._idle = config.idle_timeout if _enabled(config.idle_timeout) else 0.0
        self._last_heard = 0.0
        self._arrival = 0.0
        self._pinged = False
        self._idle_since: float | None = None
        self._drain_deadline = math.inf
        if leftover:
            self._reader.feed(leftover)

    def __repr__(self) -> str:
        return f"<SessionEngine {'dialer' if self.dialer else 'responder'} {self.phase.name}>"

    # ---------------------------------------------------------- queries

    @property
    def confirmed(self) -> bool:
        """Whether the dialer spoke (the dialer's own side: always); until then the
        responder may say nothing."""
        return self._confirmed

    @property
    def is_usable(self) -> bool:
        """Whether new streams may be opened (neither side sent GOAWAY, not ending)."""
        return (
            self.phase <= Phase.OPEN and not self.mux.goaway_received and not self.mux.goaway_sent
        )

    @property
    def ended(self) -> bool:
        """Whether the session is ending or over (local actions are then ignored)."""
        return self.reason is not None

    # ---------------------------------------------------------- start

    def start(self, now: float) -> None:
        """The session starts at ``now``: the clocks start, and the dialer speaks first.

        The dialer's first transport record goes out at once: what is queued
        (an OPEN, its WINDOW), or else a PING."""
        self._last_heard = self._arrival = now
        if not self.busy:
            self._idle_since = now
        if self.dialer and not self.mux.has_output():
            self.mux.ping(os.urandom(8))

    # ---------------------------------------------------------- input

    def receive_data(self, data: bytes | bytearray | memoryview, now: float) -> None:
        """Bytes arrived at ``now``; then call :meth:`next_events` until it returns None.

        Raises:
            ProtocolError: the engine was poisoned by an earlier error (the same error).
        """
        if self.error is not None:
            raise self.error.with_traceback(None)
        if self.phase is Phase.CLOSED:
            return  # over: what still arrives is dropped
        self._arrival = now
        self._reader.feed(data)

    def next_events(self) -> list[Event | PeerConfirmed] | None:
        """Decrypt and process the next complete record: its events, or None if
        no complete record is buffered.

        Raises:
            ProtocolError: the record broke the protocol (failed authentication,
                zero length, a bad frame, credit exceeded, the peer does not read).
                The engine is then poisoned and queued its own GOAWAY.
        """
        if self.error is not None:
            raise self.error.with_traceback(None)
        if self.phase is Phase.CLOSED:
            return None
        try:
            plaintext = self._held
            if plaintext is None:
                record = self._reader.next_record()
                if record is None:
                    return None
                plaintext = self._cipher.decrypt(record)
                # Only an authenticated record is a sign of life: raw bytes are
                # not (a desynchronised stream or a trickled record must not
                # keep a dead session open).
                self._last_heard = self._arrival
                self._pinged = False
                if self.phase is Phase.UNCONFIRMED:
                    self._confirmed = True
                    self.phase = Phase.GOING_AWAY if self.mux.goaway_sent else Phase.OPEN
                    self._held = plaintext
                    return [PeerConfirmed()]  # before anything the record asks for
            else:
                self._held = None
            return self.mux.receive_message(plaintext)  # type: ignore[return-value]
        except ProtocolError as exc:
            self.fail(exc, self._arrival)
            raise

    def fail(self, exc: ProtocolError, now: float) -> None:
        """The peer broke the protocol (:meth:`next_events` calls this itself):
        poison the engine, drop what is queued, queue GOAWAY(``exc.code``) and
        drain from ``now``; an unconfirmed responder just closes."""
        self.error = exc
        if self.phase is Phase.CLOSED:
            return
        self.reason = f"protocol error: {exc}"
        self.cause = Ending.PROTOCOL_ERROR
        # Nothing queued before the bad record may go out after it (no clean
        # EOF behind it): only GOAWAY(code).  An unconfirmed responder sends
        # nothing at all.
        self.mux.fail_with_goaway(exc.code)
        self._drain(now)

    def connection_lost(self, reason: str) -> None:
        """What carried the records ended or failed: CLOSED (keeps an earlier reason)."""
        if self.reason is None:
            self.reason = reason
            self.cause = Ending.TRANSPORT
        self.phase = Phase.CLOSED

    # ---------------------------------------------------------- output

    def has_output(self) -> bool:
        """Whether :meth:`data_to_send` has something (never before confirmation,
        never once CLOSED: the two answer alike, or a writer would spin)."""
        return Phase.UNCONFIRMED < self.phase < Phase.CLOSED and self.mux.has_output()

    def data_to_send(self, limit: int = WRITE_BATCH) -> bytes | bytearray | None:
        """Encrypted records (prefix included) for about ``limit`` plaintext bytes, or None."""
        if self.phase is Phase.UNCONFIRMED or self.phase is Phase.CLOSED:
            return None
        records, sizes = self.mux.data_to_send_records(limit)
        if not records:
            return None
        return self._cipher.encrypt_records(records, sizes)

    def output_flushed(self) -> bool:
        """The driver wrote everything it took: a draining session with
        nothing queued is CLOSED.  Returns whether it is CLOSED now."""
        if self.phase is Phase.DRAINING and not self.mux.has_output():
            self.phase = Phase.CLOSED
        return self.phase is Phase.CLOSED

    # ---------------------------------------------------------- local actions

    def set_busy(self, busy: bool, now: float) -> None:
        """The driver holds streams or pending opens (``busy``) or none since ``now``."""
        self.busy = busy
        self._idle_since = None if busy else now

    def go_away(self, code: ErrorCode = ErrorCode.NO_ERROR) -> None:
        """Queue GOAWAY(code): no new streams either way; open streams continue."""
        if self.phase > Phase.OPEN:
            return
        self.mux.goaway(code)
        if self.phase is Phase.OPEN:
            self.phase = Phase.GOING_AWAY

    def close(self, code: ErrorCode, reason: str, now: float, cause: Ending = Ending.LOCAL) -> bool:
        """End the session: queue GOAWAY(code) after what is queued, then drain.

        Returns False if it was already ending (nothing changes)."""
        if self.reason is not None:
            return False
        self.reason = reason
        self.cause = cause
        self.mux.goaway(code)  # no second one if GOAWAY(code) was sent already
        self._drain(now)
        return True

    def close_now(self, reason: str, cause: Ending = Ending.DROPPED) -> None:
        """CLOSED at once, without GOAWAY or drain (unconfirmed or unwanted sessions)."""
        if self.reason is None:
            self.reason = reason
            self.cause = cause
        self.phase = Phase.CLOSED

    def _drain(self, now: float) -> None:
        if self.phase is Phase.UNCONFIRMED:
            self.phase = Phase.CLOSED  # it may say nothing: nothing to drain
        elif self.phase is not Phase.CLOSED:
            self.phase = Phase.DRAINING
            self._drain_deadline = now + DRAIN_LIMIT

    # ---------------------------------------------------------- time

    def next_deadline(self) -> float | None:
        """When :meth:`handle_timer` has something to do next, or None."""
        phase = self.phase
        if phase is Phase.CLOSED:
            return None
        if phase is Phase.DRAINING:
            return self._drain_deadline
        deadline = math.inf
        if self._interval:
            deadline = self._last_heard + (self._timeout if self._pinged else self._interval)
        if self._idle and self._idle_since is not None:
            deadline = min(deadline, self._idle_since + self._idle)
        return None if deadline == math.inf else deadline

    def handle_timer(self, now: float) -> list[TimerEvent]:
        """Act on every deadline due at ``now`` (a call before any is due does nothing)."""
        phase = self.phase
        if phase is Phase.CLOSED:
            return []
        if phase is Phase.DRAINING:
            if now >= self._drain_deadline:
                self.phase = Phase.CLOSED
                return [DrainExpired()]
            return []
        # Each test is the very sum next_deadline() returned: a timer woken at
        # that deadline always finds it due (now - t >= d can be False there).
        if self._idle and self._idle_since is not None and now >= self._idle_since + self._idle:
            self.close(ErrorCode.NO_ERROR, "the session was idle", now, Ending.IDLE)
            return [IdleExpired()]
        if not self._interval:
            return []
        silent = now - self._last_heard
        if now >= self._last_heard + self._timeout:
            self.close_now(f"no sign of life from the peer for {silent:.0f} s", Ending.PEER_SILENT)
            return [PeerSilent(silent)]
        if now >= self._last_heard + self._interval and not self._pinged:
            self._pinged = True
            self.mux.ping(os.urandom(8))
            return [PingQueued()]
        return []
