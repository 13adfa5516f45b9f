"""Forwarding: a node carries a nested, end-to-end encrypted session between two others.

Theory of operation
-------------------
A dialer R that cannot reach an endpoint E directly asks a forwarder F (a
relay, or the introducer who handed R the URI) to carry a session for it::

    R ==(session R-F)== F ==(session F-E)== E
       stream "to E"        transport stream
       <------ nested Noise IK session R-E, end to end ------>

1. R opens a stream to F with F's *forwarding capability* (the ``via=`` hint
   in E's URI); without one, F refuses like any other capability.  R sends one
   message, ``{"op": "forward", "to": <E's 32-byte node id>}``.
2. F finds a session to E (E keeps one open to its relay; an introducer can
   dial E's direct hints) and opens a *transport stream* on it: an OPEN whose
   token is the single byte ``0x00``.  That is not a capability: like an
   inbound TCP connection it grants nothing by itself; E accepts it (within
   its session and half-open limits) and treats it as a raw transport.
3. F answers R ``{"ok": true}`` and splices the two streams, byte for byte.
4. R runs the ordinary IK handshake for E's key over its stream, E answers as
   responder over the transport stream, and the resulting session carries R's
   streams to E exactly like a direct one.  F sees only ciphertext (the
   nested Noise records) and can only cut the path, never read or alter it
   unnoticed.

Spliced forwarding (protocol 10.10, :mod:`capsock.node._splice`).  When R asks
with ``"splice": true`` and E registered offering it, step 2 changes: F
issues two one-time tickets for the authorised request, invites E on E's
registration stream, and answers R ``{"ok": true, "ticket": ...}``.  R and E
each dial F afresh and start with a hello (``00 00 01`` and the ticket); F
pairs the two connections, sends R ``01``, and copies bytes without reading
them.  The nested IK session then runs straight over TCP: F no longer
decrypts and re-encrypts every record.  Any failure of that setup ends in
the nested forwarding above (R asks again without ``"splice"``).

Errors: a refused forwarding capability is :class:`~capsock.CapabilityRejected`;
every request F does not carry is answered ``{"ok": false, "error": ...}``
(without any address of E), which the dialer reports as
:class:`~capsock.Unreachable` for that route.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import anyio
import anyio.abc

from ..config import NodeConfig
from ..core.direct import Address
from ..errors import CapsockError, DirectMessageError, ErrorCode, ProtocolError, Unreachable
from ..keys import NodeId
from ..messages import printable, receive_message, send_message
from ..net.stream import CapsockAttribute, Stream
from ..uri import Capability, To
from ._splice import ACK, HELLO, HELLO_LEN, TicketTable, copy_pair, read_hello

__all__ = [
    "TRANSPORT_TOKEN",
    "UNREACHABLE_REASON",
    "Forwarder",
    "ForwardingHost",
    "RouteInfo",
    "observed_address",
    "open_via",
    "open_via_info",
    "register",
    "register_info",
    "splice",
    "transport_token",
    "transport_voucher",
]

log = logging.getLogger("capsock.node.forwarding")

TRANSPORT_TOKEN = b"\x00"
"""The OPEN token of a transport stream (never a valid capability token).

