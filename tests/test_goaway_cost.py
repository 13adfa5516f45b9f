"""What one received record can cost: work per frame is O(1), never a pass
over every stream (issue 14, item 3).

A record of 65 KB holds about 5,000 frames of 13 bytes.  A GOAWAY that lowers
``last_stream_id`` by one used to rescan every stream and cost a log line:
5,000 of them against 3,000 streams froze a node for seconds.  The same rule
holds for every frame kind: the tests flood a mux that tracks thousands of
streams with one record of each kind and count the work (streams visited by a
pass over the stream table, events, log lines), never the time.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import anyio
import pytest

import capsock
from capsock.core.frames import (
    Accept,
    Control,
    Data,
    Eof,
    Frame,
    GoAway,
    Open,
    Ping,
    Reset,
    Window,
    encode_frame,
)
from capsock.core.mux import GoAwayReceived, Mux, MuxConfig, ResetReceived
from capsock.errors import ErrorCode
from capsock.net.stream import Stream
from capsock.node import NodeConfig
from capsock.uri import TcpHint

from .chaos import RawDialer
from .test_attacks import target

N_STREAMS = 3000
PER_RECORD = 5000  # 13-byte frames: one record of 65 KB


class CountingDict(dict[int, Any]):
    """A stream table that counts the entries any pass over it visits."""

    visited = 0

    def __iter__(self) -> Iterator[int]:
        for key in super().__iter__():
            self.visited += 1
            yield key

    def keys(self) -> Any:
        return list(iter(self))

    def values(self) -> Any:
        return [self[k] for k in iter(self)]

    def items(self) -> Any:
        return [(k, self[k]) for k in iter(self)]


def victim(n: int = N_STREAMS) -> tuple[Mux, CountingDict]:
    """A dialer's mux with ``n`` streams it opened (ids 1, 3, ...), all accepted."""
    mux = Mux(dialer=True, config=MuxConfig(max_streams=2 * n + 10))
    table = CountingDict()
    mux._streams = table
    sids = [mux.open_stream(b"\x00") for _ in range(n)]
    while mux.data_to_send() is not None:
        pass
    feed(mux, [Accept(sid) for sid in sids])
    return mux, table


def feed(mux: Mux, frames: list[Frame]) -> list[object]:
    """Feed ``frames`` in as few records as fit; return the events."""
    events: list[object] = []
    for i in range(0, len(frames), PER_RECORD):
        events += mux.receive_message(b"".join(encode_frame(f) for f in frames[i : i + PER_RECORD]))
    return events


def lowering_goaways(top: int, count: int) -> list[Frame]:
    return [GoAway(top - i, ErrorCode.NO_ERROR) for i in range(count)]


def test_lowering_goaways_touch_only_the_streams_they_forget() -> None:
    mux, table = victim()
    top = 2 * N_STREAMS  # the highest id is 2 * N_STREAMS - 1
    frames = lowering_goaways(top, PER_RECORD)  # lowers by one, down to top - 4999
    table.visited = 0
    events = mux.receive_message(b"".join(encode_frame(f) for f in frames))
    resets = [e for e in events if isinstance(e, ResetReceived)]
    # last_stream_id fell to top - 4999 = 1001: streams 1003 .. 5999 are gone.
    assert {e.stream_id for e in resets} == set(range(1003, top, 2))
    assert all(e.code == ErrorCode.SHUTTING_DOWN for e in resets)
    assert mux.is_open(1001) and not mux.is_open(1003)
    # No pass over the stream table (today: one per frame, 15 million visits).
    assert table.visited == 0
    # One GOAWAY report for the whole record, not one per frame.
    assert [e for e in events if isinstance(e, GoAwayReceived)] == [
        GoAwayReceived(top, ErrorCode.NO_ERROR)
    ]


def test_goaway_work_is_bounded_by_the_streams_it_forgets_over_many_records() -> None:
    mux, table = victim()
    table.visited = 0
    events = feed(mux, lowering_goaways(2 * N_STREAMS + 5000, 2 * N_STREAMS + 5001))
    assert sum(isinstance(e, ResetReceived) for e in events) == N_STREAMS
    assert sum(isinstance(e, GoAwayReceived) for e in events) == 1
    assert table.visited == 0
    assert mux.stats()["streams"] == 0
    assert not mux._local_ids  # every id popped once, none left behind


