"""The compact form of ``via`` hints (``v=``): short relayed URIs, nothing weakened.

A node's relay hints (and an introduction's forwarding hint) carry the forwarder
capability attenuated with ``to=<this node>``.  Written as ``v=<base64url>`` the
``to`` caveat's node id is left out (it is the outer URI's node id) and the
nested URI text is replaced by a binary encoding.  These tests pin the length,
the round trips, the compatibility with the long form, that the tag chain still
covers the elided caveat, and that such a URI really connects through a relay.
"""

from __future__ import annotations

import json
import os
import urllib.parse
from pathlib import Path
from typing import Any

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import capsock
from capsock import CapsockAttribute
from capsock.keys import KeyPair, NodeId
from capsock.uri import (
    Capability,
    Caveat,
    Hint,
    Label,
    TcpHint,
    To,
    Token,
    UnixHint,
    ViaHint,
    mint_root,
    parse,
)

from .chaos import RelayProcess, free_port
from .helpers import echo
from .test_uri import CAVEATS, NODE_IDS, SIMPLE_HINTS, capabilities, secrets_of, verify_tag

GOLDEN: dict[str, Any] = json.loads(
    (Path(__file__).parent / "data" / "uris.json").read_text("utf-8")
)
RELAY_KEY = bytes(range(7, 39))
NODE = KeyPair(bytes(range(32))).node_id
RELAY = KeyPair(bytes(range(32, 64))).node_id
OTHER = KeyPair(bytes(range(64, 96))).node_id


def relay_cap(*hints: Hint, caveats: tuple[Caveat, ...] = ()) -> Capability:
    return Capability(RELAY, mint_root(RELAY_KEY, bytes(16)), hints).attenuate(*caveats)


def relayed(node: NodeId, relay: Capability, *extra: Hint) -> Capability:
    """What a node registered with ``relay`` mints: the relay bound ``to`` the node."""
    return Capability(
        node, mint_root(bytes(32), bytes(range(16))), (*extra, ViaHint(relay.attenuate(to=node)))
    )


def long_text(cap: Capability) -> str:
    """``cap`` with every hint in the long form (how URIs were written before ``v=``)."""
    text = str(cap).partition("?")[0]
    return text + "?" + "&".join(str(h) for h in cap.hints) if cap.hints else text


# ------------------------------------------------------------------------ length


@pytest.mark.parametrize(
    "hint",
    [TcpHint("127.0.0.1", 65535), TcpHint("203.0.113.7", 443), TcpHint("255.255.255.255", 10000)],
    ids=str,
)
def test_one_relay_with_one_tcp_hint_is_at_most_250_characters(hint: TcpHint) -> None:
    cap = relayed(NODE, relay_cap(hint))
    text = str(cap)
    assert len(text) <= 250, (len(text), text)
    assert "v=" in text and "via=" not in text
    assert len(long_text(cap)) > 330  # the long form it replaces


def test_golden_relayed_uri_is_compact_and_short() -> None:
    (case,) = [v for v in GOLDEN["valid"] if v["name"] == "relayed-compact"]
    assert len(case["uri"]) <= 250 and "?v=" in case["uri"]
    cap = parse(case["uri"])
    (via,) = cap.hints
    assert isinstance(via, ViaHint) and via.capability.caveats == (To(cap.node),)


# ------------------------------------------------------------- what is written


def test_compact_only_where_the_to_caveat_names_the_outer_node() -> None:
    tcp = TcpHint("198.51.100.7", 443)
    assert "?v=" in str(relayed(NODE, relay_cap(tcp)))
    root = mint_root(bytes(32), bytes(range(16)))
    for forwarder in (
        relay_cap(tcp),  # no to caveat
        relay_cap(tcp).attenuate(to=OTHER),  # to another node
        relay_cap(tcp).attenuate(to=NODE, label="after"),  # to is not the last caveat
        relay_cap(ViaHint(relay_cap(tcp).attenuate(to=RELAY))).attenuate(to=NODE),  # nested via
    ):
        text = str(Capability(NODE, root, (ViaHint(forwarder),)))
        assert "?via=capsock%3A%2F%2F" in text and "v=" not in text.partition("?")[2][:2]
        assert parse(text).hints == (ViaHint(forwarder),)


def test_the_elided_to_caveat_is_restored_and_the_tag_covers_it() -> None:
    text = str(relayed(NODE, relay_cap(TcpHint("127.0.0.1", 4000))))
    (via,) = parse(text).hints
    assert isinstance(via, ViaHint)
    assert via.capability.caveats == (To(NODE),)
    assert verify_tag(RELAY_KEY, via.capability.token)  # the relay accepts exactly this


def test_a_compact_value_moved_to_another_nodes_uri_is_not_a_capability_for_it() -> None:
    # The v= value names no node: moved into a URI for OTHER it is read as
    # to=OTHER, a chain the relay never minted, so the relay refuses it.
    compact = str(relayed(NODE, relay_cap(TcpHint("127.0.0.1", 4000)))).partition("?")[2]
    other = Capability(OTHER, mint_root(bytes(32), bytes(range(16))))
    (via,) = parse(f"{other}?{compact}").hints
    assert isinstance(via, ViaHint)
    assert via.capability.caveats == (To(OTHER),)
    assert not verify_tag(RELAY_KEY, via.capability.token)


def test_the_secret_stays_out_of_repr_and_redacted() -> None:
    cap = relayed(NODE, relay_cap(TcpHint("127.0.0.1", 4000)))
    value = str(cap).partition("?v=")[2]
    for secret in [value, *secrets_of(cap)]:
        assert secret not in repr(cap) and secret not in cap.redacted()


