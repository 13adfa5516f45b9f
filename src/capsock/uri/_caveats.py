"""Capability URIs, part 1: the caveats (restrictions) and their binary encoding.

Private: the public names are re-exported by :mod:`capsock.uri`, which has the
theory of operation.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from enum import IntEnum
from typing import TypeAlias, TypeVar

from ..errors import InvalidCapability
from ..keys import NodeId

MAX_CAVEATS = 32


MAX_LABEL_BYTES = 64


_MAX_U64 = 2**64 - 1


_MAX_U32 = 2**32 - 1


_FORBIDDEN_LABEL_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


_T = TypeVar("_T")


class CaveatKind(IntEnum):
    """The caveat kinds this library understands (one byte on the wire)."""

    EXP = 1
    """Expiry: valid only while the endpoint's clock reads before this unix time."""
    USES = 2
    """The capability may be used to open this many streams."""
    PEER = 3
    """Only this node may use the capability."""
    LABEL = 4
    """A human-readable label for logs; restricts nothing."""
    TO = 5
    """A forwarding capability may carry sessions only to this node."""


_KNOWN_KINDS = frozenset(int(k) for k in CaveatKind)


def _check_int(what: str, value: object, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidCapability(f"{what} must be an int, not {type(value).__name__}")
    if not low <= value <= high:
        raise InvalidCapability(f"{what} must be in {low}..{high}")
    return value


def _check_type(what: str, value: object, kind: type[_T]) -> _T:
    if not isinstance(value, kind):
        raise InvalidCapability(f"{what} must be a {kind.__name__}, not {type(value).__name__}")
    return value


def _check_label(text: object) -> bytes:
    label = _check_type("label caveat", text, str)
    for ch in label:
        if unicodedata.category(ch) in _FORBIDDEN_LABEL_CATEGORIES:
            raise InvalidCapability(f"label caveat contains a control character (U+{ord(ch):04X})")
    raw = label.encode("utf-8")
    if not 1 <= len(raw) <= MAX_LABEL_BYTES:
        raise InvalidCapability(f"label caveat must be 1..{MAX_LABEL_BYTES} bytes (got {len(raw)})")
    return raw


@dataclass(frozen=True, slots=True)
class Expires:
    """Caveat ``exp``: valid while ``now < at``.  Raises InvalidCapability if out of range."""

    at: int
    """Unix time in whole seconds, 0..2**64-1."""

    def __post_init__(self) -> None:
        _check_int("exp caveat", self.at, 0, _MAX_U64)


@dataclass(frozen=True, slots=True)
class Uses:
    """Caveat ``uses``: at most this many opens.  Raises InvalidCapability if out of range."""

    count: int
    """The number of opens allowed (counted by the endpoint), 1..2**32-1."""

    def __post_init__(self) -> None:
        _check_int("uses caveat", self.count, 1, _MAX_U32)


@dataclass(frozen=True, slots=True)
class Peer:
    """Caveat ``peer``: only this node may open a stream.  Raises InvalidCapability if no NodeId."""

    node: NodeId
    """The only node allowed to use the capability."""

    def __post_init__(self) -> None:
        _check_type("peer caveat", self.node, NodeId)


@dataclass(frozen=True, slots=True)
class To:
    """Caveat ``to``: a forwarding capability may carry sessions only to this node.

    The forwarder checks it (a ``to`` caveat also forbids registering to be
    reached through the forwarder); any other endpoint lets it pass.  An
    introduction's forwarding capability carries one, naming the introduced
    node.  Raises InvalidCapability if ``node`` is no NodeId.
    """

    node: NodeId
    """The only node sessions may be forwarded to."""

    def __post_init__(self) -> None:
        _check_type("to caveat", self.node, NodeId)


@dataclass(frozen=True, slots=True)
class Label:
    """Caveat ``label``: a name for logs; restricts nothing.

    Raises:
        InvalidCapability: ``text`` is not 1..64 bytes of UTF-8, or contains a
            control, format, surrogate or line/paragraph separator character.
    """

    text: str
    """The label."""

    def __post_init__(self) -> None:
        _check_label(self.text)


@dataclass(frozen=True, slots=True)
class UnknownCaveat:
    """A caveat of a kind this library does not know, kept verbatim.

    It makes a token minted by newer software parse and round-trip; an endpoint
    must reject any token that carries one.

    Raises:
        InvalidCapability: ``kind`` is not in 0..255 or is a known kind, or
            ``value`` is not bytes of at most 255 bytes.
    """

    kind: int
    """The kind byte (never one of :class:`CaveatKind`)."""
    value: bytes
    """The raw value, 0..255 bytes."""

    def __post_init__(self) -> None:
        _check_int("caveat kind", self.kind, 0, 255)
        if self.kind in _KNOWN_KINDS:
            raise InvalidCapability(f"caveat kind {self.kind} is known: use its own class")
        if not isinstance(self.value, bytes) or len(self.value) > 255:
            raise InvalidCapability("unknown caveat value must be at most 255 bytes")


Caveat: TypeAlias = Expires | Uses | Peer | To | Label | UnknownCaveat
"""Any caveat, known or not."""


def encode_caveat(caveat: Caveat) -> bytes:
    """The exact ``kind | len | value`` bytes of ``caveat`` in a token.

    These are also the bytes hashed into the tag chain.

    Raises:
        InvalidCapability: ``caveat`` is not a caveat.
    """
    if isinstance(caveat, Expires):
        kind, value = CaveatKind.EXP, caveat.at.to_bytes(8, "big")
    elif isinstance(caveat, Uses):
        kind, value = CaveatKind.USES, caveat.count.to_bytes(4, "big")
    elif isinstance(caveat, Peer):
        kind, value = CaveatKind.PEER, caveat.node.raw
    elif isinstance(caveat, To):
        kind, value = CaveatKind.TO, caveat.node.raw
    elif isinstance(caveat, Label):
        kind, value = CaveatKind.LABEL, caveat.text.encode("utf-8")
    elif isinstance(caveat, UnknownCaveat):
        return bytes((caveat.kind, len(caveat.value))) + caveat.value
    else:
        raise InvalidCapability(f"not a caveat: {type(caveat).__name__}")
    return bytes((kind, len(value))) + value


_EXPECTED_LEN = {CaveatKind.EXP: 8, CaveatKind.USES: 4, CaveatKind.PEER: 32, CaveatKind.TO: 32}


def _decode_caveat(kind: int, value: bytes) -> Caveat:
    if kind not in _KNOWN_KINDS:
        return UnknownCaveat(kind, value)
    known = CaveatKind(kind)
    name = known.name.lower()
    expected = _EXPECTED_LEN.get(known)
    if expected is not None and len(value) != expected:
        raise InvalidCapability(f"{name} caveat value is {len(value)} bytes, expected {expected}")
    if known is CaveatKind.EXP:
        return Expires(int.from_bytes(value, "big"))
    if known is CaveatKind.USES:
        count = int.from_bytes(value, "big")
        if count == 0:
            raise InvalidCapability("uses caveat count is zero")
        return Uses(count)
    if known in (CaveatKind.PEER, CaveatKind.TO):
        try:
            node = NodeId(value).checked()
        except InvalidCapability as exc:
            raise InvalidCapability(f"{name} caveat: {exc}") from None
        return Peer(node) if known is CaveatKind.PEER else To(node)
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidCapability("label caveat is not valid UTF-8") from None
    return Label(text)


def _check_caveats(caveats: object) -> tuple[Caveat, ...]:
    if not isinstance(caveats, tuple | list):
        raise InvalidCapability("caveats must be a tuple of caveats")
    for caveat in caveats:
        if not isinstance(caveat, Caveat):
            raise InvalidCapability(f"not a caveat: {type(caveat).__name__}")
    if len(caveats) > MAX_CAVEATS:
        raise InvalidCapability(f"too many caveats ({len(caveats)} > {MAX_CAVEATS})")
    return tuple(caveats)
