"""Tests that kill surviving mutants of handshake.py (scripts/mutation handshake).

The mutants that survived the handshake selection (docs/testing.md lists
them by mutmut number) were mostly of three kinds: the text of a refusal
(each refusal is pinned below, word for word, because the message is what an
operator reads to tell a twin from a stranger, a reflection from a wrong
key); the order of the state flags (a call after a *failed* call must still
be refused); and the edges of the extension parser and of the cipher choice.
Everything here is sans-IO: hand-driven Noise messages, no sockets.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from capsock.core.handshake import InitiatorHandshake, ResponderHandshake
from capsock.core.noise import PROLOGUE, PROTOCOL_NAME, HandshakeState, available_ciphers
from capsock.errors import HandshakeError, LocalUsageError, PeerAuthenticationError
from capsock.keys import KeyPair

ALICE = KeyPair(bytes(range(32)))
BOB = KeyPair(bytes(range(32, 64)))
CAROL = KeyPair(bytes(range(64, 96)))
HAS_AESGCM = "AESGCM" in available_ciphers()
needs_aesgcm = pytest.mark.skipif(not HAS_AESGCM, reason="libsodium has no AES-256-GCM here")
FIRST = "first handshake message"
SECOND = "second handshake message"


def to_bob(payload: bytes, static: KeyPair = ALICE) -> bytes:
    """IK message 1 to BOB from ``static``'s key, any payload (a hand-driven dialer)."""
    hs = HandshakeState(
        PROTOCOL_NAME, True, PROLOGUE, s=static.x25519_private, rs=BOB.x25519_public
    )
    return hs.write_message(payload)


def answer(init: InitiatorHandshake, payload: bytes, static: KeyPair = BOB) -> bytes:
    """IK message 2 with any payload for ``init``'s message 1 (a hand-driven responder)."""
    hs = HandshakeState(PROTOCOL_NAME, False, PROLOGUE, s=static.x25519_private)
    hs.read_message(init.first_record()[2:])
    return hs.write_message(payload)


def refusal(call: Callable[[], object], kind: type[Exception]) -> str:
    with pytest.raises(kind) as info:
        call()
    assert type(info.value) is kind
    return str(info.value)


# ------------------------------------------------------------- the ciphers argument


def test_each_bad_ciphers_argument_is_refused_with_its_own_message() -> None:
    """Kills ``_allowed_ciphers`` 3-6, 11, 19, 21-24 (messages, ``str | bytes``)."""
    for bad in ("ChaChaPoly", b"ChaChaPoly"):
        for make in (lambda: InitiatorHandshake(ALICE, BOB.node_id, ciphers=bad),  # noqa: B023
                     lambda: ResponderHandshake(BOB, ciphers=bad)):  # noqa: B023  # fmt: skip
            assert refusal(make, LocalUsageError) == (
                "ciphers is a sequence of names, e.g. ['ChaChaPoly']"
            )
    text = refusal(lambda: ResponderHandshake(BOB, ciphers=["ChaChaPoly", "rot13", "Zed"]),
                   LocalUsageError)  # fmt: skip
    assert text == "unknown cipher name(s) [\"'Zed'\", \"'rot13'\"]; known: AESGCM, ChaChaPoly"
    assert refusal(lambda: ResponderHandshake(BOB, ciphers=["AESGCM"]), LocalUsageError) == (
        "ChaChaPoly cannot be disabled: it is what every plain Noise peer speaks"
    )
    assert refusal(lambda: ResponderHandshake(BOB, ciphers=[]), LocalUsageError).startswith(
        "ChaChaPoly cannot be disabled"
    )


def test_the_allowed_ciphers_keep_capsocks_order_whatever_the_argument() -> None:
    """The offer is in preference order (AESGCM first), not the caller's; a
    caller's ChaChaPoly alone means no offer at all."""
    want = available_ciphers() if HAS_AESGCM else ()
    for ciphers in (
        ["ChaChaPoly", "AESGCM"],
        ("AESGCM", "ChaChaPoly"),
        None,
        iter(["AESGCM", "ChaChaPoly"]),
    ):
        assert InitiatorHandshake(ALICE, BOB.node_id, ciphers=ciphers).offered_ciphers == want
    assert InitiatorHandshake(ALICE, BOB.node_id, ciphers=["ChaChaPoly"]).offered_ciphers == ()


