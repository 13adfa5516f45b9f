"""Node internals, part 5: dialing, and the session for a peer.

One session per peer (pooled, :mod:`capsock.node._state`), dialed once at a
time per peer: direct hints first (a short head start when forwarding routes
exist), then ``via`` routes through a forwarder, which this task dials first.
URIs are untrusted: looping or deeply nested via hints are refused.
"""

from __future__ import annotations

import contextvars
import errno
import ipaddress
import logging
import socket

import anyio
import anyio.abc
from anyio.abc import SocketAttribute

from ..core.handshake import HandshakeResult
from ..errors import (
    CapsockError,
    PeerAuthenticationError,
    Unreachable,
)
from ..keys import NodeId
from ..net import punch
from ..net.session import Session, dial_handshake
from ..net.stream import Stream
from ..uri import (
    Capability,
    Hint,
    TcpHint,
    UnixHint,
    ViaHint,
)
from ._splice import ACK, HELLO, dialed_tcp
from ._state import MAX_ROUTES, NodeState
from .forwarding import RouteInfo, open_via_info, transport_token

log = logging.getLogger("capsock.node")

_DIALING: contextvars.ContextVar[frozenset[NodeId]] = contextvars.ContextVar(
    "capsock_dialing", default=frozenset()
)
"""The nodes this task is dialing right now (a via route dials its forwarder first)."""

SHARED_PORT_DIAL: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "capsock_shared_port_dial", default=False
)
"""Set while dialing a relay or forwarder: its TCP dials go out from the node's
shared port (docs/direct-paths.md), so the address the relay observes is the one
a punch comes from.  Other dials use ordinary sockets."""


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


MAX_DIAL_NESTING = 4
"""How many dials one task may nest (a via route dials its forwarder, whose own
route may be a via route, ...).  Not :data:`capsock.uri.MAX_VIA_DEPTH` (3), which
bounds how deeply via hints nest *inside one URI*: this bounds the chain of
dials across URIs, and counts the endpoint's own dial too."""


