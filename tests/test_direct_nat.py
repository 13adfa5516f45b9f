"""Direct paths through real NAT: nodes in network namespaces (the tests/netns.py lab).

A node A behind NAT 1 reaches B behind NAT 2 through a relay on the "internet";
the routers drop unsolicited inbound on INPUT and FORWARD, as home routers do.
Each node is its own process in its namespace (tests/direct_peer.py), with default
settings: direct paths on.

- easy NATs on both sides (MASQUERADE keeps ports): the punch succeeds, and a
  stream opened after it goes direct -- the relay's own byte counter does not grow
  with that stream's payload;
- a port-randomising NAT (``MASQUERADE --random-fully``) on one or both sides: the
  session stays relayed, the transfer started at once completes intact, and the
  failed punch is in the stats.

On both backends.  Skips without root; fails instead in CI (CAPSOCK_REQUIRE_NETNS=1).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from . import netns

ROOT = Path(__file__).resolve().parents[1]
MIB = 4
BACKENDS = ["asyncio", "trio"]


@pytest.fixture(scope="module")
def lab() -> Iterator[netns.NatLab]:
    with netns.open_lab() as lab:
        ipt = netns._probe()[1] or "iptables"
        for router in ("nat1", "nat2"):
            est = ["-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT"]
            lab.run(router, [ipt, "-w", "-A", "INPUT", "-i", "wan", *est])
            lab.run(router, [ipt, "-w", "-A", "INPUT", "-i", "wan", "-j", "DROP"])
        yield lab


@contextlib.contextmanager
def _hard(lab: netns.NatLab, routers: tuple[str, ...]) -> Iterator[None]:
    """Port-randomising NAT on ``routers`` while the block runs (new connections only)."""
    ipt = netns._probe()[1] or "iptables"
    rule = ["POSTROUTING", "-o", "wan", "-j", "MASQUERADE", "--random-fully"]
    for router in routers:
        lab.run(router, [ipt, "-w", "-t", "nat", "-I", *rule[:1], "1", *rule[1:]])
    try:
        yield
    finally:
        for router in routers:
            lab.run(router, [ipt, "-w", "-t", "nat", "-D", *rule])


def _start(lab: netns.NatLab, host: netns.Host, *args: str) -> subprocess.Popen[str]:
    return lab.popen(
        host,
        [sys.executable, "-m", "tests.direct_peer", *args],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def _line(proc: subprocess.Popen[str]) -> dict[str, Any]:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line, f"process exited with {proc.poll()} before answering"
    return dict(json.loads(line))


def _tell(proc: subprocess.Popen[str], text: str) -> None:
    assert proc.stdin is not None
    proc.stdin.write(text + "\n")
    proc.stdin.flush()


def _run(lab: netns.NatLab, backend: str) -> tuple[list[dict[str, Any]], list[int]]:
    """relay, serve (b), fetch (a): the fetch's answers, and the relay's counter before/after."""
    relay = _start(lab, "relay", "relay", backend, f"tcp:{lab.addr('relay')}:0")
    relay_uri = _line(relay)["uri"]
    server = _start(lab, "b", "serve", backend, relay_uri)
    uri = _line(server)["uri"]
    fetch = _start(lab, "a", "fetch", backend, uri, str(MIB))
    first, punch = _line(fetch), _line(fetch)
    _tell(relay, "bytes")
    before = _line(relay)["bytes"]
    _tell(fetch, "go")
    second = _line(fetch)
    _tell(relay, "bytes")
    after = _line(relay)["bytes"]
    for proc in (fetch, server, relay):
        proc.kill()
        proc.wait()
    return [first, punch, second], [before, after]


@pytest.mark.parametrize("backend", BACKENDS)
def test_easy_nats_on_both_sides_go_direct(lab: netns.NatLab, backend: str) -> None:
    (first, punch, second), (before, after) = _run(lab, backend)
    assert first["ok"] is True and first["bytes"] == MIB << 20
    assert first["route"].startswith("via ")  # connect() never waited for the punch
    assert punch == {"punch_attempts": 1, "punch_successes": 1, "punch_failures": 0}
    assert second["ok"] is True and second["bytes"] == MIB << 20
    route = second["route"]  # B's NAT mapping, not the relay: the path is direct
    assert route.startswith(f"direct tcp:{lab.public_addr('b')}:") and route.endswith("(punched)")
    # The new stream's 2 x 4 MiB did not cross the relay (keepalives at most).
    assert after - before < 64 << 10


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("hard", [("nat2",), ("nat1", "nat2")], ids=["one-hard", "both-hard"])
def test_port_randomising_nats_stay_relayed_and_cost_nothing(
    lab: netns.NatLab, backend: str, hard: tuple[str, ...]
) -> None:
    with _hard(lab, hard):
        (first, punch, second), (before, after) = _run(lab, backend)
    assert first["ok"] is True and first["bytes"] == MIB << 20
    assert first["route"].startswith("via ")
    assert punch["punch_failures"] == 1 and punch["punch_successes"] == 0
    assert second["ok"] is True and second["bytes"] == MIB << 20
    assert second["route"].startswith("via ")  # still relayed, still working
    assert after - before >= 2 * (MIB << 20)
