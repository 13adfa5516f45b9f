"""msgpack-RPC messages, sans-IO: bytes in, messages out; messages in, bytes out.

The specification's three message shapes, as msgpack arrays::

    request       [0, msgid, method, params]     msgid: uint32, method: str, params: array
    response      [1, msgid, error, result]      error: nil on success
    notification  [2, method, params]

Messages follow each other on the stream with no other framing: msgpack is
self-delimiting.  :class:`Decoder` feeds received bytes into msgpack's
streaming unpacker with a bounded buffer and yields one event per complete
message: :class:`Request`, :class:`Response`, :class:`Notification`, or
:class:`Malformed` (a well-framed value that is not a valid message; the stream
stays in sync, so the connection can go on).  Bytes that are not msgpack, or a
message over the size limit, raise :class:`~capsock.rpc.RpcProtocolError`:
after that the stream cannot be trusted and the connection must close.

Capabilities travel as msgpack extension types whose body is the UTF-8
``capsock://`` URI:

* :data:`CAPABILITY_EXT` (67, ``"C"``): a plain :class:`capsock.Capability`;
  decodes to one.
* :data:`SERVICE_EXT` (83, ``"S"``): the capability of an exported
  msgpack-RPC service; the decoder hands it to a callback (the connection
  turns it into a remote object).

This module does no I/O and never imports anyio.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import msgpack

from ..errors import InvalidCapability
from ..uri import Capability
from . import MalformedMessage, RpcProtocolError

__all__ = [
    "CAPABILITY_EXT",
    "MAX_MSGID",
    "SERVICE_EXT",
    "Decoder",
    "Malformed",
    "Message",
    "MessageType",
    "Notification",
    "Request",
    "Response",
    "encode",
    "parse_message",
]

CAPABILITY_EXT = 67
"""msgpack extension type code of a capsock capability (body: the URI text)."""
SERVICE_EXT = 83
"""msgpack extension type code of an exported msgpack-RPC service's capability."""
MAX_MSGID = 2**32 - 1
"""msgids are unsigned 32-bit integers."""
_MAX_URI = 4096  # the URI module's own limit; a longer ext body cannot be a capability


class MessageType(IntEnum):
    """The first element of every msgpack-RPC message."""

    REQUEST = 0
    RESPONSE = 1
    NOTIFICATION = 2


@dataclass(frozen=True, slots=True)
class Request:
    """A call that expects a :class:`Response` with the same ``msgid``."""

    msgid: int
    """Chosen by the caller, unique among its calls in flight (uint32)."""
    method: str
    """The method name."""
    params: list[Any]
    """Positional parameters."""


@dataclass(frozen=True, slots=True)
class Response:
    """The answer to the :class:`Request` with the same ``msgid``."""

    msgid: int
    """The request's msgid."""
    error: Any
    """``None`` on success; otherwise the error (capsock sends ``[type_name, message]``)."""
    result: Any
    """The result (``None`` when ``error`` is set)."""


@dataclass(frozen=True, slots=True)
class Notification:
    """A call with no answer."""

    method: str
    """The method name."""
    params: list[Any]
    """Positional parameters."""


@dataclass(frozen=True, slots=True)
class Malformed:
    """A complete msgpack value that is not a valid message (the stream is still in sync)."""

    error: MalformedMessage
    """What was wrong; ``error.msgid`` / ``error.kind`` when they could be read."""


Message = Request | Response | Notification
Event = Request | Response | Notification | Malformed


def _msgid(value: Any) -> int | None:
    if type(value) is int and 0 <= value <= MAX_MSGID:
        return value
    return None


def parse_message(obj: Any) -> Request | Response | Notification | Malformed:
    """Check one decoded msgpack value against the specification's shapes."""
    if not isinstance(obj, list) or not obj:
        return Malformed(MalformedMessage("a message must be a non-empty array"))
    kind = obj[0]
    n = len(obj)
    if kind == MessageType.REQUEST and type(kind) is int:
        msgid = _msgid(obj[1]) if n > 1 else None
        if n != 4:
            return _bad(f"a request has 4 elements, this one {n}", msgid, 0)
        if msgid is None:
            return _bad("a request's msgid must be an unsigned 32-bit integer", None, 0)
        method, params = obj[2], obj[3]
        if not isinstance(method, str):
            return _bad(f"a request's method must be a string, not {_kind(method)}", msgid, 0)
        if not isinstance(params, list):
            return _bad(f"a request's params must be an array, not {_kind(params)}", msgid, 0)
        return Request(msgid, method, params)
    if kind == MessageType.RESPONSE and type(kind) is int:
        msgid = _msgid(obj[1]) if n > 1 else None
        if n != 4:
            return _bad(f"a response has 4 elements, this one {n}", msgid, 1)
        if msgid is None:
            return _bad("a response's msgid must be an unsigned 32-bit integer", None, 1)
        return Response(msgid, obj[2], obj[3])
    if kind == MessageType.NOTIFICATION and type(kind) is int:
        if n != 3:
            return _bad(f"a notification has 3 elements, this one {n}", None, 2)
        method, params = obj[1], obj[2]
        if not isinstance(method, str):
            return _bad(f"a notification's method must be a string, not {_kind(method)}", None, 2)
        if not isinstance(params, list):
            return _bad(f"a notification's params must be an array, not {_kind(params)}", None, 2)
        return Notification(method, params)
    shown = kind if type(kind) is int else _kind(kind)
    return _bad(f"unknown message type {shown}", None, None)


