"""Tests that kill the mutants of ``scripts/mutation forwarding`` (docs/testing.md).

capsock.node.forwarding: the forwarder's answer to every request (each refusal's
exact words and reset code), the bookkeeping of what it carries, and the
small parsers of its answers.  Each test names, in its docstring, the mutants
it was written against (mutmut's numbers of the first run).  Node-level tests
run on asyncio and trio over loopback.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.lowlevel
import pytest

import capsock
from capsock import NodeConfig
from capsock.core.direct import Address
from capsock.errors import ErrorCode
from capsock.keys import KeyPair
from capsock.messages import receive_message, send_message
from capsock.node.forwarding import (
    TRANSPORT_TOKEN,
    UNREACHABLE_REASON,
    Forwarder,
    RouteInfo,
    _reason,
    _route_info,
    observed_address,
    open_via,
    open_via_info,
    register,
    register_info,
    splice,
    transport_token,
    transport_voucher,
)
from capsock.uri import To

pytestmark = pytest.mark.anyio


# ------------------------------------------------------------------ the small parsers


@pytest.mark.parametrize(
    ("route", "address"),
    [
        ("inbound tcp:192.0.2.1:4000", Address("192.0.2.1", 4000)),
        ("inbound tcp:[2001:db8::1]:5", Address("2001:db8::1", 5)),
        ("inbound tcp:2001:db8::1:5", Address("2001:db8::1", 5)),  # the port after the last colon
        ("inbound unix:/run/x", None),
        ("via abcdefgh", None),
        ("forwarded by abcdefgh", None),
        ("inbound tcp:host.example:5", None),
        ("inbound tcp:192.0.2.1:x", None),
        ("inbound tcp:192.0.2.1:0", None),  # not a valid candidate port
        ("inbound tcp:192.0.2.1:70000", None),
        ("inbound tcp:X192.0.2.1X:5", None),  # only brackets are stripped
        ("", None),
    ],
)
def test_only_a_direct_tcp_route_gives_an_observed_address(
    route: str, address: Address | None
) -> None:
    assert observed_address(route) == address


@pytest.mark.parametrize(
    ("answer", "info"),
    [
        ({"ok": True}, RouteInfo(None, False)),
        ({"ok": True, "observed": ["192.0.2.1", 80], "direct": True},
         RouteInfo(Address("192.0.2.1", 80), True)),
        ({"observed": ["192.0.2.1", 80, 1]}, RouteInfo(None, False)),
        ({"observed": ("192.0.2.1", 80)}, RouteInfo(None, False)),  # a list, as msgpack gives
        ({"observed": ["not an ip", 80]}, RouteInfo(None, False)),
        ({"observed": ["192.0.2.1", 0]}, RouteInfo(None, False)),
        ({"direct": 1}, RouteInfo(None, False)),  # only True says yes
        ({"direct": "yes"}, RouteInfo(None, False)),
    ],
)  # fmt: skip
def test_an_answers_optional_fields_are_read_strictly(
    answer: dict[Any, Any], info: RouteInfo
) -> None:
    assert _route_info(answer) == info


def test_the_transport_token_and_its_voucher() -> None:
    assert TRANSPORT_TOKEN == b"\x00"
    assert transport_token(None) == b"\x00" and transport_token(b"") == b"\x00"
    assert transport_token(b"abc") == b"\x00abc"
    assert transport_voucher(b"\x00") == b""
    assert transport_voucher(b"\x00abc") == b"abc"
    assert transport_voucher(b"\x01abc") is None and transport_voucher(b"") is None
    assert transport_voucher(b"a\x00") is None


def test_the_remote_reason_is_made_printable() -> None:
    assert _reason({"error": "no route"}) == "no route"
    assert _reason({}) == "no reason given"
    assert "\x1b" not in _reason({"error": "a\x1b[2Jb"})


def test_transit_taps_then_tampers() -> None:
    forwarder = Forwarder(None, None)  # type: ignore[arg-type]
    assert forwarder._transit(b"abc") == b"abc"
    seen: list[bytes] = []
    forwarder.tap = seen.append
    assert forwarder._transit(b"abc") == b"abc" and seen == [b"abc"]
    forwarder.tamper = lambda data: data[::-1]
    assert forwarder._transit(b"xyz") == b"zyx" and seen == [b"abc", b"xyz"]
    forwarder.tap = None
    assert forwarder._transit(b"12") == b"21" and seen == [b"abc", b"xyz"]
    assert forwarder.active == 0 and forwarder.registered == {} and forwarder.direct_capable == {}


# ------------------------------------------------------------------ the forwarder's answers


@asynccontextmanager
async def forwarder(
    **config: Any,
) -> AsyncIterator[tuple[capsock.Node, capsock.Node, capsock.Capability]]:
    """A forwarding node, a client, and the forwarding capability."""
    async with (
        capsock.Node(listen=["tcp:127.0.0.1:0"], config=NodeConfig(**config)) as node,
        capsock.Node() as client,
    ):
        listener = await node.forwarding()
        yield node, client, listener.uri


async def ask(
    client: capsock.Node, cap: capsock.Capability, request: object
) -> tuple[Any, ErrorCode]:
    """Send one request; return the answer and the code of the reset that follows."""
    stream = await client.connect(cap)
    await send_message(stream, request)
    with anyio.fail_after(10):
        answer = await receive_message(stream)
        with pytest.raises(capsock.StreamReset) as info:
            await stream.receive()
    await stream.aclose()
    return answer, info.value.code


def _refused(why: str) -> dict[str, Any]:
    return {"ok": False, "error": why}


@pytest.mark.parametrize(
    "request_",
    [
        "forward",
        ["op", "forward"],
        {"op": "forwards", "to": bytes(32)},
        {"to": bytes(32)},
        {"op": "forward"},
        {"op": "forward", "to": "x" * 32},
        {"op": "forward", "to": bytes(31)},
        {"op": "forward", "to": bytes(33)},
    ],
    ids=repr,
)
async def test_each_malformed_request_is_refused_as_malformed(request_: object) -> None:
    async with forwarder() as (_, client, cap):
        answer, code = await ask(client, cap, request_)
        assert answer == _refused("malformed forwarding request") and code == ErrorCode.REFUSED


async def test_the_forwarder_refuses_to_forward_to_itself_or_back() -> None:
    async with forwarder() as (node, client, cap):
        for target in (node.id, client.id):
            answer, code = await ask(client, cap, {"op": "forward", "to": target.raw})
            assert answer == _refused("a node cannot be forwarded to itself")
            assert code == ErrorCode.REFUSED


async def test_an_unreachable_target_gets_the_one_answer() -> None:
    async with forwarder() as (node, client, cap):
        nowhere = capsock.keys.KeyPair.generate().node_id
        answer, code = await ask(client, cap, {"op": "forward", "to": nowhere.raw})
        assert answer == _refused(UNREACHABLE_REASON) and code == ErrorCode.REFUSED
        assert node.forwarder.active == 0 and node.forwarder._per_peer == {}


async def test_a_to_caveat_limits_the_target_and_forbids_registering() -> None:
    async with forwarder() as (_, client, cap):
        one = capsock.keys.KeyPair.generate().node_id
        other = capsock.keys.KeyPair.generate().node_id
        limited = cap.attenuate(To(one))
        answer, code = await ask(client, limited, {"op": "forward", "to": other.raw})
        assert answer == _refused("this forwarding capability does not reach that node")
        assert code == ErrorCode.REFUSED
        answer, _ = await ask(client, limited, {"op": "forward", "to": one.raw})
        assert answer == _refused(UNREACHABLE_REASON)  # allowed, just not reachable
        both = limited.attenuate(To(other))
        for target in (one, other):
            answer, _ = await ask(client, both, {"op": "forward", "to": target.raw})
            assert answer == _refused("this forwarding capability does not reach that node")
        answer, code = await ask(client, limited, {"op": "register"})
        assert answer == _refused("this forwarding capability is limited to one target")
        assert code == ErrorCode.REFUSED


async def test_the_per_peer_limit_answers_busy() -> None:
    async with forwarder(max_forwards_per_peer=0) as (_, client, cap):
        target = capsock.keys.KeyPair.generate().node_id
        answer, code = await ask(client, cap, {"op": "forward", "to": target.raw})
        assert answer == _refused("too many forwarded sessions from this node")
        assert code == ErrorCode.BUSY


async def test_no_request_in_time_is_a_timeout() -> None:
    async with forwarder(handshake_timeout=0.2) as (_, client, cap):
        stream = await client.connect(cap)
        with anyio.fail_after(10):
            answer = await receive_message(stream)
            with pytest.raises(capsock.StreamReset) as info:
                await stream.receive()
        assert answer == _refused("no forwarding request in time")
        assert info.value.code == ErrorCode.TIMEOUT
        await stream.aclose()


async def test_an_unreadable_request_is_a_protocol_error() -> None:
    async with forwarder() as (_, client, cap):
        stream = await client.connect(cap)
        await stream.send(b"\xff\xff\xff\xff")  # a length far beyond any message
        with anyio.fail_after(10):
            answer = await receive_message(stream)
            with pytest.raises(capsock.StreamReset) as info:
                await stream.receive()
        assert answer == _refused("unreadable forwarding request")
        assert info.value.code == ErrorCode.PROTOCOL_ERROR
        await stream.aclose()


async def test_registrations_are_counted_while_they_last() -> None:
    """Forwarder._registered: each registration stream counts for its peer
    (and, when it asked for it, as direct-capable) until it ends."""
    async with forwarder() as (node, client, cap):
        streams = []
        for direct in (False, True, True):
            stream = await client.connect(cap)
            request: dict[str, Any] = {"op": "register"}
            if direct:
                request["direct"] = True
            await send_message(stream, request)
            answer = await receive_message(stream)
            assert answer.get("ok") is True
            if direct:  # a direct TCP session: the address the forwarder sees
                host, port = answer["observed"]
                assert host == "127.0.0.1" and isinstance(port, int) and port > 0
            else:
                assert "observed" not in answer
            streams.append(stream)
        assert node.forwarder.registered == {client.id: 3}
        assert node.forwarder.direct_capable == {client.id: 2}
        await streams.pop().aclose()
        with anyio.fail_after(10):
            while node.forwarder.direct_capable != {client.id: 1}:
                await anyio.sleep(0.01)
        assert node.forwarder.registered == {client.id: 2}
        for stream in streams:
            await stream.aclose()
        with anyio.fail_after(10):
            while node.forwarder.registered or node.forwarder.direct_capable:
                await anyio.sleep(0.01)


async def test_a_forwarded_session_is_counted_while_it_is_carried() -> None:
    from .test_forwarding import triangle

    async with triangle() as (intro, recipient, endpoint, cap):
        stream = await recipient.connect(cap)
        assert intro.forwarder.active == 1
        assert intro.forwarder._per_peer == {recipient.id: 1}
        for session in list(recipient._sessions.values()):
            if session.peer == endpoint.id:
                await session.aclose()
        await stream.aclose()
        with anyio.fail_after(10):
            while intro.forwarder.active:
                await anyio.sleep(0.01)
        assert intro.forwarder._per_peer == {}


async def test_a_registration_over_a_unix_socket_has_no_observed_address(tmp_path: Any) -> None:
    """_observed_field 9 (second half of protocol 10.8): no TCP address, no
    ``observed`` field (and no failure)."""
    path = f"{tmp_path}/f.sock"
    async with capsock.Node(listen=[f"unix:{path}"]) as node, capsock.Node() as client:
        cap = (await node.forwarding()).uri
        stream, info = await register_info(client, cap)
        assert info == RouteInfo(None, False)
        await stream.aclose()


async def test_register_and_open_via_say_direct_and_read_the_answer(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """register / register_info 5-9, 17-19, 24, open_via_info 8-11, open_via
    (no selected test called it), _registered 19-24: a node that does direct
    paths asks for the observed address and gets it; one that does not
    asks nothing and gets nothing; ``register`` and ``open_via`` return the
    stream; a refused registration is a ProtocolError with the reason."""
    import logging

    from .test_forwarding import triangle

    caplog.set_level(logging.INFO, logger="capsock")
    async with forwarder() as (node, client, cap):
        stream, info = await register_info(client, cap)
        assert isinstance(info.observed, Address) and info.observed.host == "127.0.0.1"
        assert f"{client.id.short()} registered for forwarding" in [
            r.getMessage() for r in caplog.records
        ]
        await stream.aclose()
        plain = await register(client, cap)
        assert isinstance(plain, capsock.Stream)
        await plain.aclose()
        async with capsock.Node(config=NodeConfig(direct_paths=False)) as old:
            stream, info = await register_info(old, cap)
            assert info == RouteInfo(None, False)
            await stream.aclose()
        limited = cap.attenuate(To(node.id))
        with pytest.raises(capsock.ProtocolError) as refused:
            await register_info(client, limited)
        assert str(refused.value) == (
            "the relay did not accept the registration: "
            "this forwarding capability is limited to one target"
        )
    async with triangle() as (_intro, recipient, endpoint, introduced):
        via = introduced.hints[-1]
        assert isinstance(via, capsock.uri.ViaHint)
        carried, info = await open_via_info(recipient, via.capability, endpoint.id)
        assert isinstance(info.observed, Address)
        await carried.aclose()
        carried = await open_via(recipient, via.capability, endpoint.id)
        assert isinstance(carried, capsock.Stream)
        await carried.aclose()


@pytest.mark.parametrize("answer", ["hang up", "not a map"])
async def test_a_forwarder_that_does_not_answer_properly_is_named(answer: str) -> None:
    """_request 9, 10, 12: hanging up is Unreachable saying how; an answer that
    is not a map is a ProtocolError naming the forwarder."""
    async with (
        capsock.Node(listen=["tcp:127.0.0.1:0"]) as bad,
        capsock.Node() as client,
        anyio.create_task_group() as tg,
    ):
        listener = await bad.listen()

        async def handler(stream: capsock.Stream) -> None:
            await receive_message(stream)
            if answer == "not a map":
                await send_message(stream, [1, 2])
            await stream.send_eof()

        tg.start_soon(listener.serve, handler)
        short = bad.id.short()
        if answer == "hang up":
            with pytest.raises(capsock.Unreachable) as info:
                await open_via(client, listener.uri, KeyPair.generate().node_id)
            assert str(info.value).startswith(
                f"the forwarder {short} hung up without answering (EndOfStream"
            )
        else:
            with pytest.raises(capsock.ProtocolError) as info2:
                await open_via(client, listener.uri, KeyPair.generate().node_id)
            assert str(info2.value) == f"the forwarder {short} sent a malformed answer"
        tg.cancel_scope.cancel()


class _Stream:
    """A byte stream for splice: ``fail`` breaks at once, else it waits."""

    def __init__(self, fail: bool) -> None:
        self.fail = fail
        self.closed = False

    async def receive(self, max_bytes: int = 65536) -> bytes:
        if self.fail:
            raise anyio.BrokenResourceError
        await anyio.sleep_forever()
        raise AssertionError

    async def send(self, data: bytes) -> None:
        pass

    async def send_eof(self) -> None:
        pass

    async def aclose(self) -> None:
        await anyio.lowlevel.checkpoint()  # a checkpoint: cancelled unless shielded
        self.closed = True


async def test_splice_ends_both_ways_on_a_broken_side() -> None:
    """splice 11, 19 (the pumps without the scope to cancel): a broken side
    ends the splice (both sides closed), whichever side it is."""
    for broken_first in (True, False):
        a, b = _Stream(broken_first), _Stream(not broken_first)
        with anyio.fail_after(5):
            await splice(a, b)  # type: ignore[arg-type]
        assert a.closed and b.closed


async def test_a_cancelled_splice_still_closes_both_sides() -> None:
    """splice 24, 25 (the closing not shielded from the cancellation)."""
    a, b = _Stream(False), _Stream(False)
    with anyio.move_on_after(0.05):
        await splice(a, b)  # type: ignore[arg-type]
    assert a.closed and b.closed
