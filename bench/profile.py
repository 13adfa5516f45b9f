"""Count the work per operation: Python calls (cProfile) and CPU time, both ends in one process.

Wall time on the shared 2-core project machine moves by 30 % between runs;
the number of Python function calls per operation does not (it moves only
when the code does), so this is what each change of the hot path is judged
by, next to the bench's wall-clock rows::

    .venv/bin/python -m bench.profile rtt              # calls per 1 KiB round trip
    .venv/bin/python -m bench.profile opens --backend trio
    .venv/bin/python -m bench.profile bulk --top 25    # calls per MiB, top functions
    .venv/bin/python -m bench.profile rtt --pyinstrument

Both nodes run in this one process on loopback (so a count is the two ends
together); ``--top`` prints the functions with the most calls and the most
own time.  The counts include the event loop's own Python (asyncio's is
Python code; trio's too), which is part of what a round trip costs.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

import capsock
from capsock.testing import echo

RTT_SIZE = 1024
BULK_CHUNK = 65536


async def _exact(stream: anyio.abc.ByteStream, n: int) -> None:
    got = 0
    while got < n:
        got += len(await stream.receive(n - got))


async def _sink(stream: capsock.Stream) -> None:
    async with stream:
        got = 0
        try:
            while True:
                got += len(await stream.receive(1 << 20))
        except anyio.EndOfStream:
            pass
        await stream.send(b"k")


Op = Callable[[], Awaitable[None]]


async def _measure(row: str, count: int, concurrency: int, profile: Any) -> dict[str, Any]:
    async with (
        capsock.Node(listen=["tcp:127.0.0.1:0"]) as server,
        capsock.Node() as client,
        anyio.create_task_group() as tg,
    ):
        listener = await server.listen()
        tg.start_soon(listener.serve, _sink if row == "bulk" else echo)
        cap = listener.uri
        if row == "rtt":
            stream = await client.connect(cap)
            payload = b"r" * RTT_SIZE

            async def op() -> None:
                await stream.send(payload)
                await _exact(stream, RTT_SIZE)

            for _ in range(200):
                await op()
            ops = await _run(op, count, 1, profile)
            await stream.aclose()
        elif row == "opens":

            async def op() -> None:
                s = await client.connect(cap)
                async with s:
                    await s.send(b"o")
                    await _exact(s, 1)

            for _ in range(50):
                await op()
            ops = await _run(op, count, concurrency, profile)
        else:  # bulk: count MiB on one stream
            stream = await client.connect(cap)
            chunk = b"b" * BULK_CHUNK
            per = (1 << 20) // BULK_CHUNK

            async def op() -> None:
                for _ in range(per):
                    await stream.send(chunk)

            for _ in range(8):
                await op()
            ops = await _run(op, count, 1, profile)
            await stream.send_eof()
            await _exact(stream, 1)
            await stream.aclose()
        tg.cancel_scope.cancel()
    return ops


async def _run(op: Op, count: int, concurrency: int, profile: Any) -> dict[str, Any]:
    remaining = count

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await op()

    cpu, wall = time.process_time(), time.perf_counter()
    if profile is not None:
        profile.enable()
    async with anyio.create_task_group() as tg:
        for _ in range(concurrency):
            tg.start_soon(worker)
    if profile is not None:
        profile.disable()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return {"cpu_us_per_op": cpu / count * 1e6, "wall_us_per_op": wall / count * 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("row", choices=["rtt", "opens", "bulk"])
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    parser.add_argument("--count", type=int, help="operations (bulk: MiB)")
    parser.add_argument("--concurrency", type=int, default=8, help="opens in flight")
    parser.add_argument("--top", type=int, default=0, help="print the top N functions")
    parser.add_argument("--pyinstrument", action="store_true", help="a pyinstrument tree")
    parser.add_argument("--no-calls", action="store_true", help="CPU time only, no cProfile")
    args = parser.parse_args()
    count = args.count or {"rtt": 2000, "opens": 1000, "bulk": 64}[args.row]
    if args.pyinstrument:
        from pyinstrument import Profiler

        profiler = Profiler(interval=0.0002)
        profiler.start()
        anyio.run(_measure, args.row, count, args.concurrency, None, backend=args.backend)
        profiler.stop()
        print(profiler.output_text(unicode=False, color=False, show_all=False))
        return
    profile = None if args.no_calls else cProfile.Profile()
    result = anyio.run(_measure, args.row, count, args.concurrency, profile, backend=args.backend)
    if profile is not None:
        stats = pstats.Stats(profile)
        total = sum(v[1] for v in stats.stats.values())  # type: ignore[attr-defined]
        result["calls_per_op"] = round(total / count, 1)
        if args.top:
            stats.sort_stats("ncalls").print_stats(args.top)
            stats.sort_stats("tottime").print_stats(args.top)
    result = {k: round(v, 1) for k, v in result.items()}
    print(json.dumps({"row": args.row, "backend": args.backend, "count": count, **result}))


if __name__ == "__main__":
    main()
