"""The golden vectors in docs/vectors/: capsock makes them, the spec client agrees.

Each vector is checked twice: ``scripts/gen_golden_vectors.py`` (which drives
capsock) must reproduce the files byte for byte, and ``tests/spec_client.py``
(written from docs/protocol.md, no capsock imports) must reproduce what a
dialer sends and accept what a responder sends.  A wire change therefore
shows up as a diff in docs/vectors/, never silently.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import msgpack
import pytest
from nacl import bindings as nb

from capsock.core.noise import AESGCM, available_ciphers
from capsock.keys import NodeId
from capsock.uri import Capability, Token

sys.path.insert(0, str(Path(__file__).parent))
import spec_client

ROOT = Path(__file__).resolve().parents[1]
VECTORS = ROOT / "docs" / "vectors"
FRAME_TYPES = {
    name: number
    for number, name in enumerate(
        [
            "OPEN",
            "ACCEPT",
            "REJECT",
            "DATA",
            "WINDOW",
            "EOF",
            "RESET",
            "PING",
            "PONG",
            "GOAWAY",
            "CONTROL",
        ],
        start=1,
    )
}
CIPHER_IDS = {"ChaChaPoly": spec_client.CHACHAPOLY_ID, "AESGCM": spec_client.AESGCM_ID}
needs_aesgcm = pytest.mark.skipif(
    AESGCM not in available_ciphers(), reason="libsodium has no AES-256-GCM on this CPU"
)


def load(name: str) -> Any:
    return json.loads((VECTORS / name).read_text("utf-8"))


def generator() -> Any:
    spec = importlib.util.spec_from_file_location(
        "gen_golden_vectors", ROOT / "scripts" / "gen_golden_vectors.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def handshake_cases() -> list[dict[str, Any]]:
    cases: list[dict[str, Any]] = load("handshake.json")["cases"]
    return cases


# --- capsock reproduces the files ----------------------------------------------------


@needs_aesgcm
def test_capsock_reproduces_every_vector_file() -> None:
    files = generator().generate()
    assert sorted(files) == sorted(p.name for p in VECTORS.glob("*.json"))
    for name, text in files.items():
        assert (VECTORS / name).read_text("utf-8") == text, (
            f"docs/vectors/{name} is not what capsock produces: if the wire format changed "
            "on purpose, run scripts/gen_golden_vectors.py and review the diff"
        )


def test_the_vector_files_cover_the_promised_ground() -> None:
    ciphers = {case["transport_cipher"] for case in handshake_cases()}
    assert ciphers == {"ChaChaPoly", "AESGCM"}
    for case in handshake_cases():
        sent = {f["type"] for r in case["transport"] for f in r["frames"]}
        assert {"PING", "PONG", "OPEN", "ACCEPT", "DATA", "WINDOW", "EOF"} <= sent
    kinds = [c["kind"] for c in load("tokens.json")["caveats"]]
    assert kinds == ["exp", "uses", "peer", "to", "label", "unknown"]
    names = [m["name"] for m in load("forwarding.json")["messages"]]
    assert "forward request" in names and "failure: unreachable" in names


def test_capsock_decodes_the_token_vector() -> None:
    vec = load("tokens.json")
    token = Token.decode(bytes.fromhex(vec["token"]))
    assert token.root_id.hex() == vec["root_id"]
    assert token.tag.hex() == vec["caveats"][-1]["tag"]
    assert str(Capability.parse(vec["uri"])) == vec["uri"]


# --- the independent client reproduces / accepts them ---------------------------------


def _dialer_keys(party: dict[str, Any]) -> tuple[bytes, bytes]:
    pk, sk = nb.crypto_sign_seed_keypair(bytes.fromhex(party["ed25519_seed"]))
    return pk, nb.crypto_sign_ed25519_sk_to_curve25519(sk)


@pytest.mark.parametrize("case", handshake_cases(), ids=lambda c: c["name"])
def test_spec_client_reproduces_the_handshake_and_transcript(case: dict[str, Any]) -> None:
    if case["transport_cipher"] == "AESGCM" and AESGCM not in available_ciphers():
        pytest.skip("libsodium has no AES-256-GCM on this CPU")
    dialer, responder = case["dialer"], case["responder"]
    pk, x_priv = _dialer_keys(dialer)
    assert pk.hex() == dialer["ed25519_public"]
    assert x_priv.hex() == dialer["x25519_private"]
    assert nb.crypto_scalarmult_base(x_priv).hex() == dialer["x25519_public"]
    rs = nb.crypto_sign_ed25519_pk_to_curve25519(bytes.fromhex(responder["ed25519_public"]))
    assert rs.hex() == responder["x25519_public"]
    # 3.4: a dialer offers only when it has a choice, most preferred first.
    names = dialer["ciphers"]
    offer = bytes(CIPHER_IDS[n] for n in names) if names != ["ChaChaPoly"] else b""
    noise = spec_client.IKInitiator(x_priv, rs, bytes.fromhex(dialer["ephemeral_private"]))
    payload = pk + (bytes((1, len(offer))) + offer if offer else b"")
    assert payload.hex() == case["message1_payload"]
    message1 = noise.write_message_1(payload)
    assert message1.hex() == case["message1"]
    assert (len(message1).to_bytes(2, "big") + message1).hex() == case["record1"]
    message2 = bytes.fromhex(case["message2"])
    assert bytes.fromhex(case["record2"]) == len(message2).to_bytes(2, "big") + message2
    choice_payload = noise.read_message_2(message2)
    assert choice_payload.hex() == case["message2_payload"]
    cipher_id = spec_client.read_choice(choice_payload, offer)
    assert cipher_id == CIPHER_IDS[case["transport_cipher"]]
    assert noise.h.hex() == case["handshake_hash"]
    tx, rx = noise.split(cipher_id)
    assert tx.key is not None and rx.key is not None
    assert tx.key.hex() == case["key_dialer_to_responder"]
    assert rx.key.hex() == case["key_responder_to_dialer"]
    for record in case["transport"]:
        frames = b"".join(spec_client.encode_frame(*_frame_from_json(f)) for f in record["frames"])
        assert frames.hex() == record["plaintext"]
        for f in record["frames"]:
            assert spec_client.encode_frame(*_frame_from_json(f)).hex() == f["encoding"]
        if record["from"] == "dialer":
            assert tx.n == record["nonce"]
            assert tx.encrypt(b"", frames).hex() == record["message"]
        else:
            assert rx.n == record["nonce"]
            plaintext = rx.decrypt(b"", bytes.fromhex(record["message"]))
            assert plaintext == frames
            assert spec_client.decode_frames(plaintext) == [
                _frame_from_json(f) for f in record["frames"]
            ]


def _frame_from_json(f: dict[str, Any]) -> tuple[int, int, bytes]:
    kind = FRAME_TYPES[f["type"]]
    if "token" in f:
        payload = bytes.fromhex(f["token"])
    elif "data" in f:
        payload = bytes.fromhex(f["data"])
    elif "increment" in f:
        payload = f["increment"].to_bytes(4, "big")
    elif "opaque" in f:
        payload = bytes.fromhex(f["opaque"])
    else:
        payload = b""
    return kind, f["stream"], payload


def _caveat_bytes(kind: str, value: dict[str, Any]) -> bytes:
    """4.2, from the spec's table (independently of capsock.uri)."""
    if kind == "exp":
        number, raw = 1, value["exp"].to_bytes(8, "big")
    elif kind == "uses":
        number, raw = 2, value["uses"].to_bytes(4, "big")
    elif kind in ("peer", "to"):
        number = 3 if kind == "peer" else 5
        raw = spec_client._b32decode_node_id(value[kind])
    elif kind == "label":
        number, raw = 4, value["label"].encode("utf-8")
    else:
        number, raw = value["kind"], bytes.fromhex(value["value"])
    return bytes((number, len(raw))) + raw


