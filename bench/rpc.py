"""RPC calls per second: msgpack-RPC and Cap'n Proto, over capsock and over plain TCP.

Client and server in two processes on loopback.  Each kind is measured in the
same run, interleaved: sequential calls (one at a time: latency-bound) and
64-way concurrent calls (64 tasks calling at once over one connection:
throughput-bound).  The call is an echo of a 16-byte payload.  Usage::

    .venv/bin/python -m bench.rpc                 # 3 runs, asyncio
    .venv/bin/python -m bench.rpc --runs 5 --calls 5000
    .venv/bin/python -m bench.rpc --backend trio  # msgpack-RPC only (pycapnp is asyncio-only)

Kinds:

* ``msgpack/capsock``: :mod:`capsock.rpc.msgpack` over a capsock stream.
* ``msgpack/tcp``: the same :class:`~capsock.rpc.msgpack.Connection` over a
  plain anyio TCP stream.
* ``capnp/capsock``: :mod:`capsock.rpc.capnp` (pycapnp through the socketpair
  bridge) over a capsock stream.
* ``capnp/tcp``: pycapnp's own TCP transport (``capnp.AsyncIoStream``), no bridge.
* ``capnp/tcp+bridge``: the bridge over plain TCP: isolates the bridge's cost.
* ``raw/capsock``, ``raw/tcp``: no RPC, the floor: 16 bytes sent on a stream
  and echoed back, one round trip at a time (no 64-way figure: a raw stream has
  no message framing to multiplex calls).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc

import capsock
from capsock.rpc import msgpack as rpc
from capsock.testing import echo

from . import procs

ROOT = Path(__file__).resolve().parents[1]
KINDS = (
    "raw/capsock",
    "raw/tcp",
    "msgpack/capsock",
    "msgpack/tcp",
    "capnp/capsock",
    "capnp/tcp",
    "capnp/tcp+bridge",
)
PAYLOAD = b"0123456789abcdef"
CONCURRENCY = 64

Call = Callable[[], Awaitable[Any]]


class Echo(rpc.Service):
    @rpc.method
    def echo(self, payload: bytes) -> bytes:
        return payload


def _broker() -> Any:
    import capnp

    return capnp.load(str(ROOT / "schemas" / "broker.capnp"))


# ------------------------------------------------------------------ server process


async def serve(kind: str) -> None:
    """Serve ``kind``, print the address or URI, run until stdin closes."""
    layer, transport = kind.split("/")
    async with AsyncExitStack() as stack:
        node = None
        if transport == "capsock":
            node = await stack.enter_async_context(capsock.Node(listen=["tcp:127.0.0.1:0"]))
        async with anyio.create_task_group() as tg:
            if node is not None:
                listener = await node.listen()
                address = str(listener.uri)
                if layer == "raw":
                    tg.start_soon(listener.serve, echo)
                elif layer == "msgpack":
                    tg.start_soon(lambda: rpc.serve(listener, Echo(), node=node))
                else:
                    from capsock.rpc import capnp as capnp_rpc

                    impl = _broker_impl(_broker())
                    tg.start_soon(capnp_rpc.serve, listener, lambda s: impl)
            elif layer in ("msgpack", "raw") or transport == "tcp+bridge":
                tcp = await anyio.create_tcp_listener(local_host="127.0.0.1")
                address = f"127.0.0.1:{tcp.extra(anyio.abc.SocketAttribute.local_port)}"
                if layer == "raw":
                    tg.start_soon(tcp.serve, lambda s: echo(_nodelay(s)))
                elif layer == "msgpack":
                    tg.start_soon(tcp.serve, lambda s: rpc.serve_stream(_nodelay(s), Echo()))
                else:
                    from capsock.rpc import capnp as capnp_rpc

                    impl = _broker_impl(_broker())
                    tg.start_soon(tcp.serve, lambda s: capnp_rpc.serve_stream(_nodelay(s), impl))
            else:  # pycapnp's own TCP server
                import capnp

                impl = _broker_impl(_broker())

                async def on_connect(stream: Any) -> None:
                    await capnp.TwoPartyServer(stream, bootstrap=impl).on_disconnect()

                server = await capnp.AsyncIoStream.create_server(on_connect, "127.0.0.1", 0)
                stack.push_async_callback(server.wait_closed)
                stack.callback(server.close)
                address = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
            print(address, flush=True)
            await anyio.to_thread.run_sync(sys.stdin.read)  # until the parent closes our stdin
            tg.cancel_scope.cancel()


def _broker_impl(broker: Any) -> Any:
    class BrokerImpl(broker.Broker.Server):
        async def echo(self, payload: bytes, _context: Any, **kwargs: Any) -> bytes:
            return payload

    return BrokerImpl()


def _nodelay(stream: anyio.abc.SocketStream) -> anyio.abc.SocketStream:
    import socket

    sock = stream.extra(anyio.abc.SocketAttribute.raw_socket)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return stream


# ------------------------------------------------------------------ client side


@asynccontextmanager
async def client(kind: str, address: str) -> AsyncIterator[Call]:
    """A zero-argument echo call over a fresh connection of ``kind``."""
    layer, transport = kind.split("/")
    async with AsyncExitStack() as stack:
        stream: anyio.abc.ByteStream
        if transport == "capsock":
            node = await stack.enter_async_context(capsock.Node())
            stream = await node.connect(address)
        elif layer in ("msgpack", "raw") or transport == "tcp+bridge":
            host, port = address.rsplit(":", 1)
            stream = _nodelay(await anyio.connect_tcp(host, int(port)))
        if layer == "raw":
            raw = stream
            stack.push_async_callback(raw.aclose)

            async def ping() -> Any:
                await raw.send(PAYLOAD)
                got = 0
                while got < len(PAYLOAD):
                    got += len(await raw.receive())

            yield ping
            return
        if layer == "msgpack":
            conn = await stack.enter_async_context(rpc.Connection(stream))

            async def msgpack_call() -> Any:
                return await conn.call("echo", PAYLOAD)

            yield msgpack_call
            return
        import capnp

        broker = _broker()
        if transport == "tcp":
            host, port = address.rsplit(":", 1)
            capnp_stream = await capnp.AsyncIoStream.create_connection(host=host, port=int(port))
            twoparty = capnp.TwoPartyClient(capnp_stream)
            stack.callback(capnp_stream.close)
            stack.callback(twoparty.close)
            remote = twoparty.bootstrap().cast_as(broker.Broker)
        else:
            from capsock.rpc import capnp as capnp_rpc

            conn_c = await stack.enter_async_context(capnp_rpc.connect_stream(stream))
            remote = conn_c.bootstrap(broker.Broker)

        async def capnp_call() -> Any:
            return await remote.echo(PAYLOAD)

        yield capnp_call


async def measure(call: Call, calls: int, concurrent: bool = True) -> tuple[float, float]:
    """(sequential calls/s, 64-way concurrent calls/s; NaN if not ``concurrent``)."""
    for _ in range(200):  # warm up
        await call()
    start = time.perf_counter()
    for _ in range(calls):
        await call()
    sequential = calls / (time.perf_counter() - start)
    if not concurrent:
        return sequential, math.nan

    per_task = max(1, calls * 2 // CONCURRENCY)

    async def worker() -> None:
        for _ in range(per_task):
            await call()

    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for _ in range(CONCURRENCY):
            tg.start_soon(worker)
    concurrent = per_task * CONCURRENCY / (time.perf_counter() - start)
    return sequential, concurrent


async def run_client(kind: str, address: str, calls: int) -> tuple[float, float]:
    async with client(kind, address) as call:
        return await measure(call, calls, concurrent=not kind.startswith("raw"))


def run_kind(kind: str, calls: int, backend: str) -> tuple[float, float]:
    """Start a server process for ``kind``, measure from this one, stop it."""
    server = subprocess.Popen(
        [sys.executable, "-m", "bench.rpc", "--role", "server", "--kind", kind,
         "--backend", backend],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    assert server.stdout is not None and server.stdin is not None
    try:
        address = server.stdout.readline().strip()
        if kind.startswith("capnp"):
            result: tuple[float, float] = asyncio.run(
                _with_kj(run_client(kind, address, calls), kind)
            )
            return result
        return anyio.run(run_client, kind, address, calls, backend=backend)
    finally:
        procs.stop(server)


async def _with_kj(coro: Awaitable[Any], kind: str) -> Any:
    if not kind.startswith("capnp"):
        return await coro
    import capnp

    async with capnp.kj_loop():
        return await coro


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=3000, help="sequential calls per run")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    parser.add_argument("--kinds", default=",".join(KINDS), help="comma-separated subset")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--role", choices=["server"], help=argparse.SUPPRESS)
    parser.add_argument("--kind", choices=KINDS, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.role == "server":
        if args.kind.startswith("capnp"):
            asyncio.run(_with_kj(serve(args.kind), args.kind))
        else:
            anyio.run(serve, args.kind, backend=args.backend)
        return

    kinds = [k for k in args.kinds.split(",") if k]
    if args.backend == "trio":
        kinds = [k for k in kinds if not k.startswith("capnp")]
    else:
        try:
            import capnp  # noqa: F401
        except ImportError:
            print("pycapnp is not installed: measuring msgpack-RPC only", file=sys.stderr)
            kinds = [k for k in kinds if not k.startswith("capnp")]
    results: dict[str, list[tuple[float, float]]] = {k: [] for k in kinds}
    for _ in range(args.runs):
        for kind in kinds:  # interleaved, so drift hits every kind alike
            results[kind].append(run_kind(kind, args.calls, args.backend))

    med = {
        k: (statistics.median(r[0] for r in v), statistics.median(r[1] for r in v))
        for k, v in results.items()
    }
    print(
        f"RPC echo of {len(PAYLOAD)} bytes, {args.calls} sequential and "
        f"{args.calls * 2 // CONCURRENCY * CONCURRENCY} concurrent calls per run, "
        f"{args.runs} runs (median), {args.backend}, 2 processes"
    )
    print(f"{'kind':18} {'sequential/s':>13} {f'{CONCURRENCY}-way/s':>11}")
    for kind in kinds:
        conc = "-" if math.isnan(med[kind][1]) else f"{med[kind][1]:.0f}"
        print(f"{kind:18} {med[kind][0]:13.0f} {conc:>11}")
    for layer, base in (("raw", "raw/tcp"), ("msgpack", "msgpack/tcp"), ("capnp", "capnp/tcp")):
        over = f"{layer}/capsock"
        if over in med and base in med:
            seq = med[over][0] / med[base][0]
            line = f"{over} / {base}: sequential {seq:.2f}"
            if layer != "raw":
                line += f", {CONCURRENCY}-way {med[over][1] / med[base][1]:.2f}"
            print(line)
    if args.json:
        args.json.write_text(json.dumps({"backend": args.backend, "runs": results}, indent=2))


if __name__ == "__main__":
    main()
