"""The three meanings of ``abort`` have three names now; the old public ones warn."""

from __future__ import annotations

import pytest

from capsock.config import SessionConfig
from capsock.core.frames import GoAway, decode_frames
from capsock.core.mux import Mux
from capsock.errors import ErrorCode
from capsock.net.session import Session
from capsock.net.stream import Stream
from capsock.testing import handshake_pair


class _NoTransport:
    async def aclose(self) -> None:
        pass


def _session(**kwargs: object) -> Session:
    result, _ = handshake_pair()
    return Session(_NoTransport(), result, route="test", config=SessionConfig(), **kwargs)  # type: ignore[arg-type]


def test_mux_fail_with_goaway_and_its_deprecated_old_name() -> None:
    for old_name in (False, True):
        m = Mux(dialer=True)
        m.ping(b"12345678")
        if old_name:
            with pytest.deprecated_call(match="fail_with_goaway"):
                m.abort(ErrorCode.PROTOCOL_ERROR)
        else:
            m.fail_with_goaway(ErrorCode.PROTOCOL_ERROR)
        out = m.data_to_send()
        assert out is not None
        assert [type(f) for f in decode_frames(out)] == [GoAway]


def test_session_close_now_and_its_deprecated_old_name() -> None:
    s = _session()
    s.close_now()
    assert s._engine.reason == "the session was dropped" and not s.is_usable
    s = _session()
    with pytest.deprecated_call(match="close_now"):
        s.abort()
    assert not s.is_usable


def test_the_sessions_clock_is_called_monotonic_clock() -> None:
    def clock() -> float:
        return 7.0

    assert _session(monotonic_clock=clock)._clock is clock
    with pytest.deprecated_call(match="monotonic_clock"):
        assert _session(clock=clock)._clock is clock


def test_a_streams_own_reset_is_reset_locally() -> None:
    assert hasattr(Stream, "_reset_locally")
    assert not hasattr(Stream, "_abort")
