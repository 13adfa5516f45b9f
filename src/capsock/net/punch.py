"""TCP hole punching at the anyio edge: sockets that share one local port.

A node that wants a direct path to a peer behind NAT must send its SYNs from
the same local port that its NAT already maps (the port its listener and its
relay registration use), so that the peer's NAT sees the SYN come from the
address the peer was told about.  Every socket here — the listener and each
outbound dial — sets ``SO_REUSEADDR`` and ``SO_REUSEPORT`` before ``bind``.

anyio's ``connect_tcp`` cannot bind a local port, so the sockets are built by
hand, connected without blocking, and then handed to anyio with
:meth:`anyio.abc.SocketStream.from_socket` and
:meth:`anyio.abc.SocketListener.from_socket` (anyio 4.x; both backends).

:func:`simultaneous_open` dials every candidate of the peer at once, at an
agreed moment (the coordination in :mod:`capsock.core.direct` decides it), and
keeps the first connection; TCP simultaneous open lets two dialers connect
through two NATs that drop unsolicited inbound SYNs.

No capsock session logic lives here: this is sockets only.  See
``docs/direct-paths.md``.
"""

from __future__ import annotations

import errno
import ipaddress
import math
import socket
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

import anyio
import anyio.abc

from ..errors import PunchFailed
from . import _interfaces as interfaces

__all__ = [
    "PunchFailed",
    "SocketFactory",
    "dial_from",
    "local_candidates",
    "reuse_socket",
    "shared_listener",
    "simultaneous_open",
]

SocketFactory = Callable[[int], socket.socket]
"""Makes a new TCP socket of the given address family (tests use it to make
sockets inside a network namespace); the default is :func:`socket.socket`."""

ATTEMPT_TIMEOUT = 2.0
"""How long one punch attempt waits for a connection (seconds)."""

MAX_CANDIDATES = 8
"""At most this many candidates are dialed per attempt (a bound on SYNs sent)."""


