"""TCP hole punching through two home NATs, in network namespaces (tests/netns.py lab).

The lab's routers get two more rules here, as a home router has: unsolicited inbound
on their public side is dropped on INPUT as well as FORWARD (a SYN to the router's
own address is silently dropped, not answered with a RST that would spoil the punch).

A and B each register with a rendezvous on the public host from their shared port
(as they would with a relay), learn their observed address from it (an ``Observed``
message), exchange ``Candidates``, measure the RTT with Ping/Pong, and the
coordinator sends SYNC and dials RTT/2 later while the other dials on receipt.
The coordination runs over plain TCP through the public host; the real one will run
inside the capsock session.  Skips without root; fails instead in CI.
"""

from __future__ import annotations

import ipaddress
import os
import struct
from collections.abc import Iterator
from typing import Any

import anyio
import anyio.abc
import pytest
from anyio.abc import SocketAttribute

from capsock.core import direct
from capsock.net import punch

from . import netns

pytestmark = pytest.mark.anyio

A_ID, B_ID = b"\x01" * 32, b"\x02" * 32  # A coordinates (the smaller id)


@pytest.fixture(scope="module")
def lab() -> Iterator[netns.NatLab]:
    with netns.open_lab() as lab:
        ipt = netns._probe()[1] or "iptables"
        for router in ("nat1", "nat2"):
            est = ["-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT"]
            lab.run(router, [ipt, "-w", "-A", "INPUT", "-i", "wan", *est])
            lab.run(router, [ipt, "-w", "-A", "INPUT", "-i", "wan", "-j", "DROP"])
        yield lab


def _factory(lab: netns.NatLab, host: netns.Host) -> punch.SocketFactory:
    return lambda family: lab.socket(host, family)


async def _send(stream: anyio.abc.ByteStream, msg: direct.DirectMessage) -> None:
    body = direct.encode(msg)
    await stream.send(struct.pack(">H", len(body)) + body)


async def _recv_exact(stream: anyio.abc.ByteStream, n: int, buf: bytearray) -> bytes:
    while len(buf) < n:
        buf += await stream.receive()
    out = bytes(buf[:n])
    del buf[:n]
    return out


async def _recv(stream: anyio.abc.ByteStream, buf: bytearray) -> direct.DirectMessage:
    (n,) = struct.unpack(">H", await _recv_exact(stream, 2, buf))
    return direct.decode(await _recv_exact(stream, n, buf))


async def _rendezvous(listener: anyio.abc.SocketListener) -> None:
    """Accept A and B, tell each what it looks like from here, then splice them together."""
    first = await listener.accept()
    second = await listener.accept()
    async with first, second, anyio.create_task_group() as tg:
        for conn in (first, second):
            host, port = conn.extra(SocketAttribute.remote_address)[:2]
            await _send(conn, direct.Observed(direct.Address(host, port)))

        async def pipe(src: anyio.abc.SocketStream, dst: anyio.abc.SocketStream) -> None:
            try:
                async for chunk in src:
                    await dst.send(chunk)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                pass
            tg.cancel_scope.cancel()

        tg.start_soon(pipe, first, second)
        tg.start_soon(pipe, second, first)


async def _peer(
    lab: netns.NatLab, host: netns.Host, local_id: bytes, peer_id: bytes, rv_port: int
) -> tuple[anyio.abc.SocketStream, dict[str, Any]]:
    make = _factory(lab, host)
    listener = await punch.shared_listener(0, socket_factory=make)
    port = listener.extra(SocketAttribute.local_port)
    buf = bytearray()
    async with listener:
        ctl = await punch.dial_from(port, lab.addr("relay"), rv_port, socket_factory=make)
        async with ctl:
            observed = await _recv(ctl, buf)
            assert isinstance(observed, direct.Observed)
            local = lab.call(host, punch.local_candidates, port)
            mine = direct.Candidates(
                (observed.addr,), tuple(direct.Address(h, p) for h, p in local)
            )
            await _send(ctl, mine)
            theirs = await _recv(ctl, buf)
            assert isinstance(theirs, direct.Candidates)
            if direct.is_noise_initiator(local_id, peer_id):
                meter = direct.RttMeter(os.urandom(8))
                await _send(ctl, meter.ping(anyio.current_time()))
                pong = await _recv(ctl, buf)
                assert isinstance(pong, direct.Pong)
                rtt = meter.pong(pong, anyio.current_time())
                assert rtt is not None
                await _send(ctl, direct.Sync(1))
                at = anyio.current_time() + direct.sync_delay(rtt)
            else:
                ping = await _recv(ctl, buf)
                assert isinstance(ping, direct.Ping)
                await _send(ctl, direct.answer(ping))
                sync = await _recv(ctl, buf)
                assert isinstance(sync, direct.Sync)
                at = anyio.current_time()
            stream = await punch.simultaneous_open(
                port, theirs.dial_list(), at=at, attempts=3, socket_factory=make
            )
    info = {"port": port, "observed": observed.addr, "local": local}
    return stream, info


