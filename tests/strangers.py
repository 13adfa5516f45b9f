"""Strangers for admission tests: connections that cost a node, from a source of their own.

Every helper dials from ``ATTACKER`` (another loopback address than the good
clients' 127.0.0.1), so per-source limits treat the attack and the good
clients as the different sources they would be on a real network.
"""

from __future__ import annotations

import contextlib
import os

import anyio
import anyio.abc

import capsock
from capsock import Capability, NodeConfig
from capsock.core.frames import Ping, encode_frame
from capsock.core.handshake import InitiatorHandshake
from capsock.keys import KeyPair, NodeId

from .helpers import read_all

ATTACKER = "127.0.0.2"


async def good_client(uri: Capability, size: int = 1024, limit: float = 20.0) -> float:
    """A fresh node from 127.0.0.1: connect to ``uri``, echo ``size`` random
    bytes (raises if not served within ``limit``); returns the seconds it took."""
    start = anyio.current_time()
    payload = os.urandom(size)
    with anyio.fail_after(limit):
        async with capsock.Node(config=NodeConfig(connect_timeout=10)) as client:
            stream = await client.connect(uri)
            await stream.send(payload)
            await stream.send_eof()
            assert await read_all(stream) == payload
            await stream.aclose()
    return anyio.current_time() - start


async def _read_record(sock: anyio.abc.SocketStream) -> tuple[bytes, bytes]:
    buf = bytearray()
    while len(buf) < 2 or len(buf) < 2 + ((buf[0] << 8) | buf[1]):
        buf += await sock.receive()
    size = 2 + ((buf[0] << 8) | buf[1])
    return bytes(buf[2:size]), bytes(buf[size:])


async def stranger(host: str, port: int, node: NodeId) -> anyio.abc.SocketStream | None:
    """A completed handshake with a fresh key and one PING: a confirmed session
    that never presents a capability.  None if the node dropped it."""
    hs = InitiatorHandshake(KeyPair.generate(), node)
    try:
        sock = await anyio.connect_tcp(host, port, local_host=ATTACKER)
    except OSError:
        return None
    try:
        await sock.send(hs.first_message())
        message, _ = await _read_record(sock)
        result = hs.read_second(message)
        await sock.send(result.cipher.encrypt_record(encode_frame(Ping(b"12345678"))))
    except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
        await sock.aclose()
        return None
    return sock


async def send_first_message(host: str, port: int, message: bytes) -> bool:
    """Send a (replayed) message 1; True if the node answered, False if it hung up."""
    try:
        sock = await anyio.connect_tcp(host, port, local_host=ATTACKER)
    except OSError:
        return False
    async with sock:
        try:
            await sock.send(message)
            await _read_record(sock)
        except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
            return False
        return True


async def close_all(socks: list[anyio.abc.SocketStream | None]) -> None:
    for sock in socks:
        if sock is not None:
            with contextlib.suppress(OSError):
                await sock.aclose()