Its one home: a node builds the token with :func:`transport_token` and reads
it with :func:`transport_voucher`, and nothing else looks at the byte."""
UNREACHABLE_REASON = "the forwarder cannot reach that node"
"""The one answer for every routing failure: it names no address (protocol 10.3)."""
_CHUNK = 256 * 1024


@dataclass(frozen=True, slots=True)
class RouteInfo:
    """What a forwarder's ``ok`` answer said beyond ``ok`` (protocol 10.8).

    ``observed``: the address the forwarder sees this node's connection come
    from (None when it did not say, or said something that is not a valid
    candidate); ``peer_direct``: the target registered with the forwarder
    saying it takes part in direct-path coordination (forward answers only);
    ``ticket``: see below.  The first two are hints from the forwarder, never
    proof of anything.
    """

    observed: Address | None = None
    peer_direct: bool = False
    ticket: bytes | None = field(default=None, repr=False)
    """The dialer's splice ticket (protocol 10.10), when the forwarder offered
    a splice; a secret, so never in the repr."""


def observed_address(route: str) -> Address | None:
    """The TCP source address in an accepting side's route (``inbound tcp:IP:PORT``).

    None for anything else (a unix socket, a forwarded session): only a direct
    TCP connection has an address worth telling the node.
    """
    prefix = "inbound tcp:"
    if not route.startswith(prefix):
        return None
    host, _, port = route[len(prefix) :].rpartition(":")
    host = host.strip("[]")
    try:
        return Address(str(ipaddress.ip_address(host)), int(port))
    except (ValueError, DirectMessageError):
        return None


def _observed_field(stream: Stream) -> list[Any] | None:
    addr = observed_address(str(stream.extra(CapsockAttribute.route, "")))
    return None if addr is None else [addr.host, addr.port]


def _route_info(answer: dict[Any, Any]) -> RouteInfo:
    """Read the optional fields of an ``ok`` answer; bad ones are ignored (hints only)."""
    observed: Address | None = None
    value = answer.get("observed")
    if isinstance(value, list) and len(value) == 2:
        try:
            observed = Address(value[0], value[1])
        except DirectMessageError:
            observed = None
    ticket = answer.get("ticket")
    if not isinstance(ticket, bytes) or len(ticket) != HELLO_LEN - len(HELLO):
        ticket = None
    return RouteInfo(observed, answer.get("direct") is True, ticket)


def transport_token(voucher: bytes | None) -> bytes:
    """The OPEN token of a transport stream: :data:`TRANSPORT_TOKEN`, then the
    forwarder's voucher (a capability token of the target's that it holds), if any."""
    return TRANSPORT_TOKEN + (voucher or b"")


def transport_voucher(token: bytes) -> bytes | None:
    """The voucher of a transport-stream OPEN token (``b""`` if none), or ``None``
    when ``token`` opens an ordinary stream (it is a capability token)."""
    return token[1:] if token[:1] == TRANSPORT_TOKEN else None


class ForwardingHost(Protocol):
    """What forwarding needs of the node it runs in; :class:`capsock.Node`
    satisfies it.  So this module imports nothing of the node: imports run
    one way (node -> forward)."""

    @property
    def id(self) -> NodeId:
        """The node's own id (a node is never forwarded to itself)."""
        ...

    @property
    def config(self) -> NodeConfig:
        """The node's configuration, read at each use."""
        ...

    async def connect(self, uri: str | Capability) -> Stream:
        """Open a stream with a capability (to a forwarder)."""
        ...


OpenTransport = Callable[[NodeId], Awaitable[Stream]]
"""Opens the onward transport stream to a target node (the forwarder's side)."""


async def splice(
    a: anyio.abc.ByteStream,
    b: anyio.abc.ByteStream,
    tamper: Callable[[bytes], bytes] | None = None,
) -> None:
    """Copy bytes both ways until both directions ended; propagate EOF and breakage.

    A clean EOF on one side becomes ``send_eof`` on the other; any error
    closes both (the peers see a reset, never a clean end).
    """

    async def pump(src: anyio.abc.ByteStream, dst: anyio.abc.ByteStream, outer: Any) -> None:
        try:
            while True:
                try:
                    data = await src.receive(_CHUNK)
                except anyio.EndOfStream:
                    await dst.send_eof()
                    return
                if tamper is not None:
                    data = tamper(data)
                await dst.send(data)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, CapsockError, OSError):
            outer.cancel()

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(pump, a, b, tg.cancel_scope)
            tg.start_soon(pump, b, a, tg.cancel_scope)
    finally:
        with anyio.CancelScope(shield=True):
            await a.aclose()
            await b.aclose()