# ------------------------------------------------------------- the dialer


@pytest.mark.parametrize("remote", ["own", "twin"])
def test_dialing_oneself_is_refused_with_the_ids_prefix(remote: str) -> None:
    """Kills ``InitiatorHandshake.__init__`` message mutants."""
    node_id = ALICE.node_id if remote == "own" else ALICE.node_id.twin()
    text = refusal(lambda: InitiatorHandshake(ALICE, node_id), LocalUsageError)
    assert text == (
        f"refusing to dial this node's own id {node_id.short()}...; "
        "a node cannot open a session to itself"
    )


def test_the_dialers_calls_out_of_order_each_have_their_message() -> None:
    """Kills ``first_record`` 1-3, ``read_second`` 2-9 (flags and messages): a
    second ``read_second`` is refused also after the first one *failed*."""
    init = InitiatorHandshake(ALICE, BOB.node_id)
    assert refusal(lambda: init.read_second(b"\x00" * 48), LocalUsageError) == (
        "send the first handshake message before reading the second"
    )
    first = init.first_record()
    assert refusal(init.first_record, LocalUsageError) == (
        "the first handshake message was already produced"
    )
    hs = HandshakeState(PROTOCOL_NAME, False, PROLOGUE, s=BOB.x25519_private)
    hs.read_message(first[2:])
    corrupted = bytearray(hs.write_message(b""))
    corrupted[-1] ^= 1
    bad = refusal(lambda: init.read_second(bytes(corrupted)), PeerAuthenticationError)
    assert bad == (
        f"the node that answered did not prove it holds the key of {BOB.node_id.short()}...; "
        "the route may lead to a different node (or the message was corrupted)"
    )
    for _ in range(2):
        assert refusal(lambda: init.read_second(b"\x00" * 48), LocalUsageError) == (
            "read_second() was already called on this handshake"
        )


@needs_aesgcm
@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b"\x01\x02\x02\x01", f"{SECOND}: a cipher choice is one id, got 2 bytes"),
        (b"\x01\x00", f"{SECOND}: a cipher choice is one id, got 0 bytes"),
        (b"\x01\x01\x07", f"{SECOND}: the responder chose cipher id 0x07, which was not offered"),
        (b"\x01\x01\x00", f"{SECOND}: the responder chose cipher id 0x00, which was not offered"),
        (b"\x01", f"{SECOND}: truncated extension header"),
        (b"\x01\x02\x02", f"{SECOND}: extension 1 announces 2 bytes, 1 remain"),
        (b"\x01\x01\x02\x01\x01\x02", f"{SECOND}: extension 1 appears twice"),
    ],
    ids=["two-ids", "no-id", "unknown-id", "id-zero", "header", "cut-value", "twice"],
)
def test_each_bad_choice_is_refused_with_its_own_message(payload: bytes, expected: str) -> None:
    """Kills ``_chosen_cipher`` 1-3, 7, 17 and ``_parse_extensions`` 20, 23."""
    init = InitiatorHandshake(ALICE, BOB.node_id)
    message = answer(init, payload)
    assert refusal(lambda: init.read_second(message), HandshakeError) == expected


def test_a_choice_without_an_offer_is_refused_with_its_message() -> None:
    init = InitiatorHandshake(ALICE, BOB.node_id, ciphers=["ChaChaPoly"])
    message = answer(init, b"\x01\x01\x01")
    assert refusal(lambda: init.read_second(message), HandshakeError) == (
        f"{SECOND}: the responder chose a cipher, but none was offered"
    )


@needs_aesgcm
@pytest.mark.parametrize(("choice", "name"), [(1, "ChaChaPoly"), (2, "AESGCM")])
def test_either_offered_choice_is_taken(choice: int, name: str) -> None:
    init = InitiatorHandshake(ALICE, BOB.node_id)
    result = init.read_second(answer(init, bytes((1, 1, choice))))
    assert (result.cipher_name, result.peer, result.is_initiator) == (name, BOB.node_id, True)


