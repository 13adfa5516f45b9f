"""The sans-IO session engine: its rules, driven by a fake clock (no event loop, no sleeps).

Everything here runs through :class:`capsock.testing.EnginePair`: two engines
whose records are moved in memory and whose deadlines fire when the clock is
advanced.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from capsock.config import INITIAL_SESSION_WINDOW, MuxConfig, SessionConfig
from capsock.core import _session_engine
from capsock.core._session_engine import (
    DRAIN_LIMIT,
    DrainExpired,
    Ending,
    IdleExpired,
    PeerConfirmed,
    PeerSilent,
    Phase,
    PingQueued,
    SessionEngine,
)
from capsock.core.frames import Data, GoAway, Ping, decode_frames
from capsock.core.mux import DataReceived, OpenRequested
from capsock.core.records import RecordReader
from capsock.errors import ErrorCode, ProtocolError
from capsock.testing import EnginePair, FakeClock, MuxPair, handshake_pair

CFG = SessionConfig(keepalive_interval=15.0, keepalive_timeout=45.0, idle_timeout=300.0)


def frames_of(sender: SessionEngine, receiver_cipher_of: SessionEngine) -> list[object]:
    """Decrypt what ``sender`` has to send with the other side's cipher, as frames."""
    data = sender.data_to_send()
    assert data is not None
    reader = RecordReader()
    reader.feed(bytes(data))
    out: list[object] = []
    while (record := reader.next_record()) is not None:
        out += decode_frames(receiver_cipher_of._cipher.decrypt(record))
    return out


# ------------------------------------------------------------------ layering


def test_the_engine_names_no_io_and_no_clock() -> None:
    tree = ast.parse(Path(_session_engine.__file__).read_text("utf-8"))
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & {"anyio", "asyncio", "trio", "socket", "time", "sniffio", "selectors"}
    text = Path(_session_engine.__file__).read_text("utf-8").lower()
    for word in ("socket", "tcp", "relay"):
        assert word not in text, f"the engine names {word!r}: it must not care what carries it"


# ------------------------------------------------------------------ who speaks first


def test_the_dialer_speaks_first_and_the_responder_waits_for_it() -> None:
    pair = EnginePair(CFG)
    assert pair.dialer.phase is Phase.OPEN and pair.dialer.has_output()  # its PING, at once
    responder = pair.responder
    assert responder.phase is Phase.UNCONFIRMED
    responder.mux.ping(b"12345678")
    responder.go_away(ErrorCode.NO_ERROR)
    assert not responder.has_output() and responder.data_to_send() is None  # not even GOAWAY
    at_dialer, at_responder = pair.pump()
    assert at_responder[0] == PeerConfirmed()  # first, before the record's own events
    assert responder.confirmed and responder.phase is Phase.GOING_AWAY
    assert at_dialer  # then the responder spoke: PONG, PING, GOAWAY


def test_peer_confirmed_comes_before_the_first_record_even_if_it_is_bad() -> None:
    pair = EnginePair(CFG)
    pair.dialer.mux.open_stream(b"tok")
    data = pair.dialer.data_to_send()
    assert data is not None
    pair.responder.receive_data(bytes(data), 0.0)
    assert pair.responder.next_events() == [PeerConfirmed()]
    events = pair.responder.next_events()
    assert events is not None and any(type(e) is OpenRequested for e in events)


def test_an_unconfirmed_responder_that_sees_a_bad_record_closes_silently() -> None:
    pair = EnginePair(CFG)
    pair.responder.receive_data(b"\x00\x20" + b"\x00" * 32, 0.0)  # not authentic
    with pytest.raises(ProtocolError):
        pair.responder.next_events()
    assert pair.responder.phase is Phase.CLOSED
    assert pair.responder.data_to_send() is None  # no GOAWAY to a maybe-replayed handshake


# ------------------------------------------------------------------ keepalive and dead peers


