"""HTTP over capsock: serve an ASGI app on a capability, call it with httpx.

Serving::

    from capsock import http

    listener = await node.listen()
    await http.serve(listener, app)          # app: any ASGI 3 app (Starlette, FastAPI, ...)

Calling::

    transport = http.Transport(node, {"api.example": uri})
    async with httpx.AsyncClient(transport=transport) as client:
        response = await client.get("http://api.example/items")

Both run on asyncio and trio.  Needs the ``http`` extra
(``pip install 'capsock[http]'``: h11, httpcore, httpx).

The server is a small HTTP/1.1 server of capsock's own on the sans-IO ``h11``
engine.  uvicorn and hypercorn were considered: neither has a public way to
serve a connection it did not accept itself (uvicorn's public ``Server.serve``
and hypercorn's ``serve`` take listening sockets; their per-connection classes
are internal, and hypercorn's asks the connection for a real socket).  Owning
the server is also what makes the scope honest: ``scope["client"]`` is
``None`` (there is no address), ``scope["server"]`` is ``None``, and who is
calling is in ``scope["extensions"]["capsock"]``: ``peer_id`` (the
authenticated :class:`NodeId`), ``route`` and ``capability`` (redacted text).
An asyncio server such as uvicorn can still be run over
:mod:`capsock.aio` if you accept its internal protocol classes.

The client side is an httpx transport over httpcore's connection pool with a
capsock network backend (httpcore's public ``AsyncNetworkBackend``): each
pooled connection is one capsock stream, and all of a node's streams to one
peer share the node's one session with it.  Use ``http://`` URLs: the stream
is already end-to-end encrypted and authenticated by the capability; TLS on
top is refused (``httpx.UnsupportedProtocol``).
"""

from __future__ import annotations

try:
    import h11  # noqa: F401
    import httpcore  # noqa: F401
    import httpx  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        f"capsock.http needs the 'http' extra ({exc.name} is missing): pip install 'capsock[http]'"
    ) from exc

from ._client import NetworkBackend, NetworkStream, Transport
from ._server import KEEP_ALIVE, MAX_HEADER_BYTES, ASGIApp, ClientDisconnected, serve, serve_stream

__all__ = [
    "KEEP_ALIVE",
    "MAX_HEADER_BYTES",
    "ASGIApp",
    "ClientDisconnected",
    "NetworkBackend",
    "NetworkStream",
    "Transport",
    "serve",
    "serve_stream",
]
