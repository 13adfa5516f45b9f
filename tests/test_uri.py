"""Tests for capsock.uri: golden URIs, the tag chain, strict parsing, secrecy."""

from __future__ import annotations

import ast
import base64
import hashlib
import hmac
import ipaddress
import json
import math
import re
from pathlib import Path
from typing import Any

import nacl.signing
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import capsock.uri as uri_module
from capsock.errors import InvalidCapability, LocalUsageError
from capsock.keys import NodeId
from capsock.store import chain
from capsock.uri import (
    Capability,
    Caveat,
    CaveatKind,
    Expires,
    Hint,
    Label,
    Peer,
    TcpHint,
    To,
    Token,
    UnixHint,
    UnknownCaveat,
    Uses,
    ViaHint,
    chain_tag,
    encode_caveat,
    mint_root,
    parse,
    root_tag,
)


def verify_tag(root_key: bytes, token: Token) -> bool:
    """What the endpoint checks of the tag (``store.authorize``): the chain it
    computes from its root key ends in the token's tag."""
    return hmac.compare_digest(chain(root_key, token)[-1], token.tag)


def compute_tag(
    root_key: bytes, root_id: bytes, caveats: list[Caveat] | tuple[Caveat, ...]
) -> bytes:
    """The tag of ``(root_id, caveats)`` under ``root_key``, by the one chain implementation."""
    return chain(root_key, Token(root_id, tuple(caveats), bytes(32)))[-1]


GOLDEN: dict[str, Any] = json.loads(
    (Path(__file__).parent / "data" / "uris.json").read_text("utf-8")
)
VALID: list[dict[str, Any]] = GOLDEN["valid"]
INVALID: list[dict[str, str]] = GOLDEN["invalid"]
INVALID_TOKENS: list[dict[str, str]] = GOLDEN["invalid_tokens"]
VALID_URIS = [v["uri"] for v in VALID]

ROOT_KEY = bytes(range(100, 132))
ROOT_ID = bytes(range(16))
NODE = NodeId(bytes(nacl.signing.SigningKey(bytes(32)).verify_key))
OTHER = NodeId(bytes(nacl.signing.SigningKey(bytes([1] * 32)).verify_key))


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def caveat_from_json(item: dict[str, Any]) -> Caveat:
    ((kind, value),) = item.items()
    if kind == "exp":
        return Expires(value)
    if kind == "uses":
        return Uses(value)
    if kind == "peer":
        return Peer(NodeId.parse(value))
    if kind == "label":
        return Label(value)
    assert kind == "unknown"
    return UnknownCaveat(value[0], bytes.fromhex(value[1]))


def hint_from_json(item: dict[str, Any]) -> Hint:
    ((kind, value),) = item.items()
    if kind == "tcp":
        return TcpHint(value[0], value[1])
    if kind == "unix":
        return UnixHint(value)
    assert kind == "via"
    return ViaHint(parse(value))


def secrets_of(cap: Capability) -> list[str]:
    """Every text form of every token and tag inside ``cap`` (via hints included)."""
    raw = cap.token.encode()
    tag = cap.token.tag
    out = [b64(raw), raw.hex(), tag.hex(), tag.hex().upper(), b64(tag)]
    for hint in cap.hints:
        if isinstance(hint, ViaHint):
            out += secrets_of(hint.capability)
    return out


GOLDEN_SECRETS = sorted({s for u in VALID_URIS for s in secrets_of(parse(u))})


def assert_no_secret(message: str, text: str = "") -> None:
    for secret in GOLDEN_SECRETS:
        assert secret not in message
    # The token segment of the input itself, when there is one of any length.
    if text.startswith("capsock://"):
        segment = text[len("capsock://") :].partition("?")[0].partition("/")[2]
        if len(segment) >= 16:
            assert segment not in message


def ids(items: list[dict[str, Any]], key: str) -> list[str]:
    return [str(i[key])[:60] for i in items]


# ------------------------------------------------------------------------ golden


