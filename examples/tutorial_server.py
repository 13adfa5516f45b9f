"""Tutorial, part 1: a node that listens, prints its capability URI, and echoes.

    python examples/tutorial_server.py tcp:127.0.0.1:0

prints ``capsock://...`` to stderr and echoes every stream opened with that URI
until you press Ctrl-C.  Without arguments it prints this usage and exits
(``tutorial_pair.py`` runs this server and the client together).
"""

from __future__ import annotations

import contextlib
import sys

import anyio
import anyio.abc

import capsock


async def echo(stream: capsock.Stream) -> None:
    """Send back everything the peer sends; half-close when it does."""
    print(f"stream from {stream.peer.short()}...", file=sys.stderr)
    try:
        async for data in stream:  # ends at the peer's EOF
            await stream.send(data)
        await stream.send_eof()  # we are done too
    except anyio.BrokenResourceError as exc:  # reset by the peer, or the session died
        print(f"stream ended early: {exc}", file=sys.stderr)


async def serve(
    listen: str,
    *,
    task_status: anyio.abc.TaskStatus[capsock.Listener] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on ``listen`` (e.g. ``tcp:127.0.0.1:0``) and echo every stream.

    Returns when the listener is closed (``task_status`` hands it out).
    """
    async with capsock.Node(listen=[listen]) as node:
        listener = await node.listen()  # a fresh root capability
        print(listener.uri, file=sys.stderr, flush=True)  # the URI is the secret: share it
        task_status.started(listener)
        await listener.serve(echo)  # a task per stream, closed after echo(); until aclose()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        raise SystemExit(0)
    with contextlib.suppress(KeyboardInterrupt):
        anyio.run(serve, sys.argv[1])
