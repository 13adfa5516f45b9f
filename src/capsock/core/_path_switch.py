"""Moving a live session between paths without losing a record: :class:`PathSwitch`.

Theory of operation (the wire rules are protocol.md section 13; this is how the
machine keeps them).

A session's records in one direction form one sequence: record ``n`` is the
one the session's transport cipher encrypted with nonce ``n``.  A *path* is
whatever carries records (the relayed transport the session started on, a
direct connection from a hole punch); each direction of a path carries
*lanes*: a lane is a run of consecutive records, announced by a *lane header*
that names the sequence number of its first record (the session's first path
starts with an implicit lane at the cipher's nonce).  Because the nonce is the
sequence number, the receiver needs no sequence number in the records: it
counts records along each lane.

The receiver decrypts and delivers strictly in sequence order, from whichever
path holds the next record: a record below the next expected one is a copy of
one already delivered and is dropped unread; one above it waits in a bounded
buffer.  Decryption is with the transport cipher's own counter, so a record is
delivered only if it was encrypted with exactly the nonce it is delivered as:
whatever a path does (drops, copies, reorders, a lying lane header), the
delivered sequence is a prefix of the sent one, or the session ends.

The sender keeps every record it sent since the peer announced support
(``path/hello``) until the peer acknowledges it (``path/ack``, cumulative),
as the exact bytes it sent.  When a path that carried unacknowledged records
dies, it opens a new lane on a live path starting at the oldest of them and
sends them again, byte for byte: a nonce is never used for a second
plaintext, because no record is ever encrypted twice.

No I/O, clock or randomness here: the driver passes bytes, path ids, ``now``
and the hello secret in; bytes per path and records for the mux come out.
The attach exchange that authenticates a new path is :mod:`capsock.core._path_auth`.
"""

from __future__ import annotations

import hmac
import struct
from collections import deque
from dataclasses import dataclass
from typing import Any, Final, Protocol

import msgpack

from ..errors import LocalUsageError, PathLost, PathSwitchError, ResourceLimitExceeded
from ._path_auth import PATH_ID_LEN, derive_path_key, lane_tag

__all__ = [
    "CONTROL_RESERVE",
    "MIN_RETAIN_LIMIT",
    "ORIGINAL_PATH",
    "PathSwitch",
    "PathSwitchConfig",
]

ORIGINAL_PATH: Final = bytes(PATH_ID_LEN)
"""The id of the path a session started on (16 zero bytes)."""
CONTROL_RESERVE: Final = 65536
"""Bytes of the retransmit limit that only path-control records (ACK, SWITCH) may use."""
MIN_RETAIN_LIMIT: Final = 2 * CONTROL_RESERVE
"""The smallest retransmit limit a hello may announce."""
MAX_RETAIN_LIMIT: Final = 2**32 - 1
VERSION: Final = 1

_CONTROL_HEAD: Final = b"\x0b\x00\x00\x00\x00"  # CONTROL frame, stream 0
_LANE: Final = b"\x00\x00L"
_LANE_LEN: Final = 3 + 8 + 16
_U16: Final = struct.Struct(">H")
_U64: Final = struct.Struct(">Q")
_FIELDS: Final = {
    "path/hello": frozenset({"type", "v", "b", "k"}),
    "path/ack": frozenset({"type", "n"}),
    "path/switch": frozenset({"type", "f", "t"}),
}


_Out = list[bytes | bytearray]  # records for the mux, in order


class _Cipher(Protocol):
    """What the machine needs of the session's :class:`TransportCipher`."""

    @property
    def send_nonce(self) -> int: ...
    @property
    def receive_nonce(self) -> int: ...
    def encrypt(self, plaintext: bytes | bytearray | memoryview) -> bytes: ...
    def decrypt(self, message: bytes | bytearray | memoryview) -> bytes | bytearray: ...


