"""atheris harness: the sans-IO session engine (capsock.core.mux.Mux).

Each input drives one Mux through up to 64 steps: received messages (raw bytes,
or well-formed frames with fuzzed fields, so the state machine is reached) mixed
with the local actions a session performs (open, accept, reject, send, consume,
EOF, reset, ping, GOAWAY, drain).

Invariants: ``receive_message`` raises nothing but capsock.errors.CapsockError
(after which the session is over, as in capsock.net.session); local actions raise
nothing but capsock.errors.LocalUsageError; memory stays bounded: the queued
answers never exceed ``max_queued_control`` after a message was accepted, the
receive windows never go negative, and the stream count never exceeds
``max_streams``.

    python fuzz/fuzz_mux.py -max_total_time=600 -rss_limit_mb=1024
"""

from __future__ import annotations

import sys

from _common import Provider, main

from capsock.errors import CapsockError, ErrorCode, LocalUsageError
from capsock.core.frames import (
    Accept,
    Control,
    Data,
    Eof,
    Frame,
    GoAway,
    Open,
    Ping,
    Pong,
    Reject,
    Reset,
    Window,
    encode_frame,
)
from capsock.core.mux import Mux, MuxConfig, OpenRequested, StreamAccepted

CONFIG = MuxConfig(
    stream_window=256 * 1024, session_window=1024 * 1024, max_streams=16, max_pending_opens=8,
    max_queued_control=4096,
)  # fmt: skip
CODES = [int(c) for c in ErrorCode] + [0xFFFF]


def _sid(p: Provider) -> int:
    return int(p.pick([0, 1, 2, 3, 4, 5, 6, 7, 8, 2**31, 2**32 - 1, p.int(0, 2**32 - 1)]))


def _frame(p: Provider) -> Frame:
    kind = p.int(0, 10)
    sid = _sid(p)
    if kind == 0:
        return Open(sid or 1, p.take(p.int(1, 60)) or b"\x01")
    if kind == 1:
        return Accept(sid or 1)
    if kind == 2:
        return Reject(sid or 1, int(p.pick(CODES)))
    if kind == 3:
        return Data(sid or 1, p.take(p.int(1, 2000)) or b"x")
    if kind == 4:
        return Window(sid, p.int(1, 2**31 - 1))
    if kind == 5:
        return Eof(sid or 1)
    if kind == 6:
        return Reset(sid or 1, int(p.pick(CODES)))
    if kind == 7:
        return Ping(p.take(8).ljust(8, b"\x00"))
    if kind == 8:
        return Pong(p.take(8).ljust(8, b"\x00"))
    if kind == 9:
        return GoAway(p.int(0, 2**32 - 1), int(p.pick(CODES)))
    return Control(p.take(p.int(1, 40)) or b"\x80")


def _message(p: Provider) -> bytes:
    if p.int(0, 3) == 0:
        return p.take(p.int(0, 200))
    frames = [_frame(p) for _ in range(p.int(1, 6))]
    if p.bool():  # sometimes a big DATA run, to reach the window checks
        frames.append(Data(int(p.pick([1, 2, 3])), bytes(p.int(1, 65000))))
    return b"".join(encode_frame(f) for f in frames)


def _check(mux: Mux) -> None:
    stats = mux.stats()
    assert stats["queued_control"] <= CONFIG.max_queued_control
    assert stats["recv_session_window"] >= 0
    assert stats["streams"] <= CONFIG.max_streams
    for st in mux._streams.values():
        assert st.recv_window >= 0


def TestOneInput(data: bytes) -> None:
    p = Provider(data)
    mux = Mux(dialer=p.bool(), config=CONFIG)
    pending: list[int] = []
    opened: list[int] = []
    for _ in range(64):
        if not p.remaining():
            break
        op = p.int(0, 11)
        if op <= 3:
            try:
                events = mux.receive_message(_message(p))
            except CapsockError:
                return  # the session is closed: nothing more happens on it
            for ev in events:
                if isinstance(ev, OpenRequested):
                    pending.append(ev.stream_id)
                elif isinstance(ev, StreamAccepted):
                    opened.append(ev.stream_id)
            _check(mux)
            continue
        try:
            if op == 4:
                mux.open_stream(p.take(p.int(1, 50)) or b"\x01")
            elif op == 5 and pending:
                sid = pending.pop(0)
                if mux.is_open(sid):
                    mux.accept_stream(sid)
                    opened.append(sid)
            elif op == 6 and pending:
                mux.reject_stream(pending.pop(0), ErrorCode.REFUSED)
            elif op == 7 and opened:
                sid = opened[p.int(0, len(opened) - 1)]
                if mux.send_credit(sid):
                    mux.send_data(sid, bytes(p.int(1, 70000)))
            elif op == 8:
                mux.acknowledge_received_data(int(p.pick([*opened, 0, 1, 2])), p.int(0, 600000))
            elif op == 9 and opened:
                sid = opened[p.int(0, len(opened) - 1)]
                if p.bool():
                    mux.reset_stream(sid, ErrorCode.CANCELLED)
                elif mux.is_open(sid):
                    mux.send_eof(sid)
            elif op == 10:
                if p.bool():
                    mux.ping(p.take(8).ljust(8, b"\x00"))
                else:
                    mux.goaway(ErrorCode.NO_ERROR)
            else:
                while mux.data_to_send() is not None:
                    pass
        except LocalUsageError:
            pass  # a local action that is not allowed in this state: refused, no harm


def seeds() -> list[bytes]:
    return [bytes(16), bytes(range(256)), b"\x00\x01" * 64, b"\x03\x00" * 100]


if __name__ == "__main__":
    main(TestOneInput, seeds())
    sys.exit(0)
