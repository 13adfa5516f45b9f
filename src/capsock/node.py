"""Node: one identity in one process -- listeners, sessions, connect and accept.

A :class:`Node` binds the addresses it was told to listen on, accepts inbound
handshakes (bounded in number and time), keeps one pool of sessions keyed by
peer id (a session dialed by either side serves both directions), and decides
every inbound OPEN with :func:`capsock.store.authorize`.
"""

from __future__ import annotations

import collections
import contextvars
import errno
import hmac
import ipaddress
import logging
import os
import secrets
import socket
import time
import weakref
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import anyio
import anyio.abc
from anyio.abc import SocketAttribute

from . import statedir
from .admission import HalfOpenTable, ReplayCache, SourceBuckets, descriptor_budget, source_of
from .errors import (
    CapabilityRejected,
    CapsockError,
    ErrorCode,
    HandshakeError,
    InvalidCapability,
    LocalUsageError,
    PeerAuthenticationError,
    Unreachable,
)
from .forward import TRANSPORT_TOKEN, Forwarder, open_via
from .forward import register as forward_register
from .handshake import HandshakeResult
from .keys import KeyPair, NodeId
from .session import Session, SessionConfig, accept_handshake, dial_handshake
from .store import MemoryStore, RootEntry, SqliteStore, Store, Verdict, authorize, chain
from .stream import CapsockAttribute, Stream
from .uri import (
    Capability,
    Expires,
    Hint,
    TcpHint,
    Token,
    UnixHint,
    Uses,
    ViaHint,
    mint_root,
    root_tag,
)

__all__ = ["Listener", "Node", "NodeConfig"]

log = logging.getLogger("capsock.node")


@dataclass(slots=True)
class NodeConfig:
    """Node-wide limits and timeouts; every field has a documented default."""

    session: SessionConfig = field(default_factory=SessionConfig)
    """Per-session settings (windows, keepalive, open timeout)."""
    handshake_timeout: float = 10.0
    """Seconds an inbound connection may take to complete the handshake."""
    connect_timeout: float = 10.0
    """Seconds per route for an outbound dial plus handshake."""
    max_half_open: int = 256
    """Inbound connections allowed to be mid-handshake at once; more are dropped."""
    listener_backlog: int = 128
    """Accepted streams a listener holds before its application calls accept()."""
    backlog_wait: float = 2.0
    """Seconds an OPEN waits for room in a full listener backlog before BUSY."""
    direct_timeout: float = 3.0
    """Seconds per direct route when the capability also offers forwarding
    (``via``) routes: direct hints get a short head start, then forwarding."""
    accept_forwarded: Literal["trusted", "any", "never"] | bool = "trusted"
    """From whom this node accepts sessions forwarded to it (transport streams):
    ``"trusted"`` (the default) only from peers it has a reason to -- its
    relays, sessions it dialed itself, and peers that opened a stream with one
    of its capabilities (an introducer that holds one, say); ``"any"`` from
    every peer; ``"never"``.  ``True`` means ``"any"``, ``False`` ``"never"``.
    Forwarded sessions still need a capability for every stream."""
    max_forwards_per_peer: int = 256
    """Sessions one peer may have forwarded through this node at once."""
    max_forwarded_sessions: int = 1024
    """Sessions forwarded *to* this node that it runs at once (mid-handshake or
    confirmed), counted apart from ``max_sessions``: a flood of forwarded
    sessions cannot lock out direct dialers."""
    max_forwarded_per_session: int = 64
    """Of those, how many one carrying session (one peer) may hold at once; a
    relay this node registered with may carry up to ``max_forwarded_sessions``
    (it is how every client reaches a node behind NAT)."""
    relay_backoff: tuple[float, float] = (0.5, 30.0)
    """Reconnect delay to a relay: first and largest (doubling, with jitter)."""
    max_sessions: int = 4096
    """Direct sessions (inbound and outbound) this node keeps at once.  When an
    inbound session would exceed it (or the descriptor budget), the oldest
    inbound session that never opened a stream with a capability is shed; when
    there is none, the newcomer is dropped."""
    handshake_rate: tuple[float, float] = (200.0, 400.0)
    """Handshakes per second and burst allowed from one source (an IPv4
    address, an IPv6 /64, the carrying peer of a forwarded session); more are
    dropped before any public-key work."""
    refused_open_rate: tuple[float, float] = (50.0, 200.0)
    """Refused ``OPEN``s per second and burst allowed from one source (as for
    ``handshake_rate``), counted after the uniform capability check.  A session
    whose refusal finds its source's bucket empty is ended with
    ``GOAWAY(LIMIT_EXCEEDED)`` and none of its later OPENs is checked: a peer
    cannot buy unbounded capability checks with cheap forged tokens."""
    replay_window: float = 600.0
    """Seconds a handshake's ephemeral key is remembered: a replayed message 1
    within that time is dropped before any public-key work."""
    replay_cache_size: int = 16384
    """Ephemeral keys remembered at most (the oldest go first)."""
    fd_reserve: int = 64
    """File descriptors (at least; or one eighth of the limit) kept free of
    inbound connections, for outbound dials, relay upkeep, the store and the
    application's own sockets.  The node raises its soft ``RLIMIT_NOFILE`` to
    the hard limit at start and sizes its inbound connections to the rest."""

    def __post_init__(self) -> None:
        if self.accept_forwarded is True:
            self.accept_forwarded = "any"
        elif self.accept_forwarded is False:
            self.accept_forwarded = "never"
        elif self.accept_forwarded not in ("trusted", "any", "never"):
            raise LocalUsageError(
                f"accept_forwarded={self.accept_forwarded!r}: use 'trusted', 'any' or 'never'"
            )