@pytest.mark.parametrize("case", VALID, ids=ids(VALID, "name"))
def test_golden_parse_round_trip(case: dict[str, Any]) -> None:
    cap = parse(case["uri"])
    assert str(cap) == case["uri"]
    assert Capability.parse(case["uri"]) == cap
    assert str(cap.node) == case["node"]
    seed = bytes.fromhex(case["node_seed"])
    assert cap.node == NodeId(bytes(nacl.signing.SigningKey(seed).verify_key))
    assert cap.root_id.hex() == case["root_id"]
    assert cap.token.root_id.hex() == case["root_id"]
    assert cap.caveats == tuple(caveat_from_json(c) for c in case["caveats"])
    assert cap.hints == tuple(hint_from_json(h) for h in case["hints"])
    assert cap.token.tag.hex() == case["tag"]
    assert cap.token.encode().hex() == case["token"]
    assert Token.decode(bytes.fromhex(case["token"])) == cap.token
    assert parse(str(cap)) == cap


@pytest.mark.parametrize("case", VALID, ids=ids(VALID, "name"))
def test_golden_built_from_fields(case: dict[str, Any]) -> None:
    root_key = bytes.fromhex(case["root_key"])
    root_id = bytes.fromhex(case["root_id"])
    caveats = [caveat_from_json(c) for c in case["caveats"]]
    node = NodeId.parse(case["node"])
    cap = Capability(node, mint_root(root_key, root_id)).attenuate(*caveats)
    cap = cap.with_hints(hint_from_json(h) for h in case["hints"])
    assert str(cap) == case["uri"]
    assert verify_tag(root_key, cap.token)


@pytest.mark.parametrize("case", VALID, ids=ids(VALID, "name"))
def test_golden_tag_chain(case: dict[str, Any]) -> None:
    root_key = bytes.fromhex(case["root_key"])
    root_id = bytes.fromhex(case["root_id"])
    caveats = [caveat_from_json(c) for c in case["caveats"]]
    chain = [bytes.fromhex(t) for t in case["chain"]]
    assert root_tag(root_key, root_id) == chain[0]
    for i, caveat in enumerate(caveats):
        assert chain_tag(chain[i], caveat) == chain[i + 1]
    assert compute_tag(root_key, root_id, caveats) == chain[-1] == bytes.fromhex(case["tag"])
    token = parse(case["uri"]).token
    assert verify_tag(root_key, token)
    assert not verify_tag(bytes(32), token)
    assert not verify_tag(bytes([root_key[0] ^ 1]) + root_key[1:], token)


@pytest.mark.parametrize("case", INVALID, ids=ids(INVALID, "error"))
def test_golden_invalid(case: dict[str, str]) -> None:
    text = case["uri"]
    with pytest.raises(InvalidCapability) as info:
        parse(text)
    message = str(info.value)
    assert case["error"] in message
    assert isinstance(info.value, ValueError)
    assert_no_secret(message, text)
    # No long base64url/base32 run of the input (tokens, node ids) is echoed.
    for run in re.findall(r"[A-Za-z0-9_-]{17,}", text):
        assert run not in message


@pytest.mark.parametrize("case", INVALID_TOKENS, ids=ids(INVALID_TOKENS, "error"))
def test_golden_invalid_tokens(case: dict[str, str]) -> None:
    data = bytes.fromhex(case["hex"])
    with pytest.raises(InvalidCapability) as info:
        Token.decode(data)
    assert case["error"] in str(info.value)
    if len(data) > 16:
        assert data[-16:].hex() not in str(info.value)


def test_golden_covers_the_grammar() -> None:
    kinds = {k for v in VALID for c in v["caveats"] for k in c}
    assert kinds == {"exp", "uses", "peer", "label", "unknown"}
    hints = [h for v in VALID for h in v["hints"]]
    tcp_hosts = [
        ipaddress.ip_address(h["tcp"][0]).version
        for h in hints
        if "tcp" in h and not h["tcp"][0][0].isalpha()
    ]
    assert {4, 6} <= set(tcp_hosts)
    assert any("tcp" in h and h["tcp"][0][0].isalpha() for h in hints)
    assert any("unix" in h for h in hints)

    def depth(cap: Capability) -> int:
        vias = [h.capability for h in cap.hints if isinstance(h, ViaHint)]
        return max((1 + depth(c) for c in vias), default=0)

    assert max(depth(parse(u)) for u in VALID_URIS) == 3


