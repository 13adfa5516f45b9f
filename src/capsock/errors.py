"""The whole capsock error hierarchy, and the error codes carried on the wire.

Every exception capsock raises on purpose derives from :class:`CapsockError`.
The split follows h2: :class:`LocalUsageError` is *your* program misusing the
API, :class:`ProtocolError` is the *remote* side misbehaving, and the other
classes describe outcomes (a capability refused, a peer that is not who the URI
says, no route that worked).

At the stream boundary (:mod:`capsock.net.stream`) errors additionally derive from
anyio's stream exceptions, so generic anyio code that catches
``anyio.BrokenResourceError`` keeps working.  This module itself stays free of
anyio so the sans-IO core can import it.

No message built here ever contains a capability token or key material.
"""

from __future__ import annotations

import errno
from enum import IntEnum
from typing import ClassVar

__all__ = [
    "CapabilityRejected",
    "CapsockError",
    "ConnectionLost",
    "DirectMessageError",
    "ErrorCode",
    "HandshakeDecryptError",
    "HandshakeError",
    "InvalidCapability",
    "LocalUsageError",
    "NotAnOffer",
    "PathAuthError",
    "PathLost",
    "PathSwitchError",
    "PeerAuthenticationError",
    "ProtocolError",
    "PunchFailed",
    "ResourceLimitExceeded",
    "StreamReset",
    "TransferDeclined",
    "TransferError",
    "TransferIntegrityError",
    "Unreachable",
    "UnsafeTarget",
]


class ErrorCode(IntEnum):
    """Codes carried in REJECT, RESET and GOAWAY frames (16 bits on the wire)."""

    NO_ERROR = 0
    """Graceful: nothing went wrong."""
    PROTOCOL_ERROR = 1
    """The peer broke the protocol."""
    INTERNAL_ERROR = 2
    """The sender hit a bug or an unexpected condition."""
    FLOW_CONTROL_ERROR = 3
    """The peer sent more than the credit it was granted."""
    REFUSED = 4
    """The capability was refused.  Deliberately uniform: unknown root, bad tag,
    expired, used up, wrong peer and revoked all use this one code."""
    CANCELLED = 5
    """The application closed the stream before finishing it."""
    BUSY = 6
    """The endpoint is valid but cannot take more streams right now."""
    LIMIT_EXCEEDED = 7
    """A configured limit (streams, frame size, pending opens) was exceeded."""
    SHUTTING_DOWN = 8
    """The node is going away (GOAWAY)."""
    TIMEOUT = 9
    """A timer ran out (handshake, keepalive, open)."""
    UNAVAILABLE = 10
    """The endpoint took the stream, but the service it stands for could not be
    reached (``share``'s target refused the connection or is down).  Peers that
    predate this code read it as INTERNAL_ERROR."""

    @classmethod
    def from_wire(cls, value: int) -> ErrorCode:
        """Map a received code to the enum; unknown codes become INTERNAL_ERROR."""
        try:
            return cls(value)
        except ValueError:
            return cls.INTERNAL_ERROR


class CapsockError(Exception):
    """Base class of every error capsock raises on purpose.

    Classes whose outcome travels on the wire carry their code: ``wire_code``
    on the class is the default, ``code`` on an instance the one it carries.
    """

    wire_code: ClassVar[ErrorCode | None] = None
    """The code this kind of error travels with in REJECT, RESET or GOAWAY (if any)."""


class LocalUsageError(CapsockError):
    """The calling program used the API wrongly (closed object, bad argument)."""


class InvalidCapability(CapsockError, ValueError):
    """A capability URI or token is malformed.

    The message says which part is wrong; it never repeats the token.
    """


class CapabilityRejected(CapsockError):
    """The endpoint refused a well-formed capability, or did not take the stream.

    ``code`` tells which: ``REFUSED`` means the capability was refused, and the
    reason is deliberately not disclosed by the endpoint (unknown, forged,
    expired, used up, wrong peer and revoked all look the same on the wire);
    ``BUSY`` (a full listener) and ``SHUTTING_DOWN`` (the session went away
    before answering) are passing conditions, safe to retry.
    """

    wire_code: ClassVar[ErrorCode | None] = ErrorCode.REFUSED

    def __init__(self, message: str, code: ErrorCode | None = None) -> None:
        super().__init__(message)
        self.code: ErrorCode = code if code is not None else ErrorCode.REFUSED


class PeerAuthenticationError(CapsockError):
    """The remote node could not prove it holds the key named in the capability."""


class Unreachable(CapsockError):
    """No route to the node worked; ``attempts`` lists each route and why it failed."""

    def __init__(self, message: str, attempts: tuple[tuple[str, str], ...] = ()) -> None:
        if attempts:
            message += "; tried: " + "; ".join(f"{route}: {why}" for route, why in attempts)
        super().__init__(message)
        self.attempts = attempts


