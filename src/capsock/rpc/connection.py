"""The msgpack-RPC connection and remote objects (see :mod:`capsock.rpc.msgpack`).

Public names are re-exported by :mod:`capsock.rpc.msgpack`; import them from there.
"""

from __future__ import annotations

import logging
from collections import OrderedDict, deque
from contextlib import suppress
from types import TracebackType
from typing import Any

import anyio
import anyio.abc
import msgpack

from ..errors import CapsockError, InvalidCapability, LocalUsageError
from ..keys import NodeId
from ..net.stream import CapsockAttribute, Stream
from ..node import Node
from ..uri import Capability
from . import ConnectionClosed, RemoteError, RpcProtocolError
from .exports import Exports
from .remote import RemoteObject
from .service import RpcConfig, Service, _current, _error_payload, _remote_error
from .wire import (
    CAPABILITY_EXT,
    MAX_MSGID,
    SERVICE_EXT,
    Decoder,
    Malformed,
    Notification,
    Request,
    Response,
    encode,
)

__all__ = ["Connection"]

log = logging.getLogger("capsock.rpc")

_READ = 65536
_FOREIGN_SERVICE = (
    "a service capability must name the node that sent it (or be one this node "
    "exported to it); refused"
)
"""The one text for every refused service capability: it tells nothing about
what the capability held (node, hints), and nothing was dialled."""


class _Pending:
    __slots__ = ("error", "event", "result")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.error: BaseException | None = None
        self.result: Any = None


class _NeedsExport(Exception):
    """Control flow inside _encode: an object must be exported first; never escapes."""

    def __init__(self, obj: Service | RemoteObject) -> None:
        self.obj = obj


# ------------------------------------------------------------------ connection


