"""The general Noise framework: :class:`SymmetricState` (spec §5.2), handshake
patterns as data (§7, §9) and :class:`HandshakeState` (§5.3).

Private: import the public names from :mod:`capsock.core.noise`.  No I/O, no anyio.
"""

from __future__ import annotations

import os
import re as _re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from ..errors import HandshakeDecryptError, HandshakeError, LocalUsageError, ProtocolError
from ._noise_crypto import (
    CHACHAPOLY,
    DHLEN,
    HASHLEN,
    KEYLEN,
    MAX_MESSAGE_LEN,
    TAG_LEN,
    CipherState,
    _dh,
    _hash,
    _hkdf,
    _public_key,
)

_SUFFIX: Final = "_25519_ChaChaPoly_BLAKE2b"


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
            pair = (
                CipherState(first.transport_key().key, cipher),
                CipherState(second.transport_key().key, cipher),
            )
        self._cipher_pair = None
        return pair


# --- Transport: the hot path ---
