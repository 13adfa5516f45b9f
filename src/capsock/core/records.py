"""capsock's transport records: a 2-byte big-endian length, then one Noise message.

The one home of the record framing (DESIGN.md §4.1, protocol.md): the
handshake writes its two records with :func:`frame_record`, the transport
cipher writes the prefix into its output buffer with the same layout, and every
reader splits a byte stream with :class:`RecordReader`.  Sans-IO: bytes in,
records out.
"""

from __future__ import annotations

import struct
from typing import Final

from ..errors import ProtocolError

__all__ = [
    "MAX_RECORD_LEN",
    "PREFIX_LEN",
    "RecordReader",
    "frame_record",
    "parse_prefix",
    "record_prefix",
]

PREFIX_LEN: Final = 2
"""Bytes of the length prefix of a record."""
MAX_RECORD_LEN: Final = 65535
"""Largest record body (a Noise message, spec §3)."""

_PREFIX: Final = struct.Struct(">H")


def record_prefix(length: int) -> bytes:
    """The 2-byte prefix of a record whose body is ``length`` bytes.

    Raises:
        struct.error: ``length`` does not fit 16 bits (a caller's bug).
    """
    return _PREFIX.pack(length)


def frame_record(message: bytes) -> bytes:
    """``message`` as one record: its prefix, then the message."""
    return _PREFIX.pack(len(message)) + message


def parse_prefix(prefix: bytes | bytearray | memoryview) -> int:
    """The body length announced by a 2-byte record prefix."""
    (length,) = _PREFIX.unpack(prefix)
    return int(length)


class RecordReader:
    """Sans-IO splitter for capsock transport records (2-byte BE length + message).

    Feed received bytes with :meth:`feed`, then call :meth:`next_record` until it
    returns ``None``.  Records that lie inside one fed chunk are returned as
    zero-copy ``memoryview`` slices of it; only a record that straddles two
    chunks is assembled in a small buffer, which is then handed over (a view
    of it) and replaced by a new one.  Memory: the reader holds the last
    chunk fed plus at most one incomplete record (< 65537 bytes).
    """

    __slots__ = ("_chunk", "_partial", "_pos")

    def __init__(self) -> None:
        self._chunk: bytes = b""
        self._pos = 0
        self._partial = bytearray()

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Add received bytes (call after :meth:`next_record` returned ``None``)."""
        chunk = self._chunk
        if self._pos < len(chunk):  # an incomplete record at the end of the last chunk
            self._partial += memoryview(chunk)[self._pos :]
        self._chunk = data if type(data) is bytes else bytes(data)
        self._pos = 0
        partial = self._partial
        if not partial:
            return
        view = memoryview(self._chunk)
        size = len(view)
        pos = 0
        while pos < size:  # complete the straddling record from the new chunk only
            have = len(partial)
            want = 2 - have if have < 2 else ((partial[0] << 8) | partial[1]) + 2 - have
            if want <= 0:
                break
            take = min(want, size - pos)
            partial += view[pos : pos + take]
            pos += take
        self._pos = pos

    def next_record(self) -> bytes | memoryview | None:
        """The next complete record's message (without prefix), or ``None``.

        Raises:
            ProtocolError: a record has length zero (never valid in capsock).
        """
        partial = self._partial
        if partial:
            if len(partial) < 2:
                return None
            length = (partial[0] << 8) | partial[1]
            if length == 0:
                raise ProtocolError("received a zero-length transport record")
            if len(partial) < length + 2:
                return None
            # Hand the assembled buffer over instead of copying it out (a
            # maximum-size record straddles two reads often in bulk transfers).
            self._partial = bytearray()
            return memoryview(partial)[2:]
        chunk = self._chunk
        pos = self._pos
        available = len(chunk) - pos
        if available < 2:
            return None
        length = (chunk[pos] << 8) | chunk[pos + 1]
        if length == 0:
            raise ProtocolError("received a zero-length transport record")
        if available < length + 2:
            return None
        end = pos + 2 + length
        self._pos = end
        return memoryview(chunk)[pos + 2 : end]

    @property
    def buffered(self) -> int:
        """Bytes fed but not yet returned (non-zero at EOF means a truncated record)."""
        return len(self._partial) + len(self._chunk) - self._pos

    def __repr__(self) -> str:
        return f"RecordReader(buffered={self.buffered})"
