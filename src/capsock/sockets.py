"""A real socket for code that wants one: a capsock stream behind ``socket.socketpair()``.

Blocking libraries (and anything that insists on a file descriptor) can use a
capsock stream through :func:`to_socket`::

    from capsock import sockets

    stream = await node.connect(uri)
    async with sockets.to_socket(stream) as sock:        # a blocking socket.socket
        reply = await anyio.to_thread.run_sync(blocking_client, sock)

A task splices the stream and one end of a socket pair; the caller gets the
other end, a blocking ``AF_UNIX`` stream socket.  What the caller writes goes
to the stream, what the stream delivers can be read from the socket, and the
ends are passed on: ``sock.shutdown(SHUT_WR)`` is a capsock half-close
(``send_eof``), the peer's EOF reads as ``b""``.  Works on asyncio and trio.

Failures are never a clean end.  If the stream breaks (reset by the peer,
session lost), the caller's socket is reset: it reads what had already
arrived, then ``recv`` raises ``ConnectionResetError`` and ``send``
``BrokenPipeError`` (on Linux: an ``AF_UNIX`` socket closed with unread data
resets its peer; capsock leaves one such byte there).  One limit: a caller
that had already shut down its own sending side sees ``b""`` instead, as the
reset needs that byte.  If the caller closes its socket while bytes to it are
unread, or the peer is still sending, the stream is reset, as a TCP close
would be.

Leaving the ``async with`` closes the caller's socket: what it wrote is still
delivered, followed by an EOF; then the stream is closed.  Leaving with an
exception resets the stream instead.  Finish using the socket (in threads
too) before you leave the block.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import AsyncIterator

import anyio
import anyio.abc

from .errors import CapsockError

__all__ = ["to_socket"]

log = logging.getLogger("capsock.sockets")

_CHUNK = 65536
_STREAM_ERRORS = (anyio.BrokenResourceError, anyio.ClosedResourceError, CapsockError)


class _Splice:
    """Copies between a byte stream and our (non-blocking) end of the socket pair."""

    def __init__(
        self, stream: anyio.abc.ByteStream, ours: socket.socket, theirs: socket.socket
    ) -> None:
        self.stream = stream
        self.ours = ours
        self.theirs = theirs
        self.up = anyio.CancelScope()
        self.down = anyio.CancelScope()
        self.up_done = anyio.Event()
        self.ours_closed = False

    def close_ours(self) -> None:
        if not self.ours_closed:
            self.ours_closed = True
            anyio.notify_closing(self.ours)
            self.ours.close()

    def stream_failed(self, exc: BaseException) -> None:
        """The stream broke: reset the caller's socket (Linux: close ours with unread data)."""
        log.info("stream behind a socket ended: %s", exc)
        with contextlib.suppress(OSError):
            self.theirs.send(b"\0", socket.MSG_DONTWAIT)
        self.close_ours()
        self.up.cancel()
        self.down.cancel()

    def caller_failed(self) -> None:
        """The caller's end was reset (closed with bytes to it unread): reset the stream."""
        reset = getattr(self.stream, "reset", None)
        if reset is not None:
            reset()
        self.up.cancel()
        self.down.cancel()

    async def _recv(self) -> bytes:
        while True:
            try:
                return self.ours.recv(_CHUNK)
            except BlockingIOError:
                await anyio.wait_readable(self.ours)

    async def _send_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[self.ours.send(view) :]
            except BlockingIOError:
                await anyio.wait_writable(self.ours)

    async def upstream(self) -> None:
        """Caller -> stream."""
        with self.up:
            try:
                while True:
                    try:
                        data = await self._recv()
                    except (OSError, anyio.ClosedResourceError):
                        if not self.ours_closed:
                            self.caller_failed()
                        return
                    try:
                        if not data:
                            await self.stream.send_eof()
                            return
                        await self.stream.send(data)
                    except _STREAM_ERRORS as exc:
                        self.stream_failed(exc)
                        return
            finally:
                self.up_done.set()

    async def downstream(self) -> None:
        """Stream -> caller."""
        with self.down:
            while True:
                try:
                    data = await self.stream.receive(_CHUNK)
                except anyio.EndOfStream:
                    with contextlib.suppress(OSError):
                        self.ours.shutdown(socket.SHUT_WR)
                    return
                except _STREAM_ERRORS as exc:
                    self.stream_failed(exc)
                    return
                try:
                    await self._send_all(data)
                except (OSError, anyio.ClosedResourceError):
                    return  # the caller closed its end; the stream's close resets it


@contextlib.asynccontextmanager
async def to_socket(stream: anyio.abc.ByteStream) -> AsyncIterator[socket.socket]:
    """A blocking ``socket.socket`` whose bytes travel over ``stream`` (see the module doc).

    The stream belongs to the bridge from now on: it is closed when the block
    ends.  Works with any ``anyio.abc.ByteStream``; a capsock :class:`Stream`
    is reset when the caller's side fails.
    """
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    splice = _Splice(stream, ours, theirs)
    failed: Exception | None = None
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(splice.downstream)
            tg.start_soon(splice.upstream)
            try:
                yield theirs
            except Exception as exc:  # raised after the task group, not inside a group
                failed = exc
            except BaseException:
                splice.caller_failed()
                raise
            if failed is not None:
                splice.caller_failed()
            else:
                theirs.close()  # the caller is done: we read what it wrote, then EOF
                await splice.up_done.wait()
                splice.down.cancel()
        if failed is not None:
            raise failed
    finally:
        splice.close_ours()
        theirs.close()
        with anyio.CancelScope(shield=True):
            await stream.aclose()
