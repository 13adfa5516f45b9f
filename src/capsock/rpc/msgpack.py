"""msgpack-RPC over capsock streams, with capability passing; asyncio and trio.

A :class:`Connection` speaks the msgpack-RPC specification over one byte
stream.  It is symmetric: both ends may call each other, with any number of
calls in flight (answers are matched by msgid).  What a side offers is a
:class:`Service`: only methods marked with :func:`method` can be called.

::

    from capsock.rpc import msgpack as rpc

    class Calc(rpc.Service):
        @rpc.method
        async def add(self, a: int, b: int) -> int:
            return a + b

    # server
    await rpc.serve(listener, Calc(), node=node)
    # client
    async with rpc.connect(node, uri) as conn:
        assert await conn.call("add", 1, 2) == 3

Capability passing: a :class:`capsock.Capability` in params or results travels
as itself (msgpack extension type 67, see :mod:`capsock.rpc.wire`).  A
:class:`Service` object in params or results is *exported*: the sending node
mints a fresh temporary socket bound to the receiving peer, serves the service
on it with this same protocol, and sends its capability (extension type 83);
the receiver gets a :class:`RemoteObject` to call.  Exports are revoked when
the connection they were sent over closes.  Passing a :class:`RemoteObject`
on to a third node exports a forwarding proxy (the capability is bound to
the peer it was sent to, so it cannot simply be handed on); passing it back to
the node it came from gives that node its own object again.  See ``docs/rpc.md``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import anyio.abc

from ..net.stream import Stream
from ..node import Listener, Node
from ..uri import Capability
from . import ConnectionClosed, MalformedMessage, RemoteError, RpcError, RpcProtocolError
from .connection import Connection
from .remote import RemoteObject
from .service import RpcConfig, Service, current_connection, method

__all__ = [
    "Connection",
    "ConnectionClosed",
    "MalformedMessage",
    "RemoteError",
    "RemoteObject",
    "RpcConfig",
    "RpcError",
    "RpcProtocolError",
    "Service",
    "connect",
    "current_connection",
    "method",
    "serve",
    "serve_stream",
]

# ------------------------------------------------------------------ entry points

ServiceFactory = Callable[[Stream], Service | None]


async def serve_stream(
    stream: anyio.abc.ByteStream,
    service: Service | None,
    *,
    node: Node | None = None,
    config: RpcConfig | None = None,
) -> None:
    """Serve ``service`` on one stream until the connection ends (the peer may
    call back too, through :func:`current_connection`).  Closes the stream."""
    async with Connection(stream, service, node=node, config=config) as conn:
        await conn.wait_closed()


async def serve(
    listener: Listener,
    service: Service | ServiceFactory | None,
    *,
    node: Node,
    config: RpcConfig | None = None,
    task_group: anyio.abc.TaskGroup | None = None,
) -> None:
    """Serve msgpack-RPC on every stream ``listener`` accepts, until it is closed.

    Args:
        service: one :class:`Service` shared by all connections, or a factory
            called with each accepted stream (e.g. to use ``stream.peer``).
        node: the node the listener belongs to (for capability passing).
    """

    async def handle(stream: Stream) -> None:
        svc = service if isinstance(service, Service) or service is None else service(stream)
        await serve_stream(stream, svc, node=node, config=config)

    await listener.serve(handle, task_group)


@asynccontextmanager
async def connect(
    node: Node,
    uri: str | Capability,
    service: Service | None = None,
    *,
    config: RpcConfig | None = None,
) -> AsyncIterator[Connection]:
    """Open a stream to ``uri`` and run a :class:`Connection` over it::

        async with rpc.connect(node, uri) as conn:
            await conn.call("ping")

    Args:
        service: what this side offers the peer (it may call back).

    Raises:
        The errors of :meth:`capsock.Node.connect` (``InvalidCapability``,
        ``CapabilityRejected``, ``Unreachable``, ...).
    """
    stream = await node.connect(uri)
    async with Connection(stream, service, node=node, config=config) as conn:
        yield conn
