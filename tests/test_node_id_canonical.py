"""One key, one node id (docs/protocol.md 3.2).

An Ed25519 key is its point's y and the sign of x; the X25519 conversion keeps
only y.  So an id and its *twin* (the sign bit, the top bit of the last byte,
flipped) convert to the same X25519 static key, and unreduced encodings
(y >= p) spell some points twice.  These tests check, at byte level:

* parsing refuses non-canonical encodings (text, and ids inside tokens);
* a capsock dialer names the id it dials, and the node refuses its twin, so a
  URI naming the twin fails with a typed error instead of reaching the node;
* a dialer presenting its own twin is not a different peer for ``peer`` caveats;
* the plain handshake's bytes are unchanged (golden sizes).
"""

from __future__ import annotations

import base64
import time

import pytest

import capsock
from capsock.core.handshake import (
    CIPHER_OFFER_LEN,
    DIALLED_ID_LEN,
    EXT_DIALLED_ID,
    FIRST_MESSAGE_LEN,
    InitiatorHandshake,
    ResponderHandshake,
)
from capsock.core.noise import PROLOGUE, PROTOCOL_NAME, HandshakeState
from capsock.errors import (
    HandshakeError,
    InvalidCapability,
    LocalUsageError,
    PeerAuthenticationError,
)
from capsock.keys import KeyPair, NodeId
from capsock.store import MemoryStore, RootEntry, authorize
from capsock.uri import Capability, Peer, Token, mint_root

ALICE = KeyPair(bytes(range(32)))
BOB = KeyPair(bytes(range(32, 64)))
P = 2**255 - 19


def text(raw: bytes) -> str:
    return base64.b32encode(raw).decode().rstrip("=").lower()


def encoding(y: int, sign: int = 0) -> bytes:
    return (y | (sign << 255)).to_bytes(32, "little")


def flip_sign(raw: bytes) -> bytes:
    return raw[:31] + bytes([raw[31] ^ 0x80])


NON_CANONICAL = [
    encoding(P),  # y = p, i.e. 0 unreduced
    encoding(P + 1),  # 1 unreduced
    encoding(P + 18, 1),  # the largest: 2**255 - 1
    encoding(1, 1),  # y = 1 (x = 0) with a sign
    encoding(P - 1, 1),  # y = -1 (x = 0) with a sign
]


# ------------------------------------------------------------------ parsing


@pytest.mark.parametrize("raw", NON_CANONICAL, ids=lambda r: r.hex()[-8:])
def test_non_canonical_encodings_are_refused_at_parse(raw: bytes) -> None:
    with pytest.raises(InvalidCapability, match="canonical Ed25519 key encoding"):
        NodeId.parse(text(raw))
    good = Capability(BOB.node_id, mint_root(bytes(32), bytes(16)), ())
    with pytest.raises(InvalidCapability, match="node id: node id is not a canonical"):
        capsock.Capability.parse(str(good).replace(str(BOB.node_id), text(raw)))
    # The same rule for ids inside a token (peer caveat): the URI does not parse.
    token = mint_root(bytes(32), bytes(16)).attenuate(Peer(NodeId(raw)))
    cap = Capability(BOB.node_id, token, ())
    with pytest.raises(InvalidCapability, match="peer caveat: node id is not a canonical"):
        capsock.Capability.parse(str(cap))
    # And they never convert to an X25519 key (dialing, or a handshake claim).
    with pytest.raises(PeerAuthenticationError, match="not a canonical"):
        NodeId(raw).x25519()
    with pytest.raises(PeerAuthenticationError):
        InitiatorHandshake(ALICE, NodeId(raw))


def test_canonical_ids_parse_as_before() -> None:
    for node in (ALICE.node_id, BOB.node_id, ALICE.node_id.twin()):
        assert NodeId.parse(str(node)) == node
        assert str(NodeId.parse(str(node))) == str(node)
    assert NodeId.parse(text(encoding(P - 1))).raw == encoding(P - 1)  # the largest y
    assert ALICE.node_id.twin().raw == flip_sign(ALICE.node_id.raw)
    assert ALICE.node_id.twin().twin() == ALICE.node_id
    assert ALICE.node_id.twin().x25519() == ALICE.x25519_public


def test_a_claimed_id_that_is_not_canonical_fails_the_handshake() -> None:
    """A dialer cannot present an unreduced spelling (y >= p) of some key."""
    for raw in NON_CANONICAL:
        hs = HandshakeState(
            PROTOCOL_NAME, True, PROLOGUE, s=ALICE.x25519_private, rs=BOB.x25519_public
        )
        with pytest.raises(PeerAuthenticationError):
            ResponderHandshake(BOB).read_first(hs.write_message(raw))


# ------------------------------------------------------------------ the dialled id


def payload_of(first_record: bytes, responder: KeyPair = BOB) -> bytes:
    """What a plain Noise responder reads in message 1 (the decrypted payload)."""
    hs = HandshakeState(PROTOCOL_NAME, False, PROLOGUE, s=responder.x25519_private)
    return hs.read_message(first_record[2:])


@pytest.mark.parametrize("ciphers", [None, ["ChaChaPoly"]], ids=["default", "chachapoly"])
def test_dialled_id_on_the_wire(ciphers: list[str] | None) -> None:
    init = InitiatorHandshake(ALICE, BOB.node_id, ciphers=ciphers, dialled_id=True)
    first = init.first_record()
    offer = b"\x01\x02\x02\x01" if init.offered_ciphers else b""
    assert payload_of(first) == ALICE.node_id.raw + offer + b"\x02\x20" + BOB.node_id.raw
    assert EXT_DIALLED_ID == 2 and DIALLED_ID_LEN == 34
    assert len(first) == 2 + FIRST_MESSAGE_LEN + len(offer) + DIALLED_ID_LEN
    resp = ResponderHandshake(BOB)
    assert resp.read_first(first[2:]) == ALICE.node_id
    record, result = resp.second_record()
    assert init.read_second(record[2:]).handshake_hash == result.handshake_hash