def test_a_silent_peer_gets_a_ping_after_the_interval_and_answers_it() -> None:
    pair = EnginePair(CFG)
    pair.pump()
    fired = pair.advance(15.0)
    assert ("dialer", PingQueued()) in fired and ("responder", PingQueued()) in fired
    # Answered at once (the pump): nobody is dead after many intervals, and each
    # side pings once per silent interval, not once per timer wake-up.
    fired = pair.advance(10 * 15.0)
    assert not [e for _, e in fired if type(e) is PeerSilent]
    pings = [side for side, e in fired if type(e) is PingQueued]
    assert pings.count("dialer") == 10
    assert pair.dialer.phase is Phase.OPEN and pair.responder.phase is Phase.OPEN


def test_a_dead_peer_is_declared_after_the_timeout_without_goaway() -> None:
    pair = EnginePair(CFG)
    pair.pump()
    pair.responder_to_dialer = False  # the path dies one way
    fired = pair.advance(44.9)
    assert ("dialer", PingQueued()) in fired
    assert pair.dialer.phase is Phase.OPEN
    fired = pair.advance(0.2)
    assert [(s, type(e)) for s, e in fired if type(e) is PeerSilent] == [("dialer", PeerSilent)]
    assert pair.dialer.phase is Phase.CLOSED and pair.dialer.cause is Ending.PEER_SILENT
    assert pair.dialer.reason is not None and "no sign of life" in pair.dialer.reason
    assert pair.dialer.data_to_send() is None and pair.dialer.next_deadline() is None


def test_raw_bytes_are_no_sign_of_life() -> None:
    pair = EnginePair(CFG)
    pair.pump()
    clock = pair.clock
    for _ in range(60):  # a record trickled one byte a second never completes
        clock.advance(1.0)
        pair.dialer.receive_data(b"\x01", clock.now)
        assert pair.dialer.next_events() is None
        pair.dialer.handle_timer(clock.now)
    assert pair.dialer.phase is Phase.CLOSED and pair.dialer.cause is Ending.PEER_SILENT


def test_keepalive_off_means_no_deadline_of_its_own() -> None:
    pair = EnginePair(SessionConfig(keepalive_interval=0, idle_timeout=0))
    pair.pump()
    assert pair.next_deadline() is None
    assert pair.advance(1e6) == []


def test_an_unconfirmed_responder_times_out_like_a_dead_peer() -> None:
    """The handshake timeout at engine level: a dialer that never speaks."""
    pair = EnginePair(CFG)
    pair.dialer_to_responder = False
    fired = pair.advance(46.0)
    assert ("responder", PeerSilent(46.0)) in fired or any(
        s == "responder" and type(e) is PeerSilent for s, e in fired
    )
    assert pair.responder.phase is Phase.CLOSED and not pair.responder.confirmed


# ------------------------------------------------------------------ idle, GOAWAY, drain


def test_an_idle_session_goes_away_and_drains() -> None:
    pair = EnginePair(CFG)
    pair.pump()
    fired = pair.advance(299.0)
    assert not [e for _, e in fired if type(e) is IdleExpired]
    fired = pair.advance(1.0)
    assert {s for s, e in fired if type(e) is IdleExpired} == {"dialer", "responder"}
    # The pump wrote the GOAWAYs: both drained and closed, no drain deadline waited for.
    assert pair.dialer.phase is Phase.CLOSED and pair.dialer.cause is Ending.IDLE
    assert pair.dialer.reason == "the session was idle"


def test_a_busy_session_is_not_idle() -> None:
    pair = EnginePair(CFG)
    pair.pump()
    pair.dialer.set_busy(True, pair.clock.now)
    pair.responder.set_busy(True, pair.clock.now)
    fired = pair.advance(1000.0)
    assert ("dialer", IdleExpired()) not in fired
    pair.dialer.set_busy(False, pair.clock.now)  # idle from now on
    assert pair.dialer.next_deadline() is not None
    fired = pair.advance(300.0)
    assert ("dialer", IdleExpired()) in fired


