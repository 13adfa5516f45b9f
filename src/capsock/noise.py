"""Sans-IO Noise Protocol Framework: ``25519`` / ``ChaChaPoly`` / ``BLAKE2b``,
plus AES-256-GCM (``AESGCM``) for the transport phase.

Theory of operation
-------------------
This module follows the Noise specification (revision 34) section by section
and keeps its names, so the spec can be read alongside the code:

* :class:`CipherState` holds a key ``k`` and a nonce ``n`` (spec §5.1), and the
  cipher function it uses: ``"ChaChaPoly"`` (the default, and the only cipher
  used during handshakes) or ``"AESGCM"`` (transport only, see below).
* :class:`SymmetricState` holds the chaining key ``ck`` and the handshake hash
  ``h`` and wraps a :class:`CipherState` (§5.2).  ``HKDF`` and ``HMAC`` over
  BLAKE2b are implemented here exactly as §4.3 defines them.
* :class:`HandshakeState` runs a handshake pattern (§5.3).  Patterns are *data*:
  :data:`PATTERNS` maps each fundamental pattern name to its pre-messages and
  message token lists, and ``pskN`` modifiers (§9) are applied to that data when
  a protocol name is parsed.  The state machine is one loop over tokens.
* After the last handshake message, :meth:`HandshakeState.split` hands out the
  two transport :class:`CipherState` objects (initiator->responder first), and
  :class:`TransportCipher` turns them into the lean send/receive pair the
  session uses on its hot path.
* :class:`RecordReader` splits a byte stream into the capsock transport records
  (2-byte big-endian length + one Noise message; DESIGN.md §4.1).

Cipher functions (spec §12.3).  Both are AEADs with a 32-byte key, a 96-bit
nonce and a 16-byte tag; the nonce is 32 zero bits followed by the 64-bit
counter ``n``:

* ``ChaChaPoly``: ChaCha20-Poly1305 (RFC 8439), counter **little-endian**.
* ``AESGCM``: AES-256-GCM, counter **big-endian**.  libsodium offers it only on
  CPUs with AES instructions; :func:`available_ciphers` tells whether this
  machine has it.

``REKEY(k)`` is, for both, the first 32 bytes of ``ENCRYPT(k, 2**64-1, "",
zeros(32))`` (§4.2).  The handshake itself always runs with ChaChaPoly
(:data:`PROTOCOL_NAME`); capsock may run the *transport* phase with AESGCM
instead, keyed with the same ``Split()`` keys, when both peers agreed on it
inside the authenticated handshake (:mod:`capsock.handshake`).  That is what
``HandshakeState.split(cipher="AESGCM")`` and
``TransportCipher.from_handshake(hs, cipher="AESGCM")`` do.

The transport hot path.  :class:`TransportCipher` calls libsodium through
PyNaCl's cffi module (``nacl._sodium``, private to PyNaCl) when it is importable
and has the needed symbols: the plaintext or ciphertext buffer is passed to C
without a copy (``bytes`` directly, other buffers via ``ffi.from_buffer``), the
output is written into a per-cipher preallocated buffer (the length prefix of a
record into its first two bytes, the Noise message after them), and one copy of
that buffer is returned as ``bytes``.  Each direction allocates its 64 KiB
buffer on first use.  Without ``nacl._sodium`` the same messages are produced
through PyNaCl's public ``nacl.bindings`` (two extra copies per call); the two
paths are byte-for-byte identical.  A ``TransportCipher`` is therefore not
thread-safe (it never was: the nonces are counters).

No I/O happens here and nothing is imported from anyio: bytes in, bytes out.
All cryptography is libsodium through PyNaCl.

Errors: anything a *remote* peer can cause is a :class:`~capsock.errors.ProtocolError`
(during the handshake a :class:`~capsock.errors.HandshakeError`); misuse by the
calling program is a :class:`~capsock.errors.LocalUsageError`.  No key, chaining
key or DH output ever appears in a ``repr()`` or in an exception message.
"""

from __future__ import annotations

import hmac
import os
import re as _re
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, NoReturn

import nacl.bindings as _bindings
import nacl.exceptions
from nacl.bindings import (
    crypto_aead_chacha20poly1305_ietf_decrypt,
    crypto_aead_chacha20poly1305_ietf_encrypt,
    crypto_generichash_blake2b_salt_personal,
    crypto_scalarmult,
    crypto_scalarmult_base,
)