class Connection:
    """One msgpack-RPC connection over a byte stream; both ends may call.

    Use it as an async context manager (which runs its reader and writer), or
    through :func:`connect`, :func:`serve` and :func:`serve_stream`::

        async with rpc.Connection(stream, service, node=node) as conn:
            await conn.call("ping")

    Args:
        stream: a capsock :class:`~capsock.Stream` or any ``anyio.abc.ByteStream``
            (capability passing of services needs a capsock stream and ``node``).
        service: what this side offers the peer (``None``: nothing, every
            request is answered ``NoSuchMethod``).
        node: the local node; needed to export services and to call the
            remote objects the peer sends.
        config: limits and timeouts.
    """

    def __init__(
        self,
        stream: anyio.abc.ByteStream,
        service: Service | None = None,
        *,
        node: Node | None = None,
        config: RpcConfig | None = None,
    ) -> None:
        self.stream = stream
        self.service = service
        self.node = node
        self.config = config or RpcConfig()
        self.peer: NodeId | None = stream.extra(CapsockAttribute.peer_id, None)
        """The authenticated id of the other node (``None`` on a non-capsock stream)."""
        self._pending: dict[int, _Pending] = {}
        self._abandoned: OrderedDict[int, None] = OrderedDict()
        self._next_id = 0
        # The writer task owns the stream's send side; everyone else appends
        # whole messages here (atomic: a cancelled caller never leaves half a
        # message behind) and wakes it.
        self._out: deque[bytes] = deque()
        self._out_ready: anyio.Event | None = None  # the writer waits for messages
        self._out_room: anyio.Event | None = None  # senders wait for room in _out
        self._unsent = 0  # queued or being written
        self._flushed: anyio.Event | None = None
        self._running = 0
        self._changed: anyio.Event | None = None
        self._exports = Exports(node, self.peer, self._serve_export)
        self._remotes: set[RemoteObject] = set()
        self._tg: anyio.abc.TaskGroup | None = None
        self._outer: anyio.abc.TaskGroup | None = None
        self._calls_open = True  # until the connection closes or the peer's EOF
        self._closed = False
        self._done = anyio.Event()
        self._reason = "not started"
        self._cause: BaseException | None = None
        self.protocol_errors: list[RpcProtocolError] = []
        """The last (up to 16) protocol errors the peer caused, newest last."""
        self._warned: set[str] = set()
        self._stats = {
            "calls": 0,
            "requests": 0,
            "notifications": 0,
            "busy": 0,
            "malformed": 0,
            "unknown_responses": 0,
            "late_responses": 0,
        }

    def __repr__(self) -> str:
        peer = self.peer.short() if self.peer is not None else "?"
        state = "closed" if self._closed else "open"
        return f"<capsock.rpc.Connection peer={peer} {state} pending={len(self._pending)}>"

    def stats(self) -> dict[str, int]:
        """Counters: ``calls`` made, ``requests`` and ``notifications`` handled,
        ``busy`` refusals, ``malformed`` messages, ``unknown_responses`` (msgid
        never used or long gone) and ``late_responses`` (for abandoned calls)."""
        return {**self._stats, "pending": len(self._pending), "exports": len(self._exports)}

    @property
    def closed(self) -> bool:
        """Whether the connection has ended."""
        return self._closed

    # ---------------------------------------------------------- lifecycle

    async def __aenter__(self) -> Connection:
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._outer = tg
        try:
            await tg.start(self.run)
        except BaseException:
            tg.cancel_scope.cancel()
            await tg.__aexit__(None, None, None)
            self._outer = None
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            with anyio.CancelScope(shield=True):
                await self.aclose()
        finally:
            tg, self._outer = self._outer, None
            if tg is not None:
                await tg.__aexit__(None, None, None)

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Run the connection until it ends (the peer closes, the stream breaks,
        or :meth:`aclose`).  Usually run for you by ``async with``.

        Raises:
            LocalUsageError: the connection was already run.
        """
        if self._tg is not None or self._closed:
            raise LocalUsageError("a Connection runs once")
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                self._reason = "open"
                tg.start_soon(self._write_loop)
                tg.start_soon(self._read_loop)
                task_status.started()
        finally:
            with anyio.CancelScope(shield=True):
                await self._cleanup()

    async def wait_closed(self) -> None:
        """Wait until the connection has ended."""
        await self._done.wait()

    async def aclose(self) -> None:
        """Close now: calls in flight (both ways) are abandoned and raise
        :class:`ConnectionClosed`; exports made over this connection are
        revoked.  Idempotent."""
        self._end("closed locally")
        if self._tg is not None:
            await self._done.wait()
        elif not self._done.is_set():
            with anyio.CancelScope(shield=True):
                await self._cleanup()

    def _end(self, reason: str, cause: BaseException | None = None) -> None:
        if self._closed:
            return
        self._closed = True
        self._calls_open = False
        self._reason, self._cause = reason, cause
        self._fail_pending()
        if self._tg is not None:
            self._tg.cancel_scope.cancel()

    def _fail_pending(self) -> None:
        pending, self._pending = self._pending, {}
        for p in pending.values():
            p.error = self._closed_error()
            p.event.set()

    def _closed_error(self) -> ConnectionClosed:
        exc = ConnectionClosed(f"the RPC connection ended: {self._reason}")
        exc.__cause__ = self._cause
        return exc

    async def _cleanup(self) -> None:
        if self._done.is_set():
            return
        self._end(self._reason if self._closed else "ended")
        self._out.clear()
        self._wake_senders()
        for remote in list(self._remotes):
            await remote.aclose()
        await self._exports.revoke_all()
        await self.stream.aclose()
        self._done.set()
        log.debug("RPC connection with %s ended: %s", _short(self.peer), self._reason)

    # ---------------------------------------------------------- calling

    async def call(
        self,
        method: str,
        *params: Any,
        timeout: float | None = None,  # noqa: ASYNC109 -- per call, defaults to the config's
    ) -> Any:
        """Call ``method`` on the peer and return its result.

        Cancelling the caller abandons the call: the request may still run on
        the peer, and its late answer is dropped.

        Args:
            timeout: seconds to wait for the answer (default ``config.call_timeout``).

        Raises:
            RemoteError: the peer answered with an error.
            TimeoutError: no answer within ``timeout``.
            ConnectionClosed: the connection ended first (or was already closed).
            MalformedMessage: the peer's answer was not a valid response.
            LocalUsageError: the encoded request is over ``max_message_size``, or
                a service is passed without a capsock stream and ``node``.
            TypeError / ValueError / OverflowError: a parameter has no msgpack encoding.
        """
        if not self._calls_open:
            raise self._closed_error()
        msgid = self._new_id()
        pending = _Pending()
        self._pending[msgid] = pending
        self._stats["calls"] += 1
        if timeout is None:
            timeout = self.config.call_timeout
        try:
            if timeout is None:  # the common case: no cancel scope to build
                await self._enqueue(await self._encode([0, msgid, method, list(params)]))
                await pending.event.wait()
            else:
                with anyio.fail_after(timeout):
                    await self._enqueue(await self._encode([0, msgid, method, list(params)]))
                    await pending.event.wait()
        finally:
            if self._pending.pop(msgid, None) is not None:
                self._abandon(msgid)
        if pending.error is not None:
            raise pending.error
        return pending.result

    async def notify(self, method: str, *params: Any) -> None:
        """Send a notification (no answer, no delivery guarantee beyond the stream's).

        Raises:
            ConnectionClosed: the connection has ended.
            LocalUsageError / TypeError / ValueError: as :meth:`call`.
        """
        if not self._calls_open:
            raise self._closed_error()
        await self._enqueue(await self._encode([2, method, list(params)]))

    def _new_id(self) -> int:
        msgid = self._next_id
        while msgid in self._pending:
            msgid = (msgid + 1) & MAX_MSGID
        self._next_id = (msgid + 1) & MAX_MSGID
        return msgid

    def _abandon(self, msgid: int) -> None:
        self._abandoned[msgid] = None
        if len(self._abandoned) > 1024:
            self._abandoned.popitem(last=False)

    async def _enqueue(self, data: bytes) -> None:
        if len(data) > self.config.max_message_size:
            raise LocalUsageError(
                f"the message is {len(data)} bytes, over max_message_size="
                f"{self.config.max_message_size}; send bulk data over a capsock stream "
                "(pass a temporary socket's capability)"
            )
        while len(self._out) >= self.config.send_queue and not self._closed:
            room = self._out_room = self._out_room or anyio.Event()
            await room.wait()
        if self._closed:
            raise self._closed_error()
        self._out.append(data)
        self._unsent += 1
        ready = self._out_ready
        if ready is not None:
            self._out_ready = None
            ready.set()

    def _wake_senders(self) -> None:
        room = self._out_room
        if room is not None:
            self._out_room = None
            room.set()

    # ---------------------------------------------------------- encoding, exports

    async def _encode(self, message: list[Any]) -> bytes:
        while True:
            try:
                return encode(message, self._default)
            except _NeedsExport as need:
                await self._export(need.obj)

    def _default(self, obj: Any) -> Any:
        if isinstance(obj, Capability):
            return msgpack.ExtType(CAPABILITY_EXT, str(obj).encode("utf-8"))
        if isinstance(obj, Service | RemoteObject):
            if isinstance(obj, RemoteObject) and obj.capability.node == self.peer:
                # Back to the node it came from, which resolves it to its own object.
                return msgpack.ExtType(SERVICE_EXT, str(obj.capability).encode("utf-8"))
            cap = self._exports.capability(obj)
            if cap is None:
                raise _NeedsExport(obj)
            return msgpack.ExtType(SERVICE_EXT, str(cap).encode("utf-8"))
        raise TypeError(f"cannot encode a {type(obj).__name__} in msgpack-RPC")

    async def _export(self, obj: Service | RemoteObject) -> None:
        """Export ``obj`` to the peer (see :class:`Exports`).

        Raises:
            LocalUsageError: no node, or not a capsock stream.
            ConnectionClosed: the connection has ended.
        """
        if self._tg is None or self._closed:
            raise self._closed_error()
        await self._exports.export(obj, self._tg)

    async def _serve_export(self, stream: Stream, service: Service) -> None:
        async with Connection(stream, service, node=self.node, config=self.config) as conn:
            await conn.wait_closed()

    def _resolve(self, cap: Capability) -> Any:
        """A received service capability: our own object if we exported it to
        this very peer (it is passing it back), else a remote object.

        A genuine export names the node that sent it, so anything else is
        refused before anything is dialled, with one error whatever the
        capability holds.  The remote object is reached over the session with
        the peer, never at the addresses the peer wrote into the capability
        (:meth:`_open_child`; docs/rpc.md, "Which service capabilities are
        accepted").

        Raises:
            InvalidCapability: the capability names another node (the
                decoder turns this into a malformed message).
        """
        own = self._exports.resolve(cap)
        if own is not None:
            return own
        if self.peer is None or cap.node != self.peer:
            raise InvalidCapability(_FOREIGN_SERVICE)
        return RemoteObject(cap, self)

    async def _open_child(self, remote: RemoteObject) -> Connection:
        """A connection to ``remote``, run in this connection's task group.

        Raises:
            ConnectionClosed: this connection has ended.
            LocalUsageError: this connection has no node.
            The errors of :meth:`capsock.Node.connect`.
        """
        tg = self._tg
        if self._closed or tg is None:
            raise ConnectionClosed(
                "this remote object is closed: the connection it arrived over has ended"
            )
        if self.node is None:
            raise LocalUsageError("calling a remote object needs a Connection with node=...")
        # Without the hints the peer wrote: only the session this node already
        # has with the exporter is used, so a peer cannot make this node dial
        # addresses of its choosing (when that session is gone, this fails
        # with Unreachable and nothing is dialled).
        stream = await self.node.connect(remote.capability.with_hints(()))
        child = Connection(stream, None, node=self.node, config=self.config)
        try:
            await tg.start(child.run)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await child.aclose()
            raise
        self._remotes.add(remote)
        return child

    # ---------------------------------------------------------- reading

    async def _read_loop(self) -> None:
        decoder = Decoder(
            self.config.max_message_size,
            self.config.max_items,
            service_hook=self._resolve,
            read_size=_READ,
        )
        try:
            while True:
                data = await self.stream.receive(_READ)
                for event in decoder.feed(data):
                    if isinstance(event, Response):
                        self._on_response(event)
                    elif isinstance(event, Request):
                        await self._on_request(event)
                    elif isinstance(event, Notification):
                        await self._on_notification(event)
                    else:
                        await self._on_malformed(event)
        except anyio.EndOfStream:
            await self._peer_finished()
        except RpcProtocolError as exc:
            self._note(exc)
            log.warning("closing the RPC connection with %s: %s", _short(self.peer), str(exc))
            self._end(str(exc), exc)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, CapsockError) as exc:
            self._end(f"the stream broke ({type(exc).__name__})", exc)

    async def _peer_finished(self) -> None:
        """The peer's end of stream: it sends nothing more, so it answers nothing more."""
        self._calls_open = False
        self._reason = "the peer closed the connection"
        self._fail_pending()
        with anyio.move_on_after(self.config.close_grace):
            while self._running:
                self._changed = anyio.Event()
                await self._changed.wait()
            while self._unsent:
                self._flushed = anyio.Event()
                await self._flushed.wait()
        self._end("the peer closed the connection")

    def _on_response(self, msg: Response) -> None:
        pending = self._pending.pop(msg.msgid, None)
        if pending is None:
            if msg.msgid in self._abandoned:
                del self._abandoned[msg.msgid]
                self._stats["late_responses"] += 1
                log.debug("dropped the late answer to abandoned call %d", msg.msgid)
            else:
                self._stats["unknown_responses"] += 1
                self._warn_once(
                    "unknown_responses", "dropped a response from %s for unknown msgid %d",
                    _short(self.peer), msg.msgid,
                )  # fmt: skip
            return
        if msg.error is not None:
            pending.error = _remote_error(msg.error)
        else:
            pending.result = msg.result
        pending.event.set()

    async def _slot(self) -> bool:
        """Wait (up to ``busy_timeout``) until fewer than the allowed handlers run.

        The reader itself waits, so a peer that sends faster than it is served
        is slowed down by flow control instead of growing our memory.
        """
        limit = self.config.max_concurrent_requests
        if self._running >= limit:
            with anyio.move_on_after(self.config.busy_timeout):
                while self._running >= limit:
                    self._changed = anyio.Event()
                    await self._changed.wait()
        return self._running < limit

    async def _on_request(self, msg: Request) -> None:
        service = self.service
        inline = service._rpc_inline(msg.method) if service is not None else None
        if inline is not None:
            # A plain (synchronous) method runs here, in the reader, and its
            # answer is queued at once: no task to spawn, no extra loop turn.
            self._stats["requests"] += 1
            token = _current.set(self)
            try:
                error, result = None, inline(*msg.params)
            except Exception as exc:
                error, result = _error_payload(exc, msg.method), None
            finally:
                _current.reset(token)
            await self._respond(msg.msgid, error, result)
            return
        if not await self._slot():
            self._stats["busy"] += 1
            error = ["Busy", f"over {self.config.max_concurrent_requests} requests at once"]
            await self._respond(msg.msgid, error, None)
            return
        tg = self._tg
        if tg is None or self._closed:
            return
        self._running += 1
        self._stats["requests"] += 1
        tg.start_soon(self._handle_request, msg)

    async def _on_notification(self, msg: Notification) -> None:
        if not await self._slot():
            self._stats["busy"] += 1
            self._warn_once("busy", "dropped a notification from %s: too busy", _short(self.peer))
            return
        tg = self._tg
        if tg is None or self._closed:
            return
        self._running += 1
        self._stats["notifications"] += 1
        tg.start_soon(self._handle_notification, msg)

    async def _on_malformed(self, event: Malformed) -> None:
        err = event.error
        self._note(err)
        self._warn_once("malformed", "malformed message from %s: %s", _short(self.peer), err)
        if err.kind == 0 and err.msgid is not None:
            await self._respond(err.msgid, ["InvalidRequest", str(err)], None)
        elif err.kind == 1 and err.msgid is not None:
            pending = self._pending.pop(err.msgid, None)
            if pending is not None:
                pending.error = err
                pending.event.set()

    def _warn_once(self, kind: str, message: str, *args: object) -> None:
        """Log what a peer can repeat at will once per connection as a warning,
        then at debug level: ``stats()`` counts every one, and a peer must not
        be able to flood the log."""
        level = logging.DEBUG if kind in self._warned else logging.WARNING
        self._warned.add(kind)
        log.log(level, message + " (further ones: debug level; see stats())", *args)

    def _note(self, err: RpcProtocolError) -> None:
        self._stats["malformed"] += 1
        self.protocol_errors.append(err)
        del self.protocol_errors[:-16]

    # ---------------------------------------------------------- handling

    def _handler_done(self) -> None:
        self._running -= 1
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    async def _invoke(self, method: str, params: list[Any]) -> Any:
        if self.service is None:
            raise RemoteError("NoSuchMethod", "this side offers no methods")
        _current.set(self)
        return await self.service.rpc_call(method, params)

    async def _handle_request(self, msg: Request) -> None:
        try:
            try:
                result = await self._invoke(msg.method, msg.params)
            except Exception as exc:
                await self._respond(msg.msgid, _error_payload(exc, msg.method), None)
            else:
                await self._respond(msg.msgid, None, result)
        finally:
            self._handler_done()

    async def _handle_notification(self, msg: Notification) -> None:
        try:
            if self.service is None:
                return
            _current.set(self)
            await self.service.rpc_notify(msg.method, msg.params)
        except Exception as exc:
            payload = _error_payload(exc, msg.method)
            log.info("notification %r failed: %s", msg.method[:100], payload)
        finally:
            self._handler_done()

    async def _respond(self, msgid: int, error: Any, result: Any) -> None:
        try:
            data = await self._encode([1, msgid, error, result])
            if len(data) > self.config.max_message_size:
                raise LocalUsageError(f"the result is {len(data)} bytes, over max_message_size")
        except (TypeError, ValueError, OverflowError, LocalUsageError) as exc:
            data = encode([1, msgid, ["InvalidResult", _text(exc)], None])
        except ConnectionClosed:
            return
        with suppress(ConnectionClosed):
            await self._enqueue(data)

    # ---------------------------------------------------------- writing

    async def _write_loop(self) -> None:
        out = self._out
        try:
            while True:
                if not out:
                    ready = self._out_ready = anyio.Event()
                    await ready.wait()
                    continue
                first = out.popleft()
                batch = [first]
                size = len(first)
                while out and size < _READ * 4:  # coalesce what queued up meanwhile
                    more = out.popleft()
                    batch.append(more)
                    size += len(more)
                self._wake_senders()
                await self.stream.send(first if len(batch) == 1 else b"".join(batch))
                self._unsent -= len(batch)
                if not self._unsent and self._flushed is not None:
                    self._flushed.set()
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, CapsockError) as exc:
            self._end(f"the stream broke ({type(exc).__name__})", exc)


def _short(peer: NodeId | None) -> str:
    return peer.short() if peer is not None else "a non-capsock peer"


def _text(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
