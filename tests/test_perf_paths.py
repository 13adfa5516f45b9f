"""The per-message fast paths of issue 17 do what the general paths do, and stay lean.

- The mux's DATA fast path (a message made only of DATA frames of one stream)
  must give the same events, counters and errors as the general path; a
  reference mux is forced onto the general path by a harmless WINDOW(0) frame
  in front of the same frames, and Hypothesis compares the two.
- ``Mux.deliver`` hands such data over in order, and nothing of a message that
  fails.
- A record that straddles two reads is handed over by the record reader; what
  it returned earlier never changes.
- The work per message is counted (Python calls, not time): a 1 KiB message
  through two session engines, and a whole handshake, each stay under a
  bound that the code before issue 17 exceeded.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from capsock.config import INITIAL_SESSION_WINDOW, INITIAL_STREAM_WINDOW, MuxConfig
from capsock.core.frames import Data, Eof, Open, Ping, Reset, Window, encode_frame
from capsock.core.mux import CreditGranted, DataReceived, Event, Mux
from capsock.core.records import RecordReader
from capsock.errors import ErrorCode, ProtocolError, ResourceLimitExceeded

ROOT = Path(__file__).resolve().parents[1]

# Stream ids at the responder, by state (the peer dials: odd ids).
OPEN_SID, PENDING_SID, EOF_RECEIVED_SID, FORGOTTEN_SID, EOF_SENT_SID = 1, 3, 5, 7, 11
NEVER_OPENED_SID = 9
SIDS = (OPEN_SID, PENDING_SID, EOF_RECEIVED_SID, FORGOTTEN_SID, EOF_SENT_SID, NEVER_OPENED_SID, 0)
WINDOW_0 = encode_frame(Window(0, 1))


def _responder(prefill: int, config: MuxConfig | None = None) -> Mux:
    """A responder mux with one stream in each state; ``prefill`` bytes of
    stream 1's window already used (delivered, not acknowledged)."""
    m = Mux(dialer=False, config=config or MuxConfig(stream_window=INITIAL_STREAM_WINDOW))
    for sid in (1, 3, 5, 7, 11):
        m.receive_message(encode_frame(Open(sid, b"token")))
    for sid in (1, 5, 7, 11):
        m.accept_stream(sid)
    m.receive_message(encode_frame(Eof(5)))
    m.receive_message(encode_frame(Reset(7, ErrorCode.CANCELLED)))
    m.send_eof(11)
    while prefill > 0:
        n = min(prefill, 60_000)
        m.receive_message(encode_frame(Data(1, bytes(n))))
        prefill -= n
    while m.data_to_send() is not None:
        pass
    return m


def _outcome(
    m: Mux, message: bytes, *, skip_first: bool = False
) -> tuple[Any, list[tuple[str, Any]], dict[str, int]]:
    try:
        events: list[Event] = m.receive_message(message)
        error: Any = None
    except ProtocolError as exc:
        events = []
        error = (type(exc), exc.code, str(exc))
    if skip_first:
        assert error is not None or events[0] == CreditGranted(0)
        events = events[1:]
    seen = [
        (("data", ev.stream_id), bytes(ev.data)) if isinstance(ev, DataReceived) else (repr(ev), 0)
        for ev in events
    ]
    stats = m.stats()
    del stats["send_session_credit"]  # the reference's WINDOW(0) moved it
    stats["held_1"] = m.held(OPEN_SID)
    return error, seen, stats  # type: ignore[return-value]


frame_st = st.tuples(st.sampled_from(SIDS), st.integers(0, 3000))


