"""Sessions forwarded to a node through its relay that never present a
capability are shed first when the forwarded-session slots are full, as
direct strangers are (docs/security.md, "What a stranger can cost")."""

from __future__ import annotations

import contextlib

import anyio
import pytest

import capsock
from capsock import CapsockError, NodeConfig

from .helpers import echo, read_all

pytestmark = pytest.mark.anyio


async def test_idle_forwarded_strangers_are_shed_for_a_good_relayed_client() -> None:
    """Four nodes holding a stale URI of a relayed endpoint reach it through
    the relay (their OPEN is refused, their sessions stay): with four slots
    for forwarded sessions, the next good client must still be served."""
    config = NodeConfig(max_forwarded_sessions=4)
    async with (
        capsock.Node(listen=["tcp:127.0.0.1:0"]) as relay_node,
        anyio.create_task_group() as tg,
    ):
        relay = await relay_node.forwarding()
        async with capsock.Node(relays=[relay.uri], config=config) as endpoint:
            with anyio.fail_after(10):
                await endpoint.wait_registered()
            service = await endpoint.listen()
            tg.start_soon(service.serve, echo)
            closed = await endpoint.listen()
            stale = closed.uri  # a capability whose listener is gone: refused
            await closed.aclose()
            async with contextlib.AsyncExitStack() as stack:
                for _ in range(4):
                    squatter = await stack.enter_async_context(capsock.Node())
                    with pytest.raises(CapsockError):
                        await squatter.connect(stale)
                assert endpoint.stats()["forwarded_sessions"] == 4
                async with capsock.Node() as good:
                    with anyio.fail_after(10):
                        stream = await good.connect(service.uri)
                        await stream.send(b"in")
                        await stream.send_eof()
                        assert await read_all(stream) == b"in"
                        await stream.aclose()
                assert endpoint.stats()["connections_shed"] >= 1
        tg.cancel_scope.cancel()
