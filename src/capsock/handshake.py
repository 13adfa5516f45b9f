"""capsock's session handshake: Noise IK with node identities (DESIGN.md §4.2-4.3).

Theory of operation
-------------------
Nodes are named by Ed25519 keys; Noise speaks X25519.  Both sides use the
standard libsodium conversion of their Ed25519 key pair as the Noise static
key, with the prologue ``capsock/1``:

1. The dialer (:class:`InitiatorHandshake`) knows the node id it dials, hence
   the responder's X25519 key, and sends IK message 1.  Its payload is exactly
   the dialer's own 32-byte Ed25519 public key: public, not authorising, safe
   to replay.  Bytes after those 32 are reserved and ignored.
2. The responder (:class:`ResponderHandshake`) reads message 1, learns the
   dialer's *authenticated* X25519 static key from Noise, and checks that the
   Ed25519 key in the payload converts to it; otherwise the handshake fails
   with :class:`~capsock.errors.PeerAuthenticationError` before anything secret
   is sent.  A message from this very node (a reflection) is refused.
3. The responder answers with message 2 (empty payload, reserved for
   extensions).  When the dialer decrypts it, the responder has proved it holds
   the private key of the node id that was dialled.

Both sides end with a :class:`HandshakeResult`: the peer's node id, the
handshake hash (channel binding) and a :class:`~capsock.noise.TransportCipher`.
Like :mod:`capsock.noise`, this module is sans-IO; the session moves the bytes,
runs the timers, and speaks first as the dialer once the handshake is done.

Known limitation: an X25519 public key names an Ed25519 key only up to the
sign of its x coordinate (the top bit of the encoded key), because the
conversion keeps only the y coordinate.  A dialer can therefore present its own
node id with that bit flipped and still pass the check in step 2.  Only the
holder of the key can do so, so no *other* node can be impersonated; closing
the gap would need an Ed25519 proof (e.g. a signature over the handshake hash).
Dialing either spelling of one's own key is refused.

Records vs messages: ``first_message`` and ``second_message`` return whole
transport *records* (2-byte length prefix + Noise message); ``read_first`` and
``read_second`` take the Noise message without its prefix (as returned by
:class:`~capsock.noise.RecordReader`).
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field
from typing import Final

from .errors import HandshakeError, LocalUsageError, PeerAuthenticationError
from .keys import KeyPair, NodeId
from .noise import (
    DHLEN,
    PROLOGUE,
    PROTOCOL_NAME,
    TAG_LEN,
    HandshakeDecryptError,
    HandshakeState,
    TransportCipher,
)

__all__ = [
    "FIRST_MESSAGE_LEN",
    "SECOND_MESSAGE_LEN",
    "HandshakeResult",
    "InitiatorHandshake",
    "ResponderHandshake",
    "expected_first_message_len",
]

_NODE_ID_LEN: Final = 32

FIRST_MESSAGE_LEN: Final = DHLEN + (DHLEN + TAG_LEN) + (_NODE_ID_LEN + TAG_LEN)
"""Length (128) of the IK message 1 this version sends (without the record prefix).

