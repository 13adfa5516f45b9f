"""``Node.wait_registered()``: an awaitable "registered with the relay" signal."""

from __future__ import annotations

import anyio
import pytest

import capsock
from capsock import CapabilityRejected

from .helpers import echo, read_all

pytestmark = pytest.mark.anyio


async def test_wait_registered_returns_once_every_relay_holds_a_registration() -> None:
    async with (
        capsock.Node(listen=["tcp:127.0.0.1:0"]) as relay_node,
        anyio.create_task_group() as tg,
    ):
        relay = await relay_node.forwarding()
        async with capsock.Node(relays=[relay.uri]) as endpoint, capsock.Node() as dialer:
            with anyio.fail_after(10):
                await endpoint.wait_registered()
            assert set(endpoint.relay_status.values()) == {"registered"}
            service = await endpoint.listen()
            tg.start_soon(service.serve, echo)
            stream = await dialer.connect(service.uri)  # works at once: no polling needed
            await stream.send(b"hi")
            await stream.send_eof()
            assert await read_all(stream) == b"hi"
            await stream.aclose()
            with anyio.fail_after(1):
                await endpoint.wait_registered()  # still registered: returns at once
        tg.cancel_scope.cancel()


async def test_wait_registered_raises_when_the_relay_refuses_for_good() -> None:
    async with capsock.Node(listen=["tcp:127.0.0.1:0"]) as relay_node:
        relay = await relay_node.forwarding()
        await relay_node.revoke(relay.uri)
        async with capsock.Node(relays=[relay.uri]) as endpoint:
            with anyio.fail_after(10), pytest.raises(CapabilityRejected):
                await endpoint.wait_registered()


async def test_wait_registered_without_relays_returns_at_once() -> None:
    async with capsock.Node() as node:
        with anyio.fail_after(1):
            await node.wait_registered()


async def test_wait_registered_ends_when_the_node_closes() -> None:
    async with capsock.Node(listen=["tcp:127.0.0.1:0"]) as relay_node:
        relay = await relay_node.forwarding()
    # The relay is gone: the node keeps retrying; closing it ends the wait.
    async with capsock.Node(relays=[relay.uri]) as endpoint, anyio.create_task_group() as tg:
        failed: list[BaseException] = []

        async def wait() -> None:
            try:
                await endpoint.wait_registered()
            except capsock.LocalUsageError as exc:
                failed.append(exc)

        tg.start_soon(wait)
        await anyio.sleep(0.2)
        await endpoint.aclose()
    assert failed
