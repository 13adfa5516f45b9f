"""capsock.punch on loopback: shared-port sockets, first-connection-wins, no descriptor leak.

TCP simultaneous open through two NATs is in tests/test_punch_nat.py (network namespaces).
"""

from __future__ import annotations

import os
import socket

import anyio
import anyio.abc
import pytest
from anyio.abc import SocketAttribute

from capsock import punch

pytestmark = pytest.mark.anyio


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_listener_and_dials_share_one_local_port() -> None:
    local = await punch.shared_listener(0, local_host="127.0.0.1")
    remote = await punch.shared_listener(0, local_host="127.0.0.1")
    async with local, remote:
        port = local.extra(SocketAttribute.local_port)
        rport = remote.extra(SocketAttribute.local_port)
        # Two outbound connections from the listener's own port, to one remote listener
        # (distinct 4-tuples need distinct remote ports: one to `remote`, one to `local` itself
        # is not allowed, so dial `remote` and a second listener).
        other = await punch.shared_listener(0, local_host="127.0.0.1")
        async with other:
            oport = other.extra(SocketAttribute.local_port)
            s1 = await punch.dial_from(port, "127.0.0.1", rport, local_host="127.0.0.1")
            s2 = await punch.dial_from(port, "127.0.0.1", oport, local_host="127.0.0.1")
            async with s1, s2:
                assert s1.extra(SocketAttribute.local_port) == port
                assert s2.extra(SocketAttribute.local_port) == port
                async with await remote.accept() as peer:
                    assert peer.extra(SocketAttribute.remote_port) == port
                    await s1.send(b"ping")
                    assert await peer.receive() == b"ping"
                    await peer.send(b"pong")
                    assert await s1.receive() == b"pong"


async def test_simultaneous_open_returns_the_candidate_that_answers() -> None:
    remote = await punch.shared_listener(0, local_host="127.0.0.1")
    async with remote:
        rport = remote.extra(SocketAttribute.local_port)
        local = await punch.shared_listener(0, local_host="127.0.0.1")
        async with local:
            port = local.extra(SocketAttribute.local_port)
            cands = [("127.0.0.1", _closed_port()), ("127.0.0.1", rport)]
            stream = await punch.simultaneous_open(port, cands, attempts=1, local_host="127.0.0.1")
            async with stream, await remote.accept() as peer:
                assert stream.extra(SocketAttribute.remote_port) == rport
                await peer.send(b"x" * 1000)
                got = b""
                while len(got) < 1000:
                    got += await stream.receive()
                assert got == b"x" * 1000


async def test_failed_punch_is_typed_bounded_and_leaks_nothing() -> None:
    port = _closed_port()
    cands = [("127.0.0.1", _closed_port()), ("127.0.0.1", _closed_port())]
    before = _fds()
    with pytest.raises(punch.PunchFailed) as info:
        await punch.simultaneous_open(
            port, cands, attempts=3, attempt_timeout=0.2, local_host="127.0.0.1"
        )
    assert info.value.attempts == 3
    assert set(info.value.errors) == set(cands)
    assert "relay" in str(info.value)
    assert _fds() == before


async def test_two_winners_keep_exactly_one_and_close_the_other() -> None:
    a = await punch.shared_listener(0, local_host="127.0.0.1")
    b = await punch.shared_listener(0, local_host="127.0.0.1")
    async with a, b:
        before = _fds()
        cands = [
            ("127.0.0.1", a.extra(SocketAttribute.local_port)),
            ("127.0.0.1", b.extra(SocketAttribute.local_port)),
        ]
        stream = await punch.simultaneous_open(_closed_port(), cands, local_host="127.0.0.1")
        await stream.aclose()
        # Whatever reached the listeners' queues is theirs; on our side nothing stays open.
        accepted: list[anyio.abc.SocketStream] = []
        with anyio.move_on_after(0.5):
            for lst in (a, b):
                accepted.append(await lst.accept())
        for s in accepted:
            await s.aclose()
        assert _fds() == before


async def test_cancel_mid_punch_leaks_nothing() -> None:
    before = _fds()
    # 203.0.113.x (TEST-NET-3) never answers: the dial hangs or fails at once; either way
    # cancelling it, and cancelling while waiting for `at`, closes every socket.
    with anyio.move_on_after(0.3):
        await punch.simultaneous_open(0, [("203.0.113.1", 9), ("203.0.113.2", 9)], attempts=3)
    with anyio.move_on_after(0.1):
        await punch.simultaneous_open(0, [("127.0.0.1", 9)], at=anyio.current_time() + 10)
    assert _fds() == before


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [
        ((0, []), {}),
        ((0, [("127.0.0.1", 0)]), {}),
        ((70000, [("127.0.0.1", 1)]), {}),
        ((0, [("127.0.0.1", 1)]), {"attempts": 0}),
        ((0, [("127.0.0.1", 1)]), {"attempt_timeout": float("nan")}),
    ],
)
async def test_bad_arguments_are_value_errors(
    args: tuple[int, list[tuple[str, int]]], kwargs: dict[str, float]
) -> None:
    with pytest.raises(ValueError):
        await punch.simultaneous_open(*args, **kwargs)  # type: ignore[arg-type]
