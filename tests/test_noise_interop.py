"""Interoperability with an independent Noise implementation (``noiseprotocol``).

capsock's Noise layer must complete IK handshakes with it in both directions,
byte for byte, and the capsock-level handshake (32-byte Ed25519 payload) must
work against a plain Noise peer: DESIGN.md §4.2 promises that any Noise library
can complete a handshake with a capsock node.  The transport-cipher negotiation
(capsock's handshake extensions) must leave such a peer with plain, standard
ChaChaPoly transport whichever side it is on, and a Noise library that does
implement the extensions must get AES-256-GCM transport with the Noise spec's
AESGCM cipher function.
"""

from __future__ import annotations

import os

import pytest

# The third-party package is importable as ``noise``; capsock's module is
# ``capsock.core.noise``, so the names never clash.
from noise.connection import Keypair, NoiseConnection

from capsock.core.handshake import InitiatorHandshake, ResponderHandshake
from capsock.core.noise import (
    PROLOGUE,
    PROTOCOL_NAME,
    HandshakeState,
    TransportCipher,
    available_ciphers,
)
from capsock.errors import PeerAuthenticationError
from capsock.keys import KeyPair, NodeId

ALICE = KeyPair(bytes(range(32)))
BOB = KeyPair(bytes(range(32, 64)))
MESSAGES = [b"", b"a", b"hello capsock", os.urandom(1000), bytes(65535 - 16)]
OFFER = b"\x01\x02\x02\x01"  # extension 1, two ids: AESGCM, ChaChaPoly
needs_aesgcm = pytest.mark.skipif(
    "AESGCM" not in available_ciphers(), reason="libsodium has no AES-256-GCM on this CPU"
)


def test_capsock_noise_is_not_the_third_party_noise() -> None:
    import noise

    import capsock.core.noise

    assert capsock.core.noise is not noise
    assert noise.__file__ != capsock.core.noise.__file__


def _their(initiator: bool, static: bytes, remote: bytes | None) -> NoiseConnection:
    conn = NoiseConnection.from_name(PROTOCOL_NAME)
    if initiator:
        conn.set_as_initiator()
    else:
        conn.set_as_responder()
    conn.set_prologue(PROLOGUE)
    conn.set_keypair_from_private_bytes(Keypair.STATIC, static)
    if remote is not None:
        conn.set_keypair_from_public_bytes(Keypair.REMOTE_STATIC, remote)
    conn.start_handshake()
    return conn


def _exchange(ours: TransportCipher, theirs: NoiseConnection) -> None:
    for data in MESSAGES:
        assert theirs.decrypt(ours.encrypt(data)) == data
        assert ours.decrypt(bytes(theirs.encrypt(data))) == data
    # interleaved, several in a row each way
    sent = [ours.encrypt(m) for m in MESSAGES[:3]]
    assert [theirs.decrypt(m) for m in sent] == MESSAGES[:3]
    back = [bytes(theirs.encrypt(m)) for m in MESSAGES[:3]]
    assert [ours.decrypt(m) for m in back] == MESSAGES[:3]


@pytest.mark.parametrize("payloads", [(b"", b""), (b"first", b"second" * 100)])
def test_our_initiator_their_responder(payloads: tuple[bytes, bytes]) -> None:
    ours = HandshakeState(
        PROTOCOL_NAME, True, PROLOGUE, s=ALICE.x25519_private, rs=BOB.x25519_public
    )
    theirs = _their(False, BOB.x25519_private, None)
    assert bytes(theirs.read_message(ours.write_message(payloads[0]))) == payloads[0]
    assert ours.read_message(bytes(theirs.write_message(payloads[1]))) == payloads[1]
    assert theirs.handshake_finished and ours.complete
    assert ours.handshake_hash == theirs.get_handshake_hash()
    _exchange(TransportCipher.from_handshake(ours), theirs)


@pytest.mark.parametrize("payloads", [(b"", b""), (b"first" * 50, b"second")])
def test_their_initiator_our_responder(payloads: tuple[bytes, bytes]) -> None:
    theirs = _their(True, ALICE.x25519_private, BOB.x25519_public)
    ours = HandshakeState(PROTOCOL_NAME, False, PROLOGUE, s=BOB.x25519_private)
    assert ours.read_message(bytes(theirs.write_message(payloads[0]))) == payloads[0]
    assert ours.remote_static == ALICE.x25519_public
    assert bytes(theirs.read_message(ours.write_message(payloads[1]))) == payloads[1]
    assert ours.handshake_hash == theirs.get_handshake_hash()
    _exchange(TransportCipher.from_handshake(ours), theirs)