from .errors import HandshakeError, LocalUsageError, ProtocolError

__all__ = [
    "AESGCM",
    "CHACHAPOLY",
    "CIPHER_NAMES",
    "DHLEN",
    "HASHLEN",
    "MAX_MESSAGE_LEN",
    "MAX_PLAINTEXT_LEN",
    "PATTERNS",
    "PROLOGUE",
    "PROTOCOL_NAME",
    "TAG_LEN",
    "CipherState",
    "HandshakeDecryptError",
    "HandshakePattern",
    "HandshakeState",
    "RecordReader",
    "SymmetricState",
    "TransportCipher",
    "available_ciphers",
    "parse_protocol_name",
]

PROLOGUE: Final = b"capsock/1"
"""capsock's Noise prologue: protocol and version (downgrade protection)."""
PROTOCOL_NAME: Final = b"Noise_IK_25519_ChaChaPoly_BLAKE2b"
"""The one Noise protocol capsock speaks."""
MAX_MESSAGE_LEN: Final = 65535
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
_u16: Final = struct.Struct(">H").pack
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


_LIB_BLAKE2B: Final[Any] = getattr(_lib, "crypto_generichash_blake2b_salt_personal", None)


def _hash(data: bytes) -> bytes:
    """HASH(): BLAKE2b with a 64-byte output.

    libsodium's function directly when ``nacl._sodium`` has it: the public
    binding's argument checks cost ~15x the hash itself for these short inputs,
    and a handshake hashes ~37 times per side.
    """
    if _LIB_BLAKE2B is not None and _FAST_AEAD:
        out = _ffi.new("unsigned char[]", HASHLEN)
        null = _ffi.NULL  # no key; NULL salt and personalization mean all zeros
        if _LIB_BLAKE2B(out, HASHLEN, data, len(data), null, 0, null, null) != 0:
            raise _CryptoError("BLAKE2b failed")  # pragma: no cover - libsodium never fails here
        return bytes(_ffi.buffer(out))
    return crypto_generichash_blake2b_salt_personal(data, digest_size=HASHLEN)


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

    def __repr__(self) -> str:
        return f"CipherState(cipher={self._aead.name!r}, has_key={self.has_key()}, n={self._n})"


def _rekey(aead: _Aead, key: bytes) -> bytes:
    """REKEY(k) of spec §4.2 for ``aead``."""
    return aead.encrypt(_ZERO32, None, aead.nonce(_MAX_NONCE), key)[:KEYLEN]


# --- SymmetricState (spec §5.2) ---


class SymmetricState:
    """Chaining key ``ck``, handshake hash ``h`` and a :class:`CipherState`."""

    __slots__ = ("_ck", "_h", "cipher_state")

    def __init__(self, protocol_name: bytes) -> None:
        """InitializeSymmetric(protocol_name)."""
        if len(protocol_name) <= HASHLEN:
            h = protocol_name.ljust(HASHLEN, b"\x00")
        else:
            h = _hash(protocol_name)
        self._h = h
        self._ck = h
        self.cipher_state = CipherState()

    @classmethod
    def initialize_symmetric(cls, protocol_name: bytes) -> SymmetricState:
        """InitializeSymmetric(protocol_name), spelled as in the spec."""
        return cls(protocol_name)

    def mix_key(self, input_key_material: bytes) -> None:
        """MixKey(input_key_material)."""
        self._ck, temp_k = _hkdf(self._ck, input_key_material, 2)
        self.cipher_state.initialize_key(temp_k[:KEYLEN])

    def mix_hash(self, data: bytes) -> None:
        """MixHash(data)."""
        self._h = _hash(self._h + data)

    def mix_key_and_hash(self, input_key_material: bytes) -> None:
        """MixKeyAndHash(input_key_material) (used for ``psk`` tokens)."""
        self._ck, temp_h, temp_k = _hkdf(self._ck, input_key_material, 3)
        self.mix_hash(temp_h)
        self.cipher_state.initialize_key(temp_k[:KEYLEN])

    def get_handshake_hash(self) -> bytes:
        """GetHandshakeHash(): ``h`` (public; channel binding after the handshake)."""
        return self._h

    def encrypt_and_hash(self, plaintext: bytes) -> bytes:
        """EncryptAndHash(plaintext)."""
        ciphertext = self.cipher_state.encrypt_with_ad(self._h, plaintext)
        self.mix_hash(ciphertext)
        return ciphertext

    def decrypt_and_hash(self, ciphertext: bytes) -> bytes:
        """DecryptAndHash(ciphertext).

        Raises:
            HandshakeDecryptError: the ciphertext failed authentication.
        """
        try:
            plaintext = self.cipher_state.decrypt_with_ad(self._h, ciphertext)
        except ProtocolError:
            raise HandshakeDecryptError(
                "handshake message failed authentication: the peer does not hold "
                "the expected keys, or the message was corrupted"
            ) from None
        self.mix_hash(ciphertext)
        return plaintext

    def split(self, cipher: str = CHACHAPOLY) -> tuple[CipherState, CipherState]:
        """Split(): the initiator->responder and responder->initiator ciphers.

        ``cipher`` names the cipher function of the two returned states (capsock
        may run the transport phase with ``"AESGCM"``; see :func:`available_ciphers`).

        Raises:
            LocalUsageError: the cipher is unknown or not available here.
        """
        temp_k1, temp_k2 = _hkdf(self._ck, b"", 2)
        return CipherState(temp_k1[:KEYLEN], cipher), CipherState(temp_k2[:KEYLEN], cipher)

    def __repr__(self) -> str:
        return f"SymmetricState(has_key={self.cipher_state.has_key()})"


