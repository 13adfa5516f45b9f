"""Relays through real NAT: network namespaces, veth pairs and iptables MASQUERADE.

Node A sits behind NAT 1, node B behind NAT 2, the relay on the "internet". A
cannot be dialed (the harness proves it with plain sockets); through the relay
A and B still move 16 MiB each way, and an introduction across both NATs works.
Skips with the reason where namespaces cannot be built; fails instead in CI.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from . import netns

ROOT = Path(__file__).resolve().parents[1]
lab = netns.lab_fixture(scope="module")


def _start(lab: netns.NatLab, host: netns.Host, *args: str) -> subprocess.Popen[str]:
    return lab.popen(
        host,
        [sys.executable, "-m", "tests.nat_peer", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )


def _line(proc: subprocess.Popen[str]) -> dict[str, Any]:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line, f"process exited with {proc.poll()} before answering"
    return dict(json.loads(line))


@pytest.fixture(scope="module")
def relay_uri(lab: netns.NatLab, tmp_path_factory: pytest.TempPathFactory) -> str:
    state = tmp_path_factory.mktemp("relay")
    relay = lab.popen(
        "relay",
        [sys.executable, "-m", "capsock", "relay", "--listen",
         f"tcp:{lab.addr('relay')}:7000", "--state-dir", str(state)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    assert relay.stdout is not None
    uri = relay.stdout.readline().strip()
    assert uri.startswith("capsock://")
    return uri


def test_a_and_b_behind_two_nats_move_16_mib_each_way_through_the_relay(
    lab: netns.NatLab, relay_uri: str
) -> None:
    # A also advertises its private address: B must try it, fail, and fall back.
    server = _start(lab, "a", "serve", relay_uri, f"tcp:{lab.addr('a')}:7001")
    uri = _line(server)["uri"]
    assert "tcp=192.0.2.10:7001" in uri and "&v=" in uri  # the relay, compact (protocol 4.1)
    result = lab.run("b", [sys.executable, "-m", "tests.nat_peer", "fetch", uri, "16"], timeout=120)
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert answer["ok"] is True
    assert answer["bytes"] == 16 << 20
    assert answer["route"].startswith("via ")


def test_an_introduction_across_both_nats(lab: netns.NatLab, relay_uri: str) -> None:
    lobby = _start(lab, "relay", "introducer", f"tcp:{lab.addr('relay')}:7100")
    inbox = _line(lobby)["inbox"]
    server = _start(lab, "a", "serve", relay_uri)
    service = _line(server)["uri"]
    giver = _start(lab, "a", "give", inbox, service)
    assert _line(giver) == {"given": True}
    result = lab.run("b", [sys.executable, "-m", "tests.nat_peer", "ask", inbox, "1"], timeout=120)
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert answer["ok"] is True
    assert answer["route"].startswith("via ")
