"""Latency rows: connection setup, round trip, and stream opens per second.

Server and client in two processes on loopback, like :mod:`bench.throughput`.
Usage (the bench driver ``python -m bench`` runs these for you)::

    .venv/bin/python -m bench.latency setup --kind capsock
    .venv/bin/python -m bench.latency rtt --kind tcp --backend trio

Rows, each printing one JSON number on stdout:

* ``setup``: a fresh dial to the first echoed byte, median milliseconds over
  ``--count`` dials.  tcp: connect; tls: connect + TLS 1.3 handshake; capsock:
  a new node (key made beforehand) dials: TCP + Noise IK + OPEN/ACCEPT.  Each
  dial then sends one byte and waits for its echo.
* ``rtt``: 1 KiB echoed on an open stream, median microseconds per round trip
  over ``--count`` round trips after a warm-up.
* ``opens`` (capsock only): new streams per second on one existing session;
  each stream is opened (the endpoint accepts it), carries one byte and its
  echo, and is closed; ``--concurrency`` tasks do this at once.
"""

from __future__ import annotations

import argparse
import json
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
from anyio.streams.tls import TLSListener, TLSStream

import capsock
from capsock.testing import echo

from . import procs
from .throughput import make_cert, tls_context

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("tcp", "tls", "capsock")
RTT_SIZE = 1024


def _nodelay(stream: anyio.abc.ByteStream) -> None:
    import socket

    sock = stream.extra(anyio.abc.SocketAttribute.raw_socket, None)
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def _echo_plain(stream: anyio.abc.ByteStream) -> None:
    _nodelay(stream)
    async with stream:
        try:
            while True:
                await stream.send(await stream.receive(65536))
        except (anyio.EndOfStream, anyio.BrokenResourceError, ssl.SSLError, OSError):
            pass


async def serve(kind: str, workdir: Path) -> None:
    """Serve echo for ``kind``; print the address or URI; run until stdin closes."""
    async with AsyncExitStack() as stack:
        tg = await stack.enter_async_context(anyio.create_task_group())
        if kind == "capsock":
            node = await stack.enter_async_context(capsock.Node(listen=["tcp:127.0.0.1:0"]))
            listener = await node.listen()
            tg.start_soon(listener.serve, echo)
            print(listener.uri, flush=True)
        else:
            tcp = await anyio.create_tcp_listener(local_host="127.0.0.1")
            port = tcp.extra(anyio.abc.SocketAttribute.local_port)
            lst: anyio.abc.Listener[Any] = tcp
            if kind == "tls":
                ctx = tls_context(True, workdir / "cert.pem", workdir / "key.pem")
                lst = TLSListener(tcp, ctx, standard_compatible=False)
            tg.start_soon(lst.serve, _echo_plain)
            print(f"127.0.0.1:{port}", flush=True)
        await anyio.to_thread.run_sync(sys.stdin.read)
        tg.cancel_scope.cancel()


async def _dial_plain(kind: str, address: str, workdir: Path) -> anyio.abc.ByteStream:
    host, port = address.rsplit(":", 1)
    stream: anyio.abc.ByteStream = await anyio.connect_tcp(host, int(port))
    _nodelay(stream)
    if kind == "tls":
        ctx = tls_context(False, workdir / "cert.pem", workdir / "key.pem")
        stream = await TLSStream.wrap(
            stream, hostname="127.0.0.1", ssl_context=ctx, standard_compatible=False
        )
    return stream


async def _exact(stream: anyio.abc.ByteStream, n: int) -> None:
    got = 0
    while got < n:
        got += len(await stream.receive(n - got))


async def measure_setup(kind: str, address: str, workdir: Path, count: int) -> float:
    keys = [capsock.KeyPair.generate() for _ in range(count)]
    times: list[float] = []
    for key in keys:
        if kind == "capsock":
            async with capsock.Node(key=key) as node:  # started before the clock starts
                start = time.perf_counter()
                stream: anyio.abc.ByteStream = await node.connect(address)
                await stream.send(b"x")
                await _exact(stream, 1)
                times.append(time.perf_counter() - start)
                await stream.aclose()
        else:
            start = time.perf_counter()
            stream = await _dial_plain(kind, address, workdir)
            await stream.send(b"x")
            await _exact(stream, 1)
            times.append(time.perf_counter() - start)
            await stream.aclose()
    return statistics.median(times) * 1e3