def _bad(text: str, msgid: int | None, kind: int | None) -> Malformed:
    return Malformed(MalformedMessage(text, msgid=msgid, kind=kind))


def _kind(value: Any) -> str:
    return type(value).__name__


class _BadExt:
    """Stands in for a capability extension whose body is not a capability."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


class Decoder:
    """Turns received bytes into message events, with bounded memory.

    Args:
        max_message_size: the largest message accepted, in bytes.  A message
            that grows past it is a fatal :class:`RpcProtocolError`.
        max_items: the most elements one array or map may have.  Map keys
            must be strings or bytes.
        service_hook: called with the :class:`Capability` of every
            :data:`SERVICE_EXT` value; its return value takes the value's place.
            If it raises :class:`~capsock.InvalidCapability`, the message is
            malformed (its text is the reason).  Without a hook, service
            capabilities decode to plain capabilities.
        read_size: the largest chunk that will be fed at once (sizes the
            unpacker's buffer).
    """

    def __init__(
        self,
        max_message_size: int = 1 << 20,
        max_items: int = 65536,
        service_hook: Callable[[Capability], Any] | None = None,
        read_size: int = 65536,
    ) -> None:
        self._limit = max_message_size
        self._service_hook = service_hook
        self._bad_ext: str | None = None
        self._fed = 0  # bytes fed in total
        self._boundary = 0  # where the last complete message ended
        self._unpacker = msgpack.Unpacker(
            raw=False,
            use_list=True,
            # Map keys must be str or bytes (msgpack's default for untrusted
            # input): int keys would allow hash-collision floods (Python does
            # not randomise int hashes), arrays as keys are unhashable.
            strict_map_key=True,
            ext_hook=self._ext,
            # Room for one whole message plus one received chunk; the real
            # limit is the check in feed().
            max_buffer_size=max_message_size + read_size,
            max_bin_len=max_message_size,
            max_str_len=max_message_size,
            max_array_len=max_items,
            max_map_len=max_items,
            max_ext_len=_MAX_URI,
        )

    def _ext(self, code: int, data: bytes) -> Any:
        # Never raise here: an exception inside the unpacker's callback would
        # leave it in an undefined state.  Remember the problem instead.
        if code not in (CAPABILITY_EXT, SERVICE_EXT):
            return msgpack.ExtType(code, data)
        try:
            cap = Capability.parse(data.decode("utf-8"))
        except (UnicodeDecodeError, InvalidCapability) as exc:
            reason = f"extension type {code} does not hold a capability ({_reason(exc)})"
            self._bad_ext = self._bad_ext or reason
            return _BadExt(reason)
        if code == SERVICE_EXT and self._service_hook is not None:
            try:
                return self._service_hook(cap)
            except InvalidCapability as exc:  # the hook refuses it: the message is malformed
                reason = f"extension type {code}: {exc}"
                self._bad_ext = self._bad_ext or reason
                return _BadExt(reason)
        return cap

    def feed(self, data: bytes) -> list[Event]:
        """Feed received bytes; return the events for every message completed.

        Raises:
            RpcProtocolError: the bytes are not msgpack, or a message is larger
                than ``max_message_size``.  The stream is out of sync: close it.
        """
        unpacker = self._unpacker
        try:
            unpacker.feed(data)
        except msgpack.BufferFull:
            raise RpcProtocolError(
                f"a message is larger than the limit of {self._limit} bytes"
            ) from None
        self._fed += len(data)
        events: list[Event] = []
        try:
            for obj in unpacker:
                self._boundary = unpacker.tell()
                bad, self._bad_ext = self._bad_ext, None
                event = parse_message(obj)
                if bad is not None:
                    msgid = getattr(event, "msgid", None)
                    if isinstance(event, Malformed):
                        msgid = event.error.msgid
                    kind = obj[0] if isinstance(obj, list) and type(obj[0]) is int else None
                    event = _bad(bad, msgid, kind)
                events.append(event)
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            raise RpcProtocolError(
                f"the peer sent bytes that are not msgpack ({_reason(exc)})"
            ) from None
        # The unpacker consumes a message's bytes while it builds the values
        # (tell() moves inside a partial message), so its buffer limit alone
        # does not bound a message: count from the last message boundary.
        if self._fed - self._boundary > self._limit:
            raise RpcProtocolError(f"a message is larger than the limit of {self._limit} bytes")
        return events


def _reason(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


def encode(message: list[Any], default: Callable[[Any], Any] | None = None) -> bytes:
    """Encode one message (an array in the shapes above) to msgpack bytes.

    ``default`` is msgpack's hook for values it cannot encode itself; without
    one, :class:`Capability` values are encoded as :data:`CAPABILITY_EXT`.

    Raises:
        TypeError: a value has no msgpack encoding.
        ValueError / OverflowError: a value is too large or nested too deeply.
    """
    return msgpack.packb(message, use_bin_type=True, default=default or encode_capability)  # type: ignore[no-any-return]


def encode_capability(obj: Any) -> Any:
    """msgpack ``default`` hook: a :class:`Capability` as :data:`CAPABILITY_EXT`.

    Raises:
        TypeError: ``obj`` is not a capability.
    """
    if isinstance(obj, Capability):
        return msgpack.ExtType(CAPABILITY_EXT, str(obj).encode("utf-8"))
    raise TypeError(f"cannot encode a {type(obj).__name__} in msgpack-RPC")
