"""Mux frames: the sans-IO encoding that rides inside Noise transport messages.

Theory of operation
-------------------
Every decrypted transport message carries one or more *whole* frames; a frame
never spans two messages, so a message is decoded on its own.  A frame is a
7-byte header followed by its payload::

    type: u8 | stream_id: u32 (big-endian) | length: u16 (big-endian) | payload

Stream frames (OPEN, ACCEPT, REJECT, DATA, WINDOW, EOF, RESET) name a non-zero
stream id; WINDOW may also name stream 0, the whole session.  Session frames
(PING, PONG, GOAWAY, CONTROL) use stream id 0.  Payload sizes are exact for
fixed-size frames; anything else is a :class:`~capsock.errors.ProtocolError`,
the only exception :func:`decode_frames` raises.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

from ..errors import ErrorCode, ProtocolError

__all__ = [
    "HEADER_LEN",
    "MAX_TOKEN_LEN",
    "Accept",
    "Control",
    "Data",
    "Eof",
    "Frame",
    "FrameType",
    "GoAway",
    "Open",
    "Ping",
    "Pong",
    "Reject",
    "Reset",
    "Window",
    "decode_frames",
    "encode_frame",
]

HEADER = struct.Struct(">BIH")
HEADER_LEN = HEADER.size
MAX_TOKEN_LEN = 4096
MAX_WINDOW_INCREMENT = 2**31 - 1
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_GOAWAY = struct.Struct(">IH")


class FrameType(IntEnum):
    """The frame types of capsock/1."""

    OPEN = 1
    ACCEPT = 2
    REJECT = 3
    DATA = 4
    WINDOW = 5
    EOF = 6
    RESET = 7
    PING = 8
    PONG = 9
    GOAWAY = 10
    CONTROL = 11


@dataclass(frozen=True, slots=True)
class Open:
    """Ask the peer to open stream ``stream_id`` with a capability token."""

    stream_id: int
    token: bytes


@dataclass(frozen=True, slots=True)
class Accept:
    """The endpoint accepted the stream."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class Reject:
    """The endpoint refused the stream; ``code`` is uniform for capability failures."""

    stream_id: int
    code: int


@dataclass(frozen=True, slots=True)
class Data:
    """Stream bytes; never empty, counted against both credit windows.

    Decoded frames carry a zero-copy ``memoryview`` of the decrypted message.
    """

    stream_id: int
    data: bytes | memoryview


@dataclass(frozen=True, slots=True)
class Window:
    """Grant ``increment`` more bytes of credit (stream 0: the session window)."""

    stream_id: int
    increment: int


