"""The stream conformance suite, run against every kind of stream capsock makes.

It also runs against anyio's own TCP streams, so the suite itself is shown to
test the contract and not capsock's quirks.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import anyio.abc
import pytest

from capsock.testing import check_byte_stream, stream_pair

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def anyio_tcp_pair() -> AsyncIterator[tuple[anyio.abc.ByteStream, anyio.abc.ByteStream]]:
    multi = await anyio.create_tcp_listener(local_host="127.0.0.1")
    listener = multi.listeners[0]
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with multi:
        a = await anyio.connect_tcp("127.0.0.1", port)
        b = await listener.accept()
        try:
            yield a, b
        finally:
            with anyio.CancelScope(shield=True):
                await a.aclose()
                await b.aclose()


async def test_suite_accepts_anyio_tcp(anyio_backend: str) -> None:
    # anyio's asyncio TCP stream buffers writes in user space without bound, so
    # it does not block a writer whose reader stalls; trio's does.
    await check_byte_stream(
        anyio_tcp_pair,
        send_after_eof_raises=(anyio.ClosedResourceError, anyio.BrokenResourceError, RuntimeError),
        skip={"backpressure"} if anyio_backend == "asyncio" else (),
        # anyio's TCP send_eof() is no checkpoint on either backend.
        no_checkpoint={"send_eof"},
    )


async def test_direct_tcp_streams_conform() -> None:
    await check_byte_stream(stream_pair)


async def test_direct_unix_streams_conform(tmp_path: Path) -> None:
    def make() -> object:
        return stream_pair("unix", socket_path=str(tmp_path / "s.sock"))

    await check_byte_stream(make)  # type: ignore[arg-type]
