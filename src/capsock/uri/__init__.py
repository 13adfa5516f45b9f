"""The ``capsock://`` capability URI: parse and format, caveats, attenuation (pure).

Theory of operation
-------------------

A capability names one stream endpoint and carries the authority to open it::

    capsock://<node-id>/<token>[?<hint>&<hint>...]

The *node id* (52 characters of lower-case base32, see :mod:`capsock.keys`) says
who must answer: the Noise handshake proves it.  The *token* says what the
holder may do: base64url without padding of the binary encoding below.  The
*hints* say where to look (``tcp``, ``unix``, ``via``/``v``); they carry no authority.

**Token encoding** (version 1, all integers big-endian)::

    0x01 | root_id (16) | n (1, <= 32) | n x (kind (1) | len (1) | value) | tag (32)

Known caveat values: ``exp`` (kind 1) u64 unix seconds, ``uses`` (kind 2) u32
1..2**32-1, ``peer`` (kind 3) the 32-byte Ed25519 key, ``label`` (kind 4) UTF-8,
1..64 bytes, no control/format characters.  Any other kind is kept verbatim as
:class:`UnknownCaveat`, so a token minted by newer software still parses and
round-trips; an endpoint rejects it (an unknown caveat means reject).

**The macaroon chain.**  With keyed BLAKE2b-256 (libsodium, via pynacl) and
two personalisation strings::

    tag_0 = BLAKE2b(key=root_key, person="capsock/1 root",   data=root_id)
    tag_i = BLAKE2b(key=tag_{i-1}, person="capsock/1 caveat", data=encode_caveat(c_i))

Anyone holding ``tag_{i-1}`` can compute ``tag_i`` (attenuation is offline); no
one can go back from ``tag_i`` to ``tag_{i-1}``, so no caveat can be removed,
reordered or altered.  The endpoint recomputes the chain from its root key and
compares tags in constant time (:func:`capsock.store.authorize`, over
:func:`capsock.store.chain`, the one implementation of the whole chain); checking
each caveat against the opening context is the endpoint's job, not this module's.

**Strict, canonical parsing.**  :func:`parse` accepts exactly the text that
``str()`` produces, so ``str(parse(s)) == s`` for every accepted ``s``:

- scheme exactly ``capsock://``; no userinfo, port, fragment, extra path
  segment, whitespace or non-ASCII character; at most 4096 characters;
- the token is canonical base64url (``A-Z a-z 0-9 - _``, no padding, zero
  padding bits) of a token that decodes with every length exactly right;
- at most 16 hints, keys ``tcp``, ``unix``, ``via`` and ``v`` only, no empty
  value, no exact duplicate;
- ``tcp=HOST:PORT``: a dotted-quad IPv4 address, an IPv6 address in brackets in
  :mod:`ipaddress`'s compressed form (no zone id; IPv4-mapped addresses are
  refused: use the IPv4 form), or a lower-case LDH DNS name (<= 253 characters,
  last label not all digits); port 1..65535 without leading zeros.  These
  characters never need percent-encoding, so the canonical value is raw;
- ``unix=`` an absolute path of at most 107 UTF-8 bytes without NUL, encoded
  as ``urllib.parse.quote(path, safe="/")``;
- ``via=`` a capability URI encoded as ``urllib.parse.quote(uri, safe="")``;
  at most 3 ``via`` levels (the innermost capability has no ``via``);
- ``v=`` the *compact* form of a ``via`` hint: canonical base64url of a binary
  encoding (layout in :mod:`capsock.uri._compact`).  It applies when the forwarder
  capability ends with a ``to`` caveat naming this URI's own node (a node's
  relay hints and introductions do) and has only ``tcp``/``unix`` hints; the
  ``to`` caveat's node id is then left out of the text and restored from the
  URI's node id when parsing (the tag stays over the whole chain).
  Formatting writes ``v=`` wherever it applies and ``via=`` elsewhere; parsing
  accepts both, so URIs written before the compact form still parse (to the
  same capability, which formats compactly).

*Decision:* hint values must use exactly the canonical percent-encoding above
(upper-case hex escapes, nothing escaped that need not be, everything escaped
that must be).  A differently encoded value is refused with "not in canonical
form" rather than silently normalised, so a URI's text identifies it.

Objects are validated when constructed, so every :class:`Capability` formats to
text that :func:`parse` accepts (a capability whose text would exceed 4096
characters cannot be built).  Everything wrong raises
:class:`~capsock.errors.InvalidCapability` (a ``ValueError``) naming the part
that is wrong; no message ever contains token text, token bytes or a tag.

**Secrets.**  ``str(capability)`` *is* the secret (that is how it is shared);
``repr()`` of a :class:`Token`, :class:`Capability` or :class:`ViaHint` redacts
every token, and :meth:`Capability.redacted` gives a loggable form.  Log with
``redacted()`` or ``%r``, never ``%s``.

**Layout.**  The caveats live in ``_uri_caveats``, the tag steps and the token
codec in ``_uri_token``, the direct hints in ``_uri_hints``; this module holds
``via`` hints, :class:`Capability` and the text form, and re-exports the rest.
"""