def test_close_queues_goaway_after_what_is_queued_and_the_drain_is_bounded() -> None:
    pair = EnginePair(CFG)
    pair.pump()
    sid = pair.dialer.mux.open_stream(b"t")
    assert pair.dialer.close(ErrorCode.LIMIT_EXCEEDED, "enough", pair.clock.now)
    assert not pair.dialer.close(ErrorCode.NO_ERROR, "again", pair.clock.now)  # once
    assert pair.dialer.phase is Phase.DRAINING and not pair.dialer.is_usable
    assert pair.dialer.next_deadline() == pair.clock.now + DRAIN_LIMIT
    frames = frames_of(pair.dialer, pair.responder)
    assert type(frames[-1]) is GoAway and frames[-1].code == ErrorCode.LIMIT_EXCEEDED
    assert sid == 1
    # Written, but the driver never reports it flushed (its write hangs): the
    # drain's deadline closes it anyway.
    assert pair.dialer.handle_timer(pair.clock.now + DRAIN_LIMIT - 0.01) == []
    assert pair.dialer.handle_timer(pair.clock.now + DRAIN_LIMIT) == [DrainExpired()]
    assert pair.dialer.phase is Phase.CLOSED and pair.dialer.reason == "enough"


def test_output_flushed_closes_a_drained_session_only_when_nothing_is_queued() -> None:
    pair = EnginePair(CFG)
    pair.pump()
    pair.dialer.close(ErrorCode.NO_ERROR, "bye", pair.clock.now)
    assert not pair.dialer.output_flushed()  # the GOAWAY is still queued
    pair.dialer.data_to_send()
    assert pair.dialer.output_flushed() and pair.dialer.phase is Phase.CLOSED


def test_close_now_sends_nothing() -> None:
    pair = EnginePair(CFG)
    pair.pump()
    pair.dialer.mux.ping(b"abcdefgh")
    pair.dialer.close_now("dropped")
    assert pair.dialer.phase is Phase.CLOSED and pair.dialer.cause is Ending.DROPPED
    assert pair.dialer.data_to_send() is None


# ------------------------------------------------------------------ protocol errors


def test_a_protocol_error_poisons_the_engine_and_queues_only_its_goaway() -> None:
    pair = EnginePair(CFG)
    pair.pump()
    sid = pair.dialer.mux.open_stream(b"t")
    pair.pump()
    pair.responder.mux.accept_stream(sid)
    pair.pump()
    assert pair.dialer.mux.send_data(sid, memoryview(b"queued before the bad record")) > 0
    pair.dialer.receive_data(b"\x00\x20" + b"\xff" * 32, pair.clock.now)  # fails authentication
    with pytest.raises(ProtocolError) as first:
        pair.dialer.next_events()
    engine = pair.dialer
    assert engine.error is first.value and engine.cause is Ending.PROTOCOL_ERROR
    assert engine.phase is Phase.DRAINING
    for later in (lambda: engine.receive_data(b"x", 1.0), engine.next_events):
        with pytest.raises(ProtocolError) as again:
            later()
        assert again.value is first.value
    frames = frames_of(engine, pair.responder)
    assert [type(f) for f in frames] == [GoAway]  # the DATA queued before it is gone
    assert frames[0].code == ErrorCode.PROTOCOL_ERROR
    assert not any(type(f) is Data for f in frames)


def test_fail_from_the_driver_poisons_too() -> None:
    pair = EnginePair(CFG)
    pair.pump()
    exc = ProtocolError("seen by the driver", ErrorCode.FLOW_CONTROL_ERROR)
    pair.dialer.fail(exc, pair.clock.now)
    assert pair.dialer.error is exc and pair.dialer.phase is Phase.DRAINING
    frames = frames_of(pair.dialer, pair.responder)
    assert [(type(f), f.code) for f in frames] == [(GoAway, ErrorCode.FLOW_CONTROL_ERROR)]  # type: ignore[attr-defined]