def _family(host: str) -> int:
    """The address family of an IP literal; anything else is refused (a name
    would mean a blocking DNS lookup on the event loop)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"not an IP address: {host!r} (punch candidates are literals)") from None
    return socket.AF_INET6 if address.version == 6 else socket.AF_INET


def _default_factory(family: int) -> socket.socket:
    return socket.socket(family, socket.SOCK_STREAM)


def reuse_socket(
    local_port: int,
    *,
    family: int = socket.AF_INET,
    local_host: str = "",
    socket_factory: SocketFactory | None = None,
) -> socket.socket:
    """A non-blocking TCP socket with SO_REUSEADDR + SO_REUSEPORT, bound to ``local_port``.

    Raises OSError if the socket cannot be made or bound (the socket is closed then).
    """
    sock = (socket_factory or _default_factory)(family)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.setblocking(False)
        sock.bind((local_host, local_port))
    except BaseException:
        sock.close()
        raise
    return sock


async def shared_listener(
    local_port: int,
    *,
    local_host: str = "",
    family: int = socket.AF_INET,
    backlog: int = 64,
    socket_factory: SocketFactory | None = None,
) -> anyio.abc.SocketListener:
    """A listener on ``local_port`` that punch dials from the same port can coexist with.

    ``local_port=0`` picks a free port (read it from the listener's
    ``SocketAttribute.local_port``).  Raises OSError if the port cannot be bound.
    """
    sock = reuse_socket(
        local_port, family=family, local_host=local_host, socket_factory=socket_factory
    )
    try:
        sock.listen(backlog)
        return await anyio.abc.SocketListener.from_socket(sock)
    except BaseException:
        sock.close()
        raise


async def dial_from(
    local_port: int,
    host: str,
    port: int,
    *,
    local_host: str = "",
    socket_factory: SocketFactory | None = None,
) -> anyio.abc.SocketStream:
    """Connect to ``host:port`` from ``local_port`` (shared with other sockets).

    Raises OSError when the connection fails (refused, unreachable, …); callers
    bound the wait with a timeout.  Cancellation closes the socket: nothing leaks.
    """
    sock = reuse_socket(
        local_port, family=_family(host), local_host=local_host, socket_factory=socket_factory
    )
    try:
        err = sock.connect_ex((host, port))
        if err not in (0, errno.EINPROGRESS, errno.EAGAIN, errno.EALREADY):
            raise OSError(err, f"connect to {host}:{port}: {errno.errorcode.get(err, err)}")
        await anyio.wait_writable(sock)
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise OSError(err, f"connect to {host}:{port}: {errno.errorcode.get(err, err)}")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return await anyio.abc.SocketStream.from_socket(sock)
    except BaseException:
        sock.close()
        raise


def local_candidates(
    local_port: int, families: Collection[int] = (socket.AF_INET,)
) -> list[tuple[str, int]]:
    """This machine's interface addresses with ``local_port``: the "local" punch candidates.

    The addresses :mod:`capsock.net._interfaces` would advertise, minus loopback (useless
    to a peer elsewhere).  Blocking and cheap (a few ioctls); call it in the network
    namespace whose interfaces you mean.
    """
    chosen = interfaces.select_addresses(
        interfaces.interface_addresses(),
        families,
        preferred=interfaces.default_route_sources(families),
        limit=MAX_CANDIDATES,
    )
    return [(str(a), local_port) for a in chosen if not a.is_loopback]


@dataclass
class _Race:
    winner: anyio.abc.SocketStream | None = None


async def _attempt(
    local_port: int,
    candidates: Sequence[tuple[str, int]],
    *,
    window: float,
    local_host: str,
    socket_factory: SocketFactory | None,
    errors: dict[tuple[str, int], str],
) -> anyio.abc.SocketStream | None:
    race = _Race()

    async def dial(candidate: tuple[str, int], tg: anyio.abc.TaskGroup) -> None:
        try:
            stream = await dial_from(
                local_port,
                candidate[0],
                candidate[1],
                local_host=local_host,
                socket_factory=socket_factory,
            )
        except OSError as exc:
            errors[candidate] = exc.strerror or str(exc)
            return
        if race.winner is not None:
            # Another candidate won in the same instant: exactly one path is kept.
            await anyio.aclose_forcefully(stream)
            return
        race.winner = stream
        tg.cancel_scope.cancel()

    try:
        with anyio.move_on_after(window) as scope:
            async with anyio.create_task_group() as tg:
                for candidate in candidates:
                    tg.start_soon(dial, candidate, tg)
        if scope.cancelled_caught and race.winner is None:
            for candidate in candidates:
                errors.setdefault(candidate, "timed out")
    except BaseException:
        if race.winner is not None:
            await anyio.aclose_forcefully(race.winner)
        raise
    return race.winner


async def simultaneous_open(
    local_port: int,
    remote_candidates: Sequence[tuple[str, int]],
    *,
    at: float | None = None,
    attempts: int = 3,
    attempt_timeout: float = ATTEMPT_TIMEOUT,
    local_host: str = "",
    socket_factory: SocketFactory | None = None,
) -> anyio.abc.SocketStream:
    """Dial every candidate from ``local_port`` at the moment ``at``; keep the first to connect.

    ``at`` is a time on anyio's clock (:func:`anyio.current_time`); ``None`` means now.
    Both peers call this at the agreed moment (the DCUtR SYNC in :mod:`capsock.core.direct`):
    their SYNs cross, each opens its own NAT's mapping, and TCP simultaneous open (or
    an ordinary handshake, if one side is reachable) connects them.  Each attempt dials
    all candidates (at most :data:`MAX_CANDIDATES`) concurrently for ``attempt_timeout``
    seconds; the first connection wins and every other socket is closed.  Attempts are
    spaced by ``attempt_timeout`` from ``at``, so both sides keep dialing together.

    Raises PunchFailed after ``attempts`` failed attempts; ValueError for bad arguments.
    Cancel-safe: cancelling closes every socket it opened.
    """
    if attempts < 1:
        raise ValueError("attempts must be at least 1")
    if not math.isfinite(attempt_timeout) or attempt_timeout <= 0:
        raise ValueError("attempt_timeout must be a positive number of seconds")
    if not 0 <= local_port <= 65535:
        raise ValueError(f"local_port out of range: {local_port}")
    unique = list(dict.fromkeys((str(h), int(p)) for h, p in remote_candidates))
    for host, _ in unique:
        _family(host)  # IP literals only, checked before anything is dialed
    for _, port in unique:
        if not 0 < port <= 65535:
            raise ValueError(f"candidate port out of range: {port}")
    if not unique:
        raise ValueError("no candidates to dial")
    unique = unique[:MAX_CANDIDATES]
    start = anyio.current_time() if at is None else at
    errors: dict[tuple[str, int], str] = {}
    for attempt in range(attempts):
        delay = start + attempt * attempt_timeout - anyio.current_time()
        if delay > 0:
            await anyio.sleep(delay)
        stream = await _attempt(
            local_port,
            unique,
            window=attempt_timeout,
            local_host=local_host,
            socket_factory=socket_factory,
            errors=errors,
        )
        if stream is not None:
            return stream
    raise PunchFailed(errors, attempts)
