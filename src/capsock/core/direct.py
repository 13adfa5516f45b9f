"""Sans-IO coordination of a direct path between two nodes (hole punching).

The messages two nodes exchange inside their end-to-end session before they
punch, and the decisions both must reach alike.  No I/O and no anyio here: bytes
in, typed messages out; time is a parameter.  The sockets are in
:mod:`capsock.net.punch`; the design is in ``docs/direct-paths.md``.

Messages (each one msgpack map, ``"type"`` names the kind; every field checked):

- ``Observed(addr)``: from a relay or forwarder, the public address it sees the
  node's connection come from (the node's candidate nobody else can tell it).
- ``Candidates(observed, local)``: a node's addresses for the peer to dial.
- ``Ping(seq, nonce)`` / ``Pong(seq, nonce)``: one round trip, measured by :class:`RttMeter`.
- ``Sync(attempt)``: "dial now": the coordinator sends it and dials RTT/2 later,
  the other node dials as soon as it arrives (DCUtR), so the SYNs cross.

Decisions:

- :func:`coordinator`: the node with the smaller NodeId coordinates (sends SYNC)
  and is the Noise initiator on every new path, whichever way its socket went.
- :func:`choose_path`: when more than one connection came up (a dial and an
  accept both succeeded), both nodes keep the same one, computed alone.

Bad input raises :class:`DirectMessageError` (a ProtocolError); nothing else.
"""

from __future__ import annotations

import collections
import ipaddress
import math
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import msgpack

from ..errors import DirectMessageError

__all__ = [
    "MAX_CANDIDATES",
    "MAX_MESSAGE",
    "Address",
    "Candidates",
    "DirectMessage",
    "DirectMessageError",
    "Observed",
    "PathOffer",
    "Ping",
    "Pong",
    "PunchBudget",
    "RttMeter",
    "Sync",
    "answer",
    "choose_path",
    "coordinator",
    "decode",
    "encode",
    "is_noise_initiator",
    "sync_delay",
]

MAX_CANDIDATES = 8
"""At most this many addresses per list in a Candidates message."""
MAX_MESSAGE = 1024
"""Encoded messages larger than this are refused before parsing."""
MAX_ATTEMPT = 3
"""SYNC carries the attempt number, 1..MAX_ATTEMPT."""
MAX_RTT = 10.0
"""An RTT above this (seconds) is not trusted for SYNC timing; it is clamped."""
_NONCE = 8


@dataclass(frozen=True, slots=True)
class Address:
    """One TCP candidate: an IP literal (canonical text form) and a port 1..65535."""

    host: str
    port: int

    def __post_init__(self) -> None:
        _check_address(self.host, self.port)


@dataclass(frozen=True, slots=True)
class Observed:
    """Sent by a relay/forwarder: the address it sees this node's connection come from."""

    addr: Address


@dataclass(frozen=True, slots=True)
class Candidates:
    """A node's candidates: as observed by its relay(s), and its own interface addresses."""

    observed: tuple[Address, ...]
    local: tuple[Address, ...]

    def __post_init__(self) -> None:
        if len(self.observed) > MAX_CANDIDATES or len(self.local) > MAX_CANDIDATES:
            raise DirectMessageError(f"at most {MAX_CANDIDATES} candidates per list")

    def dial_list(self) -> list[tuple[str, int]]:
        """Where the peer dials: observed first, then local, without duplicates."""
        out = dict.fromkeys((a.host, a.port) for a in (*self.observed, *self.local))
        return list(out)[:MAX_CANDIDATES]


@dataclass(frozen=True, slots=True)
class Ping:
    """A round-trip probe; the peer echoes ``seq`` and ``nonce`` in a Pong at once."""

    seq: int
    nonce: bytes


@dataclass(frozen=True, slots=True)
class Pong:
    """The answer to a Ping (same ``seq`` and ``nonce``)."""

    seq: int
    nonce: bytes


@dataclass(frozen=True, slots=True)
class Sync:
    """The coordinator's "dial now" for attempt ``attempt`` (1..MAX_ATTEMPT)."""

    attempt: int

    def __post_init__(self) -> None:
        if not 1 <= self.attempt <= MAX_ATTEMPT:
            raise DirectMessageError(f"SYNC attempt must be 1..{MAX_ATTEMPT}")


@dataclass(frozen=True, slots=True)
class PathOffer:
    """One connection that came up with the peer, as this node sees it.

    ``path_id``: the handshake hash of the Noise handshake run on that
    connection (both nodes compute the same bytes); ``dialed_by``: which node's
    ``connect`` made it ("both" for a TCP simultaneous open).
    """

    path_id: bytes
    dialed_by: Literal["local", "peer", "both"]


DirectMessage = Observed | Candidates | Ping | Pong | Sync


# -- validation ---------------------------------------------------------------------