@settings(max_examples=300, deadline=None)
@given(
    frames=st.lists(frame_st, min_size=1, max_size=5),
    prefill=st.sampled_from([0, INITIAL_STREAM_WINDOW - 3000, INITIAL_STREAM_WINDOW - 1]),
    junk=st.sampled_from([b"", b"\x04", b"\x04\x00\x00\x00\x01\x00", b"\x04\0\0\0\x01\0\x10x"]),
)
def test_the_data_fast_path_matches_the_general_path(
    frames: list[tuple[int, int]], prefill: int, junk: bytes
) -> None:
    message = (
        b"".join(
            encode_frame(Data(sid, bytes([sid]) * n)) if n else bytes((4, 0, 0, 0, sid, 0, 0))
            for sid, n in frames
        )
        + junk
    )
    fast = _outcome(_responder(prefill), message)
    general = _outcome(_responder(prefill), WINDOW_0 + message, skip_first=True)
    assert fast == general


@pytest.mark.parametrize(
    "lengths", [(0,), (0, 5), (5, 0), (5, 0, 5), (0, 0)], ids=lambda x: "-".join(map(str, x))
)
def test_an_empty_data_frame_among_others_is_refused(lengths: tuple[int, ...]) -> None:
    frames = [
        encode_frame(Data(OPEN_SID, b"x" * n)) if n else bytes((4, 0, 0, 0, OPEN_SID, 0, 0))
        for n in lengths
    ]
    m = _responder(0)
    m.deliver = lambda sid, data: pytest.fail("delivered part of a bad message")
    with pytest.raises(ProtocolError, match="empty DATA frame"):
        m.receive_message(b"".join(frames))


@pytest.mark.parametrize("before", [b"", encode_frame(Data(OPEN_SID, b"ok"))])
def test_a_truncated_data_frame_is_refused(before: bytes) -> None:
    m = _responder(0)
    m.deliver = lambda sid, data: pytest.fail("delivered part of a bad message")
    truncated = encode_frame(Data(OPEN_SID, b"x" * 16))[:-15]
    with pytest.raises(ProtocolError, match="runs past the end"):
        m.receive_message(before + truncated)


def test_one_data_frame_over_the_stream_window_is_refused() -> None:
    m = _responder(INITIAL_STREAM_WINDOW - 10)
    with pytest.raises(ProtocolError) as info:
        m.receive_message(encode_frame(Data(OPEN_SID, bytes(11))))
    assert info.value.code == ErrorCode.FLOW_CONTROL_ERROR
    assert m.error is info.value  # poisoned


def test_two_frames_over_the_stream_window_together_are_refused() -> None:
    m = _responder(INITIAL_STREAM_WINDOW - 10)
    delivered: list[bytes] = []
    m.deliver = lambda sid, data: delivered.append(bytes(data))
    message = encode_frame(Data(OPEN_SID, bytes(6))) + encode_frame(Data(OPEN_SID, bytes(6)))
    with pytest.raises(ProtocolError):
        m.receive_message(message)
    assert delivered == []  # nothing of a failed message is handed over


def test_data_over_the_session_window_is_refused() -> None:
    config = MuxConfig(stream_window=4 * INITIAL_STREAM_WINDOW)
    m = _responder(INITIAL_SESSION_WINDOW - 5, config)
    with pytest.raises(ProtocolError) as info:
        m.receive_message(encode_frame(Data(OPEN_SID, bytes(6))))
    assert info.value.code == ErrorCode.FLOW_CONTROL_ERROR


def test_a_full_control_queue_is_refused_on_a_data_message_too() -> None:
    m = _responder(0)
    m.config = dataclasses.replace(m.config, max_queued_control=64)
    for _ in range(10):  # local PINGs the peer never reads
        m.ping(bytes(8))
    with pytest.raises(ResourceLimitExceeded):
        m.receive_message(encode_frame(Data(OPEN_SID, b"x")))


def test_deliver_hands_data_over_in_order_without_events() -> None:
    m = _responder(0)
    got: list[tuple[int, bytes]] = []
    m.deliver = lambda sid, data: got.append((sid, bytes(data)))
    assert m.receive_message(encode_frame(Data(OPEN_SID, b"one"))) == []
    two = encode_frame(Data(OPEN_SID, b"two")) + encode_frame(Data(OPEN_SID, b"three"))
    assert m.receive_message(two) == []
    assert m.receive_message(encode_frame(Data(EOF_SENT_SID, b"four"))) == []
    assert got == [(1, b"one"), (1, b"two"), (1, b"three"), (11, b"four")]
    assert m.held(OPEN_SID) == 11
    # Anything else in the message: the general path's events, in wire order.
    mixed = encode_frame(Ping(bytes(8))) + encode_frame(Data(OPEN_SID, b"five"))
    events = m.receive_message(mixed)
    assert [(type(e), bytes(e.data)) for e in events if isinstance(e, DataReceived)] == [
        (DataReceived, b"five")
    ]
    assert len(got) == 4


