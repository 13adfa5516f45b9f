"""Binding a new path to a live session: the attach exchange, sans-IO.

A new path (a direct TCP connection from a hole punch, protocol.md section 13)
carries no record of the session until both ends proved, on that very
connection, that they hold the session's *path key* ``K``.  ``K`` is derived
from two 32-byte secrets the nodes sent each other inside the session's own
encryption (the ``path/hello`` records, :mod:`capsock.core._path_switch`), mixed
with the session's handshake hash: nobody but the two ends of *this* session
can compute it, and every session has its own.

The exchange is a keyed challenge-response, three messages, each a *path
frame* (``00 00`` then a type byte: a zero-length record is never valid in
capsock/1, so nothing here can be read as a record)::

    ATTACH   I -> R   00 00 'A' | 01 | tag (16) | nonce_i (16)       36 bytes
    PROVE    R -> I   00 00 'B' | nonce_r (16) | mac_r (32)          51 bytes
    CONFIRM  I -> R   00 00 'C' | mac_i (32)                         35 bytes

``tag`` names the session to the responder (a public label derived from ``K``);
the two MACs are keyed BLAKE2b-256 under ``K`` over a role label, ``tag`` and
both nonces, so each is fresh (a new nonce on each side for each attempt), bound
to the session (``K``), and cannot be reflected (the labels differ).  Both
compute the same ``path_id`` from ``tag`` and the nonces.

No I/O, no clock, no randomness: the caller passes the nonce (16 bytes from
``os.urandom``).  Failure is :class:`PathAuthError`; it closes that connection
only, never the session.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Final

from ..errors import LocalUsageError, PathAuthError

__all__ = [
    "ATTACH_LEN",
    "CONFIRM_LEN",
    "NONCE_LEN",
    "PROVE_LEN",
    "AttachInitiator",
    "AttachResponder",
    "derive_path_key",
    "lane_tag",
    "path_key_tag",
    "peek_session_tag",
]

NONCE_LEN: Final = 16
TAG_LEN: Final = 16
MAC_LEN: Final = 32
PATH_ID_LEN: Final = 16
VERSION: Final = 1
ATTACH_LEN: Final = 3 + 1 + TAG_LEN + NONCE_LEN
PROVE_LEN: Final = 3 + NONCE_LEN + MAC_LEN
CONFIRM_LEN: Final = 3 + MAC_LEN

_ATTACH: Final = b"\x00\x00A"
_PROVE: Final = b"\x00\x00B"
_CONFIRM: Final = b"\x00\x00C"


def _mac(key: bytes, person: bytes, data: bytes, size: int = MAC_LEN) -> bytes:
    return hashlib.blake2b(data, key=key, person=person, digest_size=size).digest()


def derive_path_key(handshake_hash: bytes, dialer_secret: bytes, responder_secret: bytes) -> bytes:
    """``K``: BLAKE2b-256, keyed with the two hello secrets, over the session's handshake hash.

    Raises:
        LocalUsageError: a secret is not 32 bytes.
    """
    if len(dialer_secret) != 32 or len(responder_secret) != 32:
        raise LocalUsageError("path secrets are 32 bytes each")
    return _mac(dialer_secret + responder_secret, b"capsock-path-key", handshake_hash)


def path_key_tag(key: bytes) -> bytes:
    """The public 16-byte label of a session's path key (names it in ATTACH)."""
    return _mac(key, b"capsock-path-tag", b"", TAG_LEN)


def lane_tag(key: bytes, from_dialer: bool, path_id: bytes, start: int) -> bytes:
    """The 16-byte MAC of a lane header (protocol.md 13.5)."""
    data = (b"\x01" if from_dialer else b"\x02") + path_id + start.to_bytes(8, "big")
    return _mac(key, b"capsock-lane", data, 16)


def _path_id(tag: bytes, nonce_i: bytes, nonce_r: bytes) -> bytes:
    return hashlib.blake2b(
        tag + nonce_i + nonce_r, person=b"capsock-path-id", digest_size=PATH_ID_LEN
    ).digest()


def _proof(key: bytes, role: bytes, tag: bytes, nonce_i: bytes, nonce_r: bytes) -> bytes:
    return _mac(key, b"capsock-path-mac", role + tag + nonce_i + nonce_r)


def _nonce(nonce: bytes) -> bytes:
    if len(nonce) != NONCE_LEN:
        raise LocalUsageError(f"an attach nonce is {NONCE_LEN} random bytes")
    return bytes(nonce)


