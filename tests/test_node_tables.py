"""Per-node tables that grow with what peers and URIs name are bounded."""

from __future__ import annotations

import os

import anyio
import pytest

import capsock
from capsock import Unreachable
from capsock.keys import KeyPair
from capsock.node._state import MAX_ROUTES
from capsock.uri import Capability, TcpHint, Token

pytestmark = pytest.mark.anyio


def _token() -> Token:
    return Token(os.urandom(16), (), os.urandom(32))


async def test_a_dial_lock_lives_only_while_its_node_is_dialed() -> None:
    """Dialing 50 nodes that are not there leaves no lock behind (one per node
    ever dialed would grow without end with the URIs an application is given)."""
    async with capsock.Node() as node:
        with anyio.fail_after(30):
            for _ in range(50):
                target = KeyPair.generate().node_id
                cap = Capability(target, _token(), (TcpHint("127.0.0.1", 9),))  # discard port
                with pytest.raises(Unreachable):
                    await node.connect(cap)
        assert node._dial_locks == {}


async def test_remembered_routes_are_bounded() -> None:
    async with capsock.Node() as node:
        for i in range(MAX_ROUTES + 10):
            cap = Capability(
                KeyPair.generate().node_id, _token(), (TcpHint("127.0.0.1", 1 + i % 60000),)
            )
            node._remember_route(cap)
        assert len(node._routes) == MAX_ROUTES