# -------------------------------------------------------------------- the module


def test_uri_is_sans_io() -> None:
    tree = ast.parse(Path(uri_module.__file__).read_text("utf-8"))
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            imported.add(node.module.split(".")[0])
    assert not imported & {"anyio", "asyncio", "trio", "socket", "hashlib", "logging", "os"}


def test_public_names() -> None:
    for name in uri_module.__all__:
        assert hasattr(uri_module, name)
    assert {k.name: int(k) for k in CaveatKind} == {
        "EXP": 1, "USES": 2, "PEER": 3, "LABEL": 4, "TO": 5,
    }  # fmt: skip


def test_root_tag_matches_independent_blake2b() -> None:
    expected = hashlib.blake2b(ROOT_ID, digest_size=32, key=ROOT_KEY, person=b"capsock/1 root")
    assert root_tag(ROOT_KEY, ROOT_ID) == expected.digest()
    caveat = Uses(7)
    assert encode_caveat(caveat) == b"\x02\x04\x00\x00\x00\x07"
    step = hashlib.blake2b(
        b"\x02\x04\x00\x00\x00\x07",
        digest_size=32,
        key=expected.digest(),
        person=b"capsock/1 caveat",
    )
    assert chain_tag(expected.digest(), caveat) == step.digest()


def test_encode_caveat_bytes() -> None:
    assert encode_caveat(Expires(2**64 - 1)) == b"\x01\x08" + b"\xff" * 8
    assert encode_caveat(Expires(0)) == b"\x01\x08" + bytes(8)
    assert encode_caveat(Uses(1)) == b"\x02\x04\x00\x00\x00\x01"
    assert encode_caveat(Peer(NODE)) == b"\x03\x20" + NODE.raw
    assert encode_caveat(To(NODE)) == b"\x05\x20" + NODE.raw
    assert encode_caveat(Label("é")) == b"\x04\x02\xc3\xa9"
    assert encode_caveat(UnknownCaveat(9, b"")) == b"\x09\x00"
    with pytest.raises(InvalidCapability):
        encode_caveat("exp")  # type: ignore[arg-type]


def test_root_token_encoding() -> None:
    token = mint_root(ROOT_KEY, ROOT_ID)
    raw = token.encode()
    assert raw == b"\x01" + ROOT_ID + b"\x00" + token.tag
    assert len(raw) == 50
    assert Token.decode(raw) == token
    assert Token.decode(bytearray(raw)) == token
    assert Token.decode(memoryview(raw)) == token


# ------------------------------------------------------------------- attenuation


def base_cap() -> Capability:
    return Capability(NODE, mint_root(ROOT_KEY, ROOT_ID), (TcpHint("127.0.0.1", 4433),))


def test_attenuate_appends_and_chains() -> None:
    cap = base_cap()
    weaker = cap.attenuate(Expires(1_700_000_000), Uses(2))
    assert weaker.node == cap.node and weaker.hints == cap.hints
    assert weaker.root_id == cap.root_id
    assert weaker.caveats == (Expires(1_700_000_000), Uses(2))
    assert weaker.token.tag != cap.token.tag
    assert verify_tag(ROOT_KEY, weaker.token)
    assert weaker.attenuate(Peer(OTHER)).caveats[:2] == weaker.caveats
    # Step by step equals all at once.
    assert cap.attenuate(Expires(1_700_000_000)).attenuate(Uses(2)) == weaker
    assert cap.token.attenuate(Expires(1_700_000_000), Uses(2)) == weaker.token
    assert cap.attenuate() == cap


def test_attenuate_keywords() -> None:
    cap = base_cap()
    weaker = cap.attenuate(Label("x"), ttl=10.5, uses=1, peer=OTHER, label="demo", now=1000.25)
    assert weaker.caveats == (Label("x"), Expires(1011), Peer(OTHER), Label("demo"), Uses(1))
    assert verify_tag(ROOT_KEY, weaker.token)
    (exp,) = cap.attenuate(ttl=30).caveats
    assert isinstance(exp, Expires) and exp.at > 1_700_000_000
    for bad in (0, -1, math.inf, math.nan, True, "10"):
        with pytest.raises(InvalidCapability, match="ttl"):
            cap.attenuate(ttl=bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidCapability):
        cap.attenuate(uses=0)
    with pytest.raises(InvalidCapability):
        cap.attenuate(peer="someone")  # type: ignore[arg-type]


