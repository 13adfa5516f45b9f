"""capsock nodes for the direct-path NAT lab (tests/test_direct_nat.py); one role per namespace.

relay BACKEND LISTEN      a relay; prints its URI, then on each stdin line the bytes it carried
serve BACKEND RELAY_URI   echo service registered with the relay; prints its URI
fetch BACKEND URI MIB     echo MIB MiB through a stream opened at once (the punch runs
                          meanwhile), print the result and the punch counters once the
                          round is over; on the stdin line "go", echo MIB MiB on a new stream
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


async def _line() -> str:
    return (await anyio.to_thread.run_sync(sys.stdin.readline)).strip()


async def relay(listen: str) -> None:
    async with capsock.Node(listen=[listen]) as node:
        carried = [0]
        node.forwarder.tap = lambda data: carried.__setitem__(0, carried[0] + len(data))
        fwd = await node.forwarding()
        say({"uri": str(fwd.uri)})
        while await _line():
            say({"bytes": carried[0]})


async def serve(relay_uri: str) -> None:
    cfg = capsock.NodeConfig(relay_backoff=(0.1, 1.0))
    async with capsock.Node(relays=[relay_uri], config=cfg) as node:
        with anyio.fail_after(30):
            await node.wait_registered()
        service = await node.listen()
        say({"uri": str(service.uri)})
        await service.serve(echo)


async def _echo(stream: capsock.Stream, mib: int) -> dict[str, object]:
    payload = os.urandom(mib << 20)
    async with anyio.create_task_group() as tg:

        async def send() -> None:
            await stream.send(payload)
            await stream.send_eof()

        tg.start_soon(send)
        echoed = await read_to_eof(stream)
    ok = hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()
    route = stream.extra(CapsockAttribute.route)
    await stream.aclose()
    return {"ok": ok, "bytes": len(echoed), "route": route}


async def fetch(uri: str, mib: str) -> None:
    async with capsock.Node() as node:
        stream = await node.connect(uri)
        say(await _echo(stream, int(mib)))  # started before the punch is over
        with anyio.fail_after(60):
            while True:
                stats = node.stats()
                if stats["punch_successes"] or stats["punch_failures"]:
                    break
                await anyio.sleep(0.05)
        say({k: v for k, v in stats.items() if k.startswith("punch_")})
        if await _line() == "go":
            say(await _echo(await node.connect(uri), int(mib)))


ROLES = {"relay": relay, "serve": serve, "fetch": fetch}

if __name__ == "__main__":
    role, backend, *args = sys.argv[1:]
    anyio.run(ROLES[role], *args, backend=backend)  # type: ignore[operator]