def test_without_the_flag_message_1_is_byte_for_byte_as_before() -> None:
    """The golden shapes: node id, then the offer when there is one; nothing else."""
    for ciphers in (None, ["ChaChaPoly"]):
        init = InitiatorHandshake(ALICE, BOB.node_id, ciphers=ciphers)
        first = init.first_record()
        offer = b"\x01\x02\x02\x01" if init.offered_ciphers else b""
        assert payload_of(first) == ALICE.node_id.raw + offer
        assert len(first) == 2 + FIRST_MESSAGE_LEN + (CIPHER_OFFER_LEN if offer else 0)


def test_the_node_refuses_its_twin_before_answering() -> None:
    """A URI naming BOB's twin: Noise alone would reach BOB (same X25519 key)."""
    twin = BOB.node_id.twin()
    assert twin.x25519() == BOB.x25519_public
    init = InitiatorHandshake(ALICE, twin, dialled_id=True)
    resp = ResponderHandshake(BOB)
    with pytest.raises(HandshakeError, match="sign bit flipped"):
        resp.read_first(init.first_record()[2:])
    with pytest.raises(LocalUsageError):  # no message 2: nothing is sent
        resp.second_record()


def test_without_the_dialled_id_the_twin_would_reach_the_node() -> None:
    """Why the extension exists (and what plain Noise dialers still get)."""
    init = InitiatorHandshake(ALICE, BOB.node_id.twin())
    resp = ResponderHandshake(BOB)
    resp.read_first(init.first_record()[2:])
    record, _ = resp.second_record()
    assert init.read_second(record[2:]).peer == BOB.node_id.twin()


@pytest.mark.parametrize(
    ("extension", "match"),
    [
        (b"\x02\x1f" + BOB.node_id.raw[:31], "dialled id is 32 bytes"),
        (b"\x02\x21" + BOB.node_id.raw + b"\x00", "dialled id is 32 bytes"),
        (b"\x02\x20" + ALICE.node_id.raw, "another node id"),
        (b"\x02\x20" + BOB.node_id.raw + b"\x02\x20" + BOB.node_id.raw, "appears twice"),
    ],
    ids=["short", "long", "other-node", "twice"],
)
def test_malformed_or_wrong_dialled_id(extension: bytes, match: str) -> None:
    hs = HandshakeState(PROTOCOL_NAME, True, PROLOGUE, s=ALICE.x25519_private, rs=BOB.x25519_public)
    with pytest.raises(HandshakeError, match=match):
        ResponderHandshake(BOB).read_first(hs.write_message(ALICE.node_id.raw + extension))


def test_type_2_in_message_2_is_an_unknown_extension() -> None:
    init = InitiatorHandshake(ALICE, BOB.node_id, ciphers=["ChaChaPoly"], dialled_id=True)
    hs = HandshakeState(PROTOCOL_NAME, False, PROLOGUE, s=BOB.x25519_private)
    hs.read_message(init.first_record()[2:])
    result = init.read_second(hs.write_message(b"\x02\x00\x02\x01\xff"))
    assert result.peer == BOB.node_id


# ------------------------------------------------------------------ the dialer's own twin


def test_a_dialer_presenting_its_twin_is_the_same_peer_for_peer_caveats() -> None:
    """Only ALICE's key holder can present ALICE's twin (it passes the X25519
    check); a capability bound to ALICE admits it, one bound to anyone else not."""
    twin = ALICE.node_id.twin()
    hs = HandshakeState(PROTOCOL_NAME, True, PROLOGUE, s=ALICE.x25519_private, rs=BOB.x25519_public)
    claimed = ResponderHandshake(BOB).read_first(hs.write_message(twin.raw))
    assert claimed == twin
    store = MemoryStore()
    entry = RootEntry(bytes(range(16)), bytes(range(100, 132)))
    store.add_root(entry)
    root = Token(entry.root_id, (), mint_root(entry.root_key, entry.root_id).tag)
    now = time.time()
    for bound in (ALICE.node_id, twin):
        token = root.attenuate(Peer(bound))
        for peer in (ALICE.node_id, twin):
            assert authorize(store, token, peer=peer, now=now).allowed
        assert not authorize(store, token, peer=BOB.node_id, now=now).allowed
        assert not authorize(store, token, peer=BOB.node_id.twin(), now=now).allowed


# ------------------------------------------------------------------ nodes


@pytest.mark.anyio
async def test_connecting_to_a_uri_naming_the_twin_fails_and_revoke_refuses_it() -> None:
    async with (
        capsock.Node(listen=["tcp:127.0.0.1:0"]) as server,
        capsock.Node() as client,
    ):
        listener = await server.listen()
        cap = listener.uri
        forged = Capability(cap.node.twin(), cap.token, cap.hints)
        assert str(forged) != str(cap)
        with pytest.raises(PeerAuthenticationError, match="hung up during the handshake"):
            await client.connect(forged)
        assert server.stats()["handshakes_failed"] >= 1
        assert server.stats()["opens_received"] == 0
        with pytest.raises(InvalidCapability):
            await server.revoke(forged)
        stream = await client.connect(cap)  # the real id still works
        assert stream.peer == server.id
        await stream.aclose()
        await listener.aclose()
