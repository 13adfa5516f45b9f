"""``capsock demo`` and ``capsock relay``."""

from __future__ import annotations

import sys
from pathlib import Path

import anyio

from ..errors import CapabilityRejected, LocalUsageError, PeerAuthenticationError
from ..keys import KeyPair
from ..net.stream import CapsockAttribute, Stream
from ..node import Node, NodeConfig
from ..testing import echo, read_to_eof
from ..uri import Capability, Token
from .common import Exit, say

__all__ = ["demo", "run_relay"]

_say = say


async def demo() -> int:
    """Two nodes, one capability, an echoed stream, and two refused attempts."""

    _say("capsock demo: two nodes on this machine, talking over loopback TCP.\n")
    async with (
        Node(listen=["tcp:127.0.0.1:0"]) as alice,
        Node() as bob,
        anyio.create_task_group() as tg,
    ):
        listener = await alice.listen()
        tg.start_soon(listener.serve, echo)
        cap = listener.uri
        _say(f"1. alice ({alice.id.short()}...) listens and mints a capability:")
        _say(f"     {cap.redacted()}")
        _say("   (the token is the secret part, redacted here; whoever holds the full")
        _say("    URI may open streams to alice, nobody else can)\n")

        stream = await bob.connect(str(cap))
        message = b"hello through an end-to-end encrypted capability stream"
        await stream.send(message)
        await stream.send_eof()
        echoed = await read_to_eof(stream)
        await stream.aclose()
        _say(f"2. bob ({bob.id.short()}...) connects with the URI and sends a message;")
        _say(f"   alice echoes it back: {echoed.decode()!r}")
        _say(f"   both ends agree on the session's handshake hash {_hash_of(stream)}...\n")
        if echoed != message:
            _say("   ERROR: the echo differs")
            return Exit.ERROR

        impostor = Capability(KeyPair.generate().node_id, cap.token, cap.hints)
        _say("3. the same address and secret, but another node's key in the URI:")
        try:
            await bob.connect(impostor)
        except PeerAuthenticationError as exc:
            _say(f"   refused: PeerAuthenticationError: {exc}\n")
        else:
            _say("   ERROR: a wrong key was accepted")
            return Exit.ERROR

        forged = _forge(cap)
        _say("4. alice's key and address, but a forged secret:")
        try:
            await bob.connect(forged)
        except CapabilityRejected as exc:
            _say(f"   refused: CapabilityRejected: {exc}\n")
        else:
            _say("   ERROR: a forged capability was accepted")
            return Exit.ERROR

        _say("5. alice dialing her own id:")
        try:
            await alice.connect(cap)
        except LocalUsageError as exc:
            _say(f"   refused: LocalUsageError: {exc}\n")
        tg.cancel_scope.cancel()
    _say("Done: only the holder of the right capability, talking to the right key, got in.")
    return Exit.OK


def _hash_of(stream: Stream) -> str:
    return stream.extra(CapsockAttribute.handshake_hash).hex()[:16]


def _forge(cap: Capability) -> Capability:
    """The same capability with one bit of its tag flipped."""
    tag = bytes([cap.token.tag[0] ^ 1]) + cap.token.tag[1:]
    return Capability(cap.node, Token(cap.token.root_id, cap.token.caveats, tag), cap.hints)


async def run_relay(listen: list[str], advertise: list[str] | None, state_dir: Path) -> int:
    """Run a relay until interrupted; print its capability on stdout."""
    config = NodeConfig(listener_backlog=4096)
    async with Node(state_dir, listen=listen, advertise=advertise, config=config) as node:
        listener = await node.forwarding(name="relay")
        print(listener.uri, flush=True)
        where = "above" if sys.stdout.isatty() else "written to stdout"
        _say(f"capsock: relay {node.id.short()}... forwarding; hand out the capability {where}")
        await anyio.sleep_forever()
    return Exit.OK
