"""Tests written against one mutation each (docs/testing.md, "How we test").

Each test here was seen failing with a specific breakage of the security
core applied to the source, and passing without it; the breakage is named in
the docstring.  Node-level tests run on asyncio and trio over loopback.
"""

from __future__ import annotations

import ast
import hmac
import logging
import os
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest

import capsock
import capsock.store
import capsock.uri
import capsock.uri._token
from capsock import ErrorCode, NodeConfig
from capsock.keys import KeyPair
from capsock.store import MemoryStore, RootEntry, authorize
from capsock.uri import Capability, Expires, Label, Peer, To, Token, Uses, mint_root

pytestmark = pytest.mark.anyio
SRC = Path(capsock.__file__).resolve().parent
ROOT_KEY, ROOT_ID = bytes(range(32)), bytes(range(16))
PEER = KeyPair(bytes(32)).node_id
OTHER = KeyPair(bytes([1]) * 32).node_id


def _store() -> MemoryStore:
    store = MemoryStore()
    store.add_root(RootEntry(ROOT_ID, ROOT_KEY))
    return store


def _forge(token: Token) -> Token:
    """The same root id and caveats, one bit of the tag flipped."""
    return Token(token.root_id, token.caveats, bytes([token.tag[0] ^ 1]) + token.tag[1:])


# ------------------------------------------------------------------ store: the tag check


@pytest.mark.parametrize(
    "caveats",
    [(To(PEER),), (Label("x"), To(OTHER)), (To(PEER), Uses(3), To(OTHER))],
    ids=["to", "label-to", "to-uses-to"],
)
def test_a_to_caveat_does_not_excuse_a_wrong_tag(caveats: tuple[object, ...]) -> None:
    """Breakage: a token whose caveats include ``to`` passes the tag check
    whatever its tag (store.py ``tag_ok``)."""
    token = mint_root(ROOT_KEY, ROOT_ID).attenuate(*caveats)  # type: ignore[arg-type]
    assert authorize(_store(), token, peer=PEER, now=0).allowed  # an endpoint lets `to` pass
    assert authorize(_store(), _forge(token), peer=PEER, now=0).reason == "bad tag"


async def test_a_forged_token_with_a_to_caveat_is_refused_by_a_node() -> None:
    """The same breakage, seen from a dialer: the forged token must not open."""
    async with capsock.Node(listen=["tcp:127.0.0.1:0"]) as server, capsock.Node() as client:
        listener = await server.listen()
        real = listener.uri.attenuate(To(client.id))
        stream = await client.connect(real)
        await stream.aclose()
        forged = Capability(server.id, _forge(real.token), real.hints)
        with pytest.raises(capsock.CapabilityRejected) as info:
            await client.connect(forged)
        assert info.value.code == ErrorCode.REFUSED


def _revoked_store(token: Token) -> MemoryStore:
    store = _store()
    store.revoke(token.tag, token.root_id)
    return store


def _used_store(token: Token) -> MemoryStore:
    store = _store()
    assert authorize(store, token, peer=PEER, now=0).allowed
    return store


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("unknown", "unknown root"),
        ("forged", "bad tag"),
        ("revoked", "revoked"),
        ("revoked-parent", "revoked"),
        ("expired", "expired"),
        ("wrong-peer", "bound to another peer"),
        ("used-up", "used up"),
        ("unknown-caveat", "unknown caveat kind 99"),
    ],
)
def test_each_refusal_has_its_own_local_reason(case: str, reason: str) -> None:
    """The wire answer is uniform, the local log is not: every refusal names
    its reason (the "each reason in the endpoint's log" half of uniform
    rejection), and a token refused for one reason is not allowed."""
    root = mint_root(ROOT_KEY, ROOT_ID)
    store = _store()
    token = root.attenuate(Label("x"))
    if case == "unknown":
        token = mint_root(os.urandom(32), os.urandom(16))
    elif case == "forged":
        token = _forge(token)
    elif case == "revoked":
        store = _revoked_store(token)
    elif case == "revoked-parent":
        store = _revoked_store(root)
        token = root.attenuate(Label("child"), Uses(2))
    elif case == "expired":
        token = root.attenuate(Expires(100))
    elif case == "wrong-peer":
        token = root.attenuate(Peer(OTHER))
    elif case == "used-up":
        token = root.attenuate(Uses(1))
        store = _used_store(token)
    else:
        token = root.attenuate(capsock.uri.UnknownCaveat(99, b"?"))
    verdict = authorize(store, token, peer=PEER, now=100)
    assert verdict.reason == reason
    assert not verdict.allowed and verdict.tags == ()


