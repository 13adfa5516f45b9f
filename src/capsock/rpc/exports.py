"""What one msgpack-RPC connection exported to its peer (see :mod:`capsock.rpc.msgpack`).

An export is a temporary socket minted bound to the peer, on which the
exported object is served with msgpack-RPC.  Exports live as long as the
connection they were sent over; :meth:`Exports.revoke_all` ends them.  A
node-wide registry lets a node recognise its own object when the peer it was
exported to passes it back.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import anyio
import anyio.abc

from ..errors import CapsockError, LocalUsageError
from ..keys import NodeId
from ..net.stream import Stream
from ..node import Listener, Node
from ..uri import Capability
from .remote import RemoteObject
from .service import Service, _Forwarder

__all__ = ["Exports"]

log = logging.getLogger("capsock.rpc")

Exportable = Service | RemoteObject

# Exports of every node, by capability token, with the peer each was exported
# to: how a node recognises its own object when that peer passes it back.
_registry: weakref.WeakKeyDictionary[Node, dict[bytes, tuple[Exportable, NodeId]]] = (
    weakref.WeakKeyDictionary()
)


@dataclass(slots=True)
class _Export:
    obj: Exportable  # kept alive, so that id(obj) stays its key
    listener: Listener


class Exports:
    """The exports of one connection.

    Args:
        node, peer: the local node and the peer the exports are bound to
            (``None`` when the connection is not over a capsock stream).
        serve: runs the msgpack-RPC service on one stream opened on an export.
    """

    def __init__(
        self,
        node: Node | None,
        peer: NodeId | None,
        serve: Callable[[Stream, Service], Awaitable[None]],
    ) -> None:
        self._node = node
        self._peer = peer
        self._serve = serve
        self._by_id: dict[int, _Export] = {}
        self._lock = anyio.Lock()

    def __len__(self) -> int:
        return len(self._by_id)

    def capability(self, obj: Exportable) -> Capability | None:
        """The capability ``obj`` was exported as, if it was."""
        export = self._by_id.get(id(obj))
        return export.listener.uri if export is not None else None

    async def export(self, obj: Exportable, tg: anyio.abc.TaskGroup) -> None:
        """Mint a temporary socket bound to the peer and serve ``obj`` on it (in ``tg``).

        A :class:`RemoteObject` is served through a forwarding proxy.

        Raises:
            LocalUsageError: no node, or not a capsock stream (no peer to bind to).
        """
        node, peer = self._node, self._peer
        if node is None or peer is None:
            raise LocalUsageError(
                "passing a service needs a Connection over a capsock stream with node=..."
            )
        async with self._lock:
            if id(obj) in self._by_id:
                return
            listener = await node.mint(peer=peer, label="rpc")
            service = obj if isinstance(obj, Service) else _Forwarder(obj)
            self._by_id[id(obj)] = _Export(obj, listener)
            _registry.setdefault(node, {})[listener.uri.token.encode()] = (obj, peer)
            tg.start_soon(listener.serve, lambda stream: self._serve(stream, service))
            log.debug("exported %s to %s", type(obj).__name__, peer.short())

    def resolve(self, cap: Capability) -> Exportable | None:
        """Our own object, if ``cap`` is an export of this node to this peer."""
        node = self._node
        if node is None or cap.node != node.id:
            return None
        own = _registry.get(node, {}).get(cap.token.encode())
        # Only from the peer it was bound to: a third node that learned the
        # token cannot open it, and must not be able to name it to us either.
        if own is None or own[1] != self._peer:
            return None
        return own[0]

    async def revoke_all(self) -> None:
        """Revoke every export (new opens refused, open streams reset) and close its socket."""
        exports, self._by_id = self._by_id, {}
        node = self._node
        for export in exports.values():
            cap = export.listener.uri
            if node is not None:
                _registry.get(node, {}).pop(cap.token.encode(), None)
                try:
                    await node.revoke(cap)
                except (CapsockError, OSError) as exc:  # the node is already closed, ...
                    log.debug("could not revoke export %s: %s", cap.redacted(), str(exc))
            await export.listener.aclose()
        if node is not None and not _registry.get(node, True):
            _registry.pop(node, None)
