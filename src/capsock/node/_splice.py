"""Spliced forwarding: one-time tickets, the hello, and the byte copy (protocol 10.10).

Once a forwarder F authorised a forward request (the forwarding capability,
over the authenticated R-F session), it need not carry the nested session
inside two outer ones.  It issues two one-time tickets bound to that request:
one goes to the endpoint E over E's registration stream, one to the dialer R
in the ``ok`` answer.  Each dials F's listening port afresh and starts the
connection with a *hello*: the two bytes ``00 00`` (a transport record of
length 0, which no handshake starts with), the version byte ``01`` and the
32-byte ticket.  F pairs the two connections, sends R one byte ``01`` and
then copies bytes both ways without reading them; the nested IK session R-E
runs directly on them.

Tickets are 32 CSPRNG bytes, redeemable once, for ``splice_ticket_ttl``
seconds, and bounded in number per requester and node-wide.  They are looked
up by a keyed hash (so the lookup's timing says nothing about a guessed
ticket) and then compared in constant time.  A ticket is a secret: it never
appears in a log line, a repr or an exception message.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from collections.abc import Callable

import anyio
import anyio.abc

from ..errors import HandshakeError
from ..keys import NodeId

__all__ = [
    "ACK",
    "HELLO",
    "HELLO_LEN",
    "MAX_TICKETS",
    "MAX_TICKETS_PER_PEER",
    "TICKET_LEN",
    "PendingSplice",
    "TicketTable",
    "copy_pair",
    "dialed_tcp",
    "read_hello",
]

log = logging.getLogger("capsock.node.forwarding")

HELLO = b"\x00\x00\x01"
"""The start of a splice connection: a zero-length record, then version 1."""
TICKET_LEN = 32
HELLO_LEN = len(HELLO) + TICKET_LEN
ACK = b"\x01"
"""F's one byte to R once its connection is paired (then the copy starts)."""
MAX_TICKETS_PER_PEER = 8
"""Splice setups one requester may have outstanding at a forwarder at once."""
MAX_TICKETS = 256
"""Splice setups outstanding at a forwarder at once, node-wide."""
CHUNK = 256 * 1024
"""The largest read of the copy loop (so at most this much per direction is held)."""


class PendingSplice:
    """One authorised forward waiting for its two connections (not a secret holder's repr)."""

    __slots__ = (
        "dialer",
        "dialer_arrived",
        "dialer_ticket",
        "endpoint",
        "endpoint_arrived",
        "endpoint_ticket",
        "expires",
        "requester",
        "target",
    )

    def __init__(self, requester: NodeId, target: NodeId, expires: float) -> None:
        self.requester = requester
        self.target = target
        self.expires = expires
        self.dialer_ticket = os.urandom(TICKET_LEN)
        self.endpoint_ticket = os.urandom(TICKET_LEN)
        self.dialer: anyio.abc.ByteStream | None = None
        self.endpoint: anyio.abc.ByteStream | None = None
        self.dialer_arrived = anyio.Event()
        self.endpoint_arrived = anyio.Event()

    def __repr__(self) -> str:  # never the tickets
        return f"<PendingSplice {self.requester.short()} -> {self.target.short()}>"


class TicketTable:
    """Outstanding splice tickets: issue, redeem once, expire; bounded."""

    def __init__(
        self,
        per_peer: int = MAX_TICKETS_PER_PEER,
        total: int = MAX_TICKETS,
        clock: Callable[[], float] = anyio.current_time,
    ) -> None:
        self._key = os.urandom(32)  # keys the lookup hash; never leaves the table
        self._by_hash: dict[bytes, tuple[PendingSplice, bool]] = {}
        self._per_peer: dict[NodeId, int] = {}
        self._pending: set[PendingSplice] = set()
        self.per_peer = per_peer
        self.total = total
        self._clock = clock

    def __len__(self) -> int:
        return len(self._pending)

    def _hash(self, ticket: bytes) -> bytes:
        return hashlib.blake2b(ticket, digest_size=32, key=self._key).digest()

    def issue(self, requester: NodeId, target: NodeId, ttl: float) -> PendingSplice | None:
        """A new pending splice with fresh tickets, or ``None`` at a limit."""
        if len(self._pending) >= self.total or self._per_peer.get(requester, 0) >= self.per_peer:
            return None
        pending = PendingSplice(requester, target, self._clock() + ttl)
        self._pending.add(pending)
        self._per_peer[requester] = self._per_peer.get(requester, 0) + 1
        self._by_hash[self._hash(pending.dialer_ticket)] = (pending, True)
        self._by_hash[self._hash(pending.endpoint_ticket)] = (pending, False)
        return pending

    def redeem(self, ticket: bytes) -> tuple[PendingSplice, bool] | None:
        """The pending splice and whether ``ticket`` is its dialer's, or ``None``.

        A ticket is good once: redeeming removes it.  Expired, unknown and
        already redeemed tickets are all ``None`` (the same O(1) work).
        """
        found = self._by_hash.get(self._hash(ticket))
        if found is None:
            return None
        pending, is_dialer = found
        mine = pending.dialer_ticket if is_dialer else pending.endpoint_ticket
        if not hmac.compare_digest(mine, ticket):  # pragma: no cover - a hash collision
            return None
        del self._by_hash[self._hash(ticket)]
        if self._clock() > pending.expires:
            return None
        return pending, is_dialer

    def discard(self, pending: PendingSplice) -> None:
        """Forget ``pending`` and whatever of its tickets was not redeemed."""
        if pending not in self._pending:
            return
        self._pending.discard(pending)
        self._by_hash.pop(self._hash(pending.dialer_ticket), None)
        self._by_hash.pop(self._hash(pending.endpoint_ticket), None)
        left = self._per_peer[pending.requester] - 1
        if left:
            self._per_peer[pending.requester] = left
        else:
            del self._per_peer[pending.requester]


