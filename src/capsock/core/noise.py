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
* :class:`RecordReader` (from :mod:`capsock.core.records`, re-exported here) splits a
  byte stream into the capsock transport records (2-byte big-endian length +
  one Noise message; DESIGN.md §4.1).

Layout.  This module is the public face of three private ones, each with one
concern: ``_noise_crypto`` (the libsodium loader, the cipher registry, the
spec's crypto functions and :class:`CipherState`), ``_noise_handshake`` (the
general framework: :class:`SymmetricState`, patterns, :class:`HandshakeState`)
and ``_noise_transport`` (the hot path, :class:`TransportCipher`, which takes
its key through :meth:`CipherState.transport_key` and reads no private state).

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
inside the authenticated handshake (:mod:`capsock.core.handshake`).  That is what
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

from ..errors import HandshakeDecryptError
from ._noise_crypto import (
    AESGCM,
    BLOCKLEN,
    CHACHAPOLY,
    CIPHER_NAMES,
    DHLEN,
    HASHLEN,
    KEYLEN,
    MAX_MESSAGE_LEN,
    MAX_PLAINTEXT_LEN,
    PROLOGUE,
    PROTOCOL_NAME,
    TAG_LEN,
    CipherState,
    TransportKey,
    available_ciphers,
)
from ._noise_handshake import (
    PATTERNS,
    HandshakePattern,
    HandshakeState,
    SymmetricState,
    parse_protocol_name,
)
from ._noise_transport import TransportCipher
from .records import RecordReader

__all__ = [
    "AESGCM",
    "BLOCKLEN",
    "CHACHAPOLY",
    "CIPHER_NAMES",
    "DHLEN",
    "HASHLEN",
    "KEYLEN",
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
    "TransportKey",
    "available_ciphers",
    "parse_protocol_name",
]
