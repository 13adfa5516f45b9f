"""The application's view of one capsock stream: an ``anyio.abc.ByteStream``.

A :class:`Stream` never touches the transport.  It buffers what the session's
reader hands it, acknowledges bytes to the mux as the application consumes them
(that is what makes flow control real), and queues outgoing data within the
credit the peer granted.

Errors at this boundary are capsock errors *and* anyio errors at once:
a reset or a lost session raises an exception that is both a
:class:`capsock.StreamReset` (or :class:`capsock.ConnectionLost`) and an
``anyio.BrokenResourceError``; the clean end is ``anyio.EndOfStream`` and only
ever follows an authenticated EOF; using a closed stream raises
``anyio.ClosedResourceError``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
import anyio.lowlevel
from anyio import TypedAttributeSet, typed_attribute

from ..errors import ConnectionLost, ErrorCode, StreamReset
from ..keys import NodeId
from ..uri import Capability

if TYPE_CHECKING:
    from .session import Session

INLINE_SEND_MAX = 16 * 1024
"""A send of at most this many bytes is written from the caller's task when no
write is in progress (:meth:`Session.flush_inline`); larger ones are left to
the session's writer task, which batches them."""

__all__ = ["CapsockAttribute", "Stream"]


class CapsockAttribute(TypedAttributeSet):
    """Typed extra attributes of capsock streams and listeners (``stream.extra(...)``)."""

    peer_id: NodeId = typed_attribute()
    """The authenticated NodeId of the other end."""
    handshake_hash: bytes = typed_attribute()
    """The Noise handshake hash of the session (channel binding; public)."""
    capability: Capability = typed_attribute()
    """The capability the stream was opened with (its ``repr`` is redacted)."""
    route: str = typed_attribute()
    """How the session reached the peer: the route hint the dialer used
    (``tcp=127.0.0.1:4000``, ``unix=/run/app.sock``) or, on the accepting
    side, ``inbound tcp:ADDR:PORT`` / ``inbound unix:PATH``."""


class StreamResetError(StreamReset, anyio.BrokenResourceError):
    """A reset stream, catchable as ``capsock.StreamReset`` or ``anyio.BrokenResourceError``."""


class ConnectionLostError(ConnectionLost, anyio.BrokenResourceError):
    """A lost session, catchable as ``capsock.ConnectionLost`` or ``anyio.BrokenResourceError``."""


_READ_CHUNK = 65536
_COALESCE_BELOW = 4096