def _check_address(host: object, port: object) -> None:
    if not isinstance(host, str):
        raise DirectMessageError("candidate host must be a string")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise DirectMessageError("candidate host is not an IP literal") from None
    if str(ip) != host:
        raise DirectMessageError("candidate host is not in canonical form")
    if ip.is_multicast or ip.is_unspecified:
        raise DirectMessageError("candidate host is multicast or unspecified")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port <= 65535:
        raise DirectMessageError("candidate port must be an integer 1..65535")


def _int(value: object, name: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise DirectMessageError(f"{name} must be an integer {lo}..{hi}")
    return value


def _nonce(value: object) -> bytes:
    if not isinstance(value, bytes) or len(value) != _NONCE:
        raise DirectMessageError(f"nonce must be {_NONCE} bytes")
    return value


def _addr(value: object) -> Address:
    if not isinstance(value, list) or len(value) != 2:
        raise DirectMessageError("a candidate is a [host, port] pair")
    _check_address(value[0], value[1])
    return Address(value[0], value[1])


def _addrs(value: object, name: str) -> tuple[Address, ...]:
    if not isinstance(value, list) or len(value) > MAX_CANDIDATES:
        raise DirectMessageError(f"{name} must be a list of at most {MAX_CANDIDATES} candidates")
    return tuple(_addr(v) for v in value)


_FIELDS: dict[str, frozenset[str]] = {
    "direct/observed": frozenset({"type", "a"}),
    "direct/candidates": frozenset({"type", "o", "l"}),
    "direct/ping": frozenset({"type", "s", "n"}),
    "direct/pong": frozenset({"type", "s", "n"}),
    "direct/sync": frozenset({"type", "k"}),
}
_SEQ_MAX = 2**32 - 1


def encode(msg: DirectMessage) -> bytes:
    """The msgpack bytes of ``msg``."""
    body: dict[str, Any]
    if isinstance(msg, Observed):
        body = {"type": "direct/observed", "a": [msg.addr.host, msg.addr.port]}
    elif isinstance(msg, Candidates):
        body = {
            "type": "direct/candidates",
            "o": [[a.host, a.port] for a in msg.observed],
            "l": [[a.host, a.port] for a in msg.local],
        }
    elif isinstance(msg, Ping | Pong):
        _int(msg.seq, "seq", 0, _SEQ_MAX)
        body = {
            "type": "direct/ping" if isinstance(msg, Ping) else "direct/pong",
            "s": msg.seq,
            "n": msg.nonce,
        }
    else:
        body = {"type": "direct/sync", "k": msg.attempt}
    out: bytes = msgpack.packb(body, use_bin_type=True)
    return out


def decode(data: bytes) -> DirectMessage:
    """Parse one coordination message.

    Raises DirectMessageError for anything but a well-formed message (too large,
    not msgpack, unknown kind, missing or extra field, wrong type, bad address).
    """
    if len(data) > MAX_MESSAGE:
        raise DirectMessageError(f"coordination message larger than {MAX_MESSAGE} bytes")
    try:
        body = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True)
    except Exception:  # msgpack raises several unrelated types for junk
        raise DirectMessageError("coordination message is not valid msgpack") from None
    if not isinstance(body, dict):
        raise DirectMessageError("coordination message must be a map")
    kind = body.get("type")
    if not isinstance(kind, str) or kind not in _FIELDS:
        raise DirectMessageError("unknown coordination message kind")
    if set(body) != _FIELDS[kind]:
        raise DirectMessageError(f"{kind}: wrong fields")
    if kind == "direct/observed":
        return Observed(_addr(body["a"]))
    if kind == "direct/candidates":
        return Candidates(_addrs(body["o"], "observed"), _addrs(body["l"], "local"))
    if kind in ("direct/ping", "direct/pong"):
        seq = _int(body["s"], "seq", 0, _SEQ_MAX)
        cls = Ping if kind == "direct/ping" else Pong
        return cls(seq, _nonce(body["n"]))
    return Sync(_int(body["k"], "attempt", 1, MAX_ATTEMPT))


# -- round trip ---------------------------------------------------------------------


class RttMeter:
    """Measures the session's round trip: :meth:`ping` makes a probe, :meth:`pong` times it.

    Only the latest outstanding probe counts; a Pong with another seq or nonce
    (late, replayed, forged by a confused peer) is ignored.  ``nonce`` is 8 random
    bytes from the caller (``os.urandom(8)``; this module does no I/O).
    """

    def __init__(self, nonce: bytes) -> None:
        self._nonce = _nonce(nonce)
        self._seq = 0
        self._sent: float | None = None
        self.rtt: float | None = None

    def ping(self, now: float) -> Ping:
        """The next probe, sent at time ``now``."""
        self._seq = (self._seq + 1) & _SEQ_MAX
        self._sent = now
        return Ping(self._seq, self._nonce)

    def pong(self, msg: Pong, now: float) -> float | None:
        """Record the answer; return the RTT (seconds) or None if ``msg`` does not match."""
        if self._sent is None or msg.seq != self._seq or msg.nonce != self._nonce:
            return None
        self.rtt = max(0.0, now - self._sent)
        self._sent = None
        return self.rtt


