"""capsock's IK handshake and the transport layer beneath sessions (sans-IO)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from capsock.core.handshake import (
    CIPHER_CHOICE_LEN,
    CIPHER_OFFER_LEN,
    FIRST_MESSAGE_LEN,
    SECOND_MESSAGE_LEN,
    HandshakeResult,
    InitiatorHandshake,
    ResponderHandshake,
    expected_first_message_len,
)
from capsock.core.noise import (
    MAX_MESSAGE_LEN,
    MAX_PLAINTEXT_LEN,
    PROLOGUE,
    PROTOCOL_NAME,
    HandshakeState,
    TransportCipher,
)
from capsock.core.records import RecordReader
from capsock.errors import (
    CapsockError,
    HandshakeError,
    LocalUsageError,
    PeerAuthenticationError,
    ProtocolError,
)
from capsock.keys import KeyPair, NodeId

ALICE = KeyPair(bytes(range(32)))
BOB = KeyPair(bytes(range(32, 64)))
CAROL = KeyPair(bytes(range(64, 96)))

# X25519 public keys of small order (and non-canonical encodings of them).
LOW_ORDER = [
    bytes(32),
    (1).to_bytes(32, "little"),
    bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
    bytes.fromhex("5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157"),
    bytes.fromhex("ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"),
    bytes.fromhex("edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"),
    bytes.fromhex("eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"),
]


def strip(record: bytes) -> bytes:
    """The Noise message inside a record (checks the prefix)."""
    assert int.from_bytes(record[:2], "big") == len(record) - 2
    return record[2:]


def handshake(
    dialer: KeyPair = ALICE, listener: KeyPair = BOB
) -> tuple[HandshakeResult, HandshakeResult]:
    init = InitiatorHandshake(dialer, listener.node_id)
    resp = ResponderHandshake(listener)
    assert resp.read_first(strip(init.first_record())) == dialer.node_id
    record, resp_result = resp.second_record()
    init_result = init.read_second(strip(record))
    return init_result, resp_result


def first_message_with_payload(payload: bytes, static: KeyPair = ALICE) -> bytes:
    """IK message 1 to BOB from ``static``'s X25519 key with any payload."""
    hs = HandshakeState(
        PROTOCOL_NAME, True, PROLOGUE, s=static.x25519_private, rs=BOB.x25519_public
    )
    return hs.write_message(payload)