Longer messages are valid (extension bytes after the node id), shorter ones never."""
SECOND_MESSAGE_LEN: Final = DHLEN + TAG_LEN
"""Length (48) of the IK message 2 this version sends; longer ones are valid."""


def expected_first_message_len(extension_len: int = 0) -> int:
    """Length of IK message 1 whose payload is a node id plus ``extension_len`` bytes.

    With the default this is :data:`FIRST_MESSAGE_LEN`, the minimum a session
    should accept before handing the message to :meth:`ResponderHandshake.read_first`.
    """
    return FIRST_MESSAGE_LEN + extension_len


def _record(message: bytes) -> bytes:
    return len(message).to_bytes(2, "big") + message


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


class InitiatorHandshake:
    """The dialer's side: knows whom it dials.

    Args:
        local: this node's key pair.
        remote: the node id being dialled (from the capability URI).
        ephemeral: a fixed X25519 ephemeral private key, for tests only.

    Raises:
        LocalUsageError: ``remote`` is this node itself.
        PeerAuthenticationError: ``remote`` is not a valid Ed25519 public key.
    """

    __slots__ = ("_local", "_noise", "_remote", "_result", "_sent")

    def __init__(self, local: KeyPair, remote: NodeId, *, ephemeral: bytes | None = None) -> None:
        remote_x25519 = remote.x25519()  # PeerAuthenticationError if invalid
        if remote == local.node_id or hmac.compare_digest(remote_x25519, local.x25519_public):
            raise LocalUsageError(
                f"refusing to dial this node's own id {remote.short()}...; "
                "a node cannot open a session to itself"
            )
        self._local = local
        self._remote = remote
        self._noise = HandshakeState(
            PROTOCOL_NAME,
            True,
            PROLOGUE,
            s=local.x25519_private,
            e=ephemeral,
            rs=remote_x25519,
        )
        self._sent = False
        self._result: HandshakeResult | None = None

    @property
    def remote(self) -> NodeId:
        """The node id being dialled."""
        return self._remote

    def first_message(self) -> bytes:
        """The first record: length prefix + IK message 1 (payload: our node id).

        Raises:
            LocalUsageError: called twice.
        """
        if self._sent:
            raise LocalUsageError("the first handshake message was already produced")
        self._sent = True
        return _record(self._noise.write_message(self._local.node_id.raw))

    def read_second(self, message: bytes) -> HandshakeResult:
        """Process IK message 2 (without its length prefix) and finish.

        Raises:
            PeerAuthenticationError: the answering node did not prove it holds
                the key of the dialled node id.
            HandshakeError: the message is malformed (size, invalid ephemeral key).
            LocalUsageError: called before :meth:`first_message`, or again.
        """
        if not self._sent:
            raise LocalUsageError("send the first handshake message before reading the second")
        if self._result is not None:
            raise LocalUsageError("the handshake is already complete")
        try:
            self._noise.read_message(message)
        except HandshakeDecryptError:
            raise PeerAuthenticationError(
                f"the node that answered did not prove it holds the key of "
                f"{self._remote.short()}...; the route may lead to a different node "
                "(or the message was corrupted)"
            ) from None
        self._result = HandshakeResult(
            peer=self._remote,
            handshake_hash=self._noise.handshake_hash,
            cipher=TransportCipher.from_handshake(self._noise),
            is_initiator=True,
        )
        return self._result

    def __repr__(self) -> str:
        return f"InitiatorHandshake(remote={self._remote!r}, done={self._result is not None})"


class ResponderHandshake:
    """The listening side: learns who dials.

    Args:
        local: this node's key pair.
    """

    __slots__ = ("_local", "_noise", "_peer", "_read", "_result")

    def __init__(self, local: KeyPair) -> None:
        self._local = local
        self._noise = HandshakeState(PROTOCOL_NAME, False, PROLOGUE, s=local.x25519_private)
        self._read = False
        self._peer: NodeId | None = None
        self._result: HandshakeResult | None = None

    def read_first(self, message: bytes) -> NodeId:
        """Process IK message 1 (without its length prefix); return the dialer's id.

        Raises:
            HandshakeError: the message is malformed, not addressed to this node's
                key, carries an invalid or low-order key, has a payload shorter
                than a node id, or comes from this very node (reflection).
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
        self._peer = claimed
        return claimed

    def second_message(self) -> tuple[bytes, HandshakeResult]:
        """The answering record (length prefix + IK message 2) and the result.

        Raises:
            LocalUsageError: :meth:`read_first` has not succeeded, or called twice.
        """
        if self._peer is None:
            raise LocalUsageError("read a valid first handshake message first")
        if self._result is not None:
            raise LocalUsageError("the second handshake message was already produced")
        record = _record(self._noise.write_message(b""))
        self._result = HandshakeResult(
            peer=self._peer,
            handshake_hash=self._noise.handshake_hash,
            cipher=TransportCipher.from_handshake(self._noise),
            is_initiator=False,
        )
        return record, self._result

    def __repr__(self) -> str:
        return f"ResponderHandshake(peer={self._peer!r}, done={self._result is not None})"
