"""Node internals: :class:`Listener`, the streams opened with one root capability.

It needs a few things of its node, named by :class:`ListenerHost` (which
:class:`capsock.Node` satisfies): the tables of listeners, the capability store
(use counters, temporary roots), the node's task group, its wall clock and
its record of retired roots.  Public as
``capsock.Listener`` and ``capsock.node.Listener``.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import anyio
import anyio.abc

from ..errors import CapsockError
from ..net.stream import CapsockAttribute, Stream
from ..store import Store
from ..uri import Capability, Expires

__all__ = ["Listener", "ListenerHost"]

log = logging.getLogger("capsock.node")

MAX_RETIRED_ROOTS = 4096
"""Root ids of closed temporary listeners remembered, with why they retired
(for the refusal log line only; the oldest go first)."""


class ListenerHost(Protocol):
    """What a :class:`Listener` needs of its node."""

    _listeners: dict[bytes, Listener]
    _all_listeners: set[Listener]
    _store: Store
    _tg: anyio.abc.TaskGroup | None
    _retired_roots: collections.OrderedDict[bytes, str]
    _wall_clock: Callable[[], float]


class Listener(anyio.abc.Listener[Stream]):
    """Accepts the streams opened with one root capability (``listener.uri``)."""

    def __init__(self, node: ListenerHost, uri: Capability, backlog: int) -> None:
        self._node = node
        self._uri = uri
        self._send, self._recv = anyio.create_memory_object_stream[Stream](backlog)
        self._backlog = backlog
        self._closed = False
        self._retired = False
        node._all_listeners.add(self)
        self._uses: tuple[bytes, int] | None = None  # (counter key, limit) of its own cap
        self._tags: tuple[bytes, ...] = ()  # chain tags of its own capability
        self._temporary = False  # its root is forgotten when it closes

    @property
    def uri(self) -> Capability:
        """The capability to hand out (``str()`` gives the ``capsock://`` URI)."""
        return self._uri

    def __repr__(self) -> str:
        return f"<capsock.Listener {self._uri.redacted()}>"

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        return {CapsockAttribute.capability: lambda: self._uri}

    def _retire(self) -> None:
        """Accept no new streams; queued ones stay acceptable, then accept() ends."""
        if self._retired:
            return
        self._retired = True
        if self._node._listeners.get(self._uri.token.root_id) is self:
            del self._node._listeners[self._uri.token.root_id]
        self._send.close()

    def _check_used_up(self) -> None:
        if self._uses is not None and not self._retired:
            key, limit = self._uses
            if self._node._store.uses(key) >= limit:
                log.info("temporary listener %s is used up", self._uri.redacted())
                self._retire()

    def _full(self) -> bool:
        return self._send.statistics().current_buffer_used >= self._backlog

    def _deliver(self, stream: Stream) -> None:
        try:
            self._send.send_nowait(stream)
        except (anyio.WouldBlock, anyio.ClosedResourceError, anyio.BrokenResourceError):
            self._node._tg.start_soon(stream.aclose) if self._node._tg else None

    async def accept(self) -> Stream:
        """Wait for the next stream opened with this listener's capability.

        Raises:
            anyio.ClosedResourceError: the listener was closed.
        """
        try:
            return await self._recv.receive()
        except anyio.EndOfStream:
            raise anyio.ClosedResourceError from None

    async def serve(
        self,
        handler: Callable[[Stream], Any],
        task_group: anyio.abc.TaskGroup | None = None,
    ) -> None:
        """Run ``handler(stream)`` in a new task for every accepted stream, until closed.

        Each stream is closed when its handler returns.  An exception from one
        handler is logged (``capsock.node`` logger) and does not stop the others.
        """

        async def run(stream: Stream) -> None:
            # One misbehaving peer or handler must not stop the listener: stream
            # errors are expected (peers vanish) and only logged; anything else
            # is logged with its traceback.
            try:
                async with stream:
                    await handler(stream)
            except (
                anyio.BrokenResourceError,
                anyio.ClosedResourceError,
                anyio.EndOfStream,
                CapsockError,
            ) as exc:
                log.info("stream from %s ended: %s", stream.peer.short(), str(exc))
            except Exception:
                log.exception("stream handler failed; the listener keeps serving")

        async with anyio.create_task_group() as own:
            tg = task_group or own
            while True:
                try:
                    stream = await self.accept()
                except anyio.ClosedResourceError:
                    return
                tg.start_soon(run, stream)

    async def aclose(self) -> None:
        """Stop accepting: new opens are refused; queued streams are closed."""
        if self._closed:
            return
        self._closed = True
        self._retire()
        self._node._all_listeners.discard(self)
        if self._temporary:
            node, root_id = self._node, self._uri.token.root_id
            used_up = self._uses is not None and node._store.uses(self._uses[0]) >= self._uses[1]
            expired = any(
                isinstance(c, Expires) and c.at <= node._wall_clock() for c in self._uri.caveats
            )
            why = "used up" if used_up else "expired" if expired else "temporary listener closed"
            node._retired_roots[root_id] = why
            if len(node._retired_roots) > MAX_RETIRED_ROOTS:
                node._retired_roots.popitem(last=False)
            node._store.remove_root(root_id)
        with anyio.CancelScope(shield=True):  # Stream.aclose checkpoints: close them all
            while True:
                try:
                    stream = self._recv.receive_nowait()
                except (anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
                    break
                await stream.aclose()
        self._recv.close()