from __future__ import annotations

import math
import re
import time
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import TypeAlias

from ..errors import InvalidCapability
from ..keys import NodeId
from ._caveats import (
    MAX_CAVEATS,
    MAX_LABEL_BYTES,
    Caveat,
    CaveatKind,
    Expires,
    Label,
    Peer,
    To,
    UnknownCaveat,
    Uses,
    _check_type,
    encode_caveat,
)
from ._compact import b64decode, b64encode, decode_compact, encode_compact
from ._hints import MAX_DNS_NAME_LEN, MAX_UNIX_PATH_BYTES, TcpHint, UnixHint, _canonical_host
from ._token import (
    _REDACTED,
    ROOT_ID_LEN,
    ROOT_KEY_LEN,
    TAG_LEN,
    TOKEN_VERSION,
    Token,
    chain_tag,
    mint_root,
    root_tag,
)

# Also importable from here, though this module does not use them itself.
_REEXPORTED = (
    MAX_CAVEATS,
    MAX_DNS_NAME_LEN,
    MAX_LABEL_BYTES,
    MAX_UNIX_PATH_BYTES,
    ROOT_ID_LEN,
    ROOT_KEY_LEN,
    TAG_LEN,
    TOKEN_VERSION,
)

__all__ = [
    "Capability",
    "Caveat",
    "CaveatKind",
    "Expires",
    "Hint",
    "Label",
    "Peer",
    "TcpHint",
    "To",
    "Token",
    "UnixHint",
    "UnknownCaveat",
    "Uses",
    "ViaHint",
    "chain_tag",
    "encode_caveat",
    "mint_root",
    "parse",
    "root_tag",
]


SCHEME = "capsock://"


MAX_URI_LEN = 4096


MAX_HINTS = 16


MAX_VIA_DEPTH = 3


_HINT_KEYS = ("tcp", "unix", "via", "v")


_NOT_URI_CHAR = re.compile(r"[^\x21-\x7e]")


_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")


_PORT = re.compile(r"[1-9][0-9]{0,4}")


_SHOWABLE_KEY = re.compile(r"[A-Za-z0-9._~-]{1,16}")


@dataclass(frozen=True, slots=True)
class ViaHint:
    """Route hint ``via=<capability>``: reach the node through this forwarder.

    ``str()`` contains the forwarder's token (a secret); ``repr()`` redacts it.

    Raises:
        InvalidCapability: ``capability`` is not a :class:`Capability`, or
            ``via`` hints would nest deeper than 3 levels.
    """

    capability: Capability
    """The capability of the forwarding node (a relay or an introducer)."""

    def __post_init__(self) -> None:
        _check_type("via hint", self.capability, Capability)
        if _via_depth(self.capability) >= MAX_VIA_DEPTH:
            raise InvalidCapability(f"via hints nested deeper than {MAX_VIA_DEPTH} levels")

    def __str__(self) -> str:
        """The long form ``via=<percent-encoded URI>``.

        Inside a :class:`Capability` the hint is written in the compact form
        ``v=...`` instead whenever that applies (see the module docstring).
        """
        return "via=" + urllib.parse.quote(str(self.capability), safe="")