async def read_hello(
    transport: anyio.abc.ByteStream,
    buf: bytearray,
    tickets: TicketTable,
    counters: dict[str, int],
) -> tuple[PendingSplice, bool]:
    """Read the rest of a hello (``buf``: what came after ``00 00``) and redeem its ticket.

    Reads exactly the hello (its sender waits for our move, so nothing may
    follow).  A ``00 00`` not followed by the version byte is what it was
    before spliced forwarding, a zero-length record: a bad handshake.

    Raises:
        HandshakeError: not a hello, a malformed one, or a ticket that is
            unknown, used, expired or whose setup ended.
    """
    while not buf:
        buf += await transport.receive(HELLO_LEN - 2)
    if buf[:1] != HELLO[2:]:
        raise HandshakeError("handshake record of 0 bytes (expected at most 1024)")
    want = HELLO_LEN - 2
    while len(buf) < want:
        buf += await transport.receive(want - len(buf))
    found = tickets.redeem(bytes(buf[1:])) if len(buf) == want else None
    if found is None:
        counters["splice_hellos_refused"] += 1
        raise HandshakeError("a splice hello without a redeemable ticket")
    return found


def dialed_tcp(route: str) -> tuple[str, int] | None:
    """The host and port of a session this node dialed over TCP (route ``tcp=HOST:PORT``).

    ``None`` for any other route: a splice connection goes only to an
    address this node already dials for that peer, never to one it was told.
    """
    if not route.startswith("tcp="):
        return None
    host, _, port = route[4:].rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 < int(port) <= 65535:
        return None
    return host, int(port)


async def copy_pair(
    a: anyio.abc.ByteStream,
    b: anyio.abc.ByteStream,
    idle_timeout: float,
    moved: Callable[[int], None],
    transit: Callable[[bytes], bytes] | None = None,
) -> None:
    """Copy bytes both ways until both directions ended; never read them.

    An EOF on one side becomes ``send_eof`` on the other; an error on either
    closes both.  With no byte in either direction for ``idle_timeout``
    seconds (checked every half of it), both are closed.  ``moved(n)`` is
    called for every chunk copied; ``transit`` is a test hook.
    """
    activity = [0]

    async def pump(
        src: anyio.abc.ByteStream, dst: anyio.abc.ByteStream, outer: anyio.CancelScope
    ) -> None:
        try:
            while True:
                try:
                    data = await src.receive(CHUNK)
                except anyio.EndOfStream:
                    await dst.send_eof()
                    return
                if transit is not None:
                    data = transit(data)
                activity[0] += 1
                moved(len(data))
                await dst.send(data)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            outer.cancel()

    async def watchdog(scope: anyio.CancelScope) -> None:
        seen = -1
        while True:
            await anyio.sleep(idle_timeout / 2)
            if activity[0] == seen:
                log.info("closing an idle spliced pair")
                scope.cancel()
                return
            seen = activity[0]

    try:
        async with anyio.create_task_group() as tg:
            if idle_timeout != float("inf"):
                tg.start_soon(watchdog, tg.cancel_scope)
            async with anyio.create_task_group() as pumps:
                pumps.start_soon(pump, a, b, tg.cancel_scope)
                pumps.start_soon(pump, b, a, tg.cancel_scope)
            tg.cancel_scope.cancel()  # both directions ended: stop the watchdog
    finally:
        with anyio.CancelScope(shield=True):
            await a.aclose()
            await b.aclose()
