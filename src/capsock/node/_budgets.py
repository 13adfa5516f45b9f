"""Admission control for inbound connections: what a stranger may cost a node.

Everything here is plain bookkeeping with time as a parameter (no I/O, no
anyio), so :mod:`capsock.node` can ask cheap questions before it does expensive
work:

- :class:`ReplayCache`: was this handshake message 1 (its ephemeral key) seen
  recently?  A replayed message 1 is refused before any Diffie-Hellman.
- :class:`SourceBuckets`: a token bucket of handshakes per source (an IPv4
  address, an IPv6 /64, the carrying peer of a forwarded session), so one
  source cannot buy more than its share of the event loop.
- :class:`HalfOpenTable`: connections mid-handshake, grouped by source; when
  full, the oldest connection of the source holding the most is shed, so a
  flooding source evicts its own connections, not a newcomer's.
- :func:`descriptor_budget`: how many inbound connections the process's file
  descriptors can carry (raising the soft ``RLIMIT_NOFILE`` towards the hard
  one first), keeping headroom for everything else a node opens.

See docs/security.md ("What a peer's bytes can cost") for the numbers.
"""

from __future__ import annotations

import collections
import ipaddress
import os
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

__all__ = [
    "HalfOpenTable",
    "ReplayCache",
    "SourceBuckets",
    "descriptor_budget",
    "raise_descriptor_limit",
    "source_of",
]

V = TypeVar("V")


def source_of(address: object) -> str:
    """The admission source of a peer address: an IPv4 address, an IPv6 /64.

    ``address`` is what the socket reports (a ``(host, port, ...)`` tuple for
    TCP, a path or ``""`` for Unix sockets).  IPv4-mapped IPv6 addresses count
    as their IPv4 address.  Anything else is one source per kind.
    """
    if isinstance(address, tuple) and address and isinstance(address[0], str):
        try:
            ip = ipaddress.ip_address(address[0].split("%", 1)[0])
        except ValueError:
            return "tcp:?"
        if isinstance(ip, ipaddress.IPv6Address):
            if ip.ipv4_mapped is not None:
                return str(ip.ipv4_mapped)
            return str(ipaddress.IPv6Network((ip, 64), strict=False))
        return str(ip)
    return "unix"


class ReplayCache:
    """The ephemeral keys of recent authentic handshakes, bounded in number and age.

    A dialer draws a fresh ephemeral key for every handshake, so an ephemeral
    key seen twice is a replay.  Keys are added only after their message 1
    authenticated (garbage cannot push genuine entries out); the oldest entry
    goes first when the cache is full.
    """

    __slots__ = ("_entries", "capacity", "window")

    def __init__(self, capacity: int, window: float) -> None:
        self.capacity = capacity
        self.window = window
        self._entries: collections.OrderedDict[bytes, float] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def seen(self, key: bytes, now: float) -> bool:
        """Whether ``key`` was added within the last ``window`` seconds."""
        self._expire(now)
        return key in self._entries

    def add(self, key: bytes, now: float) -> None:
        if self.capacity <= 0:
            return
        self._entries[key] = now + self.window
        self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def _expire(self, now: float) -> None:
        entries = self._entries
        while entries:
            key, until = next(iter(entries.items()))
            if until > now:
                return
            del entries[key]


class SourceBuckets:
    """One token bucket per source: ``rate`` tokens a second, at most ``burst``.

    At most ``max_sources`` buckets are kept; a source that has not been seen
    for ``burst / rate`` seconds has a full bucket again, so the least
    recently used bucket can be forgotten safely once it is full.
    """

    __slots__ = ("_buckets", "burst", "max_sources", "rate")

    def __init__(self, rate: float, burst: float, max_sources: int = 65536) -> None:
        self.rate = rate
        self.burst = burst
        self.max_sources = max_sources
        self._buckets: collections.OrderedDict[Hashable, tuple[float, float]] = (
            collections.OrderedDict()
        )

    def take(self, source: Hashable, now: float) -> float:
        """Take one token: 0.0 if there was one, else the seconds until there is."""
        tokens, at = self._buckets.pop(source, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        if tokens >= 1.0:
            tokens -= 1.0
            wait = 0.0
        else:
            wait = (1.0 - tokens) / self.rate if self.rate > 0 else float("inf")
        self._buckets[source] = (tokens, now)
        self._forget()
        return wait

    def _forget(self) -> None:
        # Bounded: past max_sources the least recently seen source is forgotten
        # (it only gains a refill; a flood from many sources is what the
        # half-open table and the session limits bound).
        while len(self._buckets) > self.max_sources:
            self._buckets.popitem(last=False)


class HalfOpenTable(Generic[V]):
    """Connections mid-handshake, by source, oldest first within each source.

    ``add`` reports the entry to shed when the table is full: the oldest of the
    source with the most entries (a newcomer from a quiet source is never the
    one shed while a flooding source holds slots).
    """

    __slots__ = ("_by_source", "_count", "capacity")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._by_source: dict[str, collections.OrderedDict[int, V]] = {}
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def add(self, source: str, key: int, value: V) -> V | None:
        """Add an entry; return the entry that must be shed to make room (removed)."""
        shed = self.pop_victim() if self._count >= self.capacity else None
        self._by_source.setdefault(source, collections.OrderedDict())[key] = value
        self._count += 1
        return shed

    def remove(self, source: str, key: int) -> None:
        entries = self._by_source.get(source)
        if entries is not None and entries.pop(key, None) is not None:
            self._count -= 1
            if not entries:
                del self._by_source[source]

    def pop_victim(self, min_count: int = 1) -> V | None:
        """Remove and return the oldest entry of the busiest source.

        None if the table is empty, or if that source holds fewer than
        ``min_count`` entries (with 2: shed only from a source holding several,
        never a lone newcomer).
        """
        if not self._by_source:
            return None
        source = max(self._by_source, key=lambda s: len(self._by_source[s]))
        entries = self._by_source[source]
        if len(entries) < min_count:
            return None
        _, value = entries.popitem(last=False)
        self._count -= 1
        if not entries:
            del self._by_source[source]
        return value


def raise_descriptor_limit() -> tuple[int, int]:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit (capped at 2**20).

    Returns the ``(soft, hard)`` limits in force afterwards.  Where the limit
    cannot be read (not a Unix system), returns a large pair.
    """
    try:
        import resource
    except ImportError:  # pragma: no cover - not Unix
        return (1 << 20, 1 << 20)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    ceiling = 1 << 20 if hard == resource.RLIM_INFINITY else hard
    if soft == resource.RLIM_INFINITY or soft >= ceiling:
        return (ceiling, ceiling)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (ceiling, hard))
        soft = ceiling
    except (ValueError, OSError):
        pass  # a container may forbid it: keep the soft limit we have
    return (soft, ceiling)


def _open_descriptors() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:  # pragma: no cover - no procfs
        return 64


def descriptor_budget(
    reserve: int, *, limits: Callable[[], tuple[int, int]] = raise_descriptor_limit
) -> int:
    """Descriptors a node may spend on inbound connections.

    The soft limit (after raising it), less what the process holds already,
    less ``max(reserve, soft // 8)`` kept free for outbound dials, the relay
    registration, the store and an application's own sockets (``capsock
    share`` opens one per stream).  At least 8.
    """
    soft, _ = limits()
    spare = soft - _open_descriptors() - max(reserve, soft // 8)
    return max(8, spare)