def test_spec_client_reproduces_the_token_chain() -> None:
    vec = load("tokens.json")
    root_key, root_id = bytes.fromhex(vec["root_key"]), bytes.fromhex(vec["root_id"])
    tag = spec_client.root_tag(root_key, root_id)
    assert tag.hex() == vec["root_tag"]
    assert (b"\x01" + root_id + b"\x00" + tag).hex() == vec["root_token"]
    encoded = b""
    for step in vec["caveats"]:
        caveat = _caveat_bytes(step["kind"], step["value"])
        assert caveat.hex() == step["encoding"]
        tag = spec_client.caveat_tag(tag, caveat)
        assert tag.hex() == step["tag"]
        encoded += caveat
    token = b"\x01" + root_id + bytes((len(vec["caveats"]),)) + encoded + tag
    assert token.hex() == vec["token"]
    for uri, raw in ((vec["uri"], token), (vec["root_uri"], bytes.fromhex(vec["root_token"]))):
        parsed = spec_client.parse_capability(uri)
        assert parsed.token == raw
        assert parsed.node_id == spec_client._b32decode_node_id(vec["node_id"])
        assert parsed.tcp == [("127.0.0.1", 4433)]


def _from_json(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"bin"}:
            return bytes.fromhex(value["bin"])
        return {k: _from_json(v) for k, v in value.items()}
    return value


@pytest.mark.parametrize("message", load("forwarding.json")["messages"], ids=lambda m: m["name"])
def test_forwarding_messages_in_both_codecs(message: dict[str, Any]) -> None:
    value = _from_json(message["value"])
    body = bytes.fromhex(message["body"])
    assert spec_client.msgpack_pack(value) == body
    assert spec_client.forwarding_message(value).hex() == message["message"]
    assert spec_client.msgpack_unpack(body) == value
    assert msgpack.unpackb(body, raw=False, strict_map_key=True) == value


@pytest.mark.parametrize("case", load("node_ids.json")["cases"], ids=lambda c: c["name"])
def test_node_id_validity_in_both(case: dict[str, Any]) -> None:
    raw = bytes.fromhex(case["ed25519_public"])
    try:
        converted: str | None = nb.crypto_sign_ed25519_pk_to_curve25519(raw).hex()
    except Exception:
        converted = None
    assert converted == case["x25519_public"]
    try:
        mine: str | None = NodeId(raw).x25519().hex()
    except Exception:
        mine = None
    assert mine == case["x25519_public"]
