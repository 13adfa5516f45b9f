"""A remote peer cannot make a node spend much more than it is allowed to.

Each test is an attack found by a review that the other suites missed: what a
peer pays (window bytes, frames, a URI) against what the node spends (memory
held, work per frame, a crash).  Memory is checked through what the node
keeps referenced, not through RSS timings; CPU through how much work a frame
causes (a count), never a wall-clock bound.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import anyio
import pytest

import capsock
from capsock.core.frames import Control, Data, GoAway, Open, Ping, Window
from capsock.core.mux import MuxConfig
from capsock.net.stream import Stream
from capsock.node.forwarding import register
from capsock.uri import Capability, TcpHint, To, ViaHint, mint_root

from .chaos import RawDialer, free_port
from .helpers import echo
from .test_attacks import open_raw_stream, target

pytestmark = pytest.mark.anyio


def _held(stream: Stream) -> Iterator[int]:
    """Bytes each buffered chunk keeps alive (a view keeps its whole record)."""
    for chunk in stream._buf or ():
        yield len(chunk.obj) if isinstance(chunk, memoryview) else len(chunk)  # type: ignore[arg-type]


async def _wait_buffered(stream: Stream, amount: int) -> None:
    with anyio.fail_after(10):
        while stream.buffered < amount:
            await anyio.sleep(0.01)


async def test_one_window_byte_per_record_cannot_pin_whole_records() -> None:
    """1 byte of DATA + a 64 KiB CONTROL frame per record: the 1 byte used to
    be kept as a view of the whole decrypted record, 64 KiB per window byte."""
    async with target() as t, open_raw_stream(t) as (raw, accepted):
        padding = Control(bytes(65000))
        for _ in range(300):
            await raw.send(raw.seal(Data(1, b"x"), padding))
        await _wait_buffered(accepted, 300)
        assert sum(_held(accepted)) < 4096  # was 300 * 65 KB
        await t.still_serves()


async def test_tiny_data_frames_are_not_kept_one_object_each() -> None:
    async with target() as t, open_raw_stream(t) as (raw, accepted):
        frames = [Data(1, b"y")] * 5000  # 5000 frames of 1 byte in one record
        await raw.send(raw.seal(*frames))
        await _wait_buffered(accepted, 5000)
        assert accepted._buf is not None and len(accepted._buf) <= 4
        assert sum(_held(accepted)) <= 2 * 5000


async def test_big_data_frames_stay_zero_copy() -> None:
    """The fix must not cost bulk transfers their zero-copy receive path."""
    async with target() as t, open_raw_stream(t) as (raw, accepted):
        await raw.send(raw.seal(Data(1, os.urandom(60000))))
        await _wait_buffered(accepted, 60000)
        assert accepted._buf is not None
        assert [type(c) for c in accepted._buf] == [memoryview]


async def test_a_peer_granting_huge_credit_cannot_make_the_node_buffer_without_bound() -> None:
    """The peer grants 2 GiB of credit and stops reading: the application's
    sends must block once MuxConfig.max_queued_data is queued, not pile up."""
    async with target() as t, open_raw_stream(t) as (raw, accepted):
        await raw.send(raw.seal(Window(0, 2**31 - 1 - 2**24), Window(1, 2**31 - 1 - 2**22)))
        await anyio.sleep(0.2)
        sent = 0
        chunk = bytes(65536)
        with anyio.move_on_after(2):
            while True:
                await accepted.send(chunk)
                sent += len(chunk)
        session = accepted._session
        limit = MuxConfig().max_queued_data
        assert session._mux.stats()["queued_data"] <= limit
        # What left the queue sits in the socket buffers (a few MiB on loopback).
        assert sent < limit + 32 * 2**20
        await t.still_serves()


async def test_a_flood_of_session_credit_wakes_only_streams_that_wait(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """WINDOW(0) frames cost 11 bytes each; each used to wake every stream."""
    wakes = 0
    original = Stream._on_credit

    def counting(self: Stream) -> None:
        nonlocal wakes
        wakes += 1
        original(self)

    monkeypatch.setattr(Stream, "_on_credit", counting)
    async with target() as t:
        raw = await RawDialer.connect(t.host, t.port, t.server.id)
        async with raw:
            token = t.plain.uri.token.encode()
            opens = [Open(sid, token) for sid in range(1, 400, 2)]  # 200 idle streams
            await raw.send(raw.seal(*opens))
            await raw.read_frames(
                5, until=lambda fs: sum(type(f).__name__ == "Accept" for f in fs) == 200
            )
            for _ in range(10):
                await raw.send(raw.seal(*[Window(0, 1)] * 5000))
            await raw.send(raw.seal(Ping(b"12345678")))
            await raw.read_frames(5, until=lambda fs: any(type(f).__name__ == "Pong" for f in fs))
        assert wakes < 100  # was 200 streams x 50,000 frames
        await t.still_serves()


async def test_repeated_goaways_cost_nothing_after_the_first(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="capsock")
    async with target() as t:
        raw = await RawDialer.connect(t.host, t.port, t.server.id)
        async with raw:
            await raw.send(raw.seal(*[GoAway(0, 0)] * 3000))
            await raw.send(raw.seal(Ping(b"12345678")))
            await raw.read_frames(5, until=lambda fs: any(type(f).__name__ == "Pong" for f in fs))
        assert caplog.text.count("is going away") == 1
        await t.still_serves()


def _looping_capability() -> Capability:
    """E's capability with a via route through F, whose own capability routes via E."""
    e, f = capsock.KeyPair.generate(), capsock.KeyPair.generate()
    dead = TcpHint("127.0.0.1", free_port())
    token_e = mint_root(os.urandom(32), os.urandom(16))
    token_f = mint_root(os.urandom(32), os.urandom(16))
    f_cap = Capability(f.node_id, token_f, (dead, ViaHint(Capability(e.node_id, token_e, (dead,)))))
    return Capability(e.node_id, token_e, (dead, ViaHint(f_cap)))