async def test_plain_dial_to_a_nat_mapping_is_dropped(lab: netns.NatLab) -> None:
    """B holds a mapping on NAT 2 (registered with the public host from its shared port);
    A dialing that public mapping gets no answer at all: the NAT drops unsolicited SYNs."""
    make = _factory(lab, "b")
    public = await punch.shared_listener(0, socket_factory=_factory(lab, "relay"))
    async with public:
        rv_port = public.extra(SocketAttribute.local_port)
        listener = await punch.shared_listener(0, socket_factory=make)
        async with listener:
            port = listener.extra(SocketAttribute.local_port)
            reg = await punch.dial_from(port, lab.addr("relay"), rv_port, socket_factory=make)
            async with reg, await public.accept() as seen:
                mapped = seen.extra(SocketAttribute.remote_address)[:2]
                assert mapped == (lab.public_addr("b"), port)  # MASQUERADE kept the port
                with pytest.raises(TimeoutError):
                    await anyio.to_thread.run_sync(lab.connect, "a", mapped[0], mapped[1], 2.0)


async def test_simultaneous_open_connects_through_both_nats(lab: netns.NatLab) -> None:
    public = await punch.shared_listener(0, socket_factory=_factory(lab, "relay"))
    results: dict[str, tuple[anyio.abc.SocketStream, dict[str, Any]]] = {}

    async def run(name: str, host: netns.Host, me: bytes, other: bytes) -> None:
        results[name] = await _peer(lab, host, me, other, rv_port)

    async with public:
        rv_port = public.extra(SocketAttribute.local_port)
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(_rendezvous, public)
                tg.start_soon(run, "a", "a", A_ID, B_ID)
                tg.start_soon(run, "b", "b", B_ID, A_ID)
    (sa, ia), (sb, ib) = results["a"], results["b"]
    async with sa, sb:
        # Each saw the other's NAT mapping as the remote end: the path is direct,
        # through both NATs, not through the public host.
        assert ia["observed"] == direct.Address(lab.public_addr("a"), ia["port"])
        assert ("192.0.2.10", ia["port"]) in ia["local"]
        assert sa.extra(SocketAttribute.remote_address)[:2] == (lab.public_addr("b"), ib["port"])
        assert sb.extra(SocketAttribute.remote_address)[:2] == (lab.public_addr("a"), ia["port"])
        assert sa.extra(SocketAttribute.local_port) == ia["port"]
        payload = os.urandom(256 * 1024)

        async def pump(src: anyio.abc.SocketStream, dst: anyio.abc.SocketStream) -> bytes:
            got = bytearray()
            async with anyio.create_task_group() as tg:
                tg.start_soon(src.send, payload)
                while len(got) < len(payload):
                    got += await dst.receive()
            return bytes(got)

        assert await pump(sa, sb) == payload
        assert await pump(sb, sa) == payload
        await sa.send_eof()
        with pytest.raises(anyio.EndOfStream):
            await sb.receive()


def test_lab_addresses_are_documentation_ranges(lab: netns.NatLab) -> None:
    ranges = ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24")
    nets = [ipaddress.ip_network(n) for n in ranges]
    for host in netns.HOSTS:
        assert any(ipaddress.ip_address(lab.addr(host)) in n for n in nets)