Hint: TypeAlias = TcpHint | UnixHint | ViaHint
"""Any route hint."""


def _via_depth(capability: Capability) -> int:
    return max(
        (1 + _via_depth(h.capability) for h in capability.hints if isinstance(h, ViaHint)),
        default=0,
    )


def _redacted_hint(hint: Hint) -> str:
    if isinstance(hint, ViaHint):
        return "via=" + urllib.parse.quote(hint.capability.redacted(), safe=":/<>[]")
    return str(hint)


def _compact_via(hint: ViaHint, outer: NodeId) -> bytes | None:
    """The binary compact form of ``hint`` inside a URI for node ``outer``, or None
    (see :func:`._compact.encode_compact`)."""
    cap = hint.capability
    return encode_compact(cap.node, cap.token, cap.hints, outer)


def _hint_text(hint: Hint, outer: NodeId) -> str:
    if isinstance(hint, ViaHint):
        compact = _compact_via(hint, outer)
        if compact is not None:
            return "v=" + b64encode(compact)
    return str(hint)


def _decode_compact_via(raw: bytes, outer: NodeId) -> ViaHint:
    node, token, hints = decode_compact(raw, outer)
    hint = ViaHint(Capability(node, token, hints))
    if _compact_via(hint, outer) != raw:
        raise InvalidCapability("not in canonical form")
    return hint


@dataclass(frozen=True, slots=True)
class Capability:
    """The right to open a stream to one endpoint: node key, token, route hints.

    ``str()`` is the canonical ``capsock://`` URI *including the secret token*;
    ``repr()`` and :meth:`redacted` never show a token.

    Raises:
        InvalidCapability: a field has the wrong type, there are more than 16
            hints or a duplicate hint, or the URI would exceed 4096 characters.
    """

    node: NodeId
    """The endpoint node's public key: the handshake proves who answers."""
    token: Token
    """The secret authorising the open."""
    hints: tuple[Hint, ...] = ()
    """Where to look for the node, in order of preference; no authority."""

    def __post_init__(self) -> None:
        _check_type("capability node", self.node, NodeId)
        _check_type("capability token", self.token, Token)
        hints: object = self.hints
        if not isinstance(hints, tuple | list):
            raise InvalidCapability("capability hints must be a tuple of hints")
        for hint in hints:
            if not isinstance(hint, Hint):
                raise InvalidCapability(f"not a route hint: {type(hint).__name__}")
        if len(hints) > MAX_HINTS:
            raise InvalidCapability(f"too many hints ({len(hints)} > {MAX_HINTS})")
        if len(set(hints)) != len(hints):
            raise InvalidCapability("duplicate hint")
        object.__setattr__(self, "hints", tuple(hints))
        if len(str(self)) > MAX_URI_LEN:
            raise InvalidCapability(f"capability URI would be longer than {MAX_URI_LEN} characters")

    @classmethod
    def parse(cls, text: str) -> Capability:
        """Parse a canonical ``capsock://`` URI (see the module docstring).

        Raises:
            InvalidCapability: the text is not a str or not a canonical
                capability URI; the message names the part that is wrong.
        """
        return _parse(text, 0)

    @property
    def root_id(self) -> bytes:
        """The token's public root identifier."""
        return self.token.root_id

    @property
    def caveats(self) -> tuple[Caveat, ...]:
        """The token's caveats."""
        return self.token.caveats

    def with_hints(self, hints: Iterable[Hint]) -> Capability:
        """The same capability with ``hints`` instead of the current ones.

        Raises:
            InvalidCapability: see :class:`Capability`.
        """
        return replace(self, hints=tuple(hints))

    def attenuate(
        self,
        *caveats: Caveat,
        ttl: float | None = None,
        uses: int | None = None,
        peer: NodeId | None = None,
        to: NodeId | None = None,
        label: str | None = None,
        now: float | None = None,
    ) -> Capability:
        """A weaker capability (same node and hints), computable by any holder.

        ``caveats`` are appended first, then the keyword ones in the order
        ``exp`` (``ceil(now + ttl)``; ``now`` defaults to the wall clock),
        ``peer``, ``to`` (forwarding only to that node), ``label``, ``uses``.
        ``uses`` comes last on purpose: a use counter belongs to the chain
        position of its caveat, so ``attenuate(uses=1, peer=bob)`` and
        ``attenuate(uses=1, peer=carol)`` get separate counters.

        Raises:
            InvalidCapability: a caveat is invalid, ``ttl`` is not a positive
                finite number, more than 32 caveats, or the URI grows too long.
        """
        extra: list[Caveat] = list(caveats)
        if ttl is not None:
            if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not 0 < ttl < math.inf:
                raise InvalidCapability("ttl must be a positive finite number of seconds")
            start = time.time() if now is None else now
            extra.append(Expires(math.ceil(start + ttl)))
        if peer is not None:
            extra.append(Peer(peer))
        if to is not None:
            extra.append(To(to))
        if label is not None:
            extra.append(Label(label))
        if uses is not None:
            extra.append(Uses(uses))
        return replace(self, token=self.token.attenuate(*extra))

    def redacted(self) -> str:
        """The URI with every token (also inside ``via`` hints) replaced by ``<redacted>``.

        For logs and display; it is not parseable.
        """
        text = f"{SCHEME}{self.node}/{_REDACTED}"
        if self.hints:
            text += "?" + "&".join(_redacted_hint(h) for h in self.hints)
        return text

    def __str__(self) -> str:
        text = f"{SCHEME}{self.node}/{b64encode(self.token.encode())}"
        if self.hints:
            text += "?" + "&".join(_hint_text(h, self.node) for h in self.hints)
        return text

    def __repr__(self) -> str:
        return f"Capability(node={self.node!r}, token={self.token!r}, hints={self.hints!r})"


