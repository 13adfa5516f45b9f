"""Tests that kill the mutants of ``scripts/mutation config`` (docs/testing.md).

capsock.config validates every setting at construction.  The suite's own
config tests (tests/test_config.py) check that a bad value is refused and
that its field is named somewhere in the message; these pin, for each check,
the exact message, the lowest and highest value still accepted, and the
type of what is derived, so a check that drifts by one, loses its wording or
accepts the wrong type is seen.  Each table row names the mutants it was
written against (mutmut's numbers of the run at ``dbd0447``).
"""

# ruff: noqa: E501  (tables of exact messages: one row a line reads best)

from __future__ import annotations

import math
from typing import Any

import pytest

from capsock.config import (
    INITIAL_SESSION_WINDOW,
    INITIAL_STREAM_WINDOW,
    MAX_MESSAGE_PLAINTEXT,
    MAX_WINDOW,
    MuxConfig,
    NodeConfig,
    SessionConfig,
    parse_listen,
)
from capsock.core.frames import HEADER_LEN
from capsock.errors import LocalUsageError

INF = math.inf
FRAME_MAX = MAX_MESSAGE_PLAINTEXT - HEADER_LEN

# (config class, fields, the exact message)
REFUSED: list[tuple[type[Any], dict[str, Any], str]] = [
    # _int 9-12: the bound says "in [low, high]" or "at least low"; MuxConfig 9,
    # 14, 18, 19, 27, 36, 47, 57, 66; SessionConfig 58: the field's own name
    (MuxConfig, {"stream_window": 1}, f"stream_window=1 is out of range: it must be in [{INITIAL_STREAM_WINDOW}, {MAX_WINDOW}]"),
    (MuxConfig, {"session_window": MAX_WINDOW + 1}, f"session_window={MAX_WINDOW + 1} is out of range: it must be in [{INITIAL_SESSION_WINDOW}, {MAX_WINDOW}]"),
    (MuxConfig, {"max_streams": 0}, "max_streams=0 is out of range: it must be at least 1"),
    (MuxConfig, {"max_pending_opens": 0}, "max_pending_opens=0 is out of range: it must be at least 1"),
    # MuxConfig 50: the frame bound is the plaintext less the header, exactly
    (MuxConfig, {"max_frame_data": FRAME_MAX + 1}, f"max_frame_data={FRAME_MAX + 1} is out of range: it must be in [1, {FRAME_MAX}]"),
    (MuxConfig, {"max_queued_control": 0}, "max_queued_control=0 is out of range: it must be at least 1"),
    (MuxConfig, {"max_queued_data": 0}, "max_queued_data=0 is out of range: it must be at least 1"),
    (MuxConfig, {"max_streams": True}, "max_streams must be an integer, got True"),
    # SessionConfig 3: the type named is the value's
    (SessionConfig, {"mux": {}}, "mux must be a MuxConfig, got dict"),
    # _seconds 17-23, 26-31: "0 or more" / "more than 0", "(infinite allowed)"
    (SessionConfig, {"keepalive_interval": -1.0}, "keepalive_interval=-1.0 is out of range: it takes 0 or more seconds (infinite allowed)"),
    (SessionConfig, {"keepalive_timeout": 0.0}, "keepalive_timeout=0.0 is out of range: it takes more than 0 seconds (infinite allowed)"),
    (SessionConfig, {"open_timeout": 0.0}, "open_timeout=0.0 is out of range: it takes more than 0 seconds (infinite allowed)"),
    (SessionConfig, {"idle_timeout": -1.0}, "idle_timeout=-1.0 is out of range: it takes 0 or more seconds (infinite allowed)"),
    (SessionConfig, {"max_concurrent_opens": 0}, "max_concurrent_opens=0 is out of range: it must be at least 1"),
    # SessionConfig 29, 30: what to do about it
    (SessionConfig, {"keepalive_interval": 10.0, "keepalive_timeout": 5.0}, "keepalive_timeout=5.0 must be longer than keepalive_interval=10.0: the peer gets a PING after the interval and is declared dead after the timeout"),
    # _enabled 4: keepalive of half a second is on, so its timeout is checked
    (SessionConfig, {"keepalive_interval": 0.5, "keepalive_timeout": 0.25}, "keepalive_timeout=0.25 must be longer than keepalive_interval=0.5: the peer gets a PING after the interval and is declared dead after the timeout"),
    (NodeConfig, {"backlog_wait": -0.5}, "backlog_wait=-0.5 is out of range: it takes 0 or more seconds"),
    (NodeConfig, {"replay_window": -1.0}, "replay_window=-1.0 is out of range: it takes 0 or more seconds"),
    (NodeConfig, {"direct_timeout": INF}, "direct_timeout=inf is out of range: it takes more than 0 seconds"),
    # _seconds 3, 5: a bool or a text is not a number of seconds
    (NodeConfig, {"handshake_timeout": True}, "handshake_timeout must be a number of seconds, got True"),
    (NodeConfig, {"connect_timeout": "1"}, "connect_timeout must be a number of seconds, got '1'"),
    # NodeConfig 3
    (NodeConfig, {"session": MuxConfig()}, "session must be a SessionConfig, got MuxConfig"),
    # _pair 7, 8: a bool or a text is not a number of the pair
    (NodeConfig, {"relay_backoff": (True, 2.0)}, "relay_backoff must be a pair of finite numbers, got (True, 2.0)"),
    (NodeConfig, {"relay_backoff": ("a", 2.0)}, "relay_backoff must be a pair of finite numbers, got ('a', 2.0)"),
    # NodeConfig 111
    (NodeConfig, {"relay_backoff": (1.0,)}, "relay_backoff must be a pair of numbers, got (1.0,)"),
    # NodeConfig 118, 119
    (NodeConfig, {"relay_backoff": (2.0, 1.0)}, "relay_backoff=(2.0, 1.0): the first delay must be more than 0 and at most the largest"),
    # NodeConfig 129
    (NodeConfig, {"direct_paths": 1}, "direct_paths must be True or False, got 1"),
    # NodeConfig 154, 155
    (NodeConfig, {"handshake_rate": (0.0, 5.0)}, "handshake_rate=(0.0, 5.0): the rate (per second) must be more than 0 and the burst at least 1"),
    (NodeConfig, {"refused_open_rate": (5.0, 0.5)}, "refused_open_rate=(5.0, 0.5): the rate (per second) must be more than 0 and the burst at least 1"),
    (NodeConfig, {"accept_forwarded": "ANY"}, "accept_forwarded='ANY': use 'trusted', 'any' or 'never'"),
    (NodeConfig, {"max_sessions": 0}, "max_sessions=0 is out of range: it must be at least 1"),
]  # fmt: skip


