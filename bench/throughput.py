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


async def drain(stream: anyio.abc.ByteStream, size: int) -> tuple[int, float]:
    """Receive ``size`` bytes, then acknowledge with one byte.

    Returns (bytes, seconds from the first byte to the last).  The explicit
    acknowledgement lets the sender close only after everything arrived, the
    same way for all three kinds (anyio's TLS stream has no half-close).
    """
    first = await stream.receive(MiB)
    start = time.perf_counter()
    total = len(first)
    while total < size:
        total += len(await stream.receive(MiB))
    seconds = time.perf_counter() - start
    await stream.send(b"k")
    return total, seconds


async def receiver(kind: str, size: int, cert: Path, key: Path, relay: str | None) -> None:
    """Listen, print the address (or URI) on stdout, drain one stream, print the result."""
    result: dict[str, Any] = {}
    done = anyio.Event()

    async def handle(stream: anyio.abc.ByteStream) -> None:
        total, seconds = await drain(stream, size)
        result.update(bytes=total, seconds=seconds)
        done.set()

    if kind in ("capsock", "relay"):
        listen = ["tcp:127.0.0.1:0"] if kind == "capsock" else []
        relays = [relay] if kind == "relay" and relay else []
        async with capsock.Node(listen=listen, relays=relays) as node:
            while (
                relays and node.relay_status.get(next(iter(node.relay_status), "")) != "registered"
            ):
                await anyio.sleep(0.05)
            listener = await node.listen()
            print(listener.uri, flush=True)
            stream = await listener.accept()
            await handle(stream)
            await stream.aclose()
    else:
        tcp = await anyio.create_tcp_listener(local_host="127.0.0.1")
        port = tcp.extra(anyio.abc.SocketAttribute.local_port)
        print(f"127.0.0.1:{port}", flush=True)
        listener: anyio.abc.Listener[Any] = tcp
        if kind == "tls":
            listener = TLSListener(tcp, tls_context(True, cert, key), standard_compatible=False)
        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, handle)
            await done.wait()
            tg.cancel_scope.cancel()
    print(json.dumps(result), flush=True)


async def sender(kind: str, address: str, size: int, cert: Path, key: Path) -> None:
    chunk = os.urandom(MiB)
    stream: anyio.abc.ByteStream
    node: capsock.Node | None = None
    if kind in ("capsock", "relay"):
        node = capsock.Node()
        await node.__aenter__()
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
    sent = 0
    while sent < size:
        await stream.send(chunk)
        sent += len(chunk)
    await stream.receive(1)  # the receiver's acknowledgement: everything arrived
    await stream.aclose()
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


def run_once(kind: str, size: int, backend: str, workdir: Path, relay: str) -> float:
    base = [sys.executable, "-m", "bench.throughput", "--backend", backend]
    base += ["--workdir", str(workdir), "--relay", relay]
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
                receiver, args.kind, args.size * MiB, cert, key, args.relay, backend=args.backend
            )
        else:
            anyio.run(
                sender, args.kind, args.address, args.size * MiB, cert, key, backend=args.backend
            )
        return

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        make_cert(workdir)
        relay_proc, relay = start_relay(workdir)
        rates: dict[str, list[float]] = {k: [] for k in KINDS}
        try:
            for _ in range(args.runs):
                for kind in KINDS:  # interleaved, so drift hits every kind alike
                    rates[kind].append(run_once(kind, args.size, args.backend, workdir, relay))
        finally:
            relay_proc.kill()
            relay_proc.wait()
            if relay_proc.stdout is not None:
                relay_proc.stdout.close()
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"bulk, one stream, {args.size} MiB, {args.runs} runs, {args.backend}, 2 processes")
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
