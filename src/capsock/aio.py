"""capsock streams for asyncio code: a Transport, a Server, StreamReader/StreamWriter.

Existing asyncio code speaks ``asyncio.Protocol`` / ``asyncio.Transport`` or
``asyncio.StreamReader`` / ``asyncio.StreamWriter``.  This module gives it a
capsock stream under those interfaces, so it serves and dials capabilities
instead of TCP ports::

    from capsock import aio

    server = await aio.start_server(node, handle)      # handle(reader, writer)
    print(server.uri)                                  # hand this out
    reader, writer = await aio.open_connection(other_node, server.uri)

asyncio only, by nature (on trio, use the capsock stream itself).  Flow control
is real both ways: a paused transport (``pause_reading``) stops taking bytes
from the stream, so the peer's window fills and the peer waits; writes queue in
the transport until the peer's window takes them, and the protocol is paused
above the high water mark.  ``write_eof()`` is a capsock half-close and the
peer's EOF reaches ``eof_received()``.

``get_extra_info("peername")`` is the peer's authenticated :class:`NodeId`,
never an address tuple (code that expects ``(host, port)`` sees something
else and, if it checks, treats the peer as unknown: that is honest, there is
no address).  Also ``"capsock_peer_id"`` (the same NodeId),
``"capsock_route"`` (``tcp=127.0.0.1:4000``, ``inbound tcp:...``) and
``"capsock_capability"`` (the capability's *redacted* text).  ``"socket"``
and ``"sockname"`` are ``None``: there is no socket.

A broken stream (reset by the peer, session lost) reaches the protocol as
``connection_lost(ConnectionResetError(...))`` whose ``__cause__`` is the
capsock error, so asyncio code that handles ``ConnectionError`` keeps working.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any

import anyio

from .errors import CapsockError, LocalUsageError
from .net.stream import CapsockAttribute, Stream
from .node import Listener, Node
from .uri import Capability

__all__ = [
    "Server",
    "StreamTransport",
    "connect_stream",
    "create_connection",
    "create_server",
    "open_connection",
    "start_server",
]

log = logging.getLogger("capsock.aio")

_CHUNK = 65536
_HIGH_WATER = 64 * 1024  # asyncio's own default write buffer limits
_STREAM_ERRORS = (anyio.BrokenResourceError, anyio.ClosedResourceError, CapsockError, OSError)

ProtocolFactory = Callable[[], asyncio.BaseProtocol]
ClientConnected = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None] | None]


def _loop() -> asyncio.AbstractEventLoop:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        raise LocalUsageError(
            "capsock.aio is the asyncio bridge and needs a running asyncio loop; on trio, "
            "use the capsock Stream (an anyio ByteStream) directly"
        ) from None


class StreamTransport(asyncio.Transport):
    """An ``asyncio.Transport`` whose bytes travel over a capsock :class:`Stream`.

    Made by :func:`connect_stream`, :func:`create_connection` and the servers;
    works with ``asyncio.Protocol`` and ``asyncio.BufferedProtocol``.  Two
    tasks pump the bytes: one takes them from the stream while reading is not
    paused, one sends what :meth:`write` queued.  ``connection_lost`` is called
    once, after both ended and the stream was closed.
    """

    def __init__(self, stream: Stream, protocol: asyncio.BaseProtocol) -> None:
        super().__init__()
        self._loop = _loop()
        self._stream = stream
        self._protocol = protocol
        self._out: deque[bytes] = deque()
        self._queued = 0
        self._high = _HIGH_WATER
        self._low = _HIGH_WATER // 4
        self._protocol_paused = False
        self._eof_wanted = False  # write_eof() was called: EOF goes after the queue
        self._closing = False  # close() or abort() was called, or the stream ended
        self._reading = True
        self._lost = False
        self._aborted = False
        self._exc: BaseException | None = None
        self._wake_writer = asyncio.Event()
        self._wake_reader = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None
        self._writer: asyncio.Task[None] | None = None
        cap = stream.extra(CapsockAttribute.capability, None)
        self._extra: dict[str, Any] = {
            "peername": stream.peer,
            "capsock_peer_id": stream.peer,
            "capsock_route": stream.extra(CapsockAttribute.route, None),
            "capsock_capability": cap.redacted() if cap is not None else None,
            "socket": None,
            "sockname": None,
        }

    def _start(self) -> None:
        self._protocol.connection_made(self)
        self._reader = self._loop.create_task(self._read_pump())
        self._writer = self._loop.create_task(self._write_pump())

    def __repr__(self) -> str:
        state = "closing" if self._closing else "open"
        return f"<capsock.aio.StreamTransport peer={self._stream.peer.short()} {state}>"

    # ------------------------------------------------------------ BaseTransport

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        value = self._extra.get(name)
        return default if value is None else value

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        """Stop reading; send what is queued, then an EOF; then close the stream.

        Like a TCP close: if the peer had not finished sending, its further
        sends fail (the stream is reset after the EOF)."""
        if self._closing:
            return
        self._closing = True
        self._reading = False
        self._wake_reader.set()
        self._wake_writer.set()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol

    # ------------------------------------------------------------ ReadTransport

    def is_reading(self) -> bool:
        return self._reading and not self._closing

    def pause_reading(self) -> None:
        """Take no more bytes from the stream: the peer is held back by capsock's window."""
        self._reading = False

    def resume_reading(self) -> None:
        if self._closing:
            return
        self._reading = True
        self._wake_reader.set()

    # ------------------------------------------------------------ WriteTransport

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if high is None:
            high = _HIGH_WATER if low is None else 4 * low
        if low is None:
            low = high // 4
        if not high >= low >= 0:
            raise ValueError(f"high ({high!r}) must be >= low ({low!r}) must be >= 0")
        self._high, self._low = high, low
        self._maybe_pause()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return (self._low, self._high)

    def get_write_buffer_size(self) -> int:
        """Bytes written and not yet taken by the stream (within the peer's window)."""
        return self._queued

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._eof_wanted:
            raise RuntimeError("Cannot call write() after write_eof()")
        if not data or self._closing:
            return  # as asyncio's transports: writes after close() are dropped
        chunk = bytes(data)
        self._out.append(chunk)
        self._queued += len(chunk)
        self._wake_writer.set()
        self._maybe_pause()

    def write_eof(self) -> None:
        """Half-close: the queued bytes, then an EOF; reading goes on."""
        if self._eof_wanted or self._closing:
            return
        self._eof_wanted = True
        self._wake_writer.set()

    def can_write_eof(self) -> bool:
        return True

    def abort(self) -> None:
        """Close at once: queued bytes are dropped and the stream is reset
        (the peer's reads and writes fail with ``StreamReset``)."""
        if self._lost or self._aborted:
            return
        self._aborted = True
        self._stop()
        self._stream.reset()

    # ------------------------------------------------------------ flow control

    def _maybe_pause(self) -> None:
        if not self._protocol_paused and self._queued > self._high:
            self._protocol_paused = True
            self._call_protocol("pause_writing")

    def _maybe_resume(self) -> None:
        if self._protocol_paused and self._queued <= self._low:
            self._protocol_paused = False
            self._call_protocol("resume_writing")

    def _call_protocol(self, name: str, *args: Any) -> Any:
        try:
            return getattr(self._protocol, name)(*args)
        except Exception as exc:
            self._loop.call_exception_handler(
                {
                    "message": f"protocol.{name}() failed",
                    "exception": exc,
                    "transport": self,
                    "protocol": self._protocol,
                }
            )
            return None

    # ------------------------------------------------------------ pumps

    def _broken(self, exc: BaseException) -> None:
        """The stream failed: stop both pumps; ``connection_lost`` gets the error."""
        if self._exc is None and not self._aborted:
            log.info("stream with %s ended: %s", self._stream.peer.short(), exc)
            error = ConnectionResetError(f"capsock stream broken: {exc}")
            error.__cause__ = exc
            self._exc = error
        self._stop()

    def _stop(self) -> None:
        self._closing = True
        self._reading = False
        self._out.clear()
        self._queued = 0
        self._wake_reader.set()
        self._wake_writer.set()

    async def _read_pump(self) -> None:
        try:
            while not self._closing:
                if not self._reading:
                    self._wake_reader.clear()
                    await self._wake_reader.wait()
                    continue
                try:
                    data = await self._stream.receive(_CHUNK)
                except anyio.EndOfStream:
                    if not self._closing and not self._call_protocol("eof_received"):
                        self.close()
                    return
                if self._closing:
                    return
                try:
                    self._deliver(data)
                except Exception as exc:  # the protocol failed: as asyncio, a fatal error
                    self._loop.call_exception_handler(
                        {
                            "message": "protocol failed on received data",
                            "exception": exc,
                            "transport": self,
                            "protocol": self._protocol,
                        }
                    )
                    self._exc = exc
                    self.abort()
        except _STREAM_ERRORS as exc:
            if not self._closing:  # (a stream this side closed raises ClosedResourceError)
                self._broken(exc)

    def _deliver(self, data: bytes) -> None:
        protocol = self._protocol
        if isinstance(protocol, asyncio.BufferedProtocol):
            view = memoryview(data)
            while view:
                buf = memoryview(protocol.get_buffer(len(view))).cast("B")
                n = min(len(buf), len(view))
                if not n:
                    raise RuntimeError("BufferedProtocol.get_buffer() returned an empty buffer")
                buf[:n] = view[:n]
                protocol.buffer_updated(n)
                view = view[n:]
        elif isinstance(protocol, asyncio.Protocol):
            protocol.data_received(data)

    async def _write_pump(self) -> None:
        out = self._out
        try:
            eof_sent = False
            while True:
                if out:
                    data = out.popleft() if len(out) == 1 else b"".join(out)
                    out.clear()
                    await self._stream.send(data)
                    self._queued -= len(data)
                    self._maybe_resume()
                elif self._eof_wanted and not eof_sent and self._exc is None and not self._aborted:
                    await self._stream.send_eof()
                    eof_sent = True
                elif self._closing:
                    break
                else:
                    self._wake_writer.clear()
                    await self._wake_writer.wait()
        except _STREAM_ERRORS as exc:
            self._broken(exc)
        await self._stream.aclose()  # after the queue: EOF (if not sent), reset if unfinished
        if self._reader is not None and not self._reader.done():
            self._reader.cancel()
        self._loop.call_soon(self._finish)

    def _finish(self) -> None:
        if self._lost:
            return
        self._lost = True
        self._closing = True
        self._call_protocol("connection_lost", self._exc)