# ----------------------------------------------------------------- compatibility


@pytest.mark.parametrize("case", GOLDEN["legacy"], ids=lambda c: str(c["canonical"])[-24:])
def test_golden_long_form_still_parses_to_the_same_capability(case: dict[str, str]) -> None:
    old, new = case["uri"], case["canonical"]
    assert old != new
    assert "v=" not in old.partition("?")[2].replace("via=", "")
    assert parse(old) == parse(new)
    assert str(parse(old)) == new
    assert str(parse(new)) == new


def test_the_long_form_stays_strict() -> None:
    cap = relayed(NODE, relay_cap(TcpHint("127.0.0.1", 4000)))
    good = long_text(cap)
    assert parse(good) == cap
    lower = good.partition("?via=")[0] + "?via=" + good.partition("?via=")[2].lower()
    with pytest.raises(capsock.InvalidCapability, match="via hint"):
        parse(lower)
    with pytest.raises(capsock.InvalidCapability, match="duplicate hint"):
        parse(good + "&" + str(cap).partition("?")[2])


# -------------------------------------------------------------------- properties


FORWARDER_HINTS = st.lists(SIMPLE_HINTS, max_size=4, unique=True)


@st.composite
def relayed_capabilities(draw: st.DrawFn) -> Capability:
    node = draw(NODE_IDS)
    forwarder = Capability(
        draw(NODE_IDS),
        Token(
            draw(st.binary(min_size=16, max_size=16)),
            tuple(draw(st.lists(CAVEATS, max_size=6))),
            draw(st.binary(min_size=32, max_size=32)),
        ),
        tuple(draw(FORWARDER_HINTS)),
    ).attenuate(to=node)
    others = draw(st.lists(st.one_of(SIMPLE_HINTS, capabilities(1).map(ViaHint)), max_size=3))
    hints = list(dict.fromkeys([*others, ViaHint(forwarder)]))
    order = draw(st.permutations(hints))
    return Capability(node, draw(capabilities()).token, tuple(order))


@settings(max_examples=300, deadline=None)
@given(relayed_capabilities())
def test_property_compact_round_trip(cap: Capability) -> None:
    text = str(cap)
    assert "v=" in text
    assert parse(text) == cap
    assert str(parse(text)) == text
    # The long form of the same capability still parses, to the same object.
    assert parse(long_text(cap)) == cap
    assert len(text) <= len(long_text(cap))


@settings(max_examples=300, deadline=None)
@given(relayed_capabilities(), st.data())
def test_property_a_changed_compact_value_never_parses_to_the_same_capability(
    cap: Capability, data: st.DataObject
) -> None:
    query = str(cap).partition("?")[2]
    parts = query.split("&")
    index = next(i for i, p in enumerate(parts) if p.startswith("v="))
    value = parts[index][2:]
    pos = data.draw(st.integers(0, len(value) - 1))
    char = data.draw(st.sampled_from("AQgw_-9z"))
    changed = value[:pos] + char + value[pos + 1 :]
    parts[index] = "v=" + changed
    text = str(cap).partition("?")[0] + "?" + "&".join(parts)
    try:
        other = parse(text)
    except capsock.InvalidCapability:
        return
    assert (other == cap) == (changed == value)
    assert str(other) == text  # whatever parses is canonical


def test_property_strategies_reach_every_item_type() -> None:
    # The strategy above draws caveats, IPv4, IPv6, DNS and unix hints (SIMPLE_HINTS);
    # one explicit example of each, so a regression in one item type shows by name.
    forwarder = relay_cap(
        TcpHint("192.0.2.1", 1),
        TcpHint("2001:db8::1", 2),
        TcpHint("relay.example", 3),
        UnixHint("/run/r \u00e9.sock"),
        caveats=(Label("x"),),
    )
    cap = relayed(NODE, forwarder)
    assert "?v=" in str(cap) and parse(str(cap)) == cap


# ---------------------------------------------------------- through a real relay


async def _wait_registered(node: capsock.Node) -> None:
    with anyio.fail_after(20):
        while not all(s == "registered" for s in node.relay_status.values()):
            await anyio.sleep(0.05)


@pytest.mark.anyio
async def test_a_compact_uri_minted_by_a_relayed_node_connects_through_the_relay(
    tmp_path: Path,
) -> None:
    relay = await anyio.to_thread.run_sync(RelayProcess, tmp_path / "relay", free_port())
    try:
        async with (
            capsock.Node(relays=[relay.uri]) as endpoint,
            capsock.Node() as dialer,
            anyio.create_task_group() as tg,
        ):
            await _wait_registered(endpoint)
            service = await endpoint.listen()
            text = str(service.uri)
            assert "?v=" in text and "via=" not in text
            assert len(text) <= 250, (len(text), service.uri.redacted())
            tg.start_soon(service.serve, echo)
            stream = await dialer.connect(text)  # the text, as a user would paste it
            assert stream.extra(CapsockAttribute.route).startswith("via ")
            payload = os.urandom(64 << 10)
            await stream.send(payload)
            got = b""
            while len(got) < len(payload):
                got += await stream.receive()
            assert got == payload
            await stream.aclose()
            # The same capability in the long form (as URIs were written before
            # the compact form) reaches the endpoint the same way.
            old = long_text(service.uri)
            assert urllib.parse.quote("capsock://", safe="") in old
            async with capsock.Node() as again:
                stream = await again.connect(old)
                await stream.send(b"old form")
                assert await stream.receive() == b"old form"
                await stream.aclose()
            tg.cancel_scope.cancel()
    finally:
        relay.kill()
