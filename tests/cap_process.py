"""A node with a state directory in its own process, for restart tests.

Usage: python -m tests.cap_process STATE_DIR PORT
Prints one JSON line: {"sturdy": URI}, then serves an echo on the sturdy
listener until killed.
"""

from __future__ import annotations

import json
import sys

import anyio

import capsock

from .helpers import echo


async def main(state_dir: str, port: int) -> None:
    async with capsock.Node(state_dir, listen=[f"tcp:127.0.0.1:{port}"]) as node:
        listener = await node.listen(name="files")
        print(json.dumps({"sturdy": str(listener.uri)}), flush=True)
        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, echo)
            # Revocations requested by the test arrive on stdin, one URI per line.
            async for line in _lines():
                await node.revoke(line)
                print(json.dumps({"revoked": True}), flush=True)
            tg.cancel_scope.cancel()


async def _lines():  # type: ignore[no-untyped-def]
    while True:
        line = await anyio.to_thread.run_sync(sys.stdin.readline)
        if not line:
            return
        yield line.strip()


if __name__ == "__main__":
    anyio.run(main, sys.argv[1], int(sys.argv[2]))
