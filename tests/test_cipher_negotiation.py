"""Transport cipher negotiation (capsock handshake extensions) and the AEAD hot path.

* Both sides with AESGCM -> AESGCM; either side restricted -> ChaChaPoly.
* The offer and the choice are authenticated: bit flips, truncation or a
  choice that was never offered fail the handshake (no downgrade).
* AESGCM transport messages match the ``cryptography`` package's AES-256-GCM
  with the Noise nonce (32 zero bits + big-endian counter) and noiseprotocol's
  AESGCM cipher function; REKEY matches the spec for both ciphers.
* The libsodium (cffi) hot path and the public ``nacl.bindings`` fallback
  produce byte-identical records.
"""

from __future__ import annotations

import array
import sys
import types

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM as CryptographyAESGCM
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from noise.backends.default.ciphers import AESGCMCipher, ChaCha20Cipher

import capsock.core._noise_crypto as noise_mod  # the switches live with the primitives
from capsock.core.handshake import (
    CIPHER_CHOICE_LEN,
    CIPHER_IDS,
    CIPHER_OFFER_LEN,
    FIRST_MESSAGE_LEN,
    SECOND_MESSAGE_LEN,
    HandshakeResult,
    InitiatorHandshake,
    ResponderHandshake,
)
from capsock.core.noise import (
    MAX_MESSAGE_LEN,
    MAX_PLAINTEXT_LEN,
    PROLOGUE,
    PROTOCOL_NAME,
    CipherState,
    HandshakeState,
    TransportCipher,
    available_ciphers,
)
from capsock.core.records import RecordReader
from capsock.errors import HandshakeError, LocalUsageError, PeerAuthenticationError, ProtocolError
from capsock.keys import KeyPair

ALICE = KeyPair(bytes(range(32)))
BOB = KeyPair(bytes(range(32, 64)))
HAS_AESGCM = "AESGCM" in available_ciphers()
needs_aesgcm = pytest.mark.skipif(not HAS_AESGCM, reason="libsodium has no AES-256-GCM on this CPU")
needs_lib = pytest.mark.skipif(noise_mod._SODIUM is None, reason="nacl._sodium is not usable here")
OFFER = b"\x01\x02\x02\x01"
NODE = ALICE.node_id.raw
PAYLOADS = [b"", b"a", b"hello capsock", bytes(range(256)) * 7, bytes(MAX_PLAINTEXT_LEN)]


def strip(record: bytes) -> bytes:
    assert int.from_bytes(record[:2], "big") == len(record) - 2
    return record[2:]


def run(
    dialer: list[str] | None = None, listener: list[str] | None = None
) -> tuple[HandshakeResult, HandshakeResult, bytes, bytes]:
    """A full handshake; returns both results and the two Noise messages."""
    init = InitiatorHandshake(ALICE, BOB.node_id, ciphers=dialer)
    resp = ResponderHandshake(BOB, ciphers=listener)
    first = strip(init.first_record())
    assert resp.read_first(first) == ALICE.node_id
    record, resp_result = resp.second_record()
    second = strip(record)
    return init.read_second(second), resp_result, first, second


def round_trip(a: TransportCipher, b: TransportCipher) -> None:
    for i, data in enumerate(PAYLOADS):
        kind = (bytes, bytearray, memoryview)[i % 3]
        assert b.decrypt(a.encrypt(kind(data))) == data
        assert a.decrypt(kind(b.encrypt_record(data)[2:])) == data


def first_message(payload: bytes) -> bytes:
    """IK message 1 from ALICE to BOB with any payload (a hand-driven dialer)."""
    hs = HandshakeState(PROTOCOL_NAME, True, PROLOGUE, s=ALICE.x25519_private, rs=BOB.x25519_public)
    return hs.write_message(payload)


def answer(init: InitiatorHandshake, payload: bytes) -> tuple[bytes, HandshakeState]:
    """IK message 2 with any payload (a hand-driven responder), for ``init``'s message 1."""
    hs = HandshakeState(PROTOCOL_NAME, False, PROLOGUE, s=BOB.x25519_private)
    hs.read_message(strip(init.first_record()))
    return hs.write_message(payload), hs