@dataclass(frozen=True, slots=True)
class PathSwitchConfig:
    """Bounds and timers of one session's path switch."""

    retain_limit: int = 8 * 1024 * 1024
    """Bytes (Noise messages) of sent, unacknowledged records kept for re-sending;
    also what this side announces it buffers for the peer.  The effective limit
    is the smaller of ours and the peer's."""
    ack_bytes: int = 65536
    """Acknowledge once this many bytes of records arrived since the last ACK."""
    ack_records: int = 32
    """... or this many records of any kind (ACKs included; protocol maximum 32)."""
    ack_delay: float = 0.2
    """... or this long (seconds, at most 1) after a record that was not an ACK arrived."""

    def __post_init__(self) -> None:
        if not MIN_RETAIN_LIMIT <= self.retain_limit <= MAX_RETAIN_LIMIT:
            raise LocalUsageError(f"retain_limit must be {MIN_RETAIN_LIMIT}..{MAX_RETAIN_LIMIT}")
        if not 1 <= self.ack_records <= 32 or not 1 <= self.ack_bytes <= 65536:
            raise LocalUsageError("ack_records must be 1..32 and ack_bytes 1..65536")
        if not 0 < self.ack_delay <= 1.0:
            raise LocalUsageError("ack_delay must be above 0 and at most 1 second")


class _Inbound:
    """The receiving end of one path: unparsed bytes and the current lane."""

    __slots__ = ("buf", "expect")

    def __init__(self, expect: int | None) -> None:
        self.buf = bytearray()
        self.expect = expect  # sequence number of the next record on this path


def _control(body: dict[str, Any]) -> bytes:
    raw: bytes = msgpack.packb(body, use_bin_type=True)
    return _CONTROL_HEAD + _U16.pack(len(raw)) + raw


def _path_message(plaintext: bytes | bytearray) -> dict[str, Any] | None:
    """The body of a path-control record, or None if the record is the mux's."""
    if plaintext[:5] != _CONTROL_HEAD or len(plaintext) < 8:
        return None
    if _U16.unpack_from(plaintext, 5)[0] != len(plaintext) - 7:
        return None  # more than one frame: the mux's (path records are alone)
    try:
        body = msgpack.unpackb(bytes(plaintext[7:]), raw=False, strict_map_key=True)
    except Exception:  # msgpack raises several unrelated types for junk
        return None
    if not isinstance(body, dict):
        return None
    kind = body.get("type")
    if not isinstance(kind, str) or not kind.startswith("path/"):
        return None
    if kind not in _FIELDS or set(body) != _FIELDS[kind]:
        raise PathSwitchError(f"malformed path-control record ({kind[:32]!r})")
    return body


