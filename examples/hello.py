"""The README's usage example, as a runnable script (and a test)."""

from __future__ import annotations

import anyio

import capsock


async def main() -> bytes:
    async with capsock.Node(listen=["tcp:127.0.0.1:0"]) as server, capsock.Node() as client:
        listener = await server.listen()  # a fresh root capability
        uri = str(listener.uri)  # "capsock://...": hand it to the peer

        stream = await client.connect(uri)  # authenticated, encrypted, accepted
        await stream.send(b"hello")
        await stream.send_eof()  # half-close

        accepted = await listener.accept()  # accepted.peer == client.id
        data = await accepted.receive()
        print(data)
        await accepted.aclose()
        await stream.aclose()
        return data


if __name__ == "__main__":
    anyio.run(main)