def connect_stream(
    stream: Stream, protocol_factory: ProtocolFactory
) -> tuple[StreamTransport, asyncio.BaseProtocol]:
    """Run a new protocol over an open capsock stream, as ``loop.create_connection`` would.

    The transport owns the stream from now on (closing it closes the stream).

    Raises:
        LocalUsageError: no asyncio loop is running (e.g. on trio).
    """
    protocol = protocol_factory()
    transport = StreamTransport(stream, protocol)
    transport._start()
    return transport, protocol


async def create_connection(
    node: Node, uri: str | Capability, protocol_factory: ProtocolFactory
) -> tuple[StreamTransport, asyncio.BaseProtocol]:
    """Open a stream to ``uri`` and run ``protocol_factory()`` over it.

    Raises what :meth:`capsock.Node.connect` raises (``CapabilityRejected``,
    ``Unreachable``, ...), and ``LocalUsageError`` without an asyncio loop.
    """
    _loop()
    stream = await node.connect(uri)
    return connect_stream(stream, protocol_factory)


async def open_connection(
    node: Node, uri: str | Capability, *, limit: int = 2**16
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """``asyncio.open_connection`` for a capability: a (reader, writer) pair.

    ``writer.write_eof()`` half-closes, ``writer.close()`` closes,
    ``writer.get_extra_info("capsock_peer_id")`` names the peer.  ``limit`` is
    the reader's buffer limit (asyncio's default): above twice that the
    transport stops reading and capsock's window holds the peer back.
    """
    loop = _loop()
    reader = asyncio.StreamReader(limit=limit, loop=loop)
    protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
    transport, _ = await create_connection(node, uri, lambda: protocol)
    writer = asyncio.StreamWriter(transport, protocol, reader, loop)
    return reader, writer


class Server:
    """Serves one capsock listener with a protocol factory, like ``asyncio.Server``.

    Made by :func:`create_server` / :func:`start_server`; an async context
    manager (leaving it closes the server).  Connections already made stay
    open when the server closes, as with asyncio.
    """

    def __init__(self, listener: Listener, protocol_factory: ProtocolFactory) -> None:
        self._loop = _loop()
        self._listener = listener
        self._factory = protocol_factory
        self._closed = asyncio.Event()
        self._closer: asyncio.Task[None] | None = None
        self._task = self._loop.create_task(self._accept_loop())

    @property
    def uri(self) -> Capability:
        """The capability to hand to clients (``str()`` gives the URI)."""
        return self._listener.uri

    @property
    def listener(self) -> Listener:
        return self._listener

    def __repr__(self) -> str:
        return f"<capsock.aio.Server {self._listener.uri.redacted()}>"

    async def _accept_loop(self) -> None:
        try:
            while True:
                try:
                    stream = await self._listener.accept()
                except anyio.ClosedResourceError:
                    return
                try:
                    connect_stream(stream, self._factory)
                except Exception:
                    log.exception("protocol factory failed; the server keeps serving")
                    await stream.aclose()
        finally:
            await self._listener.aclose()
            self._closed.set()

    def is_serving(self) -> bool:
        return self._closer is None and not self._task.done()

    def close(self) -> None:
        """Stop accepting and close the listener (its capability is refused from now on)."""
        if self._closer is None:
            self._closer = self._loop.create_task(self._listener.aclose())

    async def wait_closed(self) -> None:
        """Wait until the listener is closed (after :meth:`close`)."""
        await self._closed.wait()

    async def serve_forever(self) -> None:
        """Serve until cancelled, or until the server is closed; then close it."""
        try:
            await self._closed.wait()
        finally:
            self.close()

    async def __aenter__(self) -> Server:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
        await self.wait_closed()


async def _listener_of(where: Node | Listener) -> Listener:
    return await where.listen() if isinstance(where, Node) else where


async def create_server(where: Node | Listener, protocol_factory: ProtocolFactory) -> Server:
    """Serve ``protocol_factory()`` on a listener (or on a new one of ``where``, a Node).

    Every stream opened with the listener's capability gets a new protocol and
    a :class:`StreamTransport`.  The server owns the listener: closing the
    server closes it.
    """
    _loop()
    return Server(await _listener_of(where), protocol_factory)


async def start_server(
    where: Node | Listener, client_connected_cb: ClientConnected, *, limit: int = 2**16
) -> Server:
    """``asyncio.start_server`` for capabilities: ``client_connected_cb(reader, writer)``
    (a function or coroutine function) runs for every stream."""
    loop = _loop()

    def factory() -> asyncio.BaseProtocol:
        reader = asyncio.StreamReader(limit=limit, loop=loop)
        return asyncio.StreamReaderProtocol(reader, client_connected_cb, loop=loop)

    return await create_server(where, factory)
