"""Node internals, part 7: direct paths -- hole punching for relayed sessions.

When a node reached a peer through a relay (a ``via`` route) and the relay said
the peer coordinates direct paths too, the node opens one *coordination
stream* on that end-to-end session (the reserved OPEN token ``0x01``,
protocol 10.9), and the two exchange candidates, measure the round trip,
SYNC, and punch from their shared ports (:mod:`capsock.core.direct`,
:mod:`capsock.net.punch`).  The connection that comes up is authenticated by a
fresh Noise IK handshake (roles from the tie-break, not from who dialled)
whose peer key must be the relayed session's; it then becomes the peer's
session in the pool, so *new* streams take it, while streams already open stay
on the relayed session.  Moving those is :func:`switch_open_streams` (the hook
where the path switch will be called).

Nothing here ever delays :meth:`capsock.Node.connect`: a round runs in the
node's task group after the first stream went through the relay.  Rounds are
bounded per peer (:class:`capsock.core.direct.PunchBudget`, on both sides), and
only an authenticated peer that opened a stream with one of our capabilities
can make this node punch, and only to the candidates it sent in that session.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import struct
from collections.abc import Coroutine
from typing import Any

import anyio
import anyio.abc
from anyio.abc import SocketAttribute

from ..core import direct
from ..core.handshake import HandshakeResult
from ..errors import CapsockError, ErrorCode, PeerAuthenticationError
from ..keys import NodeId
from ..net import punch
from ..net.session import Session, accept_handshake, dial_handshake
from ..net.stream import Stream
from ._state import NodeState

log = logging.getLogger("capsock.node")

DIRECT_TOKEN = b"\x01"
"""The OPEN token of a coordination stream (protocol 10.9; never a capability token)."""
COORDINATION_TIMEOUT = 10.0
"""Seconds the message exchange before the punch may take (candidates, ping, SYNC)."""
PUNCH_ATTEMPTS = direct.MAX_ATTEMPT
"""Attempts per round (each ``punch.ATTEMPT_TIMEOUT`` long)."""
MAX_PATH_CONNECTIONS = 8
"""Connections a round takes in (punched or accepted on the shared port) at most."""
MAX_ROUNDS_AT_ONCE = 8
"""Rounds this node runs at once, with all peers together: the per-peer budget
does not stop many peers (or one holder with many keys) from each asking for a
round, and each round sends SYNs and holds a listener; past it, peers stay relayed."""


def switch_open_streams(relayed: Session, direct_session: Session) -> None:
    """The one place where streams already open on ``relayed`` will move to ``direct_session``.

    Called once a direct session to the same peer is pooled.  Today it does
    nothing: open streams finish on the relayed session, new ones take the
    direct one.  The path switch (``_path_switch.py``, docs/direct-paths.md
    section 7) plugs in here.
    """
    del relayed, direct_session


class _Stay(Exception):
    """A round ends without a direct path; the message says why (for the log)."""


async def _send(stream: Stream, msg: direct.DirectMessage) -> None:
    body = direct.encode(msg)
    await stream.send(struct.pack(">H", len(body)) + body)


async def _recv(stream: Stream, buf: bytearray) -> direct.DirectMessage:
    async def exact(n: int) -> bytes:
        while len(buf) < n:
            buf.extend(await stream.receive())
            if len(buf) > 2 + direct.MAX_MESSAGE:
                break
        out = bytes(buf[:n])
        del buf[:n]
        return out

    (n,) = struct.unpack(">H", await exact(2))
    if n > direct.MAX_MESSAGE:
        raise direct.DirectMessageError(f"coordination message larger than {direct.MAX_MESSAGE}")
    return direct.decode(await exact(n))


async def _expect(stream: Stream, buf: bytearray, kind: type[Any]) -> Any:
    msg = await _recv(stream, buf)
    if not isinstance(msg, kind):
        raise direct.DirectMessageError(
            f"expected {kind.__name__}, got {type(msg).__name__} (out of order)"
        )
    return msg


def _usable_local(port: int) -> list[direct.Address]:
    """Interface addresses for candidates: never loopback, link-local, or multicast."""
    out = []
    for host, p in punch.local_candidates(port):
        ip = ipaddress.ip_address(host)
        if ip.is_link_local or ip.is_loopback or ip.is_multicast or ip.is_unspecified:
            continue
        out.append(direct.Address(str(ip), p))
    return out[: direct.MAX_CANDIDATES]


class DirectPaths(NodeState):
    """Coordinate, punch and authenticate direct paths (see the module docstring)."""

    # ------------------------------------------------------------ hooks

    def _on_open(
        self, session: Session, sid: int, token_bytes: bytes
    ) -> Coroutine[Any, Any, None] | None:
        if token_bytes == DIRECT_TOKEN:
            self._accept_coordination(session, sid)
            return None
        return super()._on_open(session, sid, token_bytes)

    def _direct_after_connect(self, session: Session) -> None:
        """A stream to ``session``'s peer was accepted: start a round if it is worth one."""
        if not self.config.direct_paths or self._tg is None or self._closed:
            return
        peer = session.peer
        info = self._route_info.get(peer)
        if info is None or not info.peer_direct:
            return  # the peer did not say (through its relay) it coordinates: send nothing
        if not session.dialer or not session.route.startswith("via "):
            return
        if self._sessions.get(peer) is not session or peer in self._punching:
            return  # already direct (or another path), or a round is running
        if len(self._punching) >= MAX_ROUNDS_AT_ONCE:
            return  # busy with other peers: stay relayed (tried again on a later connect)
        if not self._punch_budget.may_start(peer, anyio.current_time()):
            return
        self._punching.add(peer)
        observed = (info.observed,) if info.observed is not None else ()
        self._tg.start_soon(self._open_coordination, session, observed)

    # ------------------------------------------------------------ both sides

    def _accept_coordination(self, session: Session, sid: int) -> None:
        peer = session.peer
        why = None
        if not self.config.direct_paths or self._tg is None:
            why = "direct paths are off"
        elif not session.route.startswith("forwarded by "):
            why = "not a relayed session"
        elif peer not in self._authorized_peers:
            why = "the peer holds no capability of this node"
        elif self._sessions.get(peer) is not session or peer in self._punching:
            why = "a direct path exists or a round is running"
        elif len(self._punching) >= MAX_ROUNDS_AT_ONCE:
            why = f"{MAX_ROUNDS_AT_ONCE} rounds with other peers are running"
        elif not self._punch_budget.may_start(peer, anyio.current_time()):
            why = "too many rounds with this peer (backing off)"
        if why is not None:
            log.debug("refused a direct-path coordination from %s: %s", peer.short(), why)
            session.reject(sid, ErrorCode.REFUSED)
            return
        stream = session.accept(sid, None)
        if stream is None:
            return
        self._punching.add(peer)
        observed = tuple(self._observed.values())
        self._tg_start(lambda: self._answer_coordination(session, stream, observed))

    async def _open_coordination(
        self, session: Session, observed: tuple[direct.Address, ...]
    ) -> None:
        try:
            try:
                ctl = await session.open_stream(DIRECT_TOKEN)
            except (CapsockError, TimeoutError, anyio.BrokenResourceError) as exc:
                self._staying_relayed(session.peer, f"the peer took no coordination ({exc})")
                return
            await self._round(session, ctl, observed)
        finally:
            self._punching.discard(session.peer)
        running = self._tg is not None and not self._closed
        if running and self._sessions.get(session.peer) is session and session.is_usable:
            # Still relayed: try again once the backoff allows (and only then).
            self._tg_start(lambda: self._retry_later(session))

    async def _retry_later(self, session: Session) -> None:
        await anyio.sleep(self._punch_budget.retry_in(session.peer, anyio.current_time()))
        self._direct_after_connect(session)

    async def _answer_coordination(
        self, session: Session, ctl: Stream, observed: tuple[direct.Address, ...]
    ) -> None:
        try:
            await self._round(session, ctl, observed)
        finally:
            self._punching.discard(session.peer)

    async def _round(
        self, session: Session, ctl: Stream, observed: tuple[direct.Address, ...]
    ) -> None:
        """One round: exchange, SYNC, punch, path handshake; never raises."""
        peer = session.peer
        initiator = direct.is_noise_initiator(self.id.raw, peer.raw)
        port = self._shared_port
        attempted = False
        try:
            async with ctl:
                if port is None:
                    raise _Stay("this node has no shared port to punch from")
                local = await anyio.to_thread.run_sync(_usable_local, port)
                seen = tuple(dict.fromkeys(observed))[: direct.MAX_CANDIDATES]
                mine = direct.Candidates(seen, tuple(local))
                buf = bytearray()
                with anyio.fail_after(COORDINATION_TIMEOUT):
                    await _send(ctl, mine)
                    theirs: direct.Candidates = await _expect(ctl, buf, direct.Candidates)
                    if initiator:
                        meter = direct.RttMeter(os.urandom(8))
                        await _send(ctl, meter.ping(anyio.current_time()))
                        pong = await _expect(ctl, buf, direct.Pong)
                        rtt = meter.pong(pong, anyio.current_time())
                        if rtt is None:
                            raise direct.DirectMessageError("a pong that answers no ping")
                        await _send(ctl, direct.Sync(1))
                        at = anyio.current_time() + direct.sync_delay(rtt)
                    else:
                        ping = await _expect(ctl, buf, direct.Ping)
                        await _send(ctl, direct.answer(ping))
                        sync = await _expect(ctl, buf, direct.Sync)
                        if sync.attempt != 1:
                            raise direct.DirectMessageError("one SYNC per round")
                        at = anyio.current_time()
            targets = theirs.dial_list()
            if not targets:
                raise _Stay("the peer sent no candidates")
            self._counters["punch_attempts"] += 1
            attempted = True
            new = await self._connect_paths(port, targets, at, peer, initiator)
        except _Stay as exc:
            if attempted:
                self._counters["punch_failures"] += 1
            self._staying_relayed(peer, str(exc))
            return
        except (
            CapsockError,
            OSError,
            TimeoutError,
            anyio.BrokenResourceError,
            anyio.ClosedResourceError,
            anyio.EndOfStream,
        ) as exc:
            self._counters["punch_failures"] += 1
            self._staying_relayed(peer, str(exc) or type(exc).__name__)
            return
        self._counters["punch_successes"] += 1
        self._punch_budget.succeeded(peer)
        log.info("direct path to %s established (%s)", peer.short(), new.route)
        switch_open_streams(session, new)

    async def _connect_paths(
        self, port: int, targets: list[tuple[str, int]], at: float, peer: NodeId, initiator: bool
    ) -> Session:
        """Punch, accept on the shared port meanwhile, authenticate; keep exactly one path.

        Connections come from the punch (a simultaneous open, or an ordinary
        connect when the peer is reachable) and from a listener on the shared
        port for the round (the peer's SYN may arrive first).  The Noise
        initiator runs the handshake on each and keeps the first that succeeds
        (its session speaks on it at once, and it closes the others); the
        responder answers on each and keeps the one on which the initiator's
        first record arrives.  Both therefore keep the same connection.
        """
        conns, incoming = anyio.create_memory_object_stream[anyio.abc.SocketStream](
            MAX_PATH_CONNECTIONS
        )
        failure: list[OSError] = []
        won: list[tuple[anyio.abc.SocketStream, HandshakeResult, bytes]] = []
        deadline = at + PUNCH_ATTEMPTS * punch.ATTEMPT_TIMEOUT + self.config.handshake_timeout

        async def offer(conn: anyio.abc.SocketStream) -> None:
            try:
                conns.send_nowait(conn)
            except (anyio.WouldBlock, anyio.ClosedResourceError, anyio.BrokenResourceError):
                await anyio.aclose_forcefully(conn)

        async def listen() -> None:
            try:
                listener = await punch.shared_listener(port)
            except OSError:
                return  # the punch alone, then
            async with listener:
                for _ in range(MAX_PATH_CONNECTIONS):
                    await offer(await listener.accept())

        running = [0]  # handshakes in progress

        async def dial(scope: anyio.CancelScope) -> None:
            try:
                conn = await punch.simultaneous_open(port, targets, at=at, attempts=PUNCH_ATTEMPTS)
            except OSError as exc:  # PunchFailed among them
                failure.append(exc)
                # The peer's last SYN may still reach the listener: one more
                # attempt's time, then the round ends unless a handshake runs.
                await anyio.sleep(punch.ATTEMPT_TIMEOUT)
                if not running[0]:
                    scope.cancel()
                return
            await offer(conn)

        async def attempt(conn: anyio.abc.SocketStream, scope: anyio.CancelScope) -> None:
            running[0] += 1
            try:
                await shake(conn, scope)
            finally:
                running[0] -= 1

        async def shake(conn: anyio.abc.SocketStream, scope: anyio.CancelScope) -> None:
            try:
                with anyio.fail_after(self.config.handshake_timeout):
                    if initiator:
                        result, leftover = await dial_handshake(conn, self._key, peer)
                    else:
                        result, leftover = await accept_handshake(conn, self._key)
                    if result.peer != peer:  # node ids are public: no timing to hide
                        raise PeerAuthenticationError("the punched connection has another key")
                    if not initiator:
                        # The initiator's first record says which connection it kept.
                        leftover += await conn.receive()
            except (
                CapsockError,
                OSError,
                TimeoutError,
                anyio.BrokenResourceError,
                anyio.EndOfStream,
            ):
                await anyio.aclose_forcefully(conn)
                return
            except BaseException:
                await anyio.aclose_forcefully(conn)
                raise
            if won:
                await anyio.aclose_forcefully(conn)
                return
            won.append((conn, result, leftover))
            scope.cancel()

        try:
            with conns, anyio.move_on_after(max(0.0, deadline - anyio.current_time())):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(listen)
                    tg.start_soon(dial, tg.cancel_scope)
                    async for conn in incoming:
                        tg.start_soon(attempt, conn, tg.cancel_scope)
        except BaseException:  # cancelled (the node closes): the winner is nobody's
            for conn, _, _ in won:
                await anyio.aclose_forcefully(conn)
            raise
        finally:  # connections offered but never taken: close them, not the GC
            while True:
                try:
                    left = incoming.receive_nowait()
                except (anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
                    break
                await anyio.aclose_forcefully(left)
            incoming.close()
        if not won:
            if failure:
                raise failure[0]
            raise _Stay("no punched connection passed the path handshake")
        conn, result, leftover = won[0]
        remote = conn.extra(SocketAttribute.remote_address)
        where = f"{remote[0]}:{remote[1]}" if isinstance(remote, tuple) else str(remote)
        if self._tg is None or self._closed:
            await anyio.aclose_forcefully(conn)
            raise _Stay("the node is closing")
        new = self._new_session(conn, result, leftover, f"direct tcp:{where} (punched)")
        try:
            with anyio.fail_after(self.config.handshake_timeout):
                self._tg.start_soon(self._run_direct, new)
                await new.ready.wait()
                await new.confirmed.wait()  # at once: the responder read the first record
        except BaseException:
            new.close_now()
            raise
        if not new.is_usable:
            raise _Stay("the direct session ended at once")
        self._sessions[peer] = new  # new streams to the peer take the direct path
        return new

    async def _run_direct(self, new: Session) -> None:
        """Run a punched session; when it ends, the relayed one serves new streams again."""
        self._session_count += 1
        self._counted.add(new)
        relayed = self._sessions.get(new.peer)
        try:
            await new.run()
        finally:
            self._pool_remove(new)
            if relayed is not None and relayed.is_usable and new.peer not in self._sessions:
                self._sessions[new.peer] = relayed
                log.info("back to the relay for %s: the direct path ended", new.peer.short())

    def _staying_relayed(self, peer: NodeId, why: str) -> None:
        delay = self._punch_budget.failed(peer, anyio.current_time())
        log.info(
            "staying relayed: %s: %s (next try in %.0f s at the earliest)", peer.short(), why, delay
        )