class Forwarder:
    """Serves a forwarding capability: carries nested sessions to nodes it can reach."""

    def __init__(self, node: ForwardingHost, open_transport: OpenTransport) -> None:
        self._node = node
        self._open_transport = open_transport
        self.tamper: Callable[[bytes], bytes] | None = None
        """Test hook: alters bytes in transit (proves tampering is detected)."""
        self.tap: Callable[[bytes], None] | None = None
        """Test hook: sees every byte in transit (proves the forwarder reads nothing)."""
        self.active = 0
        """Forwarded sessions being carried right now."""
        self.registered: dict[NodeId, int] = {}
        """Nodes that keep a registration stream open (relay clients)."""
        self.direct_capable: dict[NodeId, int] = {}
        """Of those, the ones that said they coordinate direct paths (per stream count)."""
        self._per_peer: dict[NodeId, int] = {}
        self.tickets = TicketTable()
        """Splice setups waiting for their connections (protocol 10.10)."""
        self.splice_capable: dict[NodeId, Stream] = {}
        """Registered nodes that offered to dial splice connections: their
        latest registration stream, which carries the invitations."""
        self._invite_locks: dict[Stream, anyio.Lock] = {}
        self.held = 0
        """Splice connections this forwarder holds (counted in the node's descriptor budget)."""
        self.counters = {
            "spliced_forwards": 0,
            "spliced_bytes": 0,
            "splice_fallbacks": 0,
            "splice_hellos_refused": 0,
        }
        """Spliced forwarding, for :meth:`capsock.Node.stats` (no secrets)."""
        self.spliced_active = 0
        """Spliced pairs being carried right now."""

    def _transit(self, data: bytes) -> bytes:
        if self.tap is None and self.tamper is None:
            return data
        if self.tap is not None:
            self.tap(data)
        return self.tamper(data) if self.tamper is not None else data

    async def handle(self, stream: Stream) -> None:
        """One forwarding request on ``stream`` (opened with our forwarding capability).

        Every request that is not carried is answered ``{"ok": false, "error":
        reason}`` (the answer is the authoritative outcome), then the stream is
        reset: ``TIMEOUT`` when no request came in time, ``PROTOCOL_ERROR``
        when it was not a readable message, ``BUSY`` at the per-requester
        limit, ``REFUSED`` otherwise.  The reason never names an address of
        the target (routing details are logged locally): protocol 10.3.
        """
        peer = stream.peer
        cap = stream.extra(CapsockAttribute.capability, None)
        targets = {c.node for c in cap.caveats if isinstance(c, To)} if cap is not None else set()
        try:
            with anyio.fail_after(self._node.config.handshake_timeout):
                request = await receive_message(stream)
        except TimeoutError:
            await self._refuse(stream, "no forwarding request in time", ErrorCode.TIMEOUT)
            return
        except (CapsockError, anyio.EndOfStream, anyio.BrokenResourceError) as exc:
            # A reset, not a clean end: whoever sent this (a program that took
            # the forwarding URI for an ordinary one, say) must see a failure.
            log.info("unreadable forwarding request from %s: %s", peer.short(), str(exc))
            await self._refuse(stream, "unreadable forwarding request", ErrorCode.PROTOCOL_ERROR)
            return
        if isinstance(request, dict) and request.get("op") == "register":
            if targets:
                await self._refuse(stream, "this forwarding capability is limited to one target")
            else:
                offers = request.get("splice") is True and self._node.config.splice
                await self._registered(stream, request.get("direct") is True, offers)
            return
        if (
            not isinstance(request, dict)
            or request.get("op") != "forward"
            or not isinstance(request.get("to"), bytes)
            or len(request["to"]) != 32
        ):
            await self._refuse(stream, "malformed forwarding request")
            return
        target = NodeId(request["to"])
        if targets and targets != {target}:
            # Every ``to`` caveat must name the target (two different ones allow none).
            await self._refuse(stream, "this forwarding capability does not reach that node")
            return
        if target in (self._node.id, peer):
            await self._refuse(stream, "a node cannot be forwarded to itself")
            return
        if self._per_peer.get(peer, 0) >= self._node.config.max_forwards_per_peer:
            await self._refuse(stream, "too many forwarded sessions from this node", ErrorCode.BUSY)
            return
        # Reserve the slot before the first await, so concurrent requests
        # cannot overshoot the per-peer limit.
        self._per_peer[peer] = self._per_peer.get(peer, 0) + 1
        self.active += 1
        try:
            ok: dict[str, Any] = {"ok": True}
            if request.get("direct") is True:
                # Only for a requester that asked (protocol 10.8): an older
                # one gets exactly the answer it always got.
                observed = _observed_field(stream)
                if observed is not None:
                    ok["observed"] = observed
                ok["direct"] = target in self.direct_capable
            if (
                request.get("splice") is True
                and self._node.config.splice
                and target in self.splice_capable
                and observed_address(str(stream.extra(CapsockAttribute.route, ""))) is not None
            ):
                if await self._splice(stream, peer, target, ok):
                    return
                self.counters["splice_fallbacks"] += 1
            try:
                onward = await self._open_transport(target)
            except (CapsockError, TimeoutError, OSError, anyio.BrokenResourceError) as exc:
                # The details (every address tried) stay here: the requester
                # learns only that the target is unreachable through us.
                log.info("cannot forward %s -> %s: %s", peer.short(), target.short(), str(exc))
                await self._refuse(stream, UNREACHABLE_REASON)
                return
            try:
                await send_message(stream, ok)
            except (CapsockError, anyio.BrokenResourceError, anyio.ClosedResourceError):
                await onward.aclose()
                await stream.aclose()
                return
            log.info("forwarding %s -> %s", peer.short(), target.short())
            await splice(stream, onward, self._transit)
        finally:
            self.active -= 1
            self._per_peer[peer] -= 1
            if not self._per_peer[peer]:
                del self._per_peer[peer]

    async def _splice(
        self, stream: Stream, peer: NodeId, target: NodeId, ok: dict[str, Any]
    ) -> bool:
        """Carry the forward as a spliced pair (protocol 10.10); False: fall back to nesting.

        Falls back (before anything was answered) when no ticket can be
        issued or the invitation cannot be sent to the endpoint.  Then the
        endpoint's invitation and the dialer's ``ok`` answer go out at once,
        and both connections must arrive within ``splice_ticket_ttl``; if one
        does not, the setup just ends (the dialer, which waits for our ACK,
        falls back by itself).
        """
        ttl = self._node.config.splice_ticket_ttl
        pending = self.tickets.issue(peer, target, ttl)
        if pending is None:
            log.info("no splice for %s -> %s: too many splice setups", peer.short(), target.short())
            return False
        try:
            invite = {"op": "splice", "ticket": pending.endpoint_ticket}
            try:
                with anyio.fail_after(ttl):
                    invitations = self.splice_capable[target]
                    async with self._invite_locks[invitations]:  # one message at a time
                        await send_message(invitations, invite)
            except (KeyError, TimeoutError, CapsockError, anyio.BrokenResourceError,
                    anyio.ClosedResourceError):  # fmt: skip
                log.info("no splice for %s -> %s: cannot invite the endpoint",
                         peer.short(), target.short())  # fmt: skip
                return False
            try:
                await send_message(stream, {**ok, "ticket": pending.dialer_ticket})
                with anyio.move_on_after(ttl):
                    await pending.endpoint_arrived.wait()
                    await pending.dialer_arrived.wait()
            except (CapsockError, anyio.BrokenResourceError, anyio.ClosedResourceError):
                return True
            finally:
                with anyio.CancelScope(shield=True):
                    await stream.aclose()  # the request stream has done its work
            dialer, endpoint = pending.dialer, pending.endpoint
            if dialer is None or endpoint is None:
                log.info(
                    "splice %s -> %s: the %s did not connect in time",
                    peer.short(), target.short(), "endpoint" if endpoint is None else "dialer",
                )  # fmt: skip
                return True
            pending.dialer = pending.endpoint = None  # ours now, closed by copy_pair
            self.spliced_active += 1
            try:
                with contextlib.suppress(
                    anyio.BrokenResourceError, anyio.ClosedResourceError, OSError
                ):
                    await dialer.send(ACK)
                    self.counters["spliced_forwards"] += 1
                    log.info("forwarding %s -> %s (spliced)", peer.short(), target.short())
                    await copy_pair(
                        dialer, endpoint, self._node.config.splice_idle_timeout, self._moved,
                        self._transit if self.tap is not None or self.tamper is not None else None,
                    )  # fmt: skip
            finally:
                self.spliced_active -= 1
                self.held -= 2
                with anyio.CancelScope(shield=True):  # copy_pair closed them, unless it never ran
                    await dialer.aclose()
                    await endpoint.aclose()
            return True
        finally:
            self.tickets.discard(pending)
            for left in (pending.dialer, pending.endpoint):
                if left is not None:
                    self.held -= 1
                    with anyio.CancelScope(shield=True):
                        await left.aclose()

    def _moved(self, n: int) -> None:
        self.counters["spliced_bytes"] += n

    async def arrive(self, transport: anyio.abc.ByteStream, buf: bytearray) -> None:
        """A connection that started ``00 00``: :func:`capsock.node._splice.read_hello`,
        then the connection goes to its waiting setup.  O(1) work whatever the ticket.

        Raises:
            HandshakeError: not a hello, or no redeemable ticket (the caller drops it).
        """
        pending, is_dialer = await read_hello(transport, buf, self.tickets, self.counters)
        self.held += 1
        if is_dialer:
            pending.dialer = transport
            pending.dialer_arrived.set()
        else:
            pending.endpoint = transport
            pending.endpoint_arrived.set()

    async def _refuse(self, stream: Stream, why: str, code: ErrorCode = ErrorCode.REFUSED) -> None:
        log.info("refused a forwarding request from %s: %s", stream.peer.short(), why)
        with contextlib.suppress(
            CapsockError, anyio.BrokenResourceError, anyio.ClosedResourceError
        ):
            await send_message(stream, {"ok": False, "error": why})
        # Then a reset: the answer is delivered first (data before a RESET is
        # still read), and whoever did not expect it sees a failure, not a
        # clean end.
        stream.reset(code)
        await stream.aclose()

    async def _registered(self, stream: Stream, direct: bool = False, splice: bool = False) -> None:
        """A client keeps this stream open to stay reachable through us.

        With ``splice`` (the client offered to dial splice connections and
        its session came straight over TCP), the stream also carries our
        splice invitations to it (protocol 10.10).
        """
        peer = stream.peer
        if splice and observed_address(str(stream.extra(CapsockAttribute.route, ""))) is None:
            splice = False  # it could not dial us: its session did not come over TCP
        if splice:
            self.splice_capable[peer] = stream
            self._invite_locks[stream] = anyio.Lock()
        self.registered[peer] = self.registered.get(peer, 0) + 1
        if direct:
            self.direct_capable[peer] = self.direct_capable.get(peer, 0) + 1
        log.info("%s registered for forwarding", peer.short())
        ok: dict[str, Any] = {"ok": True}
        if direct:
            observed = _observed_field(stream)
            if observed is not None:
                ok["observed"] = observed
        try:
            await send_message(stream, ok)
            while True:
                await stream.receive()  # nothing is expected; wait for the end
        except (anyio.EndOfStream, anyio.BrokenResourceError, CapsockError):
            pass
        finally:
            if self.splice_capable.get(peer) is stream:
                del self.splice_capable[peer]
            self._invite_locks.pop(stream, None)
            self.registered[peer] -= 1
            if not self.registered[peer]:
                del self.registered[peer]
            if direct:
                self.direct_capable[peer] -= 1
                if not self.direct_capable[peer]:
                    del self.direct_capable[peer]
            await stream.aclose()


