"""Small framed messages over any byte stream: capabilities and control requests.

A message is a 4-byte big-endian length followed by that many bytes of
msgpack.  :func:`send_capability` / :func:`receive_capability` give protocols a
ready way to hand a capability to the other end of an existing stream, so they
do not have to invent one.  Sizes are bounded on receipt.
"""

from __future__ import annotations

import struct
from typing import Any

import anyio
import anyio.abc
import msgpack

from .errors import InvalidCapability, ProtocolError
from .uri import Capability

__all__ = [
    "MAX_MESSAGE",
    "printable",
    "receive_capability",
    "receive_message",
    "send_capability",
    "send_message",
]

MAX_MESSAGE = 64 * 1024
"""Default largest message accepted by :func:`receive_message`."""


def printable(text: object, limit: int = 200) -> str:
    """A remote peer's text made safe to show on a terminal or in a log line:
    control characters (escape sequences, newlines) replaced, length bounded."""
    if not isinstance(text, str):
        return "no reason given"
    shown = "".join(ch if ch.isprintable() else "?" for ch in text[:limit])
    return shown + ("..." if len(text) > limit else "")


_LEN = struct.Struct(">I")


async def send_message(stream: anyio.abc.ByteSendStream, obj: Any) -> None:
    """Send one msgpack-encoded message with its length prefix."""
    body = msgpack.packb(obj, use_bin_type=True)
    await stream.send(_LEN.pack(len(body)) + body)


async def _read_exactly(stream: anyio.abc.ByteReceiveStream, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        out += await stream.receive(n - len(out))
    return bytes(out)


async def receive_message(stream: anyio.abc.ByteReceiveStream, max_size: int = MAX_MESSAGE) -> Any:
    """Receive one message sent by :func:`send_message`.

    Raises:
        ProtocolError: the message is larger than ``max_size`` or not valid msgpack.
        anyio.EndOfStream: the stream ended before a whole message arrived
            (cleanly at a message boundary, or in the middle of one).
    """
    (size,) = _LEN.unpack(await _read_exactly(stream, 4))
    if size > max_size:
        raise ProtocolError(f"message of {size} bytes exceeds the limit of {max_size}")
    body = await _read_exactly(stream, size)
    try:
        return msgpack.unpackb(body, raw=False, strict_map_key=True)
    except (ValueError, msgpack.UnpackException) as exc:
        raise ProtocolError(f"malformed message ({type(exc).__name__})") from None


async def send_capability(stream: anyio.abc.ByteSendStream, cap: Capability) -> None:
    """Hand ``cap`` to the other end of ``stream`` (end-to-end encrypted if capsock)."""
    await send_message(stream, {"capability": str(cap)})


async def receive_capability(stream: anyio.abc.ByteReceiveStream) -> Capability:
    """Receive a capability sent with :func:`send_capability`.

    Raises:
        InvalidCapability: the message is not a well-formed capability.
        ProtocolError / anyio.EndOfStream: as :func:`receive_message`.
    """
    message = await receive_message(stream)
    if not isinstance(message, dict) or not isinstance(message.get("capability"), str):
        raise InvalidCapability("the message does not carry a capability")
    return Capability.parse(message["capability"])
