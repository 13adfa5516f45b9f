"""Remote objects: services other nodes exported to this one (see :mod:`capsock.rpc.msgpack`).

Public names are re-exported by :mod:`capsock.rpc.msgpack`; import them from there.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import anyio

from ..uri import Capability
from . import ConnectionClosed

if TYPE_CHECKING:
    from .connection import Connection

__all__ = ["RemoteObject"]


class RemoteObject:
    """A service another node exported to this one; call it like a connection.

    Made by the connection that received its capability, never directly.  The
    first call opens a capsock stream to it (with this connection's node) and
    a msgpack-RPC connection over that; it lives until :meth:`aclose` or until
    the connection it arrived over closes.  Put it into params or results to
    pass it on (see the module documentation).
    """

    def __init__(self, capability: Capability, owner: Connection) -> None:
        self._cap = capability
        self._owner = owner
        self._conn: Connection | None = None
        self._lock = anyio.Lock()
        self._closed = False

    @property
    def capability(self) -> Capability:
        """The capability it was sent as: bound to this node (a secret; ``repr`` redacts it).

        It names the node that sent it (anything else was refused on
        arrival).  Its route hints are as the peer wrote them; :meth:`call`
        does not use them: it goes over the session with that node.
        """
        return self._cap

    def __repr__(self) -> str:
        return f"<capsock.rpc.RemoteObject {self._cap.redacted()}>"

    async def _connection(self) -> Connection:
        conn = self._conn
        if conn is not None and not conn.closed:
            return conn
        async with self._lock:
            conn = self._conn
            if conn is not None and not conn.closed:
                return conn
            if self._closed:
                raise ConnectionClosed("this remote object was closed")
            conn = self._conn = await self._owner._open_child(self)
            return conn

    async def call(
        self,
        method: str,
        *params: Any,
        timeout: float | None = None,  # noqa: ASYNC109 -- as Connection.call
    ) -> Any:
        """Call ``method`` on the remote object; as :meth:`Connection.call`.

        Raises:
            CapabilityRejected: the capability was revoked (its exporter's
                connection closed) or is otherwise refused.
            Unreachable / PeerAuthenticationError: the exporting node cannot be reached.
            RemoteError, TimeoutError, ConnectionClosed, ...: as :meth:`Connection.call`.
        """
        conn = await self._connection()
        return await conn.call(method, *params, timeout=timeout)

    async def notify(self, method: str, *params: Any) -> None:
        """Send a notification to the remote object; as :meth:`Connection.notify`."""
        conn = await self._connection()
        await conn.notify(method, *params)

    async def aclose(self) -> None:
        """Close the connection to the remote object, if one was opened.  Idempotent."""
        self._closed = True
        self._owner._remotes.discard(self)
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.aclose()
