"""Noise crypto primitives: the libsodium loader, the cipher registry, HASH, HMAC,
HKDF, DH (spec §4) and :class:`CipherState` (spec §5.1).

Private: import the public names from :mod:`capsock.core.noise`.  The module-level
switches ``_FAST_AEAD`` (call libsodium's C functions directly) and
``_AESGCM_AVAILABLE`` are read at each use, so tests flip them here.  See
:mod:`capsock.core.noise` for the theory of operation.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

import nacl.bindings as _bindings
import nacl.exceptions
from nacl.bindings import (
    crypto_aead_chacha20poly1305_ietf_decrypt,
    crypto_aead_chacha20poly1305_ietf_encrypt,
    crypto_scalarmult,
    crypto_scalarmult_base,
)

from ..errors import HandshakeError, LocalUsageError, ProtocolError
from .records import MAX_RECORD_LEN

PROLOGUE: Final = b"capsock/1"
"""capsock's Noise prologue: protocol and version (downgrade protection)."""
PROTOCOL_NAME: Final = b"Noise_IK_25519_ChaChaPoly_BLAKE2b"
"""The one Noise protocol capsock speaks."""
MAX_MESSAGE_LEN: Final = MAX_RECORD_LEN
"""Largest Noise message (spec §3), and the largest capsock transport record body."""
TAG_LEN: Final = 16
"""AEAD authentication tag length (ChaCha20-Poly1305 and AES-256-GCM)."""
MAX_PLAINTEXT_LEN: Final = MAX_MESSAGE_LEN - TAG_LEN
"""Largest plaintext that fits in one transport message."""
DHLEN: Final = 32
"""X25519 public key / shared secret length."""
HASHLEN: Final = 64
"""BLAKE2b-512 output length."""
BLOCKLEN: Final = 128
"""BLAKE2b block length (HMAC padding)."""
KEYLEN: Final = 32
"""Cipher key length (both ciphers)."""
CHACHAPOLY: Final = "ChaChaPoly"
"""Noise name of ChaCha20-Poly1305 (handshake cipher; always available)."""
AESGCM: Final = "AESGCM"
"""Noise name of AES-256-GCM (transport only; needs CPU support in libsodium)."""
CIPHER_NAMES: Final = (AESGCM, CHACHAPOLY)
"""Every cipher name this module knows, in capsock's order of preference."""

_SUFFIX: Final = "_25519_ChaChaPoly_BLAKE2b"
_MAX_NONCE: Final = 2**64 - 1  # reserved by the spec; never used for a message
_ZERO32: Final = bytes(32)
_IPAD: Final = bytes.maketrans(bytes(range(256)), bytes(b ^ 0x36 for b in range(256)))
_OPAD: Final = bytes.maketrans(bytes(range(256)), bytes(b ^ 0x5C for b in range(256)))
_nonce: Final = struct.Struct("<4xQ").pack  # ChaChaPoly: 32 zero bits + 64-bit LE counter
_nonce_be: Final = struct.Struct(">4xQ").pack  # AESGCM: 32 zero bits + 64-bit BE counter
_encrypt: Final = crypto_aead_chacha20poly1305_ietf_encrypt
_decrypt: Final = crypto_aead_chacha20poly1305_ietf_decrypt
_CryptoError: Final = nacl.exceptions.CryptoError


# --- AEADs: public bindings, and libsodium's C functions for the hot path ---


_LIB_SYMBOLS: Final = (
    "crypto_aead_chacha20poly1305_ietf_encrypt",
    "crypto_aead_chacha20poly1305_ietf_decrypt",
)


def _load_sodium() -> tuple[Any, Any] | None:
    """PyNaCl's private cffi module ``(ffi, lib)``, or ``None`` if it is unusable.

    ``nacl._sodium`` is not PyNaCl's public API, so everything used from it is
    checked; when anything is missing the transport falls back to ``nacl.bindings``.
    """
    try:
        from nacl._sodium import ffi, lib
    except (ImportError, AttributeError):
        return None
    try:
        usable = all(hasattr(lib, name) for name in _LIB_SYMBOLS) and all(
            hasattr(ffi, name) for name in ("new", "from_buffer", "buffer", "NULL")
        )
    except Exception:  # a broken extension module: use the public bindings
        usable = False
    return (ffi, lib) if usable else None


