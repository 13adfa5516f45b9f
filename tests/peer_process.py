"""A capsock node in its own process, for tests that kill a peer.

Usage: python -m tests.peer_process serve   -> prints its URI, then streams
       random data to every stream it accepts, forever.
"""

from __future__ import annotations

import os
import sys

import anyio

import capsock


async def serve() -> None:
    async with capsock.Node(listen=["tcp:127.0.0.1:0"]) as node:
        listener = await node.listen()
        print(listener.uri, flush=True)

        async def flood(stream: capsock.Stream) -> None:
            block = os.urandom(65536)
            while True:
                await stream.send(block)

        await listener.serve(flood)


if __name__ == "__main__":
    if sys.argv[1:] == ["serve"]:
        anyio.run(serve)