@dataclass(frozen=True, slots=True)
class Eof:
    """The sender will send no more data on this stream (half-close)."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class Reset:
    """Abort the stream in both directions."""

    stream_id: int
    code: int


@dataclass(frozen=True, slots=True)
class Ping:
    """Keepalive probe; answered by a PONG with the same 8 bytes."""

    opaque: bytes


@dataclass(frozen=True, slots=True)
class Pong:
    """Answer to a PING."""

    opaque: bytes


@dataclass(frozen=True, slots=True)
class GoAway:
    """The sender opens and accepts no stream above ``last_stream_id`` any more."""

    last_stream_id: int
    code: int


@dataclass(frozen=True, slots=True)
class Control:
    """A msgpack-encoded control message (forwarding, introductions)."""

    body: bytes


Frame = Open | Accept | Reject | Data | Window | Eof | Reset | Ping | Pong | GoAway | Control


def _header(kind: FrameType, stream_id: int, length: int) -> bytes:
    return HEADER.pack(kind, stream_id, length)


def encode_frame(frame: Frame) -> bytes:
    """Encode one frame (header and payload).

    Raises:
        ValueError: a field is out of range (a local bug, never remote input).
    """
    match frame:
        case Data(sid, data):
            return _header(FrameType.DATA, sid, len(data)) + data
        case Window(sid, inc):
            return _header(FrameType.WINDOW, sid, 4) + _U32.pack(inc)
        case Open(sid, token):
            return _header(FrameType.OPEN, sid, len(token)) + token
        case Accept(sid):
            return _header(FrameType.ACCEPT, sid, 0)
        case Reject(sid, code):
            return _header(FrameType.REJECT, sid, 2) + _U16.pack(code)
        case Eof(sid):
            return _header(FrameType.EOF, sid, 0)
        case Reset(sid, code):
            return _header(FrameType.RESET, sid, 2) + _U16.pack(code)
        case Ping(opaque):
            return _header(FrameType.PING, 0, 8) + opaque
        case Pong(opaque):
            return _header(FrameType.PONG, 0, 8) + opaque
        case GoAway(last, code):
            return _header(FrameType.GOAWAY, 0, 6) + _GOAWAY.pack(last, code)
        case Control(body):
            return _header(FrameType.CONTROL, 0, len(body)) + body
    raise ValueError(f"not a frame: {type(frame).__name__}")  # pragma: no cover


def data_header(stream_id: int, length: int) -> bytes:
    """The header of a DATA frame (hot path: lets callers avoid one copy)."""
    return HEADER.pack(FrameType.DATA, stream_id, length)


_FIXED_LEN = {
    FrameType.ACCEPT: 0,
    FrameType.REJECT: 2,
    FrameType.WINDOW: 4,
    FrameType.EOF: 0,
    FrameType.RESET: 2,
    FrameType.PING: 8,
    FrameType.PONG: 8,
    FrameType.GOAWAY: 6,
}
_KINDS = {int(kind): kind for kind in FrameType}
_SESSION_FRAMES = frozenset({FrameType.PING, FrameType.PONG, FrameType.GOAWAY, FrameType.CONTROL})


def decode_frames(message: bytes | bytearray | memoryview) -> list[Frame]:
    """Decode every frame in one decrypted transport message.

    Raises:
        ProtocolError: unknown type, truncated frame, wrong payload size, a
            stream frame on stream 0 (or a session frame on another), an empty
            DATA frame or message, a zero or oversized window increment.
    """
    frames: list[Frame] = []
    view = memoryview(message)
    end = len(view)
    if end == 0:
        raise ProtocolError("empty transport message (no frames)")
    pos = 0
    unpack = HEADER.unpack_from
    while pos < end:
        if end - pos < HEADER_LEN:
            raise ProtocolError("truncated frame header")
        kind_raw, sid, length = unpack(view, pos)
        pos += HEADER_LEN
        if length > end - pos:
            raise ProtocolError("frame length runs past the end of the message")
        payload = view[pos : pos + length]
        pos += length
        if kind_raw == FrameType.DATA:  # the hot path first
            if sid == 0:
                raise ProtocolError("DATA frame on stream 0")
            if length == 0:
                raise ProtocolError("empty DATA frame")
            frames.append(Data(sid, payload))
            continue
        kind = _KINDS.get(kind_raw)  # a dict lookup: FrameType(x) costs two calls
        if kind is None:
            raise ProtocolError(f"unknown frame type {kind_raw}")
        fixed = _FIXED_LEN.get(kind)
        if fixed is not None and length != fixed:
            raise ProtocolError(f"{kind.name} frame must carry {fixed} bytes, not {length}")
        if kind in _SESSION_FRAMES:
            if sid != 0:
                raise ProtocolError(f"{kind.name} frame must use stream 0")
        elif sid == 0 and kind != FrameType.WINDOW:
            raise ProtocolError(f"{kind.name} frame on stream 0")
        frames.append(_decode_other(kind, sid, payload))
    return frames


def _decode_other(kind: FrameType, sid: int, payload: memoryview) -> Frame:
    match kind:
        case FrameType.WINDOW:
            (inc,) = _U32.unpack(payload)
            if inc == 0 or inc > MAX_WINDOW_INCREMENT:
                raise ProtocolError(f"WINDOW increment {inc} out of range")
            return Window(sid, inc)
        case FrameType.OPEN:
            if not 0 < len(payload) <= MAX_TOKEN_LEN:
                raise ProtocolError(f"OPEN token length {len(payload)} out of range")
            return Open(sid, payload.tobytes())
        case FrameType.ACCEPT:
            return Accept(sid)
        case FrameType.REJECT:
            return Reject(sid, _U16.unpack(payload)[0])
        case FrameType.EOF:
            return Eof(sid)
        case FrameType.RESET:
            return Reset(sid, _U16.unpack(payload)[0])
        case FrameType.PING:
            return Ping(payload.tobytes())
        case FrameType.PONG:
            return Pong(payload.tobytes())
        case FrameType.GOAWAY:
            last, code = _GOAWAY.unpack(payload)
            return GoAway(last, code)
        case FrameType.CONTROL:
            if len(payload) == 0:
                raise ProtocolError("empty CONTROL frame")
            return Control(payload.tobytes())
    raise ProtocolError(f"unexpected frame type {kind.name}")  # pragma: no cover


def reject_code(code: int) -> ErrorCode:
    """The enum for a received REJECT/RESET code (unknown -> INTERNAL_ERROR)."""
    return ErrorCode.from_wire(code)
