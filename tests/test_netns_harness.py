"""The network-namespace NAT lab (tests/netns.py) really builds the NAT topology.

Plain sockets only: python one-liners run inside the namespaces, plus listening sockets
made in this process inside a namespace. Skips where the lab cannot run, fails in CI.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest

from . import netns

lab = netns.lab_fixture(scope="module")

# argv: addr port timeout label -> prints "ok" or "<ErrorName> <errno>" (and exits 1)
CONNECT = """
import socket, sys
addr, port, timeout, label = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
try:
    s = socket.create_connection((addr, port), timeout=timeout)
except OSError as e:
    print(type(e).__name__, e.errno)
    sys.exit(1)
s.sendall(label.encode())
s.close()
print("ok")
"""

# argv: addr -> listens on addr:0, prints the port, accepts one connection,
# prints "<peer ip> <data>"
SERVE_ONE = """
import socket, sys
srv = socket.create_server((sys.argv[1], 0))
print(srv.getsockname()[1], flush=True)
srv.settimeout(10)
conn, peer = srv.accept()
conn.settimeout(5)
data = b""
while chunk := conn.recv(100):
    data += chunk
print(peer[0], data.decode(), flush=True)
"""


def dial(lab: netns.NatLab, host: netns.Host, addr: str, port: int, timeout: float = 1.0) -> str:
    proc = lab.python(host, CONNECT, addr, str(port), str(timeout), host, check=False)
    return proc.stdout.strip() or proc.stderr.strip()


@pytest.fixture
def listener(lab: netns.NatLab, request: pytest.FixtureRequest) -> Iterator[tuple[netns.Host, int]]:
    """A TCP listener (never accepted from) on the private host given by parametrize."""
    host: netns.Host = request.param
    sock = lab.socket(host)
    try:
        sock.bind((lab.addr(host), 0))
        sock.listen()
        yield host, sock.getsockname()[1]
    finally:
        sock.close()


# -- the topology --------------------------------------------------------------------


@pytest.mark.parametrize("host", ["a", "b"])
def test_private_host_reaches_relay_through_masquerade(lab: netns.NatLab, host: netns.Host) -> None:
    server = lab.popen(
        "relay",
        [sys.executable, "-c", SERVE_ONE, lab.addr("relay")],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert server.stdout is not None
    port = int(server.stdout.readline())
    assert dial(lab, host, lab.addr("relay"), port) == "ok"
    out, _ = server.communicate(timeout=10)
    peer, label = out.split()
    assert label == host
    # The relay sees the router's public address, never the private one.
    assert peer == lab.public_addr(host) == lab.addr(lab.router(host) or host)
    assert peer != lab.addr(host)


@pytest.mark.parametrize("listener", ["a", "b"], indirect=True)
def test_relay_cannot_dial_in(lab: netns.NatLab, listener: tuple[netns.Host, int]) -> None:
    host, port = listener
    router = lab.router(host)
    assert router is not None
    # The listener is real: the host itself can connect to it.
    assert dial(lab, host, lab.addr(host), port) == "ok"
    # No route from the internet to a private LAN.
    assert dial(lab, "relay", lab.addr(host), port).startswith("OSError")
    # The router's public address has no port forwarding: the router itself refuses.
    assert dial(lab, "relay", lab.addr(router), port).startswith("ConnectionRefusedError")


@pytest.mark.parametrize("listener", ["a"], indirect=True)
def test_router_drops_new_inbound_even_when_routed(
    lab: netns.NatLab, listener: tuple[netns.Host, int]
) -> None:
    """Even a public host that routes the private LAN via the router gets nothing through."""
    _, port = listener
    route = ["ip", "route", "add", "192.0.2.0/25", "via", lab.addr("nat1")]
    lab.run("relay", route)
    try:
        assert dial(lab, "relay", lab.addr("a"), port, timeout=0.5) == "TimeoutError None"
    finally:
        lab.run("relay", ["ip", "route", "del", "192.0.2.0/25"])


@pytest.mark.parametrize("listener", ["b"], indirect=True)
def test_private_hosts_cannot_reach_each_other(
    lab: netns.NatLab, listener: tuple[netns.Host, int]
) -> None:
    _, port = listener
    assert dial(lab, "b", lab.addr("b"), port) == "ok"
    # b's private address is not routable from a's side.
    assert dial(lab, "a", lab.addr("b"), port).startswith("OSError")
    # b's router's public address: no port forwarding, refused by the router itself.
    assert dial(lab, "a", lab.public_addr("b"), port).startswith("ConnectionRefusedError")


def test_addresses_are_documentation_ranges(lab: netns.NatLab) -> None:
    doc = ("192.0.2.", "198.51.100.", "203.0.113.")
    for host in netns.HOSTS:
        out = lab.run(host, ["ip", "-4", "-o", "addr", "show", "scope", "global"]).stdout
        addrs = [line.split()[3].split("/")[0] for line in out.splitlines()]
        assert addrs, host
        assert lab.addr(host) in addrs
        assert all(a.startswith(doc) for a in addrs), (host, addrs)


@pytest.mark.anyio
async def test_async_process_in_namespace(lab: netns.NatLab) -> None:
    result = await lab.arun("b", ["ip", "-4", "-o", "addr", "show", "dev", "eth0"])
    assert lab.addr("b") in result.stdout.decode()
    async with await lab.open_process("a", [sys.executable, "-c", "print('hi')"]) as proc:
        assert proc.stdout is not None
        assert (await proc.stdout.receive()).strip() == b"hi"
        assert await proc.wait() == 0


# -- lifecycle -----------------------------------------------------------------------


def _netns_names() -> set[str]:
    return set(os.listdir(netns.NETNS_DIR)) if netns.NETNS_DIR.is_dir() else set()


def test_close_kills_processes_and_deletes_namespaces() -> None:
    netns.require()
    with netns.NatLab() as own:
        names = {own.ns(h) for h in netns.HOSTS}
        assert names <= _netns_names()
        tracked = own.popen("a", ["sleep", "60"])
        # Not tracked by the lab (started by a shell in the namespace): killed all the same.
        own.run("b", ["sh", "-c", "sleep 60 >/dev/null 2>&1 &"])
    assert tracked.returncode is not None
    assert not names & _netns_names()


def test_failed_setup_cleans_up(monkeypatch: pytest.MonkeyPatch) -> None:
    netns.require()
    tags: list[str] = []

    def broken_build(self: netns.NatLab) -> None:
        tags.append(self.tag)
        real_build(self)
        raise netns.LabError("boom")

    real_build = netns.NatLab._build
    monkeypatch.setattr(netns.NatLab, "_build", broken_build)
    with pytest.raises(netns.LabError, match="boom"), netns.NatLab():
        pass
    assert not any(n.startswith(tags[0]) for n in _netns_names())


def test_cleanup_stale_removes_only_dead_owners() -> None:
    netns.require()
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = f"{netns.PREFIX}{dead.pid}-{os.urandom(3).hex()}-x"
    live = f"{netns.PREFIX}{os.getpid()}-{os.urandom(3).hex()}-x"
    for name in (stale, live):
        subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        removed = netns.cleanup_stale()
        assert stale in removed
        assert live not in removed
        assert live in _netns_names()
    finally:
        for name in (stale, live):
            subprocess.run(["ip", "netns", "delete", name], capture_output=True, check=False)


# -- skip or fail (runs everywhere) --------------------------------------------------


@pytest.mark.parametrize(
    ("env", "required"),
    [
        ({}, False),
        ({"CI": "true"}, True),
        ({"CI": "1"}, True),
        ({"CI": "false"}, False),
        ({"CI": ""}, False),
        ({"CAPSOCK_REQUIRE_NETNS": "1"}, True),
        ({"CAPSOCK_REQUIRE_NETNS": "0"}, False),
    ],
)
def test_required_in_ci(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], required: bool
) -> None:
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("CAPSOCK_REQUIRE_NETNS", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert netns.netns_required() is required


def test_unavailable_skips_locally_and_fails_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(netns, "_probe", lambda: ("no netns here", ""))
    assert netns.available() == "no netns here"
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("CAPSOCK_REQUIRE_NETNS", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no netns here"):
        netns.require()
    monkeypatch.setenv("CAPSOCK_REQUIRE_NETNS", "1")
    with pytest.raises(pytest.fail.Exception, match="no netns here"):
        netns.require()


def test_socket_helper_stays_in_namespace(lab: netns.NatLab) -> None:
    sock = lab.socket("relay", socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        sock.bind((lab.addr("relay"), 0))  # only bindable inside the relay namespace
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as outside, pytest.raises(OSError):
        outside.bind((lab.addr("relay"), 0))
