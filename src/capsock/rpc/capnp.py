"""Cap'n Proto RPC (pycapnp) over capsock streams.  asyncio only, as pycapnp is.

Serve a pycapnp interface on a capsock listener, and reach it with a
capability URI::

    import capnp
    from capsock.rpc import capnp as capnp_rpc

    calculator = capnp.load("schemas/calculator.capnp")

    async def main() -> None:
        async with capsock.Node(listen=["tcp:127.0.0.1:0"]) as server, capsock.Node() as client:
            listener = await server.listen()
            async with anyio.create_task_group() as tg:
                tg.start_soon(capnp_rpc.serve, listener, lambda stream: CalculatorImpl())
                async with capnp_rpc.connect(client, listener.uri) as conn:
                    calc = conn.bootstrap(calculator.Calculator)
                    ...
                tg.cancel_scope.cancel()

    asyncio.run(capnp.run(main()))   # pycapnp's KJ event loop must be running

How it works: pycapnp's two-party RPC runs over its own ``AsyncIoStream``,
which drives an asyncio protocol over an asyncio transport; it takes no
arbitrary Python stream.  capsock gives that protocol a transport of its own
(:class:`_StreamTransport`) whose bytes travel over the capsock stream, with
pycapnp's flow control (pause/resume) and half-close passed through.  Creating
the protocol needs ``AsyncIoStream._connect``, which pycapnp does not document;
if a pycapnp version lacks it, each stream gets a ``socket.socketpair()``
instead (pycapnp on one end, two pumps between the other end and the capsock
stream): the same behaviour, about half the calls per second.  See
``docs/rpc.md`` and ``bench/rpc.py``.

Shutdown: closing a client (leaving :func:`connect`) closes pycapnp's end,
which becomes an EOF on the capsock stream; the server sees the disconnect,
closes its side, and its EOF comes back.  Either side waits up to ``grace``
seconds for that exchange, then closes the stream regardless.  A stream that
breaks (peer gone, capability revoked) is passed to pycapnp as a disconnect:
calls in flight fail with pycapnp's ``KjException`` (type ``DISCONNECTED``).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from typing import Any, NoReturn

import anyio
import anyio.abc
import capnp

from ..errors import CapsockError, LocalUsageError
from ..keys import NodeId
from ..net.stream import CapsockAttribute, Stream
from ..node import Listener, Node
from ..uri import Capability
from ._capnp_errors import ErrorFilter

__all__ = ["Client", "connect", "connect_stream", "serve", "serve_stream"]

log = logging.getLogger("capsock.rpc.capnp")

_CHUNK = 65536
_GRACE = 5.0
_HIGH_WATER = 256 * 1024  # bytes queued for the stream before pycapnp is paused
_LOW_WATER = 64 * 1024

_DIRECT = hasattr(capnp.AsyncIoStream, "_connect")
"""Whether pycapnp lets us attach our own transport (else: the socketpair bridge)."""

Bootstrap = Callable[[Stream], Any]
"""Called with each accepted stream; returns the pycapnp ``Server`` object
(an instance of ``SomeInterface.Server``) that stream's client bootstraps."""


def _loop() -> asyncio.AbstractEventLoop:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        raise LocalUsageError(
            "capsock.rpc.capnp runs on asyncio only (pycapnp drives its KJ event loop "
            "from asyncio); use anyio.run(..., backend='asyncio'), or capsock.rpc.msgpack "
            "on trio"
        ) from None


def _peer_name(stream: anyio.abc.ByteStream) -> str:
    peer: NodeId | None = stream.extra(CapsockAttribute.peer_id, None)
    return peer.short() if peer is not None else "a non-capsock peer"


def _no_kj_loop(exc: RuntimeError) -> NoReturn:
    """Re-raise pycapnp's 'KJ event-loop is not running' as a LocalUsageError."""
    if "KJ event-loop" not in str(exc):
        raise exc
    raise LocalUsageError(
        "pycapnp's event loop is not running: wrap your program in "
        "`async with capnp.kj_loop():` (or run it with asyncio.run(capnp.run(main())))"
    ) from None