@pytest.mark.parametrize("ciphers", [None, ["ChaChaPoly"]], ids=["default", "chachapoly"])
def test_capsock_initiator_against_plain_noise_responder(ciphers: list[str] | None) -> None:
    """A responder that ignores extensions answers with an empty payload: ChaChaPoly."""
    init = InitiatorHandshake(ALICE, BOB.node_id, ciphers=ciphers)
    theirs = _their(False, BOB.x25519_private, None)
    record = init.first_record()
    assert int.from_bytes(record[:2], "big") == len(record) - 2
    payload = bytes(theirs.read_message(record[2:]))
    assert payload[:32] == ALICE.node_id.raw  # the dialer's Ed25519 key first
    assert payload[32:] == (OFFER if init.offered_ciphers else b"")
    if ciphers is not None:
        assert payload == ALICE.node_id.raw  # no offer: exactly the key
    remote_static = theirs.noise_protocol.handshake_state.rs.public_bytes
    assert NodeId(payload[:32]).x25519() == remote_static
    result = init.read_second(bytes(theirs.write_message(b"")))
    assert result.peer == BOB.node_id
    assert result.cipher_name == "ChaChaPoly"
    assert result.handshake_hash == theirs.get_handshake_hash()
    _exchange(result.cipher, theirs)


@pytest.mark.parametrize("ciphers", [None, ["ChaChaPoly"]], ids=["default", "chachapoly"])
def test_plain_noise_initiator_against_capsock_responder(ciphers: list[str] | None) -> None:
    """A dialer that sends only its key gets an empty answer and ChaChaPoly."""
    theirs = _their(True, ALICE.x25519_private, BOB.x25519_public)
    resp = ResponderHandshake(BOB, ciphers=ciphers)
    assert resp.read_first(bytes(theirs.write_message(ALICE.node_id.raw))) == ALICE.node_id
    record, result = resp.second_record()
    assert len(record) == 2 + 48
    assert bytes(theirs.read_message(record[2:])) == b""
    assert result.peer == ALICE.node_id
    assert result.cipher_name == "ChaChaPoly"
    assert result.handshake_hash == theirs.get_handshake_hash()
    _exchange(result.cipher, theirs)


def _switch_to_aesgcm(conn: NoiseConnection) -> None:
    """Give a finished noiseprotocol connection the spec's AESGCM cipher function,
    keyed with its own Split() keys: what a Noise library implementing capsock's
    cipher negotiation does."""
    from noise.backends.default.ciphers import AESGCMCipher

    proto = conn.noise_protocol
    for state in (proto.cipher_state_encrypt, proto.cipher_state_decrypt):
        state.cipher = AESGCMCipher()
        state.cipher.initialize(state.k)


@needs_aesgcm
def test_capsock_initiator_against_extension_aware_noise_responder() -> None:
    init = InitiatorHandshake(ALICE, BOB.node_id)
    theirs = _their(False, BOB.x25519_private, None)
    payload = bytes(theirs.read_message(init.first_record()[2:]))
    assert payload == ALICE.node_id.raw + OFFER
    result = init.read_second(bytes(theirs.write_message(b"\x01\x01\x02")))
    assert result.cipher_name == "AESGCM"
    assert result.handshake_hash == theirs.get_handshake_hash()
    _switch_to_aesgcm(theirs)
    _exchange(result.cipher, theirs)


@needs_aesgcm
def test_extension_aware_noise_initiator_against_capsock_responder() -> None:
    theirs = _their(True, ALICE.x25519_private, BOB.x25519_public)
    resp = ResponderHandshake(BOB)
    message = bytes(theirs.write_message(ALICE.node_id.raw + OFFER))
    assert resp.read_first(message) == ALICE.node_id
    record, result = resp.second_record()
    assert bytes(theirs.read_message(record[2:])) == b"\x01\x01\x02"
    assert result.cipher_name == "AESGCM"
    assert result.handshake_hash == theirs.get_handshake_hash()
    _switch_to_aesgcm(theirs)
    _exchange(result.cipher, theirs)


def test_plain_noise_initiator_with_wrong_payload_key() -> None:
    other = KeyPair(bytes(range(64, 96)))
    theirs = _their(True, ALICE.x25519_private, BOB.x25519_public)
    with pytest.raises(PeerAuthenticationError):
        ResponderHandshake(BOB).read_first(bytes(theirs.write_message(other.node_id.raw)))


def test_psk_pattern_interop() -> None:
    """The shared symmetric code also agrees on a psk pattern."""
    psk = os.urandom(32)
    name = b"Noise_XXpsk3_25519_ChaChaPoly_BLAKE2b"
    ours = HandshakeState(name, True, PROLOGUE, s=ALICE.x25519_private, psks=[psk])
    theirs = NoiseConnection.from_name(name)
    theirs.set_as_responder()
    theirs.set_prologue(PROLOGUE)
    theirs.set_psks(psk=psk)
    theirs.set_keypair_from_private_bytes(Keypair.STATIC, BOB.x25519_private)
    theirs.start_handshake()
    theirs.read_message(ours.write_message(b"1"))
    ours.read_message(bytes(theirs.write_message(b"2")))
    theirs.read_message(ours.write_message(b"3"))
    assert ours.complete and theirs.handshake_finished
    assert ours.handshake_hash == theirs.get_handshake_hash()
    _exchange(TransportCipher.from_handshake(ours), theirs)
