"""Direct paths wired into nodes, on loopback: observed address, coordination, punch.

Three in-process nodes: a relay R, an endpoint B registered with it (no listener of
its own), a dialer A that reaches B only through R.  On loopback the punch is a TCP
simultaneous open between the two shared ports (the relay observes 127.0.0.1), so
the whole path -- candidates, RTT, SYNC, punch, path handshake, pool -- runs here on
both backends.  Real NATs are in tests/test_direct_nat.py.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, NoReturn

import anyio
import pytest

import capsock
from capsock import CapsockAttribute
from capsock.core import direct
from capsock.errors import PunchFailed
from capsock.net import punch
from capsock.node._direct import DIRECT_TOKEN, _usable_local
from capsock.node.forwarding import observed_address

from .helpers import echo, read_all

pytestmark = pytest.mark.anyio


@dataclass
class Trio:
    relay: capsock.Node
    b: capsock.Node
    uri: capsock.Capability
    relayed_bytes: list[int]


@asynccontextmanager
async def three(
    *, b_direct: bool = True, a_direct: bool = True, extra: Callable[[], None] | None = None
) -> AsyncIterator[tuple[Trio, capsock.Node]]:
    async with capsock.Node(listen=["tcp:127.0.0.1:0"]) as relay:
        carried = [0]
        relay.forwarder.tap = lambda data: carried.__setitem__(0, carried[0] + len(data))
        fwd = await relay.forwarding()
        cfg_b = capsock.NodeConfig(direct_paths=b_direct, relay_backoff=(0.1, 1.0))
        async with (
            capsock.Node(relays=[fwd.uri], config=cfg_b) as b,
            capsock.Node(config=capsock.NodeConfig(direct_paths=a_direct)) as a,
            anyio.create_task_group() as tg,
        ):
            with anyio.fail_after(20):
                await b.wait_registered()
            service = await b.listen()
            tg.start_soon(service.serve, echo)
            yield Trio(relay, b, service.uri, carried), a
            tg.cancel_scope.cancel()


async def _echo(stream: capsock.Stream, payload: bytes) -> bytes:
    async with anyio.create_task_group() as tg:

        async def send() -> None:
            await stream.send(payload)
            await stream.send_eof()

        tg.start_soon(send)
        got = await read_all(stream)
    await stream.aclose()
    return got


async def _until(pred: Callable[[], bool]) -> None:
    with anyio.fail_after(30.0):
        while not pred():
            await anyio.sleep(0.05)


async def test_the_relay_tells_a_registered_node_its_observed_address() -> None:
    async with three() as (t, a):
        (seen,) = t.b._observed.values()
        assert seen == direct.Address("127.0.0.1", t.b._shared_port)
        assert t.relay.forwarder.direct_capable == {t.b.id: 1}
        stream = await a.connect(t.uri)
        info = a._route_info[t.b.id]
        assert info.peer_direct is True
        assert info.observed == direct.Address("127.0.0.1", a._shared_port)
        await stream.aclose()


async def test_a_relayed_session_goes_direct_and_new_streams_take_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="capsock.node")
    async with three() as (t, a):
        stream = await a.connect(t.uri)
        assert stream.extra(CapsockAttribute.route).startswith("via ")
        # A transfer started before the punch completes on the relayed session.
        first = os.urandom(2 << 20)
        async with anyio.create_task_group() as tg:
            results: list[bytes] = []

            async def transfer() -> None:
                results.append(await _echo(stream, first))

            tg.start_soon(transfer)
            await _until(lambda: a.stats()["punch_successes"] == 1)
        assert hashlib.sha256(results[0]).digest() == hashlib.sha256(first).digest()
        await _until(lambda: t.b.stats()["punch_successes"] == 1)
        for node in (a, t.b):
            stats = node.stats()
            assert stats["punch_attempts"] == 1 and stats["punch_failures"] == 0
        before = t.relayed_bytes[0]
        second = await a.connect(t.uri)
        route = second.extra(CapsockAttribute.route)  # any of this host's addresses
        assert route.startswith("direct tcp:") and route.endswith(" (punched)"), route
        payload = os.urandom(1 << 20)
        assert await _echo(second, payload) == payload
        # The relay carried none of the new stream's payload (an OPEN's worth at most).
        assert t.relayed_bytes[0] - before < 4096
    lines = [r.getMessage() for r in caplog.records]
    assert any(line.startswith(f"direct path to {t.b.id.short()} established") for line in lines)
    assert any(line.startswith(f"direct path to {a.id.short()} established") for line in lines)


async def test_a_failed_punch_costs_the_application_nothing(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def no_path(*args: object, **kwargs: object) -> NoReturn:
        raise PunchFailed({("192.0.2.1", 9): "timed out"}, 3)

    monkeypatch.setattr("capsock.net.punch.simultaneous_open", no_path)
    caplog.set_level(logging.INFO, logger="capsock.node")
    async with three() as (t, a):
        stream = await a.connect(t.uri)
        payload = os.urandom(1 << 20)
        assert await _echo(stream, payload) == payload
        await _until(lambda: a.stats()["punch_failures"] == t.b.stats()["punch_failures"] == 1)
        assert a.stats()["punch_successes"] == 0
        again = await a.connect(t.uri)  # backing off: no new round, still relayed
        assert again.extra(CapsockAttribute.route).startswith("via ")
        assert await _echo(again, payload) == payload
        assert a.stats()["punch_attempts"] == 1
    lines = [r.getMessage() for r in caplog.records]
    assert any(line.startswith(f"staying relayed: {t.b.id.short()}: ") for line in lines)


async def test_a_failed_round_is_retried_after_the_backoff(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = punch.simultaneous_open
    calls = [0]

    async def fails_first(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] <= 2:  # both sides of the first round
            raise PunchFailed({("192.0.2.1", 9): "timed out"}, 3)
        return await real(*args, **kwargs)

    monkeypatch.setattr("capsock.net.punch.simultaneous_open", fails_first)
    async with three() as (t, a):
        for node in (a, t.b):
            node._punch_budget = direct.PunchBudget(first=0.2)
        stream = await a.connect(t.uri)
        await _until(lambda: a.stats()["punch_successes"] == 1)  # no second connect()
        assert a.stats()["punch_failures"] == 1 and a.stats()["punch_attempts"] == 2
        await stream.aclose()


async def test_the_direct_session_authenticates_the_same_peer_key() -> None:
    async with three() as (t, a):
        stream = await a.connect(t.uri)
        await _until(lambda: a.stats()["punch_successes"] == 1)
        relayed = stream._session
        direct_session = a._sessions[t.b.id]
        assert direct_session is not relayed
        assert direct_session.peer == relayed.peer == t.b.id
        assert direct_session.handshake_hash != relayed.handshake_hash  # a fresh handshake
        # Roles come from the tie-break, not from who connected.
        assert direct_session.dialer == direct.is_noise_initiator(a.id.raw, t.b.id.raw)
        await stream.aclose()


@pytest.mark.parametrize(("a_direct", "b_direct"), [(True, False), (False, True)])
async def test_the_opt_out_on_either_side_keeps_everything_relayed(
    a_direct: bool, b_direct: bool
) -> None:
    async with three(a_direct=a_direct, b_direct=b_direct) as (t, a):
        if not b_direct:
            assert not t.b._observed and not t.relay.forwarder.direct_capable
        payload = os.urandom(256 << 10)
        for _ in range(2):
            stream = await a.connect(t.uri)
            assert await _echo(stream, payload) == payload
            assert stream.extra(CapsockAttribute.route).startswith("via ")
        await anyio.sleep(0.5)
        for node in (a, t.b):
            assert node.stats()["punch_attempts"] == 0
        assert t.b.stats()["opens_refused"] == 0  # nothing new reached the other side


async def test_a_peer_without_a_capability_cannot_make_a_node_punch() -> None:
    async with three() as (t, a):
        # A reaches B through the relay but has never opened a stream with B's capability.
        session = await a._session_for(t.b.id, t.uri.hints)
        with pytest.raises(capsock.CapabilityRejected):
            await session.open_stream(DIRECT_TOKEN)
        assert t.b.stats()["punch_attempts"] == 0


async def test_coordination_on_a_direct_session_is_refused() -> None:
    async with (
        capsock.Node(listen=["tcp:127.0.0.1:0"]) as b,
        capsock.Node() as a,
        anyio.create_task_group() as tg,
    ):
        service = await b.listen()
        tg.start_soon(service.serve, echo)
        stream = await a.connect(service.uri)  # direct: a capability, but nothing to punch
        with pytest.raises(capsock.CapabilityRejected):
            await stream._session.open_stream(DIRECT_TOKEN)
        assert b.stats()["punch_attempts"] == a.stats()["punch_attempts"] == 0
        await stream.aclose()
        tg.cancel_scope.cancel()


async def test_rounds_per_peer_are_bounded_on_the_answering_side(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def no_path(*args: object, **kwargs: object) -> NoReturn:
        raise PunchFailed({("192.0.2.1", 9): "timed out"}, 3)

    monkeypatch.setattr("capsock.net.punch.simultaneous_open", no_path)
    async with three() as (t, a):
        stream = await a.connect(t.uri)
        await _until(lambda: t.b.stats()["punch_failures"] == 1)
        # A peer that ignores its own backoff gets no further round from B.
        session = stream._session
        for _ in range(5):
            with pytest.raises(capsock.CapabilityRejected):
                await session.open_stream(DIRECT_TOKEN)
        assert t.b.stats()["punch_attempts"] == 1
        await stream.aclose()


async def test_no_second_round_once_a_direct_path_exists() -> None:
    async with three() as (t, a):
        stream = await a.connect(t.uri)
        await _until(lambda: a.stats()["punch_successes"] == 1)
        with pytest.raises(capsock.CapabilityRejected):
            await stream._session.open_stream(DIRECT_TOKEN)
        assert t.b.stats()["punch_attempts"] == 1
        await stream.aclose()


def test_punch_budget_backs_off_and_bounds_rounds_per_minute() -> None:
    budget = direct.PunchBudget(first=30.0, largest=120.0, per_minute=2)
    assert budget.may_start("p", 0.0)
    assert budget.retry_in("p", 0.0) == 0.0
    assert budget.failed("p", 1.0) == 30.0
    assert budget.retry_in("p", 11.0) == 20.0
    assert not budget.may_start("p", 30.0)  # backing off
    assert budget.may_start("p", 31.5)
    assert budget.failed("p", 32.0) == 60.0
    assert not budget.may_start("p", 91.0)
    assert budget.may_start("p", 92.5)
    assert budget.failed("p", 93.0) == 120.0
    assert budget.failed("p", 94.0) == 120.0  # capped
    budget.succeeded("p")
    assert budget.failed("p", 300.0) == 30.0  # reset by a success
    # Without failures, still at most per_minute rounds in any 60 s.
    assert budget.may_start("q", 0.0) and budget.may_start("q", 1.0)
    assert not budget.may_start("q", 2.0)
    assert budget.may_start("q", 61.0)


def test_punch_budget_is_bounded_in_size() -> None:
    budget = direct.PunchBudget(max_peers=3)
    for peer in range(10):
        budget.failed(peer, 0.0)
    assert len(budget._peers) == 3


def test_observed_address_comes_only_from_a_tcp_route() -> None:
    assert observed_address("inbound tcp:203.0.113.7:4000") == direct.Address("203.0.113.7", 4000)
    assert observed_address("inbound tcp:2001:db8::1:4000") == direct.Address("2001:db8::1", 4000)
    assert observed_address("inbound unix:/run/x.sock") is None
    assert observed_address("forwarded by abcd") is None
    assert observed_address("inbound tcp:0.0.0.0:1") is None
    assert observed_address("inbound tcp:example.com:80") is None


def test_local_candidates_are_never_link_local_or_loopback(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = [("169.254.3.4", 9), ("fe80::1", 9), ("127.0.0.1", 9), ("192.0.2.10", 9)]
    monkeypatch.setattr("capsock.net.punch.local_candidates", lambda port: fake)
    assert _usable_local(9) == [direct.Address("192.0.2.10", 9)]


async def test_rounds_at_once_are_bounded_node_wide(monkeypatch: pytest.MonkeyPatch) -> None:
    """Many peers (or one holder with many keys) cannot each start a round at
    once: past ``MAX_ROUNDS_AT_ONCE`` the answering node refuses coordination
    and the dialer does not ask; both stay relayed and the data still flows."""
    async with three() as (t, a):
        monkeypatch.setattr("capsock.node._direct.MAX_ROUNDS_AT_ONCE", 0)
        stream = await a.connect(t.uri)
        payload = os.urandom(64 << 10)
        assert await _echo(stream, payload) == payload
        await anyio.sleep(0.5)
        assert a.stats()["punch_attempts"] == 0
        # Asked anyway (a peer that ignores its own bound), B refuses.
        with pytest.raises(capsock.CapabilityRejected):
            await stream._session.open_stream(DIRECT_TOKEN)
        assert t.b.stats()["punch_attempts"] == 0
        await stream.aclose()