class HandshakeDecryptError(HandshakeError):
    """A handshake message failed AEAD authentication.

    A separate class so that :mod:`capsock.handshake` can tell "the peer does
    not hold the key" (an authentication failure) from "malformed message".
    """


# --- Handshake patterns as data (spec §7, §9) ---


@dataclass(frozen=True, slots=True)
class HandshakePattern:
    """A handshake pattern: pre-message tokens and message token lists."""

    name: str
    """The pattern name with modifiers, e.g. ``"IK"`` or ``"XXpsk3"``."""
    initiator_pre: tuple[str, ...]
    """Initiator's pre-message (``"s"``, ``"e"`` or both)."""
    responder_pre: tuple[str, ...]
    """Responder's pre-message."""
    messages: tuple[tuple[str, ...], ...]
    """Token lists; message ``i`` is sent by the initiator when ``i`` is even."""

    @property
    def psk_count(self) -> int:
        """How many ``psk`` tokens the pattern contains."""
        return sum(toks.count("psk") for toks in self.messages)


def _p(name: str, ipre: str, rpre: str, *messages: str) -> HandshakePattern:
    def toks(text: str) -> tuple[str, ...]:
        return tuple(t.strip() for t in text.split(",") if t.strip())

    return HandshakePattern(name, toks(ipre), toks(rpre), tuple(map(toks, messages)))


PATTERNS: Final[dict[str, HandshakePattern]] = {
    p.name: p
    for p in (
        # one-way patterns (spec §7.4)
        _p("N", "", "s", "e, es"),
        _p("K", "s", "s", "e, es, ss"),
        _p("X", "", "s", "e, es, s, ss"),
        # interactive patterns (spec §7.5)
        _p("NN", "", "", "e", "e, ee"),
        _p("NK", "", "s", "e, es", "e, ee"),
        _p("NX", "", "", "e", "e, ee, s, es"),
        _p("KN", "s", "", "e", "e, ee, se"),
        _p("KK", "s", "s", "e, es, ss", "e, ee, se"),
        _p("KX", "s", "", "e", "e, ee, se, s, es"),
        _p("XN", "", "", "e", "e, ee", "s, se"),
        _p("XK", "", "s", "e, es", "e, ee", "s, se"),
        _p("XX", "", "", "e", "e, ee, s, es", "s, se"),
        _p("IN", "", "", "e, s", "e, ee, se"),
        _p("IK", "", "s", "e, es, s, ss", "e, ee, se"),
        _p("IX", "", "", "e, s", "e, ee, se, s, es"),
    )
}
"""The fundamental patterns; ``pskN`` modifiers are applied by :func:`parse_protocol_name`."""

_NAME_RE: Final = _re.compile(r"Noise_([NKXI]{1,2})((?:psk\d+)(?:\+psk\d+)*)?" + _SUFFIX)


