"""RPC on top of capsock streams.

Two layers, each in its own module (import the one you use):

* :mod:`capsock.rpc.msgpack` -- the msgpack-RPC specification over a capsock
  stream, on asyncio and trio, with capability passing: a
  :class:`capsock.Capability` in params or results travels as itself, and a
  local :class:`~capsock.rpc.msgpack.Service` travels as a fresh capability
  bound to the receiving peer, revoked when the connection closes.
* :mod:`capsock.rpc.capnp` -- Cap'n Proto RPC (pycapnp, asyncio only) served
  on a capsock listener and reached through a capability URI.  Needs the
  ``capnp`` extra.

This package itself only holds the errors both layers share; importing it
imports neither msgpack-RPC nor pycapnp.  See ``docs/rpc.md``.

Errors::

    CapsockError
    └── RpcError                     anything the RPC layer raises on purpose
        ├── RemoteError              the remote method failed (.type_name, .remote_message)
        ├── ConnectionClosed         the RPC connection ended before the answer
        └── RpcProtocolError         the peer broke msgpack-RPC (also a capsock.ProtocolError)
            └── MalformedMessage     one well-framed but invalid message (.msgid, .kind)
"""

from __future__ import annotations

from typing import Any

from ..errors import CapsockError, ProtocolError

__all__ = [
    "ConnectionClosed",
    "MalformedMessage",
    "RemoteError",
    "RpcError",
    "RpcProtocolError",
]

_MAX_TEXT = 1024
"""Longest error text kept from a peer (longer ones are cut)."""


def _cut(text: str, limit: int = _MAX_TEXT) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


class RpcError(CapsockError):
    """Base of every error the RPC layers raise on purpose."""


class RemoteError(RpcError):
    """The remote side answered a call with an error.

    Attributes:
        type_name: the name the remote side gave the error: the class name of
            the exception its method raised (``"KeyError"``), or one of the
            protocol's own names (``"NoSuchMethod"``, ``"InvalidParams"``,
            ``"InvalidRequest"``, ``"Busy"``).  Never a traceback.
        remote_message: the remote side's text for the error (at most 1024
            characters; may be empty).
        data: the raw ``error`` element of the response, for peers that send
            something other than capsock's ``[type_name, message]`` pair.

    Raising a ``RemoteError`` inside a method sends exactly that type name and
    message on, which is how proxies stay transparent.
    """

    def __init__(self, type_name: str, remote_message: str = "", data: Any = None) -> None:
        self.type_name = _cut(type_name, 128)
        self.remote_message = _cut(remote_message)
        self.data = data if data is not None else [self.type_name, self.remote_message]
        text = f"remote {self.type_name}"
        if self.remote_message:
            text += f": {self.remote_message}"
        super().__init__(text)


class ConnectionClosed(RpcError):
    """The RPC connection ended (or was closed here) before the call was answered.

    ``__cause__`` holds the underlying stream or protocol error, if any.  The
    remote side may or may not have run the call.
    """


class RpcProtocolError(RpcError, ProtocolError):
    """The peer broke the RPC protocol.

    For bytes that are not msgpack at all (or a message over the size limit)
    the connection is closed.  Narrower problems are :class:`MalformedMessage`.
    """


class MalformedMessage(RpcProtocolError):
    """One well-framed msgpack value that is not a valid msgpack-RPC message.

    The connection survives it (the specification's message boundaries are
    intact): a request whose ``msgid`` is readable is answered with an
    ``InvalidRequest`` error, a response for a pending call fails that call
    with this error, anything else is logged and dropped.

    Attributes:
        msgid: the message id, if it could be read, else ``None``.
        kind: the message type (0 request, 1 response, 2 notification), if
            it could be read, else ``None``.
    """

    def __init__(self, message: str, *, msgid: int | None = None, kind: int | None = None) -> None:
        super().__init__(message)
        self.msgid = msgid
        self.kind = kind
