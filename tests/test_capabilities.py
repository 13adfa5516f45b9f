"""The capability model end to end: caveats, attenuation, uses, revocation, sturdy caps."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import capsock
from capsock.keys import KeyPair
from capsock.store import MemoryStore, RootEntry, SqliteStore, authorize
from capsock.uri import Capability, Expires, Label, Peer, To, Token, Uses, mint_root

from .helpers import echo, read_all

pytestmark = pytest.mark.anyio
ROOT = Path(__file__).resolve().parents[1]


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def _works(client: capsock.Node, cap: Capability | str) -> bool:
    try:
        stream = await client.connect(cap)
    except capsock.CapabilityRejected:
        return False
    await stream.aclose()
    return True


async def test_expiry_boundaries_with_an_injected_clock() -> None:
    clock = Clock(1_000_000.0)
    async with (
        capsock.Node(listen=["tcp:127.0.0.1:0"], wall_clock=clock) as server,
        capsock.Node() as client,
    ):
        listener = await server.listen()
        cap = listener.uri.attenuate(Expires(1_000_100))
        clock.now = 1_000_099.999
        assert await _works(client, cap)
        clock.now = 1_000_100.0  # valid while now < exp
        assert not await _works(client, cap)
        # A later exp appended after an earlier one does not extend it.
        wider = cap.attenuate(Expires(2_000_000))
        clock.now = 1_000_050
        assert await _works(client, wider)
        clock.now = 1_000_150
        assert not await _works(client, wider)


async def test_uses_peer_and_label_and_their_combination() -> None:
    async with (
        capsock.Node(listen=["tcp:127.0.0.1:0"]) as server,
        capsock.Node() as alice,
        capsock.Node() as mallory,
        anyio.create_task_group() as tg,
    ):
        listener = await server.listen()
        tg.start_soon(listener.serve, echo)
        twice = listener.uri.attenuate(uses=2)
        assert await _works(alice, twice)
        assert await _works(alice, twice)
        assert not await _works(alice, twice)
        # Attenuations share the counter of the uses caveat they inherit.
        fresh = listener.uri.attenuate(Label("fresh"), uses=2)  # not the same cap as twice
        assert await _works(alice, fresh.attenuate(uses=5))
        assert await _works(alice, fresh)
        assert not await _works(alice, fresh.attenuate(uses=5))
        bound = listener.uri.attenuate(peer=alice.id, label="for alice")
        assert await _works(alice, bound)
        forged = Capability(server.id, Token(bound.token.root_id, (), os.urandom(32)), bound.hints)
        with pytest.raises(capsock.CapabilityRejected) as wrong_peer:
            await mallory.connect(bound)
        with pytest.raises(capsock.CapabilityRejected) as forged_error:
            await mallory.connect(forged)
        assert str(wrong_peer.value) == str(forged_error.value)  # same as forged
        assert wrong_peer.value.code == forged_error.value.code
        combo = listener.uri.attenuate(ttl=60, uses=1, peer=alice.id, label="x")
        assert not await _works(mallory, combo)  # wrong peer does not use it up
        assert await _works(alice, combo)
        assert not await _works(alice, combo)
        tg.cancel_scope.cancel()


async def test_fifty_concurrent_opens_of_a_one_use_capability() -> None:
    cfg = capsock.NodeConfig(listener_backlog=64)
    async with (
        capsock.Node(listen=["tcp:127.0.0.1:0"], config=cfg) as server,
        capsock.Node() as a,
        capsock.Node() as b,
    ):
        listener = await server.listen()
        once = listener.uri.attenuate(uses=1)
        results: list[bool] = []

        async def attempt(node: capsock.Node) -> None:
            results.append(await _works(node, once))

        async with anyio.create_task_group() as tg:
            for i in range(50):
                tg.start_soon(attempt, a if i % 2 else b)
        assert results.count(True) == 1
        assert results.count(False) == 49


async def test_fifty_concurrent_opens_of_a_one_use_capability_at_a_small_backlog() -> None:
    """The same race through ``_open_when_room``: with a backlog of two, most
    opens wait for room, and each must be authorized again when room comes."""
    cfg = capsock.NodeConfig(listener_backlog=2, backlog_wait=30)
    async with (
        capsock.Node(listen=["tcp:127.0.0.1:0"], config=cfg) as server,
        capsock.Node() as a,
        capsock.Node() as b,
        anyio.create_task_group() as serving,
    ):
        listener = await server.listen()
        once = listener.uri.attenuate(uses=1)
        plugs = [await a.connect(listener.uri), await b.connect(listener.uri)]  # backlog full

        async def drain() -> None:
            while True:
                await (await listener.accept()).aclose()
                await anyio.sleep(0.01)

        results: list[bool] = []

        async def attempt(node: capsock.Node) -> None:
            results.append(await _works(node, once))

        async with anyio.create_task_group() as tg:
            for i in range(50):
                tg.start_soon(attempt, a if i % 2 else b)
            with anyio.fail_after(20):
                while server.stats()["opens_received"] < 52:
                    await anyio.sleep(0.01)
            serving.start_soon(drain)  # room, a little at a time
        assert results.count(True) == 1
        assert results.count(False) == 49
        for plug in plugs:
            await plug.aclose()
        serving.cancel_scope.cancel()


async def test_mint_temporary_socket_retires_itself() -> None:
    async with capsock.Node(listen=["tcp:127.0.0.1:0"]) as server, capsock.Node() as client:
        async with await server.mint(uses=1, peer=client.id, label="one shot") as tmp:
            assert "<redacted>" in repr(tmp)
            stream = await client.connect(tmp.uri)
            accepted = await tmp.accept()  # still delivered after the listener retired
            await stream.send(b"hi")
            await stream.send_eof()
            assert await read_all(accepted) == b"hi"
            with pytest.raises(anyio.ClosedResourceError):
                await tmp.accept()
            assert not await _works(client, tmp.uri)
        short = await server.mint(ttl=0.5)
        assert await _works(client, short.uri)
        await anyio.sleep(1.6)  # ceil() of the expiry can add up to a second
        assert not await _works(client, short.uri)
        await (await short.accept()).aclose()  # the one stream opened in time
        with pytest.raises(anyio.ClosedResourceError):
            await short.accept()
        await short.aclose()


async def test_revoking_resets_streams_under_it_and_spares_others() -> None:
    async with capsock.Node(listen=["tcp:127.0.0.1:0"]) as server, capsock.Node() as client:
        files = await server.listen()
        other = await server.listen()
        derived = files.uri.attenuate(label="derived")
        under_root = await client.connect(files.uri)
        under_derived = await client.connect(derived)
        spared = await client.connect(other.uri)
        accepted = [await files.accept(), await files.accept(), await other.accept()]
        await server.revoke(files.uri)
        for stream in (under_root, under_derived):
            with anyio.fail_after(5), pytest.raises(capsock.StreamReset):
                await stream.receive()
        for local in accepted[:2]:
            with pytest.raises(capsock.StreamReset):
                await local.send(b"x")
        await spared.send(b"still fine")
        assert await accepted[2].receive() == b"still fine"
        assert not await _works(client, files.uri)
        assert not await _works(client, derived)
        assert await _works(client, other.uri)


async def test_revoking_an_attenuation_spares_its_parent() -> None:
    async with capsock.Node(listen=["tcp:127.0.0.1:0"]) as server, capsock.Node() as client:
        listener = await server.listen()
        child = listener.uri.attenuate(label="child")
        grandchild = child.attenuate(uses=3)
        sibling = listener.uri.attenuate(label="sibling")
        await server.revoke(child)
        assert not await _works(client, child)
        assert not await _works(client, grandchild)
        assert await _works(client, sibling)
        assert await _works(client, listener.uri)
        with pytest.raises(capsock.InvalidCapability):
            forged = Capability(server.id, Token(child.token.root_id, (), os.urandom(32)), ())
            await server.revoke(forged)


async def test_one_state_dir_belongs_to_one_node(tmp_path: Path) -> None:
    async with capsock.Node(tmp_path / "state"):
        with pytest.raises(capsock.LocalUsageError, match="in use by another"):
            capsock.Node(tmp_path / "state")
    async with capsock.Node(tmp_path / "state") as again:  # released on exit
        assert (tmp_path / "state" / "node.key").stat().st_mode & 0o777 == 0o600
        assert again.id == capsock.KeyPair.load(tmp_path / "state" / "node.key").node_id


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Proc:
    def __init__(self, state: Path, port: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.cap_process", str(state), str(port)],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def read(self) -> dict[str, object]:
        assert self.proc.stdout is not None
        return dict(json.loads(self.proc.stdout.readline()))

    def revoke(self, uri: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(uri + "\n")
        self.proc.stdin.flush()
        assert self.read() == {"revoked": True}

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()


async def test_sturdy_capabilities_survive_a_restart(tmp_path: Path) -> None:
    state, port = tmp_path / "state", _free_port()
    first = await anyio.to_thread.run_sync(_Proc, state, port)
    try:
        sturdy = str((await anyio.to_thread.run_sync(first.read))["sturdy"])
        cap = Capability.parse(sturdy)
        revoked = cap.attenuate(label="revoked")
        used_up = cap.attenuate(uses=1)
        async with capsock.Node() as client:
            assert await _works(client, sturdy)
            assert await _works(client, used_up)
            await anyio.to_thread.run_sync(first.revoke, str(revoked))
            assert not await _works(client, revoked)
    finally:
        first.kill()
    second = await anyio.to_thread.run_sync(_Proc, state, port)
    try:
        again = str((await anyio.to_thread.run_sync(second.read))["sturdy"])
        assert again == sturdy  # the same URI after a restart
        async with capsock.Node() as client:
            assert await _works(client, sturdy)
            assert not await _works(client, revoked)  # stays revoked
            assert not await _works(client, used_up)  # stays used up
    finally:
        second.kill()


# ------------------------------------------------------------------ properties

ROOT_KEY, ROOT_ID = bytes(range(32)), bytes(range(16))
PEER = KeyPair(bytes(32)).node_id
OTHER = KeyPair(bytes([1]) * 32).node_id
caveats = st.one_of(
    st.integers(0, 3000).map(Expires),
    st.integers(1, 4).map(Uses),
    st.sampled_from([PEER, OTHER]).map(Peer),
    st.text(alphabet="abc", min_size=1, max_size=5).map(Label),
    st.sampled_from([PEER, OTHER]).map(To),
)


def _store() -> MemoryStore:
    store = MemoryStore()
    store.add_root(RootEntry(ROOT_ID, ROOT_KEY))
    return store


@settings(max_examples=200, deadline=None)
@given(
    st.lists(caveats, max_size=5),
    st.lists(caveats, min_size=1, max_size=3),
    st.lists(st.tuples(st.booleans(), st.integers(0, 3000), st.sampled_from([PEER, OTHER]))),
)
def test_attenuation_never_widens(
    parent_caveats: list[object], extra: list[object], opens: list[tuple[bool, int, object]]
) -> None:
    """Whenever the child opens, the parent would have opened at that moment too.

    One store serves every open (as at a real endpoint), so ``uses`` budgets
    are spent by earlier opens of the parent and of the child and can deny.
    """
    parent = mint_root(ROOT_KEY, ROOT_ID).attenuate(*parent_caveats)  # type: ignore[arg-type]
    child = parent.attenuate(*extra)  # type: ignore[arg-type]
    store = _store()
    opened_total = 0
    for use_child, now, peer in opens:
        parent_ok = authorize(store, parent, peer=peer, now=now, consume=False).allowed  # type: ignore[arg-type]
        opened = child if use_child else parent
        ok = authorize(store, opened, peer=peer, now=now).allowed  # type: ignore[arg-type]
        if use_child:
            assert not ok or parent_ok, "the child opened where its parent could not"
        else:
            assert ok == parent_ok
        opened_total += ok
    # The parent's uses budgets are shared with everything derived from it.
    for caveat in parent.caveats:
        if isinstance(caveat, Uses):
            assert opened_total <= caveat.count


@settings(max_examples=200, deadline=None)
@given(st.lists(caveats, min_size=1, max_size=5), st.data())
def test_any_change_to_the_token_is_rejected(cavs: list[object], data: st.DataObject) -> None:
    token = mint_root(ROOT_KEY, ROOT_ID).attenuate(*cavs)  # type: ignore[arg-type]
    changes = ["remove", "reorder", "alter", "flip", "truncate"]
    change = data.draw(st.sampled_from(changes))
    new_caveats = list(token.caveats)
    tag = token.tag
    if change == "remove":
        del new_caveats[data.draw(st.integers(0, len(new_caveats) - 1))]
    elif change == "reorder":
        if len(set(map(repr, new_caveats))) < 2:
            return
        shuffled = data.draw(st.permutations(new_caveats))
        if shuffled == new_caveats:
            return
        new_caveats = list(shuffled)
    elif change == "alter":
        i = data.draw(st.integers(0, len(new_caveats) - 1))
        replacement = data.draw(caveats)
        if replacement == new_caveats[i]:
            return
        new_caveats[i] = replacement
    elif change == "flip":
        bit = data.draw(st.integers(0, 255))
        tag = bytes(b ^ (1 << (bit % 8)) if j == bit // 8 else b for j, b in enumerate(tag))
    else:
        encoded = token.encode()
        cut = data.draw(st.integers(0, len(encoded) - 1))
        with pytest.raises(capsock.InvalidCapability):
            Token.decode(encoded[:cut])
        return
    changed = Token(token.root_id, tuple(new_caveats), tag)  # type: ignore[arg-type]
    assert authorize(_store(), changed, peer=PEER, now=0).reason in {"bad tag"}


async def test_keyword_attenuations_for_different_peers_get_separate_budgets() -> None:
    async with (
        capsock.Node(listen=["tcp:127.0.0.1:0"]) as server,
        capsock.Node() as bob,
        capsock.Node() as carol,
    ):
        listener = await server.listen()
        for_bob = listener.uri.attenuate(uses=1, peer=bob.id)
        for_carol = listener.uri.attenuate(uses=1, peer=carol.id)
        assert await _works(bob, for_bob)
        assert await _works(carol, for_carol)  # bob did not use carol's one open up
        assert not await _works(bob, for_bob)


async def test_revoking_a_minted_socket_retires_it_and_forgets_it_on_close() -> None:
    async with capsock.Node(listen=["tcp:127.0.0.1:0"]) as server, capsock.Node() as client:
        tmp = await server.mint(label="temporary")
        assert await _works(client, tmp.uri)
        await (await tmp.accept()).aclose()
        await server.revoke(tmp.uri)
        with anyio.fail_after(5), pytest.raises(anyio.ClosedResourceError):
            await tmp.accept()  # retired: no hang
        await tmp.aclose()
        assert server._store.get_root(tmp.uri.root_id) is None  # temporary roots are freed


async def test_a_revoked_sturdy_name_gets_a_fresh_capability(tmp_path: Path) -> None:
    async with capsock.Node(tmp_path / "state", listen=["tcp:127.0.0.1:0"]) as server:
        old = await server.listen(name="files")
        await server.revoke(old.uri)
        await old.aclose()
        new = await server.listen(name="files")
        assert new.uri.token != old.uri.token
        async with capsock.Node() as client:
            assert await _works(client, new.uri)
            assert not await _works(client, old.uri)
    for name in ("capabilities.sqlite3", "node.key"):
        assert (tmp_path / "state" / name).stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "state").stat().st_mode & 0o777 == 0o700


@pytest.mark.parametrize("sturdy", [False, True], ids=["memory", "sqlite"])
async def test_forgotten_temporary_roots_leave_nothing_behind(sturdy: bool, tmp_path: Path) -> None:
    """Minting, using, revoking and closing temporary sockets all day stays bounded.

    Closing a temporary listener forgets its root, and with it the use counters
    and revocations recorded under it (its tokens are refused as unknown from
    then on, and root ids are never reused).
    """
    state = tmp_path / "state" if sturdy else None
    async with (
        capsock.Node(state, listen=["tcp:127.0.0.1:0"]) as server,
        capsock.Node() as client,
    ):
        store = server._store
        memory = store._memory if isinstance(store, SqliteStore) else store
        assert isinstance(memory, MemoryStore)
        before = memory.sizes()
        for i in range(60):
            async with await server.mint(ttl=60, uses=1) as listener:
                stream = await client.connect(listener.uri)
                await stream.aclose()
                if i % 2:
                    await server.revoke(listener.uri.attenuate(label="half"))
            with pytest.raises(capsock.CapabilityRejected):
                await client.connect(listener.uri)  # forgotten: refused as unknown
        assert memory.sizes() == before
