"""Network faults between two nodes (and in front of a relay), through tests/chaos.py.

The promise under test (DESIGN.md §6, docs/security.md): every byte written to
a stream is delivered once, in order, or the stream raises; corruption and
truncation are detected, never delivered; a clean ``EndOfStream`` only ever
follows everything that was sent.  Under each fault every stream must either
deliver exactly what was sent (echoed back, compared byte for byte) or raise
(``capsock.ConnectionLost`` / ``anyio.BrokenResourceError``, or a timeout the
test imposes); after the fault clears, a new session works.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import pytest

import capsock
from capsock import NodeConfig, SessionConfig
from capsock.uri import Capability, TcpHint

from .chaos import ChaosProxy, RelayProcess, free_port
from .helpers import echo

pytestmark = pytest.mark.anyio
KiB = 1024

# Short keepalive so that a stalled or desynchronised session is declared dead
# within seconds (the defaults are 15 s / 45 s).
FAST = SessionConfig(keepalive_interval=0.5, keepalive_timeout=2.5)
CONFIG = NodeConfig(session=FAST, connect_timeout=2.0, handshake_timeout=3.0)

# What a stream or connect() may raise under a fault.  CapabilityRejected is
# deliberately absent: an on-path attacker cannot forge a REJECT.
STREAM_ERRORS = (anyio.BrokenResourceError,)
CONNECT_ERRORS = (
    capsock.ConnectionLost,
    capsock.PeerAuthenticationError,
    capsock.Unreachable,
    capsock.HandshakeError,
    anyio.BrokenResourceError,
    TimeoutError,
)


@dataclass
class Outcome:
    """How one echo transfer ended."""

    sent: bytes
    received: bytearray = field(default_factory=bytearray)
    end: str = "running"  # eof | error <Type> | connect <Type> | timeout

    def check(self) -> None:
        """Exactly what was sent, or an error with a clean prefix of it; never more."""
        got = bytes(self.received)
        if self.end == "eof":
            assert len(got) == len(self.sent), f"clean EOF after {len(got)}/{len(self.sent)} bytes"
            assert hashlib.sha256(got).digest() == hashlib.sha256(self.sent).digest(), (
                "clean EOF after corrupted data"
            )
        else:
            assert self.end != "running"
            assert self.sent.startswith(got), f"{self.end}: delivered bytes that were never sent"


async def echo_transfer(
    client: capsock.Node, cap: Capability, payload: bytes, deadline: float
) -> Outcome:
    """Send ``payload`` to an echo service and read it back, classifying the end."""
    out = Outcome(payload)
    with anyio.move_on_after(deadline) as scope:
        try:
            stream = await client.connect(cap)
        except CONNECT_ERRORS as exc:
            out.end = f"connect {type(exc).__name__}"
            return out
        async with stream, anyio.create_task_group() as tg:

            async def send() -> None:
                try:
                    for i in range(0, len(payload), 16 * KiB):
                        await stream.send(payload[i : i + 16 * KiB])
                    await stream.send_eof()
                except STREAM_ERRORS:
                    pass  # the reader reports it

            tg.start_soon(send)
            try:
                while True:
                    out.received += await stream.receive()
            except anyio.EndOfStream:
                out.end = "eof"
            except STREAM_ERRORS as exc:
                out.end = f"error {type(exc).__name__}"
            tg.cancel_scope.cancel()
    if scope.cancelled_caught:
        out.end = "timeout"
    return out


@dataclass
class Setup:
    server: capsock.Node
    client: capsock.Node
    proxy: ChaosProxy
    cap: Capability


@asynccontextmanager
async def proxied(unit: str = "chunk", *, seed: int = 1) -> AsyncIterator[Setup]:
    """An echo service on ``server``, reached by ``client`` only through the proxy."""
    async with (
        capsock.Node(listen=["tcp:127.0.0.1:0"], config=CONFIG) as server,
        capsock.Node(config=CONFIG) as client,
        anyio.create_task_group() as tg,
    ):
        listener = await server.listen()
        tg.start_soon(listener.serve, echo)
        hint = listener.uri.hints[0]
        assert isinstance(hint, TcpHint)
        async with ChaosProxy(hint.host, hint.port, unit=unit, seed=seed) as proxy:
            yield Setup(server, client, proxy, proxy.route(listener.uri))
        tg.cancel_scope.cancel()


async def run_transfers(
    setup: Setup,
    arm: Callable[[ChaosProxy], Awaitable[None]],
    *,
    streams: int = 3,
    size: int = 256 * KiB,
    trigger: int = 48 * KiB,
    deadline: float = 12.0,
) -> list[Outcome]:
    """Start ``streams`` echo transfers, arm the fault once ``trigger`` bytes came
    back through the proxy, and wait for every transfer to end."""
    outcomes: list[Outcome] = []
    proxy = setup.proxy
    start = proxy.forwarded("down")

    async def one() -> None:
        outcomes.append(await echo_transfer(setup.client, setup.cap, os.urandom(size), deadline))

    async with anyio.create_task_group() as tg:
        for _ in range(streams):
            tg.start_soon(one)
        with anyio.fail_after(10):
            while proxy.forwarded("down") - start < trigger:
                await anyio.sleep(0.002)
        await arm(proxy)
    for out in outcomes:
        out.check()
    return outcomes


async def check_new_session_works(setup: Setup, *, new: bool) -> None:
    """After the fault cleared: a stream works again (on a new session if ``new``)."""
    setup.proxy.pass_()
    before = setup.server.stats()["inbound_connections"]
    out = await echo_transfer(setup.client, setup.cap, os.urandom(64 * KiB), 10)
    assert out.end == "eof", out.end
    out.check()
    if new:
        assert setup.server.stats()["inbound_connections"] == before + 1, "no re-dial"


# --------------------------------------------------------------- faults mid-transfer


async def _cut(p: ChaosProxy) -> None:
    await p.cut()


async def _stall_past_keepalive(p: ChaosProxy) -> None:
    p.stall()
    await anyio.sleep(FAST.keepalive_timeout + 0.5)  # both sides give up on the session


async def _stall_briefly(p: ChaosProxy) -> None:
    p.stall()
    await anyio.sleep(0.5)
    p.pass_()


def _set(action: Callable[[ChaosProxy], None]) -> Callable[[ChaosProxy], Awaitable[None]]:
    async def arm(p: ChaosProxy) -> None:
        action(p)

    return arm


# (fault, unit, destroys the session)
FAULTS: dict[str, tuple[Callable[[ChaosProxy], Awaitable[None]], str, bool]] = {
    "control": (_set(lambda p: None), "chunk", False),
    "delay": (_set(lambda p: p.delay(0.02)), "chunk", False),
    "fragment": (_set(lambda p: p.fragment(512)), "chunk", False),
    "stall-briefly": (_stall_briefly, "chunk", False),
    "cut": (_cut, "chunk", True),
    "stall": (_stall_past_keepalive, "chunk", True),
    "corrupt-down": (_set(lambda p: p.corrupt(direction="down")), "chunk", True),
    "corrupt-up": (_set(lambda p: p.corrupt(direction="up")), "chunk", True),
    "drop-chunk": (_set(lambda p: p.drop(direction="down")), "chunk", True),
    "duplicate-chunk": (_set(lambda p: p.duplicate(direction="up")), "chunk", True),
    "drop-record": (_set(lambda p: p.drop(direction="up")), "record", True),
    "duplicate-record": (_set(lambda p: p.duplicate(direction="down")), "record", True),
    "reorder-records": (_set(lambda p: p.reorder(direction="down")), "record", True),
}


@pytest.mark.parametrize("name", list(FAULTS))
async def test_streams_deliver_exactly_or_raise_under_fault(name: str) -> None:
    arm, unit, destructive = FAULTS[name]
    async with proxied(unit) as setup:
        outcomes = await run_transfers(setup, arm)
        ends = sorted(o.end for o in outcomes)
        if destructive:
            assert setup.proxy.faults_applied >= 1 or name == "stall"
            assert any(e != "eof" for e in ends), f"the fault went unnoticed: {ends}"
            assert "timeout" not in ends, f"the session did not notice within the deadline: {ends}"
        else:
            assert ends == ["eof"] * len(outcomes), ends
        await check_new_session_works(setup, new=destructive)


# --------------------------------------------------------------- faults in the handshake


async def _arm_cut(p: ChaosProxy) -> None:
    await p.cut()


HANDSHAKE_FAULTS: dict[str, Callable[[ChaosProxy], Awaitable[None]]] = {
    # message 1 is bytes 0..133 upstream (record prefix, e, s, payload, tag)
    "msg1-length": _set(lambda p: p.corrupt(at=1, bit=2, direction="up")),
    "msg1-ephemeral": _set(lambda p: p.corrupt(at=5, direction="up")),
    "msg1-static": _set(lambda p: p.corrupt(at=50, direction="up")),
    "msg1-payload": _set(lambda p: p.corrupt(at=100, direction="up")),
    "msg2-ephemeral": _set(lambda p: p.corrupt(at=10, direction="down")),
    "msg2-tag": _set(lambda p: p.corrupt(at=40, direction="down")),
    "first-transport-record": _set(lambda p: p.corrupt(at=140, direction="up")),
    "drop-msg1": _set(lambda p: p.drop(direction="up")),
    "stall": _set(lambda p: p.stall()),
    "cut": _arm_cut,
}


@pytest.mark.parametrize("name", list(HANDSHAKE_FAULTS))
async def test_handshake_faults_fail_cleanly_and_the_next_dial_works(name: str) -> None:
    async with proxied() as setup:
        await HANDSHAKE_FAULTS[name](setup.proxy)
        out = await echo_transfer(setup.client, setup.cap, os.urandom(4 * KiB), 12)
        out.check()
        assert out.end != "eof", f"{name}: the fault went unnoticed"
        assert out.end != "timeout", f"{name}: connect() did not give up by itself"
        await check_new_session_works(setup, new=True)


async def test_a_desynchronised_session_is_declared_dead_by_keepalive() -> None:
    """One byte cut from the server's stream: every later record is misframed.

    The client keeps receiving bytes (the server's PONGs), but none of them
    authenticates: that is no sign of life, so keepalive ends the session within
    its timeout, the stream raises and a new session works.  (Counting raw bytes
    as life kept such a session "usable" for minutes.)
    """
    async with proxied() as setup:
        first = await echo_transfer(setup.client, setup.cap, os.urandom(KiB), 10)
        assert first.end == "eof", first.end
        setup.proxy.rewrite(lambda unit: unit[1:], direction="down", count=1)
        start = anyio.current_time()
        out = await echo_transfer(setup.client, setup.cap, os.urandom(4 * KiB), 15)
        out.check()
        assert out.end.startswith(("error", "connect")), out.end
        assert anyio.current_time() - start < 10, "keepalive did not end the session in time"
        await check_new_session_works(setup, new=True)


# --------------------------------------------------------------- fragmentation


async def test_one_byte_fragments_deliver_handshake_and_data_intact() -> None:
    async with proxied(seed=7) as setup:
        setup.proxy.fragment(1)
        out = await echo_transfer(setup.client, setup.cap, os.urandom(4 * KiB), 20)
        assert out.end == "eof", out.end
        out.check()
        setup.proxy.fragment(9)
        outs = [await echo_transfer(setup.client, setup.cap, os.urandom(48 * KiB), 20)]
        assert [o.end for o in outs] == ["eof"]
        outs[0].check()
        assert setup.server.stats()["inbound_connections"] == 1


# --------------------------------------------------------------- in front of a relay


async def _wait_registered(node: capsock.Node) -> None:
    with anyio.fail_after(20):
        while not node.relay_status or not all(
            s == "registered" for s in node.relay_status.values()
        ):
            await anyio.sleep(0.05)


async def test_faults_in_front_of_a_relay(tmp_path: Path) -> None:
    relay = await anyio.to_thread.run_sync(RelayProcess, tmp_path / "relay", free_port())
    cfg = NodeConfig(session=FAST, relay_backoff=(0.1, 0.5), connect_timeout=5.0)
    try:
        async with ChaosProxy("127.0.0.1", relay.port, seed=3) as proxy:
            relay_cap = proxy.route(Capability.parse(relay.uri))
            async with (
                capsock.Node(relays=[relay_cap], config=cfg) as endpoint,
                capsock.Node(config=cfg) as dialer,
                anyio.create_task_group() as tg,
            ):
                await _wait_registered(endpoint)
                service = await endpoint.listen()
                tg.start_soon(service.serve, echo)
                setup = Setup(endpoint, dialer, proxy, service.uri)
                # A bit flipped on the way to the relay: the outer session breaks,
                # and with it the nested one; nothing altered is delivered.
                outcomes = await run_transfers(
                    setup, _set(lambda p: p.corrupt(direction="up")), streams=2
                )
                assert any(o.end != "eof" for o in outcomes), [o.end for o in outcomes]
                # The relay connection is cut: the endpoint loses its registration.
                await proxy.cut()
                with anyio.fail_after(10):
                    while endpoint.relay_status.get(relay_cap.redacted()) == "registered":
                        await anyio.sleep(0.05)
                proxy.pass_()
                await _wait_registered(endpoint)
                out = await echo_transfer(dialer, service.uri, os.urandom(128 * KiB), 15)
                assert out.end == "eof", out.end
                out.check()
                tg.cancel_scope.cancel()
    finally:
        relay.kill()
