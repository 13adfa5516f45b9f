"""capsock.aio: asyncio Protocol/Transport and StreamReader/StreamWriter over capsock streams.

asyncio only by nature: the trio case of the usage-error test checks the error.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest

import capsock
from capsock import aio

pytestmark = pytest.mark.anyio

MiB = 1 << 20


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def pair() -> AsyncIterator[tuple[capsock.Node, capsock.Node]]:
    async with capsock.Node(listen=["tcp:127.0.0.1:0"]) as server, capsock.Node() as client:
        yield server, client


class Recorder(asyncio.Protocol):
    """Records what the transport does to its protocol."""

    def __init__(self, *, keep_open_on_eof: bool = True) -> None:
        self.transport: asyncio.Transport | None = None
        self.data = bytearray()
        self.events: list[str] = []
        self.keep_open = keep_open_on_eof
        self.lost: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()
        self.got_data = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.events.append("made")

    def data_received(self, data: bytes) -> None:
        self.data += data
        self.got_data.set()

    def eof_received(self) -> bool:
        self.events.append("eof")
        return self.keep_open

    def pause_writing(self) -> None:
        self.events.append("pause_writing")

    def resume_writing(self) -> None:
        self.events.append("resume_writing")

    def connection_lost(self, exc: Exception | None) -> None:
        self.events.append("lost")
        self.lost.set_result(exc)


async def settled(future: asyncio.Future[Any]) -> Any:
    """The future's result; a generous bound so a bug fails the test instead of hanging it."""
    return await asyncio.wait_for(future, 30)


async def serve_one(
    node: capsock.Node, protocol: asyncio.BaseProtocol
) -> tuple[aio.Server, list[asyncio.BaseProtocol]]:
    made: list[asyncio.BaseProtocol] = []

    def factory() -> asyncio.BaseProtocol:
        made.append(protocol)
        return protocol

    return await aio.create_server(node, factory), made


async def test_echo_with_streams_and_half_close(pair: tuple[capsock.Node, capsock.Node]) -> None:
    server_node, client_node = pair
    seen: dict[str, Any] = {}

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for key in ("peername", "capsock_peer_id", "capsock_route", "capsock_capability"):
            seen[key] = writer.get_extra_info(key)
        seen["socket"] = writer.get_extra_info("socket", "none")
        data = await reader.read()  # to the client's EOF
        writer.write(data.upper())
        await writer.drain()
        writer.close()
        await writer.wait_closed()

    async with await aio.start_server(server_node, handle) as server:
        reader, writer = await aio.open_connection(client_node, str(server.uri))
        assert writer.can_write_eof()
        writer.write(b"hello ")
        writer.write(b"capsock")
        writer.write_eof()
        assert await reader.read() == b"HELLO CAPSOCK"
        assert reader.at_eof()
        assert writer.get_extra_info("peername") == server_node.id
        assert writer.get_extra_info("capsock_route").startswith("tcp=127.0.0.1:")
        writer.close()
        await writer.wait_closed()

    assert seen["peername"] == client_node.id  # a NodeId, not an address tuple
    assert isinstance(seen["peername"], capsock.NodeId)
    assert seen["capsock_peer_id"] == client_node.id
    assert seen["capsock_route"].startswith("inbound tcp:127.0.0.1:")
    assert seen["socket"] == "none"  # there is no socket: the default comes back
    assert seen["capsock_capability"] == f"capsock://{server_node.id}/<redacted>"
    token = str(server.uri).split("/")[3].split("?")[0]
    assert token not in seen["capsock_capability"]


async def test_transport_reports_half_close_and_close_to_the_protocol(
    pair: tuple[capsock.Node, capsock.Node],
) -> None:
    server_node, client_node = pair
    served = Recorder(keep_open_on_eof=True)
    server, _ = await serve_one(server_node, served)
    async with server:
        client = Recorder()
        transport, _ = await aio.create_connection(client_node, server.uri, lambda: client)
        transport.write(b"ping")
        transport.write_eof()
        with pytest.raises(RuntimeError, match="write_eof"):
            transport.write(b"more")
        while served.events[-1:] != ["eof"]:
            await asyncio.sleep(0.01)
        assert bytes(served.data) == b"ping"
        assert served.transport is not None
        served.transport.write(b"pong")  # the half-closed side still writes
        served.transport.close()
        assert await settled(served.lost) is None
        while client.events[-1:] != ["eof"]:
            await asyncio.sleep(0.01)
        assert bytes(client.data) == b"pong"
        assert not transport.is_closing()  # both halves closed; open until close(), as asyncio
        transport.close()
        assert await settled(client.lost) is None
        assert client.events == ["made", "eof", "lost"]
        assert served.events == ["made", "eof", "lost"]
        assert transport.is_closing()


async def test_eof_received_false_closes_the_transport(
    pair: tuple[capsock.Node, capsock.Node],
) -> None:
    server_node, client_node = pair
    served = Recorder(keep_open_on_eof=False)
    server, _ = await serve_one(server_node, served)
    async with server:
        client = Recorder(keep_open_on_eof=False)
        transport, _ = await aio.create_connection(client_node, server.uri, lambda: client)
        transport.write_eof()
        assert await settled(served.lost) is None  # closed by itself after eof_received() -> False
        assert await settled(client.lost) is None
        assert client.events == ["made", "eof", "lost"]


