"""The compact ``v=`` form of a via hint, and the base64url text of the URI.

A ``via=`` hint carries a whole forwarder capability, percent-encoded: for one
relay that doubled a URI's length.  When the forwarder capability was made for
this node (its last caveat is ``to=<this node>``) and its own hints are ``tcp``
and ``unix`` only, the URI writes it as ``v=<base64url>`` of a binary form
(protocol.md, "Compact `via` hints"): the forwarder's 32-byte node id, the root
id and the tag, then items, each one type byte: a caveat (kind, length,
value; all but the implied last ``to``), a TCP hint by IPv4, IPv6 or DNS
name, a Unix path.  Decoding refuses anything that does not encode back to the
same bytes, so every capability has exactly one text.

This module works on the parts (node, token, hints); :mod:`capsock.uri`
builds the :class:`~capsock.uri.Capability` from them.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
from collections.abc import Sequence

from ..errors import InvalidCapability
from ..keys import NodeId
from ._caveats import MAX_CAVEATS, Caveat, To, _decode_caveat, encode_caveat
from ._hints import TcpHint, UnixHint
from ._token import ROOT_ID_LEN, TAG_LEN, Token

_B64URL = re.compile(r"[A-Za-z0-9_-]+")

_ITEM_CAVEAT = 0
_ITEM_TCP4 = 1
_ITEM_TCP6 = 2
_ITEM_TCP_NAME = 3
_ITEM_UNIX = 4

_COMPACT_HEAD = 32 + ROOT_ID_LEN + TAG_LEN


def b64encode(data: bytes) -> str:
    """base64url without padding."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64decode(what: str, text: str) -> bytes:
    """Canonical base64url without padding, or InvalidCapability naming ``what``."""
    if "=" in text:
        raise InvalidCapability(f"{what} must be base64url without '=' padding")
    if not _B64URL.fullmatch(text):
        raise InvalidCapability(f"{what} is not base64url (allowed: A-Z a-z 0-9 - _)")
    if len(text) % 4 == 1:
        raise InvalidCapability(f"{what} has an impossible base64url length")
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise InvalidCapability(f"{what} is not valid base64url") from None
    if b64encode(raw) != text:
        raise InvalidCapability(f"{what} is not canonical base64url (non-zero padding bits)")
    return raw


def encode_compact(
    node: NodeId, token: Token, hints: Sequence[object], outer: NodeId
) -> bytes | None:
    """The compact form of the forwarder capability ``(node, token, hints)`` inside a
    URI for node ``outer``, or None where it does not apply.

    It applies when the token's last caveat is ``to=outer`` and the hints are
    ``tcp`` and ``unix`` only; otherwise the hint is written in the long form
    (``via=``).
    """
    caveats = token.caveats
    if not caveats or caveats[-1] != To(outer):
        return None
    if not all(isinstance(h, (TcpHint, UnixHint)) for h in hints):
        return None
    out = [node.raw, token.root_id, token.tag]
    out.extend(bytes((_ITEM_CAVEAT,)) + encode_caveat(c) for c in caveats[:-1])
    for h in hints:
        if isinstance(h, TcpHint):
            port = h.port.to_bytes(2, "big")
            try:
                addr = ipaddress.ip_address(h.host)
            except ValueError:
                name = h.host.encode("ascii")
                out.append(bytes((_ITEM_TCP_NAME, len(name))) + name + port)
            else:
                kind = _ITEM_TCP4 if addr.version == 4 else _ITEM_TCP6
                out.append(bytes((kind,)) + addr.packed + port)
        elif isinstance(h, UnixHint):
            path = h.path.encode("utf-8")
            out.append(bytes((_ITEM_UNIX, len(path))) + path)
    return b"".join(out)


def _take(raw: bytes, pos: int, size: int, index: int) -> bytes:
    if pos + size > len(raw):
        raise InvalidCapability(f"truncated in item {index}")
    return raw[pos : pos + size]


def decode_compact(
    raw: bytes, outer: NodeId
) -> tuple[NodeId, Token, tuple[TcpHint | UnixHint, ...]]:
    """The parts of a compact forwarder capability for node ``outer`` (``to=outer``
    appended).  The caller checks the result encodes back to ``raw``.

    Raises:
        InvalidCapability: truncated, an unknown item, a caveat after a hint,
            too many caveats, or text that is not valid.
    """
    if len(raw) < _COMPACT_HEAD:
        raise InvalidCapability(f"truncated ({len(raw)} bytes, at least {_COMPACT_HEAD})")
    node = NodeId(raw[:32])
    root_id, tag = raw[32 : 32 + ROOT_ID_LEN], raw[32 + ROOT_ID_LEN : _COMPACT_HEAD]
    caveats: list[Caveat] = []
    hints: list[TcpHint | UnixHint] = []
    pos, index = _COMPACT_HEAD, 0
    while pos < len(raw):
        index += 1
        item = raw[pos]
        pos += 1
        if item == _ITEM_CAVEAT:
            if hints:
                raise InvalidCapability(f"item {index}: a caveat after a hint")
            kind, length = _take(raw, pos, 2, index)
            value = _take(raw, pos + 2, length, index)
            pos += 2 + length
            try:
                caveats.append(_decode_caveat(kind, value))
            except InvalidCapability as exc:
                raise InvalidCapability(f"item {index}: {exc}") from None
            continue
        if item in (_ITEM_TCP4, _ITEM_TCP6):
            size = 4 if item == _ITEM_TCP4 else 16
            packed = _take(raw, pos, size + 2, index)
            pos += size + 2
            host = str(ipaddress.ip_address(packed[:size]))
        elif item in (_ITEM_TCP_NAME, _ITEM_UNIX):
            (length,) = _take(raw, pos, 1, index)
            extra = 2 if item == _ITEM_TCP_NAME else 0
            packed = _take(raw, pos + 1, length + extra, index)
            pos += 1 + length + extra
            try:
                text = packed[:length].decode("ascii" if extra else "utf-8")
            except UnicodeDecodeError:
                raise InvalidCapability(f"item {index}: not valid text") from None
            if item == _ITEM_UNIX:
                hints.append(UnixHint(text))
                continue
            host = text
        else:
            raise InvalidCapability(f"item {index}: unknown item type {item}")
        hints.append(TcpHint(host, int.from_bytes(packed[-2:], "big")))
    caveats.append(To(outer))
    if len(caveats) > MAX_CAVEATS:
        raise InvalidCapability(f"too many caveats ({len(caveats)} > {MAX_CAVEATS})")
    return node, Token(root_id, tuple(caveats), tag), tuple(hints)
