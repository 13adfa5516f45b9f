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

import contextlib
import logging
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, MutableMapping
from types import TracebackType
from typing import Any, Literal

import anyio
import anyio.abc

try:
    import h11
    import httpcore
    import httpx
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        f"capsock.http needs the 'http' extra ({exc.name} is missing): pip install 'capsock[http]'"
    ) from exc

from .errors import CapsockError
from .net.stream import CapsockAttribute, Stream
from .node import Listener, Node
from .uri import Capability, parse

__all__ = [
    "ASGIApp",
    "ClientDisconnected",
    "NetworkBackend",
    "NetworkStream",
    "Transport",
    "serve",
    "serve_stream",
]

log = logging.getLogger("capsock.http")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_CHUNK = 65536
_ASGI = {"version": "3.0", "spec_version": "2.4"}
_STREAM_ERRORS = (anyio.BrokenResourceError, anyio.ClosedResourceError, CapsockError)
KEEP_ALIVE = 30.0
"""Seconds a server connection may sit idle before (and between) requests."""
MAX_HEADER_BYTES = 16 * 1024
"""Largest request line + headers the server reads (h11's default)."""


class ClientDisconnected(OSError):
    """Raised by the ASGI ``send`` of a request whose client is gone (ASGI asks for an OSError)."""


# ====================================================================== server


def _capsock_extension(stream: Stream) -> dict[str, Any]:
    cap = stream.extra(CapsockAttribute.capability, None)
    return {
        "peer_id": stream.peer,
        "route": stream.extra(CapsockAttribute.route, None),
        "capability": cap.redacted() if cap is not None else None,
    }


def _target(target: bytes) -> tuple[str, bytes, bytes]:
    """(path, raw_path, query_string) of a request target, origin- or absolute-form."""
    if not target.startswith(b"/") and target != b"*":
        split = urllib.parse.urlsplit(target)
        target = (split.path or b"/") + (b"?" + split.query if split.query else b"")
    raw_path, _, query = target.partition(b"?")
    return urllib.parse.unquote(raw_path.decode("latin-1")), raw_path, query


