"""What an RPC peer can make the other side do, and what it learns from errors.

* msgpack-RPC: a service capability that does not name the node that sent it is
  refused before anything is dialled, with one error whatever it holds; a
  genuine one is reached over the existing session only, never at the route
  hints the peer wrote into it.
* Cap'n Proto: the callee sends the type and message of a failed method,
  never its traceback, file paths or stack addresses.
"""

from __future__ import annotations

import re
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import msgpack
import pytest

import capsock
from capsock.keys import KeyPair
from capsock.rpc import msgpack as rpc
from capsock.rpc.wire import SERVICE_EXT
from capsock.uri import Capability, TcpHint

pytestmark = pytest.mark.anyio


# ------------------------------------------------------------------ helpers


class Raw:
    """One side of a msgpack-RPC stream, by hand."""

    def __init__(self, stream: anyio.abc.ByteStream) -> None:
        self.stream = stream
        self.unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)

    async def send(self, obj: Any) -> None:
        await self.stream.send(msgpack.packb(obj, use_bin_type=True))

    async def receive(self) -> Any:
        with anyio.fail_after(10):
            while True:
                for obj in self.unpacker:
                    return obj
                self.unpacker.feed(await self.stream.receive())


class Counter:
    """A TCP listener on loopback that counts the connections it accepts."""

    def __init__(self) -> None:
        self.accepted = 0
        self.port = 0

    async def handle(self, stream: anyio.abc.SocketStream) -> None:
        self.accepted += 1
        await stream.aclose()


@asynccontextmanager
async def counting_listener() -> AsyncIterator[Counter]:
    counter = Counter()
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    counter.port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, counter.handle)
        yield counter
        tg.cancel_scope.cancel()


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def forged(node: capsock.NodeId, token_of: Capability, port: int) -> msgpack.ExtType:
    """A service capability naming ``node``, with a real token and a tcp hint at ``port``."""
    cap = Capability(node, token_of.token, (TcpHint("127.0.0.1", port),))
    return msgpack.ExtType(SERVICE_EXT, str(cap).encode())


class Greeter(rpc.Service):
    def __init__(self) -> None:
        self.calls = 0

    @rpc.method
    def hello(self) -> str:
        self.calls += 1
        return "hello"


class Caller(rpc.Service):
    """Calls back whatever object it is given: what a forged capability would exploit."""

    def __init__(self) -> None:
        self.rang = 0

    @rpc.method
    async def ring(self, obj: Any) -> Any:
        self.rang += 1
        return await obj.call("hello")


# ------------------------------------------------------------------ msgpack-RPC


async def test_forged_service_capability_in_a_request_is_refused_before_any_dial() -> None:
    """A peer names a third node (or us) with hints at an open and at a closed
    port: the same InvalidRequest for all, the method never runs, nothing is dialled."""
    caller = Caller()
    third = KeyPair.generate().node_id
    async with (
        counting_listener() as counter,
        capsock.Node(listen=["tcp:127.0.0.1:0"]) as server,
        capsock.Node() as client,
        anyio.create_task_group() as tg,
    ):
        listener = await server.listen()
        tg.start_soon(lambda: rpc.serve(listener, caller, node=server))
        raw = Raw(await client.connect(listener.uri))
        answers = []
        for node in (third, server.id):
            for port in (counter.port, closed_port()):
                await raw.send([0, 7, "ring", [forged(node, listener.uri, port)]])
                answers.append(await raw.receive())
        first = answers[0]
        assert first[:2] == [1, 7] and first[3] is None
        assert first[2][0] == "InvalidRequest"
        assert "must name the node that sent it" in first[2][1]
        assert all(answer == first for answer in answers), answers
        assert str(counter.port) not in first[2][1]
        assert counter.accepted == 0
        assert caller.rang == 0
        await raw.stream.aclose()
        tg.cancel_scope.cancel()


async def test_genuine_export_is_reached_over_the_session_not_its_hints() -> None:
    """A capability that names the sender, with hints the sender rewrote: the
    callee's call goes over the session the two nodes share; no dial at all."""
    caller = Caller()
    greeter = Greeter()
    async with (
        counting_listener() as counter,
        capsock.Node(listen=["tcp:127.0.0.1:0"]) as server,
        capsock.Node() as client,
        anyio.create_task_group() as tg,
    ):
        listener = await server.listen()
        tg.start_soon(lambda: rpc.serve(listener, caller, node=server))
        export = await client.mint(peer=server.id, label="rpc")
        tg.start_soon(lambda: rpc.serve(export, greeter, node=client))
        raw = Raw(await client.connect(listener.uri))
        cap = export.uri.with_hints((TcpHint("127.0.0.1", counter.port),))
        await raw.send([0, 1, "ring", [msgpack.ExtType(SERVICE_EXT, str(cap).encode())]])
        assert await raw.receive() == [1, 1, None, "hello"]
        assert greeter.calls == 1
        assert counter.accepted == 0
        await raw.stream.aclose()
        tg.cancel_scope.cancel()


async def test_forged_service_capability_in_a_result_fails_that_call() -> None:
    """The same rule for answers: the caller's call raises MalformedMessage,
    one text whatever port the forged capability names; nothing is dialled."""
    third = KeyPair.generate().node_id
    async with (
        counting_listener() as counter,
        capsock.Node(listen=["tcp:127.0.0.1:0"]) as server,
        capsock.Node() as client,
        anyio.create_task_group() as tg,
    ):
        listener = await server.listen()
        ports = [counter.port, closed_port()]

        async def answer_forged(stream: capsock.Stream) -> None:
            raw = Raw(stream)
            for port in ports:
                request = await raw.receive()
                await raw.send([1, request[1], None, forged(third, listener.uri, port)])
            await raw.receive()  # until the client goes

        tg.start_soon(listener.serve, answer_forged)
        texts = []
        async with rpc.Connection(await client.connect(listener.uri), node=client) as conn:
            for _ in ports:
                with pytest.raises(rpc.MalformedMessage) as info:
                    await conn.call("give")
                texts.append(str(info.value))
        assert texts[0] == texts[1]
        assert "must name the node that sent it" in texts[0]
        assert counter.accepted == 0
        tg.cancel_scope.cancel()