def test_attenuate_limits() -> None:
    cap = base_cap().attenuate(*[Uses(i + 1) for i in range(32)])
    assert len(cap.caveats) == 32
    assert parse(str(cap)) == cap
    with pytest.raises(InvalidCapability, match="too many caveats"):
        cap.attenuate(Uses(1))
    with pytest.raises(InvalidCapability, match="not a caveat"):
        base_cap().attenuate("exp")  # type: ignore[arg-type]
    with pytest.raises(InvalidCapability, match="longer than 4096"):
        base_cap().attenuate(*[UnknownCaveat(99, bytes(255)) for _ in range(16)])


SAMPLE_CAVEATS = (Expires(1_800_000_000), Uses(3), Peer(OTHER), Label("demo"), Uses(9))


def tampered_variants(caveats: tuple[Caveat, ...]) -> list[tuple[Caveat, ...]]:
    variants: list[tuple[Caveat, ...]] = []
    for i in range(len(caveats)):
        variants.append(caveats[:i] + caveats[i + 1 :])  # removed
        for j in range(i + 1, len(caveats)):
            if caveats[i] != caveats[j]:
                swapped = list(caveats)
                swapped[i], swapped[j] = swapped[j], swapped[i]
                variants.append(tuple(swapped))  # reordered
        variants.append((*caveats[:i], altered(caveats[i]), *caveats[i + 1 :]))
    return variants


def altered(caveat: Caveat) -> Caveat:
    if isinstance(caveat, Expires):
        return Expires(caveat.at ^ 1)
    if isinstance(caveat, Uses):
        return Uses(caveat.count ^ 1 or 2)
    if isinstance(caveat, Peer):
        return Peer(NODE if caveat.node != NODE else OTHER)
    if isinstance(caveat, To):
        return To(NODE if caveat.node != NODE else OTHER)
    if isinstance(caveat, Label):
        return Label("!" if caveat.text != "!" else "?")
    return UnknownCaveat(caveat.kind, caveat.value[:-1] if caveat.value else b"!")


def test_caveats_cannot_be_removed_reordered_or_altered() -> None:
    token = mint_root(ROOT_KEY, ROOT_ID).attenuate(*SAMPLE_CAVEATS)
    assert verify_tag(ROOT_KEY, token)
    for caveats in tampered_variants(token.caveats):
        forged = Token(token.root_id, caveats, token.tag)
        assert not verify_tag(ROOT_KEY, forged)
        assert parse(str(Capability(NODE, forged))).token == forged  # well-formed, not valid
    # Re-using an intermediate tag (dropping the last caveats) does not verify either.
    assert not verify_tag(ROOT_KEY, Token(ROOT_ID, SAMPLE_CAVEATS[:2], token.tag))
    assert not verify_tag(ROOT_KEY, Token(bytes(16), token.caveats, token.tag))


