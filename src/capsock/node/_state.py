"""Node internals, part 1: the state every part of a node shares, and the pool.

:class:`NodeState` declares the attributes that :class:`capsock.node.Node`'s
``__init__`` sets (so each part is typed on its own) and holds the session pool:
one usable session per peer, counted against ``max_sessions``.  Private: the
public face is :mod:`capsock.node`.
"""

from __future__ import annotations

import collections
import logging
import weakref
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import anyio
import anyio.abc

from .._logs import LimitedLog
from ..config import NodeConfig
from ..core.direct import Address, PunchBudget
from ..core.handshake import HandshakeResult
from ..errors import (
    CapabilityRejected,
    LocalUsageError,
)
from ..keys import KeyPair, NodeId
from ..net.session import Session
from ..net.stream import Stream
from ..store import Store
from ..uri import (
    Capability,
    Hint,
)
from ._budgets import HalfOpenTable, ReplayCache, SourceBuckets
from ._listener import Listener
from .forwarding import Forwarder, RouteInfo

log = logging.getLogger("capsock.node")

MAX_AUTHORIZED_PEERS = 4096
MAX_ROUTES = 4096
"""Nodes whose direct hints a node remembers for forwarding (least recently seen go first)."""
"""Peers remembered as having opened a stream with a capability (and vouchers kept)."""


class HalfOpen:
    """An inbound connection in its handshake (until the dialer's first record)."""

    __slots__ = ("scope", "session", "was_shed")

    def __init__(self, scope: anyio.CancelScope) -> None:
        self.scope = scope
        self.session: Session | None = None
        self.was_shed = False

    def shed(self) -> None:
        """Drop it, also when its first record has just arrived."""
        self.was_shed = True
        self.scope.cancel()
        if self.session is not None:
            self.session.close_now()


