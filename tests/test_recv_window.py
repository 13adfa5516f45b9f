"""One window-accounting class (mux._RecvWindow) serves the session's and every
stream's receive window: credit is taken on DATA and given back in batches."""

from __future__ import annotations

from capsock.core import mux as mux_module
from capsock.core.frames import Accept, Data, Window, decode_frames, encode_frame
from capsock.core.mux import INITIAL_SESSION_WINDOW, INITIAL_STREAM_WINDOW, Mux, MuxConfig

RecvWindow = mux_module._RecvWindow


def test_take_refuses_past_the_window_and_counts_nothing() -> None:
    w = RecvWindow(100)
    assert w.take(60)
    assert not w.take(41)
    assert (w.recv_window, w.recv_unacked) == (40, 0)


def test_release_batches_until_the_threshold() -> None:
    w = RecvWindow(100)
    assert w.take(100)
    assert w.release(30, 50) == 0
    assert w.release(19, 50) == 0
    assert w.release(1, 50) == 50  # one increment for all three
    assert (w.recv_window, w.recv_unacked) == (50, 0)


def test_session_and_streams_share_the_class() -> None:
    config = MuxConfig(stream_window=INITIAL_STREAM_WINDOW, session_window=INITIAL_SESSION_WINDOW)
    m = Mux(dialer=True, config=config)
    sid = m.open_stream(b"t" * 16)
    m.receive_message(encode_frame(Accept(sid)))
    m.data_to_send()
    assert isinstance(m._recv_session, RecvWindow)
    assert isinstance(m._streams[sid], RecvWindow)
    half_stream = m.config.half_stream_window
    m.receive_message(encode_frame(Data(sid, bytes(60000))) * 3)
    m.acknowledge_received_data(sid, half_stream - 1)
    assert m.data_to_send() is None  # batched
    m.acknowledge_received_data(sid, 1)
    out = m.data_to_send()
    assert out is not None
    assert decode_frames(out) == [Window(sid, half_stream)]