class _Connection:
    """One HTTP/1.1 connection (one capsock stream): requests one after another."""

    def __init__(
        self, stream: Stream, app: ASGIApp, state: dict[str, Any], keep_alive: float, root_path: str
    ) -> None:
        self.stream = stream
        self.app = app
        self.state = state
        self.keep_alive = keep_alive
        self.root_path = root_path
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
        self.extension = _capsock_extension(stream)

    async def _next_event(self) -> Any:
        while True:
            event = self.h11.next_event()
            if event is not h11.NEED_DATA:
                return event
            try:
                data = await self.stream.receive(_CHUNK)
            except anyio.EndOfStream:
                data = b""
            self.h11.receive_data(data)

    async def _send(self, event: Any) -> None:
        data = self.h11.send(event)
        if data:
            await self.stream.send(data)

    async def run(self) -> None:
        try:
            while True:
                with anyio.move_on_after(self.keep_alive) as idle:
                    event = await self._next_event()
                if idle.cancel_called or not isinstance(event, h11.Request):
                    return  # idle too long, or the client closed (ConnectionClosed)
                if not await self._request(event) or not await self._drain():
                    return
                if self.h11.our_state is not h11.DONE:
                    return  # MUST_CLOSE: "connection: close", or HTTP/1.0
                self.h11.start_next_cycle()
        except h11.RemoteProtocolError as exc:
            log.info("bad HTTP request from %s: %s", self.stream.peer.short(), exc)
            if self.h11.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                with contextlib.suppress(h11.LocalProtocolError, *_STREAM_ERRORS):
                    await self._simple_response(exc.error_status_hint, b"bad request\n")

    async def _drain(self) -> bool:
        """Read the rest of a request body the app did not read (a GET's empty
        one, usually); False if it is large or slow: then the connection closes."""
        budget = _CHUNK
        with anyio.move_on_after(self.keep_alive):
            while self.h11.their_state is h11.SEND_BODY:
                event = await self._next_event()
                if isinstance(event, h11.Data):
                    budget -= len(event.data)
                    if budget < 0:
                        return False
                elif not isinstance(event, h11.EndOfMessage):
                    return False
        return self.h11.their_state is h11.DONE

    async def _simple_response(self, status: int, body: bytes) -> None:
        headers = [("content-type", "text/plain; charset=utf-8"), ("connection", "close")]
        headers.append(("content-length", str(len(body))))
        await self._send(h11.Response(status_code=status, headers=headers))
        await self._send(h11.Data(data=body))
        await self._send(h11.EndOfMessage())

    async def _request(self, request: h11.Request) -> bool:
        """Run the app for one request; False if the connection cannot go on."""
        path, raw_path, query = _target(request.target)
        scope: Scope = {
            "type": "http",
            "asgi": dict(_ASGI),
            "http_version": request.http_version.decode("ascii"),
            "method": request.method.decode("ascii"),
            "scheme": "http",
            "path": path,
            "raw_path": raw_path,
            "query_string": query,
            "root_path": self.root_path,
            "headers": [(name, value) for name, value in request.headers],
            "client": None,  # there is no address; who calls is in extensions
            "server": None,
            "extensions": {"capsock": dict(self.extension)},
            "state": dict(self.state),
        }
        head = request.method == b"HEAD"
        started = complete = body_done = disconnected = False
        finished = anyio.Event()
        response: h11.Response | None = None

        async def receive() -> Message:
            nonlocal body_done, disconnected
            if not (body_done or disconnected or complete):
                try:
                    if self.h11.they_are_waiting_for_100_continue:
                        await self._send(h11.InformationalResponse(status_code=100, headers=[]))
                    event = await self._next_event()
                except (*_STREAM_ERRORS, h11.RemoteProtocolError):
                    event = None
                if isinstance(event, h11.Data):
                    return {"type": "http.request", "body": bytes(event.data), "more_body": True}
                if isinstance(event, h11.EndOfMessage):
                    body_done = True
                    return {"type": "http.request", "body": b"", "more_body": False}
                disconnected = True
                finished.set()
            if not finished.is_set():  # the request is read: what is left is the disconnect
                async with anyio.create_task_group() as tg:
                    tg.start_soon(watch_the_client)
                    await finished.wait()
                    tg.cancel_scope.cancel()
            return {"type": "http.disconnect"}

        async def watch_the_client() -> None:
            """While the app waits for the disconnect: notice a client that resets
            or closes the stream.  Bytes of a next request are kept for h11 (up to a
            bound).  An EOF ends the wait too (the client can send nothing more, and
            a closing client sends it first), but ``send`` still works after it: a
            client may half-close after its request and read the response."""
            nonlocal disconnected
            kept = 0
            try:
                while kept < _CHUNK:
                    data = await self.stream.receive(_CHUNK)
                    self.h11.receive_data(data)
                    kept += len(data)
            except anyio.EndOfStream:
                self.h11.receive_data(b"")
                finished.set()
            except _STREAM_ERRORS:
                disconnected = True
                finished.set()

        async def send(message: Message) -> None:
            nonlocal started, complete, response, disconnected
            if disconnected:
                raise ClientDisconnected("the client is gone")
            kind = message["type"]
            if kind == "http.response.start" and not started:
                started = True
                headers = [(bytes(k), bytes(v)) for k, v in message.get("headers", [])]
                response = h11.Response(status_code=int(message["status"]), headers=headers)
            elif kind == "http.response.body" and started and not complete:
                try:
                    if response is not None:
                        await self._send(response)
                        response = None
                    body = bytes(message.get("body", b""))
                    if body and not head:
                        await self._send(h11.Data(data=body))
                    if not message.get("more_body", False):
                        await self._send(h11.EndOfMessage())
                        complete = True
                        finished.set()
                except _STREAM_ERRORS:
                    disconnected = True
                    finished.set()
                    raise ClientDisconnected("the client is gone") from None
            else:
                raise RuntimeError(f"unexpected ASGI message {kind!r} (started={started})")

        try:
            await self.app(scope, receive, send)
        except ClientDisconnected:
            pass
        except Exception:
            log.exception("ASGI app failed on %s %s", scope["method"], scope["path"])
        finished.set()
        if complete:
            return True
        if not started and not disconnected:
            with contextlib.suppress(*_STREAM_ERRORS):
                await self._simple_response(500, b"internal server error\n")
            return False
        self.stream.reset()  # a response cut short must not look complete
        return False