@pytest.mark.parametrize(("cls", "fields", "message"), REFUSED, ids=lambda v: repr(v)[:60])
def test_each_refused_value_has_its_exact_message(
    cls: type[Any], fields: dict[str, Any], message: str
) -> None:
    with pytest.raises(LocalUsageError) as info:
        cls(**fields)
    assert str(info.value) == message


# The edges that are accepted (the lowest value, the largest, the special ones).
ACCEPTED: list[tuple[type[Any], dict[str, Any]]] = [
    # MuxConfig 29, 38, 49, 59, 68; SessionConfig 60; NodeConfig 84: 1 is allowed
    (MuxConfig, {"max_streams": 1, "max_pending_opens": 1, "max_frame_data": 1,
                 "max_queued_control": 1, "max_queued_data": 1}),
    (MuxConfig, {"max_frame_data": FRAME_MAX}),
    (SessionConfig, {"max_concurrent_opens": 1}),
    (NodeConfig, {"max_half_open": 1, "listener_backlog": 1, "max_sessions": 1}),
    # _enabled 3: keepalive 0 is off, so a timeout of 0 is not checked
    (SessionConfig, {"keepalive_interval": 0.0, "keepalive_timeout": 0.0}),
    # SessionConfig 19, 22, 25: an infinite keepalive timeout is allowed
    (SessionConfig, {"keepalive_interval": 1.0, "keepalive_timeout": INF}),
    # _seconds 13: durations under a second
    (SessionConfig, {"open_timeout": 0.5, "idle_timeout": 0.5, "keepalive_interval": 0.25,
                     "keepalive_timeout": 0.5}),
    (NodeConfig, {"handshake_timeout": 0.5, "backlog_wait": 0.5}),
    # NodeConfig 61, 64, 67: a replay window of 0 (the cache forgets at once)
    (NodeConfig, {"replay_window": 0.0}),
    # NodeConfig 116: the first backoff may equal the largest
    (NodeConfig, {"relay_backoff": (1.0, 1.0)}),
    # NodeConfig 146-148: a rate under one a second, a burst of exactly 1
    (NodeConfig, {"handshake_rate": (0.5, 1.0), "refused_open_rate": (0.5, 1)}),
    # NodeConfig 31-34: each documented policy by its name
    (NodeConfig, {"accept_forwarded": "trusted"}),
    (NodeConfig, {"accept_forwarded": "any"}),
    (NodeConfig, {"accept_forwarded": "never"}),
]  # fmt: skip