def _name_bytes(protocol_name: bytes | str) -> bytes:
    """The protocol name as bytes (it is hashed into the handshake)."""
    return protocol_name.encode("ascii") if isinstance(protocol_name, str) else protocol_name


def parse_protocol_name(protocol_name: bytes | str) -> HandshakePattern:
    """The pattern named by a full protocol name, with ``pskN`` modifiers applied.

    Only ``_25519_ChaChaPoly_BLAKE2b`` is supported.

    Raises:
        LocalUsageError: the name is malformed or not supported.
    """
    if isinstance(protocol_name, bytes):
        protocol_name = protocol_name.decode("ascii", "replace")
    text = protocol_name
    match = _NAME_RE.fullmatch(text)
    if match is None or match.group(1) not in PATTERNS:
        raise LocalUsageError(
            f"unsupported Noise protocol name {text!r} (supported: Noise_<pattern>[pskN]{_SUFFIX})"
        )
    base = PATTERNS[match.group(1)]
    messages = [list(toks) for toks in base.messages]
    modifiers = match.group(2).split("+") if match.group(2) else []
    if len(set(modifiers)) != len(modifiers):
        raise LocalUsageError(f"duplicate modifier in Noise protocol name {text!r}")
    for modifier in modifiers:
        index = int(modifier[3:])
        if index > len(messages):
            raise LocalUsageError(f"{modifier} does not fit pattern {base.name}")
        if index == 0:
            messages[0].insert(0, "psk")
        else:
            messages[index - 1].append("psk")
    return HandshakePattern(
        match.group(1) + match.group(2) if match.group(2) else base.name,
        base.initiator_pre,
        base.responder_pre,
        tuple(tuple(toks) for toks in messages),
    )


# --- HandshakeState (spec §5.3) ---