def test_every_tag_bit_flip_fails() -> None:
    token = mint_root(ROOT_KEY, ROOT_ID).attenuate(*SAMPLE_CAVEATS)
    for bit in range(256):
        tag = bytearray(token.tag)
        tag[bit // 8] ^= 1 << (bit % 8)
        assert not verify_tag(ROOT_KEY, Token(token.root_id, token.caveats, bytes(tag)))


def test_every_truncation_fails() -> None:
    token = mint_root(ROOT_KEY, ROOT_ID).attenuate(*SAMPLE_CAVEATS)
    raw = token.encode()
    for end in range(len(raw)):
        with pytest.raises(InvalidCapability):
            Token.decode(raw[:end])
    text = str(Capability(NODE, token))
    for end in range(len(text)):
        try:
            cap = parse(text[:end])
        except InvalidCapability as exc:
            assert_no_secret(str(exc), text)
        else:  # pragma: no cover - a truncated token must never verify
            assert not verify_tag(ROOT_KEY, cap.token)


@given(st.integers(min_value=0))
def test_any_bit_flip_in_token_fails(bit: int) -> None:
    token = mint_root(ROOT_KEY, ROOT_ID).attenuate(*SAMPLE_CAVEATS)
    raw = bytearray(token.encode())
    bit %= len(raw) * 8
    raw[bit // 8] ^= 1 << (bit % 8)
    try:
        forged = Token.decode(bytes(raw))
    except InvalidCapability:
        return
    assert not verify_tag(ROOT_KEY, forged)


# ---------------------------------------------------------------------- secrecy


@pytest.mark.parametrize("text", VALID_URIS, ids=ids(VALID, "name"))
def test_repr_and_redacted_hide_every_token(text: str) -> None:
    cap = parse(text)
    shown = [repr(cap), repr(cap.token), str(cap.token), cap.redacted(), repr(cap.hints)]
    shown += [f"{cap!r}", "{!r}".format(cap)]  # noqa: UP032
    for hint in cap.hints:
        shown.append(repr(hint))
        if isinstance(hint, ViaHint):
            shown.append(repr(hint.capability))
    for secret in secrets_of(cap):
        for item in shown:
            assert secret not in item
    assert cap.root_id.hex() not in repr(cap.token)
    assert repr(cap.token).startswith("Token(<redacted>, caveats=")
    assert cap.redacted().startswith(f"capsock://{cap.node}/<redacted>")
    assert repr(cap).startswith(f"Capability(node={cap.node!r}, token=Token(<redacted>")
    for hint in cap.hints:
        if not isinstance(hint, ViaHint):
            assert str(hint) in cap.redacted()
    # str() is the shareable form and does carry the token.
    assert b64(cap.token.encode()) in str(cap)


def test_redacted_via_is_readable() -> None:
    inner = base_cap()
    outer = Capability(OTHER, mint_root(ROOT_KEY, ROOT_ID), (ViaHint(inner),))
    assert outer.redacted() == (
        f"capsock://{OTHER}/<redacted>?via=capsock://{NODE}/<redacted>%3Ftcp%3D127.0.0.1:4433"
    )


# ------------------------------------------------------------- construction checks


@pytest.mark.parametrize(
    "make",
    [
        lambda: Expires(-1),
        lambda: Expires(2**64),
        lambda: Expires(True),
        lambda: Expires(1.5),  # type: ignore[arg-type]
        lambda: Uses(0),
        lambda: Uses(2**32),
        lambda: Peer(b"x" * 32),  # type: ignore[arg-type]
        lambda: Label(""),
        lambda: Label("a" * 65),
        lambda: Label("é" * 33),
        lambda: Label("a\x00"),
        lambda: Label("a\x1b[31m"),
        lambda: Label("a\u202eb"),
        lambda: Label("a\u2028b"),
        lambda: Label("\ud800"),
        lambda: Label(b"x"),  # type: ignore[arg-type]
        lambda: UnknownCaveat(1, bytes(8)),
        lambda: UnknownCaveat(4, b"x"),
        lambda: UnknownCaveat(256, b""),
        lambda: UnknownCaveat(-1, b""),
        lambda: UnknownCaveat(9, bytes(256)),
        lambda: UnknownCaveat(9, "x"),  # type: ignore[arg-type]
        lambda: Token(bytes(15), (), bytes(32)),
        lambda: Token(bytes(16), (), bytes(31)),
        lambda: Token(bytes(16), (Uses(1),) * 33, bytes(32)),
        lambda: Token(bytes(16), ("exp",), bytes(32)),  # type: ignore[arg-type]
        lambda: TcpHint("127.0.0.1", 0),
        lambda: TcpHint("127.0.0.1", 65536),
        lambda: TcpHint("127.0.0.1", True),
        lambda: TcpHint("[::1]", 80),
        lambda: TcpHint("::ffff:1.2.3.4", 80),
        lambda: TcpHint("fe80::1%eth0", 80),
        lambda: TcpHint("under_score.example", 80),
        lambda: TcpHint("\u212aelvin.example", 80),
        lambda: TcpHint("", 80),
        lambda: UnixHint("relative"),
        lambda: UnixHint("/a\x00b"),
        lambda: UnixHint("/" + "a" * 107),
        lambda: UnixHint("/\udcff"),
        lambda: ViaHint("capsock://x"),  # type: ignore[arg-type]
        lambda: Capability(NODE, mint_root(ROOT_KEY, ROOT_ID), ("tcp=1.2.3.4:5",)),  # type: ignore[arg-type]
        lambda: Capability(str(NODE), mint_root(ROOT_KEY, ROOT_ID)),  # type: ignore[arg-type]
        lambda: Capability(NODE, b"token"),  # type: ignore[arg-type]
        lambda: Capability(NODE, mint_root(ROOT_KEY, ROOT_ID), (UnixHint("/a"),) * 2),
        lambda: Capability(
            NODE, mint_root(ROOT_KEY, ROOT_ID), tuple(TcpHint("10.0.0.1", p) for p in range(1, 18))
        ),
    ],
)
def test_constructors_validate(make: Any) -> None:
    with pytest.raises(InvalidCapability):
        make()


def test_root_key_misuse_is_local_error() -> None:
    for bad in (bytes(31), bytes(33), "k" * 32):
        with pytest.raises(LocalUsageError):
            root_tag(bad, ROOT_ID)  # type: ignore[arg-type]
        with pytest.raises(LocalUsageError):
            verify_tag(bad, mint_root(ROOT_KEY, ROOT_ID))  # type: ignore[arg-type]
    with pytest.raises(InvalidCapability):
        mint_root(ROOT_KEY, bytes(17))
    with pytest.raises(InvalidCapability):
        chain_tag(bytes(31), Uses(1))


def test_hint_normalisation_and_text() -> None:
    assert TcpHint("LocalHost", 80) == TcpHint("localhost", 80)
    assert TcpHint("2001:DB8:0:0::1", 443).host == "2001:db8::1"
    assert str(TcpHint("2001:db8::1", 443)) == "tcp=[2001:db8::1]:443"
    assert str(TcpHint("192.0.2.1", 1)) == "tcp=192.0.2.1:1"
    assert str(UnixHint("/run/a b/c%d.sock")) == "unix=/run/a%20b/c%25d.sock"
    assert len(UnixHint("/" + "é" * 53).path.encode()) == 107
    via = ViaHint(base_cap())
    assert str(via) == "via=" + str(base_cap()).replace(":", "%3A").replace("/", "%2F").replace(
        "?", "%3F"
    ).replace("=", "%3D")


def test_via_depth_limit() -> None:
    cap = base_cap()
    for _ in range(3):
        cap = Capability(NODE, mint_root(ROOT_KEY, ROOT_ID), (ViaHint(cap),))
    assert parse(str(cap)) == cap
    with pytest.raises(InvalidCapability, match="nested deeper than 3"):
        ViaHint(cap)


def test_with_hints_and_root_id() -> None:
    cap = base_cap()
    moved = cap.with_hints([UnixHint("/tmp/s"), TcpHint("::1", 9)])
    assert moved.hints == (UnixHint("/tmp/s"), TcpHint("::1", 9))
    assert moved.token == cap.token and moved.node == cap.node
    assert cap.with_hints(()).hints == ()
    assert str(cap.with_hints(())) == str(cap).partition("?")[0]
    assert cap.root_id == ROOT_ID
    with pytest.raises(InvalidCapability, match="duplicate"):
        cap.with_hints([UnixHint("/a"), UnixHint("/a")])


def test_value_objects_are_hashable_and_frozen() -> None:
    cap = parse(VALID_URIS[-1])
    assert hash(cap) == hash(parse(VALID_URIS[-1]))
    with pytest.raises(AttributeError):
        cap.node = NODE  # type: ignore[misc]
    with pytest.raises(AttributeError):
        cap.token.tag = bytes(32)  # type: ignore[misc]


@pytest.mark.parametrize("value", [None, b"capsock://x/y", 42, ["capsock://"], bytearray(b"x")])
def test_non_str_input(value: object) -> None:
    with pytest.raises(InvalidCapability, match="must be a str"):
        parse(value)  # type: ignore[arg-type]
    with pytest.raises(InvalidCapability):
        Capability.parse(value)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [None, "01", 42])
def test_token_decode_non_bytes(value: object) -> None:
    with pytest.raises(InvalidCapability, match="a token is bytes"):
        Token.decode(value)  # type: ignore[arg-type]


# ------------------------------------------------------------------- properties

LABEL_CHARS = st.characters(blacklist_categories=["Cc", "Cf", "Cs", "Zl", "Zp"])
NODE_IDS = st.binary(min_size=32, max_size=32).map(NodeId)
CAVEATS: st.SearchStrategy[Caveat] = st.one_of(
    st.integers(0, 2**64 - 1).map(Expires),
    st.integers(1, 2**32 - 1).map(Uses),
    NODE_IDS.map(Peer),
    NODE_IDS.map(To),
    st.text(LABEL_CHARS, min_size=1, max_size=16)
    .filter(lambda t: len(t.encode()) <= 64)
    .map(Label),
    st.builds(
        UnknownCaveat,
        st.integers(0, 255).filter(lambda k: k not in (1, 2, 3, 4, 5)),
        st.binary(max_size=24),
    ),
)
DNS_NAMES = st.from_regex(
    r"\A[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?(\.[a-z]([a-z0-9-]{0,8}[a-z])?){0,3}\Z"
)
HOSTS = st.one_of(
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(str).filter(lambda a: not a.startswith("::ffff:")),
    DNS_NAMES.filter(lambda n: not n.split(".")[-1].isdigit()),
)
PATHS = (
    st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"), max_size=30)
    .map(lambda t: "/" + t)
    .filter(lambda p: len(p.encode()) <= 107)
)
SIMPLE_HINTS: st.SearchStrategy[Hint] = st.one_of(
    st.builds(TcpHint, HOSTS, st.integers(1, 65535)), PATHS.map(UnixHint)
)


@st.composite
def capabilities(draw: st.DrawFn, depth: int = 0) -> Capability:
    node = draw(NODE_IDS)
    token = Token(
        draw(st.binary(min_size=16, max_size=16)),
        tuple(draw(st.lists(CAVEATS, max_size=4))),
        draw(st.binary(min_size=32, max_size=32)),
    )
    hint_strategy = SIMPLE_HINTS
    if depth < 2:
        hint_strategy = st.one_of(SIMPLE_HINTS, capabilities(depth + 1).map(ViaHint))
    hints = draw(st.lists(hint_strategy, max_size=3, unique=True))
    return Capability(node, token, tuple(hints))


@settings(max_examples=300, deadline=None)
@given(capabilities())
def test_property_format_parse_round_trip(cap: Capability) -> None:
    text = str(cap)
    assert parse(text) == cap
    assert str(parse(text)) == text
    assert Token.decode(cap.token.encode()) == cap.token
    for secret in secrets_of(cap):
        assert secret not in repr(cap) and secret not in cap.redacted()


@settings(max_examples=200, deadline=None)
@given(st.lists(CAVEATS, max_size=8), st.lists(CAVEATS, max_size=8))
def test_property_attenuation_chain(first: list[Caveat], second: list[Caveat]) -> None:
    root = mint_root(ROOT_KEY, ROOT_ID)
    step = root.attenuate(*first).attenuate(*second)
    assert step == root.attenuate(*first, *second)
    assert step.tag == compute_tag(ROOT_KEY, ROOT_ID, first + second)
    assert verify_tag(ROOT_KEY, step)
    both = tuple(first + second)
    for caveats in tampered_variants(both):
        if caveats != both:
            assert not verify_tag(ROOT_KEY, Token(ROOT_ID, caveats, step.tag))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64), st.binary(min_size=32, max_size=32), CAVEATS)
