"""``capsock-send/1`` on the wire: errors, framing, the checked OFFER (docs/cli.md).

Shared by the sending side (:mod:`capsock.transfer`) and the receiving side
(:mod:`capsock.transfer._receive`).  Every field a peer sends is checked
(type, range, finite) before anything uses it.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.abc
import msgpack

from ..errors import (
    CapsockError,
    NotAnOffer,
    TransferDeclined,
    TransferError,
    TransferIntegrityError,
    UnsafeTarget,
)
from ..keys import NodeId
from ..messages import printable

__all__ = [
    "MAX_ENTRIES",
    "MAX_MTIME",
    "MAX_SIZE",
    "PROTOCOL",
    "NotAnOffer",
    "Offer",
    "ProgressCallback",
    "Report",
    "TransferDeclined",
    "TransferError",
    "TransferIntegrityError",
    "TransferProgress",
    "UnsafeTarget",
    "check_name",
    "encode",
    "parse_offer",
    "read_message",
]

PROTOCOL = "capsock-send/1"
PART_SUFFIX = ".capsock-part"
MAX_MESSAGE = 64 * 1024
MAX_SIZE = 1 << 62
"""The largest ``size`` a receiver accepts (4 EiB: any file a file system can hold)."""
MAX_MTIME = 1 << 34
"""The latest ``mtime`` accepted (seconds; 1 << 34 is in the year 2514)."""
MAX_ENTRIES = 1 << 32
MAX_PATH = 4096
MODE_MAX = 0o7777
CHUNK = 1 << 20
GOODBYE_TIMEOUT = 5.0
STREAM_ERRORS = (anyio.BrokenResourceError, anyio.ClosedResourceError, CapsockError)
_LEN = struct.Struct(">I")

Report = Callable[[str], None]
"""Where the transfer functions report what happens (a line each, never a token)."""


# ------------------------------------------------------------------ errors


# ------------------------------------------------------------------ progress


@dataclass(frozen=True, slots=True)
class TransferProgress:
    """Where one transfer stands, given to a progress callback after each chunk."""

    name: str
    """The offered file or directory name."""
    peer: NodeId
    """The other side's node id."""
    done: int
    """Bytes of the item the receiver has now (resumed bytes included)."""
    total: int
    """The item's size in bytes."""
    start: int
    """Where this transfer started (the resume offset, else 0)."""


ProgressCallback = Callable[[TransferProgress], None]


# ------------------------------------------------------------------ framing


def encode(obj: dict[str, Any]) -> bytes:
    """One control message: length prefix and msgpack body."""
    body: bytes = msgpack.packb(obj, use_bin_type=True)
    return _LEN.pack(len(body)) + body