def parse(text: str) -> Capability:
    """Parse a canonical ``capsock://`` URI; same as :meth:`Capability.parse`.

    Raises:
        InvalidCapability: the text is not a str or not a canonical capability
            URI; the message names the part that is wrong.
    """
    return _parse(text, 0)


def _parse(text: object, depth: int) -> Capability:
    text = _check_type("a capability URI", text, str)
    if len(text) > MAX_URI_LEN:
        raise InvalidCapability(f"capability URI is longer than {MAX_URI_LEN} characters")
    bad = _NOT_URI_CHAR.search(text)
    if bad is not None:
        what = "whitespace" if bad.group().isspace() else "a control or non-ASCII character"
        raise InvalidCapability(f"capability URI contains {what} at position {bad.start()}")
    if not text.startswith(SCHEME):
        if text[: len(SCHEME)].lower() == SCHEME:
            raise InvalidCapability("the scheme must be lower-case 'capsock://'")
        raise InvalidCapability("not a capsock URI (it must start with 'capsock://')")
    rest = text[len(SCHEME) :]
    if "#" in rest:
        raise InvalidCapability("a fragment ('#...') is not allowed")
    hier, qmark, query = rest.partition("?")
    authority, slash, path = hier.partition("/")
    if "@" in authority:
        raise InvalidCapability("userinfo ('...@') is not allowed before the node id")
    if ":" in authority:
        raise InvalidCapability("a port is not allowed after the node id")
    if not authority:
        raise InvalidCapability("the node id is missing (expected capsock://<node-id>/<token>)")
    try:
        node = NodeId.parse(authority)
    except InvalidCapability as exc:
        raise InvalidCapability(f"node id: {exc}") from None
    if not slash or not path:
        raise InvalidCapability("the token is missing (expected capsock://<node-id>/<token>)")
    if "/" in path:
        raise InvalidCapability("extra path segments after the token are not allowed")
    token = _parse_token_text(path)
    hints: list[Hint] = []
    if qmark:
        if not query:
            raise InvalidCapability("empty query string after '?'")
        parts = query.split("&")
        if len(parts) > MAX_HINTS:
            raise InvalidCapability(f"too many hints ({len(parts)} > {MAX_HINTS})")
        hints.extend(_parse_hint(part, index, depth, node) for index, part in enumerate(parts, 1))
    return Capability(node, token, tuple(hints))