def test_property_blake2b_cross_check(root_id: bytes, key: bytes, caveat: Caveat) -> None:
    root_id = (root_id + bytes(16))[:16]
    expected = hashlib.blake2b(root_id, digest_size=32, key=key, person=b"capsock/1 root")
    assert root_tag(key, root_id) == expected.digest()
    step = hashlib.blake2b(
        encode_caveat(caveat), digest_size=32, key=expected.digest(), person=b"capsock/1 caveat"
    )
    assert chain_tag(expected.digest(), caveat) == step.digest()


def check_parse(text: str) -> None:
    """The only outcomes: InvalidCapability (safe message) or a canonical round trip."""
    try:
        cap = parse(text)
    except InvalidCapability as exc:
        assert isinstance(exc, ValueError)
        assert_no_secret(str(exc), text)
    else:
        assert str(cap) == text


URI_ALPHABET = (
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.~:/?#[]@!$&'()*+,;=% "
)
KEYS = st.sampled_from(["tcp", "unix", "via", "", "TCP", "x", "advertise"])
VALUES = st.one_of(
    st.text(URI_ALPHABET, max_size=20),
    st.sampled_from(["127.0.0.1:80", "[::1]:80", "/tmp/x", "%2Ftmp", "example.com:443", "%zz"]),
    st.sampled_from(VALID_URIS).map(
        lambda u: "".join(f"%{b:02X}" if chr(b) in ":/?&=%" else chr(b) for b in u.encode())
    ),
)