async def test_via_hints_that_loop_are_unreachable_not_a_crash() -> None:
    cap = _looping_capability()
    assert capsock.parse(str(cap)) == cap  # a URI anyone can write
    async with capsock.Node() as node:
        with anyio.fail_after(30), pytest.raises(capsock.Unreachable, match="loops back"):
            await node.connect(cap)


async def test_a_looping_relay_uri_does_not_bring_the_node_down() -> None:
    async with capsock.Node(relays=[_looping_capability()]) as node:
        with anyio.fail_after(30):
            while not any(s.startswith("failed") for s in node.relay_status.values()):
                await anyio.sleep(0.05)
        assert "loops back" in next(iter(node.relay_status.values()))
        listener = await node.listen()  # still running
        assert listener.uri.node == node.id


async def test_minted_uris_carry_the_relay_capability_limited_to_their_node() -> None:
    """Every URI a relayed node mints carries its relay capability: a holder
    must not be able to register at the relay, or reach other nodes, with it."""
    async with capsock.Node(listen=["tcp:127.0.0.1:0"]) as relay, anyio.create_task_group() as tg:
        forwarding = await relay.forwarding()
        async with capsock.Node(relays=[forwarding.uri]) as endpoint, capsock.Node() as holder:
            with anyio.fail_after(20):
                while list(endpoint.relay_status.values()) != ["registered"]:
                    await anyio.sleep(0.05)
            service = await endpoint.listen()
            tg.start_soon(service.serve, echo)
            (via,) = [h for h in service.uri.hints if isinstance(h, ViaHint)]
            assert To(endpoint.id) in via.capability.caveats
            with pytest.raises(capsock.CapsockError, match="limited to one target"):
                await register(holder, via.capability)
            stream = await holder.connect(service.uri)  # the route it exists for works
            await stream.send(b"ok")
            await stream.send_eof()
            assert await stream.receive() == b"ok"
            tg.cancel_scope.cancel()


async def test_goaways_with_alternating_codes_are_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="capsock")
    async with target() as t:
        raw = await RawDialer.connect(t.host, t.port, t.server.id)
        async with raw:
            await raw.send(raw.seal(*[GoAway(0, i % 2) for i in range(3000)]))
            await raw.send(raw.seal(Ping(b"12345678")))
            await raw.read_frames(5, until=lambda fs: any(type(f).__name__ == "Pong" for f in fs))
        assert caplog.text.count("is going away") == 1  # one line per session
        await t.still_serves()
