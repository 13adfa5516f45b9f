"""After a record fails halfway, the Mux is poisoned (h11's rule): every later
receive_message raises the same ProtocolError at once and reads nothing."""

from __future__ import annotations

import pytest

from capsock.core.frames import (
    Accept,
    Data,
    GoAway,
    Open,
    Ping,
    Window,
    decode_frames,
    encode_frame,
)
from capsock.core.mux import Mux, MuxConfig
from capsock.errors import ProtocolError, ResourceLimitExceeded

TOKEN = b"t" * 16


def test_a_record_failing_halfway_poisons_input() -> None:
    m = Mux(dialer=True)
    sid = m.open_stream(TOKEN)
    m.data_to_send()
    # ACCEPT changes state, then DATA on a never-opened id breaks the protocol.
    bad = encode_frame(Accept(sid)) + encode_frame(Data(99, b"x"))
    with pytest.raises(ProtocolError) as first:
        m.receive_message(bad)
    assert m.error is first.value
    before = m.stats()
    for later in (
        encode_frame(Ping(b"12345678")),
        encode_frame(Window(0, 10)),
        encode_frame(Open(2, TOKEN)),
        b"",
    ):
        with pytest.raises(ProtocolError) as again:
            m.receive_message(later)
        assert again.value is first.value
    # Nothing was read: no PONG queued, no credit added, no stream opened.
    assert m.stats() == before
    assert not m.has_output()
    # The output side still works, so the session can send its GOAWAY.
    m.fail_with_goaway(first.value.code)
    out = m.data_to_send()
    assert out is not None
    assert [type(f) for f in decode_frames(out)] == [GoAway]


def test_a_resource_limit_poisons_input_too() -> None:
    m = Mux(dialer=True, config=MuxConfig(max_queued_control=64))
    flood = b"".join(encode_frame(Ping(b"%08d" % i)) for i in range(20))
    with pytest.raises(ResourceLimitExceeded) as first:
        m.receive_message(flood)
    with pytest.raises(ResourceLimitExceeded) as again:
        m.receive_message(encode_frame(Window(0, 1)))
    assert again.value is first.value