class HandshakeState:
    """One side of a Noise handshake.

    Args:
        protocol_name: e.g. ``b"Noise_IK_25519_ChaChaPoly_BLAKE2b"``.
        initiator: whether this side sends the first message.
        prologue: bytes both sides must agree on (capsock: :data:`PROLOGUE`).
        s: this side's static X25519 private key, if the pattern needs one.
        e: a fixed ephemeral private key (test vectors only; normally fresh).
        rs: the peer's static public key, if known in advance (pre-message).
        re: the peer's ephemeral public key, if known in advance.
        psks: the pre-shared keys, in the order the ``psk`` tokens appear.

    Raises:
        LocalUsageError: unsupported name, or keys missing/malformed for the pattern.

    A failed :meth:`read_message` or :meth:`write_message` leaves the state
    unusable (further calls raise :class:`LocalUsageError`): start a new handshake.
    """

    __slots__ = (
        "_cipher_pair", "_e", "_e_pub", "_failed", "_index", "_initiator", "_pattern",
        "_psk_mode", "_psks", "_re", "_rs", "_s", "_s_pub", "_ss",
    )  # fmt: skip

    def __init__(
        self,
        protocol_name: bytes | str,
        initiator: bool,
        prologue: bytes = b"",
        *,
        s: bytes | None = None,
        e: bytes | None = None,
        rs: bytes | None = None,
        re: bytes | None = None,
        psks: Sequence[bytes] = (),
    ) -> None:
        pattern = parse_protocol_name(protocol_name)
        self._pattern = pattern
        self._initiator = bool(initiator)
        self._s = s
        self._s_pub = _public_key(s) if s is not None else None
        self._e = e
        self._e_pub = _public_key(e) if e is not None else None
        if any(k is not None and (not isinstance(k, bytes) or len(k) != DHLEN) for k in (rs, re)):
            raise LocalUsageError(f"rs and re must be {DHLEN}-byte public keys")
        self._rs = rs
        self._re = re
        psk_list = list(psks)
        if len(psk_list) != pattern.psk_count:
            raise LocalUsageError(
                f"{pattern.name} needs {pattern.psk_count} pre-shared keys, got {len(psk_list)}"
            )
        if any(not isinstance(k, bytes) or len(k) != 32 for k in psk_list):
            raise LocalUsageError("a pre-shared key is 32 bytes")
        self._psks = psk_list
        self._psk_mode = pattern.psk_count > 0
        self._index = 0
        self._failed = False
        self._cipher_pair: tuple[CipherState, CipherState] | None = None
        self._check_keys()

        self._ss = SymmetricState(_name_bytes(protocol_name))
        self._ss.mix_hash(prologue)
        local, remote = {"s": self._s_pub, "e": self._e_pub}, {"s": rs, "e": re}
        init_keys, resp_keys = (local, remote) if self._initiator else (remote, local)
        for keys, toks in ((init_keys, pattern.initiator_pre), (resp_keys, pattern.responder_pre)):
            for tok in toks:  # pre-messages: keys known in advance (checked above)
                key = keys[tok]
                assert key is not None
                self._ss.mix_hash(key)
                if tok == "e" and self._psk_mode:
                    self._ss.mix_key(key)

    def _check_keys(self) -> None:
        p, initiator = self._pattern, self._initiator
        my_pre, their_pre = (
            (p.initiator_pre, p.responder_pre) if initiator else (p.responder_pre, p.initiator_pre)
        )
        sent, received = set(my_pre), set[str]()
        for i, toks in enumerate(p.messages):
            (sent if (i % 2 == 0) == initiator else received).update(toks)
        for needed, key, label in (
            ("s" in sent, self._s, "this side's static private key (s)"),
            ("e" in my_pre, self._e, "this side's ephemeral private key (e)"),
            ("s" in their_pre, self._rs, "the peer's static public key (rs)"),
            ("e" in their_pre, self._re, "the peer's ephemeral public key (re)"),
        ):
            if needed and key is None:
                raise LocalUsageError(f"{p.name} needs {label}")
        if "s" in received and self._rs is not None:
            raise LocalUsageError(f"{p.name} transmits the peer's static key; do not pass rs")

    # -- public state ---------------------------------------------------------

    @property
    def pattern(self) -> HandshakePattern:
        """The handshake pattern being run."""
        return self._pattern

    @property
    def initiator(self) -> bool:
        """Whether this side is the initiator."""
        return self._initiator

    @property
    def handshake_hash(self) -> bytes:
        """The handshake hash ``h``; final (channel binding) once :attr:`complete`."""
        return self._ss.get_handshake_hash()

    @property
    def remote_static(self) -> bytes | None:
        """The peer's static X25519 public key, once known (authenticated when complete)."""
        return self._rs

    @property
    def complete(self) -> bool:
        """Whether every handshake message has been written or read."""
        return self._index >= len(self._pattern.messages)

    @property
    def writing(self) -> bool:
        """Whether the next step is :meth:`write_message` (``False``: read, or done)."""
        return not self.complete and (self._index % 2 == 0) == self._initiator

    def __repr__(self) -> str:
        return (
            f"HandshakeState({self._pattern.name!r}, initiator={self._initiator}, "
            f"message={self._index}, complete={self.complete}, failed={self._failed})"
        )

    # -- the handshake --------------------------------------------------------

    def _overhead(self, toks: tuple[str, ...]) -> int:
        """Bytes a message with tokens ``toks`` adds around its payload."""
        has_key = self._ss.cipher_state.has_key()
        size = 0
        for tok in toks:
            if tok == "e":
                size += DHLEN
                has_key = has_key or self._psk_mode
            elif tok == "s":
                size += DHLEN + (TAG_LEN if has_key else 0)
            else:  # ee, es, se, ss, psk
                has_key = True
        return size + (TAG_LEN if has_key else 0)

    def _begin(self, write: bool) -> tuple[str, ...]:
        if self._failed:
            raise LocalUsageError("this handshake already failed; start a new one")
        if self.complete:
            raise LocalUsageError("the handshake is complete; use the transport ciphers")
        if self.writing != write:
            raise LocalUsageError(
                "it is the peer's turn to send" if write else "it is this side's turn to send"
            )
        return self._pattern.messages[self._index]

    def _mix_dh(self, tok: str) -> None:
        initiator = self._initiator
        if tok == "ee":
            local, remote = self._e, self._re
        elif tok == "ss":
            local, remote = self._s, self._rs
        elif tok == "es":
            local, remote = (self._e, self._rs) if initiator else (self._s, self._re)
        else:  # "se"
            local, remote = (self._s, self._re) if initiator else (self._e, self._rs)
        assert local is not None and remote is not None  # guaranteed by _check_keys
        self._ss.mix_key(_dh(local, remote))

    def _finish_message(self) -> None:
        self._index += 1
        if self.complete:
            self._cipher_pair = self._ss.split()

    def write_message(self, payload: bytes = b"") -> bytes:
        """WriteMessage(payload): the next handshake message.

        Raises:
            LocalUsageError: not this side's turn, the handshake is complete or
                failed, or the message would exceed 65535 bytes.
            HandshakeError: a configured peer key is invalid or of low order.
        """
        toks = self._begin(write=True)
        if len(payload) + self._overhead(toks) > MAX_MESSAGE_LEN:
            raise LocalUsageError(f"handshake message would exceed {MAX_MESSAGE_LEN} bytes")
        parts: list[bytes] = []
        try:
            for tok in toks:
                if tok == "e":
                    if self._e is None:
                        self._e = os.urandom(DHLEN)
                        self._e_pub = _public_key(self._e)
                    assert self._e_pub is not None
                    parts.append(self._e_pub)
                    self._ss.mix_hash(self._e_pub)
                    if self._psk_mode:
                        self._ss.mix_key(self._e_pub)
                elif tok == "s":
                    assert self._s_pub is not None
                    parts.append(self._ss.encrypt_and_hash(self._s_pub))
                elif tok == "psk":
                    self._ss.mix_key_and_hash(self._psks.pop(0))
                else:
                    self._mix_dh(tok)
            parts.append(self._ss.encrypt_and_hash(bytes(payload)))
        except BaseException:
            self._failed = True
            raise
        self._finish_message()
        return b"".join(parts)

    def read_message(self, message: bytes) -> bytes:
        """ReadMessage(message): process the peer's message, return its payload.

        Raises:
            HandshakeDecryptError: a field failed authentication (the peer does
                not hold the keys this side expects, or the message is corrupt).
            HandshakeError: the message is too short or too long, or carries an
                invalid or low-order public key.
            LocalUsageError: not the peer's turn, or the handshake is complete/failed.
        """
        toks = self._begin(write=False)
        message = bytes(message)
        try:
            if len(message) > MAX_MESSAGE_LEN:
                raise HandshakeError(
                    f"handshake message of {len(message)} bytes exceeds {MAX_MESSAGE_LEN}"
                )
            minimum = self._overhead(toks)
            if len(message) < minimum:
                raise HandshakeError(
                    f"handshake message {self._index + 1} is {len(message)} bytes; "
                    f"at least {minimum} are needed"
                )
            offset = 0
            for tok in toks:
                if tok == "e":
                    self._re = message[offset : offset + DHLEN]
                    offset += DHLEN
                    self._ss.mix_hash(self._re)
                    if self._psk_mode:
                        self._ss.mix_key(self._re)
                elif tok == "s":
                    size = DHLEN + (TAG_LEN if self._ss.cipher_state.has_key() else 0)
                    self._rs = self._ss.decrypt_and_hash(message[offset : offset + size])
                    offset += size
                elif tok == "psk":
                    self._ss.mix_key_and_hash(self._psks.pop(0))
                else:
                    self._mix_dh(tok)
            payload = self._ss.decrypt_and_hash(message[offset:])
        except BaseException:
            self._failed = True
            raise
        self._finish_message()
        return payload

    def split(self, cipher: str | None = None) -> tuple[CipherState, CipherState]:
        """The transport ciphers ``(initiator->responder, responder->initiator)``.

        Ownership moves to the caller: a second call raises, so a key/nonce pair
        can never be used twice by accident.

        Args:
            cipher: the transport cipher function; default the protocol's own
                (ChaChaPoly).  ``"AESGCM"`` keys AES-256-GCM with the same
                ``Split()`` keys (a capsock extension; both peers must agree).

        Raises:
            LocalUsageError: the handshake is not complete, split() was called
                before, or the cipher is unknown or not available here.
        """
        if not self.complete or self._failed:
            raise LocalUsageError("the handshake is not complete")
        pair = self._cipher_pair
        if pair is None:
            raise LocalUsageError("the transport ciphers were already taken")
        if cipher is not None and cipher != pair[0].cipher_name:
            first, second = pair
            assert first._k is not None and second._k is not None  # set by Split()
            pair = CipherState(first._k, cipher), CipherState(second._k, cipher)
        self._cipher_pair = None
        return pair