def _bind_error(exc: OSError, address: str) -> OSError:
    """The same OSError (errno kept), naming the address that could not be bound."""
    return OSError(exc.errno, f"cannot listen on {address}: {exc.strerror or exc}")


def _parse_listen(spec: str) -> tuple[str, str, int]:
    kind, sep, rest = spec.partition(":")
    if kind not in ("tcp", "unix") and spec.rpartition(":")[2].isdigit():
        return _parse_listen(f"tcp:{spec}")  # a bare HOST:PORT, as on the command line
    if not sep:
        raise LocalUsageError(f"listen address {spec!r}: use tcp:HOST:PORT or unix:/PATH")
    if kind == "unix":
        if not rest.startswith("/"):
            raise LocalUsageError(f"listen address {spec!r}: a unix path must be absolute")
        return "unix", rest, 0
    if kind == "tcp":
        host, sep, port_text = rest.rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if not sep or not host or not port_text.isdigit() or int(port_text) > 65535:
            raise LocalUsageError(f"listen address {spec!r}: use tcp:HOST:PORT (port 0 = any)")
        return "tcp", host, int(port_text)
    raise LocalUsageError(f"listen address {spec!r}: unknown kind {kind!r} (tcp or unix)")


def _is_wildcard(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


class Node:
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
        clock: wall clock in unix seconds, for capability expiry (tests inject one).
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
        clock: Callable[[], float] = time.time,
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
        self._listen_specs = [_parse_listen(s) for s in listen]
        self._relays = tuple(
            r if isinstance(r, Capability) else Capability.parse(r) for r in relays
        )
        self.relay_status: dict[str, str] = {}
        """Per relay (redacted URI): "registered", "connecting" or the last error."""
        self._relay_changed = anyio.Event()  # set (and replaced) on every change
        self._relay_refusals: dict[str, CapabilityRejected] = {}
        self._advertise = [_parse_listen(s) for s in advertise] if advertise is not None else None
        self.config = config or NodeConfig()
        self._clock = clock
        self._listeners: dict[bytes, Listener] = {}  # the ones accepting, by root id
        self._all_listeners: set[Listener] = set()  # also retired ones not yet closed
        self._sessions: dict[NodeId, Session] = {}
        self._dial_locks: dict[NodeId, anyio.Lock] = {}
        self._routes: dict[NodeId, tuple[Hint, ...]] = {}  # direct hints seen, for forwarding
        self.forwarder = Forwarder(self)
        self._introductions: Listener | None = None
        self._serve_scope = anyio.CancelScope()
        self._transport_listeners: list[anyio.abc.Listener[Any]] = []
        self._hints: tuple[Hint, ...] = ()
        # Admission (docs/security.md, "What a peer's bytes can cost"): direct
        # and forwarded connections are counted apart, so neither can lock the
        # other out.  The descriptor budget is set when the node starts.
        cfg = self.config
        self._half_open: HalfOpenTable[_HalfOpen] = HalfOpenTable(cfg.max_half_open)
        self._nested_half_open: HalfOpenTable[_HalfOpen] = HalfOpenTable(cfg.max_half_open)
        self._replays = ReplayCache(cfg.replay_cache_size, cfg.replay_window)
        self._buckets = SourceBuckets(*cfg.handshake_rate)
        self._refusals = SourceBuckets(*cfg.refused_open_rate)
        self._sources: dict[Session, str] = {}  # inbound sessions' admission source
        self._cut: set[Session] = set()  # sessions ended for too many refused OPENs
        self._refusal_log = _LimitedLog(log, per_window=50, window=10.0)
        self._fd_budget = cfg.max_sessions + cfg.max_half_open
        self._inbound_direct = 0  # accepted transports alive (half-open or sessions)
        self._strangers: collections.OrderedDict[Session, None] = collections.OrderedDict()
        """Confirmed inbound direct sessions that never had a stream accepted:
        the first to be shed when the node is full."""
        self._nested_count = 0
        self._nested_by_carrier: dict[Session, int] = {}
        self._authorized_peers: collections.OrderedDict[NodeId, None] = collections.OrderedDict()
        """Peers that opened a stream with one of our capabilities (bounded)."""
        self._vouchers: collections.OrderedDict[NodeId, bytes] = collections.OrderedDict()
        """Per introduced endpoint, our capability token for it (bounded)."""
        self._accept_error_logged = -1e9
        self._drop_log = _LimitedLog(log, per_window=20, window=10.0)
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
        }

    # ---------------------------------------------------------- identity

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
            "inbound_connections_open": self._inbound_direct,
            "descriptor_budget": self._fd_budget,
            "sessions": {str(p): s.stats() for p, s in self._sessions.items()},
            "listeners": len(self._listeners),
        }

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

    def _require_running(self) -> anyio.abc.TaskGroup:
        if self._tg is None or self._closed:
            raise LocalUsageError("the node is not running: use `async with Node(...) as node:`")
        return self._tg

    async def _bind(self, kind: str, host: str, port: int) -> list[Hint]:
        tg = self._require_running()
        listener: anyio.abc.Listener[Any]
        if kind == "unix":
            path = Path(host)
            # anyio removes a stale socket file (never a regular file) and sets
            # the mode right after bind(); the capability, not the file mode, is
            # what authorises, so the short window before chmod is harmless.
            try:
                listener = await anyio.create_unix_listener(path, mode=0o600)
            except OSError as exc:
                raise _bind_error(exc, f"unix:{path}") from exc
            hints: list[Hint] = [UnixHint(str(path))]
        else:
            try:
                listener = await anyio.create_tcp_listener(local_host=host, local_port=port)
            except OSError as exc:
                shown = f"[{host}]" if ":" in host else host
                raise _bind_error(exc, f"tcp:{shown}:{port}") from exc
            bound = listener.extra(SocketAttribute.local_port)
            if _is_wildcard(host):
                # The machine's usable addresses with the real port (rules in
                # capsock.interfaces); an advertise list replaces them anyway.
                hints = []
                if self._advertise is None:
                    from . import interfaces

                    subs = getattr(listener, "listeners", [listener])
                    socks = [sub.extra(SocketAttribute.raw_socket) for sub in subs]
                    hosts = interfaces.advertised_hosts(socks)
                    hints = [TcpHint(h, bound) for h in hosts]
                    if all(ipaddress.ip_address(h).is_loopback for h in hosts):
                        log.warning(
                            "listening on wildcard %s:%d, but this machine has no address "
                            "other than loopback: URIs reach it from this machine only; name "
                            "the address others dial with advertise (--advertise tcp:HOST:PORT)",
                            host,
                            bound,
                        )
            else:
                hints = [TcpHint(host, bound)]
        self._transport_listeners.append(listener)
        tg.start_soon(self._serve_transport, listener)
        return hints

    async def _serve_transport(self, listener: anyio.abc.Listener[Any]) -> None:
        # Our own accept loop instead of ``listener.serve()``: an accept error
        # (EMFILE when the descriptors run out, ENOBUFS, ECONNABORTED, ...) must
        # never end the node.  It sheds a connection and backs off instead.
        subs: list[anyio.abc.Listener[Any]] = list(getattr(listener, "listeners", [listener]))
        with self._serve_scope:
            async with anyio.create_task_group() as tg:
                for sub in subs:
                    tg.start_soon(self._accept_loop, sub)

    async def _accept_loop(self, listener: anyio.abc.Listener[Any]) -> None:
        # A spare descriptor, given up when accept() fails for lack of them:
        # Linux takes the new descriptor before it looks for a connection, so
        # without a free one accept() fails even with nobody waiting, and only
        # a retry with one free tells "a dialer is waiting" from "idle".
        spare: int | None = _open_spare()
        failures = 0
        try:
            while True:
                try:
                    transport = await listener.accept()  # type: ignore[attr-defined]
                except anyio.ClosedResourceError:
                    return  # aclose() closed the listening socket
                except (OSError, anyio.BrokenResourceError) as exc:
                    # anyio's trio backend reports the OSError as its cause
                    cause = exc if isinstance(exc, OSError) else exc.__cause__
                    if not isinstance(cause, OSError):
                        raise
                    self._counters["accept_errors"] += 1
                    self._log_accept_error(cause)
                    if spare is not None and cause.errno in (errno.EMFILE, errno.ENFILE):
                        os.close(spare)
                        spare = None
                        continue  # retry at once, with one descriptor free
                    failures += 1
                    self._shed_one()
                    await anyio.sleep(min(1.0, 0.005 * 2 ** min(failures, 8)))
                    continue
                failures = 0
                if spare is None:
                    spare = _open_spare()
                    if spare is None:  # still none free: make room for the next
                        self._shed_one()
                self._spawn_inbound(transport)
        finally:
            if spare is not None:
                os.close(spare)

    def _log_accept_error(self, exc: OSError) -> None:
        now = anyio.current_time()
        if now - self._accept_error_logged >= 10.0:
            self._accept_error_logged = now
            log.warning(
                "accepting a connection failed (%s); shedding the cheapest connection "
                "and backing off",
                errno.errorcode.get(exc.errno or 0, str(exc)),
            )

    def _spawn_inbound(self, transport: anyio.abc.ByteStream) -> None:
        # Sessions live in the node's task group, not in the listener's, so that
        # closing the listening socket does not cut established sessions.
        if self._tg is None:
            self._tg_close(transport)
            return
        if self._inbound_direct >= self._fd_budget and not self._shed_one():
            self._counters["connections_shed"] += 1
            log.info("dropped an inbound connection: the node is full")
            self._tg_close(transport)
            return
        self._inbound_direct += 1
        self._tg.start_soon(self._handle_inbound, transport)

    def _tg_close(self, transport: anyio.abc.ByteStream) -> None:
        if self._tg is not None:
            self._tg.start_soon(transport.aclose)

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
        pending = _HalfOpen(scope)
        key = id(pending)
        table = self._half_open if carrier is None else self._nested_half_open
        victim = table.add(source, key, pending)
        if victim is not None:
            victim.shed()
            self._counters["connections_shed"] += 1
        session: Session | None = None
        ephemeral = b""

        def screen(message: bytes) -> None:
            nonlocal ephemeral
            ephemeral = message[:32]
            self._screen(ephemeral, source)

        try:
            with scope:
                try:
                    result, leftover = await accept_handshake(transport, self._key, screen=screen)
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
                session.on_confirmed = (
                    self._confirm_inbound if carrier is None else self._confirm_forwarded
                )
                self._tg_start(session.run)
                await session.confirmed.wait()
        finally:
            table.remove(source, key)
            if session is None or not session.confirmed.is_set() or pending.was_shed:
                if session is not None:
                    self._drop_log.info(
                        "dropped inbound session from %s: the dialer never spoke", origin
                    )
                    self._counters["handshakes_failed"] += 1
                    session.abort()
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

    def _forget_session(self, session: Session) -> None:
        self._strangers.pop(session, None)
        self._sources.pop(session, None)
        self._cut.discard(session)
        self._pool_remove(session)

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
            log.warning("dropping session from %s: max_sessions reached", session.peer.short())
            session.abort()
            return
        self._pool_add(session)
        self._strangers[session] = None

    def _shed_stranger(self) -> bool:
        if not self._strangers:
            return False
        stranger, _ = self._strangers.popitem(last=False)
        log.info("shed the idle session from %s to make room", stranger.peer.short())
        self._counters["connections_shed"] += 1
        stranger.abort()
        self._pool_remove(stranger)
        return True

    def _confirm_forwarded(self, session: Session) -> None:
        self._pool_add(session, counted=False)

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

    def _tg_start(self, fn: Callable[[], Coroutine[Any, Any, None]]) -> None:
        self._require_running().start_soon(fn)

    def _on_open(
        self, session: Session, sid: int, token_bytes: bytes
    ) -> Coroutine[Any, Any, None] | None:
        """Answer an OPEN at once; return a coroutine when it must wait (full backlog)."""
        if token_bytes[:1] == TRANSPORT_TOKEN:
            return self._accept_transport(session, sid, token_bytes[1:])
        self._counters["opens_received"] += 1
        if session in self._cut:  # ending (GOAWAY sent): no check, no answer
            return None
        token: Token | None
        reason: str | None = None
        try:
            token = Token.decode(token_bytes)
        except InvalidCapability as exc:
            reason = f"malformed token ({exc})"
            token = None
        listener = self._listeners.get(token.root_id) if token is not None else None
        verdict = Verdict(reason)
        if token is not None:
            # The same work for every token.  A use is consumed only when the
            # stream is really accepted (not for a closed or full listener), and
            # the token is checked before anything reveals the listener's state.
            ready = listener is not None and not listener._full()
            verdict = authorize(
                self._store, token, peer=session.peer, now=self._clock(), consume=ready
            )
            if verdict.allowed and listener is not None and not ready:
                return self._open_when_room(session, sid, token, listener)
        self._answer_open(session, sid, token, listener, verdict)
        return None

    async def _open_when_room(
        self, session: Session, sid: int, token: Token, listener: Listener
    ) -> None:
        """Give a busy application a moment to accept() before refusing BUSY."""
        with anyio.move_on_after(self.config.backlog_wait):
            while listener._full() and not listener._retired:  # noqa: ASYNC110
                await anyio.sleep(0.01)
        if listener._retired or listener._full():
            log.warning("listener is full; refusing a stream from %s", session.peer.short())
            session.reject(sid, ErrorCode.BUSY)
            return
        verdict = authorize(self._store, token, peer=session.peer, now=self._clock())
        self._answer_open(session, sid, token, listener, verdict)

    def _answer_open(
        self,
        session: Session,
        sid: int,
        token: Token | None,
        listener: Listener | None,
        verdict: Verdict,
    ) -> None:
        reason = verdict.reason
        if reason is None and (listener is None or listener._retired):
            reason = "listener closed"
        if reason == "unknown root" and token is not None:
            reason = self._retired_roots.get(token.root_id, reason)  # the log says why
        if reason is not None or listener is None or token is None:
            self._counters["opens_refused"] += 1
            self._refusal_log.info("refused a stream from %s: %s", session.peer.short(), reason)
            session.reject(sid, ErrorCode.REFUSED)
            self._charge_refusal(session)
            return
        cap = Capability(self.id, token, ())
        stream = session.accept(sid, cap)
        if stream is not None:
            self._counters["streams_accepted"] += 1
            self._strangers.pop(session, None)  # it holds a capability: not shed first
            self._authorized_peers[session.peer] = None
            self._authorized_peers.move_to_end(session.peer)
            if len(self._authorized_peers) > _MAX_AUTHORIZED_PEERS:
                self._authorized_peers.popitem(last=False)
            self._stream_tags[stream] = verdict.tags
            listener._deliver(stream)
        listener._check_used_up()

    def _charge_refusal(self, session: Session) -> None:
        """Count a refused OPEN against its source; end the session past the budget."""
        source = self._sources.get(session) or f"peer:{session.peer}"
        if session in self._cut or self._refusals.take(source, anyio.current_time()) == 0.0:
            return
        self._cut.add(session)
        self._counters["sessions_cut_for_refusals"] += 1
        self._drop_log.info(
            "ending the session from %s: too many refused streams from its source",
            session.peer.short(),
        )
        session.end(ErrorCode.LIMIT_EXCEEDED, "too many refused streams")

    def _trusts_forwarding(self, session: Session, voucher: bytes) -> bool:
        """Whether ``session``'s peer may forward sessions to us (transport streams).

        ``voucher`` is what followed the ``0x00`` of the OPEN token: empty, or
        a capability token of ours that the forwarder holds (an introducer
        that never opened a stream to us proves it this way; no use is
        counted).
        """
        policy = self.config.accept_forwarded
        if policy == "any":
            return True
        if policy == "never":
            return False
        if (
            session.dialer  # we chose to connect to it (a relay, an introducer we used)
            or any(r.node == session.peer for r in self._relays)
            or session.peer in self._authorized_peers  # it opened a stream with our capability
        ):
            return True
        if not voucher:
            return False
        try:
            token = Token.decode(voucher)
        except InvalidCapability:
            return False
        verdict = authorize(self._store, token, peer=session.peer, now=self._clock(), consume=False)
        return verdict.allowed

    async def _accept_transport(self, session: Session, sid: int, voucher: bytes) -> None:
        """A peer forwards a session to us over a stream: run it as an inbound session.

        Only from peers we have a reason to accept it from, and bounded per
        carrying session and node-wide, apart from the direct sessions.
        """
        if not self._trusts_forwarding(session, voucher):
            self._counters["forwarded_refused"] += 1
            session.reject(sid, ErrorCode.REFUSED)
            return
        carried = self._nested_by_carrier.get(session, 0)
        per_carrier = (
            self.config.max_forwarded_sessions
            if any(r.node == session.peer for r in self._relays)
            else self.config.max_forwarded_per_session
        )
        if carried >= per_carrier or self._nested_count >= self.config.max_forwarded_sessions:
            self._counters["forwarded_refused"] += 1
            session.reject(sid, ErrorCode.BUSY)
            return
        stream = session.accept(sid, None)
        if stream is None:
            return
        self._nested_count += 1
        self._nested_by_carrier[session] = carried + 1
        try:
            peer = session.peer.short()
            await self._admit(
                stream,
                f"forwarded by {peer}",
                f"a session forwarded by {peer}",
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
        return await session.open_stream(TRANSPORT_TOKEN + (voucher or b""))

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
        now = self._clock()
        self._remember_route(c)
        # Our own capability for the endpoint vouches for the transport streams
        # we open to it (the endpoint accepts them only from peers it has a
        # reason to: holding one of its capabilities is one).
        self._vouchers[c.node] = c.token.encode()
        self._vouchers.move_to_end(c.node)
        if len(self._vouchers) > _MAX_AUTHORIZED_PEERS:
            self._vouchers.popitem(last=False)
        via = self._introductions.uri.attenuate(ttl=ttl, peer=to, to=c.node, now=now)
        narrowed = c.attenuate(ttl=ttl, peer=to, now=now)
        direct = tuple(h for h in c.hints if not isinstance(h, ViaHint))
        relayed = tuple(h for h in c.hints if isinstance(h, ViaHint))
        return narrowed.with_hints((*direct, ViaHint(via), *relayed))

    def _remember_route(self, cap: Capability) -> None:
        direct = tuple(h for h in cap.hints if not isinstance(h, ViaHint))
        if direct:
            self._routes[cap.node] = direct

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
            cap = root.attenuate(ttl=ttl, uses=uses, peer=peer, label=label, now=self._clock())
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

    async def _keep_relay(self, relay: Capability) -> None:
        """Stay registered with ``relay``: reconnect with backoff and jitter."""
        first, largest = self.config.relay_backoff
        delay = first
        key = relay.redacted()
        while not self._closed:
            self._set_relay_status(key, "connecting")
            try:
                stream = await forward_register(self, relay)
            except (CapsockError, OSError, TimeoutError, anyio.BrokenResourceError) as exc:
                if isinstance(exc, CapabilityRejected) and exc.code == ErrorCode.REFUSED:
                    # The capability is dead (revoked, expired, forged): retrying
                    # cannot help.  BUSY and SHUTTING_DOWN are worth a retry.
                    self._relay_refusals[key] = exc
                    self._set_relay_status(key, f"refused: {exc}")
                    log.warning("relay %s: %s; not retrying", relay.node.short(), str(exc))
                    return
                self._set_relay_status(key, f"failed: {exc}")
                log.warning("relay %s: %s; retrying in %.1f s", relay.node.short(), str(exc), delay)
            else:
                self._set_relay_status(key, "registered")
                delay = first
                log.info("registered with relay %s", relay.node.short())
                try:
                    async with stream:
                        while True:
                            await stream.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError, CapsockError):
                    self._set_relay_status(key, "lost")
                    if self._closed:  # our own shutdown closed the session
                        return
                    log.warning("lost the relay %s; reconnecting", relay.node.short())
            await anyio.sleep(delay * (0.5 + secrets.randbelow(1000) / 1000))
            delay = min(delay * 2, largest)

    def _set_relay_status(self, key: str, status: str) -> None:
        self.relay_status[key] = status
        self._relay_changed.set()
        self._relay_changed = anyio.Event()

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
            delay = at - self._clock()
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
                stream._abort(ErrorCode.REFUSED, "its capability was revoked")

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
        return stream

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
        if len(path) >= _MAX_VIA_DEPTH:
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
            stream = await anyio.connect_tcp(hint.host, hint.port)
            sock = stream.extra(SocketAttribute.raw_socket)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return stream
        if isinstance(hint, UnixHint):
            return await anyio.connect_unix(hint.path)
        if hint.capability.node == node:
            raise Unreachable("a forwarding route through the endpoint itself is useless")
        return await open_via(self, hint.capability, node)


