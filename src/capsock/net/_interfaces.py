"""This machine's own addresses: what a wildcard bind puts into URIs.

A node that listens on ``0.0.0.0`` or ``::`` accepts on every interface, but
a URI must name addresses a dialer can use.  This module lists the machine's
interface addresses and picks a few, in a fixed order:

1. only addresses of the families the listening sockets accept (IPv4 for
   ``0.0.0.0``; IPv6 for ``::``, and IPv4 too if that socket is dual-stack);
2. never link-local (``169.254.0.0/16``, ``fe80::/10``: useless without a
   zone), unspecified, multicast or IPv4-mapped addresses, nor IPv6
   addresses that are tentative, failed duplicate detection, deprecated or
   temporary (privacy addresses rotate, a URI is handed out for longer);
   only interfaces that are up and running (a bridge without a port, such
   as an idle ``docker0``, has no carrier and is left out);
3. loopback addresses only when nothing else is left (then the URI works on
   this machine only, which the caller warns about);
4. first the source address of the default route of each family (the one
   this machine reaches others with), then globally routable addresses,
   then the rest (private, unique-local, shared); IPv4 before IPv6 within
   each group, then by interface index;
5. at most :data:`MAX_ADVERTISED` addresses; if both families are allowed and
   have addresses, at least one of each is kept.

How addresses are found, without extra dependencies: on Linux IPv4 addresses
come from the ``SIOCGIFCONF`` ioctl (every address, aliases included) and
IPv6 addresses from ``/proc/net/if_inet6``; interface state from
``SIOCGIFFLAGS``.  Elsewhere, or when those fail, only the default-route
source addresses are known: the local address of a UDP socket "connected" to
a documentation-range address (``connect`` on UDP sends nothing).

No anyio here: plain sockets, called once per bind.
"""

from __future__ import annotations

import array
import contextlib
import ipaddress
import socket
import struct
import sys
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "MAX_ADVERTISED",
    "InterfaceAddress",
    "advertised_hosts",
    "bound_families",
    "default_route_sources",
    "interface_addresses",
    "select_addresses",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

MAX_ADVERTISED = 4
"""At most this many addresses go into the URIs of a wildcard bind."""

# Targets for the default-route probe: documentation ranges (RFC 5737, RFC 3849).
_PROBE = {socket.AF_INET: "192.0.2.1", socket.AF_INET6: "2001:db8::1"}
_SIOCGIFCONF = 0x8912
_SIOCGIFFLAGS = 0x8913
_IFF_UP = 0x1
_IFF_RUNNING = 0x40
_IFNAMSIZ = 16
# struct ifreq: the name, then a union whose largest member is struct ifmap
# (two longs, a short, three chars; padded to a long) or a 16-byte sockaddr.
_IFREQ_SIZE = _IFNAMSIZ + max(16, struct.calcsize("@LLHBBB0L"))
# /proc/net/if_inet6 flags that make an address unfit to hand out.
_IFA_F_TEMPORARY = 0x01
_IFA_F_DADFAILED = 0x08
_IFA_F_DEPRECATED = 0x20
_IFA_F_TENTATIVE = 0x40
_IFA_UNFIT = _IFA_F_TEMPORARY | _IFA_F_DADFAILED | _IFA_F_DEPRECATED | _IFA_F_TENTATIVE
# /proc/net is the network namespace of the process's main thread; a thread
# that joined another namespace (setns) sees its own under /proc/thread-self.
_THREAD_NET = Path("/proc/thread-self/net")
_IF_INET6 = (_THREAD_NET if _THREAD_NET.exists() else Path("/proc/net")) / "if_inet6"


@dataclass(frozen=True, slots=True)
class InterfaceAddress:
    """One address of one network interface of this machine."""

    address: IPAddress
    """The address (never with a zone)."""
    interface: str = ""
    """The interface's name (an IPv4 alias keeps its label, e.g. ``eth0:1``)."""
    index: int = 0
    """The interface's index (0 if unknown); orders addresses within a group."""