# ------------------------------------------------------------------ the pumps themselves


def test_the_pumps_carry_streams() -> None:
    pair = EnginePair(CFG)
    pair.pump()
    sid = pair.dialer.mux.open_stream(b"token")
    _, at_responder = pair.pump()
    assert OpenRequested(sid, b"token") in at_responder
    pair.responder.mux.accept_stream(sid)
    pair.pump()
    pair.dialer.mux.send_data(sid, memoryview(b"hello"))
    _, at_responder = pair.pump()
    assert [bytes(e.data) for e in at_responder if type(e) is DataReceived] == [b"hello"]

    muxes = MuxPair()
    sid = muxes.dialer.open_stream(b"t")
    _, at_responder = muxes.pump()
    assert OpenRequested(sid, b"t") in at_responder


def test_handshake_pair_ciphers_talk_to_each_other() -> None:
    dialer, responder = handshake_pair()
    assert dialer.is_initiator and not responder.is_initiator
    assert dialer.handshake_hash == responder.handshake_hash
    assert bytes(responder.cipher.decrypt(dialer.cipher.encrypt(b"hi"))) == b"hi"


def test_the_fake_clock_only_moves_forward() -> None:
    clock = FakeClock(5.0)
    assert clock() == 5.0 and clock.advance(2.5) == 7.5
    with pytest.raises(ValueError):
        clock.advance(-1)


def test_the_dialers_first_record_is_a_ping_if_it_has_nothing_else_to_say() -> None:
    quiet = SessionConfig(mux=MuxConfig(session_window=INITIAL_SESSION_WINDOW))
    pair = EnginePair(quiet)
    assert [type(f) for f in frames_of(pair.dialer, pair.responder)] == [Ping]
    pair = EnginePair(CFG)  # a larger window: its WINDOW is the first record, no PING
    assert Ping not in [type(f) for f in frames_of(pair.dialer, pair.responder)]


def test_the_layering_test_counts_the_engine_as_core() -> None:
    from tests.test_layering import is_core
    from tests.test_quality import SANS_IO

    assert is_core("capsock.core._session_engine")
    assert "core._session_engine" in SANS_IO


@pytest.mark.parametrize("start", [0.1, 32767.910032258096, 16380.21784861311, 8188.085168335446])
def test_a_timer_woken_at_the_deadline_finds_it_due(start: float) -> None:
    """``now - last >= interval`` can be False at ``now = last + interval``
    (floating point): a driver woken at next_deadline() would spin."""
    pair = EnginePair(
        SessionConfig(keepalive_interval=15.0, keepalive_timeout=45.0, idle_timeout=300.0),
        clock=FakeClock(start),
    )
    pair.pump()
    engine = pair.dialer
    for _ in range(2):  # the PING, then the dead-peer end
        deadline = engine.next_deadline()
        assert deadline is not None
        assert engine.handle_timer(deadline) != [], f"nothing due at the deadline {deadline!r}"


def test_has_output_and_data_to_send_agree_in_every_phase() -> None:
    """A writer loops while has_output(): if data_to_send() then gave nothing,
    it would spin and starve the event loop (a CLOSED engine with frames queued)."""
    pair = EnginePair(CFG)
    engine = pair.responder  # UNCONFIRMED first
    engine.mux.ping(b"abcdefgh")
    assert not engine.has_output() and engine.data_to_send() is None
    pair.pump()
    for close in (lambda e: e.close_now("x"), lambda e: e.connection_lost("y")):
        pair = EnginePair(CFG)
        pair.pump()
        pair.dialer.mux.ping(b"abcdefgh")
        close(pair.dialer)
        assert pair.dialer.phase is Phase.CLOSED
        assert pair.dialer.has_output() == (pair.dialer.data_to_send() is not None)