async def serve_stream(
    stream: Stream,
    app: ASGIApp,
    *,
    keep_alive: float = KEEP_ALIVE,
    root_path: str = "",
    state: Mapping[str, Any] | None = None,
) -> None:
    """Serve HTTP/1.1 requests on one capsock stream until the client closes it.

    Requests on a connection are served one after another (keep-alive); an idle
    connection is closed after ``keep_alive`` seconds.  ``state`` is copied
    into each request's ``scope["state"]``.  The stream is closed on return.
    An app that fails before it started its response gets a 500 sent for it;
    one that fails mid-response has the stream reset, so the client sees an
    error, never a short body that looks complete.
    """
    try:
        await _Connection(stream, app, dict(state or {}), keep_alive, root_path).run()
    except _STREAM_ERRORS as exc:
        log.info("HTTP connection from %s ended: %s", stream.peer.short(), exc)
    finally:
        await stream.aclose()


@contextlib.asynccontextmanager
async def _lifespan(
    app: ASGIApp, mode: Literal["auto", "on", "off"]
) -> AsyncIterator[dict[str, Any]]:
    """Run the app's lifespan protocol around the body; yields the lifespan state."""
    state: dict[str, Any] = {}
    if mode == "off":
        yield state
        return
    to_app, app_in = anyio.create_memory_object_stream[Message](2)
    app_out, from_app = anyio.create_memory_object_stream[Message](2)

    async def run() -> None:
        scope: Scope = {"type": "lifespan", "asgi": dict(_ASGI), "state": state}
        with app_in, app_out:
            try:
                await app(scope, app_in.receive, app_out.send)
            except Exception as exc:
                if mode == "on":
                    log.exception("ASGI lifespan failed")
                else:
                    log.info("the app does not support lifespan (%s: %s)", type(exc).__name__, exc)

    async def step(kind: str) -> bool:
        try:
            await to_app.send({"type": f"lifespan.{kind}"})
            answer = await from_app.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError):
            if mode == "on":
                raise RuntimeError(f"the ASGI app ended during lifespan {kind}") from None
            return False
        if answer["type"] == f"lifespan.{kind}.failed":
            raise RuntimeError(f"ASGI lifespan {kind} failed: {answer.get('message', '')}")
        return True

    async with anyio.create_task_group() as tg, to_app, from_app:
        tg.start_soon(run)
        supported = await step("startup")
        try:
            yield state
        finally:
            if supported:
                with anyio.CancelScope(shield=True):
                    await step("shutdown")
            tg.cancel_scope.cancel()


async def serve(
    listener: Listener,
    app: ASGIApp,
    *,
    lifespan: Literal["auto", "on", "off"] = "auto",
    keep_alive: float = KEEP_ALIVE,
    root_path: str = "",
) -> None:
    """Serve an ASGI app on every stream the listener accepts, until it is closed
    (or the caller's task is cancelled).

    ``lifespan``: ``"auto"`` runs the app's startup/shutdown if it supports the
    lifespan protocol, ``"on"`` requires it, ``"off"`` skips it.  The
    lifespan state reaches each request as ``scope["state"]``.

    Raises:
        RuntimeError: lifespan startup failed (or, with ``"on"``, is unsupported).
    """
    async with _lifespan(app, lifespan) as state:

        async def handle(stream: Stream) -> None:
            await serve_stream(stream, app, keep_alive=keep_alive, root_path=root_path, state=state)

        await listener.serve(handle)


