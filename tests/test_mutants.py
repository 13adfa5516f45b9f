"""Tests that kill the mutants scripts/mutation found surviving (docs/testing.md).

Each test names, in its docstring, the mutant(s) it was written against
(mutmut's names, ``scripts/mutation <module> --show`` prints their diffs);
each was seen surviving the module's selection before the test and killed
after.  Node-level tests run on asyncio and trio over loopback.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from capsock.core.mux import Event, Mux, MuxConfig, OpenRequested, StreamRejected
from capsock.errors import ErrorCode, InvalidCapability, LocalUsageError
from capsock.keys import KeyPair
from capsock.store import MemoryStore, RootEntry, authorize
from capsock.uri import (
    TAG_LEN,
    TOKEN_VERSION,
    Capability,
    CaveatKind,
    Expires,
    Label,
    Peer,
    To,
    Token,
    UnknownCaveat,
    Uses,
    chain_tag,
    encode_caveat,
    mint_root,
    parse,
    root_tag,
)

pytestmark = pytest.mark.anyio
ROOT_KEY, ROOT_ID = bytes(range(32)), bytes(range(16))
PEER = KeyPair(bytes(32)).node_id


def _store() -> MemoryStore:
    store = MemoryStore()
    store.add_root(RootEntry(ROOT_ID, ROOT_KEY))
    return store


# ------------------------------------------------------------------ store.authorize


@pytest.mark.parametrize("consume", [True, False])
def test_an_allowed_verdict_names_the_first_uses_counter(consume: bool) -> None:
    """Mutants store.x_authorize__mutmut_69/72/74/77: ``Verdict.uses_key`` is
    documented as the counter key of the token's *first* ``uses`` caveat (the
    chain tag just after it); None when the token has no ``uses``."""
    root = mint_root(ROOT_KEY, ROOT_ID)
    token = root.attenuate(Label("a"), Uses(5), Label("b"), Uses(3))
    verdict = authorize(_store(), token, peer=PEER, now=0, consume=consume)
    assert verdict.allowed
    assert verdict.uses_key == verdict.tags[2] != verdict.tags[4]
    plain = authorize(_store(), root.attenuate(Label("a")), peer=PEER, now=0, consume=consume)
    assert plain.allowed and plain.uses_key is None


# ------------------------------------------------------------------ uri: what a refusal says
#
# A bad capability is refused with a message that names the part at fault
# (docs/capabilities.md); these pin each message, so a check that loses its
# wording (or raises for the wrong part, see the boundary cases) is seen.

_ROOT = mint_root(ROOT_KEY, ROOT_ID)
_TAG = bytes(TAG_LEN)
_HEAD = bytes([TOKEN_VERSION]) + ROOT_ID


_BAD: dict[str, tuple[Callable[[], object], type[Exception], str]] = {
    # _check_int / _check_type through each caveat's own check
    "exp-type": (lambda: Expires("1"), InvalidCapability, "exp caveat must be an int, not str"),
    "uses-range": (lambda: Uses(0), InvalidCapability, f"uses caveat must be in 1..{2**32 - 1}"),
    "peer-type": (lambda: Peer("x"), InvalidCapability, "peer caveat must be a NodeId, not str"),
    "to-type": (lambda: To(b"x"), InvalidCapability, "to caveat must be a NodeId, not bytes"),
    "label-type": (lambda: Label(5), InvalidCapability, "label caveat must be a str, not int"),
    "unknown-kind-type": (
        lambda: UnknownCaveat("9", b""),
        InvalidCapability,
        "caveat kind must be an int, not str",
    ),
    "unknown-kind-known": (
        lambda: UnknownCaveat(2, b""),
        InvalidCapability,
        "caveat kind 2 is known: use its own class",
    ),
    "unknown-value-long": (
        lambda: UnknownCaveat(200, bytes(256)),
        InvalidCapability,
        "unknown caveat value must be at most 255 bytes",
    ),
    "encode-not-a-caveat": (
        lambda: encode_caveat(object()),
        InvalidCapability,
        "not a caveat: object",
    ),
    # _check_caveats / _check_bytes through Token, root_tag and chain_tag
    "caveats-not-tuple": (
        lambda: Token(ROOT_ID, "ab", _TAG),
        InvalidCapability,
        "caveats must be a tuple of caveats",
    ),
    "caveats-not-caveat": (
        lambda: Token(ROOT_ID, (object(),), _TAG),
        InvalidCapability,
        "not a caveat: object",
    ),
    "token-root-id": (
        lambda: Token(bytes(15), (), _TAG),
        InvalidCapability,
        "root_id must be exactly 16 bytes",
    ),
    "token-tag": (
        lambda: Token(ROOT_ID, (), bytes(31)),
        InvalidCapability,
        "tag must be exactly 32 bytes",
    ),
    "root-key": (
        lambda: root_tag(bytes(31), ROOT_ID),
        LocalUsageError,
        "root key must be exactly 32 bytes",
    ),
    "root-root-id": (
        lambda: root_tag(ROOT_KEY, bytes(15)),
        InvalidCapability,
        "root_id must be exactly 16 bytes",
    ),
    "chain-tag": (
        lambda: chain_tag(bytes(31), Label("a")),
        InvalidCapability,
        "tag must be exactly 32 bytes",
    ),
    # Token.decode and _decode_caveat
    "decode-not-bytes": (
        lambda: Token.decode("ab"),
        InvalidCapability,
        "a token is bytes, not str",
    ),
    "decode-empty": (lambda: Token.decode(b""), InvalidCapability, "token is empty"),
    "decode-non-canonical-peer": (
        lambda: Token.decode(
            _HEAD + bytes([1, CaveatKind.PEER, 32]) + b"\xff" * 31 + b"\x7f" + _TAG
        ),
        InvalidCapability,
        "caveat 1: peer caveat: node id is not a canonical Ed25519 key encoding (its y coordinate"
        " is not reduced modulo 2**255 - 19); no node has this id: the URI is damaged or forged",
    ),
    "decode-bad-utf8-label": (
        lambda: Token.decode(_HEAD + bytes([1, CaveatKind.LABEL, 1, 0xFF]) + _TAG),
        InvalidCapability,
        "caveat 1: label caveat is not valid UTF-8",
    ),
    # cut in a caveat's header, then in its value: the caveat, not the tag, is named
    "decode-cut-in-header": (
        lambda: Token.decode(_HEAD + bytes([2, CaveatKind.LABEL, 30]) + b"a" * 30 + bytes([200])),
        InvalidCapability,
        "token is truncated in caveat 2",
    ),
    "decode-cut-in-value": (
        lambda: Token.decode(_HEAD + bytes([1, CaveatKind.LABEL, 40]) + bytes(32)),
        InvalidCapability,
        "token is truncated in caveat 1",
    ),
    # a header that ends exactly at the end (an empty unknown caveat): the tag is what is missing
    "decode-cut-after-header": (
        lambda: Token.decode(
            _HEAD + bytes([2, CaveatKind.LABEL, 28]) + b"a" * 28 + bytes([200, 0])
        ),
        InvalidCapability,
        "token is truncated in the tag",
    ),
    "decode-cut-in-tag": (
        lambda: Token.decode(_HEAD + bytes([1, 200, 0]) + bytes(31)),
        InvalidCapability,
        "token is truncated in the tag",
    ),
    "uri-token-padding": (
        lambda: parse(f"{Capability(PEER, _ROOT, ())}="),
        InvalidCapability,
        "token must be base64url without '=' padding",
    ),
}


@pytest.mark.parametrize("case", list(_BAD))
def test_each_bad_caveat_or_token_is_refused_with_its_own_message(case: str) -> None:
    """Mutants uri: the message-text mutants of _check_int, _check_type,
    _check_label, _check_bytes, _check_caveats, each caveat's __post_init__,
    encode_caveat, _decode_caveat, Token.__post_init__, root_tag, chain_tag,
    _parse_token_text and Token.decode, and Token.decode__mutmut_37/38/46/47
    (the truncation bounds: an off-by-one names the caveat where the tag is
    missing, or the tag where a caveat is cut)."""
    make, error, message = _BAD[case]
    with pytest.raises(error) as info:
        make()
    assert type(info.value) is error
    assert str(info.value) == message


# ------------------------------------------------------------------ mux: the pending-open bound


def _pump(src: Mux, dst: Mux) -> list[Event]:
    events: list[Event] = []
    while (message := src.data_to_send()) is not None:
        events += dst.receive_message(message)
    return events


@pytest.mark.parametrize("how", ["reject", "reset"])
def test_a_refused_pending_open_frees_exactly_its_slot(how: str) -> None:
    """Mutants mux.Mux.reject_stream__mutmut_3/6/7/8 and
    reset_stream__mutmut_11/12/13/14: refusing (or resetting) a pending open
    gives back exactly one slot of ``max_pending_opens``: after two are
    refused, two new opens are pending again and a third is BUSY; refusing a
    stream that is not pending does nothing."""
    a, b = Mux(dialer=True), Mux(dialer=False, config=MuxConfig(max_pending_opens=2))
    first = [a.open_stream(b"t") for _ in range(2)]
    assert [e.stream_id for e in _pump(a, b) if isinstance(e, OpenRequested)] == first
    for sid in first:
        if how == "reject":
            b.reject_stream(sid)
        else:
            b.reset_stream(sid)
    b.reject_stream(999)  # never opened: ignored
    _pump(b, a)
    again = [a.open_stream(b"t") for _ in range(3)]
    events = _pump(a, b)
    assert [e.stream_id for e in events if isinstance(e, OpenRequested)] == again[:2]
    refused = [e for e in _pump(b, a) if isinstance(e, StreamRejected)]
    assert [(e.stream_id, e.code) for e in refused] == [(again[2], ErrorCode.BUSY)]