class NodeState:
    """The shared state of a node's parts (set by ``Node.__init__``) and its pool."""

    state_dir: Path | None
    _lock_fd: int | None
    _store: Store
    _key: KeyPair
    _stream_tags: weakref.WeakKeyDictionary[Stream, tuple[bytes, ...]]
    _listen_specs: list[tuple[str, str, int]]
    _relays: tuple[Capability, ...]
    relay_status: dict[str, str]
    _relay_changed: anyio.Event
    _relay_refusals: dict[str, CapabilityRejected]
    _advertise: list[tuple[str, str, int]] | None
    config: NodeConfig
    _wall_clock: Callable[[], float]
    _listeners: dict[bytes, Listener]
    _all_listeners: set[Listener]
    _sessions: dict[NodeId, Session]
    _dial_locks: dict[NodeId, anyio.Lock]
    _routes: collections.OrderedDict[NodeId, tuple[Hint, ...]]
    forwarder: Forwarder
    _introductions: Listener | None
    _serve_scope: anyio.CancelScope
    _transport_listeners: list[anyio.abc.Listener[Any]]
    _hints: tuple[Hint, ...]
    _half_open: HalfOpenTable[HalfOpen]
    _nested_half_open: HalfOpenTable[HalfOpen]
    _replays: ReplayCache
    _buckets: SourceBuckets
    _refusals: SourceBuckets
    _sources: dict[Session, str]
    _cut: set[Session]
    _refusal_log: LimitedLog
    _fd_budget: int
    _inbound_direct: int
    _strangers: collections.OrderedDict[Session, None]
    _nested_count: int
    _nested_by_carrier: dict[Session, int]
    _nested_strangers: dict[Session, collections.OrderedDict[Session, None]]
    _stranger_carrier: dict[Session, Session]
    _authorized_peers: collections.OrderedDict[NodeId, None]
    _vouchers: collections.OrderedDict[NodeId, bytes]
    _accept_error_logged: float
    _drop_log: LimitedLog
    _retired_roots: collections.OrderedDict[bytes, str]
    _session_count: int
    _counted: set[Session]
    _host: anyio.abc.TaskGroup | None
    _tasks_scope: anyio.CancelScope
    _tg: anyio.abc.TaskGroup | None
    _closed: bool
    _counters: dict[str, int]
    # direct paths (_node_direct, docs/direct-paths.md)
    _shared_port: int | None
    """The local port relay and forwarder dials and punches go out from (None: none yet)."""
    _observed: dict[NodeId, Address]
    """Per relay this node is registered with, the address it sees us come from."""
    _route_info: collections.OrderedDict[NodeId, RouteInfo]
    """Per peer reached through a forwarder, what the forwarder's answer said (bounded)."""
    _punch_budget: PunchBudget
    _punching: set[NodeId]

    @property
    def id(self) -> NodeId:
        """This node's public identity."""
        return self._key.node_id

    @property
    def hints(self) -> tuple[Hint, ...]:
        """The route hints this node puts into the capabilities it mints."""
        return self._hints

    def __repr__(self) -> str:
        return f"<capsock.Node {self.id.short()} hints={len(self._hints)}>"

    def stats(self) -> dict[str, Any]:
        """Counters and per-session stats, for tests and operators (no secrets)."""
        return {
            **self._counters,
            "half_open": len(self._half_open),
            "forwarded_half_open": len(self._nested_half_open),
            "session_count": self._session_count,
            "forwarded_sessions": self._nested_count,
            **self.forwarder.counters,  # spliced forwarding (protocol 10.10)
            "spliced_active": self.forwarder.spliced_active,
            "splice_setups": len(self.forwarder.tickets),
            "inbound_connections_open": self._inbound_direct,
            "descriptor_budget": self._fd_budget,
            "sessions": {str(p): s.stats() for p, s in self._sessions.items()},
            "listeners": len(self._listeners),
        }

    def _require_running(self) -> anyio.abc.TaskGroup:
        if self._tg is None or self._closed:
            raise LocalUsageError("the node is not running: use `async with Node(...) as node:`")
        return self._tg

    def _tg_start(self, fn: Callable[[], Coroutine[Any, Any, None]]) -> None:
        self._require_running().start_soon(fn)

    def _tg_close(self, transport: anyio.abc.ByteStream) -> None:
        if self._tg is not None:
            self._tg.start_soon(transport.aclose)

    def _forget_session(self, session: Session) -> None:
        self._strangers.pop(session, None)
        if self._stranger_carrier:
            self._unstrange_nested(session)
        self._sources.pop(session, None)
        self._cut.discard(session)
        self._pool_remove(session)

    def _unstrange_nested(self, session: Session) -> None:
        owner = self._stranger_carrier.pop(session, None)
        if owner is not None:
            strangers = self._nested_strangers[owner]
            del strangers[session]
            if not strangers:
                del self._nested_strangers[owner]

    def _pool_add(self, session: Session, *, counted: bool = True) -> None:
        if counted:
            self._session_count += 1
            self._counted.add(session)
        previous = self._sessions.get(session.peer)
        if previous is None or not previous.is_usable:
            self._sessions[session.peer] = session

    def _pool_remove(self, session: Session) -> None:
        if session in self._counted:
            self._counted.discard(session)
            self._session_count -= 1
        if self._sessions.get(session.peer) is session:
            del self._sessions[session.peer]

    def _new_session(
        self, transport: anyio.abc.ByteStream, result: HandshakeResult, leftover: bytes, route: str
    ) -> Session:
        return Session(
            transport,
            result,
            leftover=leftover,
            route=route,
            config=self.config.session,
            on_open=self._on_open,
        )

    async def _run_session(self, session: Session) -> None:
        """Run an outbound (or otherwise trusted) session, pooled while it runs."""
        self._pool_add(session)
        try:
            await session.run()
        finally:
            self._cut.discard(session)
            self._pool_remove(session)

    def _on_open(
        self, session: Session, sid: int, token_bytes: bytes
    ) -> Coroutine[Any, Any, None] | None:
        """Answer an OPEN (the OPEN decisions, :mod:`capsock.node._opens`)."""
        raise NotImplementedError
