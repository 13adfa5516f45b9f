"""The naming collisions of issue 15 stay resolved, and the old public names work."""

from __future__ import annotations

import pytest

import capsock
import capsock.uri
from capsock.errors import LocalUsageError
from capsock.node import _dialing as _node_dialing

pytestmark = pytest.mark.anyio


async def test_the_node_clock_is_called_wall_clock() -> None:
    def clock() -> float:
        return 1234.5

    assert capsock.Node(wall_clock=clock)._wall_clock is clock
    assert capsock.Node(clock=clock)._wall_clock is clock  # the deprecated old name
    with pytest.raises(LocalUsageError, match="wall_clock"):
        capsock.Node(clock=clock, wall_clock=clock)


async def test_mint_uses_the_wall_clock() -> None:
    async with capsock.Node(wall_clock=lambda: 1_000_000.0) as node:
        tmp = await node.mint(ttl=10)
        (expires,) = [c for c in tmp.uri.caveats if isinstance(c, capsock.uri.Expires)]
        assert expires.at == 1_000_010
        await tmp.aclose()


def test_the_two_via_limits_have_two_names() -> None:
    """uri.MAX_VIA_DEPTH bounds nesting inside one URI; the node's bound on
    nested dials is another limit, with another name."""
    assert capsock.uri.MAX_VIA_DEPTH == 3
    assert _node_dialing.MAX_DIAL_NESTING == 4
    assert not hasattr(_node_dialing, "MAX_VIA_DEPTH")
    assert not hasattr(capsock.node, "_MAX_VIA_DEPTH")
