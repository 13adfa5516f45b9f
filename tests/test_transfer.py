"""``capsock.send_path`` / ``capsock.receive_path``: the library file transfer.

Real nodes on loopback, both anyio backends.  The sender counts a capability's
uses itself: a decline the receiver can fix (``retry``) is free, a receiver
that accepted spends the use (or, ``resumable``, one that verified the item).
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import anyio
import pytest

import capsock
from capsock.transfer import Sent, TransferProgress

pytestmark = pytest.mark.anyio

DATA = os.urandom(3 * 1024 * 1024 + 17)


@pytest.fixture
def source(tmp_path: Path) -> Path:
    path = tmp_path / "src" / "data.bin"
    path.parent.mkdir()
    path.write_bytes(DATA)
    return path


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    path = tmp_path / "dest"
    path.mkdir()
    return path


async def test_a_file_and_a_directory_arrive_verified_with_progress(
    source: Path, dest: Path, tmp_path: Path
) -> None:
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "a.txt").write_bytes(b"alpha")
    (tree / "top.bin").write_bytes(DATA[:5000])
    seen: list[TransferProgress] = []
    async with (
        capsock.Node(listen=["tcp:127.0.0.1:0"]) as server,
        capsock.Node() as client,
        anyio.create_task_group() as tg,
    ):
        results: list[list[Sent]] = []

        async def serve(listener: capsock.Listener, what: Path) -> None:
            results.append(await capsock.send_path(listener, what))

        files, dirs = await server.listen(), await server.listen()
        tg.start_soon(serve, files, source)
        tg.start_soon(serve, dirs, tree)
        got = await capsock.receive_path(
            await client.connect(files.uri), dest, progress=seen.append
        )
        assert got.path == dest / "data.bin" and got.start == 0 and got.received == len(DATA)
        assert (dest / "data.bin").read_bytes() == DATA
        assert seen and seen[-1].done == seen[-1].total == len(DATA)
        assert all(p.peer == server.id and p.name == "data.bin" for p in seen)
        tree_got = await capsock.receive_path(await client.connect(dirs.uri), dest)
        assert tree_got.offer.kind == "dir" and tree_got.path == dest / "tree"
        assert (dest / "tree" / "sub" / "a.txt").read_bytes() == b"alpha"
        assert (dest / "tree" / "top.bin").read_bytes() == DATA[:5000]
    assert [[(s.ok, s.counted) for s in r] for r in results] == [[(True, True)], [(True, True)]]


async def test_a_fixable_decline_leaves_the_one_shot_usable(source: Path, dest: Path) -> None:
    (dest / "data.bin").write_bytes(b"an older copy")
    async with (
        capsock.Node(listen=["tcp:127.0.0.1:0"]) as server,
        capsock.Node() as client,
        anyio.create_task_group() as tg,
    ):
        listener = await server.listen()
        outcomes: list[Sent] = []

        async def serve() -> None:
            outcomes.extend(await capsock.send_path(listener, source, uses=1))

        tg.start_soon(serve)
        with pytest.raises(capsock.TransferDeclined) as declined:
            await capsock.receive_path(await client.connect(listener.uri), dest)
        assert declined.value.retry
        assert "exists" in str(declined.value) and "not used" in str(declined.value)
        assert str(dest) not in declined.value.remote  # the sender never learns our paths
        out = io.BytesIO()
        got = await capsock.receive_path(await client.connect(listener.uri), out)
        assert got.path is None and out.getvalue() == DATA  # the same one-shot, still good
        with pytest.raises(capsock.CapabilityRejected):  # now it is used up
            await client.connect(listener.uri)
    assert [(o.declined, o.counted, o.ok) for o in outcomes] == [
        (True, False, False),
        (False, True, True),
    ]
    assert (dest / "data.bin").read_bytes() == b"an older copy"


async def test_a_directory_into_a_file_object_is_declined_for_free(
    tmp_path: Path, dest: Path
) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "f").write_bytes(b"f")
    async with (
        capsock.Node(listen=["tcp:127.0.0.1:0"]) as server,
        capsock.Node() as client,
        anyio.create_task_group() as tg,
    ):
        listener = await server.listen()
        tg.start_soon(capsock.send_path, listener, tree)
        with pytest.raises(capsock.TransferDeclined, match="directory cannot be written"):
            await capsock.receive_path(await client.connect(listener.uri), io.BytesIO())
        await capsock.receive_path(await client.connect(listener.uri), dest)
    assert (dest / "tree" / "f").read_bytes() == b"f"


async def test_an_unsafe_target_is_a_counted_decline(
    source: Path, dest: Path, tmp_path: Path
) -> None:
    """A planted link is for the user to look into: the one-shot is spent, as before."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    (dest / "data.bin.capsock-part").symlink_to(victim)
    async with (
        capsock.Node(listen=["tcp:127.0.0.1:0"]) as server,
        capsock.Node() as client,
        anyio.create_task_group() as tg,
    ):
        listener = await server.listen()
        outcomes: list[Sent] = []

        async def serve() -> None:
            outcomes.extend(await capsock.send_path(listener, source))

        tg.start_soon(serve)
        with pytest.raises(capsock.TransferDeclined) as declined:
            await capsock.receive_path(await client.connect(listener.uri), dest)
        assert not declined.value.retry and "counted this as a use" in str(declined.value)
    assert [(o.declined, o.counted) for o in outcomes] == [(True, True)]
    assert victim.read_bytes() == b"precious"


