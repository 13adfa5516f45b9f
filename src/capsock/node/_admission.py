"""Node internals, part 2: admission of inbound connections.

Every inbound connection (direct, or forwarded to this node) goes through
:meth:`Admission._admit`: counted while half-open, screened for replays and
rate before any public-key work, shed oldest-first when full, and pooled only
once the dialer's first record authenticates (docs/security.md, "What a
peer's bytes can cost").  The tables themselves are :mod:`capsock.node._budgets`.
"""

from __future__ import annotations

import collections
import functools
import logging

import anyio
import anyio.abc
from anyio.abc import SocketAttribute

from ..errors import (
    CapsockError,
    HandedOver,
    HandshakeError,
)
from ..net.session import Session, accept_handshake
from ._budgets import source_of
from ._state import HalfOpen, NodeState

log = logging.getLogger("capsock.node")


def _describe_peer(addr: object) -> str:
    if addr is None:
        return "unknown"
    if isinstance(addr, tuple):
        return f"tcp:{addr[0]}:{addr[1]}"
    return f"unix:{addr or '?'}"


class Admission(NodeState):
    """Admission of inbound connections (see the module docstring)."""

    def _spawn_inbound(self, transport: anyio.abc.ByteStream) -> None:
        # Sessions live in the node's task group, not in the listener's, so that
        # closing the listening socket does not cut established sessions.
        if self._tg is None:
            self._tg_close(transport)
            return
        held = self._inbound_direct + self.forwarder.held  # spliced sockets count too
        if held >= self._fd_budget and not self._shed_one():
            self._counters["connections_shed"] += 1
            log.info("dropped an inbound connection: the node is full")
            self._tg_close(transport)
            return
        self._inbound_direct += 1
        self._tg.start_soon(self._handle_inbound, transport)

    def _shed_one(self) -> bool:
        """Free one inbound connection: the oldest half-open one of the busiest
        source, else the oldest session that never opened a stream with a
        capability.  Returns whether one was shed."""
        # A source holding several half-open connections first, then the
        # oldest stranger, and only then a lone half-open newcomer.
        victim = self._half_open.pop_victim(min_count=2)
        if victim is None and self._shed_stranger():
            return True
        victim = victim or self._half_open.pop_victim()
        if victim is None:
            return False
        victim.shed()
        self._counters["connections_shed"] += 1
        return True

    async def _handle_inbound(self, transport: anyio.abc.ByteStream) -> None:
        try:
            self._counters["inbound_connections"] += 1
            try:
                address = transport.extra(SocketAttribute.remote_address)
            except Exception:  # best effort: unknown kinds share one source
                address = None
            peer_addr = _describe_peer(address)
            await self._admit(transport, f"inbound {peer_addr}", peer_addr, source_of(address))
        finally:
            self._inbound_direct -= 1

    async def _admit(
        self,
        transport: anyio.abc.ByteStream,
        route: str,
        origin: str,
        source: str,
        carrier: Session | None = None,
    ) -> None:
        """Run an inbound session: handshake, then wait for the dialer's first record.

        Until that record authenticates, the connection is *half-open*: message 1
        is replayable, so a finished handshake proves nothing about the dialer.
        Half-open connections are bounded in time (``handshake_timeout``, for
        both steps together) and in number (``max_half_open``, and a quarter of
        the descriptor budget; when full, the oldest connection of the source
        holding the most is shed rather than the newcomer refused, so neither
        idle connections nor a flooding source lock dialers out).  A message 1
        seen before (a replay) or beyond its source's handshake rate is dropped
        before any public-key work.  Only confirmed sessions join the pool.
        Sessions forwarded to us (``carrier`` is the session carrying them)
        have their own half-open table and count apart from ``max_sessions``.
        """
        scope = anyio.CancelScope(deadline=anyio.current_time() + self.config.handshake_timeout)
        pending = HalfOpen(scope)
        key = id(pending)
        table = self._half_open if carrier is None else self._nested_half_open
        victim = table.add(source, key, pending)
        if victim is not None:
            victim.shed()
            self._counters["connections_shed"] += 1
        session: Session | None = None
        ephemeral = b""
        handed = False
        # A splice hello (protocol 10.10) may only come straight over TCP to a forwarder.
        hello = self.forwarder.arrive if carrier is None and self.config.splice else None

        def screen(message: bytes) -> None:
            nonlocal ephemeral
            ephemeral = message[:32]
            self._screen(ephemeral, source)

        try:
            with scope:
                try:
                    result, leftover = await accept_handshake(
                        transport, self._key, screen=screen, hello=hello
                    )
                except HandedOver:
                    handed = True  # the forwarder holds it now (a spliced pair)
                    return
                except (
                    CapsockError,
                    anyio.EndOfStream,
                    anyio.BrokenResourceError,
                    OSError,
                ) as exc:
                    self._counters["handshakes_failed"] += 1
                    self._drop_log.info("dropped inbound connection from %s: %s", origin, str(exc))
                    return
                self._replays.add(ephemeral, anyio.current_time())
                session = pending.session = self._new_session(transport, result, leftover, route)
                self._sources[session] = source
                # Join the pool the moment the dialer is confirmed, before the
                # session processes anything that record asks for (a relay
                # registration answered "ok" must find the session pooled).
                if carrier is None:
                    session.on_confirmed = self._confirm_inbound
                else:
                    session.on_confirmed = functools.partial(self._confirm_forwarded, carrier)
                self._tg_start(session.run)
                await session.confirmed.wait()
        finally:
            table.remove(source, key)
            if handed:
                pass
            elif session is None or not session.confirmed.is_set() or pending.was_shed:
                if session is not None:
                    self._drop_log.info(
                        "dropped inbound session from %s: the dialer never spoke", origin
                    )
                    self._counters["handshakes_failed"] += 1
                    session.close_now()
                if scope.cancelled_caught and session is None:
                    self._counters["handshakes_failed"] += 1
                    self._drop_log.info(
                        "dropped inbound connection from %s: handshake timeout", origin
                    )
                with anyio.CancelScope(shield=True):
                    await transport.aclose()
        if session is None or not session.confirmed.is_set() or pending.was_shed:
            if session is not None:
                self._forget_session(session)
            return
        try:
            await session.finished.wait()
        finally:
            self._forget_session(session)

    def _screen(self, ephemeral: bytes, source: str) -> None:
        """Cheap checks on a message 1 before the public-key work (raises to drop it)."""
        now = anyio.current_time()
        if self._replays.seen(ephemeral, now):
            self._counters["handshakes_replayed"] += 1
            raise HandshakeError("a replayed first handshake message")
        if self._buckets.take(source, now) > 0.0:
            self._counters["handshakes_throttled"] += 1
            raise HandshakeError("too many handshakes from this source")

    def _confirm_inbound(self, session: Session) -> None:
        if session in self._counted:
            return
        if self._session_count >= self.config.max_sessions and not self._shed_stranger():
            self._drop_log.warning(
                "dropping session from %s: max_sessions reached", session.peer.short()
            )
            session.close_now()
            return
        self._pool_add(session)
        self._strangers[session] = None

    def _shed_stranger(self) -> bool:
        if not self._strangers:
            return False
        stranger, _ = self._strangers.popitem(last=False)
        log.info("shed the idle session from %s to make room", stranger.peer.short())
        self._counters["connections_shed"] += 1
        stranger.close_now()
        self._pool_remove(stranger)
        return True

    def _confirm_forwarded(self, carrier: Session, session: Session) -> None:
        self._pool_add(session, counted=False)
        self._nested_strangers.setdefault(carrier, collections.OrderedDict())[session] = None
        self._stranger_carrier[session] = carrier

    def _shed_nested_stranger(self, carrier: Session, *, any_carrier: bool) -> bool:
        """Shed the oldest forwarded session that never presented a capability:
        one ``carrier`` carries, else (``any_carrier``) one any carrier does."""
        candidates = [carrier] if carrier in self._nested_strangers else []
        if any_carrier:
            candidates.extend(self._nested_strangers)
        for owner in candidates:
            strangers = self._nested_strangers.get(owner)
            if strangers:
                stranger, _ = strangers.popitem(last=False)
                del self._stranger_carrier[stranger]
                if not strangers:
                    del self._nested_strangers[owner]
                log.info(
                    "shed the idle forwarded session from %s to make room", stranger.peer.short()
                )
                self._counters["connections_shed"] += 1
                stranger.close_now()
                self._pool_remove(stranger)
                return True
        return False