def _aesgcm_available(sodium: tuple[Any, Any] | None) -> bool:
    """Whether libsodium here offers AES-256-GCM (it needs CPU AES instructions)."""
    if not all(
        hasattr(_bindings, name)
        for name in ("crypto_aead_aes256gcm_encrypt", "crypto_aead_aes256gcm_decrypt")
    ):
        return False  # PyNaCl too old to expose it
    probe: Callable[[], int] | None = getattr(_bindings, "crypto_aead_aes256gcm_is_available", None)
    if probe is None and sodium is not None:
        probe = getattr(sodium[1], "crypto_aead_aes256gcm_is_available", None)
    if probe is not None:
        return bool(probe())
    try:  # last resort: the public function refuses when the CPU lacks support
        _bindings.crypto_aead_aes256gcm_encrypt(b"", None, bytes(12), _ZERO32)
    except Exception:
        return False
    return True


_SODIUM: Final = _load_sodium()
_ffi: Final[Any] = _SODIUM[0] if _SODIUM is not None else None
_lib: Final[Any] = _SODIUM[1] if _SODIUM is not None else None
_FAST_AEAD: bool = _SODIUM is not None
"""Whether new :class:`TransportCipher` objects call libsodium directly (tests flip it)."""
_AESGCM_AVAILABLE: bool = _aesgcm_available(_SODIUM)
"""Whether AES-256-GCM can be used on this machine (tests may clear it)."""


@dataclass(frozen=True, slots=True)
class _Aead:
    """One Noise cipher function: its nonce encoding and its implementations."""

    name: str
    nonce: Callable[[int], bytes]
    encrypt: Callable[[bytes, bytes | None, bytes, bytes], bytes]
    """Public-bindings ENCRYPT(plaintext, ad, nonce, key)."""
    decrypt: Callable[[bytes, bytes | None, bytes, bytes], bytes]
    """Public-bindings DECRYPT(ciphertext, ad, nonce, key); raises CryptoError."""
    lib_prefix: str
    """libsodium's name stem, e.g. ``crypto_aead_aes256gcm``."""

    def lib_functions(self) -> tuple[Any, Any] | None:
        """libsodium's ``(encrypt, decrypt)`` C functions, if usable here."""
        if _lib is None:
            return None
        enc = getattr(_lib, self.lib_prefix + "_encrypt", None)
        dec = getattr(_lib, self.lib_prefix + "_decrypt", None)
        return (enc, dec) if enc is not None and dec is not None else None


def _unavailable(*_: object) -> bytes:
    raise LocalUsageError("AESGCM is not available here (libsodium needs CPU AES support)")


_AEADS: Final[dict[str, _Aead]] = {
    CHACHAPOLY: _Aead(CHACHAPOLY, _nonce, _encrypt, _decrypt, "crypto_aead_chacha20poly1305_ietf"),
    AESGCM: _Aead(
        AESGCM,
        _nonce_be,
        getattr(_bindings, "crypto_aead_aes256gcm_encrypt", _unavailable),
        getattr(_bindings, "crypto_aead_aes256gcm_decrypt", _unavailable),
        "crypto_aead_aes256gcm",
    ),
}


def available_ciphers() -> tuple[str, ...]:
    """The transport cipher names usable on this machine, in capsock's preference
    order: ``("AESGCM", "ChaChaPoly")`` with AES-256-GCM support, else ``("ChaChaPoly",)``."""
    return CIPHER_NAMES if _AESGCM_AVAILABLE else (CHACHAPOLY,)


def _aead(name: str) -> _Aead:
    """The cipher function called ``name``.

    Raises:
        LocalUsageError: unknown name, or AESGCM without hardware support here.
    """
    aead = _AEADS.get(name) if isinstance(name, str) else None
    if aead is None:
        raise LocalUsageError(f"unknown cipher {name!r} (known: {', '.join(CIPHER_NAMES)})")
    if name not in available_ciphers():
        raise LocalUsageError(
            f"{name} is not available here (libsodium supports AES-256-GCM only on CPUs "
            "with AES instructions); use ChaChaPoly"
        )
    return aead