async def measure_rtt(kind: str, address: str, workdir: Path, count: int) -> float:
    async with AsyncExitStack() as stack:
        if kind == "capsock":
            node = await stack.enter_async_context(capsock.Node())
            stream: anyio.abc.ByteStream = await node.connect(address)
        else:
            stream = await _dial_plain(kind, address, workdir)
        stack.push_async_callback(stream.aclose)
        payload = b"r" * RTT_SIZE
        for _ in range(200):  # warm-up
            await stream.send(payload)
            await _exact(stream, RTT_SIZE)
        times: list[float] = []
        clock = time.perf_counter
        for _ in range(count):
            start = clock()
            await stream.send(payload)
            await _exact(stream, RTT_SIZE)
            times.append(clock() - start)
    return statistics.median(times) * 1e6


async def measure_opens(address: str, count: int, concurrency: int) -> float:
    async with capsock.Node() as node:
        cap = capsock.Capability.parse(address)

        async def one() -> None:
            stream = await node.connect(cap)
            async with stream:
                await stream.send(b"o")
                await _exact(stream, 1)

        for _ in range(50):  # warm-up, and the session is up
            await one()
        remaining = count

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                await one()

        start = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for _ in range(concurrency):
                tg.start_soon(worker)
        return count / (time.perf_counter() - start)


def run(
    row: str,
    kind: str,
    *,
    backend: str = "asyncio",
    count: int | None = None,
    concurrency: int = 32,
    workdir: Path | None = None,
) -> float:
    """Start a server process, measure ``row`` for ``kind`` from a client process."""
    with tempfile.TemporaryDirectory() as tmp:
        wd = workdir or Path(tmp)
        if not (wd / "cert.pem").exists():
            make_cert(wd)
        base = [sys.executable, "-m", "bench.latency", "--backend", backend, "--workdir", str(wd)]
        server = subprocess.Popen(
            [*base, "--role", "serve", "--kind", kind, row],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert server.stdout is not None and server.stdin is not None
        try:
            address = server.stdout.readline().strip()
            args = [*base, "--role", "client", "--kind", kind, "--address", address, row]
            if count is not None:
                args += ["--count", str(count)]
            args += ["--concurrency", str(concurrency)]
            out = subprocess.run(
                args, cwd=ROOT, check=True, capture_output=True, text=True, timeout=300
            )
            return float(json.loads(out.stdout.strip().splitlines()[-1]))
        finally:
            procs.stop(server)


DEFAULT_COUNT = {"setup": 30, "rtt": 3000, "opens": 5000}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("row", choices=["setup", "rtt", "opens"])
    parser.add_argument("--kind", choices=KINDS, default="capsock")
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    parser.add_argument("--count", type=int)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--role", choices=["serve", "client"], help=argparse.SUPPRESS)
    parser.add_argument("--address", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    count = args.count or DEFAULT_COUNT[args.row]
    if args.role == "serve":
        anyio.run(serve, args.kind, args.workdir, backend=args.backend)
    elif args.role == "client":
        if args.row == "setup":
            coro: Any = measure_setup(args.kind, args.address, args.workdir, count)
        elif args.row == "rtt":
            coro = measure_rtt(args.kind, args.address, args.workdir, count)
        else:
            coro = measure_opens(args.address, count, args.concurrency)

        async def main_() -> float:
            return float(await coro)

        print(json.dumps(anyio.run(main_, backend=args.backend)))
    else:
        value = run(
            args.row,
            args.kind,
            backend=args.backend,
            count=count,
            concurrency=args.concurrency,
        )
        print(json.dumps(value))


if __name__ == "__main__":
    main()
