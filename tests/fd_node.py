"""An echo node in its own process under a file-descriptor limit (test_descriptors.py).

``python -m tests.fd_node BACKEND SOFT HARD`` sets ``RLIMIT_NOFILE`` to
``(SOFT, HARD)``, starts a node on 127.0.0.1 with an echo listener and prints
one JSON line (``{"uri": ..., "soft": ...}``: the soft limit after the node
started, which raises it towards the hard one).  Then it reads commands on
stdin, answering each with one JSON line: ``stats`` (the node's counters),
``hog`` (open /dev/null until the descriptors run out, keep them: what
``capsock share``'s service sockets or the application would do),
``free`` (close them).  It exits when stdin closes.
"""

from __future__ import annotations

import json
import os
import resource
import sys

import anyio

import capsock
from capsock.testing import echo


async def serve() -> None:
    hogged: list[int] = []
    async with (
        capsock.Node(listen=["tcp:127.0.0.1:0"]) as node,
        anyio.create_task_group() as tg,
    ):
        listener = await node.listen()
        tg.start_soon(listener.serve, echo)
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        print(json.dumps({"uri": str(listener.uri), "soft": soft}), flush=True)
        while True:
            line = (await anyio.to_thread.run_sync(sys.stdin.readline)).strip()
            if not line:
                break
            if line == "hog":
                try:
                    while True:
                        hogged.append(os.open(os.devnull, os.O_RDONLY))
                except OSError:
                    pass
                print(json.dumps({"hogged": len(hogged)}), flush=True)
            elif line == "free":
                for fd in hogged:
                    os.close(fd)
                print(json.dumps({"freed": len(hogged)}), flush=True)
                hogged.clear()
            else:
                stats = node.stats()
                stats["sessions"] = len(stats["sessions"])
                print(json.dumps(stats), flush=True)
        tg.cancel_scope.cancel()


if __name__ == "__main__":
    if os.environ.get("CAPSOCK_TEST_LOG"):
        import logging

        logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)
    backend, soft, hard = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    anyio.run(serve, backend=backend)