# ====================================================================== client


class NetworkStream(httpcore.AsyncNetworkStream):
    """A capsock stream under httpcore's network stream interface."""

    def __init__(self, stream: Stream) -> None:
        self._stream = stream

    @property
    def stream(self) -> Stream:
        return self._stream

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:  # noqa: ASYNC109
        with _timeout(timeout, httpcore.ReadTimeout), _mapped(httpcore.ReadError):
            try:
                return await self._stream.receive(max_bytes)
            except anyio.EndOfStream:
                return b""

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:  # noqa: ASYNC109
        if not buffer:
            return
        with _timeout(timeout, httpcore.WriteTimeout), _mapped(httpcore.WriteError):
            await self._stream.send(buffer)

    async def aclose(self) -> None:
        await self._stream.aclose()

    async def start_tls(
        self,
        ssl_context: Any,
        server_hostname: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.UnsupportedProtocol(
            "TLS over capsock is not supported: the stream is already end-to-end encrypted "
            "and authenticated by the capability; use an http:// URL"
        )

    def get_extra_info(self, info: str) -> Any:
        if info == "is_readable":  # bytes on an idle connection: the server is closing it
            return self._stream.buffered > 0
        if info == "capsock_peer_id":
            return self._stream.peer
        if info == "capsock_route":
            return self._stream.extra(CapsockAttribute.route, None)
        return None


@contextlib.contextmanager
def _timeout(seconds: float | None, error: type[Exception]) -> Iterator[None]:
    if seconds is None:
        yield
        return
    try:
        with anyio.fail_after(seconds):
            yield
    except TimeoutError:
        raise error(f"no progress in {seconds} s") from None


@contextlib.contextmanager
def _mapped(error: type[Exception]) -> Iterator[None]:
    try:
        yield
    except (*_STREAM_ERRORS, OSError) as exc:
        raise error(str(exc)) from exc


class NetworkBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network backend on a capsock node: a "TCP connection" to a host
    is a stream opened with the capability the ``hosts`` mapping gives for it.

    ``hosts`` maps ``"host"`` or ``"host:port"`` (tried first) to a capability
    (``str`` or :class:`Capability`; parsed once, here).
    """

    def __init__(self, node: Node, hosts: Mapping[str, str | Capability]) -> None:
        self._node = node
        self._hosts = {
            name.lower(): cap if isinstance(cap, Capability) else parse(cap)
            for name, cap in hosts.items()
        }

    def capability_for(self, host: str, port: int) -> Capability:
        """The capability for ``host:port``.

        Raises:
            httpcore.ConnectError: the mapping has none (the message names the host, no secret).
        """
        host = host.lower()
        cap = self._hosts.get(f"{host}:{port}") or self._hosts.get(host)
        if cap is None:
            raise httpcore.ConnectError(
                f"no capability for host {host!r}: add it to the hosts mapping of "
                "capsock.http.Transport"
            )
        return cap

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's interface)
        local_address: str | None = None,
        socket_options: Any = None,
    ) -> httpcore.AsyncNetworkStream:
        cap = self.capability_for(host, port)
        with _timeout(timeout, httpcore.ConnectTimeout), _mapped(httpcore.ConnectError):
            return NetworkStream(await self._node.connect(cap))

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109
        socket_options: Any = None,
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("capsock.http.Transport reaches hosts by capability only")

    async def sleep(self, seconds: float) -> None:
        await anyio.sleep(seconds)


_EXCEPTIONS: list[tuple[type[Exception], type[httpx.HTTPError]]] = [
    # most specific first
    (httpcore.ConnectTimeout, httpx.ConnectTimeout),
    (httpcore.ReadTimeout, httpx.ReadTimeout),
    (httpcore.WriteTimeout, httpx.WriteTimeout),
    (httpcore.PoolTimeout, httpx.PoolTimeout),
    (httpcore.TimeoutException, httpx.TimeoutException),
    (httpcore.ConnectError, httpx.ConnectError),
    (httpcore.ReadError, httpx.ReadError),
    (httpcore.WriteError, httpx.WriteError),
    (httpcore.NetworkError, httpx.NetworkError),
    (httpcore.UnsupportedProtocol, httpx.UnsupportedProtocol),
    (httpcore.LocalProtocolError, httpx.LocalProtocolError),
    (httpcore.RemoteProtocolError, httpx.RemoteProtocolError),
    (httpcore.ProtocolError, httpx.ProtocolError),
]


@contextlib.contextmanager
def _httpx_errors() -> Iterator[None]:
    try:
        yield
    except Exception as exc:
        for core, mapped in _EXCEPTIONS:
            if isinstance(exc, core):
                raise mapped(str(exc)) from exc
        raise


class _Body(httpx.AsyncByteStream):
    def __init__(self, body: AsyncIterator[bytes] | Any) -> None:
        self._body = body

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with _httpx_errors():
            async for chunk in self._body:
                yield chunk

    async def aclose(self) -> None:
        if hasattr(self._body, "aclose"):
            with _httpx_errors():
                await self._body.aclose()


class Transport(httpx.AsyncBaseTransport):
    """An httpx transport that reaches hosts by capability::

        httpx.AsyncClient(transport=capsock.http.Transport(node, {"api.example": uri}))

    A request to ``http://api.example/...`` opens (or reuses, from the pool)
    a capsock stream to the capability mapped for ``api.example``.  Streams
    are pooled per host with keep-alive (``limits``, as httpx's own
    transport); all streams to one node share the node's session with it.
    ``https://`` URLs are refused (``httpx.UnsupportedProtocol``): capsock
    already encrypts and authenticates.  Errors are httpx's
    (``httpx.ConnectError`` for an unknown host or a refused capability, with
    the reason; ``httpx.ReadError`` / ``WriteError`` for a broken stream).
    """

    def __init__(
        self,
        node: Node,
        hosts: Mapping[str, str | Capability],
        *,
        limits: httpx.Limits | None = None,
        retries: int = 0,
    ) -> None:
        limits = limits or httpx.Limits(max_connections=100, max_keepalive_connections=20)
        self._backend = NetworkBackend(node, hosts)
        self._pool = httpcore.AsyncConnectionPool(
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            retries=retries,
            network_backend=self._backend,
        )

    @property
    def backend(self) -> NetworkBackend:
        return self._backend

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.scheme != "http":
            raise httpx.UnsupportedProtocol(
                f"{request.url.scheme}:// is not used over capsock: the stream is already "
                "encrypted and authenticated by the capability; use an http:// URL"
            )
        core_request = httpcore.Request(
            method=request.method,
            url=httpcore.URL(
                scheme=request.url.raw_scheme,
                host=request.url.raw_host,
                port=request.url.port,
                target=request.url.raw_path,
            ),
            headers=request.headers.raw,
            content=request.stream,
            extensions=request.extensions,
        )
        with _httpx_errors():
            response = await self._pool.handle_async_request(core_request)
        return httpx.Response(
            status_code=response.status,
            headers=response.headers,
            stream=_Body(response.stream),
            extensions=response.extensions,
        )

    async def aclose(self) -> None:
        await self._pool.aclose()

    async def __aenter__(self) -> Transport:
        await self._pool.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None = None,
        exc: BaseException | None = None,
        tb: TracebackType | None = None,
    ) -> None:
        await self._pool.__aexit__(exc_type, exc, tb)