class Dialing(NodeState):
    """Sessions to peers: pooled, or dialed (see the module docstring)."""

    async def connect(self, uri: str | Capability) -> Stream:
        """Open a stream with a capability: :meth:`capsock.Node.connect`."""
        raise NotImplementedError

    async def _session_for(self, node: NodeId, hints: tuple[Hint, ...]) -> Session:
        session = self._sessions.get(node)
        if session is not None and session.is_usable:
            return session
        # A via route dials its forwarder from inside this dial.  URIs are
        # untrusted input: their via hints can loop (E via F, F via E) or nest
        # without end; refuse both instead of re-entering the dial lock.
        path = _DIALING.get()
        if node in path:
            raise Unreachable(f"the route to {node.short()} loops back to itself (via hints)")
        if len(path) >= MAX_DIAL_NESTING:
            raise Unreachable(f"the route to {node.short()} nests too many via hints")
        lock = self._dial_locks.setdefault(node, anyio.Lock())
        token = _DIALING.set(path | {node})
        try:
            async with lock:
                session = self._sessions.get(node)
                if session is not None and session.is_usable:
                    return session
                return await self._dial(node, hints)
        finally:
            _DIALING.reset(token)
            # One lock per node being dialed, not per node ever dialed.
            idle = not lock.locked() and not lock.statistics().tasks_waiting
            if idle and self._dial_locks.get(node) is lock:
                del self._dial_locks[node]

    async def _dial(self, node: NodeId, hints: tuple[Hint, ...]) -> Session:
        """Try direct hints (a short head start when forwarding routes exist), then ``via``."""
        tg = self._require_running()
        attempts: list[tuple[str, str]] = []
        auth_failed = False
        direct = [h for h in hints if not isinstance(h, ViaHint)]
        via = [h for h in hints if isinstance(h, ViaHint)]
        direct_timeout = self.config.direct_timeout if via else self.config.connect_timeout
        for hint in [*direct, *via]:
            transport: anyio.abc.ByteStream | None = None
            if isinstance(hint, ViaHint):
                route = f"via {hint.capability.node.short()}"
                timeout = self.config.connect_timeout
            else:
                route = str(hint)
                timeout = direct_timeout
            try:
                with anyio.fail_after(timeout):
                    if isinstance(hint, ViaHint):
                        transport, result, leftover, route = await self._dial_via(hint, node)
                    else:
                        transport = await self._connect_route(hint, node)
                        result, leftover = await dial_handshake(transport, self._key, node)
            except PeerAuthenticationError as exc:
                auth_failed = True
                attempts.append((route, str(exc)))
            except (
                TimeoutError,
                OSError,
                CapsockError,
                anyio.BrokenResourceError,
                anyio.EndOfStream,
            ) as exc:
                why = str(exc) or ("timed out" if isinstance(exc, TimeoutError) else "failed")
                attempts.append((route, why))
            else:
                session = self._new_session(transport, result, leftover, route)
                how = "relayed" if isinstance(hint, ViaHint) else "direct"
                log.info("reached node %s: %s route, %s", node.short(), how, route)
                tg.start_soon(self._run_session, session)
                await session.ready.wait()
                return session
            if transport is not None:
                with anyio.CancelScope(shield=True):
                    await transport.aclose()
        if auth_failed:
            raise PeerAuthenticationError("; ".join(f"{route}: {why}" for route, why in attempts))
        if not hints:
            raise Unreachable(
                f"the capability for {node.short()} carries no route hints and there is "
                "no open session to that node"
            )
        raise Unreachable(
            f"could not reach node {node.short()} (is it still running, and is one of "
            "the URI's routes reachable from here?)",
            tuple(attempts),
        )

    async def _connect_route(self, hint: Hint, node: NodeId) -> anyio.abc.ByteStream:
        if isinstance(hint, TcpHint):
            if self.config.direct_paths and SHARED_PORT_DIAL.get() and _is_ip(hint.host):
                return await self._dial_shared(hint.host, hint.port)
            stream = await anyio.connect_tcp(hint.host, hint.port)
            sock = stream.extra(SocketAttribute.raw_socket)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return stream
        if isinstance(hint, UnixHint):
            return await anyio.connect_unix(hint.path)
        if hint.capability.node == node:
            raise Unreachable("a forwarding route through the endpoint itself is useless")
        carried, _ = await self._open_via(hint.capability, node, splice=False)
        return carried

    async def _dial_via(
        self, hint: ViaHint, node: NodeId
    ) -> tuple[anyio.abc.ByteStream, HandshakeResult, bytes, str]:
        """A session to ``node`` through a forwarder: spliced when it can be, else nested.

        The splice (protocol 10.10) is asked for only when this node's session
        with the forwarder is one it dialed over TCP (the splice connection
        goes to that same address).  Whatever goes wrong with the splice,
        the dial falls back to a nested session: it never fails because of it.
        The transport returned is the caller's to close; on an exception,
        nothing is left open.
        """
        via = hint.capability
        route = f"via {via.node.short()}"
        if via.node == node:
            raise Unreachable("a forwarding route through the endpoint itself is useless")
        address = None
        if self.config.splice:
            token = SHARED_PORT_DIAL.set(True)
            try:
                carrier = await self._session_for(via.node, via.hints)
            finally:
                SHARED_PORT_DIAL.reset(token)
            address = dialed_tcp(carrier.route)
        if address is not None:
            carried, info = await self._open_via(via, node, splice=True)
            if info.ticket is None:  # the forwarder nests (no support, no room, ...)
                return await self._nested_handshake(carried, node, route)
            spliced = None
            try:
                spliced = await self._redeem(address, info.ticket)
            finally:
                with anyio.CancelScope(shield=True):
                    await carried.aclose()
            if spliced is not None:
                try:
                    result, leftover = await dial_handshake(spliced, self._key, node)
                except (CapsockError, OSError, anyio.BrokenResourceError, anyio.EndOfStream) as exc:
                    log.info("spliced route to %s failed (%s); nesting instead", node.short(),
                             type(exc).__name__)  # fmt: skip
                    with anyio.CancelScope(shield=True):
                        await spliced.aclose()
                except BaseException:
                    with anyio.CancelScope(shield=True):
                        await spliced.aclose()
                    raise
                else:
                    return spliced, result, leftover, f"{route} (spliced)"
        carried, _ = await self._open_via(via, node, splice=False)
        return await self._nested_handshake(carried, node, route)

    async def _nested_handshake(
        self, carried: anyio.abc.ByteStream, node: NodeId, route: str
    ) -> tuple[anyio.abc.ByteStream, HandshakeResult, bytes, str]:
        try:
            result, leftover = await dial_handshake(carried, self._key, node)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await carried.aclose()
            raise
        return carried, result, leftover, route

    async def _open_via(
        self, via: Capability, node: NodeId, *, splice: bool
    ) -> tuple[Stream, RouteInfo]:
        token = SHARED_PORT_DIAL.set(True)
        try:
            carried, info = await open_via_info(self, via, node, splice=splice)
        finally:
            SHARED_PORT_DIAL.reset(token)
        if self.config.direct_paths:
            # Hints for a later punch (_node_direct); bounded like the routes.
            self._route_info[node] = info
            self._route_info.move_to_end(node)
            if len(self._route_info) > MAX_ROUTES:
                self._route_info.popitem(last=False)
        return carried, info

    async def _redeem(self, address: tuple[str, int], ticket: bytes) -> anyio.abc.ByteStream | None:
        """Dial the forwarder, present ``ticket``, wait for its ACK: the spliced transport.

        ``None`` (after logging why, never the ticket) when any of it fails.
        """
        transport: anyio.abc.ByteStream | None = None
        try:
            with anyio.fail_after(self.config.splice_ticket_ttl):
                transport = await anyio.connect_tcp(*address)
                sock = transport.extra(SocketAttribute.raw_socket)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                await transport.send(HELLO + ticket)
                if await transport.receive(1) != ACK:
                    raise anyio.BrokenResourceError
        except (OSError, TimeoutError, anyio.BrokenResourceError, anyio.EndOfStream) as exc:
            log.info("splice connection to the forwarder failed (%s); nesting instead",
                     type(exc).__name__)  # fmt: skip
            if transport is not None:
                with anyio.CancelScope(shield=True):
                    await transport.aclose()
            return None
        except BaseException:  # cancelled (the dial's own deadline): leave nothing open
            if transport is not None:
                with anyio.CancelScope(shield=True):
                    await transport.aclose()
            raise
        return transport

    async def _dial_shared(self, host: str, port: int) -> anyio.abc.ByteStream:
        """Dial from the shared port (chosen by the first such dial)."""
        local = self._shared_port or 0
        try:
            stream = await punch.dial_from(local, host, port)
        except OSError as exc:
            if not local or exc.errno not in (errno.EADDRINUSE, errno.EADDRNOTAVAIL):
                raise
            # The same 4-tuple is still in TIME_WAIT (a quick re-dial of the
            # same relay): this one connection goes out from another port.
            return await punch.dial_from(0, host, port)
        if self._shared_port is None:
            self._shared_port = stream.extra(SocketAttribute.local_port)
        return stream

    async def _open_transport(self, target: NodeId) -> Stream:
        """A transport stream to ``target`` for a forwarded session (forwarder side).

        Raises:
            Unreachable: no session to ``target`` and no direct route known.
            CapabilityRejected: ``target`` refused to carry a forwarded session.
        """
        session = self._sessions.get(target)
        if session is None or not session.is_usable:
            hints = tuple(h for h in self._routes.get(target, ()) if not isinstance(h, ViaHint))
            if not hints:
                raise Unreachable(f"this node has no session and no route to {target.short()}")
            session = await self._session_for(target, hints)
        voucher = self._vouchers.get(target)
        return await session.open_stream(transport_token(voucher))

    def _remember_route(self, cap: Capability) -> None:
        direct = tuple(h for h in cap.hints if not isinstance(h, ViaHint))
        if direct:
            self._routes[cap.node] = direct
            self._routes.move_to_end(cap.node)
            if len(self._routes) > MAX_ROUTES:
                self._routes.popitem(last=False)  # bounded: the least recently seen goes