class _StreamTransport(asyncio.Transport):
    """An asyncio transport for pycapnp's protocol whose bytes travel over a byte stream.

    pycapnp's protocol pauses reading whenever it has no read outstanding, so
    the reader pump takes data from the stream only while resumed: capsock's
    flow control then holds the peer back.  Writes are queued for the writer
    pump; above ``_HIGH_WATER`` queued bytes pycapnp is told to pause writing.
    """

    def __init__(self, stream: anyio.abc.ByteStream, protocol: Any) -> None:
        super().__init__()
        self._stream = stream
        self._protocol = protocol
        self._filter = ErrorFilter(_peer_name(stream))
        self._out: deque[bytes] = deque()
        self._queued = 0
        self._write_paused = False
        self._eof = False  # send EOF once the queue is flushed
        self._closing = False
        self._reading = False
        self._wake_writer: anyio.Event | None = None
        self._wake_reader: anyio.Event | None = None
        self._lost = False  # connection_lost() was called
        self._failed = False  # the stream broke
        self.done = anyio.Event()
        self._pumps = 2

    # -- the asyncio.Transport interface pycapnp's protocol uses

    def write(self, data: Any) -> None:
        if self._closing or self._eof:
            return
        data = self._filter.feed(bytes(data))  # exceptions: type and message only
        if not data:
            return
        self._out.append(data)
        self._queued += len(data)
        self._kick_writer()
        if self._queued > _HIGH_WATER and not self._write_paused:
            self._write_paused = True
            self._protocol.pause_writing()

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self._eof = True
        self._kick_writer()

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._eof = True
        self._kick_writer()
        self._kick_reader()
        _loop().call_soon(self._connection_lost, None)

    def abort(self) -> None:
        self.close()

    def pause_reading(self) -> None:
        self._reading = False

    def resume_reading(self) -> None:
        self._reading = True
        self._kick_reader()

    def is_reading(self) -> bool:
        return self._reading

    # -- pumps

    def _kick_writer(self) -> None:
        if self._wake_writer is not None:
            self._wake_writer.set()
            self._wake_writer = None

    def _kick_reader(self) -> None:
        if self._wake_reader is not None:
            self._wake_reader.set()
            self._wake_reader = None

    def _connection_lost(self, exc: BaseException | None) -> None:
        if not self._lost:
            self._lost = True
            self._protocol.connection_lost(exc)

    def _broken(self, exc: BaseException) -> None:
        log.info("Cap'n Proto stream ended: %s", type(exc).__name__)
        self._failed = True
        self._closing = True
        self._out.clear()
        self._kick_writer()
        self._kick_reader()
        self._connection_lost(exc)

    def _pump_done(self) -> None:
        self._pumps -= 1
        if not self._pumps:
            self.done.set()

    async def to_stream(self) -> None:
        out = self._out
        try:
            while True:
                if out:
                    data = out.popleft() if len(out) == 1 else b"".join(out)
                    out.clear()
                    await self._stream.send(data)
                    self._queued -= len(data)
                    if self._write_paused and self._queued <= _LOW_WATER:
                        self._write_paused = False
                        self._protocol.resume_writing()
                elif self._eof:
                    if not self._failed:
                        await self._stream.send_eof()
                    return
                else:
                    wake = self._wake_writer = anyio.Event()
                    await wake.wait()
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, CapsockError) as exc:
            self._broken(exc)
        finally:
            self._pump_done()

    async def from_stream(self) -> None:
        # After a local close this keeps reading (and discards) until the
        # peer's EOF, so that both sides end with a clean EOF exchange.
        try:
            while not self._failed:
                if not self._reading and not self._closing:
                    wake = self._wake_reader = anyio.Event()
                    await wake.wait()
                    continue
                try:
                    data = await self._stream.receive(_CHUNK)
                except anyio.EndOfStream:
                    if not self._closing:
                        self._protocol.eof_received()
                    return
                view = memoryview(data)
                while view and not self._closing:
                    while not self._reading and not self._closing:
                        wake = self._wake_reader = anyio.Event()
                        await wake.wait()
                    if self._closing:
                        break
                    buf = self._protocol.get_buffer(len(view))
                    n = min(len(buf), len(view))
                    buf[:n] = view[:n]
                    self._protocol.buffer_updated(n)
                    view = view[n:]
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, CapsockError) as exc:
            self._broken(exc)
        finally:
            self._pump_done()