# --- Transport: the hot path ---


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
        if send._k is None or receive._k is None:
            raise LocalUsageError("transport ciphers need keys (complete the handshake first)")
        if send._aead is not receive._aead:
            raise LocalUsageError("both transport directions must use the same cipher function")
        aead = send._aead
        self._aead = aead
        self._nonce = aead.nonce
        self._send_key: bytes = send._k
        self._send_n: int = send._n
        self._recv_key: bytes = receive._k
        self._recv_n: int = receive._n
        self.handshake_hash: bytes = handshake_hash
        """The final handshake hash (public; channel binding)."""
        functions = aead.lib_functions() if _FAST_AEAD else None
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
        cls, handshake: HandshakeState, cipher: str | None = None
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

    def encrypt_records(self, records: list[list[bytes | memoryview]]) -> bytes | bytearray:
        """Several transport records in one new buffer, ready for one write.

        Each element of ``records`` is the plaintext of one record, given as a
        list of pieces (e.g. frame headers and payload views), so the only
        copy is into the output; encryption then happens in place.

        Raises:
            LocalUsageError: a record exceeds :data:`MAX_PLAINTEXT_LEN`, or the
                nonce space is exhausted (nothing is consumed for that record).
        """
        if not self._fast:
            return b"".join(self.encrypt_record(b"".join(parts)) for parts in records)
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
            return _u16(len(message)) + message
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


