"""Interop: the independent, spec-only client in ``spec_client.py`` against a real node.

``spec_client`` is written from ``docs/protocol.md`` alone and never imports
capsock; these tests run a real ``capsock.Node`` on loopback in the test's
event loop and the blocking client in a worker thread (or a subprocess).
"""

from __future__ import annotations

import base64
import os
import socket
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager, suppress
from pathlib import Path

import anyio
import pytest
from nacl import bindings as nb

import capsock
import capsock.testing

sys.path.insert(0, str(Path(__file__).parent))
import spec_client

pytestmark = pytest.mark.anyio

CLIENT = Path(__file__).with_name("spec_client.py")


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@asynccontextmanager
async def echo_node(delay: float = 0) -> AsyncIterator[tuple[capsock.Node, str]]:
    """A real node on 127.0.0.1 whose listener echoes every accepted stream.

    With ``delay``, the application waits that long before it reads anything, so
    a client that did not respect the credit windows would overrun them.
    """
    async with capsock.Node(listen=["tcp:127.0.0.1:0"]) as node:
        listener = await node.listen()

        async def serve() -> None:
            async with anyio.create_task_group() as streams:
                while True:
                    stream = await listener.accept()
                    streams.start_soon(slow_echo, stream)

        async def slow_echo(stream: capsock.Stream) -> None:
            await anyio.sleep(delay)
            await capsock.testing.echo(stream)

        async with anyio.create_task_group() as tg:
            tg.start_soon(serve)
            yield node, str(listener.uri)
            tg.cancel_scope.cancel()


def run_client(uri: str, payload: bytes) -> Awaitable[bytes]:
    return anyio.to_thread.run_sync(spec_client.echo_once, uri, payload, 30.0)


def with_token_byte_flipped(uri: str, index: int) -> str:
    head, _, rest = uri.rpartition("/")
    token_text, sep, query = rest.partition("?")
    token = bytearray(base64.urlsafe_b64decode(token_text + "=" * (-len(token_text) % 4)))
    token[index] ^= 0x01
    new_text = base64.urlsafe_b64encode(bytes(token)).decode().rstrip("=")
    return f"{head}/{new_text}{sep}{query}"


def with_node_id(uri: str, node_id: bytes) -> str:
    text = base64.b32encode(node_id).decode().rstrip("=").lower()
    prefix = "capsock://"
    rest = uri[len(prefix) :]
    return prefix + text + rest[52:]


class CountingProxy:
    """A one-connection TCP proxy that records every byte the client sends."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.server.getsockname()[1]
        self.client_bytes = bytearray()
        self.done = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, record: bool) -> None:
        try:
            while chunk := src.recv(65536):
                if record:
                    self.client_bytes += chunk
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def _run(self) -> None:
        conn, _ = self.server.accept()
        with conn, socket.create_connection(self.upstream) as up:
            back = threading.Thread(target=self._pipe, args=(up, conn, False))
            back.start()
            self._pipe(conn, up, True)
            back.join()
        self.server.close()
        self.done.set()


async def test_one_mib_round_trip() -> None:
    """(1) 1 MiB > the 256 KiB initial stream window: credit must be returned (6.4)."""
    payload = os.urandom(1 << 20)
    async with echo_node() as (_, uri):
        assert await run_client(uri, payload) == payload


async def test_larger_than_the_nodes_granted_window() -> None:
    """5 MiB > the node's 4 MiB stream window, and the endpoint application reads
    nothing for 0.5 s: the client must stop at the credit and wait for WINDOW (6.4)."""
    payload = os.urandom(5 << 20)
    async with echo_node(delay=0.5) as (_, uri):
        assert await run_client(uri, payload) == payload


async def test_several_sessions_and_empty_payload() -> None:
    async with echo_node() as (_, uri):
        assert await run_client(uri, b"") == b""
        assert await run_client(uri, b"hello") == b"hello"


async def test_flipped_token_byte_is_rejected_with_refused() -> None:
    """(2) A corrupted tag is a uniform ``REJECT(1, REFUSED)`` (4.4, 8)."""
    async with echo_node() as (_, uri):
        token_len = len(spec_client.parse_capability(uri).token)
        for index in (1, token_len - 1):  # a root_id byte, a tag byte
            bad = with_token_byte_flipped(uri, index)
            with pytest.raises(spec_client.CapabilityRefused) as info:
                await run_client(bad, b"never delivered")
            assert info.value.code == 4  # REFUSED
        # The session-level refusal did not break the node: the real URI still works.
        assert await run_client(uri, b"still fine") == b"still fine"


async def test_wrong_node_key_fails_handshake_before_token() -> None:
    """(3) Another valid key: the node hangs up after message 1 (3.3, 3.4)."""
    other_id, _ = nb.crypto_sign_seed_keypair(os.urandom(32))
    async with echo_node() as (_, uri):
        cap = spec_client.parse_capability(uri)
        proxy = CountingProxy(cap.tcp[0])
        proxied = with_node_id(uri, other_id).replace(
            f"tcp=127.0.0.1:{cap.tcp[0][1]}", f"tcp=127.0.0.1:{proxy.port}"
        )
        with pytest.raises(spec_client.HandshakeFailed):
            await run_client(proxied, b"never sent")
        with anyio.fail_after(5):
            await anyio.to_thread.run_sync(proxy.done.wait)
    # Only message 1 went out: one record, 128 bytes (3.3, no cipher offer).
    assert bytes(proxy.client_bytes[:2]) == b"\x00\x80"
    assert len(proxy.client_bytes) == 2 + 128


async def test_cli_subprocess() -> None:
    payload = os.urandom(100_000)
    async with echo_node() as (_, uri):

        def run() -> subprocess.CompletedProcess[bytes]:
            argv = [sys.executable, str(CLIENT), uri]
            return subprocess.run(argv, input=payload, capture_output=True, timeout=60)

        result = await anyio.to_thread.run_sync(run)
    assert result.returncode == 0, result.stderr
    assert result.stdout == payload