class Stream(anyio.abc.ByteStream):
    """One reliable, ordered, flow-controlled, end-to-end encrypted byte stream.

    Created by :meth:`capsock.Node.connect` and :meth:`capsock.Listener.accept`,
    never directly.
    """

    def __init__(self, session: Session, stream_id: int, capability: Capability | None) -> None:
        self._session = session
        self._sid = stream_id
        self._capability = capability
        self._buf: deque[bytes | bytearray | memoryview] | None = (
            None  # created on first data: idle streams stay small
        )
        self._eof = False
        self._local_eof = False
        self._closed = False
        self._error: BaseException | None = None
        self._readable: anyio.Event | None = None
        self._writable: anyio.Event | None = None
        self._receiving = False
        self._sending = False

    # ---------------------------------------------------------- attributes

    @property
    def peer(self) -> NodeId:
        """The authenticated NodeId of the other end."""
        return self._session.peer

    @property
    def stream_id(self) -> int:
        """This stream's id inside its session (public, for logs)."""
        return self._sid

    @property
    def buffered(self) -> int:
        """Bytes received and not yet read by the application."""
        return sum(len(c) for c in self._buf) if self._buf else 0

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        attrs: dict[Any, Callable[[], Any]] = {
            CapsockAttribute.peer_id: lambda: self._session.peer,
            CapsockAttribute.handshake_hash: lambda: self._session.handshake_hash,
            CapsockAttribute.route: lambda: self._session.route,
        }
        if self._capability is not None:
            cap = self._capability
            attrs[CapsockAttribute.capability] = lambda: cap
        return attrs

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("broken" if self._error else "open")
        return f"<capsock.Stream {self._sid} peer={self.peer.short()} {state}>"

    # ---------------------------------------------------------- called by the session

    def _on_data(self, data: bytes | memoryview) -> None:
        if self._closed:
            self._session.consumed(self._sid, len(data))
            return
        buf = self._buf
        if buf is None:
            buf = self._buf = deque()
        # What is buffered must cost about what the peer's window counts (the
        # payload bytes), whatever the peer packs into its records:
        if len(data) < _COALESCE_BELOW:
            # small payloads are copied into one growing tail, not kept as one
            # object (and one view of a whole record) each;
            tail = buf[-1] if buf else None
            if type(tail) is bytearray and len(tail) < _COALESCE_BELOW:
                tail += data
            else:
                buf.append(bytearray(data))
        elif type(data) is memoryview and 2 * len(data) < len(data.obj):  # type: ignore[arg-type]
            # a view covering under half of its decrypted record is copied, so
            # a record mostly made of other frames is not kept alive by it;
            buf.append(bytes(data))
        else:
            buf.append(data)  # zero-copy: the view is most of its record
        self._wake_reader()

    def _on_eof(self) -> None:
        self._eof = True
        self._wake_reader()

    def _on_reset(self, code: ErrorCode) -> None:
        if self._error is None:
            self._error = StreamResetError(
                f"stream {self._sid} with {self.peer.short()} was reset by the peer "
                f"({code.name}): "
                + (
                    "the service it shares could not be reached (refused or down)"
                    if code == ErrorCode.UNAVAILABLE
                    else "it abandoned the stream; what arrived before was delivered"
                ),
                code,
            )
        self._wake_reader()
        self._wake_writer()

    def _on_lost(self, reason: str) -> None:
        if self._error is None:
            self._error = ConnectionLostError(
                f"the session with {self.peer.short()} ended before the stream "
                f"finished ({reason}); data after the last received byte was lost",
                ErrorCode.INTERNAL_ERROR,
            )
        self._wake_reader()
        self._wake_writer()

    def reset(self, code: ErrorCode = ErrorCode.CANCELLED) -> None:
        """Abort the stream in both directions at once (RESET): the peer's
        reads and writes fail with :class:`capsock.StreamReset` instead of
        seeing a clean end; data not yet delivered is dropped.  Idempotent."""
        self._reset_locally(code, "reset by this side")

    def _reset_locally(self, code: ErrorCode, why: str) -> None:
        """Reset the stream from this side (e.g. its capability was revoked)."""
        if self._closed or self._error is not None:
            return
        self._error = StreamResetError(
            f"stream {self._sid} with {self.peer.short()} was reset: {why}", code
        )
        # Dropped unread: the session returns their credit to the peer (the
        # mux counts what the stream holds), or the peer's session window
        # would shrink by this much for good.
        self._buf = None
        self._session.reset_stream(self._sid, code)
        self._wake_reader()
        self._wake_writer()

    def _on_credit(self) -> None:
        self._wake_writer()

    def _wake_reader(self) -> None:
        if self._readable is not None:
            self._readable.set()
            self._readable = None

    def _wake_writer(self) -> None:
        if self._writable is not None:
            self._writable.set()
            self._writable = None

    # ---------------------------------------------------------- ByteStream

    async def receive(self, max_bytes: int = _READ_CHUNK) -> bytes:
        """Receive up to ``max_bytes`` bytes (at least one).

        A checkpoint, like anyio's own streams: every call is a cancellation
        point and lets other tasks run, also when data is ready (a loop of
        ``receive()`` cannot hold the event loop).  A cancelled call takes
        nothing from the buffer.

        Raises:
            anyio.EndOfStream: the peer half-closed after an authenticated EOF.
            StreamReset: the peer reset the stream (also ``anyio.BrokenResourceError``).
            ConnectionLost: the session died first (also ``anyio.BrokenResourceError``).
            anyio.ClosedResourceError: this stream was closed locally.
            anyio.BusyResourceError: another task is already receiving.
        """
        if self._receiving:
            raise anyio.BusyResourceError("receiving from")
        self._receiving = True
        try:
            # One checkpoint per call: the wait below when nothing is ready,
            # else this one, taken before anything is consumed (so a
            # cancellation here loses nothing) and followed by a fresh look.
            checkpointed = False
            while True:
                buf = self._buf
                if not checkpointed and (
                    buf or self._eof or self._closed or self._error is not None
                ):
                    await anyio.lowlevel.checkpoint()
                    checkpointed = True
                    continue
                if self._closed:
                    raise anyio.ClosedResourceError
                if buf:
                    # Gather what is buffered, up to max_bytes, in one copy.
                    pieces: list[bytes | bytearray | memoryview] = []
                    room = max_bytes
                    while buf and room:
                        chunk = buf[0]
                        if len(chunk) <= room:
                            buf.popleft()
                        else:
                            buf[0] = chunk[room:]
                            chunk = chunk[:room]
                        pieces.append(chunk)
                        room -= len(chunk)
                    data = bytes(pieces[0]) if len(pieces) == 1 else b"".join(pieces)
                    self._session.consumed(self._sid, len(data))
                    return data
                if self._eof:
                    raise anyio.EndOfStream
                if self._error is not None:
                    raise self._error.with_traceback(None)  # no growing chain of old frames
                event = self._readable = anyio.Event()
                await event.wait()
                checkpointed = True
        finally:
            self._receiving = False

    async def send(self, item: bytes) -> None:
        """Send all of ``item``; waits while the peer's credit is used up.

        Returns once the bytes are queued in the session (within the peer's
        window), not when the peer has read them.  A checkpoint on every call
        (a cancellation point before anything is queued, and a turn for other
        tasks), like anyio's own streams.

        Raises:
            StreamReset: the peer reset the stream (also ``anyio.BrokenResourceError``).
            ConnectionLost: the session died (also ``anyio.BrokenResourceError``).
            anyio.ClosedResourceError: closed, or half-closed with :meth:`send_eof`.
            anyio.BusyResourceError: another task is already sending.
        """
        if self._sending:
            raise anyio.BusyResourceError("sending to")
        self._sending = True
        try:
            await anyio.lowlevel.checkpoint()  # cancelled here: nothing was queued
            data = item if isinstance(item, bytes) else bytes(item)
            view = memoryview(data)
            session = self._session
            small = len(view) <= INLINE_SEND_MAX
            while True:
                if self._closed or self._local_eof:
                    raise anyio.ClosedResourceError
                if self._error is not None:
                    raise self._error.with_traceback(None)  # no growing chain of old frames
                if not view:
                    if small:
                        await session.flush_inline()
                    return
                n = session.send_data(self._sid, view, kick=not small)
                if n:
                    view = view[n:]
                    continue
                if small:
                    session._kick()  # what was queued goes out while we wait for credit
                event = self._writable = anyio.Event()
                session.wait_to_send(self)
                try:
                    await event.wait()
                finally:
                    session.done_waiting(self)  # a closed stream is not kept referenced
        finally:
            self._sending = False

    async def send_eof(self) -> None:
        """Half-close: the peer reads the rest, then ``EndOfStream``.  Idempotent.

        A checkpoint (cancelled there, the stream is not half-closed).

        Raises:
            anyio.ClosedResourceError: the stream was closed.
            StreamReset / ConnectionLost: the stream is already broken.
        """
        await anyio.lowlevel.checkpoint()
        if self._closed:
            raise anyio.ClosedResourceError
        if self._local_eof:
            return
        if self._error is not None:
            raise self._error.with_traceback(None)  # no growing chain of old frames
        self._local_eof = True
        self._session.send_eof(self._sid)

    async def aclose(self) -> None:
        """Close the stream.  Idempotent.

        Everything already sent is still delivered, followed by an EOF.  If the
        peer had not finished sending, the stream is also reset, so its further
        sends fail instead of filling a buffer nobody reads.

        A checkpoint, like anyio's own streams: the stream is closed first, then
        other tasks get a turn; the only thing it can raise is the caller's
        cancellation, and the stream is closed even then (close several
        streams in a cancelled scope inside ``CancelScope(shield=True)``, or
        with ``anyio.aclose_forcefully``, so that one cancellation does not
        skip the rest).
        """
        self._close()
        await anyio.lowlevel.checkpoint()

    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._buf = None
        self._session.close_stream(
            self._sid,
            send_eof=not self._local_eof,
            reset=not self._eof and self._error is None,
        )
        self._wake_reader()
        self._wake_writer()