@st.composite
def grammar_like(draw: st.DrawFn) -> str:
    node = draw(
        st.one_of(
            st.sampled_from([v["node"] for v in VALID]),
            st.text("abcdefghijklmnopqrstuvwxyz234567A", min_size=50, max_size=54),
        )
    )
    token = draw(
        st.one_of(
            st.sampled_from([b64(bytes.fromhex(v["token"])) for v in VALID]),
            st.binary(max_size=120).map(b64),
            st.text("ABCabc019-_=+/", max_size=90),
        )
    )
    text = draw(st.sampled_from(["capsock://", "CAPSOCK://", "capsock:/", ""])) + node + "/" + token
    if draw(st.booleans()):
        parts = draw(
            st.lists(st.tuples(KEYS, st.sampled_from(["=", "", "=="]), VALUES), max_size=5)
        )
        text += "?" + "&".join(k + eq + v for k, eq, v in parts)
    return text


@st.composite
def mutated(draw: st.DrawFn) -> str:
    text: str = draw(st.sampled_from(VALID_URIS))
    for _ in range(draw(st.integers(1, 3))):
        pos = draw(st.integers(0, len(text)))
        op = draw(st.sampled_from(["delete", "insert", "replace", "truncate", "duplicate"]))
        char: str = draw(st.one_of(st.sampled_from(URI_ALPHABET), st.characters()))
        if op == "delete":
            text = text[:pos] + text[pos + 1 :]
        elif op == "insert":
            text = text[:pos] + char + text[pos:]
        elif op == "replace":
            text = text[:pos] + char + text[pos + 1 :]
        elif op == "truncate":
            text = text[:pos]
        else:
            end = draw(st.integers(pos, len(text)))
            text = text[:end] + text[pos:end] + text[end:]
    return text


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.text(), st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E))))
def test_fuzz_random_text(text: str) -> None:
    check_parse(text)
    check_parse("capsock://" + text)


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(grammar_like())
def test_fuzz_grammar_like(text: str) -> None:
    check_parse(text)


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_fuzz_mutations_of_valid_uris(text: str) -> None:
    assume(text not in VALID_URIS)
    check_parse(text)