async def register(node: ForwardingHost, relay: Capability) -> Stream:
    """Register with the forwarder (relay) named by ``relay``; keep the stream open.

    Raises:
        CapabilityRejected: the relay refused the capability.
        ProtocolError: the relay's answer was malformed or negative.
    """
    return (await register_info(node, relay))[0]


async def register_info(node: ForwardingHost, relay: Capability) -> tuple[Stream, RouteInfo]:
    """:func:`register`, and what the relay's answer said (the observed address).

    The request says ``"direct": true`` when the node coordinates direct paths
    (``NodeConfig.direct_paths``); the relay then tells it the address it sees.
    """
    request: dict[str, Any] = {"op": "register"}
    if node.config.direct_paths:
        request["direct"] = True
    if node.config.splice:
        request["splice"] = True
    stream, answer = await _request(node, relay, request)
    if answer.get("ok") is not True:
        await stream.aclose()
        raise ProtocolError(f"the relay did not accept the registration: {_reason(answer)}")
    return stream, _route_info(answer)


async def _request(
    node: ForwardingHost, cap: Capability, request: dict[str, Any]
) -> tuple[Stream, dict[Any, Any]]:
    """Open a stream with ``cap``, send ``request``, return the stream and the answer map."""
    stream = await node.connect(cap)
    try:
        await send_message(stream, request)
        answer = await receive_message(stream)
    except (anyio.EndOfStream, anyio.BrokenResourceError) as exc:
        await stream.aclose()
        raise Unreachable(
            f"the forwarder {cap.node.short()} hung up without answering ({type(exc).__name__})"
        ) from None
    except BaseException:
        await stream.aclose()
        raise
    if not isinstance(answer, dict):
        await stream.aclose()
        raise ProtocolError(f"the forwarder {cap.node.short()} sent a malformed answer")
    return stream, answer


