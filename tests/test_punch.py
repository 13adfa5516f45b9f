"""capsock.net.punch on loopback: shared-port sockets, first-connection-wins, no descriptor leak.

TCP simultaneous open through two NATs is in tests/test_punch_nat.py (network namespaces).
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Iterator

import anyio
import anyio.abc
import pytest
from anyio.abc import SocketAttribute

from capsock.net import punch

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


class _BlackHole:
    """A loopback port whose SYNs are dropped: a listener with a full accept queue.

    Deterministic, unlike an unrouted address (this machine may have a default route
    that answers anything).  Linux drops a SYN while the accept queue is full.
    """

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(0)
        self.addr: tuple[str, int] = self.listener.getsockname()
        self.filler = socket.create_connection(self.addr, timeout=5)

    def close(self) -> None:
        self.filler.close()
        self.listener.close()


@contextlib.contextmanager
def _blackhole() -> Iterator[int]:
    """A loopback port whose accept queue is full: SYNs to it are dropped, dials hang."""
    listener = socket.socket()
    fillers: list[socket.socket] = []
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = int(listener.getsockname()[1])
        for _ in range(4):
            filler = socket.socket()
            fillers.append(filler)
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
        time.sleep(0.1)
        yield port
    finally:
        for sock in (*fillers, listener):
            sock.close()


async def test_cancel_mid_punch_leaks_nothing() -> None:
    with _blackhole() as port:
        before = _fds()
        got: anyio.abc.SocketStream | None = None
        with anyio.move_on_after(0.5) as scope:
            got = await punch.simultaneous_open(
                0, [("127.0.0.1", port)] * 2 + [("127.0.0.2", port)], local_host="127.0.0.1"
            )
        assert got is None and scope.cancelled_caught  # the dials hung and were cancelled
        with anyio.move_on_after(0.1):
            await punch.simultaneous_open(0, [("127.0.0.1", port)], at=anyio.current_time() + 10)
        assert _fds() == before


async def test_timed_out_attempts_leak_nothing() -> None:
    with _blackhole() as port:
        before = _fds()
        with pytest.raises(punch.PunchFailed) as info:
            await punch.simultaneous_open(0, [("127.0.0.1", port)], attempts=2, attempt_timeout=0.3)
        assert info.value.errors == {("127.0.0.1", port): "timed out"}
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


async def test_candidates_must_be_ip_literals() -> None:
    """A host name would mean a blocking DNS lookup on the event loop."""
    with pytest.raises(ValueError, match="not an IP address"):
        await punch.simultaneous_open(40000, [("localhost", 9)], attempts=1)
