"""asyncio fast path: a session's socket read by callbacks instead of a task.

On asyncio, anyio's ``SocketStream`` hands received bytes to a reader task:
the bytes arrive in a protocol callback, wake the task (one event-loop turn),
and the task decrypts and wakes the application's task (a second turn).  A
round trip on an open stream paid two such hops per side, plus a yield in
every ``send``.  :class:`PushTransport` takes over the asyncio transport under
the anyio stream once the handshake is done and calls the session straight
from ``data_received``, so a received record reaches the application's task
in one turn; ``send`` writes without yielding unless the socket is full.

Only used when the backend is asyncio and the stream is anyio's own TCP
socket stream (anything else keeps the task-based read loop: trio, Unix
sockets, which anyio reads with ``sock_recv`` rather than a transport, and
forwarded sessions).  It relies on two attributes of anyio's asyncio ``SocketStream``
(``_transport`` and ``_protocol``); :func:`adopt` returns ``None`` if they are
not what it expects, and ``tests/test_pushio.py`` fails loudly in that case so
an anyio upgrade cannot silently turn the fast path off.

Memory stays bounded without pausing the socket: the session consumes every
complete record in the callback, so what stays buffered is one partial record
(at most one maximum-size record) plus what the mux's credit windows allow.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel

try:
    import sniffio
except ImportError:  # pragma: no cover - anyio works without sniffio
    sniffio = None  # type: ignore[assignment]

__all__ = ["PushTransport", "adopt"]

OnData = Callable[[bytes], None]
OnEnd = Callable[[BaseException], None]


def adopt(stream: anyio.abc.ByteStream) -> PushTransport | None:
    """Take over ``stream``'s asyncio transport, or ``None`` if it is not one.

    After a successful adopt, ``stream`` must not be used any more: the
    returned transport reads and writes the socket and closes it.
    """
    transport = getattr(stream, "_transport", None)
    old = getattr(stream, "_protocol", None)
    if not isinstance(transport, asyncio.Transport) or old is None:
        return None
    queue = getattr(old, "read_queue", None)
    if not isinstance(getattr(old, "write_event", None), asyncio.Event) or queue is None:
        return None
    if transport.is_closing():
        return None
    pushed = PushTransport(transport)
    pushed._take_over(old)
    return pushed


class _Protocol(asyncio.Protocol):
    __slots__ = ("owner",)

    def __init__(self, owner: PushTransport) -> None:
        self.owner = owner

    def data_received(self, data: bytes) -> None:
        self.owner._on_data(data)

    def eof_received(self) -> bool | None:
        self.owner._on_end(anyio.EndOfStream())
        return True  # keep our side open for writing; the session closes it

    def connection_lost(self, exc: Exception | None) -> None:
        owner = self.owner
        error: BaseException = (
            anyio.BrokenResourceError(str(exc)) if exc is not None else anyio.EndOfStream()
        )
        if exc is not None:
            error.__cause__ = exc
        owner._lost = error
        owner._resume()
        owner._on_end(error)

    def pause_writing(self) -> None:
        self.owner._paused = True

    def resume_writing(self) -> None:
        self.owner._resume()


class PushTransport:
    """The socket of one session, read by callbacks (see the module docstring).

    Not an anyio stream: the session only writes to it (:meth:`send`) and
    closes it; reading is :meth:`start_push`."""

    __slots__ = (
        "_closed",
        "_drained",
        "_ended",
        "_lost",
        "_on_data_cb",
        "_on_end_cb",
        "_paused",
        "_pending",
        "_started",
        "_transport",
    )

    def __init__(self, transport: asyncio.Transport) -> None:
        # Per idle session this object is most of what the fast path costs, so
        # it keeps little: no reference to anyio's stream (whose protocol held
        # a queue and two events) and no Event until a write has to wait.
        self._transport = transport
        self._paused = False  # the socket's send buffer is full
        self._drained: asyncio.Future[None] | None = None
        self._pending: list[bytes] = []  # received before start_push()
        self._ended: BaseException | None = None  # the end, before start_push()
        self._lost: BaseException | None = None
        self._on_data_cb: OnData | None = None
        self._on_end_cb: OnEnd | None = None
        self._started = False
        self._closed = False

    def _take_over(self, old: Any) -> None:
        self._pending.extend(old.read_queue)
        old.read_queue.clear()
        if not old.write_event.is_set():
            self._paused = True
        if getattr(old, "exception", None) is not None:
            self._ended = anyio.BrokenResourceError(str(old.exception))
        elif getattr(old, "is_at_eof", False):
            self._ended = anyio.EndOfStream()
        self._transport.set_protocol(_Protocol(self))
        self._transport.resume_reading()  # anyio pauses reading between receives

    # ---------------------------------------------------------- push mode

    def start_push(self, on_data: OnData, on_end: OnEnd) -> None:
        """Deliver what was received so far, then every later chunk, to ``on_data``;
        the end of the connection (``EndOfStream`` or ``BrokenResourceError``)
        to ``on_end``, once.  Both run as event-loop callbacks."""
        self._started = True
        self._on_data_cb = on_data
        self._on_end_cb = on_end
        pending, self._pending = self._pending, []
        for data in pending:
            self._on_data(data)
        if self._ended is not None:
            self._on_end(self._ended)

    def stop_push(self) -> None:
        """Stop delivering: later bytes are dropped (the session is over)."""
        self._on_data_cb = None
        self._on_end_cb = None
        if not self._transport.is_closing():
            self._transport.pause_reading()

    def _on_data(self, data: bytes) -> None:
        callback = self._on_data_cb
        if callback is None:
            if not self._started and self._ended is None:
                self._pending.append(data)  # delivered by start_push()
            return  # stopped, or after the end: dropped
        token = sniffio.current_async_library_cvar.set("asyncio") if sniffio else None
        try:
            callback(data)
        finally:
            if token is not None:
                sniffio.current_async_library_cvar.reset(token)

    def _on_end(self, error: BaseException) -> None:
        callback = self._on_end_cb
        if callback is None:
            if self._ended is None:
                self._ended = error
            return
        self._on_data_cb = self._on_end_cb = None
        callback(error)

    # ---------------------------------------------------------- writing

    def writable_now(self) -> bool:
        """Whether :meth:`write_now` would write without anything to wait for
        (open, not lost, the socket's send buffer not full)."""
        return not (self._paused or self._closed) and self._lost is None

    def write_now(self, item: bytes | bytearray) -> None:
        """Write ``item`` without waiting (the caller checked :meth:`writable_now`).
        If this write filled the socket's buffer, await :meth:`drained` before
        counting the bytes as sent (:meth:`send` is the two together).

        Raises:
            anyio.ClosedResourceError: closed on this side.
            anyio.BrokenResourceError: the connection is lost.
        """
        if self._closed:
            raise anyio.ClosedResourceError
        if self._lost is not None:
            raise anyio.BrokenResourceError from self._lost
        try:
            self._transport.write(item)
        except RuntimeError as exc:
            raise anyio.BrokenResourceError from exc

    async def send(self, item: bytes) -> None:
        """Write ``item``; wait only while the socket's send buffer is full."""
        self.write_now(item)
        if self._paused:
            await self.drained()

    async def drained(self) -> None:
        """Wait until the socket's send buffer has room again (at once if it has):
        after :meth:`write_now`, what makes it a :meth:`send`.

        Raises:
            anyio.ClosedResourceError / anyio.BrokenResourceError: as :meth:`write_now`.
        """
        if self._paused:
            waiter = self._drained
            if waiter is None:
                waiter = self._drained = asyncio.get_running_loop().create_future()
            await asyncio.shield(waiter)  # shared by the writers that wait
        if self._closed:
            raise anyio.ClosedResourceError
        if self._lost is not None:
            raise anyio.BrokenResourceError from self._lost

    async def aclose(self) -> None:
        """Abort the connection (what anyio's stream does): ``send`` returned only
        once the kernel had every byte, so nothing written is lost."""
        self._closed = True
        self.stop_push()
        self._transport.abort()
        self._resume()
        await anyio.lowlevel.checkpoint()

    def _resume(self) -> None:
        self._paused = False
        waiter, self._drained = self._drained, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