def _family(address: IPAddress) -> int:
    return socket.AF_INET if address.version == 4 else socket.AF_INET6


def _usable(address: IPAddress) -> bool:
    if address.is_unspecified or address.is_multicast or address.is_link_local:
        return False
    return not (isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None)


def select_addresses(
    candidates: Iterable[InterfaceAddress],
    families: Collection[int],
    *,
    preferred: Iterable[IPAddress] = (),
    limit: int = MAX_ADVERTISED,
) -> list[IPAddress]:
    """The addresses to advertise, by the rules of the module docstring (pure).

    ``families`` holds ``socket.AF_INET`` and/or ``socket.AF_INET6``;
    ``preferred`` the default-route source addresses (first in the order).
    """
    preferred = list(preferred)
    seen: set[IPAddress] = set()
    usable: list[InterfaceAddress] = []
    for cand in candidates:
        a = cand.address
        if a not in seen and _family(a) in families and _usable(a):
            seen.add(a)
            usable.append(cand)
    outside = [c for c in usable if not c.address.is_loopback]
    pool = outside or usable  # loopback only when nothing else exists

    def rank(cand: InterfaceAddress) -> tuple[int, int, int]:
        a = cand.address
        group = 0 if a in preferred else 1 if a.is_global else 2
        return (group, a.version, cand.index)

    ranked = [c.address for c in sorted(pool, key=rank)]  # sorted() is stable
    chosen = ranked[:limit]
    if limit > 0:
        for version in (4, 6):
            missing = not any(a.version == version for a in chosen)
            best = next((a for a in ranked if a.version == version), None)
            if missing and best is not None and len(chosen) == limit:
                # Give the other family a place: drop the last of the family
                # that has the most.
                crowded = max((4, 6), key=lambda v: sum(a.version == v for a in chosen))
                drop = max(i for i, a in enumerate(chosen) if a.version == crowded)
                chosen = [*chosen[:drop], *chosen[drop + 1 :], best]
    return chosen


def bound_families(sockets: Iterable[socket.socket]) -> set[int]:
    """The address families that listening ``sockets`` accept connections on.

    An IPv6 socket without ``IPV6_V6ONLY`` (dual-stack) accepts IPv4 too.
    """
    families: set[int] = set()
    for sock in sockets:
        if sock.family == socket.AF_INET:
            families.add(socket.AF_INET)
        elif sock.family == socket.AF_INET6:
            families.add(socket.AF_INET6)
            try:
                v6only = sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)
            except OSError:
                v6only = 1
            if not v6only:
                families.add(socket.AF_INET)
    return families


def default_route_sources(families: Collection[int]) -> list[IPAddress]:
    """The local address this machine would send from to the internet, per family.

    A UDP ``connect`` only chooses a route and a source address; nothing is
    sent.  A family without a route (or without support) is left out.
    """
    found: list[IPAddress] = []
    for family in (socket.AF_INET, socket.AF_INET6):
        if family not in families:
            continue
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as probe:
                probe.connect((_PROBE[family], 9))
                host = probe.getsockname()[0]
        except OSError:
            continue
        address = ipaddress.ip_address(host.partition("%")[0])
        if not address.is_unspecified:
            found.append(address)
    return found


def _ioctl(sock: socket.socket, request: int, arg: bytes) -> bytes:
    import fcntl  # POSIX only: imported where it is used

    result: bytes = fcntl.ioctl(sock.fileno(), request, arg)
    return result