# --- Crypto functions (spec §4) ---


_blake2b: Final = hashlib.blake2b


def _hash(data: bytes) -> bytes:
    """HASH(): BLAKE2b with a 64-byte output (hashlib's default digest size).

    The standard library's BLAKE2b, not libsodium's: the same function, and a
    C call with no cffi marshalling in between costs 0.30 us against 1.1 us
    for libsodium's ``crypto_generichash`` through cffi and ~15 us through
    pynacl's public binding, for the ~100-byte inputs of the hash chain (a
    handshake hashes ~37 times per side).  See docs/decisions.md.
    """
    return _blake2b(data).digest()


def _hmac(key: bytes, data: bytes) -> bytes:
    """HMAC-HASH per RFC 2104 with BLOCKLEN 128 (spec §4.3)."""
    if len(key) > BLOCKLEN:
        key = _hash(key)
    key = key.ljust(BLOCKLEN, b"\x00")
    inner = _hash(key.translate(_IPAD) + data)
    return _hash(key.translate(_OPAD) + inner)


def _hkdf(chaining_key: bytes, input_key_material: bytes, num_outputs: int) -> list[bytes]:
    """HKDF() of spec §4.3: two or three HASHLEN-byte outputs."""
    temp_key = _hmac(chaining_key, input_key_material)
    output = _hmac(temp_key, b"\x01")
    outputs = [output]
    for i in range(2, num_outputs + 1):
        output = _hmac(temp_key, output + bytes((i,)))
        outputs.append(output)
    return outputs


def _dh(private_key: bytes, public_key: bytes) -> bytes:
    """DH(): X25519.

    Raises:
        HandshakeError: the public key is invalid or of low order (the shared
            secret would be all zero; libsodium refuses it).
    """
    if len(public_key) != DHLEN:
        raise HandshakeError(f"a public key is {DHLEN} bytes (got {len(public_key)})")
    try:
        shared = crypto_scalarmult(private_key, public_key)
    except (_CryptoError, ValueError, TypeError):
        shared = _ZERO32
    if hmac.compare_digest(shared, _ZERO32):
        raise HandshakeError(
            "peer sent an invalid or low-order public key (the Diffie-Hellman "
            "result would be all zero); the handshake is aborted"
        )
    return shared


def _public_key(private_key: bytes) -> bytes:
    """The X25519 public key of a private key."""
    if not isinstance(private_key, bytes) or len(private_key) != DHLEN:
        raise LocalUsageError(f"an X25519 private key is {DHLEN} bytes")
    return crypto_scalarmult_base(private_key)


# --- CipherState (spec §5.1) ---