def peek_session_tag(attach: bytes) -> bytes:
    """The session tag of an ATTACH message, so the listener finds the session.

    Raises:
        PathAuthError: not a well-formed ATTACH of this version.
    """
    if len(attach) != ATTACH_LEN or attach[:3] != _ATTACH or attach[3] != VERSION:
        raise PathAuthError("not a path ATTACH message (or an unknown version)")
    return bytes(attach[4 : 4 + TAG_LEN])


class AttachInitiator:
    """The coordinator's side of the attach exchange on a new connection.

    ``first()`` is the ATTACH; ``read_prove(PROVE)`` checks the responder and
    returns CONFIRM; :attr:`path_id` is then set.  ``repr()`` shows no secret.
    """

    __slots__ = ("_key", "_nonce", "_tag", "path_id")

    def __init__(self, key: bytes, nonce: bytes) -> None:
        self._key = key
        self._tag = path_key_tag(key)
        self._nonce = _nonce(nonce)
        self.path_id: bytes | None = None
        """The agreed id of the path, once :meth:`read_prove` succeeded."""

    def first(self) -> bytes:
        """The ATTACH message (36 bytes)."""
        return _ATTACH + bytes((VERSION,)) + self._tag + self._nonce

    def read_prove(self, message: bytes) -> bytes:
        """Check PROVE; return CONFIRM.  After it, the path is authenticated here.

        Raises:
            PathAuthError: malformed, or the MAC is wrong (not this session's
                peer, a replay of another attempt, another session).
        """
        if self.path_id is not None:
            raise LocalUsageError("PROVE was already read")
        if len(message) != PROVE_LEN or message[:3] != _PROVE:
            raise PathAuthError("malformed path PROVE message")
        nonce_r = bytes(message[3 : 3 + NONCE_LEN])
        mac_r = bytes(message[3 + NONCE_LEN :])
        expect = _proof(self._key, b"R", self._tag, self._nonce, nonce_r)
        if not hmac.compare_digest(mac_r, expect):
            raise PathAuthError("the path's peer did not prove the session's path key")
        self.path_id = _path_id(self._tag, self._nonce, nonce_r)
        return _CONFIRM + _proof(self._key, b"I", self._tag, self._nonce, nonce_r)

    def __repr__(self) -> str:
        return f"AttachInitiator(done={self.path_id is not None})"


class AttachResponder:
    """The other side: reads ATTACH (found by :func:`peek_session_tag`), answers
    PROVE, and checks CONFIRM; only then is the path authenticated.

    A capsock node keeps at most a few responders per session and drops a
    connection that sends no CONFIRM within its handshake deadline.
    """

    __slots__ = ("_key", "_nonce", "_nonce_i", "_tag", "path_id")

    def __init__(self, key: bytes, nonce: bytes) -> None:
        self._key = key
        self._tag = path_key_tag(key)
        self._nonce = _nonce(nonce)
        self._nonce_i: bytes | None = None
        self.path_id: bytes | None = None
        """The agreed id of the path, once :meth:`read_confirm` succeeded."""

    def read_attach(self, message: bytes) -> bytes:
        """Check ATTACH names this session; return PROVE.

        Raises:
            PathAuthError: malformed, another session's tag, or a second ATTACH.
        """
        if self._nonce_i is not None:
            raise PathAuthError("a second ATTACH on one connection")
        if not hmac.compare_digest(peek_session_tag(message), self._tag):
            raise PathAuthError("ATTACH names another session")
        nonce_i = self._nonce_i = bytes(message[4 + TAG_LEN :])
        return _PROVE + self._nonce + _proof(self._key, b"R", self._tag, nonce_i, self._nonce)

    def read_confirm(self, message: bytes) -> bytes:
        """Check CONFIRM; return the path id.  Bytes after it are the path's lanes.

        Raises:
            PathAuthError: before ATTACH, malformed, or a wrong MAC.
        """
        if self._nonce_i is None or self.path_id is not None:
            raise PathAuthError("CONFIRM out of order")
        if len(message) != CONFIRM_LEN or message[:3] != _CONFIRM:
            raise PathAuthError("malformed path CONFIRM message")
        expect = _proof(self._key, b"I", self._tag, self._nonce_i, self._nonce)
        if not hmac.compare_digest(bytes(message[3:]), expect):
            raise PathAuthError("the path's peer did not prove the session's path key")
        self.path_id = _path_id(self._tag, self._nonce_i, self._nonce)
        return self.path_id

    def __repr__(self) -> str:
        return f"AttachResponder(done={self.path_id is not None})"
