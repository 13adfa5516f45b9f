"""Relays on loopback: a relay process, registered clients, restarts, many sessions."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import anyio
import pytest

import capsock
from capsock import CapsockAttribute

from .chaos import RelayProcess, free_port
from .helpers import echo, read_all

pytestmark = pytest.mark.anyio
ROOT = Path(__file__).resolve().parents[1]


async def _wait_registered(node: capsock.Node) -> None:
    with anyio.fail_after(20):
        while not all(s == "registered" for s in node.relay_status.values()):
            await anyio.sleep(0.05)


async def test_nodes_without_listeners_talk_through_a_relay(tmp_path: Path) -> None:
    relay = await anyio.to_thread.run_sync(RelayProcess, tmp_path / "relay", free_port())
    try:
        async with (
            capsock.Node(relays=[relay.uri]) as endpoint,
            capsock.Node() as dialer,
            anyio.create_task_group() as tg,
        ):
            await _wait_registered(endpoint)
            service = await endpoint.listen()
            assert [type(h).__name__ for h in service.uri.hints] == ["ViaHint"]
            tg.start_soon(service.serve, echo)
            stream = await dialer.connect(str(service.uri))
            assert stream.extra(CapsockAttribute.route).startswith("via ")
            payload = os.urandom(4 << 20)
            async with anyio.create_task_group() as inner:

                async def send() -> None:
                    await stream.send(payload)
                    await stream.send_eof()

                inner.start_soon(send)
                assert (
                    hashlib.sha256(await read_all(stream)).digest()
                    == hashlib.sha256(payload).digest()
                )
            await stream.aclose()
            tg.cancel_scope.cancel()
    finally:
        relay.kill()


async def test_relay_restart_fails_open_streams_and_clients_come_back(tmp_path: Path) -> None:
    state, port = tmp_path / "relay", free_port()
    relay = await anyio.to_thread.run_sync(RelayProcess, state, port)
    cfg = capsock.NodeConfig(relay_backoff=(0.1, 0.5))
    try:
        async with (
            capsock.Node(relays=[relay.uri], config=cfg) as endpoint,
            capsock.Node() as dialer,
            anyio.create_task_group() as tg,
        ):
            await _wait_registered(endpoint)
            service = await endpoint.listen()
            tg.start_soon(service.serve, echo)
            stream = await dialer.connect(service.uri)
            await stream.send(b"before")
            assert await stream.receive() == b"before"
            relay.kill()
            with anyio.fail_after(30), pytest.raises(capsock.ConnectionLost):
                while True:
                    await stream.receive()
            relay = await anyio.to_thread.run_sync(RelayProcess, state, port)
            await _wait_registered(endpoint)
            again = await dialer.connect(service.uri)  # same URI: the relay cap is sturdy
            await again.send(b"after")
            await again.send_eof()
            assert await read_all(again) == b"after"
            tg.cancel_scope.cancel()
    finally:
        relay.kill()


@pytest.mark.slow
async def test_one_relay_carries_200_sessions_and_1000_streams(tmp_path: Path) -> None:
    relay = await anyio.to_thread.run_sync(RelayProcess, tmp_path / "relay", free_port())
    cfg = capsock.NodeConfig(listener_backlog=1024)
    try:
        async with (
            capsock.Node(relays=[relay.uri], config=cfg) as endpoint,
            anyio.create_task_group() as tg,
        ):
            await _wait_registered(endpoint)
            service = await endpoint.listen()
            tg.start_soon(service.serve, echo)
            failures: list[str] = []

            async def client(i: int) -> None:
                async with capsock.Node() as node, anyio.create_task_group() as streams:
                    for j in range(5):
                        streams.start_soon(one_stream, node, i, j)

            async def one_stream(node: capsock.Node, i: int, j: int) -> None:
                payload = hashlib.sha256(f"{i}/{j}".encode()).digest() * 2048  # 64 KiB
                stream = await node.connect(service.uri)
                async with stream, anyio.create_task_group() as inner:

                    async def send() -> None:
                        await stream.send(payload)
                        await stream.send_eof()

                    inner.start_soon(send)
                    if await read_all(stream) != payload:
                        failures.append(f"{i}/{j}")

            with anyio.fail_after(240):
                async with anyio.create_task_group() as clients:
                    for i in range(200):
                        clients.start_soon(client, i)
            assert failures == []
            assert endpoint.stats()["streams_accepted"] == 1000
            tg.cancel_scope.cancel()
    finally:
        relay.kill()
