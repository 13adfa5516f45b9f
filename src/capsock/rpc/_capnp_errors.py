"""What a Cap'n Proto side tells its peer when something fails: type and message only.

pycapnp turns an exception raised by a server method into a Cap'n Proto
exception whose ``reason`` is the whole Python traceback (file paths, source
lines), and a KJ exception re-raised by a method carries the native stack
addresses of this process.  The RPC system sends that ``reason`` to the
caller.  :class:`ErrorFilter` sits on the bytes pycapnp writes: it splits them
into Cap'n Proto messages (the standard segment-table framing) and, in every
message that carries an exception (``Abort``, ``Return.exception``,
``Resolve.exception``), replaces ``reason`` with :func:`public_reason` and
empties ``trace``.  Every other message passes through untouched, byte for
byte, after a look at its first words; only messages with an exception are
decoded and re-encoded (with pycapnp and the ``rpc.capnp`` schema it ships).

This module imports pycapnp lazily (only to rewrite) and never imports anyio.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import struct
from typing import Any

__all__ = ["ErrorFilter", "public_reason"]

log = logging.getLogger("capsock.rpc.capnp")

MAX_REASON = 1024
"""Longest reason sent (characters), as msgpack-RPC's error text."""

# rpc.capnp layout (checked against the schema by tests/test_rpc_security.py):
# the Message union's tag is the first u16 of its data section, and its
# variants all live in pointer 0; Return's tag is u16 number 3 and Resolve's
# u16 number 2 of their data sections; ``exception`` is variant 1 of both.
MESSAGE_ABORT = 1
MESSAGE_RETURN = 3
MESSAGE_RESOLVE = 5
RETURN_TAG_OFFSET = 3
RESOLVE_TAG_OFFSET = 2
EXCEPTION_VARIANT = 1

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")

_TRACEBACK = "Traceback (most recent call last):"
_FRAME = '  File "'
# KJ's text for an exception: "<file>:<line>: <kind>: <description>", then
# "stack: <addresses>" (and "remote trace: ..." for remote ones).
_KJ_LOCATION = re.compile(
    r"(?m)(^|: )\S*?:\d+: (?=(?:failed|overloaded|disconnected|unimplemented): )"
)
_KJ_TRACE = re.compile(r"(?m)^\s*(?:stack|remote trace):.*(?:\n|$)")


def public_reason(text: str) -> str:
    """The part of an exception text that may go to the peer: ``Type: message``.

    A Python traceback is reduced to its last line(s) -- the type (without
    its module) and message of the exception that ended it; KJ's source
    locations and stack addresses are removed; the result is cut at
    :data:`MAX_REASON` characters.  Texts without a traceback keep their words.
    """
    start = text.find(_TRACEBACK)
    if start >= 0:
        lines = text[start:].splitlines()
        frames = [i for i, line in enumerate(lines) if line.startswith(_FRAME)]
        k = frames[-1] + 1 if frames else 1
        while k < len(lines) and (not lines[k] or lines[k][0].isspace()):
            k += 1  # the frame's source line and markers
        tail = lines[k:]
        head = tail[0] if tail else ""
        name, sep, message = head.partition(": ")
        if not sep:
            name, message = head, ""
        name = name.rsplit(".", 1)[-1].strip()
        if not name or any(c.isspace() for c in name):
            name = "Exception"
        message = "\n".join([message, *tail[1:]]).strip() if tail else ""
        text = f"{name}: {message}" if message else name
    text = _KJ_TRACE.sub("", _KJ_LOCATION.sub(r"\1", text)).strip()
    return text if len(text) <= MAX_REASON else text[: MAX_REASON - 3] + "..."


@functools.cache
def _rpc_schema() -> Any:
    import capnp

    root = os.path.dirname(capnp.__file__)
    return capnp.load(os.path.join(root, "rpc.capnp"), imports=[os.path.dirname(root)])


def _message_size(buf: bytes | bytearray | memoryview, pos: int) -> int | None:
    """Bytes of the message framed at ``pos``, or ``None`` if its header is not all there."""
    end = len(buf)
    if end - pos < 4:
        return None
    segments = int(_U32.unpack_from(buf, pos)[0]) + 1
    header = (4 + 4 * segments + 7) & ~7
    if end - pos < header:
        return None
    words: int = sum(_U32.unpack_from(buf, pos + 4 + 4 * i)[0] for i in range(segments))
    return header + 8 * words


