"""The cacophony Noise vectors, byte for byte, through capsock.core.noise.

The vector file and its provenance README live in ``tests/data/vectors/noise/``
(copied unchanged from ``shared/vectors/noise/``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from capsock.core.noise import CipherState, HandshakeState, TransportCipher

VECTOR_FILE = (
    Path(__file__).parent
    / "data"
    / "vectors"
    / "noise"
    / "cacophony_25519_ChaChaPoly_BLAKE2b_subset.json"
)
VECTORS: list[dict[str, Any]] = json.loads(VECTOR_FILE.read_text())["vectors"]


def _opt(vector: dict[str, Any], key: str) -> bytes | None:
    value = vector.get(key)
    return bytes.fromhex(value) if value is not None else None


def _states(vector: dict[str, Any]) -> tuple[HandshakeState, HandshakeState]:
    name = vector["protocol_name"]
    sides = []
    for prefix, initiator in (("init_", True), ("resp_", False)):
        sides.append(
            HandshakeState(
                name,
                initiator,
                bytes.fromhex(vector[prefix + "prologue"]),
                s=_opt(vector, prefix + "static"),
                e=_opt(vector, prefix + "ephemeral"),
                rs=_opt(vector, prefix + "remote_static"),
                psks=[bytes.fromhex(p) for p in vector.get(prefix + "psks", [])],
            )
        )
    return sides[0], sides[1]


def _run_handshake(vector: dict[str, Any], init: HandshakeState, resp: HandshakeState) -> int:
    """Run the handshake messages of ``vector``; return how many there were."""
    index = 0
    for index, msg in enumerate(vector["messages"]):
        if init.complete:
            return index
        sender, receiver = (init, resp) if index % 2 == 0 else (resp, init)
        assert sender.writing and not receiver.writing
        payload = bytes.fromhex(msg["payload"])
        ciphertext = bytes.fromhex(msg["ciphertext"])
        assert sender.write_message(payload).hex() == ciphertext.hex()
        assert receiver.read_message(ciphertext) == payload
    assert init.complete
    return index + 1


def test_vector_file_is_complete() -> None:
    names = {v["protocol_name"] for v in VECTORS}
    assert len(VECTORS) == 12
    for pattern in (
        "NN",
        "NK",
        "KK",
        "XK",
        "IK",
        "XX",
        "XKpsk3",
        "XXpsk3",
        "KKpsk0",
        "KKpsk2",
        "IKpsk1",
        "IKpsk2",
    ):
        assert f"Noise_{pattern}_25519_ChaChaPoly_BLAKE2b" in names
    assert (VECTOR_FILE.parent / "README.md").is_file()


@pytest.mark.parametrize("vector", VECTORS, ids=[v["protocol_name"] for v in VECTORS])
def test_vector_with_cipher_states(vector: dict[str, Any]) -> None:
    init, resp = _states(vector)
    done = _run_handshake(vector, init, resp)
    assert init.complete and resp.complete
    expected_hash = bytes.fromhex(vector["handshake_hash"])
    assert init.handshake_hash == expected_hash
    assert resp.handshake_hash == expected_hash

    init_c1, init_c2 = init.split()
    resp_c1, resp_c2 = resp.split()
    transport = vector["messages"][done:]
    assert transport, "every vector continues after the handshake"
    for offset, msg in enumerate(transport):
        index = done + offset
        send, receive = (init_c1, resp_c1) if index % 2 == 0 else (resp_c2, init_c2)
        payload = bytes.fromhex(msg["payload"])
        ciphertext = bytes.fromhex(msg["ciphertext"])
        assert send.encrypt_with_ad(b"", payload).hex() == ciphertext.hex()
        assert receive.decrypt_with_ad(b"", ciphertext) == payload


@pytest.mark.parametrize("vector", VECTORS, ids=[v["protocol_name"] for v in VECTORS])
def test_vector_with_transport_cipher(vector: dict[str, Any]) -> None:
    init, resp = _states(vector)
    done = _run_handshake(vector, init, resp)
    init_t = TransportCipher.from_handshake(init)
    resp_t = TransportCipher.from_handshake(resp)
    expected_hash = bytes.fromhex(vector["handshake_hash"])
    assert init_t.handshake_hash == resp_t.handshake_hash == expected_hash
    for offset, msg in enumerate(vector["messages"][done:]):
        index = done + offset
        send, receive = (init_t, resp_t) if index % 2 == 0 else (resp_t, init_t)
        payload = bytes.fromhex(msg["payload"])
        ciphertext = bytes.fromhex(msg["ciphertext"])
        # bytes, bytearray and memoryview input give the same message
        kind = (bytes, bytearray, memoryview)[offset % 3]
        assert send.encrypt(kind(payload)).hex() == ciphertext.hex()
        assert receive.decrypt(kind(ciphertext)) == payload


def test_split_hands_out_ciphers_once() -> None:
    vector = VECTORS[0]
    init, resp = _states(vector)
    _run_handshake(vector, init, resp)
    init.split()
    from capsock.errors import LocalUsageError

    with pytest.raises(LocalUsageError):
        init.split()


def test_rekey_matches_spec_definition() -> None:
    """REKEY(k) = first 32 bytes of ENCRYPT(k, 2**64-1, "", zeros(32))."""
    key = bytes(range(32))
    cipher = CipherState(key)
    cipher.rekey()
    probe = CipherState(key)
    probe.set_nonce(2**64 - 2)  # the last usable nonce ...
    probe.encrypt_with_ad(b"", b"")
    # ... after which the reserved nonce is refused:
    from capsock.errors import LocalUsageError

    with pytest.raises(LocalUsageError):
        probe.encrypt_with_ad(b"", b"")
    from nacl.bindings import crypto_aead_chacha20poly1305_ietf_encrypt

    expected = crypto_aead_chacha20poly1305_ietf_encrypt(
        bytes(32), None, bytes(4) + (2**64 - 1).to_bytes(8, "little"), key
    )[:32]
    assert cipher.has_key()
    other = CipherState(expected)
    assert cipher.encrypt_with_ad(b"ad", b"x") == other.encrypt_with_ad(b"ad", b"x")