@pytest.mark.parametrize(("cls", "fields"), ACCEPTED, ids=lambda v: repr(v)[:60])
def test_the_edge_values_are_accepted_as_given(cls: type[Any], fields: dict[str, Any]) -> None:
    config = cls(**fields)
    for name, value in fields.items():
        assert getattr(config, name) == (tuple(value) if isinstance(value, tuple) else value)


def test_the_half_windows_are_whole_numbers() -> None:
    """MuxConfig 77, 87 (``// 2`` made ``/ 2``): the credit batches are ints,
    also for an odd window."""
    mux = MuxConfig(
        stream_window=INITIAL_STREAM_WINDOW + 1, session_window=INITIAL_SESSION_WINDOW + 3
    )
    assert (
        type(mux.half_stream_window) is int and mux.half_stream_window == INITIAL_STREAM_WINDOW // 2
    )
    assert type(mux.half_session_window) is int
    assert mux.half_session_window == (INITIAL_SESSION_WINDOW + 3) // 2


# ------------------------------------------------------------------ parse_listen

PARSED = [
    ("tcp:127.0.0.1:0", ("tcp", "127.0.0.1", 0)),
    ("tcp:[::1]:4000", ("tcp", "::1", 4000)),
    ("tcp:host.example:65535", ("tcp", "host.example", 65535)),
    ("tcp:[x:1", ("tcp", "[x", 1)),  # a bracket on one side only stays
    ("tcp:x]:1", ("tcp", "x]", 1)),
    ("127.0.0.1:80", ("tcp", "127.0.0.1", 80)),  # bare HOST:PORT, as on the command line
    ("[::1]:80", ("tcp", "::1", 80)),
    ("unix:/tmp/capsock.sock", ("unix", "/tmp/capsock.sock", 0)),
    ("unix:/a:1", ("unix", "/a:1", 0)),  # the kind is what precedes the first colon
]

BAD_LISTEN = [
    ("nocolon", "listen address 'nocolon': use tcp:HOST:PORT or unix:/PATH"),
    ("unix:relative", "listen address 'unix:relative': a unix path must be absolute"),
    ("unix:", "listen address 'unix:': a unix path must be absolute"),
    ("tcp:host", "listen address 'tcp:host': use tcp:HOST:PORT (port 0 = any)"),
    ("tcp::80", "listen address 'tcp::80': use tcp:HOST:PORT (port 0 = any)"),
    ("tcp:h:x", "listen address 'tcp:h:x': use tcp:HOST:PORT (port 0 = any)"),
    ("tcp:h:65536", "listen address 'tcp:h:65536': use tcp:HOST:PORT (port 0 = any)"),
    ("tcp:[::1]", "listen address 'tcp:[::1]': use tcp:HOST:PORT (port 0 = any)"),
    ("udp:h:x", "listen address 'udp:h:x': unknown kind 'udp' (tcp or unix)"),
]


@pytest.mark.parametrize(("spec", "expected"), PARSED)
def test_each_listen_form_parses(spec: str, expected: tuple[str, str, int]) -> None:
    """parse_listen 1-43 (the 'no tests' of the first run: no selected test
    called it): each form gives its exact triple."""
    assert parse_listen(spec) == expected


@pytest.mark.parametrize(("spec", "message"), BAD_LISTEN)
def test_each_bad_listen_address_has_its_exact_message(spec: str, message: str) -> None:
    """parse_listen 44-60: every malformed address is refused with the form to use."""
    with pytest.raises(LocalUsageError) as info:
        parse_listen(spec)
    assert str(info.value) == message