@settings(max_examples=1000, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=400),
        st.binary(max_size=300).map(lambda b: b"\x01" + b),
        st.tuples(
            st.binary(min_size=16, max_size=16), st.integers(0, 40), st.binary(max_size=300)
        ).map(lambda t: b"\x01" + t[0] + bytes([t[1]]) + t[2]),
    )
)
def test_fuzz_token_decode(data: bytes) -> None:
    try:
        token = Token.decode(data)
    except InvalidCapability as exc:
        assert isinstance(exc, ValueError)
        if len(data) >= 8:
            assert data.hex() not in str(exc) and b64(data) not in str(exc)
    else:
        assert token.encode() == data


def test_to_caveat_round_trips_and_comes_after_peer() -> None:
    cap = Capability(NODE, mint_root(ROOT_KEY, ROOT_ID))
    narrowed = cap.attenuate(ttl=60, peer=NODE, to=NODE, label="x", uses=1, now=1000)
    kinds = [type(c).__name__ for c in narrowed.caveats]
    assert kinds == ["Expires", "Peer", "To", "Label", "Uses"]
    again = Capability.parse(str(narrowed))
    assert again == narrowed
    assert To(NODE) in again.caveats
    with pytest.raises(InvalidCapability):
        To(b"\x00" * 32)  # type: ignore[arg-type]
