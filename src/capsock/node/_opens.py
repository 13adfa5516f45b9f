"""Node internals, part 4: the OPEN decisions.

Every inbound OPEN is decided here: a transport stream (a session forwarded
to this node, :mod:`capsock.node.forwarding`) or a capability checked with
:func:`capsock.store.authorize`, the same work for every token; a full
listener gets ``backlog_wait`` seconds, and refusals are charged to their
source (``refused_open_rate``).
"""

from __future__ import annotations

import logging
from collections.abc import Coroutine
from typing import Any

import anyio
import anyio.abc

from ..errors import (
    ErrorCode,
    InvalidCapability,
)
from ..net.session import Session
from ..store import Verdict, authorize
from ..uri import (
    Capability,
    Token,
)
from ._admission import Admission
from ._listener import Listener
from ._state import MAX_AUTHORIZED_PEERS
from .forwarding import transport_voucher

log = logging.getLogger("capsock.node")


class OpenDecisions(Admission):
    """Accept or refuse each inbound OPEN (see the module docstring)."""

    def _on_open(
        self, session: Session, sid: int, token_bytes: bytes
    ) -> Coroutine[Any, Any, None] | None:
        """Answer an OPEN at once; return a coroutine when it must wait (full backlog)."""
        if session in self._cut:  # ending (GOAWAY sent): no check, no answer
            return None
        voucher = transport_voucher(token_bytes)
        if voucher is not None:
            return self._accept_transport(session, sid, voucher)
        self._counters["opens_received"] += 1
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
                self._store, token, peer=session.peer, now=self._wall_clock(), consume=ready
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
        verdict = authorize(self._store, token, peer=session.peer, now=self._wall_clock())
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
            if self._stranger_carrier:
                self._unstrange_nested(session)
            self._authorized_peers[session.peer] = None
            self._authorized_peers.move_to_end(session.peer)
            if len(self._authorized_peers) > MAX_AUTHORIZED_PEERS:
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
        verdict = authorize(
            self._store, token, peer=session.peer, now=self._wall_clock(), consume=False
        )
        return verdict.allowed

    async def _accept_transport(self, session: Session, sid: int, voucher: bytes) -> None:
        """A peer forwards a session to us over a stream: run it as an inbound session.

        Only from peers we have a reason to accept it from, and bounded per
        carrying session and node-wide, apart from the direct sessions.
        """
        if session in self._cut:
            return
        if not self._trusts_forwarding(session, voucher):
            self._counters["forwarded_refused"] += 1
            session.reject(sid, ErrorCode.REFUSED)
            self._charge_refusal(session)  # a voucher is a token to check: same budget
            return
        carried = self._nested_by_carrier.get(session, 0)
        via_relay = any(r.node == session.peer for r in self._relays)
        per_carrier = (
            self.config.max_forwarded_sessions
            if via_relay
            else self.config.max_forwarded_per_session
        )
        # When full, a forwarded session that never presented a capability
        # makes room, as a direct stranger does, so squatters cannot lock out
        # the many clients one relay carries.  A peer that fills its own share
        # gets BUSY: its sessions are its own to end.
        if carried >= per_carrier:
            room = via_relay and self._shed_nested_stranger(session, any_carrier=False)
        elif self._nested_count >= self.config.max_forwarded_sessions:
            room = self._shed_nested_stranger(session, any_carrier=True)
        else:
            room = True
        if not room:
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
