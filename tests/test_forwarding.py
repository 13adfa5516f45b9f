"""Forwarding through a third node: nested end-to-end sessions, introductions, authority."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import anyio.abc
import pytest

import capsock
from capsock import CapsockAttribute
from capsock.testing import check_byte_stream
from capsock.uri import Capability

from .helpers import echo, read_all

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def triangle() -> AsyncIterator[tuple[capsock.Node, capsock.Node, capsock.Node, Capability]]:
    """I listens; R and E can only dial out (no listen address) and dial I.

    Yields (introducer, recipient, endpoint, cap) where cap is E's echo service
    as introduced by I to R (only reachable through I).
    """
    async with (
        capsock.Node(listen=["tcp:127.0.0.1:0"]) as intro,
        capsock.Node() as recipient,
        capsock.Node() as endpoint,
        anyio.create_task_group() as tg,
    ):
        # E offers a service, with no direct route, and hands it to I over a stream.
        service = await endpoint.listen()
        assert service.uri.hints == ()
        tg.start_soon(service.serve, echo)
        inbox = await intro.listen()
        to_intro = await endpoint.connect(inbox.uri)  # E -> I session, kept open
        await capsock.send_capability(to_intro, service.uri)
        from_e = await inbox.accept()
        e_cap = await capsock.receive_capability(from_e)
        # R also has a session with I (it dialed I).
        hello = await recipient.connect(inbox.uri)
        await inbox.accept()
        introduced = await intro.introduce(e_cap, to=recipient.id, ttl=60)
        yield intro, recipient, endpoint, introduced
        await hello.aclose()
        await to_intro.aclose()
        tg.cancel_scope.cancel()


async def test_recipient_reaches_an_unreachable_endpoint_through_the_introducer() -> None:
    async with triangle() as (intro, recipient, endpoint, cap):
        stream = await recipient.connect(cap)
        assert stream.peer == endpoint.id
        assert stream.extra(CapsockAttribute.route) == f"via {intro.id.short()}"
        payload = os.urandom(3 << 20)
        async with anyio.create_task_group() as tg:

            async def send() -> None:
                await stream.send(payload)
                await stream.send_eof()

            tg.start_soon(send)
            assert await read_all(stream) == payload
        await stream.aclose()


async def test_forwarded_streams_conform() -> None:
    async with triangle() as (_intro, recipient, endpoint, cap):
        target = await endpoint.listen()

        @asynccontextmanager
        async def pair() -> AsyncIterator[tuple[anyio.abc.ByteStream, anyio.abc.ByteStream]]:
            a = await recipient.connect(target.uri.with_hints(cap.hints[-1:]))
            b = await target.accept()
            try:
                yield a, b
            finally:
                await a.aclose()
                await b.aclose()

        await check_byte_stream(pair)


async def test_the_forwarder_sees_only_ciphertext() -> None:
    async with triangle() as (intro, recipient, _endpoint, cap):
        seen = bytearray()
        intro.forwarder.tap = seen.extend
        marker = b"THE-SECRET-MARKER-" * 100
        stream = await recipient.connect(cap)
        await stream.send(marker)
        await stream.send_eof()
        assert await read_all(stream) == marker
        assert len(seen) > len(marker) * 2  # both directions went through the forwarder
        assert b"THE-SECRET-MARKER" not in bytes(seen)
        assert cap.token.encode() not in bytes(seen)  # nor the capability token


async def test_a_tampering_forwarder_breaks_the_stream_instead_of_altering_it() -> None:
    async with triangle() as (intro, recipient, _endpoint, cap):
        stream = await recipient.connect(cap)
        flipped = 0

        def flip(data: bytes) -> bytes:
            nonlocal flipped
            if len(data) > 1000 and not flipped:
                flipped += 1
                return data[:500] + bytes([data[500] ^ 1]) + data[501:]
            return data

        intro.forwarder.tamper = flip
        payload = b"A" * (1 << 20)
        outcome: list[BaseException] = []
        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:

                async def send() -> None:
                    try:
                        await stream.send(payload)
                        await stream.send_eof()
                    except anyio.BrokenResourceError:
                        pass

                tg.start_soon(send)
                try:
                    while True:
                        chunk = await stream.receive()
                        assert set(chunk) <= {ord("A")}, "altered data was delivered"
                except (anyio.BrokenResourceError, anyio.EndOfStream) as exc:
                    outcome.append(exc)
        assert isinstance(outcome[0], capsock.ConnectionLost)  # an error, never a clean end
        assert flipped == 1


async def test_forwarding_needs_a_capability_and_it_can_be_narrowed_and_revoked() -> None:
    async with triangle() as (intro, recipient, endpoint, cap):
        via = cap.hints[-1]
        assert isinstance(via, capsock.uri.ViaHint)
        # Someone without a forwarding capability cannot use I as a forwarder.
        async with capsock.Node() as stranger:
            no_via = cap.with_hints(())
            with pytest.raises(capsock.Unreachable):
                await stranger.connect(no_via)
            # The introduced capability is bound to the recipient: it is useless to others.
            with pytest.raises(capsock.Unreachable) as info:
                await stranger.connect(cap)
            assert "refused" in str(info.value)
        # The forwarding capability can be attenuated by its holder ...
        narrowed = via.capability.attenuate(uses=1)
        one_shot = cap.with_hints((capsock.uri.ViaHint(narrowed),))
        stream = await recipient.connect(one_shot)
        await stream.aclose()
        # ... and revoked by the forwarder: existing sessions live on, new routes fail.
        await intro.revoke(via.capability)
        for session in list(recipient._sessions.values()):
            if session.peer == endpoint.id:
                await session.aclose()
        with pytest.raises(capsock.Unreachable) as info:
            await recipient.connect(cap)
        assert "refused" in str(info.value)


async def test_a_forwarder_refusal_is_unreachable_with_the_reason() -> None:
    async with triangle() as (intro, recipient, endpoint, cap):
        via = cap.hints[-1]
        assert isinstance(via, capsock.uri.ViaHint)
        # Ask the introducer to forward to a node it has no route to (with a
        # forwarding capability that is not limited to one target).
        unlimited = capsock.uri.ViaHint((await intro.forwarding()).uri)
        async with capsock.Node() as nowhere:
            target = await nowhere.listen()
            lost = target.uri.with_hints((unlimited,))
            with pytest.raises(capsock.Unreachable) as info:
                await recipient.connect(lost)
            assert "cannot reach that node" in str(info.value)
        # A forwarder that hangs up without answering is Unreachable too.
        intro.config = dataclasses.replace(intro.config, max_forwards_per_peer=0)
        await _drop_sessions_to(recipient, endpoint.id)
        with pytest.raises(capsock.Unreachable) as info2:
            await recipient.connect(cap)
        assert "too many forwarded sessions" in str(info2.value)


async def _drop_sessions_to(node: capsock.Node, peer: capsock.NodeId) -> None:
    for session in list(node._sessions.values()):
        if session.peer == peer:
            await session.aclose()


async def test_an_introduction_forwards_only_to_the_introduced_node() -> None:
    """The introduction's forwarding capability names its target (a ``to`` caveat).

    The recipient cannot use it to reach another node the introducer has a
    session with, nor to register itself at the introducer; a ``to`` caveat
    cannot be removed, and adding a second, different one allows nothing.
    """
    async with triangle() as (intro, recipient, endpoint, cap):
        via = cap.hints[-1]
        assert isinstance(via, capsock.uri.ViaHint)
        assert capsock.uri.To(endpoint.id) in via.capability.caveats
        async with capsock.Node() as other, anyio.create_task_group() as tg:
            service = await other.listen()
            tg.start_soon(service.serve, echo)
            inbox = await intro.listen()
            keep = await other.connect(inbox.uri)  # the introducer has a session to it
            detour = service.uri.with_hints((via,))
            with pytest.raises(capsock.Unreachable) as info:
                await recipient.connect(detour)
            assert "does not reach that node" in str(info.value)
            with pytest.raises((capsock.Unreachable, capsock.CapsockError)) as reg:
                await capsock.node.forwarding.register(recipient, via.capability)
            assert "limited to one target" in str(reg.value)
            both = via.capability.attenuate(capsock.uri.To(other.id))
            with pytest.raises(capsock.Unreachable):
                await recipient.connect(cap.with_hints((capsock.uri.ViaHint(both),)))
            # The introduced node itself is still reachable.
            stream = await recipient.connect(cap)
            await stream.aclose()
            await keep.aclose()
            tg.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("request_bytes", "answered"),
    [
        (b"hi\n", False),  # not even a message: someone took the URI for an ordinary one
        (b"\x00\x00\x00\x01\xc0", True),  # a message (nil), not a request: answered, refused
    ],
)
async def test_a_bad_forwarding_request_ends_in_a_reset_not_a_clean_end(
    request_bytes: bytes, answered: bool
) -> None:
    """Regression: the forwarder closed such streams cleanly, so `echo hi |
    capsock connect RELAY_URI` printed nothing and exited 0."""
    async with capsock.Node(listen=["tcp:127.0.0.1:0"]) as relay, capsock.Node() as client:
        forwarding = await relay.forwarding()
        stream = await client.connect(forwarding.uri)
        await stream.send(request_bytes)
        await stream.send_eof()
        received = b""
        with pytest.raises(capsock.StreamReset) as caught:
            while True:
                received += await stream.receive()
        assert not isinstance(caught.value, capsock.ConnectionLost)
        assert (b"malformed forwarding request" in received) is answered