def test_an_error_goaway_after_a_graceful_one_is_reported_once_more() -> None:
    mux, _ = victim(10)
    events = feed(mux, [GoAway(19, 0), GoAway(9, 0), GoAway(5, 1), GoAway(3, 0), GoAway(1, 1)])
    assert [e for e in events if isinstance(e, GoAwayReceived)] == [
        GoAwayReceived(19, ErrorCode.NO_ERROR),
        GoAwayReceived(5, ErrorCode.PROTOCOL_ERROR),
    ]
    assert {e.stream_id for e in events if isinstance(e, ResetReceived)} == set(range(3, 20, 2))


def test_ids_of_closed_streams_do_not_pile_up() -> None:
    """The ordered id list drops forgotten ids as it grows: its length stays
    within twice the live streams (plus a constant), whatever was opened."""
    mux = Mux(dialer=True)
    live = [mux.open_stream(b"t") for _ in range(10)]
    for _ in range(10_000):
        mux.reset_stream(mux.open_stream(b"t"))
    assert mux._local_ids is not None
    assert len(mux._local_ids) <= 2 * len(live) + 65
    assert all(mux.is_open(s) for s in live)
    events = mux.receive_message(encode_frame(GoAway(0, 0)))
    assert {e.stream_id for e in events if isinstance(e, ResetReceived)} == set(live)


def floods() -> dict[str, list[Frame]]:
    """One record's worth of each frame kind a hostile peer may repeat
    (against :func:`victim`'s streams)."""
    sids = list(range(1, 2 * N_STREAMS, 2))
    return {
        "goaway-repeat": [GoAway(2 * N_STREAMS, i % 2) for i in range(PER_RECORD)],
        "window-session": [Window(0, 1)] * PER_RECORD,
        "window-stream": [Window(sids[i % len(sids)], 1) for i in range(PER_RECORD)],
        "ping": [Ping(b"12345678")] * 3000,
        "control": [Control(b"\x80")] * PER_RECORD,
        "data": [Data(sids[i % len(sids)], b"x") for i in range(PER_RECORD)],
        "eof": [Eof(s) for s in sids],
        "reset": [Reset(s, 0) for s in sids],
        "open-reset": [
            f for i in range(2, 2 * 2500 + 2, 2) for f in (Open(i, b"\x00"), Reset(i, 0))
        ],
    }


@pytest.mark.parametrize("kind", list(floods()))
def test_no_frame_kind_costs_a_pass_over_the_streams(kind: str) -> None:
    mux, table = victim()
    frames = floods()[kind]
    table.visited = 0
    events = feed(mux, frames)
    # Then the same record again, now that the streams are half-closed,
    # reset or credited: the repeats must not cost more either.
    if kind not in ("open-reset",):
        events += feed(mux, [f for f in frames if not isinstance(f, (Eof, Reset, Data))])
    assert table.visited == 0, kind
    assert len(events) <= 2 * len(frames) + N_STREAMS


def test_data_for_forgotten_streams_costs_o1_and_returns_credit() -> None:
    mux, table = victim()
    sids = list(range(1, 2 * N_STREAMS, 2))
    for sid in sids:
        mux.reset_stream(sid)
    table.visited = 0
    before = mux.stats()["recv_unacked"]
    assert feed(mux, [Data(sids[i % len(sids)], b"x") for i in range(PER_RECORD)]) == []
    assert table.visited == 0
    assert mux.stats()["recv_unacked"] == before + PER_RECORD


@pytest.mark.anyio
async def test_a_record_of_lowering_goaways_logs_one_line(caplog: pytest.LogCaptureFixture) -> None:
    """The real session: the node opened streams to a raw peer, which answers
    with one record of GOAWAYs, each lowering last_stream_id by one."""
    caplog.set_level(logging.INFO, logger="capsock")
    async with target() as t:
        raw = await RawDialer.connect(t.host, t.port, t.server.id)
        async with raw:
            await raw.send(raw.seal(Ping(b"hello123")))
            await raw.read_frames(5, until=lambda fs: any(type(f).__name__ == "Pong" for f in fs))
            session = t.server._sessions[raw.key.node_id]
            sids = [session._mux.open_stream(b"\x00") for _ in range(1000)]  # ids 2 .. 2000
            session._kick()
            frames = [GoAway(PER_RECORD - 1 - i, i % 2) for i in range(PER_RECORD)]  # to 0
            await raw.send(raw.seal(*frames))
            await raw.send(raw.seal(Ping(b"12345678")))
            with anyio.fail_after(10):
                while any(session._mux.is_open(s) for s in sids):
                    await anyio.sleep(0.02)
        assert caplog.text.count("is going away") == 1
        await t.still_serves()


# ---------------------------------------------------------------- siblings at the session


