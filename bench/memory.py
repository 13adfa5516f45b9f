"""Memory rows: bytes per idle stream and per idle session.

Usage (the bench driver ``python -m bench`` runs these for you)::

    .venv/bin/python -m bench.memory stream     # 10,000 idle streams on one session
    .venv/bin/python -m bench.memory session    # 300 idle sessions at one node

* ``stream``: one process holds both ends of one session (two nodes on
  loopback) and opens ``--count`` streams that stay open and idle; reported:
  what they add, per stream, *both ends together*, as traced by
  ``tracemalloc`` (Python objects; a stream owns no native buffer).
* ``session``: a node in one process, ``--count`` client nodes in another,
  each with one session to it (one stream opened and closed, so the session
  is past its handshake, confirmed and pooled) then idle.  Reported: what the
  listening node pays per idle session: the growth of its resident set (RSS,
  which includes the kernel-side socket objects' user-space peers: the asyncio
  transport, the socket, the session's three tasks, mux and cipher state, and
  native buffers tracemalloc cannot see) divided by the count, and the
  ``tracemalloc`` figure next to it.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import anyio

import capsock
from capsock.testing import echo

from . import procs

ROOT = Path(__file__).resolve().parents[1]


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def idle_streams(count: int) -> dict[str, float]:
    cfg = capsock.NodeConfig(listener_backlog=count + 1)
    async with (
        capsock.Node(listen=["tcp:127.0.0.1:0"], config=cfg) as server,
        capsock.Node(config=cfg) as client,
    ):
        listener = await server.listen()
        first = await client.connect(listener.uri)  # the session is up and warm
        held = [first, await listener.accept()]
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(count):
            held.append(await client.connect(listener.uri))
            held.append(await listener.accept())
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        for stream in held:
            await stream.aclose()
    return {"bytes_per_stream_both_ends": (after - before) / count}


async def session_server(count: int) -> None:
    """Serve; on each stdin line "base"/"measure" print memory figures."""
    async with capsock.Node(listen=["tcp:127.0.0.1:0"]) as node, anyio.create_task_group() as tg:
        listener = await node.listen()
        tg.start_soon(listener.serve, echo)
        print(listener.uri, flush=True)
        readline = sys.stdin.readline
        base_rss = base_traced = 0
        while line := (await anyio.to_thread.run_sync(readline)).strip():
            await anyio.sleep(0.5)  # let the last sessions settle
            gc.collect()
            if line == "base":
                tracemalloc.start()
                base_rss, base_traced = _rss(), tracemalloc.get_traced_memory()[0]
                print("ok", flush=True)
            else:
                sessions = len(node.stats()["sessions"])
                rss, traced = _rss(), tracemalloc.get_traced_memory()[0]
                figures = {
                    "sessions": sessions,
                    "rss_per_session": (rss - base_rss) / count,
                    "traced_per_session": (traced - base_traced) / count,
                }
                print(json.dumps(figures), flush=True)
        tg.cancel_scope.cancel()


async def session_clients(uri: str, count: int) -> None:
    """Warm up, tell the server "base", make ``count`` sessions, tell it "measure"."""
    cap = capsock.Capability.parse(uri)
    async with capsock.Node() as warm:  # the server's code paths are warm before "base"
        stream = await warm.connect(cap)
        await stream.aclose()
    print("base", flush=True)
    await anyio.to_thread.run_sync(sys.stdin.readline)
    nodes: list[capsock.Node] = []
    try:
        for _ in range(count):
            node = capsock.Node()
            await node.__aenter__()
            nodes.append(node)
            stream = await node.connect(cap)
            await stream.send(b"m")
            await stream.receive(1)
            await stream.aclose()
        print("measure", flush=True)
        result = await anyio.to_thread.run_sync(sys.stdin.readline)
        print(result.strip(), file=sys.stderr, flush=True)
    finally:
        for node in reversed(nodes):
            await node.aclose()


def idle_sessions(count: int, backend: str) -> dict[str, float]:
    """Run the server and the clients as two processes wired stdin-to-stdout."""
    base = [sys.executable, "-m", "bench.memory", "session", "--count", str(count)]
    base += ["--backend", backend]
    server = subprocess.Popen(
        [*base, "--role", "server"], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    assert server.stdin is not None and server.stdout is not None
    try:
        uri = server.stdout.readline().strip()
        clients = subprocess.Popen(
            [*base, "--role", "clients", "--uri", uri], cwd=ROOT, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert clients.stdin is not None and clients.stdout is not None
        figures: dict[str, float] = {}
        for _ in range(2):  # "base" then "measure", each answered by the server
            ask = clients.stdout.readline()
            server.stdin.write(ask)
            server.stdin.flush()
            answer = server.stdout.readline()
            if ask.strip() == "measure":
                figures = json.loads(answer)
            clients.stdin.write(answer)
            clients.stdin.flush()
        clients.stdin.close()
        clients.wait(timeout=120)
        clients.stdout.close()
        if clients.stderr is not None:
            clients.stderr.close()
        return figures
    finally:
        procs.stop(server, timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["stream", "session"])
    parser.add_argument("--count", type=int)
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    parser.add_argument("--role", choices=["server", "clients"], help=argparse.SUPPRESS)
    parser.add_argument("--uri", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.what == "stream":
        result = anyio.run(idle_streams, args.count or 10_000, backend=args.backend)
    elif args.role == "server":
        anyio.run(session_server, args.count or 300, backend=args.backend)
        return
    elif args.role == "clients":
        anyio.run(session_clients, args.uri, args.count or 300, backend=args.backend)
        return
    else:
        result = idle_sessions(args.count or 300, args.backend)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