def test_sans_io_modules_do_no_io() -> None:
    """noise and handshake import neither anyio nor any I/O module."""
    import capsock.core.noise

    src = Path(capsock.core.noise.__file__).parent
    allowed = {
        "__future__",
        "collections",
        "dataclasses",
        "hashlib",
        "hmac",
        "os",
        "re",
        "struct",
        "typing",
        "nacl",
        "errors",
        "keys",
        "noise",
        "records",
        "_noise_crypto",
        "_noise_handshake",
        "_noise_transport",
    }
    names = ("noise.py", "_noise_crypto.py", "_noise_handshake.py", "_noise_transport.py")
    for name in (*names, "handshake.py", "records.py"):
        tree = ast.parse((src / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                modules = [node.module or alias.name for alias in node.names]
            else:
                continue
            for module in modules:
                assert module.split(".")[0] in allowed, (name, module)


# --- round trip --------------------------------------------------------------


def test_round_trip() -> None:
    init, resp = handshake()
    assert init.cipher_name == resp.cipher_name == init.cipher.cipher_name
    assert init.is_initiator and not resp.is_initiator
    assert init.peer == BOB.node_id and resp.peer == ALICE.node_id
    assert init.handshake_hash == resp.handshake_hash
    assert init.cipher.handshake_hash == init.handshake_hash
    assert len(init.handshake_hash) == 64
    for i in range(5):
        data = bytes([i]) * (i * 1000)
        assert resp.cipher.decrypt(init.cipher.encrypt(data)) == data
        assert init.cipher.decrypt(resp.cipher.encrypt(data[::-1])) == data[::-1]


def test_message_sizes() -> None:
    assert (FIRST_MESSAGE_LEN, CIPHER_OFFER_LEN) == (128, 4)
    assert (SECOND_MESSAGE_LEN, CIPHER_CHOICE_LEN) == (48, 3)
    assert expected_first_message_len() == FIRST_MESSAGE_LEN
    assert expected_first_message_len(10) == FIRST_MESSAGE_LEN + 10
    # Without a cipher offer: the plain sizes.
    init = InitiatorHandshake(ALICE, BOB.node_id, ciphers=["ChaChaPoly"])
    assert init.offered_ciphers == ()
    first = init.first_record()
    assert len(first) == 2 + FIRST_MESSAGE_LEN
    resp = ResponderHandshake(BOB)
    resp.read_first(strip(first))
    second, _ = resp.second_record()
    assert len(second) == 2 + SECOND_MESSAGE_LEN
    # Defaults: an offer (and a choice) exactly when AESGCM is available here.
    init = InitiatorHandshake(ALICE, BOB.node_id)
    offering = bool(init.offered_ciphers)
    first = init.first_record()
    assert len(first) == 2 + expected_first_message_len(CIPHER_OFFER_LEN if offering else 0)
    assert len(first) <= 2 + 132 < 1024  # the session's cap on message 1
    resp = ResponderHandshake(BOB)
    resp.read_first(strip(first))
    second, _ = resp.second_record()
    assert len(second) == 2 + SECOND_MESSAGE_LEN + (CIPHER_CHOICE_LEN if offering else 0)


def test_fresh_ephemerals_give_fresh_sessions() -> None:
    a, _ = handshake()
    b, _ = handshake()
    assert a.handshake_hash != b.handshake_hash


def test_fixed_ephemeral_is_deterministic() -> None:
    one = InitiatorHandshake(ALICE, BOB.node_id, ephemeral=bytes(range(1, 33)))
    two = InitiatorHandshake(ALICE, BOB.node_id, ephemeral=bytes(range(1, 33)))
    assert one.first_record() == two.first_record()


def test_no_secrets_in_repr() -> None:
    init, resp = handshake()
    secrets = [ALICE.seed, ALICE.x25519_private, BOB.seed, BOB.x25519_private]
    secrets += [init.cipher._send_key, init.cipher._recv_key]
    hs = InitiatorHandshake(ALICE, BOB.node_id)
    texts = [repr(init), repr(resp), repr(init.cipher), repr(hs), repr(hs._noise)]
    for text in texts:
        for secret in secrets:
            assert secret.hex() not in text and repr(secret) not in text
    assert repr(init.cipher) == "TransportCipher(sent=0, received=0)"
    assert "peer=" in repr(init) and "is_initiator=True" in repr(init)


def test_records_through_reader() -> None:
    init, resp = handshake()
    sizes = [1, 100, MAX_PLAINTEXT_LEN, 0, 7, 65000]
    payloads = [bytes([n % 251]) * n for n in sizes]
    stream = b"".join(init.cipher.encrypt_record(p) for p in payloads)

    def decode(chunks: list[bytes], resp_cipher: TransportCipher) -> list[bytes]:
        reader = RecordReader()
        out = []
        for chunk in chunks:
            reader.feed(chunk)
            while (record := reader.next_record()) is not None:
                out.append(resp_cipher.decrypt(record))
        assert reader.buffered == 0
        return out

    assert decode([stream], resp.cipher) == payloads
    init2, resp2 = handshake()
    stream2 = b"".join(init2.cipher.encrypt_record(memoryview(p)) for p in payloads)
    assert decode([stream2[i : i + 1] for i in range(len(stream2))], resp2.cipher) == payloads


def test_reader_with_trailing_bytes() -> None:
    init, resp = handshake()
    first = init.cipher.encrypt_record(b"hello")
    second = init.cipher.encrypt_record(b"world")
    reader = RecordReader()
    reader.feed(first + second[:5])
    assert resp.cipher.decrypt(reader.next_record() or b"") == b"hello"
    assert reader.next_record() is None
    assert reader.buffered == 5  # a truncated record at EOF is visible
    reader.feed(bytearray(second[5:]))
    assert resp.cipher.decrypt(reader.next_record() or b"") == b"world"
    assert reader.next_record() is None and reader.buffered == 0


def test_reader_holds_at_most_one_partial_record() -> None:
    reader = RecordReader()
    record = b"\x10\x00" + bytes(0x1000)
    stream = record * 2000
    for cut in range(0, len(stream), 7777):  # chunks that split records anywhere
        reader.feed(stream[cut : cut + 7777])
        while (got := reader.next_record()) is not None:
            assert got == bytes(0x1000)
        assert len(reader._partial) < len(record)
    assert reader.buffered == 0


def test_zero_length_record_is_protocol_error() -> None:
    reader = RecordReader()
    reader.feed(b"\x00")
    assert reader.next_record() is None
    reader.feed(b"\x00rest")
    with pytest.raises(ProtocolError, match="zero-length"):
        reader.next_record()


def test_oversized_plaintext_and_messages() -> None:
    init, resp = handshake()
    with pytest.raises(LocalUsageError, match="at most"):
        init.cipher.encrypt(bytes(MAX_PLAINTEXT_LEN + 1))
    with pytest.raises(LocalUsageError):
        init.cipher.encrypt_record(bytes(MAX_PLAINTEXT_LEN + 1))
    assert init.cipher.send_nonce == 0  # refusals do not burn nonces
    record = init.cipher.encrypt_record(bytes(MAX_PLAINTEXT_LEN))
    assert len(record) == 2 + MAX_MESSAGE_LEN
    with pytest.raises(ProtocolError):
        resp.cipher.decrypt(bytes(MAX_MESSAGE_LEN + 1))
    with pytest.raises(ProtocolError):
        resp.cipher.decrypt(bytes(15))
    assert resp.cipher.decrypt(record[2:]) == bytes(MAX_PLAINTEXT_LEN)


# --- transport failures ------------------------------------------------------


def test_nonce_exhaustion() -> None:
    init, resp = handshake()
    init.cipher._send_n = 2**64 - 2
    resp.cipher._recv_n = 2**64 - 2
    assert resp.cipher.decrypt(init.cipher.encrypt(b"last")) == b"last"
    with pytest.raises(LocalUsageError, match="nonce exhausted"):
        init.cipher.encrypt(b"one too many")
    with pytest.raises(ProtocolError):
        resp.cipher.decrypt(bytes(32))


def test_replayed_record() -> None:
    init, resp = handshake()
    message = init.cipher.encrypt(b"pay me once")
    assert resp.cipher.decrypt(message) == b"pay me once"
    with pytest.raises(ProtocolError, match="failed authentication"):
        resp.cipher.decrypt(message)
    assert resp.cipher.receive_nonce == 1


def test_reordered_record_and_nonce_not_advanced() -> None:
    init, resp = handshake()
    one, two = init.cipher.encrypt(b"one"), init.cipher.encrypt(b"two")
    with pytest.raises(ProtocolError, match="transport record failed authentication"):
        resp.cipher.decrypt(two)
    assert resp.cipher.decrypt(one) == b"one"  # the failure did not advance the nonce
    assert resp.cipher.decrypt(two) == b"two"


def test_dropped_record() -> None:
    init, resp = handshake()
    init.cipher.encrypt(b"lost")
    with pytest.raises(ProtocolError):
        resp.cipher.decrypt(init.cipher.encrypt(b"after"))


def test_reflected_record() -> None:
    """A record sent back to its sender does not decrypt (distinct direction keys)."""
    init, _ = handshake()
    with pytest.raises(ProtocolError):
        init.cipher.decrypt(init.cipher.encrypt(b"echo"))


def test_corrupted_record_every_byte() -> None:
    init, resp = handshake()
    message = init.cipher.encrypt(b"x" * 20)
    for i in range(len(message)):
        bad = bytearray(message)
        bad[i] ^= 0x01
        with pytest.raises(ProtocolError):
            resp.cipher.decrypt(bytes(bad))
    assert resp.cipher.decrypt(message) == b"x" * 20


# --- who may talk to whom ----------------------------------------------------


def test_dialing_own_id_refused() -> None:
    with pytest.raises(LocalUsageError, match="own id"):
        InitiatorHandshake(ALICE, ALICE.node_id)


def test_dialing_own_sign_flipped_id_refused() -> None:
    """Ed25519 keys A and -A convert to the same X25519 key: still oneself."""
    twin = NodeId(ALICE.node_id.raw[:31] + bytes([ALICE.node_id.raw[31] ^ 0x80]))
    assert twin != ALICE.node_id and twin.x25519() == ALICE.x25519_public
    with pytest.raises(LocalUsageError, match="own id"):
        InitiatorHandshake(ALICE, twin)


def test_dialing_invalid_key_refused() -> None:
    invalid = NodeId(bytes(32))  # small-order point, not a valid Ed25519 key
    with pytest.raises(PeerAuthenticationError):
        InitiatorHandshake(ALICE, invalid)


def test_wrong_remote_key() -> None:
    """ALICE dials BOB's id but reaches CAROL: CAROL cannot read message 1."""
    init = InitiatorHandshake(ALICE, BOB.node_id)
    carol = ResponderHandshake(CAROL)
    with pytest.raises(HandshakeError, match="not made for this node"):
        carol.read_first(strip(init.first_record()))
    with pytest.raises(LocalUsageError):
        carol.second_record()


def test_impostor_answer_is_peer_authentication_error() -> None:
    """An answer from a node without BOB's key never yields a result."""
    init = InitiatorHandshake(ALICE, BOB.node_id)
    init.first_record()
    # CAROL pretends: she writes a well-formed IK answer to her own first message.
    other = InitiatorHandshake(ALICE, CAROL.node_id)
    carol = ResponderHandshake(CAROL)
    carol.read_first(strip(other.first_record()))
    record, _ = carol.second_record()
    with pytest.raises(PeerAuthenticationError, match="did not prove it holds the key"):
        init.read_second(strip(record))
    with pytest.raises(LocalUsageError):
        init.read_second(strip(record))


def test_payload_key_not_matching_static_key() -> None:
    resp = ResponderHandshake(BOB)
    with pytest.raises(PeerAuthenticationError, match="claims to be"):
        resp.read_first(first_message_with_payload(CAROL.node_id.raw))


def test_payload_key_invalid_ed25519() -> None:
    resp = ResponderHandshake(BOB)
    with pytest.raises(PeerAuthenticationError):
        resp.read_first(first_message_with_payload(bytes(32)))


def test_known_limitation_sign_flipped_payload_key() -> None:
    """Documented limitation (core.handshake docstring): the X25519 key fixes an Ed25519 key only
    up to its sign bit, so a dialer can present its own id with the sign bit
    flipped.  Nobody else can, so no other node can be impersonated; if this
    test starts failing, the protocol gained an Ed25519 proof -- update it."""
    twin = ALICE.node_id.raw[:31] + bytes([ALICE.node_id.raw[31] ^ 0x80])
    resp = ResponderHandshake(BOB)
    assert resp.read_first(first_message_with_payload(twin)) == NodeId(twin)


def test_payload_too_short() -> None:
    for size in (0, 1, 31):
        resp = ResponderHandshake(BOB)
        with pytest.raises(HandshakeError, match="node id"):
            resp.read_first(first_message_with_payload(ALICE.node_id.raw[:size]))


def test_unknown_extensions_ignored_in_first_message() -> None:
    resp = ResponderHandshake(BOB)
    extensions = b"\x7f\x0e" + b"future extensi" + b"\x80\x00"  # two unknown types
    message = first_message_with_payload(ALICE.node_id.raw + extensions)
    assert len(message) == expected_first_message_len(18)
    assert resp.read_first(message) == ALICE.node_id
    record, result = resp.second_record()
    assert result.peer == ALICE.node_id
    assert result.cipher_name == "ChaChaPoly"
    assert len(strip(record)) == SECOND_MESSAGE_LEN  # no offer: no choice


@pytest.mark.parametrize("extensions", [b"", b"\x7f\x03abc", b"\x02\x00\xff\x01\x01"])
def test_unknown_extensions_ignored_in_second_message(extensions: bytes) -> None:
    init = InitiatorHandshake(ALICE, BOB.node_id)
    hs = HandshakeState(PROTOCOL_NAME, False, PROLOGUE, s=BOB.x25519_private)
    hs.read_message(strip(init.first_record()))
    result = init.read_second(hs.write_message(extensions))
    assert result.handshake_hash == hs.handshake_hash
    assert result.cipher_name == "ChaChaPoly"
    theirs = TransportCipher.from_handshake(hs)
    assert theirs.decrypt(result.cipher.encrypt(b"hi")) == b"hi"


@pytest.mark.parametrize("extensions", [b"\x7f", b"\x7f\x01", b"\x7f\x05abcd", b"\x01"])
def test_malformed_extensions_in_first_message(extensions: bytes) -> None:
    resp = ResponderHandshake(BOB)
    with pytest.raises(HandshakeError, match="extension"):
        resp.read_first(first_message_with_payload(ALICE.node_id.raw + extensions))
    with pytest.raises(LocalUsageError):
        resp.second_record()


def test_reflection_refused() -> None:
    """A node that receives its own first message (it dialled itself by a bad route)."""
    hs = HandshakeState(PROTOCOL_NAME, True, PROLOGUE, s=BOB.x25519_private, rs=BOB.x25519_public)
    message = hs.write_message(BOB.node_id.raw)
    with pytest.raises(HandshakeError, match="itself"):
        ResponderHandshake(BOB).read_first(message)


# --- malformed handshake messages -------------------------------------------


@pytest.mark.parametrize("point", LOW_ORDER, ids=[p.hex()[:8] for p in LOW_ORDER])
def test_low_order_ephemeral_in_first_message(point: bytes) -> None:
    message = strip(InitiatorHandshake(ALICE, BOB.node_id).first_record())
    with pytest.raises(HandshakeError, match="low-order"):
        ResponderHandshake(BOB).read_first(point + message[32:])


@pytest.mark.parametrize("point", LOW_ORDER, ids=[p.hex()[:8] for p in LOW_ORDER])
def test_low_order_ephemeral_in_second_message(point: bytes) -> None:
    init = InitiatorHandshake(ALICE, BOB.node_id)
    resp = ResponderHandshake(BOB)
    resp.read_first(strip(init.first_record()))
    record, _ = resp.second_record()
    with pytest.raises(HandshakeError, match="low-order"):
        init.read_second(point + strip(record)[32:])


def test_low_order_static_key_in_first_message() -> None:
    """A dialer announcing a low-order static key: the responder's ``ss`` is all zero."""
    for point in LOW_ORDER:
        hs = HandshakeState(
            PROTOCOL_NAME, True, PROLOGUE, s=ALICE.x25519_private, rs=BOB.x25519_public
        )
        hs._s_pub = point  # forge the announced static key; our own DHs still work
        message = hs.write_message(ALICE.node_id.raw)
        with pytest.raises(HandshakeError, match="low-order"):
            ResponderHandshake(BOB).read_first(message)


def test_truncated_first_message() -> None:
    message = strip(InitiatorHandshake(ALICE, BOB.node_id).first_record())
    for size in range(len(message)):
        with pytest.raises(HandshakeError):
            ResponderHandshake(BOB).read_first(message[:size])


def test_extended_first_message() -> None:
    message = strip(InitiatorHandshake(ALICE, BOB.node_id).first_record())
    for extra in (b"\x00", b"junk" * 10):
        with pytest.raises(HandshakeError):
            ResponderHandshake(BOB).read_first(message + extra)
    with pytest.raises(HandshakeError, match="exceeds"):
        ResponderHandshake(BOB).read_first(message + bytes(MAX_MESSAGE_LEN))


def test_bit_flipped_first_message() -> None:
    message = strip(InitiatorHandshake(ALICE, BOB.node_id).first_record())
    for i in range(len(message)):
        for bit in (0x01, 0x80):
            bad = bytearray(message)
            bad[i] ^= bit
            with pytest.raises(HandshakeError):
                ResponderHandshake(BOB).read_first(bytes(bad))


def _second_pair() -> tuple[InitiatorHandshake, bytes]:
    init = InitiatorHandshake(ALICE, BOB.node_id)
    resp = ResponderHandshake(BOB)
    resp.read_first(strip(init.first_record()))
    record, _ = resp.second_record()
    return init, strip(record)


def test_truncated_second_message() -> None:
    _, message = _second_pair()
    for size in range(len(message)):
        init, _ = _second_pair()
        if size < SECOND_MESSAGE_LEN:
            with pytest.raises(HandshakeError, match="at least"):
                init.read_second(message[:size])
        else:  # a cut cipher choice: the tag no longer verifies
            with pytest.raises(PeerAuthenticationError):
                init.read_second(message[:size])


def test_extended_or_flipped_second_message() -> None:
    init, message = _second_pair()
    with pytest.raises(PeerAuthenticationError):
        init.read_second(message + b"\x00")
    for i in range(len(message)):
        init, message = _second_pair()
        bad = bytearray(message)
        bad[i] ^= 0x04
        with pytest.raises(PeerAuthenticationError):
            init.read_second(bytes(bad))


def test_out_of_order_calls() -> None:
    init = InitiatorHandshake(ALICE, BOB.node_id)
    with pytest.raises(LocalUsageError):
        init.read_second(bytes(48))
    init.first_record()
    with pytest.raises(LocalUsageError):
        init.first_record()
    resp = ResponderHandshake(BOB)
    with pytest.raises(LocalUsageError):
        resp.second_record()


def test_failed_responder_cannot_continue() -> None:
    resp = ResponderHandshake(BOB)
    with pytest.raises(HandshakeError):
        resp.read_first(bytes(200))
    with pytest.raises(LocalUsageError):
        resp.read_first(strip(InitiatorHandshake(ALICE, BOB.node_id).first_record()))


# --- property tests: random input only ever raises capsock errors ----------

_fast = settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)


@_fast
@given(st.binary(max_size=400) | st.binary(min_size=128, max_size=128))
def test_random_first_message(data: bytes) -> None:
    with pytest.raises(CapsockError):
        ResponderHandshake(BOB).read_first(data)


@_fast
@given(st.binary(max_size=200) | st.binary(min_size=48, max_size=48))
def test_random_second_message(data: bytes) -> None:
    init = InitiatorHandshake(ALICE, BOB.node_id)
    init.first_record()
    with pytest.raises(CapsockError):
        init.read_second(data)


_PAIR = handshake()


@_fast
@given(st.binary(max_size=300))
def test_random_transport_message(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        _PAIR[1].cipher.decrypt(data)


@_fast
@given(st.lists(st.binary(max_size=300), max_size=10))
def test_random_records(chunks: list[bytes]) -> None:
    reader = RecordReader()
    total = 0
    try:
        for chunk in chunks:
            reader.feed(chunk)
            while (record := reader.next_record()) is not None:
                assert record
                total += 2 + len(record)
    except CapsockError:
        return
    assert total + reader.buffered == sum(map(len, chunks))


def test_the_old_record_method_names_still_work() -> None:
    """``first_message``/``second_message`` were renamed ``first_record``/``second_record``
    (they return records, while ``read_first``/``read_second`` take messages); the old
    names stay as aliases of the same methods."""
    assert InitiatorHandshake.first_message is InitiatorHandshake.first_record
    assert ResponderHandshake.second_message is ResponderHandshake.second_record
