"""Every configuration object of capsock, validated at construction and immutable.

:class:`MuxConfig` (windows and stream limits of one session's multiplexer),
:class:`SessionConfig` (one session: the mux, keepalive, timeouts) and
:class:`NodeConfig` (one node: the session config plus admission, forwarding
and relay settings).  All three are frozen, slotted dataclasses: a value out
of range raises :class:`~capsock.errors.LocalUsageError` naming the field and
what it accepts, assigning a field afterwards raises
``dataclasses.FrozenInstanceError``, and derived fields (``half_*_window``,
the normalised ``accept_forwarded``) are computed once, in ``__post_init__``.
To change a setting, build a new object: ``dataclasses.replace(config, ...)``
validates again.

Sans-IO: this module imports nothing above the core, so the mux can use it.
The defaults' rationale is in docs/api.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Final, Literal

from .core.frames import HEADER_LEN
from .errors import LocalUsageError

__all__ = [
    "INITIAL_SESSION_WINDOW",
    "INITIAL_STREAM_WINDOW",
    "MAX_MESSAGE_PLAINTEXT",
    "MAX_WINDOW",
    "MuxConfig",
    "NodeConfig",
    "SessionConfig",
    "parse_listen",
]

INITIAL_STREAM_WINDOW: Final = 256 * 1024
"""Credit every new stream starts with, in each direction (protocol constant)."""
INITIAL_SESSION_WINDOW: Final = 1024 * 1024
"""Credit every new session starts with, in each direction (protocol constant)."""
MAX_MESSAGE_PLAINTEXT: Final = 65535 - 16
"""The largest plaintext one Noise transport message can carry."""
MAX_WINDOW: Final = 2**31 - 1
"""The largest credit window (31 bits, protocol constant)."""


def _set(obj: object, name: str, value: object) -> None:
    object.__setattr__(obj, name, value)  # only in __post_init__: derived fields


def _int(name: str, value: object, low: int, high: int | None = None) -> None:
    if type(value) is not int:
        raise LocalUsageError(f"{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f"at least {low}" if high is None else f"in [{low}, {high}]"
        raise LocalUsageError(f"{name}={value} is out of range: it must be {bound}")


def _seconds(name: str, value: object, *, zero: bool = False, infinite: bool = False) -> None:
    """A duration: positive (or 0 when ``zero``), finite unless ``infinite``; never NaN."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise LocalUsageError(f"{name} must be a number of seconds, got {value!r}")
    ok = (value >= 0 if zero else value > 0) and (infinite or math.isfinite(value))
    if not ok:  # NaN fails both comparisons
        accepted = "0 or more" if zero else "more than 0"
        raise LocalUsageError(
            f"{name}={value!r} is out of range: it takes {accepted} seconds"
            + ("" if not infinite else " (infinite allowed)")
        )


def _pair(name: str, value: object) -> tuple[float, float]:
    if not isinstance(value, tuple | list) or len(value) != 2:
        raise LocalUsageError(f"{name} must be a pair of numbers, got {value!r}")
    first, second = value
    for item in (first, second):
        if isinstance(item, bool) or not isinstance(item, int | float) or not math.isfinite(item):
            raise LocalUsageError(f"{name} must be a pair of finite numbers, got {value!r}")
    return float(first), float(second)


def _enabled(seconds: float) -> bool:
    return math.isfinite(seconds) and seconds > 0