def test_reprs_say_whether_the_handshake_is_done() -> None:
    """Kills ``InitiatorHandshake.__repr__`` 1 (and the responder's twin)."""
    init = InitiatorHandshake(ALICE, BOB.node_id)
    resp = ResponderHandshake(BOB)
    assert repr(init) == f"InitiatorHandshake(remote={BOB.node_id!r}, done=False)"
    assert repr(resp) == "ResponderHandshake(peer=None, done=False)"
    resp.read_first(init.first_record()[2:])
    assert repr(resp) == f"ResponderHandshake(peer={ALICE.node_id!r}, done=False)"
    record, result = resp.second_record()
    assert (result.peer, result.is_initiator) == (ALICE.node_id, False)
    assert repr(resp) == f"ResponderHandshake(peer={ALICE.node_id!r}, done=True)"
    init.read_second(record[2:])
    assert repr(init) == f"InitiatorHandshake(remote={BOB.node_id!r}, done=True)"


# ------------------------------------------------------------- the responder


@pytest.mark.parametrize(
    ("payload", "kind", "expected"),
    [
        (
            ALICE.node_id.raw[:31],
            HandshakeError,
            "first handshake payload is 31 bytes; it must start with the dialer's 32-byte node id",
        ),
        (
            b"",
            HandshakeError,
            "first handshake payload is 0 bytes; it must start with the dialer's 32-byte node id",
        ),
        (
            CAROL.node_id.raw,
            PeerAuthenticationError,
            f"the dialer claims to be {CAROL.node_id.short()}... but authenticated with a "
            "different key; refusing the session",
        ),
        (
            BOB.node_id.raw,
            HandshakeError,
            "first handshake message came from this node itself (reflected connection); "
            "refusing a session with itself",
        ),
        (ALICE.node_id.raw + b"\x09", HandshakeError, f"{FIRST}: truncated extension header"),
        (
            ALICE.node_id.raw + b"\x09\x05\x00\x00",
            HandshakeError,
            f"{FIRST}: extension 9 announces 5 bytes, 2 remain",
        ),
        (
            ALICE.node_id.raw + b"\x01\x00",
            HandshakeError,
            f"{FIRST}: an empty transport cipher offer",
        ),
        (
            ALICE.node_id.raw + b"\x01\x01\x01\x01\x01\x02",
            HandshakeError,
            f"{FIRST}: extension 1 appears twice",
        ),
        (
            ALICE.node_id.raw + b"\x02\x1f" + BOB.node_id.raw[:31],
            HandshakeError,
            f"{FIRST}: a dialled id is 32 bytes, got 31",
        ),
        (
            ALICE.node_id.raw + b"\x02\x00",
            HandshakeError,
            f"{FIRST}: a dialled id is 32 bytes, got 0",
        ),
        (
            ALICE.node_id.raw + b"\x02\x20" + BOB.node_id.twin().raw,
            HandshakeError,
            "the dialer dialled this node's id with the sign bit flipped (its twin, which "
            "converts to the same X25519 key); the URI it used was altered: only "
            f"{BOB.node_id.short()}... reaches this node; refusing",
        ),
        (
            ALICE.node_id.raw + b"\x02\x20" + CAROL.node_id.raw,
            HandshakeError,
            "the dialer dialled another node id that converts to this node's X25519 key: only "
            f"{BOB.node_id.short()}... reaches this node; refusing",
        ),
    ],
    ids=[
        "short",
        "empty",
        "claims-other",
        "reflection",
        "header",
        "cut",
        "empty-offer",
        "twice",
        "dialled-short",
        "dialled-empty",
        "dialled-twin",
        "dialled-other",
    ],
)
def test_each_bad_first_message_is_refused_with_its_own_message(
    payload: bytes, kind: type[Exception], expected: str
) -> None:
    """Kills ``read_first`` 19-48 and ``_check_dialled`` 2-22 (the messages, the
    twin test, the length test); and nothing is answered after a refusal."""
    resp = ResponderHandshake(BOB)
    static = BOB if payload == BOB.node_id.raw else ALICE
    assert refusal(lambda: resp.read_first(to_bob(payload, static)), kind) == expected
    assert (
        refusal(resp.second_record, LocalUsageError) == "read a valid first handshake message first"
    )