def answer(ping: Ping) -> Pong:
    """The Pong that answers ``ping``."""
    return Pong(ping.seq, ping.nonce)


def sync_delay(rtt: float) -> float:
    """How long the coordinator waits after sending SYNC before it dials: RTT/2."""
    if not math.isfinite(rtt) or rtt < 0:
        raise ValueError("rtt must be a finite, non-negative number of seconds")
    return min(rtt, MAX_RTT) / 2


# -- decisions ----------------------------------------------------------------------


def coordinator(a: bytes, b: bytes) -> bytes:
    """Which of two node ids coordinates the punch: the smaller (bytewise). Symmetric."""
    if a == b:
        raise ValueError("a node does not punch to itself")
    return min(a, b)


def is_noise_initiator(local_id: bytes, peer_id: bytes) -> bool:
    """True if this node runs the Noise handshake as initiator on a new direct path.

    The coordinator is the initiator on every new path, whichever socket dialed:
    a TCP simultaneous open has two dialers and no acceptor.
    """
    return coordinator(local_id, peer_id) == local_id


def choose_path(local_id: bytes, peer_id: bytes, offers: Iterable[PathOffer]) -> bytes:
    """The ``path_id`` to keep when several connections came up; both nodes agree.

    Preference: a connection dialed by the coordinator, then a simultaneous open,
    then one dialed by the other node; ties by the smallest path id.  Each node
    runs this on its own view (``dialed_by`` from its side) and gets the same answer.
    Raises ValueError if there is no offer.
    """
    local_coordinates = is_noise_initiator(local_id, peer_id)

    def rank(offer: PathOffer) -> tuple[int, bytes]:
        if offer.dialed_by == "both":
            return 1, offer.path_id
        by_coordinator = (offer.dialed_by == "local") == local_coordinates
        return (0 if by_coordinator else 2), offer.path_id

    ranked: Sequence[PathOffer] = sorted(offers, key=rank)
    if not ranked:
        raise ValueError("no path to choose from")
    return ranked[0].path_id


# -- bounds -------------------------------------------------------------------------

BACKOFF_FIRST = 30.0
"""Seconds before a peer is punched again after a failed round (then doubling)."""
BACKOFF_MAX = 30 * 60.0
"""The largest backoff between rounds to one peer."""
ROUNDS_PER_MINUTE = 2
"""Rounds one peer may start (either side) in any 60 s."""
MAX_PEERS_TRACKED = 4096
"""Peers whose backoff is remembered (the least recently seen go first)."""


class PunchBudget:
    """How often rounds to one peer may run: per-peer backoff and a per-minute bound.

    Both sides of a coordination keep one: the side that starts a round asks
    :meth:`may_start`, the side asked to take part asks it too (so a peer cannot
    make this node send SYNs faster than the bound, whoever opens).  Time is a
    parameter (seconds on any monotonic clock); no I/O.  Bounded in size.
    """

    def __init__(
        self,
        first: float = BACKOFF_FIRST,
        largest: float = BACKOFF_MAX,
        per_minute: int = ROUNDS_PER_MINUTE,
        max_peers: int = MAX_PEERS_TRACKED,
    ) -> None:
        self.first = first
        self.largest = largest
        self.per_minute = per_minute
        self.max_peers = max_peers
        # peer -> (not before, next delay, start times in the last minute)
        self._peers: collections.OrderedDict[Hashable, tuple[float, float, list[float]]] = (
            collections.OrderedDict()
        )

    def may_start(self, peer: Hashable, now: float) -> bool:
        """True (and the round is counted) if a round with ``peer`` may start now."""
        not_before, delay, starts = self._peers.get(peer, (0.0, self.first, []))
        starts = [t for t in starts if now - t < 60.0]
        if now < not_before or len(starts) >= self.per_minute:
            return False
        starts.append(now)
        self._store(peer, (not_before, delay, starts))
        return True

    def retry_in(self, peer: Hashable, now: float) -> float:
        """Seconds until the backoff lets a round with ``peer`` start (0: now)."""
        not_before = self._peers.get(peer, (0.0, self.first, []))[0]
        return max(0.0, not_before - now)

    def failed(self, peer: Hashable, now: float) -> float:
        """A round failed: back off; returns the seconds until the next may start."""
        _, delay, starts = self._peers.get(peer, (0.0, self.first, []))
        self._store(peer, (now + delay, min(delay * 2, self.largest), starts))
        return delay

    def succeeded(self, peer: Hashable) -> None:
        """A direct path came up: the backoff starts again from ``first``."""
        _, _, starts = self._peers.get(peer, (0.0, self.first, []))
        self._store(peer, (0.0, self.first, starts))

    def _store(self, peer: Hashable, value: tuple[float, float, list[float]]) -> None:
        self._peers[peer] = value
        self._peers.move_to_end(peer)
        while len(self._peers) > self.max_peers:
            self._peers.popitem(last=False)
