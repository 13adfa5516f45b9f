"""Shared test helpers: echo handlers, hashing readers, node pairs."""

from __future__ import annotations

import hashlib
import os

import anyio
import anyio.abc

from capsock import testing

echo = testing.echo
read_all = testing.read_to_eof


async def send_and_hash(stream: anyio.abc.ByteStream, total: int, chunk: int = 1 << 20) -> str:
    """Send ``total`` random bytes, then EOF; return their SHA-256."""
    h = hashlib.sha256()
    block = os.urandom(chunk)
    sent = 0
    while sent < total:
        n = min(chunk, total - sent)
        piece = block[:n] if sent % (2 * chunk) == 0 else block[n - 1 :: -1][:n]
        h.update(piece)
        await stream.send(piece)
        sent += n
    await stream.send_eof()
    return h.hexdigest()


async def receive_and_hash(stream: anyio.abc.ByteStream) -> tuple[str, int]:
    h = hashlib.sha256()
    n = 0
    while True:
        try:
            data = await stream.receive(1 << 20)
        except anyio.EndOfStream:
            return h.hexdigest(), n
        h.update(data)
        n += len(data)