@pytest.mark.anyio
async def test_session_credit_in_tiny_grants_wakes_one_sender_per_record(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Streams blocked on the session's credit: each record of WINDOW(0, 1)
    used to wake every one of them (all but one found nothing to send)."""
    wakes = 0
    original = Stream._on_credit

    def counting(self: Stream) -> None:
        nonlocal wakes
        wakes += 1
        original(self)

    monkeypatch.setattr(Stream, "_on_credit", counting)
    n, chunk = 40, 64 * 1024  # 40 x 64 KiB: more than the raw peer's 1 MiB session window
    async with target() as t:
        raw = await RawDialer.connect(t.host, t.port, t.server.id)
        async with raw, anyio.create_task_group() as tg:
            token = t.plain.uri.token.encode()
            await raw.send(raw.seal(*[Open(sid, token) for sid in range(1, 2 * n, 2)]))
            streams = []
            with anyio.fail_after(10):
                for _ in range(n):
                    streams.append(await t.plain.accept())
            finished = 0

            async def send(stream: Stream) -> None:
                nonlocal finished
                await stream.send(bytes(chunk))
                finished += 1

            for stream in streams:
                tg.start_soon(send, stream)
            session = t.server._sessions[raw.key.node_id]
            with anyio.fail_after(10):
                while session.stats()["send_session_credit"] or len(session._send_waiters) < 20:
                    await anyio.sleep(0.01)
            waiting = len(session._send_waiters)
            wakes = 0
            records = 30
            for _ in range(records):
                await raw.send(raw.seal(*[Window(0, 1)] * 100))
                await anyio.sleep(0.02)  # the woken senders run and wait again
            assert wakes <= 3 * records  # was: every waiting stream, each record
            assert finished < n
            # A real grant still reaches every sender: the baton goes round.
            await raw.send(raw.seal(Window(0, n * chunk)))
            with anyio.fail_after(10):
                while finished < n:
                    await raw.read_frames(0.05)
            assert waiting >= 20
            assert not session._send_waiters and getattr(session, "_send_baton", None) is None
            for stream in streams:
                await stream.aclose()


@pytest.mark.anyio
async def test_opens_reset_at_once_leave_no_task_waiting_for_a_full_backlog(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """OPEN + RESET pairs with a valid capability while the listener's backlog
    is full: the mux frees each pending slot at the RESET, so every pair used
    to leave a task polling the backlog for ``backlog_wait`` (2 s)."""
    live = peak = 0
    original = capsock.Node._open_when_room

    async def counting(self: capsock.Node, *args: Any) -> None:
        nonlocal live, peak
        live += 1
        peak = max(peak, live)
        try:
            await original(self, *args)
        finally:
            live -= 1

    monkeypatch.setattr(capsock.Node, "_open_when_room", counting)
    config = NodeConfig(listener_backlog=4, handshake_timeout=2.0)
    async with capsock.Node(listen=["tcp:127.0.0.1:0"], config=config) as server:
        listener = await server.listen()
        hint = server.hints[0]
        assert isinstance(hint, TcpHint)
        raw = await RawDialer.connect(hint.host, hint.port, server.id)
        async with raw:
            token = listener.uri.token.encode()
            await raw.send(raw.seal(*[Open(sid, token) for sid in (1, 3, 5, 7)]))  # the backlog
            await raw.read_frames(
                5, until=lambda fs: sum(type(f).__name__ == "Accept" for f in fs) == 4
            )
            pairs = [
                f for sid in range(9, 9 + 2 * 2000, 2) for f in (Open(sid, token), Reset(sid, 0))
            ]
            for i in range(0, len(pairs), 1600):  # 800 pairs, about 53 KB, per record
                await raw.send(raw.seal(*pairs[i : i + 1600]))
            await raw.send(raw.seal(Ping(b"12345678")))
            await raw.read_frames(5, until=lambda fs: any(type(f).__name__ == "Pong" for f in fs))
            await anyio.sleep(0.2)
            assert live <= 4  # was 2,000, each polling for 2 s
        assert peak >= 1  # the path under test was taken


@pytest.mark.anyio
async def test_a_flood_of_control_frames_logs_one_line(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="capsock")
    async with target() as t:
        raw = await RawDialer.connect(t.host, t.port, t.server.id)
        async with raw:
            await raw.send(raw.seal(*[Control(b"\x80")] * PER_RECORD))
            await raw.send(raw.seal(Ping(b"12345678")))
            await raw.read_frames(5, until=lambda fs: any(type(f).__name__ == "Pong" for f in fs))
        assert caplog.text.count("ignoring CONTROL") == 1
        await t.still_serves()