class CipherState:
    """A key ``k`` (or none), a 64-bit nonce ``n`` and a cipher function.

    Args:
        key: the 32-byte key, or ``None`` (empty).
        cipher: ``"ChaChaPoly"`` (default) or ``"AESGCM"`` (see :func:`available_ciphers`).

    Raises:
        LocalUsageError: the key is not 32 bytes, or the cipher is unknown or
            not available here.

    ``repr()`` hides the key.
    """

    __slots__ = ("_aead", "_k", "_n")

    def __init__(self, key: bytes | None = None, cipher: str = CHACHAPOLY) -> None:
        self._aead = _aead(cipher)
        self._k: bytes | None = None
        self._n = 0
        self.initialize_key(key)

    @property
    def cipher_name(self) -> str:
        """The Noise name of the cipher function (``"ChaChaPoly"`` or ``"AESGCM"``)."""
        return self._aead.name

    def initialize_key(self, key: bytes | None) -> None:
        """InitializeKey(key): set ``k`` (``None`` = empty) and reset ``n`` to 0.

        Raises:
            LocalUsageError: the key is not 32 bytes.
        """
        if key is not None and (not isinstance(key, bytes) or len(key) != KEYLEN):
            raise LocalUsageError(f"a cipher key is {KEYLEN} bytes")
        self._k = key
        self._n = 0

    def has_key(self) -> bool:
        """HasKey(): whether ``k`` is set."""
        return self._k is not None

    def set_nonce(self, nonce: int) -> None:
        """SetNonce(nonce).

        Raises:
            LocalUsageError: the nonce is outside 0 .. 2**64-1.
        """
        if not 0 <= nonce <= _MAX_NONCE:
            raise LocalUsageError("a Noise nonce is an unsigned 64-bit integer")
        self._n = nonce

    @property
    def nonce(self) -> int:
        """The next nonce ``n`` (public)."""
        return self._n

    def encrypt_with_ad(self, ad: bytes, plaintext: bytes) -> bytes:
        """EncryptWithAd(ad, plaintext); without a key, the plaintext is returned.

        Raises:
            LocalUsageError: the nonce space is exhausted (2**64-1 is reserved).
        """
        if self._k is None:
            return bytes(plaintext)
        if self._n >= _MAX_NONCE:
            raise LocalUsageError("cipher nonce exhausted; a new session is needed")
        aead = self._aead
        ciphertext = aead.encrypt(bytes(plaintext), bytes(ad), aead.nonce(self._n), self._k)
        self._n += 1
        return ciphertext

    def decrypt_with_ad(self, ad: bytes, ciphertext: bytes) -> bytes:
        """DecryptWithAd(ad, ciphertext); on failure ``n`` does not advance.

        Raises:
            ProtocolError: the ciphertext failed authentication, is shorter than
                a tag, or the nonce space is exhausted.
        """
        if self._k is None:
            return bytes(ciphertext)
        if self._n >= _MAX_NONCE:
            raise ProtocolError("cipher nonce exhausted; the session must end")
        if len(ciphertext) < TAG_LEN:
            raise ProtocolError(f"ciphertext shorter than the {TAG_LEN}-byte tag")
        aead = self._aead
        try:
            plaintext = aead.decrypt(bytes(ciphertext), bytes(ad), aead.nonce(self._n), self._k)
        except _CryptoError:
            raise ProtocolError(
                "message failed authentication (wrong key, corrupted, replayed or reordered)"
            ) from None
        self._n += 1
        return plaintext

    def rekey(self) -> None:
        """Rekey(): ``k = REKEY(k)`` (spec §4.2); ``n`` is unchanged.

        ``REKEY(k)`` is the first 32 bytes of ``ENCRYPT(k, 2**64-1, "", zeros(32))``
        with this state's cipher function (and its nonce encoding).

        Raises:
            LocalUsageError: there is no key.
        """
        if self._k is None:
            raise LocalUsageError("cannot rekey a cipher without a key")
        self._k = _rekey(self._aead, self._k)

    def transport_key(self) -> TransportKey:
        """The cipher function, key and next nonce, for :class:`.TransportCipher`.

        The transport keeps its own copy of the three (its hot path reads no
        attribute of this object); after this call the two must not both be
        used to encrypt, or a nonce would repeat.

        Raises:
            LocalUsageError: there is no key.
        """
        if self._k is None:
            raise LocalUsageError("transport ciphers need keys (complete the handshake first)")
        return TransportKey(self._aead, self._k, self._n)

    def __repr__(self) -> str:
        return f"CipherState(cipher={self._aead.name!r}, has_key={self.has_key()}, n={self._n})"


@dataclass(frozen=True, slots=True)
class TransportKey:
    """What a transport cipher takes from a :class:`CipherState`: the cipher
    function, the key and the next nonce.  ``repr()`` hides the key."""

    aead: _Aead
    key: bytes = field(repr=False)
    nonce: int


def _rekey(aead: _Aead, key: bytes) -> bytes:
    """REKEY(k) of spec §4.2 for ``aead``."""
    return aead.encrypt(_ZERO32, None, aead.nonce(_MAX_NONCE), key)[:KEYLEN]


# --- SymmetricState (spec §5.2) ---


def _c_buffer(data: bytes | bytearray | memoryview) -> Any:
    """A zero-copy C view of a contiguous buffer (a copy if it is not contiguous)."""
    try:
        return _ffi.from_buffer(data)
    except BufferError:
        return memoryview(data).tobytes()
