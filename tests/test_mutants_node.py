"""Tests that kill the mutants of ``scripts/mutation node`` (docs/testing.md).

The node's OPEN decision and what it rests on: the admission tables
(capsock.node._budgets, sans-IO, so tested alone with time as a number), the
listener's retirement, and the node's ``listen`` / ``mint`` / ``revoke``.
Each test names, in its docstring, the mutants it was written against
(mutmut's numbers of the run at ``dbd0447``).  Node-level tests run on
asyncio and trio over loopback.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest

import capsock
from capsock import NodeConfig
from capsock.errors import ErrorCode, HandshakeError, LocalUsageError
from capsock.keys import KeyPair, NodeId
from capsock.node import _budgets as _admission
from capsock.node._budgets import (
    HalfOpenTable,
    ReplayCache,
    SourceBuckets,
    descriptor_budget,
    source_of,
)
from capsock.node._state import MAX_AUTHORIZED_PEERS, HalfOpen
from capsock.store import Verdict
from capsock.uri import Capability, Label, Peer, Token

pytestmark = pytest.mark.anyio

# ------------------------------------------------------------------ ReplayCache


def test_a_replay_entry_ends_exactly_at_its_window() -> None:
    """ReplayCache._expire 5 (``until > now`` made ``>=``): a key added at 0
    with a window of 10 is seen until just before 10, not at 10."""
    cache = ReplayCache(capacity=4, window=10.0)
    cache.add(b"k", 0.0)
    assert cache.seen(b"k", 9.999)
    assert not cache.seen(b"k", 10.0)
    assert len(cache) == 0


def test_a_replay_cache_of_one_keeps_the_newest_key() -> None:
    """ReplayCache.add 2 (``capacity <= 0`` made ``<= 1``): a capacity of 1
    still remembers one key (the newest)."""
    cache = ReplayCache(capacity=1, window=10.0)
    cache.add(b"a", 0.0)
    assert cache.seen(b"a", 1.0)
    cache.add(b"b", 0.0)
    assert cache.seen(b"b", 1.0) and not cache.seen(b"a", 1.0)
    assert len(cache) == 1


def test_a_key_added_again_moves_to_the_end() -> None:
    """Re-adding a key refreshes its place: the least recently added goes first."""
    cache = ReplayCache(capacity=2, window=10.0)
    cache.add(b"a", 0.0)
    cache.add(b"b", 0.0)
    cache.add(b"a", 0.0)
    cache.add(b"c", 0.0)
    assert cache.seen(b"a", 1.0) and cache.seen(b"c", 1.0) and not cache.seen(b"b", 1.0)


# ------------------------------------------------------------------ SourceBuckets


def test_a_bucket_refills_from_the_time_since_its_last_take() -> None:
    """SourceBuckets.take 13 (``now - at`` made ``now + at``) and 25 (the wait
    ``1 - tokens`` made ``1 + tokens``): the refill counts the time since the
    last take, and the wait is the time until one whole token."""
    buckets = SourceBuckets(rate=4.0, burst=1.0)
    assert buckets.take("a", 100.0) == 0.0
    assert buckets.take("a", 100.125) == 0.125  # half a token there
    assert buckets.take("a", 100.25) == 0.0
    assert buckets.take("a", 100.25) == 0.25


def test_a_bucket_with_no_rate_never_refills() -> None:
    """SourceBuckets.take 23, 27, 29, 30 (rate 0: the infinite wait made a
    division by zero or a bad ``float``) and 28 (``rate > 0`` made ``> 1``: a
    rate under one a second would never refill)."""
    stopped = SourceBuckets(rate=0.0, burst=1.0)
    assert stopped.take("a", 0.0) == 0.0
    assert stopped.take("a", 1e6) == float("inf")
    slow = SourceBuckets(rate=0.5, burst=1.0)
    assert slow.take("a", 0.0) == 0.0
    assert slow.take("a", 0.0) == pytest.approx(2.0)
    assert slow.take("a", 2.0) == 0.0


def test_the_least_recently_seen_source_is_forgotten_first() -> None:
    """SourceBuckets._forget 3 (``popitem(last=False)`` made ``last=True``):
    past ``max_sources`` the oldest source goes, never the one just seen."""
    buckets = SourceBuckets(rate=1.0, burst=1.0, max_sources=2)
    buckets.take("a", 0.0)
    buckets.take("b", 0.0)
    buckets.take("a", 0.0)  # a is now the most recent (and drained)
    buckets.take("c", 0.0)  # b goes
    assert set(buckets._buckets) == {"a", "c"}
    assert buckets.take("a", 0.0) > 0.0  # a kept its empty bucket
    assert buckets.take("b", 0.0) == 0.0  # b starts full again


def test_the_default_bound_is_65536_sources() -> None:
    """SourceBuckets.__init__ 1 (the default ``max_sources`` made 65537)."""
    buckets = SourceBuckets(rate=1.0, burst=1.0)
    assert buckets.max_sources == 65536
    for i in range(65537):
        buckets.take(i, 0.0)
    assert len(buckets._buckets) == 65536 and 0 not in buckets._buckets


# ------------------------------------------------------------------ HalfOpenTable


def test_a_lone_entry_is_the_default_victim_and_leaves_no_source_behind() -> None:
    """HalfOpenTable.pop_victim 1 (the default ``min_count`` made 2) and 17
    (an emptied source kept: one empty dict per source ever seen)."""
    table: HalfOpenTable[str] = HalfOpenTable(capacity=4)
    table.add("s", 1, "x")
    assert table.pop_victim() == "x"
    assert len(table) == 0 and table._by_source == {}
    assert table.pop_victim() is None


def test_a_source_holding_exactly_min_count_entries_is_shed_from() -> None:
    """HalfOpenTable.pop_victim 10 (``len < min_count`` made ``<=``)."""
    table: HalfOpenTable[str] = HalfOpenTable(capacity=4)
    table.add("s", 1, "old")
    table.add("s", 2, "new")
    assert table.pop_victim(min_count=2) == "old"
    assert table.pop_victim(min_count=2) is None  # one left: a lone newcomer stays
    assert len(table) == 1


def test_remove_takes_out_exactly_that_entry_once() -> None:
    """HalfOpenTable.remove 1-5, 8-10, 12: the entry of that source and key
    only, counted once, an unknown source or key changes nothing, and an
    emptied source leaves no entry."""
    table: HalfOpenTable[str] = HalfOpenTable(capacity=8)
    table.add("a", 1, "a1")
    table.add("a", 2, "a2")
    table.add("b", 3, "b1")
    table.remove("nobody", 1)  # an unknown source
    table.remove("a", 3)  # a key of another source
    assert len(table) == 3
    table.remove("a", 1)
    assert len(table) == 2 and list(table._by_source["a"]) == [2]
    table.remove("a", 1)  # again: nothing
    assert len(table) == 2
    table.remove("b", 3)
    assert len(table) == 1 and set(table._by_source) == {"a"}
    table.remove("a", 2)
    assert len(table) == 0 and table._by_source == {}


# ------------------------------------------------------------------ source_of


@pytest.mark.parametrize(
    ("address", "source"),
    [
        (("fe80::1%eth0", 1, 0, 2), "fe80::/64"),  # the zone id is not part of the address
        (("fe80::1%a%b", 1, 0, 2), "fe80::/64"),  # only up to the first %
        (("2001:db8::8000:0:0:1", 1, 0, 0), "2001:db8::/64"),  # bit 64 is outside the /64
        (("not an address", 1), "tcp:?"),
        (("", 1), "tcp:?"),
        ((), "unix"),
        ((7, 1), "unix"),
        (None, "unix"),
    ],
)
def test_each_kind_of_address_has_its_source(address: object, source: str) -> None:
    """source_of 5, 9, 11 (the zone id split wrong), 14, 15 (the unparseable
    source's name), 23 (a /65 instead of a /64)."""
    assert source_of(address) == source


# ------------------------------------------------------------------ descriptor_budget


@pytest.mark.parametrize(
    ("soft", "reserve", "budget"),
    [
        (10000, 64, 10000 - 100 - 1250),  # an eighth of the limit kept free
        (10007, 64, 10007 - 100 - 1250),  # an eighth, rounded down
        (10000, 2000, 10000 - 100 - 2000),  # the reserve, when larger
        (100, 0, 8),  # never fewer than 8
    ],
)
def test_the_descriptor_budget_is_the_limit_less_what_is_open_and_kept(
    soft: int, reserve: int, budget: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """descriptor_budget 3, 4 (the open descriptors or the reserve added
    instead of taken), 9, 10 (``soft // 8`` made ``/ 8``, ``// 9``), 15 (the
    floor of 8 made 9)."""
    monkeypatch.setattr(_admission, "_open_descriptors", lambda: 100)
    got = descriptor_budget(reserve, limits=lambda: (soft, soft * 2))
    assert got == budget and type(got) is int


# ------------------------------------------------------------------ node parts, fake sessions
#
# The OPEN decision and the admission bookkeeping are methods of the node
# that take a session and answer through it (``reject``, ``accept``, ``end``,
# ``close_now``).  A fake session records those calls, so each decision is
# checked exactly, in milliseconds, on a running node (both backends).


class FakeStream:
    def __init__(self) -> None:
        self.closed = False

    async def aclose(self) -> None:
        self.closed = True


class FakeSession:
    def __init__(self, peer: NodeId | None = None, *, dialer: bool = False) -> None:
        self.peer = peer or KeyPair.generate().node_id
        self.dialer = dialer
        self.is_usable = True
        self.calls: list[tuple[object, ...]] = []
        self.accepted: object = None  # what accept() returns

    def reject(self, sid: int, code: ErrorCode = ErrorCode.REFUSED) -> None:
        self.calls.append(("reject", sid, code))

    def accept(self, sid: int, capability: Capability | None) -> object:
        self.calls.append(("accept", sid, capability))
        return self.accepted

    def end(self, code: ErrorCode, reason: str) -> None:
        self.calls.append(("end", code, reason))

    def close_now(self) -> None:
        self.calls.append(("close_now",))

    async def aclose(self, grace: float = 0.0) -> None:
        pass

    def stats(self) -> dict[str, object]:
        return {}


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@asynccontextmanager
async def running(**config: Any) -> AsyncIterator[capsock.Node]:
    async with capsock.Node(config=NodeConfig(**config), wall_clock=Clock(1e9)) as node:
        try:
            yield node
        finally:
            node._sessions.clear()  # fakes are not closed with the node
            node._strangers.clear()


def _logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records]


async def test_screen_drops_replays_and_floods_with_their_own_counts_and_words(
    anyio_backend: str,
) -> None:
    """_Admission._screen 2, 6-14, 19-27: a replayed message 1 and one beyond
    its source's rate are dropped, each counted once per drop under its own
    counter and with its own reason; another source is not affected."""
    async with running(handshake_rate=(1.0, 2.0)) as node:
        node._screen(b"e" * 32, "s")
        node._replays.add(b"e" * 32, anyio.current_time())
        for n in (1, 2):
            with pytest.raises(HandshakeError) as info:
                node._screen(b"e" * 32, "s")
            assert str(info.value) == "a replayed first handshake message"
            assert node.stats()["handshakes_replayed"] == n
        node._screen(b"f" * 32, "s")  # the burst's second token
        for n in (1, 2):
            with pytest.raises(HandshakeError) as info:
                node._screen(bytes([n]) * 32, "s")
            assert str(info.value) == "too many handshakes from this source"
            assert node.stats()["handshakes_throttled"] == n
        node._screen(b"g" * 32, "other")  # its own bucket
        assert node.stats()["handshakes_replayed"] == 2


async def test_confirm_inbound_sheds_a_stranger_or_drops_the_newcomer_at_max_sessions(
    anyio_backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    """_confirm_inbound 3-10: at ``max_sessions`` the oldest stranger makes
    room (the newcomer is pooled); with no stranger the newcomer is dropped
    and the drop is logged with its peer."""
    caplog.set_level(logging.INFO, logger="capsock")
    async with running(max_sessions=1) as node:
        a, b, c = FakeSession(), FakeSession(), FakeSession()
        node._confirm_inbound(a)
        assert node.stats()["session_count"] == 1 and list(node._strangers) == [a]
        node._confirm_inbound(a)  # counted already: nothing changes
        assert node.stats()["session_count"] == 1
        node._confirm_inbound(b)
        assert a.calls == [("close_now",)] and b.calls == []
        assert node.stats()["session_count"] == 1 and list(node._strangers) == [b]
        assert node._sessions == {b.peer: b}
        node._strangers.clear()  # b opened a stream with a capability
        node._confirm_inbound(c)
        assert c.calls == [("close_now",)] and node.stats()["session_count"] == 1
        assert f"dropping session from {c.peer.short()}: max_sessions reached" in _logged(caplog)


async def test_shedding_takes_the_oldest_stranger_then_the_busiest_half_open(
    anyio_backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    """_shed_stranger and _shed_one (no selected test reached them): a
    source holding several half-open connections first, then the oldest
    stranger, then a lone half-open newcomer; each counted and logged."""
    caplog.set_level(logging.INFO, logger="capsock")
    async with running() as node:
        assert not node._shed_stranger() and not node._shed_one()
        s1, s2 = FakeSession(), FakeSession()
        node._confirm_inbound(s1)
        node._confirm_inbound(s2)
        h1, h2, h3 = (HalfOpen(anyio.CancelScope()) for _ in range(3))
        node._half_open.add("busy", 1, h1)
        node._half_open.add("busy", 2, h2)
        node._half_open.add("lone", 3, h3)
        shed = node.stats()["connections_shed"]
        assert node._shed_one() and h1.was_shed and not h2.was_shed
        node._half_open.remove("busy", 2)
        assert node._shed_one()  # the oldest stranger before the lone newcomer
        assert s1.calls == [("close_now",)] and s2.calls == [] and not h3.was_shed
        assert list(node._strangers) == [s2] and node.stats()["session_count"] == 1
        assert f"shed the idle session from {s1.peer.short()} to make room" in _logged(caplog)
        assert node._shed_stranger() and s2.calls == [("close_now",)]
        assert node._sessions == {} and node.stats()["session_count"] == 0
        assert node._shed_one() and h3.was_shed  # only the newcomer is left
        assert not node._shed_one()
        assert node.stats()["connections_shed"] == shed + 4


async def test_a_forwarded_stranger_is_shed_from_its_carrier_first(
    anyio_backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    """_shed_nested_stranger (no selected test reached it) and
    _confirm_forwarded 11: the oldest forwarded session that never presented
    a capability, of this carrier, else (``any_carrier``) of any; each carrier
    left with none is forgotten."""
    caplog.set_level(logging.INFO, logger="capsock")
    async with running() as node:
        mine, other = FakeSession(), FakeSession()
        m1, m2, o1 = FakeSession(), FakeSession(), FakeSession()
        node._confirm_forwarded(other, o1)
        node._confirm_forwarded(mine, m1)
        node._confirm_forwarded(mine, m2)
        assert node.stats()["session_count"] == 0  # not counted against max_sessions
        assert node._stranger_carrier == {o1: other, m1: mine, m2: mine}
        shed = node.stats()["connections_shed"]
        assert node._shed_nested_stranger(mine, any_carrier=False)
        assert m1.calls == [("close_now",)] and list(node._nested_strangers[mine]) == [m2]
        assert m1 not in node._stranger_carrier and m1.peer not in node._sessions
        assert f"shed the idle forwarded session from {m1.peer.short()} to make room" in (
            _logged(caplog)
        )
        assert node._shed_nested_stranger(mine, any_carrier=True)  # its own first
        assert m2.calls == [("close_now",)] and o1.calls == []
        assert mine not in node._nested_strangers
        assert not node._shed_nested_stranger(mine, any_carrier=False)
        assert node._shed_nested_stranger(mine, any_carrier=True)  # another carrier's
        assert o1.calls == [("close_now",)] and node._nested_strangers == {}
        assert not node._shed_nested_stranger(mine, any_carrier=True)
        assert node.stats()["connections_shed"] == shed + 3
        x = FakeSession()
        node._confirm_forwarded(other, x)
        node._unstrange_nested(x)  # it presented a capability
        assert node._nested_strangers == {} and node._stranger_carrier == {}


async def test_refusals_are_charged_to_the_source_and_cut_the_session_once(
    anyio_backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    """_charge_refusal 1-6, 12-29: refusals draw on the bucket of the
    session's admission source (else of its peer); the refusal that finds it
    empty ends the session once with LIMIT_EXCEEDED, counted and logged; a
    cut session is charged no more."""
    caplog.set_level(logging.INFO, logger="capsock")
    async with running(refused_open_rate=(0.001, 2.0)) as node:
        first, same_source = FakeSession(), FakeSession()
        node._sources[first] = node._sources[same_source] = "192.0.2.1"
        node._charge_refusal(first)
        node._charge_refusal(first)
        assert first.calls == [] and first not in node._cut
        node._charge_refusal(first)
        cut = ("end", ErrorCode.LIMIT_EXCEEDED, "too many refused streams")
        assert first.calls == [cut] and first in node._cut
        assert node.stats()["sessions_cut_for_refusals"] == 1
        assert (
            f"ending the session from {first.peer.short()}: "
            "too many refused streams from its source" in _logged(caplog)
        )
        node._charge_refusal(first)  # cut already
        assert first.calls == [cut] and node.stats()["sessions_cut_for_refusals"] == 1
        node._charge_refusal(same_source)  # the same source's bucket is empty
        assert same_source.calls == [cut] and node.stats()["sessions_cut_for_refusals"] == 2
        peer = KeyPair.generate().node_id
        one, two = FakeSession(peer), FakeSession(peer)  # no source: charged to the peer
        for session in (one, one, two):
            node._charge_refusal(session)
        assert one.calls == [] and two.calls == [cut]
        stranger = FakeSession()
        node._charge_refusal(stranger)
        assert stranger.calls == []


async def _mint(node: capsock.Node, **caveats: Any) -> capsock.Listener:
    return await node.mint(**caveats) if caveats else await node.listen()


async def test_an_allowed_open_at_a_closed_listener_is_refused_as_closed(
    anyio_backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    """_answer_open 3, 4, 6-8, 19, 24, 35: an allowing verdict with no
    listener, or a retired one, is refused (REFUSED), counted, and logged as
    "listener closed"."""
    caplog.set_level(logging.INFO, logger="capsock")
    async with running() as node:
        listener = await node.listen()
        token = listener.uri.token
        for n, target in enumerate((None, listener), start=1):
            if target is not None:
                listener._retire()
            session = FakeSession()
            node._answer_open(session, 5, token, target, Verdict(None, tags=(token.tag,)))  # type: ignore[arg-type]
            assert session.calls == [("reject", 5, ErrorCode.REFUSED)]
            assert node.stats()["opens_refused"] == n and node.stats()["streams_accepted"] == 0
            assert f"refused a stream from {session.peer.short()}: listener closed" in (
                _logged(caplog)
            )


async def test_the_refusal_log_says_why_a_retired_root_is_unknown(
    anyio_backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    """_answer_open 9-18: an "unknown root" whose root was a temporary
    listener's is logged with why it retired; any other stays "unknown root"."""
    caplog.set_level(logging.INFO, logger="capsock")
    async with running() as node:
        gone = (await node.listen()).uri.token
        never = Token(bytes(16), (), bytes(32))
        node._retired_roots[gone.root_id] = "used up"
        for token, why in ((gone, "used up"), (never, "unknown root")):
            session = FakeSession()
            node._answer_open(session, 1, token, None, Verdict("unknown root"))  # type: ignore[arg-type]
            assert session.calls == [("reject", 1, ErrorCode.REFUSED)]
            assert f"refused a stream from {session.peer.short()}: {why}" in _logged(caplog)
        session = FakeSession()
        node._answer_open(session, 1, gone, None, Verdict("bad tag"))  # type: ignore[arg-type]
        assert f"refused a stream from {session.peer.short()}: bad tag" in _logged(caplog)


async def test_an_accepted_open_is_counted_delivered_and_its_peer_trusted(
    anyio_backend: str,
) -> None:
    """_answer_open 42, 51, 55, 56, 59, 60, 63, 66-68: the stream is accepted
    with the capability opened (this node's id, the token), counted, handed to
    the listener with its chain tags; its session is no stranger any more
    (direct or forwarded), and its peer joins the bounded, most-recent-last
    table of authorized peers."""
    async with running() as node:
        listener = await node.listen()
        token = listener.uri.token
        carrier = FakeSession()
        streams = []
        first_peer = None
        for n in (1, 2):
            session = FakeSession()
            node._confirm_inbound(session)
            node._confirm_forwarded(carrier, session)
            session.accepted = stream = FakeStream()
            streams.append(stream)
            if n == 1:
                first_peer = session.peer
                node._authorized_peers.update(
                    (KeyPair.generate().node_id, None) for _ in range(MAX_AUTHORIZED_PEERS - 1)
                )
            verdict = Verdict(None, tags=(token.tag, b"t" * 32))
            node._answer_open(session, 3, token, listener, verdict)  # type: ignore[arg-type]
            assert session.calls == [("accept", 3, Capability(node.id, token, ()))]
            assert node.stats()["streams_accepted"] == n and node.stats()["opens_refused"] == 0
            assert session not in node._strangers and session not in node._stranger_carrier
            assert node._stream_tags[stream] == verdict.tags  # type: ignore[index]
            assert len(node._authorized_peers) == MAX_AUTHORIZED_PEERS
            assert next(reversed(node._authorized_peers)) == session.peer
            assert first_peer in node._authorized_peers
        assert node._nested_strangers == {}
        for stream in streams:
            assert await listener.accept() is stream  # type: ignore[comparison-overlap]
        node._stream_tags.clear()


async def test_an_open_not_taken_by_the_session_counts_nothing(anyio_backend: str) -> None:
    """The other side: when the session does not take the stream (it is
    ending), nothing is counted or delivered."""
    async with running() as node:
        listener = await node.listen()
        session = FakeSession()
        node._answer_open(session, 3, listener.uri.token, listener, Verdict(None))  # type: ignore[arg-type]
        assert node.stats()["streams_accepted"] == 0 and node._authorized_peers == {}
        assert not listener._full() and session.peer not in node._authorized_peers


async def test_on_open_counts_each_open_and_answers_at_once_when_there_is_room(
    anyio_backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    """_on_open 15, 19, 20, 23, 26, 27, 29, 31: every OPEN counted once; a
    malformed token refused as such (logged); a good one at a listener with
    room accepted at once, not sent to wait for room."""
    caplog.set_level(logging.INFO, logger="capsock")
    async with running() as node:
        listener = await node.listen()
        session = FakeSession()
        assert node._on_open(session, 1, b"\x07not a token") is None  # type: ignore[arg-type]
        assert session.calls == [("reject", 1, ErrorCode.REFUSED)]
        assert node.stats()["opens_received"] == 1
        (line,) = [m for m in _logged(caplog) if m.startswith("refused a stream")]
        assert line.startswith(f"refused a stream from {session.peer.short()}: malformed token (")
        session.accepted = FakeStream()
        assert node._on_open(session, 3, listener.uri.token.encode()) is None  # type: ignore[arg-type]
        assert session.calls[-1] == ("accept", 3, Capability(node.id, listener.uri.token, ()))
        assert node.stats()["opens_received"] == 2
        node._stream_tags.clear()


async def test_an_open_that_waited_is_refused_busy_with_a_log_line_or_authorized_for_its_peer(
    anyio_backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    """_open_when_room 8-11, 20: still full after ``backlog_wait``: BUSY,
    logged with the peer; room: authorized again for the session's peer (a
    capability bound to that peer opens)."""
    caplog.set_level(logging.INFO, logger="capsock")
    async with running(listener_backlog=1, backlog_wait=0.05) as node:
        listener = await node.listen()
        listener._send.send_nowait(FakeStream())  # type: ignore[arg-type]
        session = FakeSession()
        bound = listener.uri.attenuate(Peer(session.peer)).token
        await node._open_when_room(session, 9, bound, listener)  # type: ignore[arg-type]
        assert session.calls == [("reject", 9, ErrorCode.BUSY)]
        assert f"listener is full; refusing a stream from {session.peer.short()}" in (
            _logged(caplog)
        )
        await listener._recv.receive()  # room
        session.accepted = FakeStream()
        await node._open_when_room(session, 11, bound, listener)  # type: ignore[arg-type]
        assert session.calls[-1] == ("accept", 11, Capability(node.id, bound, ()))
        node._stream_tags.clear()


def _relay_cap(relay: NodeId) -> Capability:
    return Capability(relay, Token(bytes(16), (), bytes(32)), ())


async def test_who_may_forward_sessions_to_a_node(anyio_backend: str) -> None:
    """_trusts_forwarding 7-9, 11, 13, 20, 24, 25, 31, 32: "never" trusts
    nobody (not even a peer we dialed); "trusted" trusts a session we dialed,
    our relay, a peer that opened a stream with our capability, or a valid
    voucher of ours, checked for the session's peer and the wall clock and
    never spending a use; nothing else."""
    async with running(accept_forwarded="never") as never:
        assert not never._trusts_forwarding(FakeSession(dialer=True), b"")  # type: ignore[arg-type]
    async with running(accept_forwarded="any") as anyone:
        assert anyone._trusts_forwarding(FakeSession(), b"")  # type: ignore[arg-type]
    async with running() as node:
        relay = FakeSession()
        node._relays = (_relay_cap(relay.peer),)
        assert node._trusts_forwarding(FakeSession(dialer=True), b"")  # type: ignore[arg-type]
        assert node._trusts_forwarding(relay, b"")  # type: ignore[arg-type]
        assert not node._trusts_forwarding(FakeSession(), b"")  # type: ignore[arg-type]
        known = FakeSession()
        node._authorized_peers[known.peer] = None
        assert node._trusts_forwarding(known, b"")  # type: ignore[arg-type]
        assert not node._trusts_forwarding(FakeSession(), b"\x07junk")  # type: ignore[arg-type]
        listener = await node.mint(uses=1)
        session = FakeSession()
        bound = listener.uri.attenuate(Peer(session.peer)).token.encode()
        for _ in range(2):
            assert node._trusts_forwarding(session, bound)  # type: ignore[arg-type]
        assert node._store.uses(listener._uses[0]) == 0  # type: ignore[index]
        assert not node._trusts_forwarding(FakeSession(), bound)  # type: ignore[arg-type]
        expiring = listener.uri.attenuate(ttl=10, now=1e9).token.encode()
        assert node._trusts_forwarding(session, expiring)  # type: ignore[arg-type]
        node._wall_clock = Clock(1e9 + 11)
        assert not node._trusts_forwarding(session, expiring)  # type: ignore[arg-type]


def _nested(node: capsock.Node, carrier: FakeSession) -> FakeSession:
    stranger = FakeSession()
    node._confirm_forwarded(carrier, stranger)  # type: ignore[arg-type]
    return stranger


async def test_forwarded_sessions_are_bounded_per_carrier_and_node_wide(
    anyio_backend: str,
) -> None:
    """_accept_transport 23, 25, 27, 30, 32-43, 47, 48, 51: a carrier at its
    share is BUSY (a relay at its larger share sheds its own stranger, never
    another carrier's); at the node-wide limit the carrier's own stranger is
    shed first, else any carrier's; each BUSY is counted once.  (The session
    here does not take the stream, so the decision is all that runs.)"""
    async with running(
        accept_forwarded="any", max_forwarded_per_session=1, max_forwarded_sessions=2
    ) as node:
        relay, peer, other = FakeSession(), FakeSession(), FakeSession()
        node._relays = (_relay_cap(relay.peer),)
        busy = ("reject", 1, ErrorCode.BUSY)
        took = ("accept", 1, None)

        async def ask(carrier: FakeSession, carried: int, nested: int) -> tuple[object, ...]:
            node._nested_by_carrier[carrier] = carried  # type: ignore[index]
            node._nested_count = nested
            await node._accept_transport(carrier, 1, b"")  # type: ignore[arg-type]
            return carrier.calls.pop()

        assert await ask(peer, 0, 0) == took
        assert await ask(peer, 1, 1) == busy  # its own share (a stranger of its own or not)
        peers = _nested(node, peer)
        assert await ask(peer, 1, 1) == busy
        assert node.stats()["forwarded_refused"] == 2
        assert await ask(relay, 1, 1) == took  # a relay's share is max_forwarded_sessions
        theirs = _nested(node, other)
        assert await ask(relay, 2, 1) == busy  # another carrier's stranger is not shed
        assert theirs.calls == []
        own = _nested(node, relay)
        assert await ask(relay, 2, 1) == took
        assert own.calls == [("close_now",)] and theirs.calls == []
        mine = _nested(node, relay)
        assert await ask(relay, 1, 2) == took  # node-wide: its own stranger first
        assert mine.calls == [("close_now",)] and theirs.calls == []
        assert await ask(relay, 1, 2) == took  # then another carrier's, the first first
        assert peers.calls == [("close_now",)] and theirs.calls == []
        assert await ask(relay, 1, 2) == took
        assert theirs.calls == [("close_now",)]
        assert await ask(relay, 1, 2) == busy  # no stranger left anywhere
        assert node.stats()["forwarded_refused"] == 4 and node._nested_strangers == {}
        node._nested_by_carrier.clear()
        node._nested_count = 0


class SilentStream(FakeStream):
    """A transport stream whose far end sends nothing until told to hang up."""

    def __init__(self) -> None:
        super().__init__()
        self.hang_up = anyio.Event()

    async def receive(self, max_bytes: int = 65536) -> bytes:
        await self.hang_up.wait()
        raise anyio.EndOfStream

    async def send(self, data: bytes) -> None:
        pass

    def extra(self, attribute: object, default: object = None) -> object:
        return default


async def test_a_forwarded_session_is_counted_while_it_runs_under_its_carriers_source(
    anyio_backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    """_accept_transport 67, 69-71, 78-80, 82 (78 in the second run): while its handshake runs, a
    forwarded session counts node-wide and for its carrier, half-open under
    the source ``forwarded:<carrier>``; when it ends, both counts come back
    exactly (other sessions' counts stay), and the drop names the carrier."""
    caplog.set_level(logging.INFO, logger="capsock")
    async with running(accept_forwarded="any") as node:
        carrier = FakeSession()
        carrier.accepted = stream = SilentStream()
        node._nested_count = 2  # other carriers' sessions
        node._nested_by_carrier[carrier] = 1  # type: ignore[index]
        async with anyio.create_task_group() as tg:
            tg.start_soon(node._accept_transport, carrier, 1, b"")
            with anyio.fail_after(5):
                while not len(node._nested_half_open):
                    await anyio.sleep(0.01)
            assert node._nested_count == 3 and node._nested_by_carrier[carrier] == 2  # type: ignore[index]
            assert set(node._nested_half_open._by_source) == {f"forwarded:{carrier.peer}"}
            stream.hang_up.set()
        assert node._nested_count == 2 and node._nested_by_carrier == {carrier: 1}
        assert (
            f"dropped inbound connection from a session forwarded by {carrier.peer.short()}: "
            in "\n".join(_logged(caplog))
        )
        node._nested_by_carrier.clear()
        node._nested_count = 0


# ------------------------------------------------------------------ listen, mint, retirement


async def test_a_named_listener_keeps_its_capability_until_revoked(
    anyio_backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Node.listen 1-5, 8, 10-20, 25, 28, 34, 35, 37, 57, 58: the same name
    gives the same capability again (its root is kept when it closes);
    unnamed listeners are distinct and temporary; a name open twice is
    refused; once revoked, the name gets a new root (logged) and the old
    root is forgotten."""
    caplog.set_level(logging.INFO, logger="capsock")
    async with running() as node:
        first = await node.listen("svc")
        assert not first._temporary
        with pytest.raises(LocalUsageError) as info:
            await node.listen("svc")
        assert str(info.value) == "a listener named 'svc' is already open"
        await first.aclose()
        again = await node.listen("svc")
        assert again.uri.token == first.uri.token
        assert node._store.get_root(first.uri.token.root_id) is not None
        a, b = await node.listen(), await node.listen()
        assert a._temporary and b._temporary and a.uri.token.root_id != b.uri.token.root_id
        await node.revoke(again.uri)
        await again.aclose()
        fresh = await node.listen("svc")
        assert fresh.uri.token.root_id != first.uri.token.root_id
        assert node._store.get_root(first.uri.token.root_id) is None
        assert "the sturdy capability 'svc' was revoked; minting a new one" in _logged(caplog)
        await fresh.aclose()
        assert (await node.listen("svc")).uri.token == fresh.uri.token


async def test_a_temporary_listener_retires_when_used_up_and_says_so(
    anyio_backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Listener._retire 1-4, _check_used_up 3-12, aclose 3, 5, 8-11, 16-20,
    27, 31: with ``uses=2`` it retires after the second open, not the first
    (logged); retired, it is out of the node's table; closed, it is out of
    the node's listeners, its root is forgotten and the refusal log will say
    "used up"."""
    caplog.set_level(logging.INFO, logger="capsock")
    async with (
        capsock.Node(listen=["tcp:127.0.0.1:0"]) as node,
        capsock.Node() as client,
    ):
        listener = await node.mint(uses=2)
        root_id = listener.uri.token.root_id
        await (await client.connect(listener.uri)).aclose()
        assert not listener._retired and node._listeners[root_id] is listener
        await (await client.connect(listener.uri)).aclose()
        assert listener._retired is True and root_id not in node._listeners
        assert f"temporary listener {listener.uri.redacted()} is used up" in _logged(caplog)
        await listener.aclose()
        assert listener not in node._all_listeners
        assert node._retired_roots[root_id] == "used up"
        assert node._store.get_root(root_id) is None


@pytest.mark.parametrize(
    ("caveats", "advance", "why"),
    [
        ({"uses": 2}, 0, "temporary listener closed"),
        ({"ttl": 10}, 10, "expired"),  # at the expiry second itself
        ({"ttl": 10}, 9, "temporary listener closed"),
        ({}, 0, "temporary listener closed"),
    ],
)
async def test_a_closed_temporary_listener_records_why(
    anyio_backend: str, caveats: dict[str, Any], advance: float, why: str
) -> None:
    """Listener.aclose 12, 14, 15, 21-26: why a temporary listener retired,
    for the refusal log: expired (its ``exp`` at or before now), or closed."""
    clock = Clock(1e9)
    async with capsock.Node(wall_clock=clock) as node:
        listener = await _mint(node, **caveats)
        clock.now += advance
        await listener.aclose()
        assert node._retired_roots[listener.uri.token.root_id] == why


async def test_the_retired_roots_are_bounded_oldest_first(anyio_backend: str) -> None:
    """Listener.aclose 28, 30: at most MAX_RETIRED_ROOTS are remembered; the
    oldest goes, never the one just closed."""
    from capsock.node._listener import MAX_RETIRED_ROOTS

    async with running() as node:
        node._retired_roots.update(
            (i.to_bytes(16, "big"), "x") for i in range(MAX_RETIRED_ROOTS - 1)
        )
        first = await node.listen()
        await first.aclose()
        assert len(node._retired_roots) == MAX_RETIRED_ROOTS
        second = await node.listen()
        await second.aclose()
        assert len(node._retired_roots) == MAX_RETIRED_ROOTS
        assert bytes(16) not in node._retired_roots
        assert first.uri.token.root_id in node._retired_roots
        assert second.uri.token.root_id in node._retired_roots


async def test_closing_a_listener_closes_the_streams_nobody_accepted(anyio_backend: str) -> None:
    """Listener.aclose 32 (the drain loop removed)."""
    async with running() as node:
        listener = await node.listen()
        queued = [FakeStream(), FakeStream()]
        for stream in queued:
            listener._send.send_nowait(stream)  # type: ignore[arg-type]
        await listener.aclose()
        assert all(s.closed for s in queued)


async def test_a_minted_listener_retires_at_its_expiry_by_the_wall_clock(
    anyio_backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Node._expire (no selected test reached it): the listener retires once
    the wall clock reaches its ``exp``, not before (logged); the task sleeps
    until then (here one second) rather than spinning."""
    caplog.set_level(logging.INFO, logger="capsock")
    clock = Clock(1e9)
    async with capsock.Node(wall_clock=clock) as node:
        listener = await node.mint(ttl=1)
        await anyio.sleep(0.2)  # the task sleeps a whole second first
        assert not listener._retired
        clock.now += 1
        with anyio.fail_after(5):
            while not listener._retired:
                await anyio.sleep(0.01)
        assert f"temporary listener {listener.uri.redacted()} expired" in _logged(caplog)
        assert listener.uri.token.root_id not in node._listeners


async def test_a_forwarded_session_names_its_forwarder_as_its_route(anyio_backend: str) -> None:
    """_accept_transport 69 (the route of a forwarded session made None): the
    endpoint's streams say which node forwarded their session."""
    from capsock import CapsockAttribute

    from .test_forwarding import triangle

    async with triangle() as (intro, recipient, endpoint, _cap):
        own = await endpoint.listen()
        introduced = await intro.introduce(own.uri, to=recipient.id, ttl=60)
        async with anyio.create_task_group() as tg:
            tg.start_soon(recipient.connect, introduced)
            with anyio.fail_after(10):
                accepted = await own.accept()
        assert accepted.extra(CapsockAttribute.route) == f"forwarded by {intro.id.short()}"
        await accepted.aclose()


async def test_mint_puts_each_caveat_asked_for_into_the_capability(anyio_backend: str) -> None:
    """Node.mint 22, 23, 28, 29, 33, 34, 38, 39 (second run): with no caveat
    the capability is the root; ``peer`` alone, ``label`` alone, each gives
    exactly its caveat."""
    async with running() as node:
        other = KeyPair.generate().node_id
        plain = await node.mint()
        assert plain.uri.token.caveats == () and plain._temporary
        assert (await node.mint(peer=other)).uri.token.caveats == (Peer(other),)
        assert (await node.mint(label="x")).uri.token.caveats == (Label("x"),)
        both = await node.mint(peer=other, label="x")
        assert both.uri.token.caveats == (Peer(other), Label("x"))


async def test_revoke_takes_only_this_nodes_genuine_capabilities(
    anyio_backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Node.revoke 3, 4, 7, 11, 24-26, 28, 32-35, 54 (mint's ``_tags``; second
    run): a URI text is parsed; a capability naming another node, or one of
    our roots with a forged tag, is refused with the same message and revokes
    nothing; a genuine one retires its listener, is logged redacted, and its
    revocation is recorded under its root (forgotten with it)."""
    caplog.set_level(logging.INFO, logger="capsock")
    async with running() as node:
        listener = await node.mint(label="m")
        token = listener.uri.token
        forged = Capability(node.id, Token(token.root_id, token.caveats, bytes(32)), ())
        elsewhere = Capability(KeyPair.generate().node_id, token, ())
        for bad in (forged, elsewhere):
            with pytest.raises(capsock.InvalidCapability) as info:
                await node.revoke(bad)
            assert str(info.value) == "this capability was not minted by this node"
        assert not listener._retired and node._store.sizes()["revoked"] == 0
        await node.revoke(str(listener.uri))
        assert listener._retired
        assert f"revoked {listener.uri.redacted()}" in _logged(caplog)
        assert node._store.sizes()["revoked"] == 1
        await listener.aclose()  # the temporary root goes, with its revocations
        assert node._store.sizes()["revoked"] == 0


async def test_revoking_resets_exactly_the_streams_opened_with_it(anyio_backend: str) -> None:
    """Node.revoke 39, 41-43, 46, 47 (second run): the streams opened with the
    revoked capability (or one derived from it) are reset, REFUSED, saying
    why; a stream of another capability goes on."""
    async with (
        capsock.Node(listen=["tcp:127.0.0.1:0"]) as node,
        capsock.Node() as client,
    ):
        doomed, spared = await node.listen(), await node.listen()
        derived = doomed.uri.attenuate(label="d")
        c1, c2 = await client.connect(derived), await client.connect(spared.uri)
        s1, s2 = await doomed.accept(), await spared.accept()
        await node.revoke(doomed.uri)
        with anyio.fail_after(5), pytest.raises(capsock.StreamReset) as info:
            await s1.receive()
        assert info.value.code == ErrorCode.REFUSED
        assert str(info.value).endswith(": its capability was revoked")
        await c2.send(b"still here")
        with anyio.fail_after(5):
            assert await s2.receive() == b"still here"
        for stream in (c1, c2, s1, s2):
            await stream.aclose()
