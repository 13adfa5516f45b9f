"""Node: one identity in one process -- listeners, sessions, connect and accept.

A :class:`Node` binds the addresses it was told to listen on, accepts inbound
handshakes (bounded in number and time), keeps one pool of sessions keyed by
peer id (a session dialed by either side serves both directions), and decides
every inbound OPEN with :func:`capsock.store.authorize`.

Layout.  This module holds :class:`Node`'s public face (construction,
lifecycle, listen/mint/revoke/connect, forwarding and introductions); each of
its other concerns lives in a private module, as one part ``Node`` inherits:

- ``capsock.config``: :class:`NodeConfig` and the listen-address syntax;
- ``_node_state``: the state every part shares (declared once) and the session pool;
- ``_node_admission``: inbound connections, half-open until the dialer speaks;
- ``_node_binding``: the listening sockets and their accept loops;
- ``_node_opens``: the decision on every inbound OPEN;
- ``_node_dialing``: the session for a peer, dialing its routes;
- ``_relay_upkeep``: staying registered with relays (needs only a small protocol);
- ``_listener``: :class:`Listener`.

Imports run one way: those modules import nothing of this one, and
:mod:`capsock.node.forwarding` depends on :class:`~capsock.node.forwarding.ForwardingHost`,
which ``Node`` satisfies, not on ``Node``.
"""

from __future__ import annotations

import collections
import hmac
import logging
import os
import time
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import anyio
import anyio.abc

from .. import statedir
from .._logs import LimitedLog
from ..config import NodeConfig, parse_listen
from ..core.direct import PunchBudget
from ..errors import (
    CapabilityRejected,
    ErrorCode,
    InvalidCapability,
    LocalUsageError,
)
from ..keys import KeyPair, NodeId
from ..net.session import Session
from ..net.stream import Stream
from ..store import MemoryStore, RootEntry, SqliteStore, Store, chain
from ..uri import (
    Capability,
    Expires,
    Hint,
    TcpHint,
    UnixHint,
    Uses,
    ViaHint,
    mint_root,
    root_tag,
)
from ._binding import Binding
from ._budgets import HalfOpenTable, ReplayCache, SourceBuckets, descriptor_budget
from ._dialing import Dialing
from ._direct import DirectPaths
from ._listener import Listener
from ._opens import OpenDecisions
from ._relay_upkeep import RelayUpkeep
from ._state import MAX_AUTHORIZED_PEERS, HalfOpen
from .forwarding import Forwarder

__all__ = ["Listener", "Node", "NodeConfig"]

log = logging.getLogger("capsock.node")