# --- negotiation outcomes ----------------------------------------------------


@needs_aesgcm
def test_both_sides_with_aesgcm_choose_aesgcm() -> None:
    init, resp, first, second = run()
    assert init.cipher_name == resp.cipher_name == "AESGCM"
    assert len(first) == FIRST_MESSAGE_LEN + CIPHER_OFFER_LEN == 132
    assert len(second) == SECOND_MESSAGE_LEN + CIPHER_CHOICE_LEN == 51
    assert init.handshake_hash == resp.handshake_hash
    round_trip(init.cipher, resp.cipher)
    # through the record reader, the way a session reads
    stream = b"".join(init.cipher.encrypt_record(p) for p in PAYLOADS)
    reader = RecordReader()
    reader.feed(stream)
    out = []
    while (record := reader.next_record()) is not None:
        out.append(resp.cipher.decrypt(record))
    assert out == PAYLOADS


def test_default_offer_follows_availability() -> None:
    init = InitiatorHandshake(ALICE, BOB.node_id)
    assert init.offered_ciphers == (("AESGCM", "ChaChaPoly") if HAS_AESGCM else ())
    assert CIPHER_IDS == {"ChaChaPoly": 1, "AESGCM": 2}


@pytest.mark.parametrize(
    ("dialer", "listener"),
    [(["ChaChaPoly"], None), (None, ["ChaChaPoly"]), (["ChaChaPoly"], ["ChaChaPoly"])],
    ids=["dialer", "listener", "both"],
)
def test_either_side_restricted_to_chachapoly(
    dialer: list[str] | None, listener: list[str] | None
) -> None:
    init, resp, first, second = run(dialer, listener)
    assert init.cipher_name == resp.cipher_name == "ChaChaPoly"
    offered = dialer is None and HAS_AESGCM
    assert len(first) == FIRST_MESSAGE_LEN + (CIPHER_OFFER_LEN if offered else 0)
    # an offer gets an explicit choice (0x01); no offer gets an empty payload
    assert len(second) == SECOND_MESSAGE_LEN + (CIPHER_CHOICE_LEN if offered else 0)
    round_trip(init.cipher, resp.cipher)


@needs_aesgcm
def test_responder_without_aesgcm_hardware(monkeypatch: pytest.MonkeyPatch) -> None:
    init = InitiatorHandshake(ALICE, BOB.node_id)
    monkeypatch.setattr(noise_mod, "_AESGCM_AVAILABLE", False)
    assert available_ciphers() == ("ChaChaPoly",)
    resp = ResponderHandshake(BOB, ciphers=["AESGCM", "ChaChaPoly"])  # allowed, not available
    resp.read_first(strip(init.first_record()))
    record, resp_result = resp.second_record()
    init_result = init.read_second(strip(record))
    assert init_result.cipher_name == resp_result.cipher_name == "ChaChaPoly"
    round_trip(init_result.cipher, resp_result.cipher)


def test_ciphers_argument_validation() -> None:
    for bad in (["ChaChaPoly", "ROT13"], ["AESGCM"], [], "ChaChaPoly"):
        with pytest.raises(LocalUsageError):
            InitiatorHandshake(ALICE, BOB.node_id, ciphers=bad)
        with pytest.raises(LocalUsageError):
            ResponderHandshake(BOB, ciphers=bad)
    # the order of the argument does not matter; capsock's preference does
    init = InitiatorHandshake(ALICE, BOB.node_id, ciphers=("ChaChaPoly", "AESGCM"))
    assert init.offered_ciphers == (("AESGCM", "ChaChaPoly") if HAS_AESGCM else ())


