"""The sans-IO coordination of direct paths (core.direct): encoding, validation, decisions."""

from __future__ import annotations

import ast
import contextlib
from pathlib import Path

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from capsock.core import direct
from capsock.core.direct import (
    Address,
    Candidates,
    DirectMessageError,
    Observed,
    PathOffer,
    Ping,
    Pong,
    RttMeter,
    Sync,
)
from capsock.errors import ProtocolError

PKG = Path(__file__).resolve().parents[1] / "src" / "capsock"
FORBIDDEN = {"anyio", "trio", "asyncio", "socket", "selectors", "sniffio"}


def test_direct_is_sans_io() -> None:
    """direct.py imports no I/O module, and of capsock only the sans-IO errors module."""
    tree = ast.parse((PKG / "core" / "direct.py").read_text())
    external: set[str] = set()
    siblings: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            external.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            (siblings if node.level else external).add(node.module.split(".")[0])
    assert not external & FORBIDDEN
    assert siblings <= {"errors"}


ipv4 = st.ip_addresses(v=4).filter(lambda a: not (a.is_multicast or a.is_unspecified)).map(str)
ipv6 = st.ip_addresses(v=6).filter(lambda a: not (a.is_multicast or a.is_unspecified)).map(str)
addresses = st.builds(Address, st.one_of(ipv4, ipv6), st.integers(1, 65535))
addr_lists = st.lists(addresses, max_size=direct.MAX_CANDIDATES).map(tuple)
nonces = st.binary(min_size=8, max_size=8)
seqs = st.integers(0, 2**32 - 1)
messages = st.one_of(
    st.builds(Observed, addresses),
    st.builds(Candidates, addr_lists, addr_lists),
    st.builds(Ping, seqs, nonces),
    st.builds(Pong, seqs, nonces),
    st.builds(Sync, st.integers(1, direct.MAX_ATTEMPT)),
)


@given(messages)
def test_encode_decode_round_trip(msg: direct.DirectMessage) -> None:
    data = direct.encode(msg)
    assert len(data) <= direct.MAX_MESSAGE
    assert direct.decode(data) == msg


@given(st.binary(max_size=2000))
def test_decode_random_bytes_only_raises_typed_error(data: bytes) -> None:
    try:
        direct.decode(data)
    except DirectMessageError as exc:
        assert isinstance(exc, ProtocolError)


json_like = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.text(max_size=8)
    | st.binary(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=3), inner, max_size=4)
    ),
    max_leaves=6,
)


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(
        [*(f"direct/{k}" for k in ("observed", "candidates", "ping", "pong", "sync")), "x"]
    ),
    st.dictionaries(st.sampled_from(["a", "o", "l", "s", "n", "k", "z"]), json_like, max_size=4),
)
def test_decode_structured_junk_only_raises_typed_error(
    kind: str, fields: dict[str, object]
) -> None:
    data = msgpack.packb({"type": kind, **fields}, use_bin_type=True)
    with contextlib.suppress(DirectMessageError):
        direct.decode(data)


@pytest.mark.parametrize(
    "body",
    [
        [1, 2],
        {"type": "direct/observed"},
        {"type": "direct/observed", "a": ["203.0.113.5", 0]},
        {"type": "direct/observed", "a": ["203.0.113.5", 65536]},
        {"type": "direct/observed", "a": ["203.0.113.5", True]},
        {"type": "direct/observed", "a": ["example.org", 80]},
        {"type": "direct/observed", "a": ["0.0.0.0", 80]},
        {"type": "direct/observed", "a": ["224.0.0.1", 80]},
        {"type": "direct/observed", "a": ["2001:DB8::1", 80]},  # not canonical
        {"type": "direct/observed", "a": ["203.0.113.5", 80], "extra": 1},
        {"type": "direct/candidates", "o": [["192.0.2.1", 1]] * 9, "l": []},
        {"type": "direct/candidates", "o": [], "l": [["192.0.2.1"]]},
        {"type": "direct/ping", "s": -1, "n": b"12345678"},
        {"type": "direct/ping", "s": 1, "n": b"short"},
        {"type": "direct/sync", "k": 0},
        {"type": "direct/sync", "k": 4},
        {"type": "nope"},
    ],
)
def test_bad_fields_are_refused(body: object) -> None:
    with pytest.raises(DirectMessageError):
        direct.decode(msgpack.packb(body, use_bin_type=True))