def test_data_for_a_forgotten_stream_returns_its_credit_on_either_path() -> None:
    for prefix in (b"", WINDOW_0):
        m = _responder(0)
        m.deliver = lambda sid, data: pytest.fail("delivered data of a forgotten stream")
        before = m.stats()["recv_session_window"] + m.stats()["recv_unacked"]
        m.receive_message(prefix + encode_frame(Data(FORGOTTEN_SID, bytes(100))))
        assert m.stats()["recv_session_window"] + m.stats()["recv_unacked"] == before


def test_a_straddling_record_is_handed_over_and_never_changes() -> None:
    reader = RecordReader()
    records = [bytes([i]) * (300 + i) for i in range(1, 6)]
    stream = b"".join(len(r).to_bytes(2, "big") + r for r in records)
    got: list[bytes | memoryview] = []
    for i in range(0, len(stream), 97):  # every record straddles a read
        reader.feed(stream[i : i + 97])
        while (record := reader.next_record()) is not None:
            got.append(record)
    assert [bytes(r) for r in got] == records  # read again after every later feed
    assert reader.buffered == 0


# ---------------------------------------------------------------- counted work


def _count_calls(fn: Callable[[], object]) -> int:
    calls = 0

    def profiler(frame: object, event: str, arg: object) -> None:
        nonlocal calls
        if event in ("call", "c_call"):
            calls += 1

    sys.setprofile(profiler)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return calls


def test_a_small_message_costs_few_calls_through_two_engines() -> None:
    """A 1 KiB DATA message: queued, encrypted, decrypted, delivered, acknowledged
    (this test's own calls included).  Before issue 17: 82 calls; now 57."""
    from capsock.testing import EnginePair

    pair = EnginePair()
    pair.pump()
    sid = pair.dialer.mux.open_stream(b"token")
    pair.pump()
    pair.responder.mux.accept_stream(sid)
    pair.pump()
    delivered: list[int] = []
    pair.responder.mux.deliver = lambda s, data: delivered.append(len(data))
    payload = memoryview(b"p" * 1024)

    def one() -> None:
        dialer, responder = pair.dialer, pair.responder
        dialer.mux.send_data(sid, payload)
        record = dialer.data_to_send()
        assert record is not None
        responder.receive_data(record, 0.0)
        while (events := responder.next_events()) is not None:
            for ev in events:
                if isinstance(ev, DataReceived):
                    delivered.append(len(ev.data))
        responder.mux.acknowledge_received_data(sid, 1024)

    for _ in range(20):
        one()
    calls = min(_count_calls(one) for _ in range(5))
    assert delivered[-1] == 1024
    assert calls <= 64, calls


def test_a_handshake_costs_few_calls() -> None:
    """Both roles of one IK handshake, in memory: before issue 17 (BLAKE2b
    through cffi) 1,261 calls; with hashlib's BLAKE2b 1,113."""
    from capsock.testing import handshake_pair

    handshake_pair()
    calls = min(_count_calls(handshake_pair) for _ in range(3))
    assert calls <= 1_180, calls


@pytest.mark.timeout(300)
def test_the_bench_runs_both_backends() -> None:
    args = ["--quick", "--backend", "both", "--rows", "rtt", "--no-libp2p", "--no-write"]
    out = subprocess.run(
        [sys.executable, "-m", "bench", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=280,
        check=True,
    ).stdout
    assert "asyncio backend" in out and "trio backend" in out
    assert out.count("capsock ≤ 1.20x tcp") == 2  # each against its own backend's TCP
