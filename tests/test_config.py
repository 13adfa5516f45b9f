"""Configs are validated at construction and immutable (capsock.config)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest

from capsock.config import MuxConfig, NodeConfig, SessionConfig
from capsock.errors import LocalUsageError

NAN = math.nan
INF = math.inf

BAD_MUX: list[dict[str, Any]] = [
    {"stream_window": 1},
    {"stream_window": 2**31},
    {"session_window": 1000},
    {"max_streams": 0},
    {"max_pending_opens": -1},
    {"max_frame_data": 0},
    {"max_frame_data": 70000},
    {"max_queued_control": 0},
    {"max_queued_control": -5},
    {"max_queued_data": 0},
    {"stream_window": 2.5e6},
]
BAD_SESSION: list[dict[str, Any]] = [
    {"max_concurrent_opens": 0},
    {"max_concurrent_opens": -1},
    {"keepalive_interval": 10.0, "keepalive_timeout": 5.0},
    {"keepalive_interval": 10.0, "keepalive_timeout": 10.0},
    {"keepalive_interval": -1.0},
    {"keepalive_interval": NAN},
    {"keepalive_timeout": NAN},
    {"keepalive_timeout": 0.0},
    {"open_timeout": 0.0},
    {"open_timeout": -3.0},
    {"idle_timeout": -1.0},
    {"idle_timeout": NAN},
    {"push_reads": 1},
    {"mux": {"stream_window": 1}},
]
BAD_NODE: list[dict[str, Any]] = [
    {"handshake_timeout": 0},
    {"connect_timeout": -1.0},
    {"connect_timeout": NAN},
    {"direct_timeout": INF},
    {"backlog_wait": -0.1},
    {"max_half_open": 0},
    {"listener_backlog": 0},
    {"max_sessions": 0},
    {"max_forwards_per_peer": -1},
    {"max_forwarded_sessions": -1},
    {"max_forwarded_per_session": -1},
    {"replay_cache_size": -1},
    {"replay_window": -1.0},
    {"fd_reserve": -1},
    {"relay_backoff": (0.0, 1.0)},
    {"relay_backoff": (2.0, 1.0)},
    {"relay_backoff": (1.0,)},
    {"handshake_rate": (0.0, 10.0)},
    {"handshake_rate": (-5.0, 10.0)},
    {"refused_open_rate": (10.0, 0.0)},
    {"refused_open_rate": (NAN, 10.0)},
    {"accept_forwarded": "sometimes"},
    {"session": {"max_concurrent_opens": 0}},
]


@pytest.mark.parametrize("fields", BAD_MUX, ids=repr)
def test_a_mux_config_out_of_range_is_refused(fields: dict[str, Any]) -> None:
    with pytest.raises(LocalUsageError) as info:
        MuxConfig(**fields)
    assert next(iter(fields)) in str(info.value)  # the message names the field


@pytest.mark.parametrize("fields", BAD_SESSION, ids=repr)
def test_a_session_config_out_of_range_is_refused(fields: dict[str, Any]) -> None:
    with pytest.raises(LocalUsageError) as info:
        SessionConfig(**fields)
    assert any(name in str(info.value) for name in fields)


@pytest.mark.parametrize("fields", BAD_NODE, ids=repr)
def test_a_node_config_out_of_range_is_refused(fields: dict[str, Any]) -> None:
    with pytest.raises(LocalUsageError) as info:
        NodeConfig(**fields)
    assert any(name in str(info.value) for name in fields)


def test_the_keepalive_message_says_what_to_do() -> None:
    with pytest.raises(LocalUsageError, match="must be longer than keepalive_interval"):
        SessionConfig(keepalive_interval=30.0, keepalive_timeout=20.0)


def test_keepalive_off_does_not_check_its_timeout() -> None:
    for off in (0.0, INF):
        assert (
            SessionConfig(keepalive_interval=off, keepalive_timeout=1.0).keepalive_interval == off
        )


def test_the_documented_edge_values_are_accepted() -> None:
    SessionConfig(idle_timeout=0.0)
    SessionConfig(idle_timeout=INF, open_timeout=INF)
    NodeConfig(max_forwards_per_peer=0, replay_cache_size=0, backlog_wait=0.0, fd_reserve=0)
    MuxConfig(stream_window=2**31 - 1, session_window=2**31 - 1)


@pytest.mark.parametrize(
    ("config", "name", "value"),
    [
        (MuxConfig(), "stream_window", 2**20),
        (MuxConfig(), "half_stream_window", 1),
        (SessionConfig(), "max_concurrent_opens", 0),
        (SessionConfig(), "keepalive_timeout", 1.0),
        (NodeConfig(), "max_forwards_per_peer", 0),
        (NodeConfig(), "accept_forwarded", "any"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_a_field_cannot_be_assigned_after_construction(config: Any, name: str, value: Any) -> None:
    before = getattr(config, name)
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(config, name, value)
    assert getattr(config, name) == before


def test_derived_fields_are_computed_once_and_follow_replace() -> None:
    mux = MuxConfig(stream_window=2**20, session_window=2**22)
    assert (mux.half_stream_window, mux.half_session_window) == (2**19, 2**21)
    wider = dataclasses.replace(mux, stream_window=2**21)
    assert wider.half_stream_window == 2**20
    with pytest.raises(LocalUsageError):
        dataclasses.replace(mux, stream_window=0)  # replace validates again


def test_accept_forwarded_and_pairs_are_normalised() -> None:
    assert NodeConfig(accept_forwarded=True).accept_forwarded == "any"
    assert NodeConfig(accept_forwarded=False).accept_forwarded == "never"
    config = NodeConfig(relay_backoff=[1, 2], handshake_rate=[10, 20])  # type: ignore[arg-type]
    assert config.relay_backoff == (1.0, 2.0) and config.handshake_rate == (10.0, 20.0)


def test_configs_keep_their_old_import_paths() -> None:
    import capsock.core.mux
    import capsock.net.session
    import capsock.node

    assert capsock.MuxConfig is capsock.core.mux.MuxConfig is MuxConfig
    assert capsock.SessionConfig is capsock.net.session.SessionConfig is SessionConfig
    assert capsock.NodeConfig is capsock.node.NodeConfig is NodeConfig
