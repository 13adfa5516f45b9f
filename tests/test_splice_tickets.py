"""Splice tickets (protocol 10.10): single use, short-lived, bounded, never shown.

A forged, replayed or expired ticket is refused, and refusing it costs the
relay O(1): one fixed-size read, one keyed hash, one table lookup; nothing
is kept and nothing is read beyond the hello.
"""

from __future__ import annotations

import logging
import os

import anyio
import pytest

import capsock
from capsock.keys import KeyPair
from capsock.node import _splice
from capsock.node._splice import HELLO, TicketTable

from .test_splice import _echo_hash, relayed

pytestmark = pytest.mark.anyio

A = KeyPair.generate().node_id
B = KeyPair.generate().node_id


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_ticket_is_good_once() -> None:
    table = TicketTable(clock=Clock())
    pending = table.issue(A, B, 5.0)
    assert pending is not None
    assert table.redeem(pending.dialer_ticket) == (pending, True)
    assert table.redeem(pending.dialer_ticket) is None  # replayed
    assert table.redeem(pending.endpoint_ticket) == (pending, False)
    assert table.redeem(pending.endpoint_ticket) is None


def test_an_expired_ticket_is_refused() -> None:
    clock = Clock()
    table = TicketTable(clock=clock)
    pending = table.issue(A, B, 5.0)
    assert pending is not None
    clock.now += 5.01
    assert table.redeem(pending.dialer_ticket) is None
    assert table.redeem(pending.endpoint_ticket) is None


def test_a_forged_ticket_or_one_of_a_discarded_setup_is_refused() -> None:
    table = TicketTable(clock=Clock())
    pending = table.issue(A, B, 5.0)
    assert pending is not None
    assert table.redeem(os.urandom(32)) is None
    forged = bytearray(pending.dialer_ticket)
    forged[0] ^= 1
    assert table.redeem(bytes(forged)) is None
    table.discard(pending)
    assert len(table) == 0
    assert table.redeem(pending.dialer_ticket) is None


def test_tickets_are_bounded_per_requester_and_in_all() -> None:
    table = TicketTable(per_peer=2, total=3, clock=Clock())
    first = [table.issue(A, B, 5.0) for _ in range(3)]
    assert first[2] is None  # A's share is full
    c = KeyPair.generate().node_id
    assert table.issue(c, B, 5.0) is not None
    assert table.issue(KeyPair.generate().node_id, B, 5.0) is None  # node-wide
    assert first[0] is not None
    table.discard(first[0])
    assert table.issue(A, B, 5.0) is not None
    assert _splice.MAX_TICKETS_PER_PEER <= _splice.MAX_TICKETS


def test_no_ticket_in_a_repr() -> None:
    table = TicketTable(clock=Clock())
    pending = table.issue(A, B, 5.0)
    assert pending is not None
    info = capsock.node.forwarding.RouteInfo(ticket=pending.dialer_ticket)
    for text in (repr(pending), repr(info)):
        assert pending.dialer_ticket.hex() not in text
        assert repr(pending.dialer_ticket) not in text


async def _hello(port: int, data: bytes) -> bytes:
    """Send ``data`` to the relay's port; what came back before it hung up."""
    async with await anyio.connect_tcp("127.0.0.1", port) as conn:
        await conn.send(data)
        got = b""
        with anyio.fail_after(10):
            try:
                while True:
                    got += await conn.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                return got


def _port(node: capsock.Node) -> int:
    hint = node.hints[0]
    assert isinstance(hint, capsock.uri.TcpHint)
    return hint.port


async def test_forged_hellos_are_refused_at_constant_cost() -> None:
    async with relayed() as (relay, _endpoint, _dialer, _cap):
        port = _port(relay)
        before = relay.stats()
        for _ in range(20):
            assert await _hello(port, HELLO + os.urandom(32)) == b""
        # Junk after the hello is not read on: the hello alone decides.
        assert await _hello(port, HELLO + os.urandom(32) + os.urandom(1 << 16)) == b""
        # Another version is no hello: a zero-length record, a bad handshake.
        assert await _hello(port, b"\x00\x00\x07" + os.urandom(32)) == b""
        after = relay.stats()
        assert after["splice_hellos_refused"] - before["splice_hellos_refused"] == 21
        assert after["handshakes_failed"] - before["handshakes_failed"] == 22
        assert after["splice_setups"] == 0 and after["spliced_active"] == 0
        assert after["half_open"] == 0
        assert relay.forwarder.held == 0


async def test_a_replayed_ticket_is_refused(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="capsock")
    async with relayed() as (relay, _endpoint, dialer, cap):
        issued: list[_splice.PendingSplice] = []
        real_issue = relay.forwarder.tickets.issue

        def spy(*args: object) -> _splice.PendingSplice | None:
            pending = real_issue(*args)  # type: ignore[arg-type]
            if pending is not None:
                issued.append(pending)
            return pending

        relay.forwarder.tickets.issue = spy  # type: ignore[method-assign]
        stream = await dialer.connect(cap)
        await _echo_hash(stream, 64 << 10)
        assert relay.stats()["spliced_forwards"] == 1
        [pending] = issued
        port = _port(relay)
        # Both tickets were used: presenting either again gets nothing, not even the ACK.
        assert await _hello(port, HELLO + pending.dialer_ticket) == b""
        assert await _hello(port, HELLO + pending.endpoint_ticket) == b""
        assert relay.stats()["splice_hellos_refused"] == 2
        assert relay.stats()["spliced_forwards"] == 1
        # The session already carried still works.
        await stream.aclose()
        again = await dialer.connect(cap)
        await _echo_hash(again, 1024)
        await again.aclose()
        for ticket in (pending.dialer_ticket, pending.endpoint_ticket):
            assert ticket.hex() not in caplog.text
            assert repr(ticket) not in caplog.text