def test_the_responders_calls_out_of_order_each_have_their_message() -> None:
    """Kills ``read_first`` 1-5 and ``second_record`` 2-8: a second
    ``read_first`` is refused also after the first one failed."""
    resp = ResponderHandshake(BOB)
    assert (
        refusal(resp.second_record, LocalUsageError) == "read a valid first handshake message first"
    )
    corrupted = bytearray(to_bob(ALICE.node_id.raw))
    corrupted[-1] ^= 1
    assert refusal(lambda: resp.read_first(bytes(corrupted)), HandshakeError) == (
        "first handshake message failed authentication: it was not made for "
        "this node's key, or it was corrupted"
    )
    for _ in range(2):
        assert refusal(lambda: resp.read_first(to_bob(ALICE.node_id.raw)), LocalUsageError) == (
            "read_first() was already called on this handshake"
        )
    resp = ResponderHandshake(BOB)
    assert resp.read_first(to_bob(ALICE.node_id.raw)) == ALICE.node_id
    resp.second_record()
    assert refusal(resp.second_record, LocalUsageError) == (
        "the second handshake message was already produced"
    )


@pytest.mark.parametrize(
    ("extensions", "allowed", "cipher"),
    [
        (b"", None, "ChaChaPoly"),
        (b"\x09\x00", None, "ChaChaPoly"),  # a bare header at the very end is whole
        (b"\x09\x00\x01\x02\x02\x01", None, "AESGCM"),  # an unknown type is skipped
        (b"\x01\x02\x09\x02", None, "AESGCM"),  # an unknown id is skipped, not the end
        (b"\x01\x02\x09\x01", None, "ChaChaPoly"),
        (b"\x01\x02\x02\x01", ["ChaChaPoly"], "ChaChaPoly"),  # offered but not allowed here
        (b"\x01\x01\x09", None, "ChaChaPoly"),  # nothing in common: no choice
        (b"\x09\x00\x09\x00", None, "ChaChaPoly"),  # unknown types may repeat
        (b"\x02\x20" + BOB.node_id.raw + b"\x01\x01\x02", None, "AESGCM"),
    ],
)
def test_the_responders_choice(extensions: bytes, allowed: list[str] | None, cipher: str) -> None:
    """Kills ``_choose`` 1-3, 6 and the parser's edges: the first offered id
    this side knows *and* allows, else no choice (ChaChaPoly)."""
    if cipher == "AESGCM" and not HAS_AESGCM:
        cipher = "ChaChaPoly"
    resp = ResponderHandshake(BOB, ciphers=allowed)
    assert resp.read_first(to_bob(ALICE.node_id.raw + extensions)) == ALICE.node_id
    _, result = resp.second_record()
    assert result.cipher_name == cipher


@pytest.mark.parametrize(
    ("claimed", "static", "kind"),
    [
        (BOB.node_id.twin().raw, BOB, HandshakeError),  # BOB's key, claiming BOB's twin
        (BOB.node_id.raw, ALICE, HandshakeError),  # another key, claiming BOB's id
    ],
    ids=["own-key-twin-id", "own-id-other-key"],
)
def test_either_half_of_a_reflection_is_refused_as_one(
    claimed: bytes, static: KeyPair, kind: type[Exception]
) -> None:
    """Kills ``read_first`` 19 (``or`` made ``and``): this node's own key with
    its twin's id passes the key-matches-id check, so the reflection test
    must refuse it on the key alone (and the id alone)."""
    text = refusal(lambda: ResponderHandshake(BOB).read_first(to_bob(claimed, static)), kind)
    assert text == (
        "first handshake message came from this node itself (reflected connection); "
        "refusing a session with itself"
    )
