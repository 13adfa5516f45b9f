"""The httpx half of :mod:`capsock.http`: an httpcore backend whose connections are streams."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator, Mapping
from types import TracebackType
from typing import Any

import anyio
import anyio.abc
import httpcore
import httpx

from ..net.stream import CapsockAttribute, Stream
from ..node import Node
from ..uri import Capability, parse
from ._server import _STREAM_ERRORS


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
