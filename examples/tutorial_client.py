"""Tutorial, part 2: open a stream with a capability URI, send a message, print the echo.

    python examples/tutorial_client.py 'capsock://...' [MESSAGE]

Without arguments it prints this usage and exits (``tutorial_pair.py`` runs
the server and this client together).
"""

from __future__ import annotations

import sys

import anyio

import capsock


async def talk(uri: str, message: bytes) -> bytes:
    """Send ``message`` to the endpoint named by ``uri``; return what comes back."""
    async with capsock.Node() as node:  # no listen address: this node only dials
        stream = await node.connect(uri)  # returns once the endpoint accepted
        async with stream:
            await stream.send(message)
            await stream.send_eof()  # half-close: "that was all"
            reply = bytearray()
            async for chunk in stream:  # ends only at the peer's authenticated EOF
                reply += chunk
            return bytes(reply)


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        print(__doc__, file=sys.stderr)
        raise SystemExit(0)
    text = sys.argv[2] if len(sys.argv) == 3 else "hello, capsock"
    try:
        print(anyio.run(talk, sys.argv[1], text.encode()).decode())
    except* capsock.CapsockError as group:  # the error may arrive in an exception group
        for exc in group.exceptions:
            print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
