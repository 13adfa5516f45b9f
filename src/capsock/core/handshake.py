"""capsock's session handshake: Noise IK with node identities (DESIGN.md §4.2-4.3),
and the choice of the transport cipher.

Theory of operation
-------------------
Nodes are named by Ed25519 keys; Noise speaks X25519.  Both sides use the
standard libsodium conversion of their Ed25519 key pair as the Noise static
key.  The handshake is exactly ``Noise_IK_25519_ChaChaPoly_BLAKE2b`` with the
prologue ``capsock/1``:

1. The dialer (:class:`InitiatorHandshake`) knows the node id it dials, hence
   the responder's X25519 key, and sends IK message 1.  Its payload is the
   dialer's own 32-byte Ed25519 public key, followed by zero or more
   *extensions* (below): public, not authorising, safe to replay.
2. The responder (:class:`ResponderHandshake`) reads message 1, learns the
   dialer's *authenticated* X25519 static key from Noise, and checks that the
   Ed25519 key in the payload converts to it; otherwise the handshake fails
   with :class:`~capsock.errors.PeerAuthenticationError` before anything secret
   is sent.  A message from this very node (a reflection) is refused.  Then it
   parses the extensions.
3. The responder answers with message 2, whose payload is zero or more
   extensions.  When the dialer decrypts it, the responder has proved it holds
   the private key of the node id that was dialled.

Extensions (a capsock extension of DESIGN.md §4).  After the node id in
message 1, and as the whole payload of message 2, the payload is a sequence of
``type: u8 | length: u8 | value: length bytes``.  A sequence that ends inside
a header or a value is malformed (:class:`~capsock.errors.HandshakeError`).
Unknown types are ignored; a known type may appear at most once.  Two types
are defined: ``2``, the *dialled id* (below), and ``1``, the *transport
cipher*; cipher ids are ``0x01`` ChaChaPoly and ``0x02`` AESGCM (AES-256-GCM):

* In message 1, type 1 is the **offer**: one or more cipher ids, most
  preferred first.  A capsock dialer offers ``[0x02, 0x01]`` (value
  ``01 02 02 01`` with its header) when AES-256-GCM is available on its
  machine and allowed by its ``ciphers`` argument; otherwise it sends no
  offer, and its payload is the 32-byte node id (and the dialled id, if it
  sends one).  An empty offer is malformed.  Ids the responder does not know
  are skipped.
* In message 2, type 1 is the **choice**: exactly one cipher id (``01 01 id``).
  A responder that got an offer chooses the first offered id it supports and
  allows; if none, or if there was no offer, it sends an empty payload.  The
  dialer rejects (``HandshakeError``) a choice that was not in its offer, a
  choice when it made no offer, and a choice whose value is not one byte.
* No choice means ChaChaPoly: that is also what any plain Noise peer gets,
  whichever side it is on (it ignores or never sends the offer and sends an
  empty or extension-free payload), so interoperability with other Noise
  libraries is unchanged and byte for byte standard.  ChaChaPoly is therefore
  mandatory and cannot be disabled.

The **dialled id** (type 2, message 1 only): the 32-byte node id the dialer
dials, exactly as its URI spells it (value ``02 20 <id>``).  A capsock
node's dialer always sends it, after the offer (``dialled_id=True``, which
:func:`capsock.net.session.dial_handshake` passes).  The responder refuses (a
:class:`~capsock.errors.HandshakeError`, no answer) a dialled id that is not
exactly its own node id, and a value that is not 32 bytes.  What it
prevents: the Noise static key names an Ed25519 key only up to the sign of
x (the conversion keeps y), so without it a URI whose node id has the sign
bit flipped -- the id's *twin* -- reached the node as well, under a name
that is not the node's (``revoke()`` refused it, ``stream.peer`` showed it).
A dialer that sends no dialled id (a plain Noise dialer, an older capsock)
gets the old behaviour.  In message 2 the type is unknown (ignored).

Both payloads are encrypted and mixed into the handshake hash, so an on-path
attacker who alters, strips or truncates the offer, the choice or the dialled
id makes message decryption fail: the cipher cannot be downgraded.  Only the
transport phase changes: with AESGCM chosen, both sides key AES-256-GCM with the two
``Split()`` keys (nonce: 32 zero bits and the 64-bit counter big-endian, per
the Noise spec; ``REKEY`` per spec §4.2), otherwise ChaChaPoly as in plain Noise.

Both sides end with a :class:`HandshakeResult`: the peer's node id, the
handshake hash (channel binding), the transport cipher's name and a
:class:`~capsock.core.noise.TransportCipher`.  Like :mod:`capsock.core.noise`, this module
is sans-IO; the session moves the bytes, runs the timers, and speaks first as
the dialer once the handshake is done.

Message sizes (Noise messages, without the 2-byte record prefix): message 1 is
:data:`FIRST_MESSAGE_LEN` (128) bytes, plus :data:`CIPHER_OFFER_LEN` (4) with an
offer, plus :data:`DIALLED_ID_LEN` (34) with the dialled id (a capsock node
sends 162 or 166 bytes); message 2 is :data:`SECOND_MESSAGE_LEN` (48) bytes, plus
:data:`CIPHER_CHOICE_LEN` (3) with a choice: 51.

The other direction, the dialer's own id: its X25519 key fixes its Ed25519 key
only up to the same sign bit, so a dialer can present its own node id's twin
and still pass the check in step 2.  No proof can close this: whoever holds
the private key of an id also holds its twin's (the negated scalar), so a
signature would not tell the two apart either.  Only the holder can do it,
so no *other* node can be impersonated; and capsock treats the twin as the
same peer where it grants something to a peer id: a ``peer`` caveat naming
either spelling admits the holder of that key (:mod:`capsock.store`).
Dialing either spelling of one's own key is refused.

Records vs messages: ``first_record`` and ``second_record`` return whole
transport *records* (2-byte length prefix + Noise message); ``read_first`` and
``read_second`` take the Noise message without its prefix (as returned by
:class:`~capsock.core.records.RecordReader`).  ``first_message`` and
``second_message`` are the deprecated old names of the two record methods.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final

from ..errors import HandshakeError, LocalUsageError, PeerAuthenticationError
from ..keys import KeyPair, NodeId
from .noise import (
    AESGCM,
    CHACHAPOLY,
    CIPHER_NAMES,
    DHLEN,
    PROLOGUE,
    PROTOCOL_NAME,
    TAG_LEN,
    HandshakeDecryptError,
    HandshakeState,
    TransportCipher,
    available_ciphers,
)
from .records import frame_record

__all__ = [
    "CIPHER_CHOICE_LEN",
    "CIPHER_IDS",
    "CIPHER_OFFER_LEN",
    "DIALLED_ID_LEN",
    "EXT_DIALLED_ID",
    "EXT_TRANSPORT_CIPHER",
    "FIRST_MESSAGE_LEN",
    "SECOND_MESSAGE_LEN",
    "HandshakeResult",
    "InitiatorHandshake",
    "ResponderHandshake",
    "expected_first_message_len",
]

_NODE_ID_LEN: Final = 32

EXT_TRANSPORT_CIPHER: Final = 0x01
"""Extension type: transport cipher (offer in message 1, choice in message 2)."""
EXT_DIALLED_ID: Final = 0x02
"""Extension type: the node id the dialer dials, exactly as spelled (message 1)."""
_FIRST_EXTENSIONS: Final = frozenset((EXT_TRANSPORT_CIPHER, EXT_DIALLED_ID))
_SECOND_EXTENSIONS: Final = frozenset((EXT_TRANSPORT_CIPHER,))
CIPHER_IDS: Final[dict[str, int]] = {CHACHAPOLY: 0x01, AESGCM: 0x02}
"""Wire ids of the transport ciphers."""
_CIPHER_BY_ID: Final = {v: k for k, v in CIPHER_IDS.items()}

FIRST_MESSAGE_LEN: Final = DHLEN + (DHLEN + TAG_LEN) + (_NODE_ID_LEN + TAG_LEN)
"""Length (128) of IK message 1 without extensions (without the record prefix).

