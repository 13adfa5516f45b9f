"""atheris harness: the handshake readers (ResponderHandshake.read_first,
InitiatorHandshake.read_second).

Inputs are raw bytes, or *authentic* messages built with the right keys and a
fuzzed payload (claimed node id, extensions), optionally with a few bytes
flipped, so the checks after decryption are reached too.

Invariant: only capsock.errors.CapsockError subclasses escape; a message 1 that
is accepted names a node whose X25519 key is the one Noise authenticated, and
the responder can then always produce message 2.

    python fuzz/fuzz_handshake.py -max_total_time=600 -rss_limit_mb=1024
"""

from __future__ import annotations

import sys

from _common import Provider, main

from capsock.errors import CapsockError
from capsock.core.handshake import InitiatorHandshake, ResponderHandshake
from capsock.keys import KeyPair
from capsock.core.noise import PROLOGUE, PROTOCOL_NAME, HandshakeState

ALICE = KeyPair(bytes(range(32)))
BOB = KeyPair(bytes(range(32, 64)))


def _mutate(p: Provider, message: bytes) -> bytes:
    out = bytearray(message)
    for _ in range(p.int(0, 3)):
        if not out or not p.remaining():
            break
        out[p.int(0, len(out) - 1)] ^= p.int(1, 255)
    if p.int(0, 7) == 0:
        out = out[: p.int(0, len(out))]
    return bytes(out)


def _claimed(p: Provider) -> bytes:
    choice = p.int(0, 4)
    if choice == 0:
        return ALICE.node_id.raw
    if choice == 1:
        return BOB.node_id.raw  # reflection
    if choice == 2:
        raw = bytearray(ALICE.node_id.raw)
        raw[31] ^= 0x80  # the sign-flipped twin
        return bytes(raw)
    return p.take(p.int(0, 40))


def TestOneInput(data: bytes) -> None:
    p = Provider(data)
    mode = p.int(0, 3)
    ephemeral = p.take(32).ljust(32, b"\x01")
    try:
        if mode == 0:
            ResponderHandshake(BOB).read_first(p.rest())
        elif mode == 1:
            static = ALICE.x25519_private if p.bool() else p.take(32).ljust(32, b"\x02")
            hs = HandshakeState(
                PROTOCOL_NAME, True, PROLOGUE, s=static, e=ephemeral, rs=BOB.x25519_public
            )
            payload = _claimed(p) + p.take(p.int(0, 40))
            message = _mutate(p, hs.write_message(payload))
            responder = ResponderHandshake(BOB)
            peer = responder.read_first(message)
            assert peer.x25519() == _x(static), "accepted a node id that Noise did not authenticate"
            record, result = responder.second_message()
            assert result.peer == peer and record[2:]
        elif mode == 2:
            dialer = InitiatorHandshake(ALICE, BOB.node_id, ephemeral=ephemeral)
            dialer.first_message()
            dialer.read_second(p.rest())
        else:
            dialer = InitiatorHandshake(ALICE, BOB.node_id, ephemeral=ephemeral)
            responder_state = HandshakeState(
                PROTOCOL_NAME,
                False,
                PROLOGUE,
                s=BOB.x25519_private,
                e=p.take(32).ljust(32, b"\x03"),
            )
            responder_state.read_message(dialer.first_message()[2:])
            message = _mutate(p, responder_state.write_message(p.take(p.int(0, 12))))
            dialer.read_second(message)
    except CapsockError:
        return


def _x(private: bytes) -> bytes:
    from nacl.bindings import crypto_scalarmult_base

    return bytes(crypto_scalarmult_base(private))


def seeds() -> list[bytes]:
    out = []
    for mode in range(4):
        out.append(bytes([mode]) + bytes(32) + bytes(40))
        out.append(bytes([mode]) + bytes(range(100)))
    # a valid message 1 with the AES-GCM offer (mode 1, ALICE, no mutation)
    out.append(b"\x01" + bytes(32) + b"\x01\x00\x04\x01\x02\x02\x01\x00\x01")
    return out


if __name__ == "__main__":
    main(TestOneInput, seeds())
    sys.exit(0)
