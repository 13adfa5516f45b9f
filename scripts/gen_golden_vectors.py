"""Generate the capsock/1 golden vectors in docs/vectors/ from capsock itself.

Deterministic: every key (static and ephemeral) is fixed, so running this
again writes the same files.  ``tests/test_golden_vectors.py`` checks that the
files are what capsock produces now (run this script after a deliberate wire
change, then review the diff) and that the independent client in
``tests/spec_client.py`` reproduces and accepts every vector.

    python scripts/gen_golden_vectors.py            # write docs/vectors/*.json
    python scripts/gen_golden_vectors.py --check    # exit 1 if a file would change

The file format is described in docs/vectors/README.md.  The AES-256-GCM
handshake vector needs a machine where libsodium offers AES-256-GCM (CPU AES
instructions); elsewhere the script refuses to write rather than drop it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import msgpack

from capsock.errors import ErrorCode
from capsock.core.frames import (
    Accept,
    Data,
    Eof,
    Frame,
    Open,
    Ping,
    Pong,
    Window,
    decode_frames,
    encode_frame,
)
from capsock.core.handshake import InitiatorHandshake, ResponderHandshake
from capsock.keys import KeyPair, NodeId
from capsock.core.noise import (
    AESGCM,
    CHACHAPOLY,
    PROLOGUE,
    PROTOCOL_NAME,
    HandshakeState,
    available_ciphers,
)
from capsock.uri import (
    Capability,
    Expires,
    Label,
    Peer,
    TcpHint,
    To,
    UnknownCaveat,
    Uses,
    chain_tag,
    encode_caveat,
    mint_root,
)

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "vectors"

RESPONDER_SEED = bytes(range(0, 32))  # the node of protocol 4.5
DIALER_SEED = bytes(range(32, 64))
DIALER_EPHEMERAL = bytes(range(64, 96))
RESPONDER_EPHEMERAL = bytes(range(96, 128))
ROOT_KEY = bytes([0xA0]) * 32
ROOT_ID = bytes.fromhex("00112233445566778899aabbccddee00")
PING_OPAQUE = bytes.fromhex("0001020304050607")

HANDSHAKE_CASES: list[tuple[str, list[str], list[str]]] = [
    # (name, dialer's allowed ciphers, responder's allowed ciphers)
    ("chachapoly-no-offer", [CHACHAPOLY], [AESGCM, CHACHAPOLY]),
    ("aesgcm-offer-chosen", [AESGCM, CHACHAPOLY], [AESGCM, CHACHAPOLY]),
    ("chachapoly-offer-chosen", [AESGCM, CHACHAPOLY], [CHACHAPOLY]),
]


def _hex(data: bytes | bytearray) -> str:
    return bytes(data).hex()


def _frame_json(frame: Frame) -> dict[str, Any]:
    """A frame as a JSON object: type name, stream id, and the decoded fields."""
    out: dict[str, Any] = {
        "type": type(frame).__name__.upper(),
        "stream": getattr(frame, "stream_id", 0),
    }
    match frame:
        case Open(_, token):
            out["token"] = _hex(token)
        case Data(_, data):
            out["data"] = _hex(data)
        case Window(_, increment):
            out["increment"] = increment
        case Ping(opaque) | Pong(opaque):
            out["opaque"] = _hex(opaque)
    if out["type"] == "GOAWAY":  # pragma: no cover - not in the transcript
        raise AssertionError
    out["encoding"] = _hex(encode_frame(frame))
    return out


def _transcript(token: bytes) -> list[tuple[str, list[Frame]]]:
    """The first transport messages of a session, as a capsock node could send them."""
    return [
        ("dialer", [Window(0, 15728640), Ping(PING_OPAQUE)]),
        ("responder", [Window(0, 15728640), Pong(PING_OPAQUE)]),
        ("dialer", [Open(1, token), Window(1, 3932160)]),
        ("responder", [Accept(1), Window(1, 3932160)]),
        ("dialer", [Data(1, b"hello")]),
        ("responder", [Data(1, b"hello"), Eof(1)]),
        ("dialer", [Eof(1)]),
    ]


def handshake_vectors() -> dict[str, Any]:
    dialer = KeyPair(DIALER_SEED)
    responder = KeyPair(RESPONDER_SEED)
    token = mint_root(ROOT_KEY, ROOT_ID).encode()
    cases = []
    for name, dialer_ciphers, responder_ciphers in HANDSHAKE_CASES:
        init = InitiatorHandshake(
            dialer, responder.node_id, ephemeral=DIALER_EPHEMERAL, ciphers=dialer_ciphers
        )
        resp = ResponderHandshake(responder, ciphers=responder_ciphers)
        # ResponderHandshake has no ephemeral argument: give its Noise state a
        # fixed one (the same state it builds, plus ``e``).
        resp._noise = HandshakeState(
            PROTOCOL_NAME, False, PROLOGUE, s=responder.x25519_private, e=RESPONDER_EPHEMERAL
        )
        record1 = init.first_message()
        message1 = record1[2:]
        resp.read_first(message1)
        record2, resp_result = resp.second_message()
        message2 = record2[2:]
        init_result = init.read_second(message2)
        assert init_result.handshake_hash == resp_result.handshake_hash
        assert init_result.cipher_name == resp_result.cipher_name
        tx, rx = init_result.cipher, resp_result.cipher
        records = []
        for direction, frames in _transcript(token):
            plaintext = b"".join(encode_frame(f) for f in frames)
            sender, receiver = (tx, rx) if direction == "dialer" else (rx, tx)
            nonce = sender.send_nonce
            message = sender.encrypt(plaintext)
            assert receiver.decrypt(message) == plaintext
            assert decode_frames(plaintext) == frames
            records.append(
                {
                    "from": direction,
                    "nonce": nonce,
                    "frames": [_frame_json(f) for f in frames],
                    "plaintext": _hex(plaintext),
                    "message": _hex(message),
                }
            )
        ids = {AESGCM: 0x02, CHACHAPOLY: 0x01}
        message1_payload = dialer.node_id.raw
        choice = b""
        if init.offered_ciphers:
            offer = bytes(ids[c] for c in init.offered_ciphers)
            message1_payload += bytes((1, len(offer))) + offer
            choice = bytes((1, 1, ids[resp_result.cipher_name]))
        cases.append(
            {
                "name": name,
                "protocol_name": PROTOCOL_NAME.decode(),
                "prologue": _hex(PROLOGUE),
                "dialer": {
                    "ed25519_seed": _hex(DIALER_SEED),
                    "node_id": str(dialer.node_id),
                    "ed25519_public": _hex(dialer.node_id.raw),
                    "x25519_private": _hex(dialer.x25519_private),
                    "x25519_public": _hex(dialer.x25519_public),
                    "ephemeral_private": _hex(DIALER_EPHEMERAL),
                    "ciphers": dialer_ciphers,
                },
                "responder": {
                    "ed25519_seed": _hex(RESPONDER_SEED),
                    "node_id": str(responder.node_id),
                    "ed25519_public": _hex(responder.node_id.raw),
                    "x25519_private": _hex(responder.x25519_private),
                    "x25519_public": _hex(responder.x25519_public),
                    "ephemeral_private": _hex(RESPONDER_EPHEMERAL),
                    "ciphers": responder_ciphers,
                },
                "message1_payload": _hex(message1_payload),
                "message1": _hex(message1),
                "record1": _hex(record1),
                "message2_payload": _hex(choice),
                "message2": _hex(message2),
                "record2": _hex(record2),
                "handshake_hash": _hex(init_result.handshake_hash),
                "transport_cipher": init_result.cipher_name,
                "key_dialer_to_responder": _hex(tx._send_key),
                "key_responder_to_dialer": _hex(tx._recv_key),
                "transport": records,
            }
        )
    return {
        "description": "capsock/1 handshakes (protocol 3) and first transport messages (5, 6)",
        "cases": cases,
    }


def token_vectors() -> dict[str, Any]:
    node = KeyPair(RESPONDER_SEED).node_id
    peer = KeyPair(DIALER_SEED).node_id
    target = KeyPair(bytes(range(128, 160))).node_id
    caveats = [
        ("exp", Expires(1767225600), {"exp": 1767225600}),
        ("uses", Uses(3), {"uses": 3}),
        ("peer", Peer(peer), {"peer": str(peer)}),
        ("to", To(target), {"to": str(target)}),
        ("label", Label("demo"), {"label": "demo"}),
        ("unknown", UnknownCaveat(200, b"\x01\x02\x03"), {"kind": 200, "value": "010203"}),
    ]
    root = mint_root(ROOT_KEY, ROOT_ID)
    steps = []
    tag = root.tag
    token = root
    for name, caveat, value in caveats:
        tag = chain_tag(tag, caveat)
        token = token.attenuate(caveat)
        assert token.tag == tag
        steps.append(
            {
                "kind": name,
                "value": value,
                "encoding": _hex(encode_caveat(caveat)),
                "tag": _hex(tag),
            }
        )
    hints = (TcpHint("127.0.0.1", 4433),)
    return {
        "description": "a token with every caveat kind and its tag chain (protocol 4.2-4.3)",
        "node_seed": _hex(RESPONDER_SEED),
        "node_id": str(node),
        "root_key": _hex(ROOT_KEY),
        "root_id": _hex(ROOT_ID),
        "root_tag": _hex(root.tag),
        "root_token": _hex(root.encode()),
        "root_uri": str(Capability(node, root, hints)),
        "caveats": steps,
        "token": _hex(token.encode()),
        "uri": str(Capability(node, token, hints)),
    }


def _message(obj: Any) -> dict[str, Any]:
    body = msgpack.packb(obj, use_bin_type=True)
    return {"body": _hex(body), "message": _hex(len(body).to_bytes(4, "big") + body)}


def forwarding_vectors() -> dict[str, Any]:
    from capsock.node.forwarding import UNREACHABLE_REASON

    target = KeyPair(RESPONDER_SEED).node_id
    return {
        "description": "forwarding requests and answers (protocol 10.3): u32 length + msgpack",
        "messages": [
            {
                "name": "forward request",
                "value": {"op": "forward", "to": {"bin": _hex(target.raw)}},
                **_message({"op": "forward", "to": target.raw}),
            },
            {
                "name": "register request",
                "value": {"op": "register"},
                **_message({"op": "register"}),
            },
            {"name": "success", "value": {"ok": True}, **_message({"ok": True})},
            {
                "name": "failure: unreachable",
                "value": {"ok": False, "error": UNREACHABLE_REASON},
                **_message({"ok": False, "error": UNREACHABLE_REASON}),
            },
        ],
        "refusal_reset_code": int(ErrorCode.REFUSED),
    }


def _edwards_encoding(y: int, sign: int = 0) -> bytes:
    return (y | (sign << 255)).to_bytes(32, "little")


def node_id_vectors() -> dict[str, Any]:
    """Which 32-byte strings are usable node ids (protocol 3.2)."""
    p = 2**255 - 19
    valid = KeyPair(RESPONDER_SEED).node_id.raw
    y = int.from_bytes(valid, "little") & ((1 << 255) - 1)
    sign = valid[31] >> 7
    cases: list[tuple[str, bytes]] = [
        ("valid key", valid),
        (
            "valid key, sign bit flipped (the negated point: same X25519 key)",
            bytes([*valid[:31], valid[31] ^ 0x80]),
        ),
        ("identity (y = 1), small order", _edwards_encoding(1)),
        ("order 2 (y = -1)", _edwards_encoding(p - 1)),
        ("order 4 (y = 0)", _edwards_encoding(0)),
        ("identity with the sign bit set (x = 0, 'negative zero')", _edwards_encoding(1, 1)),
        ("not on the curve (y = 2)", _edwards_encoding(2)),
        (
            "valid key plus the order-2 point: outside the prime-order subgroup",
            _edwards_encoding((-y) % p, sign ^ 1),
        ),
        ("on the curve, outside the prime-order subgroup (y = 3)", _edwards_encoding(3)),
        ("non-canonical y = p + 3", _edwards_encoding(p + 3)),
        ("non-canonical y = p + 1 (identity)", _edwards_encoding(p + 1)),
        ("all 0xff (y = 2^255 - 1, non-canonical)", b"\xff" * 32),
    ]
    out = []
    for name, raw in cases:
        try:
            x = NodeId(raw).x25519().hex()
        except Exception:
            x = None
        out.append({"name": name, "ed25519_public": raw.hex(), "x25519_public": x})
    return {
        "description": "32-byte strings and whether they convert to an X25519 key (protocol 3.2)",
        "cases": out,
    }


def generate() -> dict[str, str]:
    """File name -> JSON text."""
    if AESGCM not in available_ciphers():
        raise SystemExit("AES-256-GCM is not available here; cannot write every vector")
    files = {
        "handshake.json": handshake_vectors(),
        "tokens.json": token_vectors(),
        "forwarding.json": forwarding_vectors(),
        "node_ids.json": node_id_vectors(),
    }
    return {
        name: json.dumps(obj, indent=2, ensure_ascii=True) + "\n" for name, obj in files.items()
    }


def main(argv: list[str]) -> int:
    check = "--check" in argv
    changed = []
    for name, text in generate().items():
        path = OUT / name
        if not path.exists() or path.read_text("utf-8") != text:
            changed.append(name)
            if not check:
                path.write_text(text, "utf-8")
    if check and changed:
        print("out of date: " + ", ".join(changed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
