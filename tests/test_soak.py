"""Opt-in soak: ``pytest -m soak`` (10 minutes; ``CAPSOCK_SOAK_SECONDS`` to change).

Mixed traffic through direct, forwarded (introduction) and relayed routes while
a chaos proxy in front of the direct route injects faults in bursts. Every
stream must deliver exactly or raise; afterwards RSS and open file descriptors
must be back near where they were after warm-up (no leak), and nothing hangs.
"""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import anyio
import pytest

import capsock
from capsock.testing import echo, read_to_eof

from .chaos import ChaosProxy, RelayProcess, free_port

pytestmark = [pytest.mark.soak, pytest.mark.anyio]
MiB = 1 << 20


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def _one(
    node: capsock.Node, cap: capsock.Capability, size: int, tally: dict[str, int]
) -> None:
    payload = os.urandom(size)
    try:
        with anyio.fail_after(30):
            stream = await node.connect(cap)
            async with stream, anyio.create_task_group() as tg:

                async def send() -> None:
                    try:
                        await stream.send(payload)
                        await stream.send_eof()
                    except anyio.BrokenResourceError:
                        pass

                tg.start_soon(send)
                got = await read_to_eof(stream)
    except (capsock.CapsockError, anyio.BrokenResourceError, TimeoutError, OSError):
        tally["errors"] += 1
        return
    if hashlib.sha256(got).digest() != hashlib.sha256(payload).digest():
        tally["corrupt"] += 1  # never allowed: a clean end with different data
    else:
        tally["ok"] += 1


@pytest.mark.timeout(0)
async def test_soak_mixed_routes_with_faults(tmp_path: Path) -> None:
    seconds = float(os.environ.get("CAPSOCK_SOAK_SECONDS", "600"))
    relay = await anyio.to_thread.run_sync(RelayProcess, tmp_path / "relay", free_port())
    rng = random.Random(1)
    tally = {"ok": 0, "errors": 0, "corrupt": 0}
    try:
        async with (
            capsock.Node(listen=["tcp:127.0.0.1:0"], relays=[relay.uri]) as server,
            capsock.Node(listen=["tcp:127.0.0.1:0"]) as introducer,
            capsock.Node() as client,
            anyio.create_task_group() as tg,
        ):
            service = await server.listen()
            tg.start_soon(service.serve, echo)
            hint = service.uri.hints[0]
            assert isinstance(hint, capsock.uri.TcpHint)
            async with ChaosProxy(hint.host, hint.port, seed=1) as proxy:
                direct = proxy.route(service.uri)
                relayed = service.uri.with_hints(service.uri.hints[1:])
                to_intro = await server.connect((await introducer.listen()).uri)
                hello = await client.connect((await introducer.listen()).uri)
                introduced = await introducer.introduce(
                    service.uri, to=client.id, ttl=seconds + 600
                )
                forwarded = introduced.with_hints(
                    tuple(h for h in introduced.hints if isinstance(h, capsock.uri.ViaHint))[:1]
                )
                routes = [direct, relayed, forwarded]

                async def round_(n: int) -> None:
                    async with anyio.create_task_group() as batch:
                        for i in range(n):
                            batch.start_soon(
                                _one, client, routes[i % 3], rng.choice([1, 64, 1024]) * 1024, tally
                            )

                await round_(30)  # warm-up
                rss0, fds0 = _rss(), _fds()
                end = anyio.current_time() + seconds
                faults = [
                    proxy.pass_,
                    lambda: proxy.corrupt(),
                    lambda: proxy.fragment(7),
                    lambda: proxy.drop(),
                ]
                while anyio.current_time() < end:
                    rng.choice(faults)()
                    await round_(12)
                    proxy.pass_()
                    await round_(12)
                await round_(30)
                await anyio.sleep(1)
                rss1, fds1 = _rss(), _fds()
                await hello.aclose()
                await to_intro.aclose()
            tg.cancel_scope.cancel()
    finally:
        relay.kill()
    print(f"\nsoak: {tally}, RSS {rss0 / MiB:.0f} -> {rss1 / MiB:.0f} MiB, fds {fds0} -> {fds1}")
    assert tally["corrupt"] == 0
    assert tally["ok"] > tally["errors"]
    assert rss1 - rss0 < 64 * MiB, "memory grew during the soak"
    assert fds1 - fds0 < 20, "file descriptors leaked during the soak"