@asynccontextmanager
async def _bridged(stream: anyio.abc.ByteStream, grace: float) -> AsyncIterator[Any]:
    """A pycapnp AsyncIoStream whose bytes travel over ``stream``; closes both on exit."""
    _loop()
    if not _DIRECT:
        async with _socketpair_bridged(stream, grace) as capnp_stream:
            yield capnp_stream
        return
    made: list[Any] = []
    try:
        try:
            protocol = capnp.AsyncIoStream._connect(made.append)
        except RuntimeError as exc:
            _no_kj_loop(exc)
        transport = _StreamTransport(stream, protocol)
        protocol.connection_made(transport)  # pycapnp hands its stream to made.append
        (capnp_stream,) = made
        async with anyio.create_task_group() as tg:
            tg.start_soon(transport.to_stream)
            tg.start_soon(transport.from_stream)
            try:
                yield capnp_stream
            finally:
                # Closing pycapnp's stream closes our transport: its queue is
                # flushed, then an EOF; the peer answers with its own EOF.
                capnp_stream.close()
                transport.close()
                with anyio.move_on_after(grace, shield=True):
                    await transport.done.wait()
                tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            await stream.aclose()


class _Bridge:
    """Copies bytes between a capsock stream and our end of a socketpair."""

    def __init__(self, stream: anyio.abc.ByteStream, sock: socket.socket) -> None:
        self.stream = stream
        self.sock = sock
        self.filter = ErrorFilter(_peer_name(stream))
        self.broken: BaseException | None = None
        self.done = anyio.Event()
        self._pumps = 2

    def _finish_one(self) -> None:
        self._pumps -= 1
        if not self._pumps:
            self.done.set()

    def _break(self, exc: BaseException) -> None:
        """The capsock stream failed: let pycapnp see a disconnect on its end."""
        if self.broken is None:
            self.broken = exc
            log.info("Cap'n Proto stream ended: %s", type(exc).__name__)
        with suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    async def to_capnp(self) -> None:
        loop = _loop()
        try:
            while True:
                data = await self.stream.receive(_CHUNK)
                await loop.sock_sendall(self.sock, data)
        except anyio.EndOfStream:
            with suppress(OSError):
                self.sock.shutdown(socket.SHUT_WR)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, CapsockError, OSError) as exc:
            self._break(exc)
        finally:
            self._finish_one()

    async def from_capnp(self) -> None:
        loop = _loop()
        try:
            while True:
                data = await loop.sock_recv(self.sock, _CHUNK)
                if not data:
                    await self.stream.send_eof()
                    return
                data = self.filter.feed(data)  # exceptions: type and message only
                if data:
                    await self.stream.send(data)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, CapsockError, OSError) as exc:
            self._break(exc)
        finally:
            self._finish_one()


async def _capnp_end(sock: socket.socket) -> Any:
    """pycapnp's AsyncIoStream over one end of a socketpair.

    Raises:
        LocalUsageError: pycapnp's KJ event loop is not running.
    """
    try:
        return await capnp.AsyncIoStream.create_connection(sock=sock)
    except RuntimeError as exc:
        _no_kj_loop(exc)


@asynccontextmanager
async def _socketpair_bridged(stream: anyio.abc.ByteStream, grace: float) -> AsyncIterator[Any]:
    """The fallback: pycapnp on one end of a socketpair, pumps on the other."""
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    capnp_stream: Any = None
    try:
        capnp_stream = await _capnp_end(theirs)
        bridge = _Bridge(stream, ours)
        async with anyio.create_task_group() as tg:
            tg.start_soon(bridge.to_capnp)
            tg.start_soon(bridge.from_capnp)
            try:
                yield capnp_stream
            finally:
                # Closing pycapnp's end is an EOF for from_capnp, which passes it
                # on; the peer answers with its own EOF.  Wait for that, briefly.
                capnp_stream.close()
                with anyio.move_on_after(grace, shield=True):
                    await bridge.done.wait()
                tg.cancel_scope.cancel()
    finally:
        if capnp_stream is None:
            theirs.close()
        ours.close()
        with anyio.CancelScope(shield=True):
            await stream.aclose()


class Client:
    """The client end of a Cap'n Proto connection over a capsock stream.

    Made by :func:`connect` / :func:`connect_stream`.
    """

    def __init__(self, twoparty: Any, stream: anyio.abc.ByteStream) -> None:
        self.twoparty: Any = twoparty
        """The underlying ``capnp.TwoPartyClient``."""
        self.peer: NodeId | None = stream.extra(CapsockAttribute.peer_id, None)
        """The authenticated id of the serving node (``None`` on a non-capsock stream)."""

    def __repr__(self) -> str:
        peer = self.peer.short() if self.peer is not None else "?"
        return f"<capsock.rpc.capnp.Client peer={peer}>"

    def bootstrap(self, interface: Any = None) -> Any:
        """The server's bootstrap capability, cast to ``interface`` if given
        (e.g. ``calculator.Calculator`` from ``capnp.load``)."""
        cap = self.twoparty.bootstrap()
        return cap.cast_as(interface) if interface is not None else cap


