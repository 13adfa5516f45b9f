"""Node internals, part 6: relay upkeep.

A node given relays keeps one registration stream open with each (reconnect
with backoff and jitter; a refused capability is given up for good) and
reports each relay's status.  It depends only on :class:`RelayHost`, a small
protocol that :class:`capsock.Node` satisfies; registering is
:func:`capsock.node.forwarding.register`.
"""

from __future__ import annotations

import logging
import secrets
import socket
from typing import Any, Protocol

import anyio
import anyio.abc
from anyio.abc import SocketAttribute

from ..config import NodeConfig
from ..core.direct import Address
from ..errors import (
    CapabilityRejected,
    CapsockError,
    ErrorCode,
)
from ..keys import NodeId
from ..messages import receive_message
from ..net.session import Session
from ..net.stream import Stream
from ..uri import (
    Capability,
)
from ._dialing import SHARED_PORT_DIAL
from ._splice import HELLO, TICKET_LEN, dialed_tcp
from .forwarding import register_info

log = logging.getLogger("capsock.node")


class RelayHost(Protocol):
    """What relay upkeep needs of a node."""

    @property
    def id(self) -> NodeId: ...
    @property
    def config(self) -> NodeConfig: ...
    async def connect(self, uri: str | Capability) -> Stream: ...

    relay_status: dict[str, str]
    _observed: dict[NodeId, Address]
    _relay_changed: anyio.Event
    _relay_refusals: dict[str, CapabilityRejected]
    _closed: bool
    _sessions: dict[NodeId, Session]
    _nested_count: int
    _nested_by_carrier: dict[Session, int]

    def _require_running(self) -> anyio.abc.TaskGroup: ...
    def _shed_nested_stranger(self, carrier: Session, *, any_carrier: bool) -> bool: ...
    async def _admit(
        self,
        transport: anyio.abc.ByteStream,
        route: str,
        origin: str,
        source: str,
        carrier: Session | None = None,
    ) -> None: ...


def splice_invitation(message: Any) -> bytes | None:
    """The ticket of a relay's splice invitation (protocol 10.10), or ``None``."""
    if not isinstance(message, dict) or message.get("op") != "splice":
        return None
    ticket = message.get("ticket")
    return ticket if isinstance(ticket, bytes) and len(ticket) == TICKET_LEN else None


class RelayUpkeep:
    """Stay registered with each relay (see the module docstring)."""

    async def _keep_relay(self: RelayHost, relay: Capability) -> None:
        """Stay registered with ``relay``: reconnect with backoff and jitter."""
        first, largest = self.config.relay_backoff
        delay = first
        key = relay.redacted()
        while not self._closed:
            RelayUpkeep._set_relay_status(self, key, "connecting")
            token = SHARED_PORT_DIAL.set(True)  # the relay observes the shared port
            try:
                stream, info = await register_info(self, relay)
            except (CapsockError, OSError, TimeoutError, anyio.BrokenResourceError) as exc:
                SHARED_PORT_DIAL.reset(token)
                if isinstance(exc, CapabilityRejected) and exc.code == ErrorCode.REFUSED:
                    # The capability is dead (revoked, expired, forged): retrying
                    # cannot help.  BUSY and SHUTTING_DOWN are worth a retry.
                    self._relay_refusals[key] = exc
                    RelayUpkeep._set_relay_status(self, key, f"refused: {exc}")
                    log.warning("relay %s: %s; not retrying", relay.node.short(), str(exc))
                    return
                RelayUpkeep._set_relay_status(self, key, f"failed: {exc}")
                log.warning("relay %s: %s; retrying in %.1f s", relay.node.short(), str(exc), delay)
            else:
                SHARED_PORT_DIAL.reset(token)
                if info.observed is not None:
                    # A punch candidate only (docs/direct-paths.md, section 2).
                    self._observed[relay.node] = info.observed
                RelayUpkeep._set_relay_status(self, key, "registered")
                delay = first
                log.info("registered with relay %s", relay.node.short())
                try:
                    async with stream:
                        while True:
                            if not self.config.splice:
                                await stream.receive()
                                continue
                            ticket = splice_invitation(await receive_message(stream))
                            if ticket is not None:
                                self._require_running().start_soon(
                                    RelayUpkeep._splice_invited, self, relay, ticket
                                )
                except (anyio.EndOfStream, anyio.BrokenResourceError, CapsockError):
                    self._observed.pop(relay.node, None)
                    RelayUpkeep._set_relay_status(self, key, "lost")
                    if self._closed:  # our own shutdown closed the session
                        return
                    log.warning("lost the relay %s; reconnecting", relay.node.short())
            await anyio.sleep(delay * (0.5 + secrets.randbelow(1000) / 1000))
            delay = min(delay * 2, largest)

    def _set_relay_status(self: RelayHost, key: str, status: str) -> None:
        self.relay_status[key] = status
        self._relay_changed.set()
        self._relay_changed = anyio.Event()

    async def _splice_invited(self: RelayHost, relay: Capability, ticket: bytes) -> None:
        """Dial the relay a splice connection and run the session it brings (protocol 10.10).

        Only to the address this node dialed the relay at; counted (and
        shed) exactly like a forwarded session the relay carries.  Any
        failure just drops the invitation: the relay falls back to nesting.
        """
        session = self._sessions.get(relay.node)
        address = dialed_tcp(session.route) if session is not None and session.is_usable else None
        if session is None or address is None:
            log.info("splice invitation from relay %s ignored: not dialed over TCP",
                     relay.node.short())  # fmt: skip
            return
        limit = self.config.max_forwarded_sessions
        if self._nested_by_carrier.get(session, 0) >= limit:
            room = self._shed_nested_stranger(session, any_carrier=False)
        elif self._nested_count >= limit:
            room = self._shed_nested_stranger(session, any_carrier=True)
        else:
            room = True
        if not room:
            log.info("splice invitation from relay %s ignored: forwarded sessions full",
                     relay.node.short())  # fmt: skip
            return
        self._nested_count += 1
        self._nested_by_carrier[session] = self._nested_by_carrier.get(session, 0) + 1
        try:
            transport: anyio.abc.ByteStream | None = None
            try:
                with anyio.fail_after(self.config.splice_ticket_ttl):
                    transport = await anyio.connect_tcp(*address)
                    sock = transport.extra(SocketAttribute.raw_socket)
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    await transport.send(HELLO + ticket)
            except (OSError, TimeoutError, anyio.BrokenResourceError) as exc:
                log.info("splice connection to relay %s failed: %s", relay.node.short(),
                         type(exc).__name__)  # fmt: skip
                if transport is not None:
                    with anyio.CancelScope(shield=True):
                        await transport.aclose()
                return
            except BaseException:  # cancelled (the node is closing): leave nothing open
                if transport is not None:
                    with anyio.CancelScope(shield=True):
                        await transport.aclose()
                raise
            peer = session.peer.short()
            await self._admit(
                transport,
                f"forwarded by {peer} (spliced)",
                f"a session spliced by {peer}",
                f"forwarded:{session.peer}",
                carrier=session,
            )
        finally:
            self._nested_count -= 1
            left = self._nested_by_carrier[session] - 1
            if left:
                self._nested_by_carrier[session] = left
            else:
                del self._nested_by_carrier[session]