def _struct_at(seg: memoryview, word: int) -> tuple[int, int, int] | None:
    """(first data word, data words, pointers) of the struct the pointer at
    ``word`` points to; ``None`` if it is not a near struct pointer inside ``seg``."""
    if 8 * word + 8 > len(seg):
        return None
    ptr = _U64.unpack_from(seg, 8 * word)[0]
    if ptr & 3:
        return None  # a far (or other) pointer: decode the whole message
    offset = (ptr & 0xFFFFFFFF) >> 2
    if offset >= 1 << 29:
        offset -= 1 << 30
    start = word + 1 + offset
    data, pointers = (ptr >> 32) & 0xFFFF, ptr >> 48
    if start < 0 or 8 * (start + data + pointers) > len(seg):
        return None
    return start, data, pointers


def _tag(seg: memoryview, struct: tuple[int, int, int], index: int) -> int:
    start, data, _ = struct
    if 2 * index + 2 > 8 * data:
        return 0
    return int(_U16.unpack_from(seg, 8 * start + 2 * index)[0])


def _carries_exception(msg: memoryview) -> bool | None:
    """Whether the message carries an exception; ``None``: cannot tell from a quick look."""
    segments = _U32.unpack_from(msg, 0)[0] + 1
    header = (4 + 4 * segments + 7) & ~7
    first = 8 * _U32.unpack_from(msg, 4)[0]
    seg = msg[header : header + first]
    if len(seg) < 8 or _U64.unpack_from(seg, 0)[0] == 0:
        return False  # an empty message
    root = _struct_at(seg, 0)
    if root is None:
        return None
    kind = _tag(seg, root, 0)
    if kind == MESSAGE_ABORT:
        return True
    if kind not in (MESSAGE_RETURN, MESSAGE_RESOLVE):
        return False
    start, data, pointers = root
    if pointers < 1:
        return False
    if _U64.unpack_from(seg, 8 * (start + data))[0] == 0:
        return False
    inner = _struct_at(seg, start + data)
    if inner is None:
        return None
    offset = RETURN_TAG_OFFSET if kind == MESSAGE_RETURN else RESOLVE_TAG_OFFSET
    return _tag(seg, inner, offset) == EXCEPTION_VARIANT


def _rewrite(msg: bytes) -> tuple[bytes, str] | None:
    """The message with its exception made public, and the original reason;
    ``None`` if it carries no exception."""
    rpc = _rpc_schema()
    with rpc.Message.from_bytes(msg, traversal_limit_in_words=1 << 62) as reader:
        builder = reader.as_builder()
    which = builder.which()
    if which == "abort":
        exc = builder.abort
    elif which in ("return", "resolve"):
        body = getattr(builder, which)
        if body.which() != "exception":
            return None
        exc = body.exception
    else:
        return None
    original = str(exc.reason)
    exc.reason = public_reason(original)
    if exc.trace:
        exc.trace = ""
    return bytes(builder.to_bytes()), original


class ErrorFilter:
    """Passes the bytes one side's pycapnp writes, with every exception made public.

    Feed it what pycapnp writes, in any pieces; it returns what may be sent:
    whole messages only (a partial one is held until it is complete).

    Args:
        peer: how to name the peer in the debug log line of each rewritten error.
    """

    __slots__ = ("_peer", "_pending")

    def __init__(self, peer: str = "the peer") -> None:
        self._pending = bytearray()
        self._peer = peer

    @property
    def pending(self) -> int:
        """Bytes held: the start of a message not yet complete."""
        return len(self._pending)

    def feed(self, data: bytes) -> bytes:
        """The bytes to send for ``data`` (possibly empty, possibly longer)."""
        if self._pending:
            self._pending += data
            buf: bytes | bytearray = self._pending
        else:
            buf = data
        view = memoryview(buf)
        out: list[bytes | memoryview] = []
        changed = False
        pos = 0
        while True:
            size = _message_size(view, pos)
            if size is None or pos + size > len(view):
                break
            msg = view[pos : pos + size]
            pos += size
            carries = _carries_exception(msg)
            fixed = _rewrite(bytes(msg)) if carries is not False else None
            if fixed is None:
                out.append(msg)
                continue
            changed = True
            out.append(fixed[0])
            log.debug(
                "Cap'n Proto error sent to %s as type and message only; it was: %s",
                self._peer,
                fixed[1],
            )
        if not changed and pos == len(view) and buf is data:
            view.release()
            self._pending = bytearray()
            return data
        result = b"".join(out)
        rest = bytes(view[pos:])
        view.release()
        self._pending = bytearray(rest)
        return result