@needs_aesgcm
def test_offer_and_choice_on_the_wire() -> None:
    init = InitiatorHandshake(ALICE, BOB.node_id)
    hs = HandshakeState(PROTOCOL_NAME, False, PROLOGUE, s=BOB.x25519_private)
    assert hs.read_message(strip(init.first_record())) == NODE + OFFER
    dialer = HandshakeState(
        PROTOCOL_NAME, True, PROLOGUE, s=ALICE.x25519_private, rs=BOB.x25519_public
    )
    resp = ResponderHandshake(BOB)
    resp.read_first(dialer.write_message(NODE + OFFER))
    record, result = resp.second_record()
    assert dialer.read_message(strip(record)) == b"\x01\x01\x02"
    ours = TransportCipher.from_handshake(dialer, "AESGCM")
    round_trip(ours, result.cipher)


# --- the responder's side of the negotiation --------------------------------


@pytest.mark.parametrize(
    ("extensions", "cipher", "choice"),
    [
        (b"", "ChaChaPoly", b""),
        (b"\x01\x01\x01", "ChaChaPoly", b"\x01\x01\x01"),
        (b"\x01\x02\x01\x02", "ChaChaPoly", b"\x01\x01\x01"),  # the dialer's order wins
        (b"\x01\x01\x07", "ChaChaPoly", b""),  # nothing in common: empty answer
        (b"\x01\x03\x07\x02\x01", "AESGCM", b"\x01\x01\x02"),  # unknown ids skipped
        (b"\x09\x03abc" + OFFER + b"\x0a\x00", "AESGCM", b"\x01\x01\x02"),  # unknown types
    ],
)
def test_responder_choice(extensions: bytes, cipher: str, choice: bytes) -> None:
    if cipher == "AESGCM" and not HAS_AESGCM:
        cipher, choice = "ChaChaPoly", (b"\x01\x01\x01" if b"\x01" in extensions[2:] else b"")
    dialer = HandshakeState(
        PROTOCOL_NAME, True, PROLOGUE, s=ALICE.x25519_private, rs=BOB.x25519_public
    )
    resp = ResponderHandshake(BOB)
    resp.read_first(dialer.write_message(NODE + extensions))
    record, result = resp.second_record()
    assert result.cipher_name == cipher
    assert dialer.read_message(strip(record)) == choice
    round_trip(TransportCipher.from_handshake(dialer, cipher), result.cipher)


@pytest.mark.parametrize(
    "extensions",
    [b"\x01", b"\x01\x02\x02", b"\x01\x00", b"\x09\x05abc", OFFER + OFFER, OFFER + b"\x01"],
    ids=["header", "value", "empty-offer", "unknown-cut", "duplicate", "trailing"],
)
def test_responder_rejects_malformed_offer(extensions: bytes) -> None:
    resp = ResponderHandshake(BOB)
    with pytest.raises(HandshakeError):
        resp.read_first(first_message(NODE + extensions))
    with pytest.raises(LocalUsageError):
        resp.second_record()  # nothing is ever sent after a bad message 1


# --- the dialer's side: it only accepts what it offered ---------------------


@pytest.mark.parametrize("choice", [b"\x01\x01\x01", b"\x01\x01\x02"])
def test_dialer_rejects_a_choice_without_offer(choice: bytes) -> None:
    init = InitiatorHandshake(ALICE, BOB.node_id, ciphers=["ChaChaPoly"])
    message, _ = answer(init, choice)
    with pytest.raises(HandshakeError, match="none was offered"):
        init.read_second(message)
    with pytest.raises(LocalUsageError):
        init.read_second(message)


@needs_aesgcm
@pytest.mark.parametrize(
    "choice",
    [
        b"\x01\x01\x03",  # unknown id
        b"\x01\x01\x00",
        b"\x01\x00",  # no id
        b"\x01\x02\x02\x01",  # two ids
        b"\x01\x01\x02\x01\x01\x02",  # the choice twice
        b"\x01",  # truncated header
        b"\x01\x01",  # truncated value
        b"\x09\x04abc",  # truncated unknown extension
    ],
)
def test_dialer_rejects_bad_choice(choice: bytes) -> None:
    init = InitiatorHandshake(ALICE, BOB.node_id)
    message, _ = answer(init, choice)
    with pytest.raises(HandshakeError):
        init.read_second(message)


