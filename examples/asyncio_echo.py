"""Existing asyncio code on a capability: an asyncio streams echo server and client.

    python examples/asyncio_echo.py

``handle`` below is ordinary ``asyncio.start_server`` code (StreamReader /
StreamWriter); ``capsock.aio.start_server`` serves it on a capability instead
of a TCP port, and ``capsock.aio.open_connection`` dials the capability.
``writer.get_extra_info("peername")`` is the caller's authenticated node id,
not an address.  The client half-closes with ``write_eof()`` and reads the
echo to the end.  asyncio only, by nature: with ``CAPSOCK_BACKEND=trio`` it
says so and exits (the capsock ``Stream`` itself is what trio code uses).
"""

from __future__ import annotations

import asyncio
import os
import sys

import capsock
from capsock import aio


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """An echo handler as written for asyncio.start_server: upper-cases each line."""
    peer = writer.get_extra_info("peername")  # a capsock.NodeId
    writer.write(f"hello {peer.short()}\n".encode())
    while line := await reader.readline():
        writer.write(line.upper())
        await writer.drain()  # capsock's flow control, as with TCP
    writer.close()  # the client half-closed: we are done too
    await writer.wait_closed()


async def main() -> None:
    async with capsock.Node(listen=["tcp:127.0.0.1:0"]) as server, capsock.Node() as client:
        echo = await aio.start_server(server, handle)  # serves a new listener of `server`
        async with echo:
            reader, writer = await aio.open_connection(client, echo.uri)
            greeting = await reader.readline()
            assert greeting == f"hello {client.id.short()}\n".encode()
            for word in ["capabilities", "not", "ports"]:
                writer.write(f"{word}\n".encode())
            writer.write_eof()  # half-close: the server reads to the end
            echoed = await reader.read()
            writer.close()
            await writer.wait_closed()
            assert echoed == b"CAPABILITIES\nNOT\nPORTS\n"
            print(greeting.decode().strip())
            print(echoed.decode().replace("\n", " ").strip())


if __name__ == "__main__":
    if os.environ.get("CAPSOCK_BACKEND", "asyncio") != "asyncio":
        print(
            "asyncio_echo: capsock.aio is the asyncio bridge; nothing to run on trio",
            file=sys.stderr,
        )
        sys.exit(0)
    asyncio.run(main())
