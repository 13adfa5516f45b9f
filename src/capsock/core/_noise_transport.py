"""The transport phase, capsock's hot path: :class:`TransportCipher`.

It takes its key, nonce and cipher function from a :class:`CipherState` once,
through :meth:`CipherState.transport_key`, and keeps them in its own slots, so
encrypting and decrypting read no other object.  Private: import it from
:mod:`capsock.core.noise`.  See there for the zero-copy libsodium path.
"""

from __future__ import annotations

from typing import Any, NoReturn, Protocol

from ..errors import LocalUsageError, ProtocolError
from . import _noise_crypto as _crypto
from ._noise_crypto import (
    _MAX_NONCE,
    MAX_MESSAGE_LEN,
    MAX_PLAINTEXT_LEN,
    TAG_LEN,
    CipherState,
    _c_buffer,
    _CryptoError,
    _ffi,
)
from .records import record_prefix


class _CompletedHandshake(Protocol):
    """What :meth:`TransportCipher.from_handshake` needs of a handshake."""

    @property
    def initiator(self) -> bool: ...
    @property
    def handshake_hash(self) -> bytes: ...
    def split(self, cipher: str | None = None) -> tuple[CipherState, CipherState]: ...


class TransportCipher:
    """Send and receive ciphers of an established session (one direction each).

    ``encrypt``/``decrypt`` handle Noise transport messages with an empty
    associated data and the counter nonce of the spec, with the cipher function
    of the two :class:`CipherState` objects (``ChaChaPoly`` or ``AESGCM``).
    ``repr()`` shows the counters only, never a key.  Not thread-safe.

    Args:
        send: the cipher for messages this side sends (keyed).
        receive: the cipher for messages this side receives (keyed, same cipher function).
        handshake_hash: the final handshake hash (channel binding).

    Raises:
        LocalUsageError: a cipher has no key, or the two use different cipher functions.
    """

    __slots__ = (
        "_aead", "_fast", "_lib_decrypt", "_lib_encrypt", "_nonce", "_out", "_out_body",
        "_out_view", "_plain", "_plain_view", "_recv_key", "_recv_n", "_send_key", "_send_n",
        "handshake_hash",
    )  # fmt: skip

    def __init__(self, send: CipherState, receive: CipherState, handshake_hash: bytes) -> None:
        out, into = send.transport_key(), receive.transport_key()
        if out.aead is not into.aead:
            raise LocalUsageError("both transport directions must use the same cipher function")
        aead = out.aead
        self._aead = aead
        self._nonce = aead.nonce
        self._send_key: bytes = out.key
        self._send_n: int = out.nonce
        self._recv_key: bytes = into.key
        self._recv_n: int = into.nonce
        self.handshake_hash: bytes = handshake_hash
        """The final handshake hash (public; channel binding)."""
        functions = aead.lib_functions() if _crypto._FAST_AEAD else None
        self._fast = functions is not None
        self._lib_encrypt: Any = functions[0] if functions else None
        self._lib_decrypt: Any = functions[1] if functions else None
        # Output buffers, allocated on first use (see _alloc_out / _alloc_plain).
        self._out: Any = None
        self._out_body: Any = None
        self._out_view: memoryview | None = None
        self._plain: Any = None
        self._plain_view: memoryview | None = None

    @classmethod
    def from_handshake(
        cls, handshake: _CompletedHandshake, cipher: str | None = None
    ) -> TransportCipher:
        """Take the transport ciphers of a completed handshake, oriented for its side.

        ``cipher`` is passed to :meth:`HandshakeState.split` (default: ChaChaPoly).

        Raises:
            LocalUsageError: the handshake is not complete, its ciphers were
                taken, or the cipher is unknown or not available here.
        """
        c1, c2 = handshake.split(cipher)
        if handshake.initiator:
            return cls(c1, c2, handshake.handshake_hash)
        return cls(c2, c1, handshake.handshake_hash)

    @property
    def cipher_name(self) -> str:
        """The transport cipher function: ``"ChaChaPoly"`` or ``"AESGCM"``."""
        return self._aead.name

    @property
    def send_nonce(self) -> int:
        """How many messages were encrypted."""
        return self._send_n

    @property
    def receive_nonce(self) -> int:
        """How many messages were decrypted."""
        return self._recv_n

    def _alloc_out(self) -> memoryview:
        # One buffer for a whole record: 2-byte length prefix + the Noise message.
        out = _ffi.new("unsigned char[]", 2 + MAX_MESSAGE_LEN)
        self._out = out
        self._out_body = out + 2
        view = self._out_view = memoryview(_ffi.buffer(out))
        return view

    def _empty_out(self) -> Any:
        """A scratch pointer for an empty plaintext (from_buffer rejects b'')."""
        if self._plain is None:
            self._alloc_plain()
        return self._plain

    def _alloc_plain(self) -> memoryview:
        plain = self._plain = _ffi.new("unsigned char[]", MAX_MESSAGE_LEN)
        view = self._plain_view = memoryview(_ffi.buffer(plain))
        return view

    def _seal(self, plaintext: bytes | bytearray | memoryview) -> int:
        """Encrypt into the record buffer (prefix included); return the message length."""
        if type(plaintext) is bytes:
            src: Any = plaintext
        else:
            src = _c_buffer(plaintext)
        size = len(src)  # bytes, whatever the buffer's item size
        n = self._send_n
        if size > MAX_PLAINTEXT_LEN or n >= _MAX_NONCE:
            self._refuse(size)
        view = self._out_view
        if view is None:
            view = self._alloc_out()
        if self._lib_encrypt(
            self._out_body, _ffi.NULL, src, size, _ffi.NULL, 0, _ffi.NULL,
            self._nonce(n), self._send_key,
        ):  # fmt: skip
            raise LocalUsageError("libsodium refused to encrypt")  # not expected to happen
        self._send_n = n + 1
        length = size + TAG_LEN
        view[0] = length >> 8
        view[1] = length & 0xFF
        return length

    def _seal_slow(self, plaintext: bytes | bytearray | memoryview) -> bytes:
        """The public-bindings path: the Noise message (no prefix)."""
        if type(plaintext) is not bytes:
            plaintext = memoryview(plaintext).tobytes()
        n = self._send_n
        if len(plaintext) > MAX_PLAINTEXT_LEN or n >= _MAX_NONCE:
            self._refuse(len(plaintext))
        message = self._aead.encrypt(plaintext, None, self._nonce(n), self._send_key)
        self._send_n = n + 1
        return message

    def encrypt(self, plaintext: bytes | bytearray | memoryview) -> bytes:
        """One Noise transport message (no length prefix).

        Raises:
            LocalUsageError: the plaintext exceeds :data:`MAX_PLAINTEXT_LEN`, or
                the nonce space is exhausted.
        """
        if not self._fast:
            return self._seal_slow(plaintext)
        length = self._seal(plaintext)
        assert self._out_view is not None
        return self._out_view[2 : 2 + length].tobytes()

    def encrypt_records(
        self, records: list[list[bytes | memoryview]], sizes: list[int] | None = None
    ) -> bytes | bytearray:
        """Several transport records in one new buffer, ready for one write.

        Each element of ``records`` is the plaintext of one record, given as a
        list of pieces (e.g. frame headers and payload views), so the only
        copy is into the output; encryption then happens in place.  ``sizes``,
        if given, is each record's plaintext size (what
        :meth:`Mux.data_to_send_records` returns with the records).

        Raises:
            LocalUsageError: a record exceeds :data:`MAX_PLAINTEXT_LEN`, or the
                nonce space is exhausted (nothing is consumed for that record).
        """
        if not self._fast:
            return b"".join(self.encrypt_record(b"".join(parts)) for parts in records)
        if sizes is None:
            sizes = [sum(len(p) for p in parts) for parts in records]
        buf = bytearray(sum(sizes) + len(sizes) * (2 + TAG_LEN))
        view = memoryview(buf)
        ptr = _ffi.from_buffer(buf)
        encrypt = self._lib_encrypt
        key = self._send_key
        off = 0
        for parts, size in zip(records, sizes, strict=True):
            n = self._send_n
            if size > MAX_PLAINTEXT_LEN or n >= _MAX_NONCE:
                self._refuse(size)
            length = size + TAG_LEN
            view[off] = length >> 8
            view[off + 1] = length & 0xFF
            pos = off + 2
            for part in parts:
                end = pos + len(part)
                view[pos:end] = part
                pos = end
            body = ptr + (off + 2)
            if encrypt(
                body, _ffi.NULL, body, size, _ffi.NULL, 0, _ffi.NULL, self._nonce(n), key
            ):  # pragma: no cover - libsodium does not refuse valid input
                raise LocalUsageError("libsodium refused to encrypt")
            self._send_n = n + 1
            off = pos + TAG_LEN
        return buf

    def encrypt_record(self, plaintext: bytes | bytearray | memoryview) -> bytes:
        """A transport record: 2-byte big-endian length + :meth:`encrypt`.

        Raises:
            LocalUsageError: as :meth:`encrypt`.
        """
        if not self._fast:
            message = self._seal_slow(plaintext)
            return record_prefix(len(message)) + message
        length = self._seal(plaintext)
        assert self._out_view is not None
        return self._out_view[: 2 + length].tobytes()

    @staticmethod
    def _refuse(size: int) -> NoReturn:
        if size > MAX_PLAINTEXT_LEN:
            raise LocalUsageError(
                f"a transport message carries at most {MAX_PLAINTEXT_LEN} plaintext bytes "
                f"(got {size}); split the data"
            )
        raise LocalUsageError("send nonce exhausted; open a new session")

    def decrypt(self, message: bytes | bytearray | memoryview) -> bytes | bytearray:
        """The plaintext of the next transport message, in a new buffer.  On
        failure the receive counter does not advance.

        Raises:
            ProtocolError: the message failed authentication (corrupted, forged,
                replayed, reordered or dropped before it), or has an impossible size.
        """
        fast = self._fast
        if type(message) is bytes:
            src: Any = message
            size = len(message)
        elif fast:
            src = _c_buffer(message)
            size = len(src)
        else:
            src = message = memoryview(message).tobytes()
            size = len(message)
        n = self._recv_n
        if size < TAG_LEN or size > MAX_MESSAGE_LEN or n >= _MAX_NONCE:
            raise ProtocolError(
                f"transport record failed authentication: a {size}-byte message is "
                "impossible (or the nonce space is used up); the session must be closed"
            )
        if not fast:
            try:
                plaintext = self._aead.decrypt(src, None, self._nonce(n), self._recv_key)
            except _CryptoError:
                self._reject()
            self._recv_n = n + 1
            return plaintext
        # Decrypt straight into the buffer the caller keeps: no copy afterwards.
        plain = bytearray(size - TAG_LEN)
        if self._lib_decrypt(
            _ffi.from_buffer(plain) if plain else self._empty_out(), _ffi.NULL, _ffi.NULL,
            src, size, _ffi.NULL, 0, self._nonce(n), self._recv_key,
        ):  # fmt: skip
            self._reject()
        self._recv_n = n + 1
        return plain

    @staticmethod
    def _reject() -> NoReturn:
        raise ProtocolError(
            "transport record failed authentication (corrupted, forged, replayed, "
            "reordered or dropped); the session must be closed"
        ) from None

    def __repr__(self) -> str:
        return f"TransportCipher(sent={self._send_n}, received={self._recv_n})"
