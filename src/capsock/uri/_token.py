"""Capability URIs, part 2: the macaroon tag steps and the token codec.

:func:`root_tag` and :func:`chain_tag` are the two steps of the chain (the
whole chain is :func:`capsock.store.chain`); :class:`Token` is the secret part
of a capability with its compact, versioned binary form.  Private: the
public names are re-exported by :mod:`capsock.uri`.
"""

from __future__ import annotations

from dataclasses import dataclass

import nacl.encoding
import nacl.hash

from ..errors import InvalidCapability, LocalUsageError
from ._caveats import MAX_CAVEATS, Caveat, _check_caveats, _decode_caveat, encode_caveat

TOKEN_VERSION = 1


ROOT_ID_LEN = 16


ROOT_KEY_LEN = 32


TAG_LEN = 32


_PERSON_ROOT = b"capsock/1 root"


_PERSON_CAVEAT = b"capsock/1 caveat"


_REDACTED = "<redacted>"


_MIN_TOKEN_LEN = 1 + ROOT_ID_LEN + 1 + TAG_LEN


def _check_bytes(what: str, value: object, length: int, error: type[Exception]) -> bytes:
    if not isinstance(value, bytes) or len(value) != length:
        raise error(f"{what} must be exactly {length} bytes")
    return value


def _blake2b(key: bytes, person: bytes, data: bytes) -> bytes:
    digest: bytes = nacl.hash.blake2b(
        data, digest_size=TAG_LEN, key=key, person=person, encoder=nacl.encoding.RawEncoder
    )
    return digest


def root_tag(root_key: bytes, root_id: bytes) -> bytes:
    """The tag of the root capability: BLAKE2b-256(key=root_key, person="capsock/1 root").

    Raises:
        LocalUsageError: ``root_key`` is not 32 bytes.
        InvalidCapability: ``root_id`` is not 16 bytes.
    """
    _check_bytes("root key", root_key, ROOT_KEY_LEN, LocalUsageError)
    _check_bytes("root_id", root_id, ROOT_ID_LEN, InvalidCapability)
    return _blake2b(root_key, _PERSON_ROOT, root_id)


def chain_tag(tag: bytes, caveat: Caveat) -> bytes:
    """The tag after appending ``caveat`` to a capability whose tag is ``tag``.

    Raises:
        InvalidCapability: ``tag`` is not 32 bytes or ``caveat`` is not a caveat.
    """
    _check_bytes("tag", tag, TAG_LEN, InvalidCapability)
    return _blake2b(tag, _PERSON_CAVEAT, encode_caveat(caveat))


def mint_root(root_key: bytes, root_id: bytes) -> Token:
    """A root token (no caveats) for ``root_id`` under ``root_key``.

    ``root_key`` must be 32 bytes from a CSPRNG and stays with the endpoint;
    ``root_id`` is a public 16-byte identifier the endpoint uses to find it.

    Raises:
        LocalUsageError: ``root_key`` is not 32 bytes.
        InvalidCapability: ``root_id`` is not 16 bytes.
    """
    return Token(root_id, (), root_tag(root_key, root_id))


@dataclass(frozen=True, slots=True)
class Token:
    """The secret part of a capability: ``(root_id, caveats, tag)``.

    ``repr()`` shows the caveats but never the root id or the tag.  ``==``
    compares tags in variable time: authenticate only with :func:`capsock.store.authorize`.

    Raises:
        InvalidCapability: a field has the wrong type or length, or there are
            more than 32 caveats.
    """

    root_id: bytes
    """Public 16-byte identifier of the root capability (chosen by the endpoint)."""
    caveats: tuple[Caveat, ...]
    """The restrictions, in the order they were appended (empty for a root)."""
    tag: bytes
    """The 32-byte chained BLAKE2b tag (the secret)."""

    def __post_init__(self) -> None:
        _check_bytes("root_id", self.root_id, ROOT_ID_LEN, InvalidCapability)
        object.__setattr__(self, "caveats", _check_caveats(self.caveats))
        _check_bytes("tag", self.tag, TAG_LEN, InvalidCapability)

    def encode(self) -> bytes:
        """The binary token (version 1)."""
        head = bytes((TOKEN_VERSION,)) + self.root_id + bytes((len(self.caveats),))
        return head + b"".join(encode_caveat(c) for c in self.caveats) + self.tag

    @classmethod
    def decode(cls, data: bytes | bytearray | memoryview) -> Token:
        """Decode a binary token; every length must be exactly right.

        Raises:
            InvalidCapability: wrong version, truncated, trailing bytes, too many
                caveats, a known caveat with a wrong length or value.
        """
        if not isinstance(data, bytes | bytearray | memoryview):
            raise InvalidCapability(f"a token is bytes, not {type(data).__name__}")
        data = bytes(data)  # a copy: the caller may mutate a bytearray later
        if not data:
            raise InvalidCapability("token is empty")
        if data[0] != TOKEN_VERSION:
            raise InvalidCapability(
                f"unsupported token version {data[0]} (this library reads {TOKEN_VERSION})"
            )
        if len(data) < _MIN_TOKEN_LEN:
            raise InvalidCapability(f"token is truncated ({len(data)} bytes)")
        root_id = data[1 : 1 + ROOT_ID_LEN]
        count = data[1 + ROOT_ID_LEN]
        if count > MAX_CAVEATS:
            raise InvalidCapability(f"too many caveats ({count} > {MAX_CAVEATS})")
        pos = 2 + ROOT_ID_LEN
        caveats: list[Caveat] = []
        for index in range(1, count + 1):
            if pos + 2 > len(data):
                raise InvalidCapability(f"token is truncated in caveat {index}")
            kind, length = data[pos], data[pos + 1]
            pos += 2
            if pos + length > len(data):
                raise InvalidCapability(f"token is truncated in caveat {index}")
            try:
                caveats.append(_decode_caveat(kind, data[pos : pos + length]))
            except InvalidCapability as exc:
                raise InvalidCapability(f"caveat {index}: {exc}") from None
            pos += length
        rest = len(data) - pos
        if rest < TAG_LEN:
            raise InvalidCapability("token is truncated in the tag")
        if rest > TAG_LEN:
            raise InvalidCapability(f"token has {rest - TAG_LEN} trailing byte(s) after the tag")
        return cls(root_id, tuple(caveats), data[pos:])

    def attenuate(self, *caveats: Caveat) -> Token:
        """A weaker token: ``caveats`` appended, the tag chained over each.

        Raises:
            InvalidCapability: an argument is not a caveat, or the token would
                have more than 32 caveats.
        """
        combined = _check_caveats(self.caveats + caveats)
        tag = self.tag
        for caveat in caveats:
            tag = chain_tag(tag, caveat)
        return Token(self.root_id, combined, tag)

    def __repr__(self) -> str:
        return f"Token({_REDACTED}, caveats={self.caveats!r})"