@dataclass(frozen=True, slots=True)
class MuxConfig:
    """Per-session limits.  Every field has a sane default; all are documented.

    Raises:
        LocalUsageError: a value is out of range (the message names it).
    """

    stream_window: int = 4 * 1024 * 1024
    """Receive window per stream: the most a peer may have in flight or buffered
    on one stream before the application reads (>= INITIAL_STREAM_WINDOW)."""
    session_window: int = 16 * 1024 * 1024
    """Receive window for the whole session, over all streams (>= INITIAL_SESSION_WINDOW)."""
    max_streams: int = 16384
    """Concurrent streams per session (opened by either side)."""
    max_pending_opens: int = 128
    """Remote OPENs waiting for the endpoint's decision; more are refused (BUSY)."""
    max_frame_data: int = MAX_MESSAGE_PLAINTEXT - HEADER_LEN
    """Largest DATA payload per frame this side sends."""
    max_queued_control: int = 1024 * 1024
    """Bytes of answers (PONG, REJECT, ...) queued for a peer that does not read
    before the session is closed as abusive."""
    max_queued_data: int = 4 * 1024 * 1024
    """Bytes of DATA this side queues for sending, over all streams; beyond it
    :meth:`Mux.send_data` takes nothing (the sender waits), whatever credit
    the peer granted.  The peer's credit is the peer's to choose (up to 2 GiB
    per stream): without this bound, a peer that grants it and stops reading
    would make this side buffer everything its application sends."""
    half_stream_window: int = field(init=False, repr=False, compare=False)
    """``stream_window // 2``, the batch of stream credit returned (derived)."""
    half_session_window: int = field(init=False, repr=False, compare=False)
    """``session_window // 2``, the batch of session credit returned (derived)."""

    def __post_init__(self) -> None:
        _int("stream_window", self.stream_window, INITIAL_STREAM_WINDOW, MAX_WINDOW)
        _int("session_window", self.session_window, INITIAL_SESSION_WINDOW, MAX_WINDOW)
        _int("max_streams", self.max_streams, 1)
        _int("max_pending_opens", self.max_pending_opens, 1)
        _int("max_frame_data", self.max_frame_data, 1, MAX_MESSAGE_PLAINTEXT - HEADER_LEN)
        _int("max_queued_control", self.max_queued_control, 1)
        _int("max_queued_data", self.max_queued_data, 1)
        _set(self, "half_stream_window", self.stream_window // 2)
        _set(self, "half_session_window", self.session_window // 2)


@dataclass(frozen=True, slots=True)
class SessionConfig:
    """Per-session settings (see docs/api.md for the defaults' rationale).

    Raises:
        LocalUsageError: a value is out of range, or keepalive is on and
            ``keepalive_timeout`` is not longer than ``keepalive_interval``.
    """

    mux: MuxConfig = field(default_factory=MuxConfig)
    """Windows and stream limits of the multiplexer."""
    keepalive_interval: float = 15.0
    """Seconds of silence from the peer before we send a PING; 0 or infinite
    turns keepalive (and its timeout) off."""
    keepalive_timeout: float = 45.0
    """Seconds of silence from the peer before the session is declared dead
    (longer than ``keepalive_interval``)."""
    open_timeout: float = 30.0
    """Seconds to wait for the endpoint to ACCEPT or REJECT an OPEN."""
    idle_timeout: float = 300.0
    """Seconds a session with no streams stays open before it is closed; 0 or
    infinite keeps it."""
    max_concurrent_opens: int = 64
    """OPENs this side keeps in flight at once; more wait their turn.  Keep it at
    or below the peer's ``MuxConfig.max_pending_opens`` (default 128)."""
    push_reads: bool = True
    """On asyncio, read the socket in protocol callbacks instead of a task
    (:mod:`capsock.net._pushio`; fewer event-loop turns per message).  Off: the
    portable task-based read loop that trio and nested sessions always use."""

    def __post_init__(self) -> None:
        if not isinstance(self.mux, MuxConfig):
            raise LocalUsageError(f"mux must be a MuxConfig, got {type(self.mux).__name__}")
        _seconds("keepalive_interval", self.keepalive_interval, zero=True, infinite=True)
        if _enabled(self.keepalive_interval):
            _seconds("keepalive_timeout", self.keepalive_timeout, infinite=True)
            if not self.keepalive_timeout > self.keepalive_interval:
                raise LocalUsageError(
                    f"keepalive_timeout={self.keepalive_timeout!r} must be longer than "
                    f"keepalive_interval={self.keepalive_interval!r}: the peer gets a PING "
                    "after the interval and is declared dead after the timeout"
                )
        _seconds("open_timeout", self.open_timeout, infinite=True)
        _seconds("idle_timeout", self.idle_timeout, zero=True, infinite=True)
        _int("max_concurrent_opens", self.max_concurrent_opens, 1)
        if type(self.push_reads) is not bool:
            raise LocalUsageError(f"push_reads must be True or False, got {self.push_reads!r}")


AcceptForwarded = Literal["trusted", "any", "never"]


@dataclass(frozen=True, slots=True)
class NodeConfig:
    """Node-wide limits and timeouts; every field has a documented default.

    Raises:
        LocalUsageError: a value is out of range (the message names it).
    """

    session: SessionConfig = field(default_factory=SessionConfig)
    """Per-session settings (windows, keepalive, open timeout)."""
    handshake_timeout: float = 10.0
    """Seconds an inbound connection may take to complete the handshake."""
    connect_timeout: float = 10.0
    """Seconds per route for an outbound dial plus handshake."""
    max_half_open: int = 256
    """Inbound connections allowed to be mid-handshake at once; more are dropped."""
    listener_backlog: int = 128
    """Accepted streams a listener holds before its application calls accept()."""
    backlog_wait: float = 2.0
    """Seconds an OPEN waits for room in a full listener backlog before BUSY."""
    direct_timeout: float = 3.0
    """Seconds per direct route when the capability also offers forwarding
    (``via``) routes: direct hints get a short head start, then forwarding."""
    accept_forwarded: AcceptForwarded | bool = "trusted"
    """From whom this node accepts sessions forwarded to it (transport streams):
    ``"trusted"`` (the default) only from peers it has a reason to -- its
    relays, sessions it dialed itself, and peers that opened a stream with one
    of its capabilities (an introducer that holds one, say); ``"any"`` from
    every peer; ``"never"``.  ``True`` means ``"any"``, ``False`` ``"never"``
    (normalised at construction: the field then holds the string).
    Forwarded sessions still need a capability for every stream."""
    max_forwards_per_peer: int = 256
    """Sessions one peer may have forwarded through this node at once (0: none)."""
    max_forwarded_sessions: int = 1024
    """Sessions forwarded *to* this node that it runs at once (mid-handshake or
    confirmed), counted apart from ``max_sessions``: a flood of forwarded
    sessions cannot lock out direct dialers."""
    max_forwarded_per_session: int = 64
    """Of those, how many one carrying session (one peer) may hold at once; a
    relay this node registered with may carry up to ``max_forwarded_sessions``
    (it is how every client reaches a node behind NAT).  When full, the oldest
    forwarded session that never had a stream accepted is shed (for a relay's
    share, or the node-wide limit); else the newcomer gets ``BUSY``."""
    relay_backoff: tuple[float, float] = (0.5, 30.0)
    """Reconnect delay to a relay: first and largest (doubling, with jitter)."""
    direct_paths: bool = True
    """Try a direct path (TCP hole punching) to peers reached through a relay,
    and answer peers that try (docs/direct-paths.md).  ``False``: no candidates
    are sent, no coordination is accepted, relay dials use an ordinary socket."""
    splice: bool = True
    """Spliced forwarding (docs/protocol.md 10.10): as a dialer, ask forwarders
    for a dedicated connection per forwarded session; as a relay client, offer
    to dial one; as a forwarder, copy such pairs without decrypting.  ``False``:
    only nested forwarding (10.5), and a ``00 00`` start is a bad handshake."""
    splice_ticket_ttl: float = 5.0
    """Seconds a splice ticket stays redeemable (and a forwarder waits for
    each half of a spliced pair) before the setup falls back to nesting."""
    splice_idle_timeout: float = 300.0
    """Seconds a spliced pair may carry no byte in either direction before
    the forwarder closes it (``inf``: never)."""
    max_sessions: int = 4096
    """Direct sessions (inbound and outbound) this node keeps at once.  When an
    inbound session would exceed it (or the descriptor budget), the oldest
    inbound session that never opened a stream with a capability is shed; when
    there is none, the newcomer is dropped."""
    handshake_rate: tuple[float, float] = (200.0, 400.0)
    """Handshakes per second and burst allowed from one source (an IPv4
    address, an IPv6 /64, the carrying peer of a forwarded session); more are
    dropped before any public-key work."""
    refused_open_rate: tuple[float, float] = (50.0, 200.0)
    """Refused ``OPEN``s per second and burst allowed from one source (as for
    ``handshake_rate``), counted after the uniform capability check.  A session
    whose refusal finds its source's bucket empty is ended with
    ``GOAWAY(LIMIT_EXCEEDED)`` and none of its later OPENs is checked: a peer
    cannot buy unbounded capability checks with cheap forged tokens."""
    replay_window: float = 600.0
    """Seconds a handshake's ephemeral key is remembered: a replayed message 1
    within that time is dropped before any public-key work."""
    replay_cache_size: int = 16384
    """Ephemeral keys remembered at most (the oldest go first); 0 turns the cache off."""
    fd_reserve: int = 64
    """File descriptors (at least; or one eighth of the limit) kept free of
    inbound connections, for outbound dials, relay upkeep, the store and the
    application's own sockets.  The node raises its soft ``RLIMIT_NOFILE`` to
    the hard limit at start and sizes its inbound connections to the rest."""

    def __post_init__(self) -> None:
        if not isinstance(self.session, SessionConfig):
            raise LocalUsageError(
                f"session must be a SessionConfig, got {type(self.session).__name__}"
            )
        if self.accept_forwarded is True:
            _set(self, "accept_forwarded", "any")
        elif self.accept_forwarded is False:
            _set(self, "accept_forwarded", "never")
        elif self.accept_forwarded not in ("trusted", "any", "never"):
            raise LocalUsageError(
                f"accept_forwarded={self.accept_forwarded!r}: use 'trusted', 'any' or 'never'"
            )
        for name in ("handshake_timeout", "connect_timeout", "direct_timeout", "splice_ticket_ttl"):
            _seconds(name, getattr(self, name))
        _seconds("splice_idle_timeout", self.splice_idle_timeout, infinite=True)
        if not isinstance(self.splice, bool):
            raise LocalUsageError(f"splice must be True or False, got {self.splice!r}")
        _seconds("backlog_wait", self.backlog_wait, zero=True)
        _seconds("replay_window", self.replay_window, zero=True)
        for name in ("max_half_open", "listener_backlog", "max_sessions"):
            _int(name, getattr(self, name), 1)
        for name in (
            "max_forwards_per_peer", "max_forwarded_sessions", "max_forwarded_per_session",
            "replay_cache_size", "fd_reserve",
        ):  # fmt: skip
            _int(name, getattr(self, name), 0)
        first, largest = _pair("relay_backoff", self.relay_backoff)
        if not 0 < first <= largest:
            raise LocalUsageError(
                f"relay_backoff={self.relay_backoff!r}: the first delay must be more than 0 "
                "and at most the largest"
            )
        _set(self, "relay_backoff", (first, largest))
        if not isinstance(self.direct_paths, bool):
            raise LocalUsageError(f"direct_paths must be True or False, got {self.direct_paths!r}")
        for name in ("handshake_rate", "refused_open_rate"):
            rate, burst = _pair(name, getattr(self, name))
            if not (rate > 0 and burst >= 1):
                raise LocalUsageError(
                    f"{name}={getattr(self, name)!r}: the rate (per second) must be more "
                    "than 0 and the burst at least 1"
                )
            _set(self, name, (rate, burst))


def parse_listen(spec: str) -> tuple[str, str, int]:
    """A listen (or advertise) address as ``(kind, host or path, port)``.

    ``tcp:HOST:PORT`` (port 0 = any; IPv6 hosts in brackets), ``unix:/PATH``,
    or a bare ``HOST:PORT`` as on the command line.

    Raises:
        LocalUsageError: the address is malformed; the message shows the forms.
    """
    kind, sep, rest = spec.partition(":")
    if kind not in ("tcp", "unix") and spec.rpartition(":")[2].isdigit():
        return parse_listen(f"tcp:{spec}")  # a bare HOST:PORT, as on the command line
    if not sep:
        raise LocalUsageError(f"listen address {spec!r}: use tcp:HOST:PORT or unix:/PATH")
    if kind == "unix":
        if not rest.startswith("/"):
            raise LocalUsageError(f"listen address {spec!r}: a unix path must be absolute")
        return "unix", rest, 0
    if kind == "tcp":
        host, sep, port_text = rest.rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if not sep or not host or not port_text.isdigit() or int(port_text) > 65535:
            raise LocalUsageError(f"listen address {spec!r}: use tcp:HOST:PORT (port 0 = any)")
        return "tcp", host, int(port_text)
    raise LocalUsageError(f"listen address {spec!r}: unknown kind {kind!r} (tcp or unix)")
