"""Log lines whose number a stranger controls are rate-limited (capsock._logs)."""

from __future__ import annotations

import logging

import anyio
import pytest

import capsock
import capsock.net.session
from capsock._logs import LimitedLog
from capsock.core.frames import Ping
from capsock.uri import TcpHint

from .chaos import RawDialer

pytestmark = pytest.mark.anyio


def test_limited_log_lets_a_window_through_and_counts_the_rest(
    caplog: pytest.LogCaptureFixture,
) -> None:
    logger = logging.getLogger("capsock.test_log_limits")
    limited = LimitedLog(logger, per_window=3, window=3600.0)
    with caplog.at_level(logging.INFO, logger=logger.name):
        for i in range(10):
            limited.warning("line %d", i)
    assert [r.getMessage() for r in caplog.records] == ["line 0", "line 1", "line 2"]
    assert all(r.levelno == logging.WARNING for r in caplog.records)
    limited._start = -1e9  # the window has passed
    with caplog.at_level(logging.INFO, logger=logger.name):
        limited.info("after")
    assert caplog.records[-1].getMessage() == "after (7 similar lines suppressed)"


async def test_sessions_that_break_the_protocol_write_a_bounded_number_of_lines(
    anyio_backend: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sixty strangers each complete a handshake and then send a record that
    is not authentic: each session ends with a protocol error, and the node
    writes at most the limiter's window of lines about them (20 per 10 s)."""
    # The limiter is process-wide: start this test with a fresh window.
    fresh = LimitedLog(logging.getLogger("capsock.net.session"), per_window=20, window=10.0)
    monkeypatch.setattr(capsock.net.session, "_peer_log", fresh)
    with caplog.at_level(logging.DEBUG, logger="capsock"):
        async with capsock.Node(listen=["tcp:127.0.0.1:0"]) as server:
            hint = server.hints[0]
            assert isinstance(hint, TcpHint)
            for _ in range(60):
                dialer = await RawDialer.connect(hint.host, hint.port, server.id)
                async with dialer:
                    await dialer.send(dialer.seal(Ping(bytes(8))))  # confirmed
                    garbage = bytearray(dialer.seal(Ping(bytes(8))))
                    garbage[-1] ^= 1  # the tag no longer verifies
                    await dialer.send(bytes(garbage))
                    await dialer.read_frames(2.0)  # until the node hangs up
            with anyio.fail_after(5):
                while server.stats()["session_count"]:
                    await anyio.sleep(0.01)
    lines = [
        r
        for r in caplog.records
        if "closed: protocol error" in r.getMessage()
        or (r.getMessage().startswith("session with") and "closed" in r.getMessage())
    ]
    assert 1 <= len(lines) <= 21, [r.getMessage() for r in lines[:5]]