@asynccontextmanager
async def connect_stream(
    stream: anyio.abc.ByteStream,
    *,
    grace: float = _GRACE,
    traversal_limit_in_words: int | None = None,
    nesting_limit: int | None = None,
) -> AsyncIterator[Client]:
    """A Cap'n Proto client over an open stream (capsock or any ``ByteStream``).

    The stream is closed on exit.

    Raises:
        LocalUsageError: not on asyncio, or pycapnp's KJ event loop is not running.
    """
    async with _bridged(stream, grace) as capnp_stream:
        twoparty = capnp.TwoPartyClient(
            capnp_stream,
            traversal_limit_in_words=traversal_limit_in_words,
            nesting_limit=nesting_limit,
        )
        try:
            yield Client(twoparty, stream)
        finally:
            twoparty.close()


@asynccontextmanager
async def connect(
    node: Node,
    uri: str | Capability,
    *,
    grace: float = _GRACE,
    traversal_limit_in_words: int | None = None,
    nesting_limit: int | None = None,
) -> AsyncIterator[Client]:
    """Open a capsock stream to ``uri`` and run a Cap'n Proto client over it::

        async with capnp_rpc.connect(node, uri) as conn:
            calc = conn.bootstrap(calculator.Calculator)
            value = await calc.evaluate({"literal": 1}).value.read()

    Leaving the block closes the client and, after the server's answering
    EOF (or ``grace`` seconds), the stream.

    Raises:
        LocalUsageError: not on asyncio, or pycapnp's KJ event loop is not running.
        The errors of :meth:`capsock.Node.connect` (``CapabilityRejected``, ...).
    """
    _loop()
    stream = await node.connect(uri)
    async with connect_stream(
        stream,
        grace=grace,
        traversal_limit_in_words=traversal_limit_in_words,
        nesting_limit=nesting_limit,
    ) as client:
        yield client


async def serve_stream(
    stream: anyio.abc.ByteStream,
    bootstrap: Any,
    *,
    grace: float = _GRACE,
    traversal_limit_in_words: int | None = None,
    nesting_limit: int | None = None,
) -> None:
    """Serve the pycapnp ``Server`` object ``bootstrap`` on one stream until the
    client disconnects (or the stream breaks); then close the stream.

    Raises:
        LocalUsageError: not on asyncio, or pycapnp's KJ event loop is not running.
    """
    async with _bridged(stream, grace) as capnp_stream:
        server = capnp.TwoPartyServer(
            capnp_stream,
            bootstrap=bootstrap,
            traversal_limit_in_words=traversal_limit_in_words,
            nesting_limit=nesting_limit,
        )
        try:
            await server.on_disconnect()
        except capnp.KjException as exc:  # the disconnect itself can be reported as an error
            log.debug("Cap'n Proto client disconnected: %s", type(exc).__name__)
        finally:
            server.close()


async def serve(
    listener: Listener,
    bootstrap: Bootstrap,
    *,
    task_group: anyio.abc.TaskGroup | None = None,
    grace: float = _GRACE,
    traversal_limit_in_words: int | None = None,
    nesting_limit: int | None = None,
) -> None:
    """Serve Cap'n Proto on every stream ``listener`` accepts, until it is closed.

    Args:
        bootstrap: called with each accepted :class:`~capsock.Stream` (use
            ``stream.peer`` to know who connected); returns the pycapnp
            ``Server`` object that connection bootstraps.
        traversal_limit_in_words / nesting_limit: pycapnp's limits on each
            received message (defaults: 8 Mi words = 64 MiB, 64 levels).

    Raises:
        LocalUsageError: not on asyncio (checked at once), or pycapnp's KJ
            event loop is not running (logged for each stream).
    """
    _loop()

    async def handle(stream: Stream) -> None:
        await serve_stream(
            stream,
            bootstrap(stream),
            grace=grace,
            traversal_limit_in_words=traversal_limit_in_words,
            nesting_limit=nesting_limit,
        )

    await listener.serve(handle, task_group)
