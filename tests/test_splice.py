"""Spliced forwarding (protocol 10.10): a real relay on loopback, both backends.

A relayed session that both ends and the relay support runs over two fresh
TCP connections the relay copies without decrypting; anything else (a peer
without support, a failed setup) gets the nested forwarding of 10.5.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import pytest

import capsock
from capsock import CapsockAttribute
from capsock.uri import Capability

from .helpers import echo, read_all

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def relayed(
    relay_cfg: capsock.NodeConfig | None = None,
    endpoint_cfg: capsock.NodeConfig | None = None,
    dialer_cfg: capsock.NodeConfig | None = None,
) -> AsyncIterator[tuple[capsock.Node, capsock.Node, capsock.Node, Capability]]:
    """A relay F on loopback, an endpoint E registered with it, a dialer R.

    Yields (relay, endpoint, dialer, E's echo capability, reachable only via F).
    The ends try no direct path: on loopback a punch would win at once and
    replace the spliced session these tests look at.
    """
    endpoint_cfg = dataclasses.replace(endpoint_cfg or capsock.NodeConfig(), direct_paths=False)
    dialer_cfg = dataclasses.replace(dialer_cfg or capsock.NodeConfig(), direct_paths=False)
    async with (
        capsock.Node(listen=["tcp:127.0.0.1:0"], config=relay_cfg) as relay,
        anyio.create_task_group() as tg,
    ):
        forwarding = await relay.forwarding()
        async with (
            capsock.Node(relays=[forwarding.uri], config=endpoint_cfg) as endpoint,
            capsock.Node(config=dialer_cfg) as dialer,
        ):
            with anyio.fail_after(20):
                await endpoint.wait_registered()
            service = await endpoint.listen()
            assert [type(h).__name__ for h in service.uri.hints] == ["ViaHint"]
            tg.start_soon(service.serve, echo)
            yield relay, endpoint, dialer, service.uri
            tg.cancel_scope.cancel()


async def _echo_hash(stream: capsock.Stream, size: int) -> None:
    payload = os.urandom(size)
    async with anyio.create_task_group() as tg:

        async def send() -> None:
            await stream.send(payload)
            await stream.send_eof()

        tg.start_soon(send)
        got = await read_all(stream)
    assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()


async def test_a_relayed_transfer_is_spliced_and_intact() -> None:
    async with relayed() as (relay, endpoint, dialer, cap):
        stream = await dialer.connect(cap)
        assert stream.extra(CapsockAttribute.route) == f"via {relay.id.short()} (spliced)"
        await _echo_hash(stream, 2 << 20)
        await stream.aclose()
        stats = relay.stats()
        assert stats["spliced_forwards"] == 1
        assert stats["splice_fallbacks"] == 0
        # Both directions went through the copy loop: at least the payload twice.
        assert stats["spliced_bytes"] >= 2 * (2 << 20)
        accepted = endpoint.stats()
        assert accepted["streams_accepted"] == 1
        spliced = [s for s in endpoint._sessions.values() if "(spliced)" in s.route]
        assert len(spliced) == 1


@pytest.mark.parametrize("who", ["relay", "endpoint", "dialer"])
async def test_a_peer_without_support_gets_nested_forwarding(who: str) -> None:
    off = capsock.NodeConfig(splice=False)
    cfgs = {"relay_cfg": None, "endpoint_cfg": None, "dialer_cfg": None}
    cfgs[f"{who}_cfg"] = off
    async with relayed(**cfgs) as (relay, _endpoint, dialer, cap):
        stream = await dialer.connect(cap)
        assert stream.extra(CapsockAttribute.route) == f"via {relay.id.short()}"
        await _echo_hash(stream, 256 << 10)
        await stream.aclose()
        stats = relay.stats()
        assert stats["spliced_forwards"] == 0
        assert stats["splice_hellos_refused"] == 0
