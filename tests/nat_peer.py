"""capsock nodes for the NAT lab: each role runs in one network namespace.

serve RELAY_URI [LISTEN]      echo service registered with the relay; prints its URI
fetch URI MIB                 send MIB MiB, read the echo, print {"ok", "route"} as JSON
introducer LISTEN             a lobby: A hands it a capability, B asks and is introduced
give INBOX_URI CAP_URI        hand CAP_URI to the introducer's inbox, then stay alive
ask INBOX_URI MIB             get an introduction from the inbox, then fetch through it
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

import anyio

import capsock
from capsock import CapsockAttribute
from capsock.testing import echo, read_to_eof


def say(obj: object) -> None:
    print(json.dumps(obj), flush=True)


async def serve(relay: str, listen: str | None = None) -> None:
    cfg = capsock.NodeConfig(relay_backoff=(0.1, 1.0))
    async with capsock.Node(listen=[listen] if listen else [], relays=[relay], config=cfg) as node:
        with anyio.fail_after(30):
            while set(node.relay_status.values()) != {"registered"}:
                await anyio.sleep(0.05)
        service = await node.listen()
        say({"uri": str(service.uri)})
        await service.serve(echo)


async def fetch_over(node: capsock.Node, uri: str | capsock.Capability, mib: int) -> None:
    stream = await node.connect(uri)
    payload = os.urandom(mib << 20)
    async with anyio.create_task_group() as tg:

        async def send() -> None:
            await stream.send(payload)
            await stream.send_eof()

        tg.start_soon(send)
        echoed = await read_to_eof(stream)
    ok = hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()
    say({"ok": ok, "bytes": len(echoed), "route": stream.extra(CapsockAttribute.route)})
    await stream.aclose()


async def fetch(uri: str, mib: str) -> None:
    async with capsock.Node() as node:
        await fetch_over(node, uri, int(mib))


async def introducer(listen: str) -> None:
    async with capsock.Node(listen=[listen]) as node:
        inbox = await node.listen()
        say({"inbox": str(inbox.uri)})
        from_a = await inbox.accept()
        service = await capsock.receive_capability(from_a)
        from_b = await inbox.accept()
        introduced = await node.introduce(service, to=from_b.peer, ttl=60)
        await capsock.send_capability(from_b, introduced)
        await anyio.sleep_forever()


async def give(inbox: str, cap: str) -> None:
    async with capsock.Node() as node:
        stream = await node.connect(inbox)
        await capsock.send_capability(stream, capsock.Capability.parse(cap))
        say({"given": True})
        await anyio.sleep_forever()  # keep the session the introducer forwards over


async def ask(inbox: str, mib: str) -> None:
    async with capsock.Node() as node:
        stream = await node.connect(inbox)
        introduced = await capsock.receive_capability(stream)
        await fetch_over(node, introduced, int(mib))


ROLES = {"serve": serve, "fetch": fetch, "introducer": introducer, "give": give, "ask": ask}

if __name__ == "__main__":
    anyio.run(ROLES[sys.argv[1]], *sys.argv[2:])  # type: ignore[operator]
