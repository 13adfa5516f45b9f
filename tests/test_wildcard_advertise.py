"""Wildcard binds (0.0.0.0, ::) put the machine's usable addresses into URIs.

Unit tests of the selection rules (capsock.net._interfaces, pure), then a node on
loopback, then network namespaces: a host with two links (a dialer on each
side, each able to reach only its own side), an interface without carrier,
link-local IPv6 addresses and a default route, and a namespace with nothing
but loopback.  The namespace tests skip where namespaces cannot be built
(not root, no ``ip``) and fail instead in CI or with CAPSOCK_REQUIRE_NETNS=1.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

import capsock
from capsock import CapsockAttribute
from capsock.net import _interfaces as interfaces
from capsock.net._interfaces import InterfaceAddress, select_addresses
from capsock.uri import TcpHint

from . import netns
from .helpers import echo

ROOT = Path(__file__).resolve().parents[1]
V4, V6 = socket.AF_INET, socket.AF_INET6


def ia(text: str, index: int = 2, name: str = "eth0") -> InterfaceAddress:
    return InterfaceAddress(ipaddress.ip_address(text), name, index)


def texts(addresses: list[Any]) -> list[str]:
    return [str(a) for a in addresses]


# ----------------------------------------------------------- the rules (pure)


def test_link_local_unspecified_multicast_and_mapped_are_never_advertised() -> None:
    cands = [
        ia("169.254.1.1"),
        ia("fe80::1"),
        ia("0.0.0.0"),
        ia("224.0.0.1"),
        ia("ff02::1"),
        ia("::ffff:192.0.2.1"),
        ia("192.0.2.1"),
    ]
    assert texts(select_addresses(cands, {V4, V6})) == ["192.0.2.1"]


def test_loopback_only_when_nothing_else_exists() -> None:
    lo = [ia("127.0.0.1", 1, "lo"), ia("::1", 1, "lo")]
    assert texts(select_addresses(lo, {V4, V6})) == ["127.0.0.1", "::1"]
    assert texts(select_addresses(lo, {V4})) == ["127.0.0.1"]
    assert texts(select_addresses([*lo, ia("198.51.100.1")], {V4, V6})) == ["198.51.100.1"]
    # Only link-local besides loopback: loopback it is.
    assert texts(select_addresses([*lo, ia("fe80::2")], {V6})) == ["::1"]


def test_only_the_families_the_socket_accepts() -> None:
    cands = [ia("192.0.2.1"), ia("2001:db8::1")]
    assert texts(select_addresses(cands, {V4})) == ["192.0.2.1"]
    assert texts(select_addresses(cands, {V6})) == ["2001:db8::1"]
    assert texts(select_addresses(cands, set())) == []


def test_order_default_route_then_global_then_the_rest_ipv4_first_then_interface() -> None:
    cands = [
        ia("10.0.0.5", 2),
        ia("fd00::5", 2),
        ia("2a00:1450::5", 3),  # global IPv6
        ia("8.8.4.4", 5),  # global IPv4
        ia("192.168.1.5", 1),
        ia("100.64.0.5", 4),  # shared (CGNAT): not global
    ]
    got = select_addresses(cands, {V4, V6}, preferred=[ipaddress.ip_address("10.0.0.5")], limit=10)
    assert texts(got) == [
        "10.0.0.5",  # the default route's source, first
        "8.8.4.4",  # then global: IPv4 before IPv6
        "2a00:1450::5",
        "192.168.1.5",  # then the rest: IPv4 by interface index, then IPv6
        "100.64.0.5",
        "fd00::5",
    ]


def test_at_most_four_and_both_families_keep_a_place() -> None:
    many4 = [ia(f"192.0.2.{i}", i) for i in range(1, 9)]
    assert interfaces.MAX_ADVERTISED == 4
    assert texts(select_addresses(many4, {V4})) == [f"192.0.2.{i}" for i in range(1, 5)]
    got = texts(select_addresses([*many4, ia("2001:db8::9", 9)], {V4, V6}))
    assert got == ["192.0.2.1", "192.0.2.2", "192.0.2.3", "2001:db8::9"]
    assert texts(select_addresses(many4, {V4}, limit=1)) == ["192.0.2.1"]


def test_duplicates_collapse_to_the_first() -> None:
    cands = [ia("192.0.2.1", 3), ia("192.0.2.1", 1), ia("198.51.100.1", 2)]
    assert texts(select_addresses(cands, {V4})) == ["198.51.100.1", "192.0.2.1"]


def test_bound_families_reads_the_sockets() -> None:
    with socket.socket(V4) as s4:
        assert interfaces.bound_families([s4]) == {V4}
    if not socket.has_ipv6:
        pytest.skip("no IPv6 sockets here")
    try:
        s6 = socket.socket(V6)
    except OSError as exc:
        pytest.skip(f"no IPv6 sockets here: {exc}")
    with s6:
        s6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        assert interfaces.bound_families([s6]) == {V6}
        s6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        assert interfaces.bound_families([s6]) == {V4, V6}


def test_proc_if_inet6_unfit_addresses_are_left_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = tmp_path / "if_inet6"
    fake.write_text(
        "20010db8000000000000000000000001 02 40 00 80     eth0\n"  # permanent: kept
        "20010db8000000000000000000000002 02 40 00 01     eth0\n"  # temporary
        "20010db8000000000000000000000003 02 40 00 08     eth0\n"  # dad failed
        "20010db8000000000000000000000004 02 40 00 20     eth0\n"  # deprecated
        "20010db8000000000000000000000005 02 40 00 40     eth0\n"  # tentative
        "20010db8000000000000000000000006 03 40 00 00     eth1\n"  # dynamic: kept
        "garbage\n"
    )
    monkeypatch.setattr(interfaces, "_IF_INET6", fake)
    got = interfaces._ipv6_linux()
    assert [(n, i, str(a)) for n, i, a in got] == [
        ("eth0", 2, "2001:db8::1"),
        ("eth1", 3, "2001:db8::6"),
    ]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SIOCGIFCONF is read on Linux")
def test_this_machines_addresses_are_read() -> None:
    found = interfaces.interface_addresses()
    # Whatever the machine has, each address is one the kernel reports for a
    # named interface; loopback is up wherever these tests run on loopback.
    assert all(a.interface for a in found)
    assert ipaddress.ip_address("127.0.0.1") in {a.address for a in found}
    with socket.create_server(("0.0.0.0", 0)) as srv:
        hosts = interfaces.advertised_hosts([srv])
    assert 1 <= len(hosts) <= interfaces.MAX_ADVERTISED
    assert all(ipaddress.ip_address(h).version == 4 for h in hosts)


# ------------------------------------------------------------------ a node


@pytest.mark.anyio
async def test_a_wildcard_node_advertises_its_addresses_with_the_bound_port() -> None:
    async with (
        capsock.Node(listen=["tcp:0.0.0.0:0"]) as server,
        capsock.Node() as dialer,
        anyio.create_task_group() as tg,
    ):
        service = await server.listen()
        hints = service.uri.hints
        assert hints and all(isinstance(h, TcpHint) for h in hints)
        ports = {h.port for h in hints if isinstance(h, TcpHint)}
        assert len(ports) == 1 and 0 not in ports
        tg.start_soon(service.serve, echo)
        stream = await dialer.connect(str(service.uri))
        await stream.send(b"wildcard")
        assert await stream.receive() == b"wildcard"
        assert stream.extra(CapsockAttribute.route) == str(hints[0])
        await stream.aclose()
        tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_advertise_still_overrides_a_wildcard_bind() -> None:
    node = capsock.Node(listen=["tcp:0.0.0.0:0"], advertise=["tcp:203.0.113.7:4000"])
    async with node:
        service = await node.listen()
        assert service.uri.hints == (TcpHint("203.0.113.7", 4000),)


# ------------------------------------------------------------ network namespaces

SERVE = """
import json, sys, anyio, capsock
from capsock.testing import echo
async def main(listen):
    async with capsock.Node(listen=[listen]) as node:
        service = await node.listen()
        print(json.dumps({"uri": str(service.uri)}), flush=True)
        await service.serve(echo)