def _c_buffer(data: bytes | bytearray | memoryview) -> Any:
    """A zero-copy C view of a contiguous buffer (a copy if it is not contiguous)."""
    try:
        return _ffi.from_buffer(data)
    except BufferError:
        return memoryview(data).tobytes()


_COMPACT_AT: Final = 1 << 16


class RecordReader:
    """Sans-IO splitter for capsock transport records (2-byte BE length + message).

    Feed received bytes with :meth:`feed`, then call :meth:`next_record` until it
    returns ``None``.  Records that lie inside one fed chunk are returned as
    zero-copy ``memoryview`` slices of it; only a record that straddles two
    chunks is assembled in a small buffer.  Memory: the reader holds the last
    chunk fed plus at most one incomplete record (< 65537 bytes).
    """

    __slots__ = ("_chunk", "_partial", "_pos")

    def __init__(self) -> None:
        self._chunk: bytes = b""
        self._pos = 0
        self._partial = bytearray()

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Add received bytes (call after :meth:`next_record` returned ``None``)."""
        chunk = self._chunk
        if self._pos < len(chunk):  # an incomplete record at the end of the last chunk
            self._partial += memoryview(chunk)[self._pos :]
        self._chunk = data if type(data) is bytes else bytes(data)
        self._pos = 0
        partial = self._partial
        if not partial:
            return
        view = memoryview(self._chunk)
        size = len(view)
        pos = 0
        while pos < size:  # complete the straddling record from the new chunk only
            have = len(partial)
            want = 2 - have if have < 2 else ((partial[0] << 8) | partial[1]) + 2 - have
            if want <= 0:
                break
            take = min(want, size - pos)
            partial += view[pos : pos + take]
            pos += take
        self._pos = pos

    def next_record(self) -> bytes | memoryview | None:
        """The next complete record's message (without prefix), or ``None``.

        Raises:
            ProtocolError: a record has length zero (never valid in capsock).
        """
        partial = self._partial
        if partial:
            if len(partial) < 2:
                return None
            length = (partial[0] << 8) | partial[1]
            if length == 0:
                raise ProtocolError("received a zero-length transport record")
            if len(partial) < length + 2:
                return None
            record = bytes(partial[2:])
            partial.clear()
            return record
        chunk = self._chunk
        pos = self._pos
        available = len(chunk) - pos
        if available < 2:
            return None
        length = (chunk[pos] << 8) | chunk[pos + 1]
        if length == 0:
            raise ProtocolError("received a zero-length transport record")
        if available < length + 2:
            return None
        end = pos + 2 + length
        self._pos = end
        return memoryview(chunk)[pos + 2 : end]

    @property
    def buffered(self) -> int:
        """Bytes fed but not yet returned (non-zero at EOF means a truncated record)."""
        return len(self._partial) + len(self._chunk) - self._pos

    def __repr__(self) -> str:
        return f"RecordReader(buffered={self.buffered})"
