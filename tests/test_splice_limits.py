"""Spliced pairs under the relay's limits, idle pairs closed, and what the relay no longer does."""

from __future__ import annotations

import anyio
import pytest

import capsock
from capsock.node._relay_upkeep import RelayUpkeep

from .helpers import echo
from .test_splice import _echo_hash, relayed

pytestmark = pytest.mark.anyio


def _relay_session_bytes(relay: capsock.Node) -> int:
    """Bytes the relay's own sessions carried (decrypted or encrypted by the relay)."""
    return sum(s["bytes_received"] + s["bytes_sent"] for s in relay.stats()["sessions"].values())


@pytest.mark.parametrize("splice", [True, False])
async def test_the_relay_no_longer_decrypts_what_it_forwards(splice: bool) -> None:
    size = 1 << 20
    cfg = capsock.NodeConfig(splice=splice)
    async with relayed(relay_cfg=cfg) as (relay, _endpoint, dialer, cap):
        before = _relay_session_bytes(relay)
        stream = await dialer.connect(cap)
        await _echo_hash(stream, size)
        per_byte = (_relay_session_bytes(relay) - before) / (2 * size)
        await stream.aclose()
        if splice:
            # Only the request, the answers and the invitation: no payload.
            assert per_byte < 0.05
            assert relay.stats()["spliced_bytes"] >= 2 * size
        else:
            # Nested: every byte is decrypted on one hop and re-encrypted on the other.
            assert per_byte >= 2.0


async def test_spliced_pairs_count_against_the_per_peer_forward_limit() -> None:
    cfg = capsock.NodeConfig(max_forwards_per_peer=1)
    async with relayed(relay_cfg=cfg) as (relay, _endpoint, dialer, cap):
        forwarding = cap.hints[0]
        assert isinstance(forwarding, capsock.uri.ViaHint)
        first = await dialer.connect(cap)
        assert relay.stats()["spliced_active"] == 1
        assert relay.forwarder.held == 2  # both sockets count in the descriptor budget
        # A second endpoint at the same relay: the dialer's one slot is taken.
        unlimited = relay._relays  # the relay has none; register E2 with its own root
        assert unlimited == ()
        root = next(iter(relay._listeners.values())).uri
        async with (
            capsock.Node(relays=[root]) as second,
            anyio.create_task_group() as tg,
        ):
            with anyio.fail_after(20):
                await second.wait_registered()
            service = await second.listen()
            tg.start_soon(service.serve, echo)
            with pytest.raises(capsock.Unreachable, match="too many forwarded sessions"):
                await dialer.connect(service.uri)
            await first.aclose()
            # Once the first pair ends (its session closed), the slot is free again.
            await dialer._sessions[first.peer].aclose()
            with anyio.fail_after(20):
                while relay.stats()["spliced_active"]:
                    await anyio.sleep(0.05)
            again = await dialer.connect(service.uri)
            await _echo_hash(again, 1024)
            await again.aclose()
            tg.cancel_scope.cancel()


async def test_an_idle_spliced_pair_is_closed() -> None:
    quiet = capsock.NodeConfig(session=capsock.SessionConfig(keepalive_interval=0))
    relay_cfg = capsock.NodeConfig(splice_idle_timeout=0.5)
    async with relayed(relay_cfg, quiet, quiet) as (relay, _endpoint, dialer, cap):
        stream = await dialer.connect(cap)
        await stream.send(b"ping")
        assert await stream.receive() == b"ping"
        assert relay.stats()["spliced_active"] == 1
        with anyio.fail_after(20):
            while relay.stats()["spliced_active"]:
                await anyio.sleep(0.05)
        assert relay.forwarder.held == 0
        with anyio.fail_after(20), pytest.raises(capsock.ConnectionLost):
            while True:
                await stream.receive()


async def test_a_busy_relay_falls_back_to_nesting_never_fails_connect() -> None:
    async with relayed() as (relay, _endpoint, dialer, cap):
        relay.forwarder.tickets.total = 0  # no splice setup fits: the relay nests
        stream = await dialer.connect(cap)
        assert stream.extra(capsock.CapsockAttribute.route) == f"via {relay.id.short()}"
        await _echo_hash(stream, 64 << 10)
        await stream.aclose()
        assert relay.stats()["splice_fallbacks"] == 1
        assert relay.stats()["spliced_forwards"] == 0


async def test_an_endpoint_that_never_connects_costs_the_dialer_only_the_ticket_ttl(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    relay_cfg = capsock.NodeConfig(splice_ticket_ttl=0.5)
    dialer_cfg = capsock.NodeConfig(splice_ticket_ttl=0.5)
    async with relayed(relay_cfg, None, dialer_cfg) as (relay, _endpoint, dialer, cap):
        # The endpoint ignores invitations (as one that lost its route to the relay would).
        async def ignore(*_args: object) -> None:
            return None

        monkeypatch.setattr(RelayUpkeep, "_splice_invited", ignore)
        stream = await dialer.connect(cap)
        assert stream.extra(capsock.CapsockAttribute.route) == f"via {relay.id.short()}"
        await _echo_hash(stream, 64 << 10)
        await stream.aclose()
        assert relay.stats()["spliced_forwards"] == 0
        assert relay.stats()["splice_setups"] == 0
        assert relay.forwarder.held == 0