async def _read_exactly(stream: anyio.abc.ByteReceiveStream, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        out += await stream.receive(n - len(out))
    return bytes(out)


async def read_message(stream: anyio.abc.ByteReceiveStream) -> tuple[dict[str, Any], bytes]:
    """The next control message, decoded, and its raw bytes (prefix included).

    Raises:
        NotAnOffer: too large or not a msgpack map.
        anyio.EndOfStream: the stream ended.
    """
    prefix = await _read_exactly(stream, 4)
    (size,) = _LEN.unpack(prefix)
    if size > MAX_MESSAGE:
        raise NotAnOffer(
            f"the other side sent a {size}-byte message: it does not speak {PROTOCOL}, "
            "so this is not a `capsock send` capability (one of `capsock listen` takes "
            "`capsock connect URI`)"
        )
    body = await _read_exactly(stream, size)
    try:
        obj = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except (ValueError, msgpack.UnpackException):
        obj = None
    if not isinstance(obj, dict):
        raise NotAnOffer(f"the other side sent a malformed message (not {PROTOCOL})")
    return obj, prefix + body


def looks_like_offer(data: bytes) -> bool | None:
    """Whether ``data`` (the first bytes a stream delivered) is a ``capsock-send/1``
    OFFER: True, False, or None while too few bytes arrived to tell."""
    if len(data) < 5:
        return None if len(data) < 4 or data[:2] == b"\0\0" else False
    (size,) = _LEN.unpack(data[:4])
    if size > MAX_MESSAGE or not (0x80 <= data[4] <= 0x8F or data[4] in (0xDE, 0xDF)):
        return False
    if len(data) < 4 + size:
        return None
    try:
        obj = msgpack.unpackb(data[4 : 4 + size], raw=False, strict_map_key=True)
    except (ValueError, msgpack.UnpackException):
        return False
    return isinstance(obj, dict) and obj.get("proto") == PROTOCOL


def field(msg: dict[str, Any], key: str, kind: type, what: str) -> Any:
    value = msg.get(key)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise TransferError(f"the other side sent a malformed {what} (field {key!r})")
    return value


# ------------------------------------------------------------------ the offer


def check_name(name: object, what: str) -> str:
    """One path component a receiver may create.

    Raises:
        TransferDeclined: empty, ``.``/``..``, a ``/``, control characters, > 255 bytes.
    """
    if (
        not isinstance(name, str)
        or name in ("", ".", "..")
        or "/" in name
        or not name.isprintable()  # control characters (NUL too): terminal escapes in messages
        or len(name.encode("utf-8", "surrogateescape")) > 255
    ):
        raise TransferDeclined(
            f"the sender offered an unsafe {what} {printable(repr(name))}; refusing it",
            f"unsafe {what} (one path component: not empty, . or .., no / or control "
            "characters, at most 255 bytes)",
        )
    return name


def safe_relative(path: object) -> str:
    if not isinstance(path, str) or not 0 < len(path) <= MAX_PATH:
        raise TransferDeclined("the sender sent an unsafe path; refusing it", "unsafe path")
    for part in path.split("/"):
        check_name(part, "path")
    return path


def int_field(msg: dict[str, Any], key: str, high: int, what: str) -> int:
    value = msg.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= high:
        rule = f"{key!r} must be an integer from 0 to {high}"
        raise TransferDeclined(
            f"the sender sent a malformed {what}: {rule} (got {printable(repr(value))}); "
            "refusing it",
            f"malformed {what}: {rule}",
        )
    return value


def time_field(msg: dict[str, Any], key: str, what: str) -> float:
    value = msg.get(key)
    if (
        not isinstance(value, int | float)
        or isinstance(value, bool)
        or not math.isfinite(value)
        or not 0 <= value <= MAX_MTIME
    ):
        rule = f"{key!r} must be a number of seconds from 0 to {MAX_MTIME}"
        raise TransferDeclined(
            f"the sender sent a malformed {what}: {rule} (got {printable(repr(value))}); "
            "refusing it",
            f"malformed {what}: {rule}",
        )
    return float(value)


@dataclass(frozen=True, slots=True)
class Offer:
    """A checked OFFER: every field typed and in range."""

    kind: str
    """``"file"`` or ``"dir"``."""
    name: str
    """The item's name: one safe path component."""
    size: int
    """A file's length, or the total of a directory's files, in bytes."""
    mode: int
    """Permission bits (the receiver keeps them minus its umask, never setuid/setgid/sticky)."""
    mtime: float
    """Modification time, seconds since 1970."""
    entries: int = 0
    """How many entries a directory has (0 for a file)."""
    retry_ok: bool = False
    """The sender does not count a decline marked ``retry`` as a use."""
    resumable: bool = False
    """The sender counts a use only once a receiver verified the whole item, so a
    failed transfer can be resumed with the same capability."""


def parse_offer(msg: dict[str, Any]) -> Offer:
    """Check every field of an OFFER (docs/cli.md) before anything is accepted.

    Raises:
        TransferDeclined: a field is missing, of the wrong type, or out of range
            (with ``remote``: the reason to send the sender, no local path in it).
    """
    kind = msg.get("kind")
    if kind not in ("file", "dir"):
        shown = printable(repr(kind))
        raise TransferDeclined(
            f"the sender offered an unknown kind {shown}; upgrade capsock",
            f"unknown kind {shown}; upgrade capsock",
        )
    what = "file name" if kind == "file" else "directory name"
    name = check_name(msg.get("name"), what)
    size = int_field(msg, "size", MAX_SIZE, "offer")
    mode = int_field(msg, "mode", MODE_MAX, "offer")
    mtime = time_field(msg, "mtime", "offer")
    entries = int_field(msg, "entries", MAX_ENTRIES, "offer") if kind == "dir" else 0
    retry_ok = msg.get("retry_ok") is True
    resumable = msg.get("resumable") is True
    return Offer(str(kind), name, size, mode, mtime, entries, retry_ok, resumable)


async def goodbye(stream: anyio.abc.ByteStream) -> None:
    """Send EOF and wait (briefly) for the other side's: it has read our last message."""
    await stream.send_eof()
    with anyio.move_on_after(GOODBYE_TIMEOUT):
        try:
            while True:
                await stream.receive()
        except (anyio.EndOfStream, *STREAM_ERRORS):
            pass