_DIALING: contextvars.ContextVar[frozenset[NodeId]] = contextvars.ContextVar(
    "capsock_dialing", default=frozenset()
)
"""The nodes this task is dialing right now (a via route dials its forwarder first)."""
_MAX_VIA_DEPTH = 4
_MAX_AUTHORIZED_PEERS = 4096


def _open_spare() -> int | None:
    try:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None


def _describe_peer(addr: object) -> str:
    if addr is None:
        return "unknown"
    if isinstance(addr, tuple):
        return f"tcp:{addr[0]}:{addr[1]}"
    return f"unix:{addr or '?'}"


class _HalfOpen:
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
            self.session.abort()


class _LimitedLog:
    """At most ``per_window`` lines per ``window`` seconds; the rest are counted
    and the count is reported with the next line that gets through."""

    def __init__(self, logger: logging.Logger, *, per_window: int, window: float) -> None:
        self._log = logger
        self._per_window = per_window
        self._window = window
        self._start = -1e9
        self._lines = 0
        self._suppressed = 0

    def info(self, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._start >= self._window:
            self._start, self._lines = now, 0
        if self._lines >= self._per_window:
            self._suppressed += 1
            return
        self._lines += 1
        if self._suppressed:
            msg += " (%d similar lines suppressed)"
            args = (*args, self._suppressed)
            self._suppressed = 0
        self._log.info(msg, *args)


class Listener(anyio.abc.Listener[Stream]):
    """Accepts the streams opened with one root capability (``listener.uri``)."""

    def __init__(self, node: Node, uri: Capability, backlog: int) -> None:
        self._node = node
        self._uri = uri
        self._send, self._recv = anyio.create_memory_object_stream[Stream](backlog)
        self._backlog = backlog
        self._closed = False
        self._retired = False
        node._all_listeners.add(self)
        self._uses: tuple[bytes, int] | None = None  # (counter key, limit) of its own cap
        self._tags: tuple[bytes, ...] = ()  # chain tags of its own capability
        self._temporary = False  # its root is forgotten when it closes

    @property
    def uri(self) -> Capability:
        """The capability to hand out (``str()`` gives the ``capsock://`` URI)."""
        return self._uri

    def __repr__(self) -> str:
        return f"<capsock.Listener {self._uri.redacted()}>"

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        return {CapsockAttribute.capability: lambda: self._uri}

    def _retire(self) -> None:
        """Accept no new streams; queued ones stay acceptable, then accept() ends."""
        if self._retired:
            return
        self._retired = True
        if self._node._listeners.get(self._uri.token.root_id) is self:
            del self._node._listeners[self._uri.token.root_id]
        self._send.close()

    def _check_used_up(self) -> None:
        if self._uses is not None and not self._retired:
            key, limit = self._uses
            if self._node._store.uses(key) >= limit:
                log.info("temporary listener %s is used up", self._uri.redacted())
                self._retire()

    def _full(self) -> bool:
        return self._send.statistics().current_buffer_used >= self._backlog

    def _deliver(self, stream: Stream) -> None:
        try:
            self._send.send_nowait(stream)
        except (anyio.WouldBlock, anyio.ClosedResourceError, anyio.BrokenResourceError):
            self._node._tg.start_soon(stream.aclose) if self._node._tg else None

    async def accept(self) -> Stream:
        """Wait for the next stream opened with this listener's capability.

        Raises:
            anyio.ClosedResourceError: the listener was closed.
        """
        try:
            return await self._recv.receive()
        except anyio.EndOfStream:
            raise anyio.ClosedResourceError from None

    async def serve(
        self,
        handler: Callable[[Stream], Any],
        task_group: anyio.abc.TaskGroup | None = None,
    ) -> None:
        """Run ``handler(stream)`` in a new task for every accepted stream, until closed.

        Each stream is closed when its handler returns.  An exception from one
        handler is logged (``capsock.node`` logger) and does not stop the others.
        """

        async def run(stream: Stream) -> None:
            # One misbehaving peer or handler must not stop the listener: stream
            # errors are expected (peers vanish) and only logged; anything else
            # is logged with its traceback.
            try:
                async with stream:
                    await handler(stream)
            except (
                anyio.BrokenResourceError,
                anyio.ClosedResourceError,
                anyio.EndOfStream,
                CapsockError,
            ) as exc:
                log.info("stream from %s ended: %s", stream.peer.short(), str(exc))
            except Exception:
                log.exception("stream handler failed; the listener keeps serving")

        async with anyio.create_task_group() as own:
            tg = task_group or own
            while True:
                try:
                    stream = await self.accept()
                except anyio.ClosedResourceError:
                    return
                tg.start_soon(run, stream)

    async def aclose(self) -> None:
        """Stop accepting: new opens are refused; queued streams are closed."""
        if self._closed:
            return
        self._closed = True
        self._retire()
        self._node._all_listeners.discard(self)
        if self._temporary:
            node, root_id = self._node, self._uri.token.root_id
            used_up = self._uses is not None and node._store.uses(self._uses[0]) >= self._uses[1]
            expired = any(
                isinstance(c, Expires) and c.at <= node._clock() for c in self._uri.caveats
            )
            why = "used up" if used_up else "expired" if expired else "temporary listener closed"
            node._retired_roots[root_id] = why
            if len(node._retired_roots) > _MAX_AUTHORIZED_PEERS:
                node._retired_roots.popitem(last=False)
            node._store.remove_root(root_id)
        while True:
            try:
                stream = self._recv.receive_nowait()
            except (anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
                break
            await stream.aclose()
        self._recv.close()