def test_an_allowed_verdict_carries_the_chain_tags() -> None:
    """The tags that revocation later matches against the streams opened."""
    root = mint_root(ROOT_KEY, ROOT_ID)
    token = root.attenuate(Label("a"), Uses(3), Label("b"))
    verdict = authorize(_store(), token, peer=PEER, now=0)
    assert verdict.allowed
    assert verdict.tags[0] == root.tag and verdict.tags[-1] == token.tag
    assert len(verdict.tags) == 4


# ------------------------------------------------------------------ store: uniform work


def _count_work(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Count keyed-hash and constant-time-compare calls made by authorize()."""
    counts = {"blake2b": 0, "compare_digest": 0}
    blake2b, compare = capsock.uri._token._blake2b, hmac.compare_digest

    def counting_blake2b(*args: object) -> bytes:
        counts["blake2b"] += 1
        return blake2b(*args)  # type: ignore[arg-type]

    def counting_compare(a: bytes, b: bytes) -> bool:
        counts["compare_digest"] += 1
        return compare(a, b)

    monkeypatch.setattr(capsock.uri._token, "_blake2b", counting_blake2b)
    monkeypatch.setattr(hmac, "compare_digest", counting_compare)
    return counts


@pytest.mark.parametrize("n_caveats", [0, 1, 5, 32])
def test_an_unknown_root_costs_the_same_work_as_a_known_one(
    monkeypatch: pytest.MonkeyPatch, n_caveats: int
) -> None:
    """Breakage: an unknown ``root_id`` returns early instead of computing the
    whole chain (store.py).  Work is counted, not timed."""
    caveats = [Label(f"c{i}") for i in range(n_caveats)]
    known = mint_root(ROOT_KEY, ROOT_ID).attenuate(*caveats)
    unknown = mint_root(os.urandom(32), os.urandom(16)).attenuate(*caveats)
    store = _store()
    counts = _count_work(monkeypatch)
    results = {}
    for name, token in [("known", known), ("forged", _forge(known)), ("unknown", unknown)]:
        before = dict(counts)
        verdict = authorize(store, token, peer=PEER, now=0)
        results[name] = (
            counts["blake2b"] - before["blake2b"],
            counts["compare_digest"] - before["compare_digest"],
            verdict.reason,
        )
    assert results["known"][:2] == (1 + n_caveats, 1)
    assert results["forged"][:2] == results["known"][:2]
    assert results["unknown"][:2] == results["known"][:2]
    assert [r[2] for r in results.values()] == [None, "bad tag", "unknown root"]


# ------------------------------------------------------------------ static: constant time

_SECRET_NAME = re.compile(r"tag|secret|digest|root_key|mac$")


def _names(node: ast.AST) -> set[str]:
    out = set()
    for sub in ast.walk(node):
        if isinstance(sub, ast.Name):
            out.add(sub.id)
        elif isinstance(sub, ast.Attribute):
            out.add(sub.attr)
    return out


@pytest.mark.parametrize(
    "module",
    ["store.py", "uri/__init__.py", "uri/_token.py", "core/handshake.py", "node/forwarding.py"],
)
def test_tags_and_secrets_are_compared_in_constant_time_only(module: str) -> None:
    """Breakage: a tag compared with ``==`` / ``!=`` instead of
    ``hmac.compare_digest`` (store.py, uri.py).  A static check: no equality
    comparison in the module has an operand naming a tag, digest or secret."""
    tree = ast.parse((SRC / module).read_text("utf-8"))
    offenders = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and any(
            isinstance(op, ast.Eq | ast.NotEq | ast.Is | ast.IsNot) for op in node.ops
        ):
            hits = {n for n in _names(node) if _SECRET_NAME.search(n.lower())}
            if hits:
                offenders.append(f"{module}:{node.lineno}: {ast.unparse(node)}")
    assert offenders == [], "compare secrets with hmac.compare_digest:\n" + "\n".join(offenders)


def test_the_tag_checks_use_compare_digest() -> None:
    """The positive half of the static check: the tag check is a call to
    ``hmac.compare_digest`` on the computed and the presented tag."""
    for module, function in [("store.py", "authorize")]:
        tree = ast.parse((SRC / module).read_text("utf-8"))
        (fn,) = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == function]
        calls = [
            ast.unparse(n)
            for n in ast.walk(fn)
            if isinstance(n, ast.Call) and ast.unparse(n.func) == "hmac.compare_digest"
        ]
        assert any("token.tag" in c for c in calls), f"{module}:{function}: {calls}"


# ------------------------------------------------------------------ node: the OPEN decision


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@asynccontextmanager
async def full_listener(
    backlog_wait: float, clock: Clock | None = None
) -> AsyncIterator[tuple[capsock.Node, capsock.Node, capsock.Listener, capsock.Stream]]:
    """A listener with a backlog of one, filled by a stream nobody accepted yet."""
    cfg = NodeConfig(listener_backlog=1, backlog_wait=backlog_wait)
    async with (
        capsock.Node(listen=["tcp:127.0.0.1:0"], config=cfg, clock=clock or Clock(1e9)) as server,
        capsock.Node() as client,
    ):
        listener = await server.listen()
        plug = await client.connect(listener.uri)
        async with plug:
            with anyio.fail_after(5):
                while not listener._full():
                    await anyio.sleep(0.01)
            yield server, client, listener, plug


async def _opens_received(server: capsock.Node, n: int) -> None:
    with anyio.fail_after(10):
        while server.stats()["opens_received"] < n:
            await anyio.sleep(0.01)


async def test_an_open_refused_busy_spends_no_use() -> None:
    """Breakage: an OPEN consumes a ``uses`` budget even when the listener's
    backlog is full and the open is refused (node.py ``consume=ready``)."""
    async with full_listener(backlog_wait=0.2) as (_, client, listener, _plug):
        once = listener.uri.attenuate(uses=1)
        for _ in range(3):
            with pytest.raises(capsock.CapabilityRejected) as info:
                await client.connect(once)
            assert info.value.code == ErrorCode.BUSY
        await (await listener.accept()).aclose()  # room again
        stream = await client.connect(once)  # the one use is still there
        await stream.aclose()
        with pytest.raises(capsock.CapabilityRejected) as info:
            await client.connect(once)
        assert info.value.code == ErrorCode.REFUSED


@pytest.mark.parametrize("bad", ["forged", "used-up", "expired", "wrong-peer", "unknown-caveat"])
async def test_a_bad_token_at_a_full_listener_is_refused_at_once_not_busy(bad: str) -> None:
    """Breakage: BUSY is decided before the token is checked (node.py, the
    listener lookup in the OPEN path).  A bad token must get the uniform
    REFUSED at once, without waiting ``backlog_wait`` and without learning
    that the listener is full."""
    clock = Clock(1e9)
    async with full_listener(backlog_wait=60, clock=clock) as (server, client, listener, _):
        uri = listener.uri
        if bad == "forged":
            cap = Capability(server.id, _forge(uri.token), uri.hints)
        elif bad == "used-up":
            cap = uri.attenuate(uses=1)
            await (await listener.accept()).aclose()
            await (await client.connect(cap)).aclose()  # uses it up, fills the backlog again
        elif bad == "expired":
            cap = uri.attenuate(Expires(int(clock.now) - 1))
        elif bad == "wrong-peer":
            cap = uri.attenuate(Peer(OTHER))
        else:
            cap = Capability(
                server.id,
                Token(uri.token.root_id, (capsock.uri.UnknownCaveat(99, b"x"),), bytes(32)),
                uri.hints,
            )
            cap = Capability(
                server.id,
                Token(
                    cap.token.root_id,
                    cap.token.caveats,
                    capsock.store.chain(
                        server._store.get_root(uri.token.root_id).root_key,  # type: ignore[union-attr]
                        cap.token,
                    )[-1],
                ),
                uri.hints,
            )
        assert listener._full()
        with anyio.fail_after(20), pytest.raises(capsock.CapabilityRejected) as info:
            await client.connect(cap)
        assert info.value.code == ErrorCode.REFUSED


@pytest.mark.parametrize("change", ["revoked", "expired"])
async def test_an_open_that_waited_for_room_is_authorized_again(change: str) -> None:
    """Breakage: an open that waited for room in a full backlog is not
    authorized again (node.py ``_open_when_room``): a capability revoked or
    expired during the wait would still open."""
    clock = Clock(1e9)
    async with full_listener(backlog_wait=30, clock=clock) as (server, client, listener, _):
        cap = listener.uri.attenuate(Expires(int(clock.now) + 100), label="waits")
        outcome: list[BaseException | capsock.Stream] = []

        async def dial() -> None:
            try:
                outcome.append(await client.connect(cap))
            except capsock.CapsockError as exc:
                outcome.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(dial)
            await _opens_received(server, 2)  # the plug's, then ours: waiting for room
            await anyio.sleep(0.1)
            assert outcome == []
            if change == "revoked":
                await server.revoke(cap)
            else:
                clock.now += 200
            await (await listener.accept()).aclose()  # room: the waiting open goes on
        (result,) = outcome
        assert isinstance(result, capsock.CapabilityRejected), result
        assert result.code == ErrorCode.REFUSED


async def test_an_open_that_waited_for_room_opens_when_still_valid() -> None:
    """The other side of the test above: the wait itself ends in an open."""
    async with full_listener(backlog_wait=30) as (server, client, listener, _):
        cap = listener.uri.attenuate(label="waits")
        async with anyio.create_task_group() as tg:
            streams: list[capsock.Stream] = []

            async def dial() -> None:
                streams.append(await client.connect(cap))

            tg.start_soon(dial)
            await _opens_received(server, 2)
            await (await listener.accept()).aclose()
        (stream,) = streams
        await stream.aclose()


# ------------------------------------------------------------------ forwarding: refused there


@pytest.mark.parametrize("holding", ["a-made-up-token", "the-recipients-via"])
async def test_a_stranger_reaches_the_forwarder_and_is_refused_there(
    holding: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Someone without a forwarding capability of their own reaches the
    introducer (a route hint names it) and is refused by it: the refusal is
    counted and logged at the forwarder, not made up on the stranger's side."""
    from .test_forwarding import triangle

    caplog.set_level(logging.INFO, logger="capsock")
    async with triangle() as (intro, _recipient, _endpoint, cap), capsock.Node() as stranger:
        via = cap.hints[-1]
        assert isinstance(via, capsock.uri.ViaHint)
        if holding == "a-made-up-token":
            token = Token(via.capability.root_id, (), os.urandom(32))
            fake = Capability(intro.id, token, via.capability.hints)
            stranger_cap = cap.with_hints((capsock.uri.ViaHint(fake),))
            reason = "bad tag"
        else:
            stranger_cap = cap  # its via is bound to the recipient
            reason = "bound to another peer"
        refused_before = intro.stats()["opens_refused"]
        with pytest.raises(capsock.Unreachable) as info:
            await stranger.connect(stranger_cap)
        assert "refused" in str(info.value)
        assert intro.stats()["opens_refused"] == refused_before + 1
        assert f"refused a stream from {stranger.id.short()}: {reason}" in caplog.text