def test_oversized_and_garbage_refused() -> None:
    with pytest.raises(DirectMessageError, match="larger"):
        direct.decode(b"\x90" * (direct.MAX_MESSAGE + 1))
    with pytest.raises(DirectMessageError, match="msgpack"):
        direct.decode(b"\xc1")
    with pytest.raises(DirectMessageError):
        direct.decode(b"")


def test_dial_list_observed_first_deduplicated_bounded() -> None:
    obs = (Address("203.0.113.21", 4000),)
    loc = (Address("192.0.2.10", 4000), Address("203.0.113.21", 4000))
    assert Candidates(obs, loc).dial_list() == [("203.0.113.21", 4000), ("192.0.2.10", 4000)]


def test_rtt_meter_matches_only_the_outstanding_probe() -> None:
    meter = RttMeter(b"\x01" * 8)
    first = meter.ping(10.0)
    second = meter.ping(11.0)
    assert meter.pong(direct.answer(first), 11.5) is None  # stale seq
    assert meter.pong(Pong(second.seq, b"\x02" * 8), 11.5) is None  # wrong nonce
    assert meter.pong(direct.answer(second), 11.25) == pytest.approx(0.25)
    assert meter.pong(direct.answer(second), 12.0) is None  # replayed
    assert direct.sync_delay(0.25) == pytest.approx(0.125)
    assert direct.sync_delay(1000.0) == direct.MAX_RTT / 2
    with pytest.raises(ValueError):
        direct.sync_delay(float("nan"))


node_ids = st.binary(min_size=32, max_size=32)


@given(node_ids, node_ids)
def test_exactly_one_node_is_coordinator_and_noise_initiator(a: bytes, b: bytes) -> None:
    if a == b:
        with pytest.raises(ValueError):
            direct.coordinator(a, b)
        return
    assert direct.coordinator(a, b) == direct.coordinator(b, a)
    assert direct.is_noise_initiator(a, b) != direct.is_noise_initiator(b, a)


_MIRROR = {"local": "peer", "peer": "local", "both": "both"}
offers = st.lists(
    st.tuples(st.binary(min_size=32, max_size=32), st.sampled_from(["local", "peer", "both"])),
    min_size=1,
    max_size=5,
    unique_by=lambda t: t[0],
)


@given(node_ids, node_ids, offers, st.randoms())
def test_choose_path_is_symmetric(
    a: bytes, b: bytes, raw: list[tuple[bytes, str]], rnd: object
) -> None:
    """Both nodes, each with its own view and order of the same connections, keep the same one."""
    if a == b:
        return
    view_a = [PathOffer(pid, by) for pid, by in raw]  # type: ignore[arg-type]
    view_b = [PathOffer(pid, _MIRROR[by]) for pid, by in raw]  # type: ignore[arg-type]
    rnd.shuffle(view_b)  # type: ignore[attr-defined]
    assert direct.choose_path(a, b, view_a) == direct.choose_path(b, a, view_b)


def test_choose_path_dial_and_accept_keeps_the_coordinators_dial() -> None:
    low, high = b"\x01" * 32, b"\x02" * 32
    dial_by_low, dial_by_high = b"\xff" * 32, b"\x00" * 32
    # low's view: it dialed one connection, accepted the other.
    low_view = [PathOffer(dial_by_low, "local"), PathOffer(dial_by_high, "peer")]
    high_view = [PathOffer(dial_by_low, "peer"), PathOffer(dial_by_high, "local")]
    assert direct.choose_path(low, high, low_view) == dial_by_low
    assert direct.choose_path(high, low, high_view) == dial_by_low
    with pytest.raises(ValueError):
        direct.choose_path(low, high, [])