def _ipv4_linux(sock: socket.socket) -> list[tuple[str, ipaddress.IPv4Address]]:
    """(interface label, address) for every IPv4 address, via SIOCGIFCONF."""
    count = 32
    while True:
        buf = array.array("B", bytes(_IFREQ_SIZE * count))
        pointer, _ = buf.buffer_info()
        answer = _ioctl(sock, _SIOCGIFCONF, struct.pack("iP", len(buf), pointer))
        length = struct.unpack("iP", answer)[0]
        if length < len(buf) or count >= 4096:
            break
        count *= 4  # the answer may have been cut short: ask again with more room
    data = buf.tobytes()[:length]
    out = []
    for offset in range(0, length - _IFREQ_SIZE + 1, _IFREQ_SIZE):
        name = data[offset : offset + _IFNAMSIZ].split(b"\0", 1)[0].decode("ascii", "replace")
        (family,) = struct.unpack_from("H", data, offset + _IFNAMSIZ)
        if family == socket.AF_INET:  # struct sockaddr_in: family, port, address
            packed = data[offset + _IFNAMSIZ + 4 : offset + _IFNAMSIZ + 8]
            out.append((name, ipaddress.IPv4Address(packed)))
    return out


def _ipv6_linux() -> list[tuple[str, int, ipaddress.IPv6Address]]:
    """(interface, index, address) of the fit IPv6 addresses in /proc/net/if_inet6."""
    out = []
    for line in _IF_INET6.read_text("ascii").splitlines():
        fields = line.split()
        if len(fields) != 6 or len(fields[0]) != 32:
            continue
        if int(fields[4], 16) & _IFA_UNFIT:
            continue
        address = ipaddress.IPv6Address(bytes.fromhex(fields[0]))
        out.append((fields[5], int(fields[1], 16), address))
    return out


def _is_running(sock: socket.socket | None, name: str) -> bool:
    if sock is None:
        return True
    request = struct.pack(f"{_IFNAMSIZ}s", name.encode("ascii", "replace")[: _IFNAMSIZ - 1])
    try:
        answer = _ioctl(sock, _SIOCGIFFLAGS, request.ljust(_IFREQ_SIZE, b"\0"))
    except OSError:
        return False  # gone since it was listed
    flags: int = struct.unpack_from("H", answer, _IFNAMSIZ)[0]
    return flags & (_IFF_UP | _IFF_RUNNING) == _IFF_UP | _IFF_RUNNING


def _index(name: str) -> int:
    try:
        return socket.if_nametoindex(name.partition(":")[0])
    except OSError:
        return 0


def interface_addresses() -> list[InterfaceAddress]:
    """Every address of an interface that is up and running (Linux; else empty).

    Never raises: what cannot be read is left out.
    """
    if not sys.platform.startswith("linux"):
        return []
    out: list[InterfaceAddress] = []
    try:
        sock: socket.socket | None = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    except OSError:
        sock = None  # no IPv4 at all: IPv6 addresses are taken as running
    try:
        if sock is not None:
            with contextlib.suppress(OSError):
                for name, address in _ipv4_linux(sock):
                    if _is_running(sock, name):
                        out.append(InterfaceAddress(address, name, _index(name)))
        with contextlib.suppress(OSError, ValueError):
            for name, index, address6 in _ipv6_linux():
                if _is_running(sock, name):
                    out.append(InterfaceAddress(address6, name, index))
    finally:
        if sock is not None:
            sock.close()
    return out


def advertised_hosts(sockets: Sequence[socket.socket], *, limit: int = MAX_ADVERTISED) -> list[str]:
    """Host texts for the route hints of wildcard-bound listening ``sockets``.

    Loopback addresses come back only when the machine has nothing else (the
    caller can tell by :meth:`ipaddress.IPv4Address.is_loopback`).
    """
    families = bound_families(sockets)
    preferred = default_route_sources(families)
    candidates = [*interface_addresses(), *(InterfaceAddress(a) for a in preferred)]
    if not candidates:  # nothing found at all: the loopback of each family
        loop: dict[int, str] = {socket.AF_INET: "127.0.0.1", socket.AF_INET6: "::1"}
        candidates = [InterfaceAddress(ipaddress.ip_address(loop[f])) for f in sorted(families)]
    chosen = select_addresses(candidates, families, preferred=preferred, limit=limit)
    return [str(a) for a in chosen]