class ProtocolError(CapsockError):
    """The remote side broke the capsock protocol; the session is closed.

    ``code`` is what the GOAWAY that ends the session carries (the class's
    ``wire_code`` unless the raiser named another, e.g. ``FLOW_CONTROL_ERROR``).
    """

    wire_code: ClassVar[ErrorCode | None] = ErrorCode.PROTOCOL_ERROR

    def __init__(self, message: str, code: ErrorCode | None = None) -> None:
        super().__init__(message)
        default = type(self).wire_code
        self.code: ErrorCode = code if code is not None else (default or ErrorCode.PROTOCOL_ERROR)


class HandshakeError(ProtocolError):
    """The Noise handshake failed: malformed, truncated, or not authentic."""


class HandshakeDecryptError(HandshakeError):
    """A handshake message failed AEAD authentication.

    A separate class so that :mod:`capsock.core.handshake` can tell "the peer does
    not hold the key" (an authentication failure) from "malformed message".
    Also importable from :mod:`capsock.core.noise`.
    """


class ResourceLimitExceeded(ProtocolError):
    """The remote side exceeded a configured limit (denial-of-service guard)."""

    wire_code: ClassVar[ErrorCode | None] = ErrorCode.LIMIT_EXCEEDED

    def __init__(self, message: str) -> None:
        super().__init__(message)


class StreamReset(CapsockError):
    """The stream was reset by the peer or by the session ending; ``code`` says why."""

    wire_code: ClassVar[ErrorCode | None] = ErrorCode.INTERNAL_ERROR

    def __init__(self, message: str, code: ErrorCode | None = None) -> None:
        super().__init__(message)
        self.code: ErrorCode = code if code is not None else ErrorCode.INTERNAL_ERROR


class ConnectionLost(StreamReset):
    """The session carrying the stream ended without an authenticated EOF."""


class DirectMessageError(ProtocolError):
    """A coordination message was malformed (the reason says which field)."""


class PunchFailed(OSError):
    """No candidate connected in any attempt; ``errors`` has the last error per candidate."""

    def __init__(self, errors: dict[tuple[str, int], str], attempts: int) -> None:
        self.errors = dict(errors)
        self.attempts = attempts
        tried = "; ".join(f"{h}:{p}: {e}" for (h, p), e in self.errors.items()) or "none"
        super().__init__(
            errno.ETIMEDOUT,
            f"no direct path after {attempts} attempt(s) (candidates tried: {tried}); "
            "the session stays on its relay",
        )


class PathSwitchError(ProtocolError):
    """The peer broke the path-switch rules (protocol.md section 13): a
    malformed ``path/`` record or lane header, an ACK of records never sent.
    The session ends."""


class PathAuthError(CapsockError):
    """A new path failed the attach exchange (protocol.md 13.3): not the
    session's peer, a replay, another session.  Only that connection is closed;
    the session is untouched."""


class PathLost(CapsockError):
    """Every path of the session died, or records that only a dead path held
    cannot be sent again: the session ends (its streams fail), nothing is
    silently lost."""


# ------------------------------------------------------------------ file transfer


class TransferError(CapsockError):
    """A file or directory transfer failed; the message says why and what to do."""


class TransferDeclined(TransferError):
    """The offer was declined, by this side or by the other.

    ``remote`` is the reason the sender is (or was) told: it never carries a
    local path or user name.  ``retry`` is True when the receiver said it will
    come back once its side is fixed (the target exists, a directory to
    stdout, ...): a sender that offered ``retry_ok`` does not count it as a use.
    """

    def __init__(self, message: str, remote: str = "", *, retry: bool = False) -> None:
        super().__init__(message)
        self.remote = remote or message
        self.retry = retry


class UnsafeTarget(TransferError):
    """Something other than the receiver's own, single-linked regular file (or
    directory) is where it writes: a planted link, another user's file, a FIFO...

    ``str()`` names the local path (for this user); :attr:`remote` is what the
    other side may be told (no local path)."""

    remote = "the receiver cannot write the file there safely"


class TransferIntegrityError(TransferError):
    """The received data failed its end-to-end SHA-256 check (it was removed)."""


class NotAnOffer(TransferError):
    """The other side does not speak ``capsock-send/1``: not a ``send`` capability."""


class HandedOver(Exception):
    """Internal, never raised to users: :func:`capsock.net.session.accept_handshake`
    found no handshake but a splice hello, and its ``hello`` hook took the
    connection (protocol 10.10).  Not a :class:`CapsockError`: nothing failed."""