def _reason(answer: dict[Any, Any]) -> str:
    """The forwarder's stated reason, made safe to show: it is the remote's text."""
    return printable(answer.get("error"))


async def open_via(node: ForwardingHost, via: Capability, target: NodeId) -> Stream:
    """Ask the forwarder named by ``via`` for a transport stream to ``target``.

    Raises:
        CapabilityRejected: the forwarder refused the forwarding capability.
        Unreachable: the forwarder did not carry the session (no route to
            ``target``, a limit, a refused request; its reason is included), or
            hung up without answering.
        PeerAuthenticationError / ProtocolError: as for any connect.
    """
    return (await open_via_info(node, via, target))[0]


async def open_via_info(
    node: ForwardingHost, via: Capability, target: NodeId, *, splice: bool = False
) -> tuple[Stream, RouteInfo]:
    """:func:`open_via`, and what the forwarder's answer said (protocol 10.8).

    With ``splice``, the request offers a spliced pair (protocol 10.10); when
    the forwarder takes it up, ``RouteInfo.ticket`` is set and the returned
    stream carries nothing more (close it once the ticket was redeemed or
    given up); else the stream is the nested transport, as without it.
    """
    request: dict[str, Any] = {"op": "forward", "to": target.raw}
    if node.config.direct_paths:
        request["direct"] = True
    if splice:
        request["splice"] = True
    stream, answer = await _request(node, via, request)
    if answer.get("ok") is not True:
        await stream.aclose()
        raise Unreachable(
            f"the forwarder {via.node.short()} did not forward the session: {_reason(answer)}"
        )
    return stream, _route_info(answer)
