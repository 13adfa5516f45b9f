"""The multiplexer under load and abuse: many streams, stalled readers, dead peers."""

from __future__ import annotations

import gc
import hashlib
import os
import resource
import signal
import subprocess
import sys
import tracemalloc
from pathlib import Path

import anyio
import pytest

import capsock
from capsock import MuxConfig, NodeConfig, SessionConfig

from .helpers import echo, read_all

pytestmark = pytest.mark.anyio
ROOT = Path(__file__).resolve().parents[1]
MiB = 1 << 20


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


async def test_concurrent_connects_share_one_handshake() -> None:
    async with capsock.Node(listen=["tcp:127.0.0.1:0"]) as server, capsock.Node() as client:
        listener = await server.listen()
        streams: list[capsock.Stream] = []

        async def connect() -> None:
            streams.append(await client.connect(listener.uri))

        async with anyio.create_task_group() as tg:
            for _ in range(10):
                tg.start_soon(connect)
        assert server.stats()["inbound_connections"] == 1
        assert len(client.stats()["sessions"]) == 1
        for s in streams:
            await s.aclose()


@pytest.mark.slow
async def test_thousand_streams_each_moving_one_mib_each_way() -> None:
    cfg = NodeConfig(listener_backlog=1024)
    async with (
        capsock.Node(listen=["tcp:127.0.0.1:0"], config=cfg) as server,
        capsock.Node(config=cfg) as client,
        anyio.create_task_group() as tg,
    ):
        listener = await server.listen()
        tg.start_soon(listener.serve, echo)
        failures: list[str] = []

        async def one(i: int) -> None:
            payload = hashlib.sha256(i.to_bytes(4, "big")).digest() * (MiB // 32)
            stream = await client.connect(listener.uri)
            async with stream, anyio.create_task_group() as inner:

                async def send() -> None:
                    await stream.send(payload)
                    await stream.send_eof()

                inner.start_soon(send)
                got = await read_all(stream)
            if hashlib.sha256(got).digest() != hashlib.sha256(payload).digest():
                failures.append(f"stream {i}: {len(got)} bytes, hash mismatch")

        with anyio.fail_after(240):
            async with anyio.create_task_group() as streams:
                for i in range(1000):
                    streams.start_soon(one, i)
        assert failures == []
        assert server.stats()["streams_accepted"] == 1000
        assert server.stats()["inbound_connections"] == 1
        tg.cancel_scope.cancel()


async def test_reader_that_never_reads_blocks_the_writer_with_bounded_memory() -> None:
    mux = MuxConfig(stream_window=1 * MiB, session_window=4 * MiB)
    cfg = NodeConfig(session=SessionConfig(mux=mux))
    async with (
        capsock.Node(listen=["tcp:127.0.0.1:0"], config=cfg) as server,
        capsock.Node(config=cfg) as client,
    ):
        listener = await server.listen()
        stream = await client.connect(listener.uri)
        accepted = await listener.accept()  # ... and never read from
        chunk = os.urandom(MiB)
        sent = 0
        with anyio.move_on_after(1.0):
            while True:
                await stream.send(chunk)
                sent += len(chunk)
        assert sent <= 2 * MiB, "the writer was not blocked by the window"
        rss_before = rss_bytes()
        for _ in range(3):  # keep trying to push 3 x 64 MiB more: it must stay blocked
            with anyio.move_on_after(0.5):
                for _ in range(64):
                    await stream.send(chunk)
                    sent += len(chunk)
        assert sent <= 2 * MiB
        assert rss_bytes() - rss_before < 16 * MiB
        (server_session,) = server.stats()["sessions"].values()
        (client_session,) = client.stats()["sessions"].values()
        assert server_session["buffered_unread"] <= mux.stream_window
        assert accepted.buffered <= mux.stream_window
        assert client_session["queued_data"] <= mux.stream_window
        # Credit was spent by exactly the bytes sent, and none came back (nobody read):
        assert client_session["send_session_credit"] == mux.session_window - sent
        assert server_session["recv_session_window"] == mux.session_window - sent
        # Reading releases the writer, and every byte arrives.
        async with anyio.create_task_group() as tg:

            async def finish() -> None:
                await stream.send(b"end")
                await stream.send_eof()

            tg.start_soon(finish)
            total = len(await read_all(accepted))
        assert total == sent + 3


async def test_idle_streams_cost_little_memory() -> None:
    """10,000 idle streams on one session; the per-stream cost goes to docs/performance.md."""
    n = 10_000
    cfg = NodeConfig(listener_backlog=n + 1)
    async with (
        capsock.Node(listen=["tcp:127.0.0.1:0"], config=cfg) as server,
        capsock.Node(config=cfg) as client,
    ):
        listener = await server.listen()
        first = await client.connect(listener.uri)  # the session exists before we measure
        kept = [first, await listener.accept()]
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]

            async def opener(count: int) -> None:
                for _ in range(count):
                    kept.append(await client.connect(listener.uri))

            async with anyio.create_task_group() as tg:
                for _ in range(10):
                    tg.start_soon(opener, n // 10)
            for _ in range(n):
                kept.append(await listener.accept())
            gc.collect()
            after = tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()
        per_stream_both_ends = (after - before) / n
        print(f"\nidle stream memory: {per_stream_both_ends:.0f} B per stream (both ends)")
        assert per_stream_both_ends <= 2048
        (session,) = client.stats()["sessions"].values()
        assert session["streams"] == n + 1


async def test_idle_session_closes_after_idle_timeout() -> None:
    cfg = NodeConfig(session=SessionConfig(idle_timeout=0.3))
    async with (
        capsock.Node(listen=["tcp:127.0.0.1:0"]) as server,
        capsock.Node(config=cfg) as client,
    ):
        listener = await server.listen()
        stream = await client.connect(listener.uri)
        await (await listener.accept()).aclose()
        await stream.aclose()
        with anyio.fail_after(5):
            while client.stats()["sessions"]:
                await anyio.sleep(0.05)
        # A new connect simply dials again.
        stream = await client.connect(listener.uri)
        await stream.aclose()
        assert server.stats()["inbound_connections"] == 2


async def test_graceful_close_lets_open_streams_finish() -> None:
    async with capsock.Node(listen=["tcp:127.0.0.1:0"]) as server, capsock.Node() as client:
        listener = await server.listen()
        stream = await client.connect(listener.uri)
        accepted = await listener.accept()
        async with anyio.create_task_group() as tg:
            tg.start_soon(server.aclose, 5.0)
            await anyio.sleep(0.1)
            # New streams are refused while the old one still works.
            with pytest.raises(
                (capsock.ConnectionLost, capsock.CapabilityRejected, capsock.Unreachable)
            ):
                await client.connect(listener.uri)
            await stream.send(b"late but fine")
            await stream.send_eof()
            assert await read_all(accepted) == b"late but fine"
            await accepted.send(b"bye")
            await accepted.aclose()
            assert await read_all(stream) == b"bye"
            await stream.aclose()


def _start_peer() -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.peer_process", "serve"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    return proc, proc.stdout.readline().strip()


def _stop_peer(proc: subprocess.Popen[str]) -> None:
    proc.kill()
    proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


async def test_silent_peer_is_declared_dead_within_the_keepalive_timeout() -> None:
    proc, uri = await anyio.to_thread.run_sync(_start_peer)
    try:
        cfg = NodeConfig(session=SessionConfig(keepalive_interval=0.3, keepalive_timeout=1.0))
        async with capsock.Node(config=cfg) as node:
            streams = [await node.connect(uri) for _ in range(3)]
            for s in streams:
                await s.receive()
            proc.send_signal(signal.SIGSTOP)  # no FIN, no RST: just silence
            start = anyio.current_time()
            for s in streams:
                with anyio.fail_after(10), pytest.raises(capsock.ConnectionLost):
                    while True:
                        await s.receive()
            assert anyio.current_time() - start < 5
    finally:
        _stop_peer(proc)


async def test_a_stalled_peer_does_not_stall_other_sessions() -> None:
    proc = None
    async with (
        capsock.Node(listen=["tcp:127.0.0.1:0"]) as server,
        capsock.Node() as good,
        anyio.create_task_group() as tg,
    ):
        listener = await server.listen()

        async def flood_or_echo(stream: capsock.Stream) -> None:
            if stream.peer == good.id:
                await echo(stream)
            else:
                block = os.urandom(MiB)
                while True:
                    await stream.send(block)

        tg.start_soon(listener.serve, flood_or_echo)
        script = (
            "import sys, anyio, capsock\n"
            "async def main():\n"
            "    async with capsock.Node() as n:\n"
            "        s = await n.connect(sys.argv[1])\n"
            "        await s.send(b'x')\n"
            "        print('connected', flush=True)\n"
            "        await anyio.sleep(3600)\n"
            "anyio.run(main)\n"
        )
        proc = subprocess.Popen(
            [sys.executable, "-c", script, str(listener.uri)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert proc.stdout is not None
            await anyio.to_thread.run_sync(proc.stdout.readline)
            proc.send_signal(signal.SIGSTOP)  # its socket fills up; the server's writer blocks
            await anyio.sleep(0.5)
            for _ in range(20):
                with anyio.fail_after(5):
                    s = await good.connect(listener.uri)
                    await s.send(b"still responsive")
                    await s.send_eof()
                    assert await read_all(s) == b"still responsive"
                    await s.aclose()
        finally:
            _stop_peer(proc)
        tg.cancel_scope.cancel()
