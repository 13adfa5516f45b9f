"""Tutorial, both halves in one process: the server and the client of the tutorial.

python examples/tutorial_pair.py
"""

from __future__ import annotations

import logging

import anyio
from tutorial_client import talk
from tutorial_server import serve

import capsock


async def main() -> None:
    async with anyio.create_task_group() as tg:
        listener = await tg.start(serve, "tcp:127.0.0.1:0")  # returns once it listens
        reply = await talk(str(listener.uri), b"hello, capsock")
        print(reply.decode())
        assert reply == b"hello, capsock"

        once = listener.uri.attenuate(uses=1, ttl=60)  # offline: the server is not asked
        print((await talk(str(once), b"first use")).decode())
        async with capsock.Node() as client:
            try:
                await client.connect(str(once))
            except capsock.CapabilityRejected as exc:  # raised by connect(), not later
                print(f"second use refused: {exc}")
            else:
                raise AssertionError("a used-up capability was accepted")

        await listener.aclose()  # serve() returns, the server node shuts down


if __name__ == "__main__":
    logging.basicConfig(format="%(name)s: %(message)s")  # log lines go to stderr
    logging.getLogger("capsock.node").setLevel(logging.INFO)  # the server's reasons
    anyio.run(main)
