"""Node identities: Ed25519 key pairs, their 52-character text form, key files.

A :class:`NodeId` is the 32-byte Ed25519 public key of a node.  Its text form is
RFC 4648 base32, lower case, without padding (52 characters).  The X25519 keys
used by the Noise handshake are the standard libsodium conversion of the
Ed25519 keys (``crypto_sign_ed25519_pk_to_curve25519`` and friends).

One key, one id.  An Ed25519 key is encoded as its point's y coordinate and
the sign of x (the top bit of the last byte).  Only canonical encodings are
node ids: ``y < 2**255 - 19``, and no sign for ``x = 0``; parsing refuses
the rest.  The X25519 conversion keeps only y, so an id and its *twin* (the
same bytes with the sign bit flipped, :meth:`NodeId.twin`) convert to the
same X25519 key.  The twin is not the node's id: a dialer names the id it
dials in the handshake and the node refuses its twin (docs/protocol.md 3.2).
"""

from __future__ import annotations

import base64
import errno
import functools
import os
import secrets
import stat
from dataclasses import dataclass, field
from pathlib import Path

import nacl.bindings
import nacl.exceptions
import nacl.signing

from .errors import InvalidCapability, LocalUsageError, PeerAuthenticationError

__all__ = ["KeyPair", "NodeId"]

NODE_ID_LEN = 32
NODE_ID_TEXT_LEN = 52
_KEY_FILE_HEADER = "capsock-node-key-v1\n"
_B32_ALPHABET = frozenset("abcdefghijklmnopqrstuvwxyz234567")
_P = 2**255 - 19
_SIGN = 0x80  # in the last byte: the sign of x


def _noncanonical(raw: bytes) -> str | None:
    """Why ``raw`` is not the canonical encoding of a point (y, sign of x), or ``None``.

    The same point has at most one canonical encoding; the others either
    carry an unreduced y (``y >= p``: 19 values of y have a second spelling)
    or a sign for ``x = 0`` (the points with ``y = 1`` and ``y = p - 1``).
    """
    y = int.from_bytes(raw, "little") & ((1 << 255) - 1)
    if y >= _P:
        return "its y coordinate is not reduced modulo 2**255 - 19"
    if raw[31] & _SIGN and y in (1, _P - 1):
        return "it gives a sign to x = 0"
    return None


@functools.lru_cache(maxsize=1024)
def _base32(raw: bytes) -> str:
    """Lower-case unpadded base32 of a public key (cached: ids of peers recur)."""
    return base64.b32encode(raw).decode("ascii").rstrip("=").lower()


@dataclass(frozen=True, slots=True)
class NodeId:
    """A node's identity: its Ed25519 public key (public, not a secret)."""

    raw: bytes
    """The 32 raw bytes of the Ed25519 public key."""

    def __post_init__(self) -> None:
        if not isinstance(self.raw, bytes) or len(self.raw) != NODE_ID_LEN:
            raise InvalidCapability("a node id is exactly 32 bytes")

    @classmethod
    def parse(cls, text: str) -> NodeId:
        """Parse the 52-character base32 text form.

        Raises:
            InvalidCapability: the text is not a canonical node id.
        """
        if not isinstance(text, str) or len(text) != NODE_ID_TEXT_LEN:
            raise InvalidCapability(
                f"a node id is {NODE_ID_TEXT_LEN} base32 characters "
                f"(got {len(text) if isinstance(text, str) else type(text).__name__})"
            )
        if not set(text) <= _B32_ALPHABET:
            raise InvalidCapability("a node id uses only lower-case base32 (a-z, 2-7)")
        raw = base64.b32decode(text.upper() + "====")
        node = cls(raw)
        if str(node) != text:  # the last character carries 4 unused bits
            raise InvalidCapability("node id is not in canonical form (non-zero trailing bits)")
        return node.checked()

    def checked(self) -> NodeId:
        """This id, if its bytes are a canonical point encoding (see the module docstring).

        For ids that arrive as bytes (caveats in a token); :meth:`parse` checks text.

        Raises:
            InvalidCapability: not a canonical encoding; no node has this id.
        """
        reason = _noncanonical(self.raw)
        if reason is not None:
            raise InvalidCapability(
                f"node id is not a canonical Ed25519 key encoding ({reason}); "
                "no node has this id: the URI is damaged or forged"
            )
        return self

    def twin(self) -> NodeId:
        """The same bytes with the sign bit of x flipped: another Ed25519 key that
        converts to the same X25519 key.  Only the holder of this id's private
        key can use it; it is never this node's id (see the module docstring)."""
        return NodeId(self.raw[:31] + bytes([self.raw[31] ^ _SIGN]))

    def x25519(self) -> bytes:
        """The X25519 public key for Noise (libsodium's Ed25519 -> X25519 conversion).

        Raises:
            PeerAuthenticationError: the bytes are not a valid Ed25519 point, or
                not its canonical encoding.
        """
        if _noncanonical(self.raw) is not None:
            raise PeerAuthenticationError(
                f"node id {self.short()} is not a canonical Ed25519 key encoding; no node "
                "has it: the URI (or the peer's handshake) is damaged or forged"
            )
        try:
            return bytes(nacl.bindings.crypto_sign_ed25519_pk_to_curve25519(self.raw))
        except (nacl.exceptions.CryptoError, ValueError, RuntimeError) as exc:
            raise PeerAuthenticationError(
                f"node id {self.short()} is not a valid Ed25519 public key; the URI "
                "is damaged (a changed character?): copy the whole URI again"
            ) from exc

    def short(self) -> str:
        """A short prefix for logs and messages (public, like the whole id)."""
        return str(self)[:12]

    def __str__(self) -> str:
        return _base32(self.raw)

    def __repr__(self) -> str:
        return f"NodeId({str(self)!r})"


