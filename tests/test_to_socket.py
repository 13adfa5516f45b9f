"""capsock.sockets.to_socket: a blocking socket in front of a capsock stream.

The blocking side runs in a worker thread, as a blocking library would.
Both backends.
"""

from __future__ import annotations

import hashlib
import socket
from collections.abc import AsyncIterator

import anyio
import pytest

import capsock
from capsock.sockets import to_socket

pytestmark = pytest.mark.anyio

MiB = 1 << 20


@pytest.fixture
async def streams() -> AsyncIterator[tuple[capsock.Stream, capsock.Stream]]:
    """(client stream, accepted stream) between two nodes."""
    async with capsock.Node(listen=["tcp:127.0.0.1:0"]) as server, capsock.Node() as client:
        listener = await server.listen()
        dialed = await client.connect(listener.uri)
        accepted = await listener.accept()
        yield dialed, accepted
        await accepted.aclose()


def read_all(sock: socket.socket) -> bytes:
    out = bytearray()
    while chunk := sock.recv(65536):
        out += chunk
    return bytes(out)


async def test_bytes_and_half_close_both_ways(
    streams: tuple[capsock.Stream, capsock.Stream],
) -> None:
    dialed, peer = streams

    def blocking(sock: socket.socket) -> bytes:
        sock.sendall(b"hello over a real socket")
        sock.shutdown(socket.SHUT_WR)  # -> send_eof on the stream
        return read_all(sock)  # the peer's EOF reads as b""

    async with to_socket(dialed) as sock, anyio.create_task_group() as tg:
        assert isinstance(sock, socket.socket)
        assert sock.getblocking()

        async def peer_side() -> None:
            got = b""
            with pytest.raises(anyio.EndOfStream):
                while True:
                    got += await peer.receive()
            await peer.send(got.upper())
            await peer.send_eof()

        tg.start_soon(peer_side)
        assert await anyio.to_thread.run_sync(blocking, sock) == b"HELLO OVER A REAL SOCKET"


async def test_megabytes_both_ways_arrive_intact(
    streams: tuple[capsock.Stream, capsock.Stream],
) -> None:
    dialed, peer = streams
    up = bytes(range(256)) * (16 * 4096)  # 16 MiB
    down = bytes(reversed(range(256))) * (8 * 4096)  # 8 MiB
    received = hashlib.sha256()

    def blocking(sock: socket.socket) -> bytes:
        def writer() -> None:
            sock.sendall(up)
            sock.shutdown(socket.SHUT_WR)

        import threading

        thread = threading.Thread(target=writer)
        thread.start()
        data = read_all(sock)
        thread.join()
        return data

    async def peer_side() -> None:
        async def send() -> None:
            for i in range(0, len(down), MiB):
                await peer.send(down[i : i + MiB])
            await peer.send_eof()

        async with anyio.create_task_group() as tg:
            tg.start_soon(send)
            with pytest.raises(anyio.EndOfStream):
                while True:
                    received.update(await peer.receive())

    async with to_socket(dialed) as sock, anyio.create_task_group() as tg:
        tg.start_soon(peer_side)
        got = await anyio.to_thread.run_sync(blocking, sock)
    assert got == down
    assert received.digest() == hashlib.sha256(up).digest()


async def test_a_reset_stream_resets_the_socket(
    streams: tuple[capsock.Stream, capsock.Stream],
) -> None:
    """Never a clean end: what arrived is read, then ConnectionResetError."""
    dialed, peer = streams

    def blocking(sock: socket.socket) -> tuple[bytes, BaseException | None]:
        got = b""
        try:
            while len(got) < 5:
                got += sock.recv(100)
            while chunk := sock.recv(100):
                got += chunk
        except OSError as exc:
            return got, exc
        return got, None

    async with to_socket(dialed) as sock:
        await peer.send(b"first")
        async with anyio.create_task_group() as tg:

            async def reset_soon() -> None:
                await anyio.sleep(0.2)
                peer.reset()

            tg.start_soon(reset_soon)
            got, exc = await anyio.to_thread.run_sync(blocking, sock)
    assert got == b"first"
    assert isinstance(exc, ConnectionResetError)


async def test_a_lost_session_resets_the_socket() -> None:
    async with capsock.Node(listen=["tcp:127.0.0.1:0"]) as server:
        listener = await server.listen()
        async with capsock.Node() as client:
            dialed = await client.connect(listener.uri)
            peer = await listener.accept()
            async with to_socket(dialed) as sock:

                def blocking() -> BaseException | None:
                    try:
                        read_all(sock)
                    except OSError as exc:
                        return exc
                    return None

                async with anyio.create_task_group() as tg:

                    async def kill_soon() -> None:
                        await anyio.sleep(0.2)
                        await server.aclose()

                    tg.start_soon(kill_soon)
                    exc = await anyio.to_thread.run_sync(blocking)
            assert isinstance(exc, ConnectionResetError)
            await peer.aclose()


async def test_leaving_the_block_flushes_then_ends_cleanly(
    streams: tuple[capsock.Stream, capsock.Stream],
) -> None:
    dialed, peer = streams
    payload = b"x" * (4 * MiB)
    async with anyio.create_task_group() as tg:
        got = bytearray()

        async def peer_side() -> None:
            with pytest.raises(anyio.EndOfStream):
                while True:
                    got.extend(await peer.receive())

        tg.start_soon(peer_side)
        async with to_socket(dialed) as sock:
            await anyio.to_thread.run_sync(sock.sendall, payload)
        # left without shutdown(): everything written arrives, then a clean EOF
    assert bytes(got) == payload


async def test_leaving_with_an_exception_resets_the_stream(
    streams: tuple[capsock.Stream, capsock.Stream],
) -> None:
    dialed, peer = streams
    with pytest.raises(ZeroDivisionError):
        async with to_socket(dialed):
            await peer.send(b"hi")
            raise ZeroDivisionError
    with anyio.fail_after(30), pytest.raises(capsock.StreamReset):
        while True:
            await peer.receive()


async def test_caller_closing_on_unread_data_resets_the_stream(
    streams: tuple[capsock.Stream, capsock.Stream],
) -> None:
    dialed, peer = streams
    async with to_socket(dialed) as sock:
        await peer.send(b"unread")
        await anyio.sleep(0.1)
        sock.close()  # the caller drops the socket without reading: as a TCP RST
        with anyio.fail_after(30), pytest.raises(capsock.StreamReset):
            while True:
                await peer.send(b"more" * 1000)
                await anyio.sleep(0.01)