async def test_pause_reading_holds_the_writer_back_and_pauses_its_protocol(
    pair: tuple[capsock.Node, capsock.Node],
) -> None:
    """A reader that pauses stops taking bytes: the capsock window fills, the
    writer's buffer grows past the high water mark and its protocol is paused;
    resuming delivers everything, and the writer is resumed."""
    server_node, client_node = pair
    served = Recorder()
    server, _ = await serve_one(server_node, served)
    async with server:
        client = Recorder()
        transport, _ = await aio.create_connection(client_node, server.uri, lambda: client)
        transport.set_write_buffer_limits(high=256 * 1024)
        assert transport.get_write_buffer_limits() == (64 * 1024, 256 * 1024)
        while served.transport is None:
            await asyncio.sleep(0.01)
        served.transport.pause_reading()
        assert not served.transport.is_reading()
        total = 8 * MiB
        block = bytes(range(256)) * 4096  # 1 MiB
        for _ in range(total // len(block)):
            transport.write(block)
        await asyncio.sleep(0.3)
        assert "pause_writing" in client.events
        # what the paused side did take is bounded by capsock's windows, not the 8 MiB
        assert len(served.data) < total // 2
        assert transport.get_write_buffer_size() > 256 * 1024
        served.transport.resume_reading()
        while len(served.data) < total:
            served.got_data.clear()
            await served.got_data.wait()
        assert served.data == block * (total // len(block))
        assert client.events[-1] == "resume_writing"
        assert transport.get_write_buffer_size() == 0
        transport.close()
        assert await settled(client.lost) is None


async def test_drain_waits_for_the_peer(pair: tuple[capsock.Node, capsock.Node]) -> None:
    server_node, client_node = pair
    received = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal received
        while chunk := await reader.read(65536):
            received += len(chunk)
        writer.close()

    async with await aio.start_server(server_node, handle) as server:
        reader, writer = await aio.open_connection(client_node, server.uri)
        for _ in range(16):
            writer.write(b"x" * (256 * 1024))
            await writer.drain()
            assert writer.transport.get_write_buffer_size() <= 64 * 1024 // 4
        writer.write_eof()
        assert await reader.read() == b""
        writer.close()
        await writer.wait_closed()
    assert received == 16 * 256 * 1024


async def test_buffered_protocol_gets_the_bytes(pair: tuple[capsock.Node, capsock.Node]) -> None:
    server_node, client_node = pair

    class Buffered(asyncio.BufferedProtocol):
        def __init__(self) -> None:
            self.buf = bytearray(1000)  # smaller than what arrives at once
            self.got = bytearray()
            self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def get_buffer(self, sizehint: int) -> bytearray:
            return self.buf

        def buffer_updated(self, nbytes: int) -> None:
            self.got += self.buf[:nbytes]

        def eof_received(self) -> bool:
            self.done.set_result(None)
            return False

    served = Buffered()
    server, _ = await serve_one(server_node, served)
    async with server:
        reader, writer = await aio.open_connection(client_node, server.uri)
        payload = bytes(range(256)) * 1000
        writer.write(payload)
        writer.write_eof()
        await served.done
        assert served.got == payload
        assert await reader.read() == b""
        writer.close()


async def test_a_reset_reaches_the_protocol_as_connection_reset(
    pair: tuple[capsock.Node, capsock.Node],
) -> None:
    server_node, client_node = pair
    served = Recorder()
    server, _ = await serve_one(server_node, served)
    async with server:
        reader, writer = await aio.open_connection(client_node, server.uri)
        writer.write(b"hi")
        await served.got_data.wait()
        assert served.transport is not None
        served.transport.abort()  # the stream is reset: the client's reads fail
        assert await settled(served.lost) is None
        with pytest.raises(ConnectionResetError) as info:
            await reader.read()
        assert isinstance(info.value.__cause__, capsock.StreamReset)
        writer.close()


async def test_a_lost_session_fails_the_connection(
    pair: tuple[capsock.Node, capsock.Node],
) -> None:
    server_node, _ = pair
    async with capsock.Node() as other:
        served = Recorder()
        server, _ = await serve_one(server_node, served)
        async with server:
            client = Recorder()
            await aio.create_connection(other, server.uri, lambda: client)
            while served.transport is None:
                await asyncio.sleep(0.01)
            await other.aclose()  # the whole session goes
            exc = await settled(served.lost)
            assert isinstance(exc, ConnectionError)
            assert await settled(client.lost) is not None


async def test_closed_server_refuses_its_capability(
    pair: tuple[capsock.Node, capsock.Node],
) -> None:
    server_node, client_node = pair

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await aio.start_server(server_node, handle)
    assert server.is_serving()
    assert "<redacted>" in repr(server)
    server.close()
    await server.wait_closed()
    assert not server.is_serving()
    with pytest.raises(capsock.CapabilityRejected):
        await aio.open_connection(client_node, server.uri)


async def test_a_failing_protocol_factory_does_not_stop_the_server(
    pair: tuple[capsock.Node, capsock.Node], caplog: pytest.LogCaptureFixture
) -> None:
    server_node, client_node = pair
    calls = 0

    def factory() -> asyncio.BaseProtocol:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ValueError("boom")
        return Recorder(keep_open_on_eof=False)

    async with await aio.create_server(server_node, factory) as server:
        first = Recorder(keep_open_on_eof=False)
        await aio.create_connection(client_node, server.uri, lambda: first)
        await settled(first.lost)  # that stream was closed
        second = Recorder(keep_open_on_eof=False)
        transport, _ = await aio.create_connection(client_node, server.uri, lambda: second)
        transport.write_eof()
        assert await settled(second.lost) is None
    assert "protocol factory failed" in caplog.text


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_trio_gets_a_clear_error(anyio_backend: str) -> None:
    async with capsock.Node(listen=["tcp:127.0.0.1:0"]) as node:
        listener = await node.listen()
        with pytest.raises(capsock.LocalUsageError, match="asyncio"):
            await aio.create_server(listener, asyncio.Protocol)
        await listener.aclose()
    assert anyio.get_current_task()  # still on trio, no loop was touched