def _uint(value: object, name: str, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= hi:
        raise PathSwitchError(f"path-control field {name} must be an integer 0..{hi}")
    return value


def _path_id(value: object) -> bytes:
    if not isinstance(value, bytes) or len(value) != PATH_ID_LEN:
        raise PathSwitchError(f"a path id is {PATH_ID_LEN} bytes")
    return value


class PathSwitch:
    """One session's records over one or more paths (protocol.md section 13).

    The driver hands every record it would send to :meth:`send` (plaintext:
    the machine encrypts with ``cipher``), every byte a path delivered to
    :meth:`receive_data`, and tells it about paths with :meth:`path_up` (a
    path that passed the attach exchange) and :meth:`path_down`.  It writes
    :meth:`data_to_send` to the paths named there and re-arms one timer at
    :meth:`get_timer` (:meth:`handle_timer`).  Nothing else may use ``cipher``.

    Args:
        cipher: the session's transport cipher, right after the handshake.
        handshake_hash: the session's handshake hash (binds the path key).
        is_dialer: whether this side dialed the session.
        secret: 32 fresh random bytes (this side's half of the path key).
        config: bounds and timers.

    Errors poison the machine: after one, every call raises again.
    ``ProtocolError`` (``PathSwitchError``, a failed decryption) and
    ``ResourceLimitExceeded`` are the peer's fault, ``PathLost`` means no path
    can carry the session any more, ``LocalUsageError`` is the driver's.
    """

    def __init__(
        self,
        cipher: _Cipher,
        *,
        handshake_hash: bytes,
        is_dialer: bool,
        secret: bytes,
        config: PathSwitchConfig | None = None,
    ) -> None:
        if len(secret) != 32:
            raise LocalUsageError("the path secret is 32 random bytes")
        self._cipher = cipher
        self._hh = bytes(handshake_hash)
        self._dialer = is_dialer
        self._secret = bytes(secret)
        self._config = config or PathSwitchConfig()
        self._error: Exception | None = None
        # sending
        self._hello_sent = False
        self._peer_limit: int | None = None  # set by the peer's hello
        self._retain_from: int | None = None  # first sequence number kept
        self._retained: deque[tuple[int, bytes, bool]] = deque()  # (seq, record, control)
        self._retained_bytes = 0
        self._acked = 0  # the peer's cumulative ACK: the next record it expects
        self._active = ORIGINAL_PATH
        self._live: list[bytes] = [ORIGINAL_PATH]  # oldest first
        self._lane_open: set[bytes] = {ORIGINAL_PATH}
        self._last_sent: dict[bytes, int] = {}
        self._out: dict[bytes, list[bytes]] = {}
        # receiving
        self._in: dict[bytes, _Inbound] = {ORIGINAL_PATH: _Inbound(cipher.receive_nonce)}
        self._early: dict[int, bytes] = {}
        self._early_bytes = 0
        self._rx_bytes = 0  # received since our last ACK
        self._rx_records = 0
        self._ack_due: float | None = None
        self._key: bytes | None = None
        self._peer_secret: bytes | None = None
        self.duplicates_dropped = 0
        """Records dropped because they were already delivered (counted for stats)."""
        self.peer_moves = 0
        """SWITCH records received: how often the peer moved its sending."""
        self.follows = 0
        """Re-sending lanes of the peer this side followed to their path."""
        self._last_switch: tuple[int, bytes] | None = None  # (seq, to) of the peer's last SWITCH

    # -- state ----------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """Both sides announced support: new paths may be attached."""
        return self._key is not None

    @property
    def path_key(self) -> bytes | None:
        """``K`` for :mod:`capsock.core._path_auth` (a secret: never log it), once :attr:`ready`."""
        return self._key

    @property
    def active_path(self) -> bytes:
        """The path this side sends new records on."""
        return self._active

    @property
    def live_paths(self) -> tuple[bytes, ...]:
        """The paths not reported down, oldest first."""
        return tuple(self._live)

    @property
    def retained_bytes(self) -> int:
        """Bytes of sent records kept until acknowledged."""
        return self._retained_bytes

    @property
    def buffered_bytes(self) -> int:
        """Bytes of received records waiting for an earlier one."""
        return self._early_bytes

    @property
    def receive_limit(self) -> int:
        """The most :attr:`buffered_bytes` may reach before the peer is at fault."""
        return self._config.retain_limit

    def _limit(self) -> int | None:
        if self._peer_limit is None:
            return None
        return min(self._peer_limit, self._config.retain_limit)

    def can_send(self, size: int) -> bool:
        """Whether :meth:`send` of a ``size``-byte plaintext fits the retransmit limit now.

        When it does not, wait for the peer's ACK (:meth:`receive_data`): backpressure.
        """
        limit = self._limit()
        if limit is None or self._error is not None:
            return self._error is None
        return self._retained_bytes + size + 16 <= limit - CONTROL_RESERVE

    def _check(self) -> None:
        if self._error is not None:
            raise PathSwitchError("the path switch failed earlier") from self._error

    def __repr__(self) -> str:  # counters only: never a key
        return f"PathSwitch(ready={self.ready}, kept={self._retained_bytes})"

    # -- sending --------------------------------------------------------------------

    def send(self, plaintext: bytes) -> None:
        """Encrypt one record of the mux and queue it on the active path.

        Raises:
            LocalUsageError: :meth:`can_send` is false (wait for an ACK), or the
                plaintext is too large for one record.
        """
        self._check()
        if not self.can_send(len(plaintext)):
            raise LocalUsageError("retransmit buffer full: wait until can_send() is true")
        self._emit(plaintext, control=False)
        if not self._hello_sent:
            self._send_hello()

    def _send_hello(self) -> None:
        self._hello_sent = True
        body = {
            "type": "path/hello",
            "v": VERSION,
            "b": self._config.retain_limit,
            "k": self._secret,
        }
        self._emit(_control(body), control=True)
        self._derive_key()

    def _emit(self, plaintext: bytes, *, control: bool) -> int:
        seq = self._cipher.send_nonce
        message = self._cipher.encrypt(plaintext)
        record = _U16.pack(len(message)) + message
        if self._retain_from is not None:
            self._retained.append((seq, record, control))
            self._retained_bytes += len(message)
        self._put(self._active, record)
        self._last_sent[self._active] = seq
        return seq

    def _put(self, path: bytes, data: bytes) -> None:
        self._out.setdefault(path, []).append(data)

    def _room_for_control(self, size: int) -> bool:
        limit = self._limit()
        return limit is None or self._retained_bytes + size + 16 <= limit

    def _send_control(self, body: dict[str, Any]) -> bool:
        plaintext = _control(body)
        if not self._room_for_control(len(plaintext)):
            return False
        if not self._hello_sent:
            self._send_hello()
        self._emit(plaintext, control=True)
        return True

    def data_to_send(self) -> list[tuple[bytes, bytes]]:
        """``(path id, bytes)`` to write, in order per path; each path's bytes once."""
        out = [(path, b"".join(chunks)) for path, chunks in self._out.items() if chunks]
        self._out.clear()
        return out

    # -- paths ----------------------------------------------------------------------

    def path_up(self, path: bytes, now: float) -> None:
        """A new path passed the attach exchange: receive on it, and send on it from now on.

        Raises:
            LocalUsageError: not :attr:`ready`, a malformed or known path id.
        """
        del now  # for a later policy (e.g. wait before moving)
        self._check()
        if self._key is None:
            raise LocalUsageError("no path may be attached before both hellos")
        if len(path) != PATH_ID_LEN or path in self._in or path == ORIGINAL_PATH:
            raise LocalUsageError("a new path needs a fresh 16-byte id")
        self._live.append(path)
        self._in[path] = _Inbound(None)
        self._move(path, resend=False)

    def _move(self, path: bytes, *, resend: bool) -> None:
        """End our lane on the active path (if alive) with a SWITCH, open one on
        ``path``: at the next new record, or (``resend``) at the oldest kept one."""
        old = self._active
        if old in self._lane_open:
            self._send_control({"type": "path/switch", "f": old, "t": path})
            self._lane_open.discard(old)
        retained = self._retained
        start = retained[0][0] if resend and retained else self._cipher.send_nonce
        assert self._key is not None
        tag = lane_tag(self._key, self._dialer, path, start)
        self._put(path, _LANE + _U64.pack(start) + tag)
        self._lane_open.add(path)
        self._active = path
        if resend:
            for seq, record, _ in self._retained:
                if seq >= start:
                    self._put(path, record)
                    self._last_sent[path] = seq

    def path_down(self, path: bytes) -> None:
        """A path died (closed, failed keepalive): records it swallowed are sent again.

        Idempotent for a path already down.

        Raises:
            PathLost: no live path is left, or records only the dead path held
                were sent before the peer's hello (nothing kept to re-send).
        """
        self._check()
        if path not in self._live:
            return
        self._live.remove(path)
        self._in.pop(path, None)
        self._out.pop(path, None)
        self._lane_open.discard(path)
        if not self._live:
            self._error = PathLost("every path of the session died")
            raise self._error
        carried = self._last_sent.pop(path, -1) >= self._acked
        if not carried and path != self._active:
            return  # everything it carried was acknowledged; our lane is elsewhere
        target = self._active if self._active in self._live else self._live[-1]
        if not carried:
            self._move(target, resend=False)
            return
        # Records before the peer's hello were not kept; only the original path had them.
        assert self._retain_from is not None  # a second path needs both hellos
        if path == ORIGINAL_PATH and self._acked < self._retain_from:
            self._error = PathLost("a dead path held records sent before the peer's hello")
            raise self._error
        self._move(target, resend=True)

    # -- receiving ------------------------------------------------------------------

    def receive_data(self, path: bytes, data: bytes | bytearray | memoryview, now: float) -> _Out:
        """Bytes that arrived on ``path``; returns the mux's records now deliverable, in order.

        Raises:
            ProtocolError: a record failed authentication, or broke the path rules
                (``PathSwitchError``).
            ResourceLimitExceeded: the peer made this side buffer more than it announced.
            LocalUsageError: ``path`` was never attached, or is down.
        """
        self._check()
        inbound = self._in.get(path)
        if inbound is None:
            raise LocalUsageError("bytes from a path that is not attached (or is down)")
        inbound.buf += data
        delivered: _Out = []
        try:
            self._parse(path, inbound, delivered, now)
        except Exception as exc:  # the cipher's ProtocolError, ours, the bound's
            self._error = exc
            raise
        return delivered

    def _parse(self, path: bytes, inbound: _Inbound, out: _Out, now: float) -> None:
        buf = inbound.buf
        pos = 0
        size = len(buf)
        while size - pos >= 2:
            length = (buf[pos] << 8) | buf[pos + 1]
            if length == 0:
                if size - pos < 3:
                    break
                if buf[pos : pos + 3] != _LANE:
                    raise PathSwitchError("unknown path frame on a path carrying records")
                if size - pos < _LANE_LEN:
                    break
                self._lane_header(path, inbound, bytes(buf[pos + 3 : pos + _LANE_LEN]))
                pos += _LANE_LEN
                continue
            if size - pos < 2 + length:
                break
            seq = inbound.expect
            if seq is None:
                raise PathSwitchError("a record on a path before its lane header")
            inbound.expect = seq + 1
            self._accept(seq, bytes(buf[pos + 2 : pos + 2 + length]), out, now)
            pos += 2 + length
        del buf[:pos]

    def _lane_header(self, path: bytes, inbound: _Inbound, body: bytes) -> None:
        if self._key is None:
            raise PathSwitchError("a lane header before both hellos")
        start = _U64.unpack_from(body)[0]
        expect = lane_tag(self._key, not self._dialer, path, start)
        if not hmac.compare_digest(body[8:], expect):
            raise PathSwitchError("a lane header failed authentication")
        inbound.expect = start
        # A lane that starts at or below what we expect re-sends: the peer found a
        # path dead.  Unless it is the clean switch its last SWITCH announced,
        # follow it there, re-sending ours too (our path may be the dead one, and
        # we may never hear of it otherwise: a NAT that drops a mapping says
        # nothing).  Only towards an older path (the relay is the oldest): two
        # sides following each other both ways would bounce for ever.
        live = self._live
        if (
            start <= self._cipher.receive_nonce
            and path in live
            and live.index(path) < live.index(self._active)
            and self._last_switch != (start - 1, path)
        ):
            self.follows += 1
            self._move(path, resend=True)

    def _accept(self, seq: int, message: bytes, out: _Out, now: float) -> None:
        nxt = self._cipher.receive_nonce
        if seq < nxt:
            self.duplicates_dropped += 1
            return
        if seq > nxt:
            if seq not in self._early:
                if self._early_bytes + len(message) > self._config.retain_limit:
                    raise ResourceLimitExceeded(
                        "the peer's records waiting for an earlier one exceed the "
                        f"{self._config.retain_limit}-byte bound it was told"
                    )
                self._early[seq] = message
                self._early_bytes += len(message)
            else:
                self.duplicates_dropped += 1
            return
        self._deliver(message, out, now)
        early = self._early
        while early:
            waiting = early.pop(self._cipher.receive_nonce, None)
            if waiting is None:
                break
            self._early_bytes -= len(waiting)
            self._deliver(waiting, out, now)

    def _deliver(self, message: bytes, out: _Out, now: float) -> None:
        plaintext = self._cipher.decrypt(message)  # ProtocolError if not record `next`
        self._rx_records += 1
        self._rx_bytes += len(message)
        body = _path_message(plaintext) if plaintext[:1] == b"\x0b" else None
        eliciting = True
        if body is not None:
            eliciting = self._control_received(body)
        else:
            out.append(plaintext)
        if self._peer_limit is None:
            return
        cfg = self._config
        if self._rx_bytes >= cfg.ack_bytes or self._rx_records >= cfg.ack_records:
            self._send_ack(now)
        elif eliciting and self._ack_due is None:
            self._ack_due = now + cfg.ack_delay

    def _control_received(self, body: dict[str, Any]) -> bool:
        kind = body["type"]
        if kind == "path/hello":
            if self._peer_limit is not None:
                raise PathSwitchError("a second path/hello")
            if _uint(body["v"], "v", 2**32 - 1) < 1:
                raise PathSwitchError("path/hello version must be at least 1")
            limit = _uint(body["b"], "b", MAX_RETAIN_LIMIT)
            if limit < MIN_RETAIN_LIMIT:
                raise PathSwitchError(f"path/hello limit below {MIN_RETAIN_LIMIT}")
            secret = body["k"]
            if not isinstance(secret, bytes) or len(secret) != 32:
                raise PathSwitchError("path/hello secret must be 32 bytes")
            self._peer_limit = limit
            self._peer_secret = secret
            self._retain_from = self._cipher.send_nonce
            self._derive_key()
            return True
        if self._peer_limit is None:
            raise PathSwitchError(f"{kind} before the peer's path/hello")
        if kind == "path/ack":
            n = _uint(body["n"], "n", 2**64 - 1)
            if n < self._acked or n > self._cipher.send_nonce:
                raise PathSwitchError("path/ack out of order or of records never sent")
            self._acked = n
            retained = self._retained
            while retained and retained[0][0] < n:
                self._retained_bytes -= len(retained.popleft()[1]) - 2
            return False
        _path_id(body["f"])
        self._last_switch = (self._cipher.receive_nonce - 1, _path_id(body["t"]))
        self.peer_moves += 1
        return True

    def _derive_key(self) -> None:
        if self._key is not None or not self._hello_sent or self._peer_secret is None:
            return
        ours, theirs = self._secret, self._peer_secret
        dialer, responder = (ours, theirs) if self._dialer else (theirs, ours)
        self._key = derive_path_key(self._hh, dialer, responder)

    def _send_ack(self, now: float) -> None:
        if self._send_control({"type": "path/ack", "n": self._cipher.receive_nonce}):
            self._rx_bytes = self._rx_records = 0
            self._ack_due = None
        else:  # no room: try again later (the peer's ACK frees room)
            self._ack_due = now + self._config.ack_delay

    # -- time -----------------------------------------------------------------------

    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` must run next (None: no timer)."""
        return self._ack_due

    def handle_timer(self, now: float) -> None:
        """Send the delayed ACK if it is due."""
        self._check()
        if self._ack_due is not None and now >= self._ack_due:
            self._send_ack(now)
