"""Bulk throughput: one stream, sender and receiver in two processes on loopback.

Measures capsock next to raw anyio TCP and anyio TLS 1.3 in the same run, and
prints MB/s for each plus the ratios capsock/TLS and capsock/TCP (medians of
``--runs`` runs).  Usage::

    .venv/bin/python -m bench.throughput            # 256 MiB, 3 runs, asyncio
    .venv/bin/python -m bench.throughput --size 64 --runs 5 --backend trio

The receiver times from the first byte to the end of stream, so connection
setup is not part of the number (see ``bench/`` setup measurements for that).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
from anyio.streams.tls import TLSListener, TLSStream

import capsock

MiB = 1 << 20
KINDS = ("tcp", "tls", "capsock", "relay")


def make_cert(directory: Path) -> tuple[Path, Path]:
    """A throwaway self-signed certificate for 127.0.0.1 (bench only)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(__import__("ipaddress").ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def tls_context(server: bool, cert: Path, key: Path) -> ssl.SSLContext:
    if server:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
    else:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(cert)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    return ctx


async def drain(stream: anyio.abc.ByteStream, size: int, clock: list[float]) -> int:
    """Receive ``size`` bytes, then acknowledge with one byte.

    ``clock`` collects the time of the first byte and of the last one (the
    receiver times from its first byte to its last, so setup is not counted).
    The explicit acknowledgement lets the sender close only after everything
    arrived, the same way for all kinds (anyio's TLS stream has no half-close).
    """
    first = await stream.receive(MiB)
    clock.append(time.perf_counter())
    total = len(first)
    while total < size:
        total += len(await stream.receive(MiB))
    clock.append(time.perf_counter())
    await stream.send(b"k")
    return total


async def receiver(
    kind: str, size: int, cert: Path, key: Path, relay: str | None, streams: int = 1
) -> None:
    """Listen, print the address (or URI), drain ``streams`` streams, print the result.

    ``streams`` > 1: capsock streams share one session; tcp and tls use one
    connection each.  Every stream carries ``size // streams`` bytes.
    """
    clock: list[float] = []
    received: list[int] = []
    done = anyio.Event()

    async def handle(stream: anyio.abc.ByteStream) -> None:
        received.append(await drain(stream, size // streams, clock))
        if len(received) == streams:
            done.set()

    async with anyio.create_task_group() as tg:
        if kind in ("capsock", "relay"):
            listen = ["tcp:127.0.0.1:0"] if kind == "capsock" else []
            relays = [relay] if kind == "relay" and relay else []
            node = await tg.start(_run_node, listen, relays)
            listener = await node.listen()
            print(listener.uri, flush=True)
            for _ in range(streams):
                stream = await listener.accept()
                tg.start_soon(_handle_and_close, handle, stream)
        else:
            tcp = await anyio.create_tcp_listener(local_host="127.0.0.1")
            port = tcp.extra(anyio.abc.SocketAttribute.local_port)
            print(f"127.0.0.1:{port}", flush=True)
            listener_: anyio.abc.Listener[Any] = tcp
            if kind == "tls":
                ctx = tls_context(True, cert, key)
                listener_ = TLSListener(tcp, ctx, standard_compatible=False)
            tg.start_soon(listener_.serve, handle)
        await done.wait()
        await anyio.sleep(0.05)  # let the acknowledgements go out
        tg.cancel_scope.cancel()
    seconds = max(clock) - min(clock)
    print(json.dumps({"bytes": sum(received), "seconds": seconds}), flush=True)


async def _handle_and_close(
    handle: Callable[[anyio.abc.ByteStream], Awaitable[None]], stream: anyio.abc.ByteStream
) -> None:
    async with stream:
        await handle(stream)


async def _run_node(
    listen: list[str],
    relays: list[str],
    *,
    task_status: anyio.abc.TaskStatus[capsock.Node] = anyio.TASK_STATUS_IGNORED,
) -> None:
    async with capsock.Node(listen=listen, relays=relays) as node:
        while relays and node.relay_status.get(next(iter(node.relay_status), "")) != "registered":
            await anyio.sleep(0.05)
        task_status.started(node)
        await anyio.sleep_forever()


async def sender(
    kind: str, address: str, size: int, cert: Path, key: Path, streams: int = 1
) -> None:
    chunk = os.urandom(MiB)
    node: capsock.Node | None = None
    if kind in ("capsock", "relay"):
        node = capsock.Node()
        await node.__aenter__()

    async def one() -> None:
        stream: anyio.abc.ByteStream
        if node is not None:
            stream = await node.connect(address)
        else:
            host, port = address.rsplit(":", 1)
            stream = await anyio.connect_tcp(host, int(port))
            if kind == "tls":
                stream = await TLSStream.wrap(
                    stream,
                    hostname="127.0.0.1",
                    ssl_context=tls_context(False, cert, key),
                    standard_compatible=False,
                )
        sent, share = 0, size // streams
        while sent < share:
            piece = chunk[: min(MiB, share - sent)]
            await stream.send(piece)
            sent += len(piece)
        await stream.receive(1)  # the receiver's acknowledgement: everything arrived
        await stream.aclose()

    async with anyio.create_task_group() as tg:
        for _ in range(streams):
            tg.start_soon(one)
    if node is not None:
        await node.__aexit__(None, None, None)


def start_relay(workdir: Path) -> tuple[subprocess.Popen[str], str]:
    """A `capsock relay` process on loopback; returns it and its capability."""
    relay = subprocess.Popen(
        [sys.executable, "-m", "capsock", "relay", "--listen", "tcp:127.0.0.1:0",
         "--state-dir", str(workdir / "relay")],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )  # fmt: skip
    assert relay.stdout is not None
    return relay, relay.stdout.readline().strip()


def run_once(
    kind: str, size: int, backend: str, workdir: Path, relay: str, streams: int = 1
) -> float:
    """One transfer of ``size`` MiB in two processes; returns MB/s."""
    base = [sys.executable, "-m", "bench.throughput", "--backend", backend]
    base += ["--workdir", str(workdir), "--relay", relay, "--streams", str(streams)]
    root = Path(__file__).resolve().parents[1]
    recv = subprocess.Popen(
        [*base, "--role", "recv", "--kind", kind, "--size", str(size)],
        cwd=root,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert recv.stdout is not None
    address = recv.stdout.readline().strip()
    send = subprocess.run(
        [*base, "--role", "send", "--kind", kind, "--address", address, "--size", str(size)],
        cwd=root,
        check=True,
        timeout=300,
    )
    del send
    result = json.loads(recv.stdout.readline())
    recv.wait(timeout=60)
    recv.stdout.close()
    if result["bytes"] != size * MiB:
        raise SystemExit(f"{kind}: received {result['bytes']} bytes, expected {size * MiB}")
    return float(result["bytes"] / result["seconds"] / 1e6)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256, help="MiB per run (default 256)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    parser.add_argument("--streams", type=int, default=1, help="parallel streams (default 1)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--role", choices=["recv", "send"], help=argparse.SUPPRESS)
    parser.add_argument("--kind", choices=KINDS, help=argparse.SUPPRESS)
    parser.add_argument("--address", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--relay", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.role is not None:
        cert, key = args.workdir / "cert.pem", args.workdir / "key.pem"
        if args.role == "recv":
            anyio.run(
                receiver, args.kind, args.size * MiB, cert, key, args.relay, args.streams,
                backend=args.backend,
            )  # fmt: skip
        else:
            anyio.run(
                sender, args.kind, args.address, args.size * MiB, cert, key, args.streams,
                backend=args.backend,
            )  # fmt: skip
        return

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        make_cert(workdir)
        relay_proc, relay = start_relay(workdir)
        rates: dict[str, list[float]] = {k: [] for k in KINDS}
        try:
            for _ in range(args.runs):
                for kind in KINDS:  # interleaved, so drift hits every kind alike
                    rates[kind].append(
                        run_once(kind, args.size, args.backend, workdir, relay, args.streams)
                    )
        finally:
            relay_proc.kill()
            relay_proc.wait()
            if relay_proc.stdout is not None:
                relay_proc.stdout.close()
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"bulk, {args.streams} stream(s), {args.size} MiB, {args.runs} runs, {args.backend}")
    print("(relay: sender and receiver both reach a `capsock relay` process)")
    print(f"{'kind':10} {'median MB/s':>12}   runs")
    for kind in KINDS:
        runs = ", ".join(f"{r:.0f}" for r in rates[kind])
        print(f"{kind:10} {med[kind]:12.0f}   {runs}")
    ratio_tls = med["capsock"] / med["tls"]
    ratio_tcp = med["capsock"] / med["tcp"]
    ratio_relay = med["relay"] / med["capsock"]
    print(f"capsock/TLS = {ratio_tls:.2f}   capsock/TCP = {ratio_tcp:.2f}")
    print(f"relay/direct = {ratio_relay:.2f}   (relay: a third process forwards the stream)")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "size_mib": args.size,
                    "backend": args.backend,
                    "runs": rates,
                    "median": med,
                    "capsock_over_tls": ratio_tls,
                    "capsock_over_tcp": ratio_tcp,
                    "relay_over_direct": ratio_relay,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
