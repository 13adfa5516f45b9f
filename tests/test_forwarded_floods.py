"""Sessions forwarded to a node (transport streams) cannot lock anyone out.

Issue: any peer could open transport streams (OPEN with the token 0x00) and
run nested inbound sessions over them; one TCP connection filled
``max_sessions`` in seconds and every new client was dropped.  Now a node
accepts transport streams only from peers it has a reason to (by default),
bounds them per carrying session and node-wide, and counts them apart from
its direct sessions.
"""

from __future__ import annotations

import os

import anyio
import pytest

import capsock
from capsock import CapabilityRejected, ErrorCode, NodeConfig
from capsock.core.frames import Ping, encode_frame
from capsock.keys import KeyPair
from capsock.net.session import Session, dial_handshake
from capsock.node.forwarding import TRANSPORT_TOKEN
from capsock.testing import echo

from .helpers import read_all

pytestmark = pytest.mark.anyio


async def session_to(client: capsock.Node, server: capsock.Node) -> Session:
    return await client._session_for(server.id, server.hints)


async def nested_stranger(session: Session, target: capsock.Node) -> anyio.abc.ByteStream:
    """Open a transport stream and run a fresh-key session inside it (one PING)."""
    stream = await session.open_stream(TRANSPORT_TOKEN)
    result, _ = await dial_handshake(stream, KeyPair.generate(), target.id)
    await stream.send(result.cipher.encrypt_record(encode_frame(Ping(b"12345678"))))
    return stream


async def echo_once(client: capsock.Node, uri: capsock.Capability) -> None:
    payload = os.urandom(256)
    stream = await client.connect(uri)
    await stream.send(payload)
    await stream.send_eof()
    assert await read_all(stream) == payload
    await stream.aclose()


async def test_a_stranger_cannot_forward_sessions_to_a_node(anyio_backend: str) -> None:
    async with (
        capsock.Node(listen=["tcp:127.0.0.1:0"]) as server,
        capsock.Node() as stranger,
    ):
        session = await session_to(stranger, server)
        for _ in range(20):
            with pytest.raises(CapabilityRejected) as info:
                await session.open_stream(TRANSPORT_TOKEN)
            assert info.value.code == ErrorCode.REFUSED
        stats = server.stats()
        assert stats["forwarded_refused"] == 20
        assert stats["forwarded_sessions"] == 0 and stats["forwarded_half_open"] == 0


async def test_a_peer_holding_a_capability_may_forward_within_its_share(
    anyio_backend: str,
) -> None:
    """A peer that opened a stream with one of our capabilities (an introducer,
    say) may forward sessions to us, at most ``max_forwarded_per_session`` at
    once; the rest are BUSY.  Direct dialers are not affected, even with
    ``max_sessions`` this small."""
    config = NodeConfig(max_forwarded_per_session=8, max_sessions=4)
    async with (
        capsock.Node(listen=["tcp:127.0.0.1:0"], config=config) as server,
        capsock.Node() as peer,
        anyio.create_task_group() as tg,
    ):
        service = await server.listen()
        tg.start_soon(service.serve, echo)
        await echo_once(peer, service.uri)  # now the server has a reason to trust it
        session = await session_to(peer, server)
        nested = [await nested_stranger(session, server) for _ in range(8)]
        with anyio.fail_after(5):
            while server.stats()["forwarded_sessions"] < 8:
                await anyio.sleep(0.01)
        with pytest.raises(CapabilityRejected) as info:
            await session.open_stream(TRANSPORT_TOKEN)
        assert info.value.code == ErrorCode.BUSY
        # Nested sessions are not direct sessions: direct dialers still get in.
        assert server.stats()["session_count"] == 1
        for _ in range(3):
            async with capsock.Node() as good:
                with anyio.fail_after(5):
                    await echo_once(good, service.uri)
        for stream in nested:
            await stream.aclose()
        tg.cancel_scope.cancel()


async def test_a_flood_of_forwarded_sessions_leaves_room_for_direct_clients(
    anyio_backend: str,
) -> None:
    """Even when every peer may forward (``accept_forwarded="any"``), a flood of
    nested sessions over one connection stays within its own limits, and a
    good client that connects during the flood is served at once."""
    config = NodeConfig(accept_forwarded="any", max_sessions=16)
    async with (
        capsock.Node(listen=["tcp:127.0.0.1:0"], config=config) as server,
        capsock.Node() as attacker,
        anyio.create_task_group() as tg,
    ):
        service = await server.listen()
        tg.start_soon(service.serve, echo)
        session = await session_to(attacker, server)
        refused = 0
        nested = []

        async def flood() -> None:
            nonlocal refused
            for _ in range(200):
                try:
                    nested.append(await nested_stranger(session, server))
                except CapabilityRejected:
                    refused += 1

        async with anyio.create_task_group() as attack:
            attack.start_soon(flood)
            await anyio.sleep(0.2)
            for _ in range(5):  # good clients arrive during the flood
                async with capsock.Node() as good:
                    with anyio.fail_after(5):
                        await echo_once(good, service.uri)
        limit = config.max_forwarded_per_session
        assert len(nested) == limit and refused == 200 - limit
        stats = server.stats()
        assert stats["forwarded_sessions"] <= limit
        assert stats["session_count"] <= 2  # the attacker's and at most one good client's
        for stream in nested:
            await stream.aclose()
        tg.cancel_scope.cancel()


async def test_accept_forwarded_never_and_true_and_nonsense() -> None:
    assert NodeConfig(accept_forwarded=True).accept_forwarded == "any"
    assert NodeConfig(accept_forwarded=False).accept_forwarded == "never"
    with pytest.raises(capsock.LocalUsageError):
        NodeConfig(accept_forwarded="sometimes")  # type: ignore[arg-type]


async def test_an_introducer_that_never_opened_a_stream_vouches_with_its_capability(
    anyio_backend: str,
) -> None:
    """The introducer learned the endpoint's URI out of band and never opened a
    stream to it: its transport OPEN carries that capability's token after the
    ``0x00`` (a voucher), and the endpoint accepts it.  Revoked, it does not."""
    async with (
        capsock.Node(listen=["tcp:127.0.0.1:0"]) as endpoint,
        capsock.Node(listen=["tcp:127.0.0.1:0"]) as intro,
        capsock.Node() as recipient,
        anyio.create_task_group() as tg,
    ):
        service = await endpoint.listen()
        tg.start_soon(service.serve, echo)
        introduced = await intro.introduce(service.uri, to=recipient.id, ttl=60)
        # The recipient cannot reach the endpoint directly: only the via route.
        via_only = introduced.with_hints(
            tuple(h for h in introduced.hints if isinstance(h, capsock.uri.ViaHint))
        )
        with anyio.fail_after(10):
            await echo_once(recipient, via_only)
        assert endpoint.stats()["forwarded_refused"] == 0
        # A fresh session from the introducer, after the endpoint revoked the
        # capability: the voucher no longer counts, the transport is refused.
        for session in list(intro._sessions.values()):
            await session.aclose()
        for session in list(recipient._sessions.values()):
            await session.aclose()
        await endpoint.revoke(service.uri)
        with pytest.raises(capsock.Unreachable):
            await recipient.connect(via_only)
        assert endpoint.stats()["forwarded_refused"] >= 1
        tg.cancel_scope.cancel()