@dataclass(frozen=True, slots=True)
class KeyPair:
    """A node's Ed25519 key pair.  ``repr()`` never shows the secret."""

    seed: bytes = field(repr=False)
    """The 32-byte Ed25519 seed (secret)."""
    node_id: NodeId = field(init=False)
    """The public half."""
    x25519_private: bytes = field(init=False, repr=False)
    """The converted X25519 private key used as the Noise static key (secret)."""
    x25519_public: bytes = field(init=False, repr=False)
    """The converted X25519 public key."""

    def __post_init__(self) -> None:
        if not isinstance(self.seed, bytes) or len(self.seed) != 32:
            raise LocalUsageError("an Ed25519 seed is exactly 32 bytes")
        signing = nacl.signing.SigningKey(self.seed)
        object.__setattr__(self, "node_id", NodeId(bytes(signing.verify_key)))
        object.__setattr__(self, "x25519_private", bytes(signing.to_curve25519_private_key()))
        object.__setattr__(
            self, "x25519_public", bytes(signing.verify_key.to_curve25519_public_key())
        )

    @classmethod
    def generate(cls) -> KeyPair:
        """A fresh key pair from the operating system's CSPRNG."""
        return cls(os.urandom(32))

    def __repr__(self) -> str:
        return f"KeyPair(node_id={self.node_id!r})"

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the key file atomically with mode 0600 (created, never widened).

        The secret goes into a new file with a random name (``O_EXCL``, no
        symbolic link followed), which then replaces ``path``.

        Raises:
            LocalUsageError: the file cannot be written.
        """
        target = Path(path)
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(8)}.tmp")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(tmp, flags, 0o600)
        except OSError as exc:
            raise LocalUsageError(f"cannot write the key file {target}: {exc.strerror}") from None
        try:
            try:
                os.fchmod(fd, 0o600)
                os.write(fd, (_KEY_FILE_HEADER + self.seed.hex() + "\n").encode("ascii"))
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> KeyPair:
        """Read a key file written by :meth:`save`.

        The file is opened without following a symbolic link and checked
        through its descriptor: a regular file of this user, mode 0600.

        Raises:
            FileNotFoundError: there is no file at ``path``.
            LocalUsageError: the file is a symbolic link, not a regular file,
                another user's, readable by others, or malformed.
        """
        target = Path(path)
        try:
            fd = os.open(target, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise LocalUsageError(
                    f"key file {target} is a symbolic link; capsock reads only a regular "
                    "file there: replace the link with the file"
                ) from None
            raise LocalUsageError(f"cannot read the key file {target}: {exc.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise LocalUsageError(f"key file {target} is not a regular file")
            if st.st_uid != os.getuid():
                raise LocalUsageError(
                    f"key file {target} belongs to another user (uid {st.st_uid}); "
                    "capsock uses only a key of its own: remove it, or pass another --state-dir"
                )
            mode = st.st_mode & 0o777
            if mode & 0o077:
                raise LocalUsageError(
                    f"key file {target} has mode {mode:o}; run `chmod 600 {target}` "
                    "(it must not be readable by group or others)"
                )
            raw = os.read(fd, 4096)
        finally:
            os.close(fd)
        try:
            text = raw.decode("ascii")
        except UnicodeDecodeError:
            text = ""
        if not text.startswith(_KEY_FILE_HEADER):
            raise LocalUsageError(f"{target} is not a capsock node key file")
        body = text[len(_KEY_FILE_HEADER) :].strip()
        try:
            seed = bytes.fromhex(body)
        except ValueError:
            seed = b""
        if len(seed) != 32:
            raise LocalUsageError(f"{target} is damaged (bad key length)")
        return cls(seed)

    @classmethod
    def load_or_create(cls, path: str | os.PathLike[str]) -> KeyPair:
        """Load the key file at ``path``, creating it (0600) if it does not exist.

        Raises:
            LocalUsageError: as :meth:`load`.
        """
        target = Path(path)
        try:
            return cls.load(target)
        except FileNotFoundError:
            pass
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        pair = cls.generate()
        pair.save(target)
        return pair