def _parse_token_text(text: str) -> Token:
    return Token.decode(b64decode("token", text))  # its messages say "token" or "caveat"


def _show_key(key: str) -> str:
    if _SHOWABLE_KEY.fullmatch(key):
        return repr(key)
    return f"of {len(key)} characters (not shown)"


def _percent_decode(key: str, value: str) -> str:
    if _BAD_ESCAPE.search(value):
        raise InvalidCapability(f"{key} hint has an invalid percent-escape")
    try:
        return urllib.parse.unquote_to_bytes(value).decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidCapability(f"{key} hint is not UTF-8 after percent-decoding") from None


def _parse_hint(part: str, index: int, depth: int, outer: NodeId) -> Hint:
    key, eq, value = part.partition("=")
    if not eq:
        raise InvalidCapability(f"hint {index} has no '=' (expected key=value)")
    if not key:
        raise InvalidCapability(f"hint {index} has an empty key")
    if key not in _HINT_KEYS:
        raise InvalidCapability(f"unknown hint key {_show_key(key)} (known: tcp, unix, via, v)")
    if not value:
        raise InvalidCapability(f"empty value for hint '{key}'")
    if key == "v":
        if depth >= MAX_VIA_DEPTH:
            raise InvalidCapability(f"via hints nested deeper than {MAX_VIA_DEPTH} levels")
        try:
            return _decode_compact_via(b64decode("value", value), outer)
        except InvalidCapability as exc:
            raise InvalidCapability(f"v hint: {exc}") from None
    decoded = _percent_decode(key, value)
    hint: Hint
    if key == "tcp":
        hint = _parse_tcp(decoded)
    elif key == "unix":
        hint = UnixHint(decoded)
    else:
        if depth >= MAX_VIA_DEPTH:
            raise InvalidCapability(f"via hints nested deeper than {MAX_VIA_DEPTH} levels")
        try:
            hint = ViaHint(_parse(decoded, depth + 1))
        except InvalidCapability as exc:
            raise InvalidCapability(f"via hint: {exc}") from None
        # The nested URI was checked by its own parse; here only its encoding.
        # The long form stays readable where the compact one applies (URIs
        # written before the compact form existed), so this is no str(hint).
        if urllib.parse.quote(decoded, safe="") != value:  # the value holds a token: not shown
            raise InvalidCapability("via hint is not in canonical form (percent-encode the URI)")
        return hint
    if str(hint) != part:
        raise InvalidCapability(f"{key} hint is not in canonical form (expected '{hint}')")
    return hint


def _parse_tcp(text: str) -> TcpHint:
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise InvalidCapability("tcp hint: missing ']' after the IPv6 address")
        host, rest = text[1:end], text[end + 1 :]
        if ":" not in host:
            raise InvalidCapability("tcp hint: brackets are only for IPv6 addresses")
        if not rest.startswith(":"):
            raise InvalidCapability("tcp hint: expected ':PORT' after ']'")
        port_text = rest[1:]
    else:
        host, colon, port_text = text.rpartition(":")
        if not colon:
            raise InvalidCapability("tcp hint: missing ':PORT' (expected tcp=HOST:PORT)")
        if ":" in host:
            raise InvalidCapability("tcp hint: an IPv6 address must be in brackets")
    if not _PORT.fullmatch(port_text) or int(port_text) > 65535:
        raise InvalidCapability("tcp hint: port must be 1..65535 without leading zeros")
    canonical = _canonical_host(host)
    if canonical != host:
        raise InvalidCapability(f"tcp hint host is not in canonical form (expected {canonical})")
    return TcpHint(canonical, int(port_text))