The shortest valid message 1; a dialer without an offer sends exactly this.
Longer messages are valid (extensions after the node id), shorter ones never."""
CIPHER_OFFER_LEN: Final = 2 + len(CIPHER_IDS)
"""Bytes (4) the transport-cipher offer adds to message 1: ``01 02 02 01``."""
DIALLED_ID_LEN: Final = 2 + _NODE_ID_LEN
"""Bytes (34) the dialled id adds to message 1: ``02 20`` and the 32-byte id."""
SECOND_MESSAGE_LEN: Final = DHLEN + TAG_LEN
"""Length (48) of IK message 2 with an empty payload (no choice: ChaChaPoly)."""
CIPHER_CHOICE_LEN: Final = 3
"""Bytes (3) the transport-cipher choice adds to message 2: ``01 01 id``."""


def expected_first_message_len(extension_len: int = 0) -> int:
    """Length of IK message 1 whose payload is a node id plus ``extension_len`` bytes.

    With the default this is :data:`FIRST_MESSAGE_LEN`, the minimum a session
    should accept before handing the message to :meth:`ResponderHandshake.read_first`;
    a dialer that offers AESGCM sends ``expected_first_message_len(CIPHER_OFFER_LEN)``.
    """
    return FIRST_MESSAGE_LEN + extension_len


def _allowed_ciphers(ciphers: Iterable[str] | None) -> tuple[str, ...]:
    """The usable cipher names among ``ciphers``, in capsock's preference order.

    Raises:
        LocalUsageError: an unknown name, or ChaChaPoly missing (it is mandatory).
    """
    available = available_ciphers()
    if ciphers is None:
        return available
    if isinstance(ciphers, str | bytes):
        raise LocalUsageError("ciphers is a sequence of names, e.g. ['ChaChaPoly']")
    names = set(ciphers)
    unknown = names.difference(CIPHER_NAMES)
    if unknown:
        raise LocalUsageError(
            f"unknown cipher name(s) {sorted(map(repr, unknown))}; known: "
            + ", ".join(CIPHER_NAMES)
        )
    if CHACHAPOLY not in names:
        raise LocalUsageError(
            "ChaChaPoly cannot be disabled: it is what every plain Noise peer speaks"
        )
    return tuple(name for name in available if name in names)


def _parse_extensions(data: bytes, where: str, known: frozenset[int]) -> dict[int, bytes]:
    """The ``known`` extensions in ``data`` (``type | length | value``, repeated).

    Raises:
        HandshakeError: the encoding is truncated, or a known type repeats.
    """
    found: dict[int, bytes] = {}
    offset, end = 0, len(data)
    while offset < end:
        if end - offset < 2:
            raise HandshakeError(f"{where}: truncated extension header")
        kind, length = data[offset], data[offset + 1]
        start, offset = offset + 2, offset + 2 + length
        if offset > end:
            raise HandshakeError(
                f"{where}: extension {kind} announces {length} bytes, {end - start} remain"
            )
        if kind in known:
            if kind in found:
                raise HandshakeError(f"{where}: extension {kind} appears twice")
            found[kind] = data[start:offset]
    return found


@dataclass(frozen=True, slots=True)
class HandshakeResult:
    """The outcome of a completed handshake, oriented for one side.

    ``repr()`` shows the peer and the side only; no key material is reachable
    through it.
    """

    peer: NodeId
    """The authenticated node id of the other side."""
    handshake_hash: bytes = field(repr=False)
    """The Noise handshake hash, equal on both sides (channel binding; public)."""
    cipher: TransportCipher = field(repr=False)
    """Transport encryption: sends to and receives from ``peer``."""
    is_initiator: bool
    """Whether this side dialled."""

    @property
    def cipher_name(self) -> str:
        """The negotiated transport cipher: ``"ChaChaPoly"`` or ``"AESGCM"``."""
        return self.cipher.cipher_name


class InitiatorHandshake:
    """The dialer's side: knows whom it dials.

    Args:
        local: this node's key pair.
        remote: the node id being dialled (from the capability URI).
        ephemeral: a fixed X25519 ephemeral private key, for tests only.
        ciphers: the transport cipher names to allow (default: every one
            available here).  ``"ChaChaPoly"`` must be among them; AESGCM is
            offered only if listed and available.  The order is ignored
            (capsock's preference order is used).
        dialled_id: send the dialled-id extension (``remote`` exactly), so
            that a responder refuses the handshake unless ``remote`` is its
            own id -- not its twin.  capsock's sessions always send it
            (:func:`capsock.net.session.dial_handshake`); the default leaves
            message 1 as plain as before (its golden sizes and vectors).

    Raises:
        LocalUsageError: ``remote`` is this node itself, or ``ciphers`` is invalid.
        PeerAuthenticationError: ``remote`` is not a valid Ed25519 public key.
    """

    __slots__ = (
        "_dialled_id",
        "_local",
        "_noise",
        "_offer",
        "_read",
        "_remote",
        "_result",
        "_sent",
    )

    def __init__(
        self,
        local: KeyPair,
        remote: NodeId,
        *,
        ephemeral: bytes | None = None,
        ciphers: Iterable[str] | None = None,
        dialled_id: bool = False,
    ) -> None:
        allowed = _allowed_ciphers(ciphers)
        remote_x25519 = remote.x25519()  # PeerAuthenticationError if invalid
        if remote == local.node_id or hmac.compare_digest(remote_x25519, local.x25519_public):
            raise LocalUsageError(
                f"refusing to dial this node's own id {remote.short()}...; "
                "a node cannot open a session to itself"
            )
        self._local = local
        self._remote = remote
        self._dialled_id = dialled_id
        # Offer only when there is a choice to make (ChaChaPoly is the default).
        self._offer: tuple[str, ...] = allowed if allowed != (CHACHAPOLY,) else ()
        self._noise = HandshakeState(
            PROTOCOL_NAME,
            True,
            PROLOGUE,
            s=local.x25519_private,
            e=ephemeral,
            rs=remote_x25519,
        )
        self._sent = False
        self._read = False
        self._result: HandshakeResult | None = None

    @property
    def remote(self) -> NodeId:
        """The node id being dialled."""
        return self._remote

    @property
    def offered_ciphers(self) -> tuple[str, ...]:
        """The transport ciphers message 1 offers, most preferred first (empty: no offer)."""
        return self._offer

    def first_record(self) -> bytes:
        """The first record: length prefix + IK message 1 (payload: our node id,
        then the transport-cipher offer if there is one, then the dialled id).

        Raises:
            LocalUsageError: called twice.
        """
        if self._sent:
            raise LocalUsageError("the first handshake message was already produced")
        self._sent = True
        payload = self._local.node_id.raw
        if self._offer:
            ids = bytes(CIPHER_IDS[name] for name in self._offer)
            payload += bytes((EXT_TRANSPORT_CIPHER, len(ids))) + ids
        if self._dialled_id:
            payload += bytes((EXT_DIALLED_ID, _NODE_ID_LEN)) + self._remote.raw
        return frame_record(self._noise.write_message(payload))

    first_message = first_record
    """Deprecated name of :meth:`first_record`: it returns a record, not a message."""

    def read_second(self, message: bytes) -> HandshakeResult:
        """Process IK message 2 (without its length prefix) and finish.

        Raises:
            PeerAuthenticationError: the answering node did not prove it holds
                the key of the dialled node id.
            HandshakeError: the message is malformed (size, invalid ephemeral
                key, extension encoding), or chose a cipher that was not offered.
            LocalUsageError: called before :meth:`first_record`, or again.
        """
        if not self._sent:
            raise LocalUsageError("send the first handshake message before reading the second")
        if self._read:
            raise LocalUsageError("read_second() was already called on this handshake")
        self._read = True
        try:
            payload = self._noise.read_message(message)
        except HandshakeDecryptError:
            raise PeerAuthenticationError(
                f"the node that answered did not prove it holds the key of "
                f"{self._remote.short()}...; the route may lead to a different node "
                "(or the message was corrupted)"
            ) from None
        cipher = self._chosen_cipher(payload)
        self._result = HandshakeResult(
            peer=self._remote,
            handshake_hash=self._noise.handshake_hash,
            cipher=TransportCipher.from_handshake(self._noise, cipher),
            is_initiator=True,
        )
        return self._result

    def _chosen_cipher(self, payload: bytes) -> str:
        where = "second handshake message"
        choice = _parse_extensions(payload, where, _SECOND_EXTENSIONS).get(EXT_TRANSPORT_CIPHER)
        if choice is None:
            return CHACHAPOLY  # plain Noise responder, or nothing better to offer
        if not self._offer:
            raise HandshakeError(f"{where}: the responder chose a cipher, but none was offered")
        if len(choice) != 1:
            raise HandshakeError(f"{where}: a cipher choice is one id, got {len(choice)} bytes")
        name = _CIPHER_BY_ID.get(choice[0])
        if name is None or name not in self._offer:
            raise HandshakeError(
                f"{where}: the responder chose cipher id {choice[0]:#04x}, which was not offered"
            )
        return name

    def __repr__(self) -> str:
        return f"InitiatorHandshake(remote={self._remote!r}, done={self._result is not None})"


class ResponderHandshake:
    """The listening side: learns who dials.

    Args:
        local: this node's key pair.
        ciphers: the transport cipher names to allow (default: every one
            available here); ``"ChaChaPoly"`` must be among them.

    Raises:
        LocalUsageError: ``ciphers`` is invalid.
    """

    __slots__ = ("_allowed", "_choice", "_local", "_noise", "_peer", "_read", "_result")

    def __init__(self, local: KeyPair, *, ciphers: Iterable[str] | None = None) -> None:
        self._allowed = _allowed_ciphers(ciphers)
        self._local = local
        self._noise = HandshakeState(PROTOCOL_NAME, False, PROLOGUE, s=local.x25519_private)
        self._read = False
        self._peer: NodeId | None = None
        self._choice: str | None = None
        self._result: HandshakeResult | None = None

    def read_first(self, message: bytes) -> NodeId:
        """Process IK message 1 (without its length prefix); return the dialer's id.

        Raises:
            HandshakeError: the message is malformed, not addressed to this node's
                key, carries an invalid or low-order key, has a payload shorter
                than a node id or malformed extensions, comes from this very
                node (reflection), or dials another id than this node's (its
                twin: the sign bit flipped).
            PeerAuthenticationError: the node id in the payload is not the key
                the dialer authenticated with.
            LocalUsageError: called twice (also after a failure).
        """
        if self._read:
            raise LocalUsageError("read_first() was already called on this handshake")
        self._read = True
        try:
            payload = self._noise.read_message(message)
        except HandshakeDecryptError:
            raise HandshakeError(
                "first handshake message failed authentication: it was not made for "
                "this node's key, or it was corrupted"
            ) from None
        if len(payload) < _NODE_ID_LEN:
            raise HandshakeError(
                f"first handshake payload is {len(payload)} bytes; it must start with "
                f"the dialer's {_NODE_ID_LEN}-byte node id"
            )
        static = self._noise.remote_static
        assert static is not None  # IK message 1 always carries it
        claimed = NodeId(payload[:_NODE_ID_LEN])
        if claimed == self._local.node_id or hmac.compare_digest(static, self._local.x25519_public):
            raise HandshakeError(
                "first handshake message came from this node itself (reflected "
                "connection); refusing a session with itself"
            )
        if not hmac.compare_digest(claimed.x25519(), static):
            raise PeerAuthenticationError(
                f"the dialer claims to be {claimed.short()}... but authenticated with a "
                "different key; refusing the session"
            )
        extensions = _parse_extensions(
            payload[_NODE_ID_LEN:], "first handshake message", _FIRST_EXTENSIONS
        )
        self._check_dialled(extensions.get(EXT_DIALLED_ID))
        self._choice = self._choose(extensions.get(EXT_TRANSPORT_CIPHER))
        self._peer = claimed
        return claimed

    def _check_dialled(self, dialled: bytes | None) -> None:
        """Refuse a dialer that dials another spelling of this node's key."""
        if dialled is None:
            return  # a plain Noise dialer (or an older capsock): nothing to check
        if len(dialled) != _NODE_ID_LEN:
            raise HandshakeError(
                f"first handshake message: a dialled id is {_NODE_ID_LEN} bytes, got {len(dialled)}"
            )
        own = self._local.node_id.raw
        if dialled != own:
            twin = dialled == self._local.node_id.twin().raw
            raise HandshakeError(
                "the dialer dialled "
                + (
                    "this node's id with the sign bit flipped (its twin, which converts to "
                    "the same X25519 key); the URI it used was altered"
                    if twin
                    else "another node id that converts to this node's X25519 key"
                )
                + f": only {self._local.node_id.short()}... reaches this node; refusing"
            )

    def _choose(self, offer: bytes | None) -> str | None:
        where = "first handshake message"
        if offer is None:
            return None
        if not offer:
            raise HandshakeError(f"{where}: an empty transport cipher offer")
        for cipher_id in offer:
            name = _CIPHER_BY_ID.get(cipher_id)
            if name is not None and name in self._allowed:
                return name
        return None  # nothing in common: the empty answer means ChaChaPoly

    def second_record(self) -> tuple[bytes, HandshakeResult]:
        """The answering record (length prefix + IK message 2) and the result.

        Raises:
            LocalUsageError: :meth:`read_first` has not succeeded, or called twice.
        """
        if self._peer is None:
            raise LocalUsageError("read a valid first handshake message first")
        if self._result is not None:
            raise LocalUsageError("the second handshake message was already produced")
        choice = self._choice
        payload = b""
        if choice is not None:
            payload = bytes((EXT_TRANSPORT_CIPHER, 1, CIPHER_IDS[choice]))
        record = frame_record(self._noise.write_message(payload))
        self._result = HandshakeResult(
            peer=self._peer,
            handshake_hash=self._noise.handshake_hash,
            cipher=TransportCipher.from_handshake(self._noise, choice or CHACHAPOLY),
            is_initiator=False,
        )
        return record, self._result

    second_message = second_record
    """Deprecated name of :meth:`second_record`: it returns a record, not a message."""

    def __repr__(self) -> str:
        return f"ResponderHandshake(peer={self._peer!r}, done={self._result is not None})"