anyio.run(main, sys.argv[1])
"""

LONELY = """
import json, logging, anyio, capsock
records = []
class Keep(logging.Handler):
    def emit(self, record):
        records.append(record.getMessage())
logging.getLogger("capsock").addHandler(Keep())
async def main():
    async with capsock.Node(listen=["tcp:0.0.0.0:0"]) as node:
        service = await node.listen()
        print(json.dumps({"hints": [str(h) for h in service.uri.hints], "log": records}))
anyio.run(main)
"""


class TwoLinks:
    """``host`` with a link to ``left`` and one to ``right``, plus ``lonely`` (loopback only).

    host  hl 198.51.100.1/24 2001:db8:1::1/64  <->  left  198.51.100.2  2001:db8:1::2
          hr 203.0.113.1/24 2001:db8:2::1/64  <->  right 203.0.113.2   2001:db8:2::2
          nc 192.0.2.77/32, up but without carrier (its veth peer is down)
          default routes via right; left and right have no route to each other's side.
    """

    def __init__(self) -> None:
        self.tag = f"{netns.PREFIX}{os.getpid()}-{secrets.token_hex(3)}"
        self.ip = netns._tool("ip")
        self.created: list[str] = []
        self.procs: list[subprocess.Popen[str]] = []

    def ns(self, name: str) -> str:
        return f"{self.tag}-{name}"

    def _ipn(self, name: str, command: str) -> None:
        netns._cmd([self.ip, "-n", self.ns(name), *command.split()])

    def start(self) -> None:
        for name in ("host", "left", "right", "lonely"):
            netns._cmd([self.ip, "netns", "add", self.ns(name)])
            self.created.append(self.ns(name))
            self._ipn(name, "link set lo up")
        for link, side, v4, v6 in (
            ("hl", "left", "198.51.100", "2001:db8:1::"),
            ("hr", "right", "203.0.113", "2001:db8:2::"),
        ):
            self._ipn("host", f"link add {link} type veth peer name eth0 netns {self.ns(side)}")
            self._ipn("host", f"addr add {v4}.1/24 dev {link}")
            self._ipn("host", f"addr add {v6}1/64 dev {link} nodad")
            self._ipn("host", f"link set {link} up")
            self._ipn(side, f"addr add {v4}.2/24 dev eth0")
            self._ipn(side, f"addr add {v6}2/64 dev eth0 nodad")
            self._ipn(side, "link set eth0 up")
        self._ipn("host", "route add default via 203.0.113.2")
        self._ipn("host", "-6 route add default via 2001:db8:2::2")
        self._ipn("host", "link add nc type veth peer name nc-peer")
        self._ipn("host", "addr add 192.0.2.77/32 dev nc")
        self._ipn("host", "link set nc up")  # nc-peer stays down: no carrier on nc

    def close(self) -> None:
        for proc in self.procs:
            netns._stop(proc)
        for name in reversed(self.created):
            netns._delete_netns(self.ip, name)

    def argv(self, name: str, argv: list[str]) -> list[str]:
        return [self.ip, "netns", "exec", self.ns(name), *argv]

    def popen(self, name: str, argv: list[str], **kwargs: Any) -> subprocess.Popen[str]:
        proc: subprocess.Popen[str] = subprocess.Popen(
            self.argv(name, argv), cwd=ROOT, text=True, **kwargs
        )
        self.procs.append(proc)
        return proc

    def run(self, name: str, argv: list[str], timeout: float = 60) -> dict[str, Any]:
        proc = subprocess.run(
            self.argv(name, argv), cwd=ROOT, capture_output=True, text=True, timeout=timeout
        )
        assert proc.returncode == 0, f"in {name}: {proc.stderr.strip()}"
        return dict(json.loads(proc.stdout.strip().splitlines()[-1]))

    def serve(self, listen: str) -> str:
        proc = self.popen("host", [sys.executable, "-c", SERVE, listen], stdout=subprocess.PIPE)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, f"the server exited with {proc.poll()}"
        return str(json.loads(line)["uri"])

    def fetch(self, side: str, uri: str) -> dict[str, Any]:
        return self.run(side, [sys.executable, "-m", "tests.nat_peer", "fetch", uri, "1"])


@pytest.fixture(scope="module")
def links() -> Iterator[TwoLinks]:
    # No NAT here, so no iptables: only Linux, root and `ip` (else skip; fail in CI).
    reason = None
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        reason = "network-namespace tests need Linux and root"
    elif netns._which("ip") is None:
        reason = "`ip` (iproute2) not found; run scripts/install-test-deps as root"
    if reason is not None:
        if netns.netns_required():
            pytest.fail(f"network-namespace tests are required here but: {reason}", pytrace=False)
        pytest.skip(reason)
    netns.cleanup_stale()
    topo = TwoLinks()
    try:
        topo.start()
    except netns.LabError as exc:
        topo.close()
        if netns.netns_required():
            pytest.fail(f"cannot build the namespaces: {exc}", pytrace=False)
        pytest.skip(f"cannot build the namespaces: {exc}")
    try:
        yield topo
    finally:
        topo.close()


def tcp_hints(uri: str) -> list[TcpHint]:
    return [h for h in capsock.Capability.parse(uri).hints if isinstance(h, TcpHint)]


def test_ipv4_wildcard_reaches_a_dialer_on_each_side(links: TwoLinks) -> None:
    uri = links.serve("tcp:0.0.0.0:0")
    hints = tcp_hints(uri)
    port = hints[0].port
    # The default route's source first; no loopback, no interface without
    # carrier, no IPv6 (the socket is IPv4), the real port everywhere.
    assert hints == [TcpHint("203.0.113.1", port), TcpHint("198.51.100.1", port)]
    assert port != 0
    left = links.fetch("left", uri)  # the first hint is unreachable from here
    right = links.fetch("right", uri)
    assert left["ok"] and right["ok"]
    assert left["route"] == f"tcp=198.51.100.1:{port}"
    assert right["route"] == f"tcp=203.0.113.1:{port}"


def test_ipv6_wildcard_reaches_a_dialer_on_each_side_without_link_local(links: TwoLinks) -> None:
    uri = links.serve("tcp:[::]:0")
    hints = tcp_hints(uri)
    port = hints[0].port
    # capsock's :: listener is IPv6-only (anyio sets IPV6_V6ONLY): no IPv4.
    assert hints == [TcpHint("2001:db8:2::1", port), TcpHint("2001:db8:1::1", port)]
    left = links.fetch("left", uri)
    right = links.fetch("right", uri)
    assert left["ok"] and right["ok"]
    assert left["route"] == f"tcp=[2001:db8:1::1]:{port}"
    assert right["route"] == f"tcp=[2001:db8:2::1]:{port}"


def test_a_dual_stack_socket_advertises_both_families(links: TwoLinks) -> None:
    def probe() -> list[str]:
        with socket.socket(V6) as sock:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind(("::", 0))
            return interfaces.advertised_hosts([sock])

    got = netns._in_netns(links.ns("host"), probe)
    # Four places: both default-route sources, then the rest, IPv4 first.
    assert got == ["203.0.113.1", "2001:db8:2::1", "198.51.100.1", "2001:db8:1::1"]


def test_the_cli_prints_the_addresses_for_a_wildcard_bind(links: TwoLinks, tmp_path: Path) -> None:
    uri_file = tmp_path / "uri"
    proc = links.popen(
        "host",
        [sys.executable, "-m", "capsock", "listen", "--listen", "tcp:0.0.0.0:0",
         "--uri-file", str(uri_file), "--state-dir", str(tmp_path / "state")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while not (uri_file.exists() and uri_file.read_text().strip()):
        assert proc.poll() is None, f"capsock listen exited with {proc.returncode}"
        assert time.monotonic() < deadline, "no URI file from capsock listen"
        time.sleep(0.05)
    hints = tcp_hints(uri_file.read_text().strip())
    assert [h.host for h in hints] == ["203.0.113.1", "198.51.100.1"]
    proc.terminate()
    _, err = proc.communicate(timeout=10)
    assert "advertise=[" not in err


def test_with_only_loopback_it_advertises_loopback_and_warns(links: TwoLinks) -> None:
    answer = links.run("lonely", [sys.executable, "-c", LONELY])
    assert [h.rpartition(":")[0] for h in answer["hints"]] == ["tcp=127.0.0.1"]
    (warning,) = [m for m in answer["log"] if "wildcard" in m]
    assert "loopback" in warning and "--advertise" in warning
    assert "advertise=[" not in warning


def test_logging_of_a_wildcard_bind_names_no_python_syntax(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The old warning said "pass advertise=[...]" (Python) to CLI users too.
    caplog.set_level(logging.WARNING, logger="capsock")

    async def main() -> None:
        async with capsock.Node(listen=["tcp:0.0.0.0:0"]) as node:
            await node.listen()

    anyio.run(main)
    assert not any("advertise=[" in r.getMessage() for r in caplog.records)