class Node(DirectPaths, Binding, OpenDecisions, Dialing, RelayUpkeep):
    """One identity (an Ed25519 key pair) with its listeners and sessions.

    Use as an async context manager::

        async with capsock.Node(listen=["tcp:127.0.0.1:0"]) as node:
            listener = await node.listen()
            print(listener.uri)

    Args:
        state_dir: where the identity key lives (``node.key``, mode 0600).
            Without it, the node gets a fresh identity each run.
        listen: addresses to accept sessions on: ``tcp:HOST:PORT`` (port 0 =
            any free port) or ``unix:/PATH``.  A node without any can still dial.
        key: use this key pair instead of the one in ``state_dir``.
        advertise: hints to put into URIs instead of the bound addresses
            (e.g. ``["tcp:203.0.113.7:4000"]`` behind a wildcard bind).
        relays: relay capabilities to use: the node keeps a registration with
            each (reconnecting with backoff and jitter) and puts them into its
            capabilities as ``via=`` hints, so nodes that cannot dial it
            directly (NAT) reach it through the relay.
        config: limits and timeouts.
        wall_clock: wall clock in unix seconds, for capability expiry (tests
            inject one; default ``time.time``).  Named apart from the sessions'
            monotonic clock.
        clock: deprecated old name of ``wall_clock``.
    """

    def __init__(
        self,
        state_dir: str | os.PathLike[str] | None = None,
        listen: Sequence[str] = (),
        *,
        key: KeyPair | None = None,
        advertise: Sequence[str] | None = None,
        relays: Sequence[str | Capability] = (),
        config: NodeConfig | None = None,
        clock: Callable[[], float] | None = None,
        wall_clock: Callable[[], float] | None = None,
    ) -> None:
        if isinstance(listen, str):
            listen = [listen]
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self._lock_fd: int | None = None
        self._store: Store
        if self.state_dir is not None:
            # It holds the key and the root keys: ours, 0700, no links followed.
            statedir.prepare(self.state_dir)
            self._lock_fd = statedir.lock(self.state_dir)
            try:
                if key is None:
                    key = KeyPair.load_or_create(self.state_dir / "node.key")
                statedir.private_file(self.state_dir / "capabilities.sqlite3")
                self._store = SqliteStore(self.state_dir / "capabilities.sqlite3")
            except BaseException:
                statedir.unlock(self._lock_fd)
                raise
        else:
            self._store = MemoryStore()
        self._key = key if key is not None else KeyPair.generate()
        self._stream_tags: weakref.WeakKeyDictionary[Stream, tuple[bytes, ...]] = (
            weakref.WeakKeyDictionary()
        )
        self._listen_specs = [parse_listen(s) for s in listen]
        self._relays = tuple(
            r if isinstance(r, Capability) else Capability.parse(r) for r in relays
        )
        self.relay_status: dict[str, str] = {}
        """Per relay (redacted URI): "registered", "connecting" or the last error."""
        self._relay_changed = anyio.Event()  # set (and replaced) on every change
        self._relay_refusals: dict[str, CapabilityRejected] = {}
        self._advertise = [parse_listen(s) for s in advertise] if advertise is not None else None
        self.config = config or NodeConfig()
        if clock is not None and wall_clock is not None:
            raise LocalUsageError("pass wall_clock only: clock is its deprecated old name")
        self._wall_clock = wall_clock or clock or time.time
        self._listeners: dict[bytes, Listener] = {}  # the ones accepting, by root id
        self._all_listeners: set[Listener] = set()  # also retired ones not yet closed
        self._sessions: dict[NodeId, Session] = {}
        self._dial_locks: dict[NodeId, anyio.Lock] = {}
        self._routes: collections.OrderedDict[NodeId, tuple[Hint, ...]] = collections.OrderedDict()
        """Direct hints seen per node (for forwarding), at most MAX_ROUTES."""
        self.forwarder = Forwarder(self, self._open_transport)
        self._introductions: Listener | None = None
        self._serve_scope = anyio.CancelScope()
        self._transport_listeners: list[anyio.abc.Listener[Any]] = []
        self._hints: tuple[Hint, ...] = ()
        # Admission (docs/security.md, "What a peer's bytes can cost"): direct
        # and forwarded connections are counted apart, so neither can lock the
        # other out.  The descriptor budget is set when the node starts.
        cfg = self.config
        self._half_open: HalfOpenTable[HalfOpen] = HalfOpenTable(cfg.max_half_open)
        self._nested_half_open: HalfOpenTable[HalfOpen] = HalfOpenTable(cfg.max_half_open)
        self._replays = ReplayCache(cfg.replay_cache_size, cfg.replay_window)
        self._buckets = SourceBuckets(*cfg.handshake_rate)
        self._refusals = SourceBuckets(*cfg.refused_open_rate)
        self._sources: dict[Session, str] = {}  # inbound sessions' admission source
        self._cut: set[Session] = set()  # sessions ended for too many refused OPENs
        self._refusal_log = LimitedLog(log, per_window=50, window=10.0)
        self._fd_budget = cfg.max_sessions + cfg.max_half_open
        self._inbound_direct = 0  # accepted transports alive (half-open or sessions)
        self._strangers: collections.OrderedDict[Session, None] = collections.OrderedDict()
        """Confirmed inbound direct sessions that never had a stream accepted:
        the first to be shed when the node is full."""
        self._nested_count = 0
        self._nested_by_carrier: dict[Session, int] = {}
        self._nested_strangers: dict[Session, collections.OrderedDict[Session, None]] = {}
        """Per carrying session, the forwarded sessions it carries that never
        had a stream accepted: the first to be shed when forwarded slots are full."""
        self._stranger_carrier: dict[Session, Session] = {}
        self._authorized_peers: collections.OrderedDict[NodeId, None] = collections.OrderedDict()
        """Peers that opened a stream with one of our capabilities (bounded)."""
        self._vouchers: collections.OrderedDict[NodeId, bytes] = collections.OrderedDict()
        """Per introduced endpoint, our capability token for it (bounded)."""
        self._accept_error_logged = -1e9
        self._drop_log = LimitedLog(log, per_window=20, window=10.0)
        """Lines about dropped connections: a stranger controls how many there are."""
        self._retired_roots: collections.OrderedDict[bytes, str] = collections.OrderedDict()
        """Root ids of closed temporary listeners -> why they retired (log only, bounded)."""
        self._session_count = 0  # direct sessions counted against max_sessions
        self._counted: set[Session] = set()  # sessions counted in _session_count
        self._host: anyio.abc.TaskGroup | None = None  # entered by __aenter__
        self._tasks_scope = anyio.CancelScope(shield=True)
        self._tg: anyio.abc.TaskGroup | None = None  # the node's own tasks
        self._closed = False
        self._counters = {
            "inbound_connections": 0,
            "handshakes_failed": 0,
            "opens_received": 0,
            "opens_refused": 0,
            "streams_accepted": 0,
            "handshakes_replayed": 0,
            "handshakes_throttled": 0,
            "connections_shed": 0,
            "accept_errors": 0,
            "forwarded_refused": 0,
            "sessions_cut_for_refusals": 0,
            "punch_attempts": 0,
            "punch_successes": 0,
            "punch_failures": 0,
        }
        self._shared_port: int | None = None
        self._observed = {}
        self._route_info = collections.OrderedDict()
        self._punch_budget = PunchBudget()
        self._punching = set()

    # ---------------------------------------------------------- identity

    # ---------------------------------------------------------- lifecycle

    async def __aenter__(self) -> Node:
        host = anyio.create_task_group()
        await host.__aenter__()
        self._host = host
        try:
            self._tg = await host.start(self._run_tasks)
            self._fd_budget = descriptor_budget(self.config.fd_reserve)
            # A quarter of the descriptors at most for connections still in
            # their handshake: the rest stays for confirmed sessions.
            self._half_open.capacity = max(4, min(self.config.max_half_open, self._fd_budget // 4))
            hints: list[Hint] = []
            for kind, host_, port in self._listen_specs:
                hints.extend(await self._bind(kind, host_, port))
            if self._advertise is not None:
                hints = [
                    TcpHint(h, p) if k == "tcp" else UnixHint(h) for k, h, p in self._advertise
                ]
            # The relay capability itself stays with this node (it registers with
            # it); the URIs this node mints carry it attenuated to reach only this
            # node, so their holders can neither register at the relay nor use it
            # to reach other nodes.
            via = tuple(ViaHint(r.attenuate(to=self.id)) for r in self._relays)
            self._hints = tuple(hints) + via
            for relay in self._relays:
                self._tg.start_soon(self._keep_relay, relay)
        except BaseException:
            await self._stop_tasks()
            raise
        return self

    async def _run_tasks(
        self, *, task_status: anyio.abc.TaskStatus[anyio.abc.TaskGroup] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """The node's tasks (sessions, listeners, relay upkeep) run in a task group
        shielded from the body's cancellation: when the body is cancelled (a
        timeout, Ctrl-C), the shutdown in ``__aexit__`` still has working session
        writers to send its RESETs and GOAWAYs with.  ``__aexit__`` cancels this
        scope itself once the shutdown is done."""
        with self._tasks_scope:
            async with anyio.create_task_group() as tg:
                task_status.started(tg)
                await anyio.sleep_forever()

    async def _stop_tasks(self) -> None:
        self._tasks_scope.cancel()
        host, self._host, self._tg = self._host, None, None
        if host is not None:
            host.cancel_scope.cancel()
            await host.__aexit__(None, None, None)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        # The body's own exception (or cancellation) propagates unchanged: the
        # node's tasks are stopped as if the body had ended normally, and the
        # shutdown itself is shielded so a timeout cannot interrupt it half way.
        try:
            with anyio.CancelScope(shield=True):
                await self.aclose()
        finally:
            await self._stop_tasks()  # cancelled already: returns at once
        return None

    async def aclose(self, grace: float = 0.0) -> None:
        """Stop listening, send GOAWAY on every session, close them after ``grace`` s.

        Also closes the capability store and releases the state directory.
        """
        if self._closed:
            return
        self._closed = True
        self._relay_changed.set()  # wake wait_registered()
        try:
            await self._shutdown(grace)
        finally:
            self._store.close()
            if self._lock_fd is not None:
                statedir.unlock(self._lock_fd)
                self._lock_fd = None

    async def _shutdown(self, grace: float) -> None:
        self._serve_scope.cancel()
        for lst in self._transport_listeners:
            await lst.aclose()
        for listener in list(self._all_listeners):
            await listener.aclose()
        sessions = list(self._sessions.values())
        if sessions:
            async with anyio.create_task_group() as tg:
                for s in sessions:
                    tg.start_soon(s.aclose, grace)

    # ---------------------------------------------------------- forwarding

    async def forwarding(self, name: str | None = None) -> Listener:
        """Offer forwarding: a listener whose capability lets holders reach, through
        this node, the nodes it has sessions (or direct routes) to.

        Hand out ``listener.uri`` (attenuated as you like) to the nodes allowed to
        use this node as a forwarder; revoke it to stop them.  The node serves
        the listener itself: do not call ``accept()`` on it.

        Raises:
            LocalUsageError: the node is not running.
        """
        tg = self._require_running()
        listener = await self.listen(name)
        tg.start_soon(listener.serve, self.forwarder.handle)
        return listener

    async def introduce(
        self, cap: str | Capability, *, to: NodeId, ttl: float = 300.0
    ) -> Capability:
        """A capability for node ``to``, derived from ``cap``, that ``to`` can use
        even if it cannot reach the endpoint directly.

        The result is ``cap`` attenuated to ``to`` and ``ttl`` seconds, with an
        extra ``via=`` hint: this node's forwarding capability, itself bound to
        ``to``, expiring, and limited (``to`` caveat) to forwarding to ``cap``'s
        node.  Give it to ``to`` over an existing stream (e.g.
        :func:`capsock.send_capability`).  ``to`` tries the direct hints first.

        Raises:
            InvalidCapability: ``cap`` is malformed.
            LocalUsageError: the node is not running.
        """
        c = cap if isinstance(cap, Capability) else Capability.parse(cap)
        if self._introductions is None or self._introductions._retired:
            self._introductions = await self.forwarding()
        now = self._wall_clock()
        self._remember_route(c)
        # Our own capability for the endpoint vouches for the transport streams
        # we open to it (the endpoint accepts them only from peers it has a
        # reason to: holding one of its capabilities is one).
        self._vouchers[c.node] = c.token.encode()
        self._vouchers.move_to_end(c.node)
        if len(self._vouchers) > MAX_AUTHORIZED_PEERS:
            self._vouchers.popitem(last=False)
        via = self._introductions.uri.attenuate(ttl=ttl, peer=to, to=c.node, now=now)
        narrowed = c.attenuate(ttl=ttl, peer=to, now=now)
        direct = tuple(h for h in c.hints if not isinstance(h, ViaHint))
        relayed = tuple(h for h in c.hints if isinstance(h, ViaHint))
        return narrowed.with_hints((*direct, ViaHint(via), *relayed))

    # ---------------------------------------------------------- listen / connect

    async def listen(self, name: str | None = None) -> Listener:
        """Create a listener with a root capability.

        Args:
            name: a sturdy name.  The same name gives the same capability again:
                within the process, and across restarts when the node has a
                ``state_dir`` (the root key is kept in its SQLite store).  The
                route hints are the node's current ones.

        Raises:
            LocalUsageError: the node is not running, or a listener with this
                name is already open.
        """
        self._require_running()
        entry = self._store.root_by_name(name) if name is not None else None
        if entry is not None and self._store.is_revoked([root_tag(entry.root_key, entry.root_id)]):
            log.info("the sturdy capability %r was revoked; minting a new one", name)
            self._store.remove_root(entry.root_id)
            entry = None
        if entry is None:
            entry = RootEntry(os.urandom(16), os.urandom(32), name)
            self._store.add_root(entry)
        existing = self._listeners.get(entry.root_id)
        if existing is not None:
            raise LocalUsageError(f"a listener named {name!r} is already open")
        cap = Capability(self.id, mint_root(entry.root_key, entry.root_id), self._hints)
        listener = Listener(self, cap, self.config.listener_backlog)
        listener._tags = (cap.token.tag,)
        listener._temporary = name is None
        self._listeners[entry.root_id] = listener
        return listener

    async def mint(
        self,
        ttl: float | None = None,
        uses: int | None = None,
        peer: NodeId | None = None,
        label: str | None = None,
    ) -> Listener:
        """A temporary socket: a listener whose capability carries caveats.

        The listener retires itself (accepts no new streams; queued ones can
        still be accepted) once its capability can no longer be opened: after
        ``ttl`` seconds or ``uses`` opens.  Use it as an async context manager.

        Args:
            ttl: seconds until the capability expires (an ``exp`` caveat).
            uses: how many streams may be opened with it (counted here).
            peer: only this node may open it.
            label: a short text for logs (not a secret, not checked).

        Raises:
            InvalidCapability: a caveat value is out of range.
            LocalUsageError: the node is not running.
        """
        self._require_running()
        entry = RootEntry(os.urandom(16), os.urandom(32), None)
        root = Capability(self.id, mint_root(entry.root_key, entry.root_id), self._hints)
        cap = root
        if ttl is not None or uses is not None or peer is not None or label is not None:
            cap = root.attenuate(ttl=ttl, uses=uses, peer=peer, label=label, now=self._wall_clock())
        self._store.add_root(entry)
        listener = Listener(self, cap, self.config.listener_backlog)
        tags = chain(entry.root_key, cap.token)
        listener._tags = tuple(tags)
        listener._temporary = True
        for caveat, after in zip(cap.token.caveats, tags[1:], strict=True):
            if isinstance(caveat, Uses):
                listener._uses = (after, caveat.count)
            elif isinstance(caveat, Expires):
                self._require_running().start_soon(self._expire, listener, caveat.at)
        self._listeners[entry.root_id] = listener
        return listener

    async def wait_registered(self) -> None:
        """Wait until this node is registered with every relay it was given.

        Returns at once for a node without relays, and at once again while
        every registration holds.  A relay that is down is retried for ever:
        put a deadline around the wait (``anyio.fail_after``) to stop waiting.

        Raises:
            CapabilityRejected: a relay refused its capability for good
                (revoked, expired, forged); the node does not retry it.
            LocalUsageError: the node is not running.
        """
        self._require_running()
        while True:
            if self._closed:
                raise LocalUsageError("the node was closed while waiting for its relays")
            for key in self.relay_status:
                if key in self._relay_refusals:
                    raise self._relay_refusals[key]
            keys = {r.redacted() for r in self._relays}
            if all(self.relay_status.get(k) == "registered" for k in keys):
                return
            await self._relay_changed.wait()

    async def _expire(self, listener: Listener, at: int) -> None:
        while not listener._retired:
            delay = at - self._wall_clock()
            if delay <= 0:
                log.info("temporary listener %s expired", listener.uri.redacted())
                listener._retire()
                return
            await anyio.sleep(min(delay, 60.0))

    async def revoke(self, cap: str | Capability) -> None:
        """Revoke ``cap`` and every capability derived from it; nothing else.

        Streams open under a revoked capability (or one derived from it) are
        reset.  Revoking a root also retires its listener.

        Raises:
            InvalidCapability: malformed, or not a genuine capability of this node.
        """
        c = cap if isinstance(cap, Capability) else Capability.parse(cap)
        entry = self._store.get_root(c.token.root_id) if c.node == self.id else None
        genuine = entry is not None and hmac.compare_digest(
            chain(entry.root_key, c.token)[-1], c.token.tag
        )
        if not genuine:
            raise InvalidCapability("this capability was not minted by this node")
        self._store.revoke(c.token.tag, c.token.root_id)
        log.info("revoked %s", c.redacted())
        for listener in list(self._all_listeners):
            if c.token.tag in listener._tags:  # its own capability is now dead
                listener._retire()
        tag = c.token.tag
        for stream, tags in list(self._stream_tags.items()):
            if tag in tags:
                stream._reset_locally(ErrorCode.REFUSED, "its capability was revoked")

    async def connect(self, uri: str | Capability) -> Stream:
        """Open a stream to the endpoint named by ``uri``.

        Returns once the endpoint accepted the stream.

        Raises:
            InvalidCapability: ``uri`` is malformed.
            LocalUsageError: ``uri`` names this node itself, or the node is not running.
            PeerAuthenticationError: the node reached does not hold the URI's key.
            Unreachable: no route hint worked (each one is listed).
            CapabilityRejected: the endpoint refused the capability (``code`` is
                ``REFUSED``), or did not take the stream for a passing reason
                (``BUSY``; ``SHUTTING_DOWN`` when the session went away before
                the answer): those are safe to retry.
        """
        cap = uri if isinstance(uri, Capability) else Capability.parse(uri)
        self._require_running()
        if cap.node == self.id or cap.node.x25519() == self._key.x25519_public:
            raise LocalUsageError(
                "refusing to connect to this node's own id: a node does not dial itself; "
                "accept() on the listener instead"
            )
        session = await self._session_for(cap.node, cap.hints)
        stream = await session.open_stream(cap.token.encode(), cap)
        self._remember_route(cap)
        self._direct_after_connect(session)  # a punch in the background, never awaited
        return stream