class _Stop(Exception):
    pass


async def test_a_resumable_offer_keeps_its_capability_until_verified(
    source: Path, dest: Path
) -> None:
    def stop_halfway(p: TransferProgress) -> None:
        if p.done >= len(DATA) // 2:
            raise _Stop

    async with (
        capsock.Node(listen=["tcp:127.0.0.1:0"]) as server,
        capsock.Node() as client,
        anyio.create_task_group() as tg,
    ):
        listener = await server.listen()
        outcomes: list[Sent] = []

        async def serve() -> None:
            outcomes.extend(await capsock.send_path(listener, source, resumable=True))

        tg.start_soon(serve)
        with pytest.raises(_Stop):
            await capsock.receive_path(
                await client.connect(listener.uri), dest, progress=stop_halfway
            )
        kept = (dest / "data.bin.capsock-part").stat().st_size
        assert 0 < kept < len(DATA)
        got = await capsock.receive_path(await client.connect(listener.uri), dest)
        assert got.offer.resumable and 0 < got.start <= kept
        assert hashlib.sha256((dest / "data.bin").read_bytes()).digest() == (
            hashlib.sha256(DATA).digest()
        )
        with pytest.raises(capsock.CapabilityRejected):
            await client.connect(listener.uri)
    assert [(o.ok, o.counted) for o in outcomes] == [(False, False), (True, True)]


async def test_a_one_shot_that_was_accepted_refuses_a_second_receiver(
    source: Path, dest: Path
) -> None:
    async with (
        capsock.Node(listen=["tcp:127.0.0.1:0"]) as server,
        capsock.Node() as client,
        anyio.create_task_group() as tg,
    ):
        listener = await server.listen()
        tg.start_soon(capsock.send_path, listener, source)
        first = await client.connect(listener.uri)
        started = anyio.Event()

        def mark(p: TransferProgress) -> None:
            started.set()

        async def receive_first() -> None:
            await capsock.receive_path(first, dest, progress=mark)

        tg.start_soon(receive_first)
        await started.wait()  # the first receiver accepted: the one use is spent
        with pytest.raises(capsock.CapabilityRejected):
            await client.connect(listener.uri)
    assert (dest / "data.bin").read_bytes() == DATA


async def test_a_stream_that_is_no_offer_is_said_so(dest: Path) -> None:
    async with capsock.Node(listen=["tcp:127.0.0.1:0"]) as server, capsock.Node() as client:
        listener = await server.listen()
        stream = await client.connect(listener.uri)
        peer = await listener.accept()
        await peer.send(b"hello, this is a plain stream\n")
        with pytest.raises(capsock.NotAnOffer, match="capsock connect"):
            await capsock.receive_path(stream, dest)
        await peer.aclose()
    assert os.listdir(dest) == []


async def test_uses_below_one_is_a_usage_error(source: Path) -> None:
    async with capsock.Node(listen=["tcp:127.0.0.1:0"]) as server:
        listener = await server.listen()
        with pytest.raises(capsock.LocalUsageError):
            await capsock.send_path(listener, source, uses=0)