@needs_aesgcm
@pytest.mark.parametrize(
    ("payload", "cipher"),
    [(b"", "ChaChaPoly"), (b"\x01\x01\x01", "ChaChaPoly"), (b"\x01\x01\x02", "AESGCM"),
     (b"\x07\x01x\x01\x01\x02", "AESGCM")],
)  # fmt: skip
def test_dialer_accepts_offered_choice(payload: bytes, cipher: str) -> None:
    init = InitiatorHandshake(ALICE, BOB.node_id)
    message, hs = answer(init, payload)
    result = init.read_second(message)
    assert result.cipher_name == cipher
    round_trip(result.cipher, TransportCipher.from_handshake(hs, cipher))


@needs_aesgcm
def test_dialer_offering_only_chachapoly_rejects_aesgcm(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check is membership in the offer (as a third-party dialer might offer
    only 0x01), not what this machine could do."""
    init = InitiatorHandshake(ALICE, BOB.node_id)
    monkeypatch.setattr(init, "_offer", ("ChaChaPoly",))
    message, _ = answer(init, b"\x01\x01\x02")
    with pytest.raises(HandshakeError, match="not offered"):
        init.read_second(message)


# --- no downgrade: the offer and the choice are authenticated ---------------


@needs_aesgcm
def test_tampered_offer_fails_the_handshake() -> None:
    message = strip(InitiatorHandshake(ALICE, BOB.node_id).first_record())
    assert len(message) == 132
    # e (32) | s (48) | payload: node id (32), offer (4) | tag (16)
    offer_and_tag = range(32 + 48 + 32, len(message))
    for i in offer_and_tag:
        for bit in range(8):
            bad = bytearray(message)
            bad[i] ^= 1 << bit
            with pytest.raises(HandshakeError, match="authentication"):
                ResponderHandshake(BOB).read_first(bytes(bad))
    # stripping the offer (or cutting it short) is no better
    for cut in (message[:112] + message[116:], message[:-1], message[:128]):
        with pytest.raises(HandshakeError):
            ResponderHandshake(BOB).read_first(cut)


@needs_aesgcm
def test_tampered_choice_fails_the_handshake() -> None:
    def pair() -> tuple[InitiatorHandshake, bytes]:
        init = InitiatorHandshake(ALICE, BOB.node_id)
        resp = ResponderHandshake(BOB)
        resp.read_first(strip(init.first_record()))
        return init, strip(resp.second_record()[0])

    _, message = pair()
    assert len(message) == 51
    for i in range(32, len(message)):  # e (32) | choice (3) | tag (16)
        for bit in range(8):
            init, message = pair()
            bad = bytearray(message)
            bad[i] ^= 1 << bit
            with pytest.raises(PeerAuthenticationError):
                init.read_second(bytes(bad))
    for size in (48, 49, 50):  # a stripped or cut choice
        init, message = pair()
        with pytest.raises(PeerAuthenticationError):
            init.read_second(message[:size])


# --- AESGCM transport vectors -----------------------------------------------


def _fixed_handshake() -> tuple[HandshakeState, HandshakeState]:
    init = HandshakeState(
        PROTOCOL_NAME, True, PROLOGUE, s=ALICE.x25519_private, e=bytes(range(1, 33)),
        rs=BOB.x25519_public,
    )  # fmt: skip
    resp = HandshakeState(PROTOCOL_NAME, False, PROLOGUE, s=BOB.x25519_private, e=bytes(32 * [7]))
    resp.read_message(init.write_message(NODE + OFFER))
    init.read_message(resp.write_message(b"\x01\x01\x02"))
    return init, resp


def _be_nonce(n: int) -> bytes:
    return bytes(4) + n.to_bytes(8, "big")


@needs_aesgcm
@pytest.mark.parametrize("fast", [True, False], ids=["lib", "bindings"])
def test_aesgcm_transport_vectors(fast: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(noise_mod, "_FAST_AEAD", fast and noise_mod._SODIUM is not None)
    init, resp = _fixed_handshake()
    c1, c2 = init.split("AESGCM")
    assert c1.cipher_name == c2.cipher_name == "AESGCM"
    assert c1._k is not None and c2._k is not None
    k1, k2 = c1._k, c2._k
    sender = TransportCipher(c1, c2, init.handshake_hash)
    receiver = TransportCipher.from_handshake(resp, "AESGCM")
    assert sender.cipher_name == receiver.cipher_name == "AESGCM"
    assert sender._fast is receiver._fast is noise_mod._FAST_AEAD
    reference = CryptographyAESGCM(k1)
    theirs = AESGCMCipher()
    theirs.initialize(k1)
    counters = [0, 1, 2, 255, 256, 2**32 + 5, 0x0102030405060708, 2**64 - 2]
    for i, n in enumerate(counters):
        plaintext = bytes([i]) * (i * 301)
        sender._send_n = receiver._recv_n = n
        record = sender.encrypt_record(plaintext)
        expected = reference.encrypt(_be_nonce(n), plaintext, b"")
        assert strip(record) == expected
        assert strip(record) == theirs.encrypt(k1, n, b"", plaintext)
        if n:  # the little-endian (ChaChaPoly-style) nonce gives something else
            le = bytes(4) + n.to_bytes(8, "little")
            assert reference.encrypt(le, plaintext, b"") != expected
        assert receiver.decrypt(expected) == plaintext
    # the other direction, under the second Split() key
    back = receiver.encrypt(b"back")
    assert back == CryptographyAESGCM(k2).encrypt(_be_nonce(0), b"back", b"")
    assert sender.decrypt(back) == b"back"
    # 2**64-1 is reserved
    with pytest.raises(LocalUsageError, match="nonce exhausted"):
        sender.encrypt(b"x")
    with pytest.raises(ProtocolError):
        receiver.decrypt(expected)


@needs_aesgcm
def test_aesgcm_cipher_state_with_ad() -> None:
    key = bytes(range(32))
    state = CipherState(key, "AESGCM")
    state.set_nonce(0x1122334455667788)
    ciphertext = state.encrypt_with_ad(b"associated", b"plaintext")
    assert ciphertext == CryptographyAESGCM(key).encrypt(
        _be_nonce(0x1122334455667788), b"plaintext", b"associated"
    )
    reader = CipherState(key, "AESGCM")
    reader.set_nonce(0x1122334455667788)
    with pytest.raises(ProtocolError):
        reader.decrypt_with_ad(b"other", ciphertext)
    assert reader.nonce == 0x1122334455667788  # not advanced on failure
    assert reader.decrypt_with_ad(b"associated", ciphertext) == b"plaintext"
    assert "AESGCM" in repr(reader) and key.hex() not in repr(reader)


@pytest.mark.parametrize("cipher", ["ChaChaPoly", "AESGCM"])
def test_rekey_matches_spec_and_noiseprotocol(cipher: str) -> None:
    if cipher not in available_ciphers():
        pytest.skip("AESGCM not available here")
    key = bytes(range(100, 132))
    ours = CipherState(key, cipher)
    ours.set_nonce(7)
    ours.rekey()
    assert ours.nonce == 7
    max_nonce = bytes(4) + b"\xff" * 8  # 2**64-1, same in either byte order
    if cipher == "AESGCM":
        expected = CryptographyAESGCM(key).encrypt(max_nonce, bytes(32), b"")[:32]
        theirs = AESGCMCipher()
    else:
        expected = ChaCha20Poly1305(key).encrypt(max_nonce, bytes(32), b"")[:32]
        theirs = ChaCha20Cipher()
    theirs.initialize(key)
    assert theirs.rekey(key) == expected
    assert ours._k == expected
    fresh = CipherState(expected, cipher)
    fresh.set_nonce(7)
    assert ours.encrypt_with_ad(b"", b"after rekey") == fresh.encrypt_with_ad(b"", b"after rekey")


def test_unknown_or_unavailable_cipher(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(LocalUsageError, match="unknown cipher"):
        CipherState(bytes(32), "ROT13")
    monkeypatch.setattr(noise_mod, "_AESGCM_AVAILABLE", False)
    with pytest.raises(LocalUsageError, match="not available"):
        CipherState(bytes(32), "AESGCM")
    init, _ = _fixed_handshake()
    with pytest.raises(LocalUsageError):
        TransportCipher.from_handshake(init, "AESGCM")
    assert TransportCipher.from_handshake(init).cipher_name == "ChaChaPoly"  # not consumed


@needs_aesgcm
def test_transport_directions_must_match() -> None:
    with pytest.raises(LocalUsageError, match="same cipher"):
        TransportCipher(CipherState(bytes(32), "AESGCM"), CipherState(bytes(32)), bytes(64))


# --- the libsodium hot path vs the public bindings ---------------------------


def _cipher_pairs(
    cipher: str, monkeypatch: pytest.MonkeyPatch
) -> tuple[TransportCipher, TransportCipher, TransportCipher, TransportCipher]:
    """(fast sender, fast receiver, slow sender, slow receiver), all with the same keys."""
    k1, k2 = bytes(range(32)), bytes(range(32, 64))

    def make(send: bytes, receive: bytes) -> TransportCipher:
        return TransportCipher(CipherState(send, cipher), CipherState(receive, cipher), b"h")

    fast_a, fast_b = make(k1, k2), make(k2, k1)
    monkeypatch.setattr(noise_mod, "_FAST_AEAD", False)
    slow_a, slow_b = make(k1, k2), make(k2, k1)
    monkeypatch.undo()
    assert fast_a._fast and fast_b._fast
    assert not slow_a._fast and not slow_b._fast
    return fast_a, fast_b, slow_a, slow_b


@needs_lib
@pytest.mark.parametrize("cipher", ["ChaChaPoly", "AESGCM"])
def test_lib_and_bindings_paths_are_identical(cipher: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if cipher not in available_ciphers():
        pytest.skip("AESGCM not available here")
    fast_a, fast_b, slow_a, slow_b = _cipher_pairs(cipher, monkeypatch)
    sizes = [0, 1, 15, 16, 17, 1000, 65000, MAX_PLAINTEXT_LEN]
    for i, size in enumerate(sizes):
        data = bytes((j * 7 + i) % 256 for j in range(size))
        for kind in (bytes, bytearray, memoryview):
            record = fast_a.encrypt_record(kind(data))
            assert record == slow_a.encrypt_record(kind(data))
            assert type(record) is bytes
            assert len(record) == 2 + size + 16
            # crossed: each path decrypts the other's, from any buffer type
            assert slow_b.decrypt(kind(record[2:])) == data
            assert fast_b.decrypt(memoryview(record)[2:]) == data
            message = fast_a.encrypt(kind(data))
            assert message == slow_a.encrypt(kind(data))
            assert type(message) is bytes
            for receiver in (fast_b, slow_b):
                plaintext = receiver.decrypt(kind(message))
                assert plaintext == data and type(plaintext) in (bytes, bytearray)
    assert fast_a.send_nonce == slow_a.send_nonce == fast_b.receive_nonce == 2 * 3 * len(sizes)


@needs_lib
def test_multibyte_buffers_count_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    """A memoryview of 2-byte items is encrypted as all of its bytes."""
    fast_a, fast_b, slow_a, slow_b = _cipher_pairs("ChaChaPoly", monkeypatch)
    words = array.array("H", range(1000))
    message = fast_a.encrypt(memoryview(words))
    assert message == slow_a.encrypt(memoryview(words))
    assert len(message) == 2000 + 16
    assert fast_b.decrypt(message) == slow_b.decrypt(message) == words.tobytes()
    strided = memoryview(bytearray(range(200)))[::2]  # not contiguous: copied, same result
    message = fast_a.encrypt(strided)
    assert message == slow_a.encrypt(strided)
    spread = bytearray(2 * len(message))
    spread[::2] = message
    assert fast_b.decrypt(memoryview(spread)[::2]) == strided.tobytes()
    assert slow_b.decrypt(memoryview(spread)[::2]) == strided.tobytes()
    big = array.array("H", bytes(MAX_PLAINTEXT_LEN + 1))  # fewer items than bytes
    for sender in (fast_a, slow_a):
        with pytest.raises(LocalUsageError, match="at most"):
            sender.encrypt_record(memoryview(big))


@needs_lib
@pytest.mark.parametrize("cipher", ["ChaChaPoly", "AESGCM"])
def test_failures_do_not_advance_nonces_on_either_path(
    cipher: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if cipher not in available_ciphers():
        pytest.skip("AESGCM not available here")
    fast_a, fast_b, slow_a, slow_b = _cipher_pairs(cipher, monkeypatch)
    message = fast_a.encrypt(b"once")
    assert slow_a.encrypt(b"once") == message
    for receiver in (fast_b, slow_b):
        for bad in (bytes(16), message[:-1] + bytes([message[-1] ^ 1]), bytes(15)):
            with pytest.raises(ProtocolError):
                receiver.decrypt(bytearray(bad))
        with pytest.raises(ProtocolError):
            receiver.decrypt(bytes(MAX_MESSAGE_LEN + 1))
        assert receiver.receive_nonce == 0
        assert receiver.decrypt(message) == b"once"
        with pytest.raises(ProtocolError):  # replay
            receiver.decrypt(message)
        assert receiver.receive_nonce == 1
    for sender in (fast_a, slow_a):
        with pytest.raises(LocalUsageError):
            sender.encrypt(bytearray(MAX_PLAINTEXT_LEN + 1))
        assert sender.send_nonce == 1
        sender._send_n = 2**64 - 1
        with pytest.raises(LocalUsageError, match="nonce exhausted"):
            sender.encrypt_record(b"")


@needs_lib
def test_fallback_path_in_a_full_handshake(monkeypatch: pytest.MonkeyPatch) -> None:
    """A node without the cffi module talks to one with it, for each cipher."""
    for dialer in (None, ["ChaChaPoly"]):
        init = InitiatorHandshake(ALICE, BOB.node_id, ciphers=dialer)
        resp = ResponderHandshake(BOB)
        resp.read_first(strip(init.first_record()))
        record, resp_result = resp.second_record()  # the responder uses the lib
        with monkeypatch.context() as patch:
            patch.setattr(noise_mod, "_FAST_AEAD", False)
            init_result = init.read_second(strip(record))
        assert resp_result.cipher._fast and not init_result.cipher._fast
        assert init_result.cipher_name == resp_result.cipher_name
        round_trip(init_result.cipher, resp_result.cipher)


def test_import_guard_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "nacl._sodium", None)  # import fails
    assert noise_mod._load_sodium() is None
    fake_lib = types.SimpleNamespace(crypto_aead_chacha20poly1305_ietf_encrypt=print)
    fake = types.SimpleNamespace(ffi=types.SimpleNamespace(), lib=fake_lib)
    monkeypatch.setitem(sys.modules, "nacl._sodium", fake)  # symbols missing
    assert noise_mod._load_sodium() is None
    monkeypatch.undo()
    assert (noise_mod._load_sodium() is not None) is (noise_mod._SODIUM is not None)


def test_aesgcm_detection_without_the_cffi_module() -> None:
    """The last-resort probe (public bindings only) agrees with libsodium's answer."""
    assert noise_mod._aesgcm_available(None) is noise_mod._AESGCM_AVAILABLE


def test_buffers_are_allocated_on_first_use() -> None:
    a = TransportCipher(CipherState(bytes(32)), CipherState(bytes(range(32))), b"h")
    assert a._out is None and a._plain is None
    if a._fast:
        a.encrypt(b"x")
        assert a._out is not None and a._plain is None
