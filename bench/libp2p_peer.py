"""py-libp2p (TCP + Noise + yamux), measured like capsock for the project bench.

The bench driver imports this module and calls :func:`available` and
:func:`measure` from a plain synchronous process.  Each run starts a server
and a client in two separate subprocesses on 127.0.0.1 (this file, run as a
script, is both) and reads one number back from whichever side measures.
Nothing here imports libp2p at module level, so the module imports cleanly
where py-libp2p is not installed.

Install: ``.venv/bin/pip install libp2p`` (it builds fastecdsa from source,
which needs gcc and Debian's ``libgmp-dev``).  If ``.venv-libp2p/bin/python``
exists at the repository root (a separate virtualenv for libp2p), the
subprocesses run with it; otherwise with ``sys.executable``.

Both hosts offer only Noise and only yamux (py-libp2p's defaults also offer
TLS, secio, plaintext and mplex, with Noise and yamux preferred).

Rows (each run returns one number):

``bulk``
    One stream, ``size_mib`` MiB client -> server.  The server times from the
    first byte to the last, then acknowledges with one byte (the method of
    ``bench/throughput.py``'s ``drain``).  MB/s (1e6 bytes/s).  py-libp2p
    moves about 100 MB/s here, so 256 MiB takes a few seconds.
``parallel``
    8 streams on one connection at once, ``size_mib / 8`` MiB each.  Aggregate
    MB/s from the first byte on any stream to the last byte on all of them.
``setup``
    Fresh dial to first echoed byte: for each dial a new client host, whose
    key pair is made and which is started before the clock starts, dials the
    server (TCP + multistream-select + Noise XX + yamux), opens a stream (which
    negotiates the echo protocol), sends one byte and reads its echo.  This
    includes what py-libp2p itself does on a new connection (it starts an
    identify exchange in the background, which competes with the first
    stream).  The client uses ``ConnectionConfig(max_connections_per_peer=1)``:
    with the default of 3, py-libp2p's happy-eyeballs dial waits a fixed
    250 ms for further connections before ``connect`` returns.  Median
    seconds over 20 timed dials, after 2 untimed ones.
``rtt``
    1 KiB echo round trip on an already-open stream: median microseconds over
    2000 round trips, after 200 untimed ones.
``opens``
    New streams per second on an existing connection: open a stream (yamux
    SYN + multistream-select of the echo protocol), write 1 byte, read the
    1-byte echo, close.  2000 of them, after 50 untimed sequential ones, with
    ``opens_concurrency`` (default 8) such sequences in flight at once, which
    gave a higher rate than 1 (strictly sequential); pass 1 to compare with a
    sequential figure.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import queue
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from libp2p.abc import IHost, INetStream

MiB = 1 << 20
ROWS = ("bulk", "parallel", "setup", "rtt", "opens")
PROTOCOL = "/capsock-bench/echo/1.0.0"
PARALLEL_STREAMS = 8
SETUP_DIALS, SETUP_WARMUP = 20, 2
RTT_ROUNDS, RTT_WARMUP, RTT_SIZE = 2000, 200, 1024
OPENS_COUNT, OPENS_WARMUP = 2000, 50
OPENS_CONCURRENCY = 8  # open-echo-close sequences in flight at once ("opens")
CHUNK = MiB  # bytes per write (bulk) and per read
TIMEOUT = 120.0  # hard limit for each subprocess, seconds
ROOT = Path(__file__).resolve().parents[1]
SEPARATE_VENV_PYTHON = ROOT / ".venv-libp2p" / "bin" / "python"


# --------------------------------------------------------------------------
# Driver side: plain synchronous code, stdlib only.
# --------------------------------------------------------------------------


def _python() -> str:
    """The interpreter that has libp2p: the separate venv's if present, else ours."""
    if SEPARATE_VENV_PYTHON.exists():
        return str(SEPARATE_VENV_PYTHON)
    return sys.executable


def available() -> str | None:
    """None if py-libp2p can be used, else a one-line reason (e.g. not installed)."""
    python = _python()
    if python == sys.executable:
        if importlib.util.find_spec("libp2p") is None:
            return f"py-libp2p is not installed (pip install libp2p into {sys.prefix})"
        return None
    try:
        probe = subprocess.run(
            [python, "-c", "import libp2p"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot run {python}: {exc}"
    if probe.returncode != 0:
        tail = (probe.stderr.strip().splitlines() or ["?"])[-1]
        return f"py-libp2p does not import in {python}: {tail}"
    return None


def measure(
    row: str, *, runs: int = 1, size_mib: int = 256, opens_concurrency: int = OPENS_CONCURRENCY
) -> list[float]:
    """Run `row` `runs` times, server and client in two separate processes on 127.0.0.1; return one number per run.

    bulk, parallel: MB/s; setup: median seconds per dial; rtt: median
    microseconds per 1 KiB round trip; opens: streams per second, with
    ``opens_concurrency`` open-echo-close sequences in flight at once (1 =
    strictly sequential).  ``size_mib`` is used by bulk and parallel only.
    Each subprocess is limited to ``TIMEOUT`` seconds; any failure raises
    RuntimeError with the failing subprocess's stderr tail.
    """  # noqa: E501
    if row not in ROWS:
        raise ValueError(f"unknown row {row!r}; expected one of {', '.join(ROWS)}")
    if runs < 1:
        raise ValueError("runs must be at least 1")
    if row in ("bulk", "parallel") and size_mib < 1:
        raise ValueError("size_mib must be at least 1")
    if opens_concurrency < 1:
        raise ValueError("opens_concurrency must be at least 1")
    reason = available()
    if reason is not None:
        raise RuntimeError(f"libp2p {row}: {reason}")
    return [_run_once(row, size_mib * MiB, opens_concurrency) for _ in range(runs)]


def _tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace").strip()
    except OSError:
        return "(no stderr)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty stderr)"


def _line_reader(stream: IO[str]) -> queue.Queue[str | None]:
    """Lines of ``stream`` from a daemon thread (None at EOF), so reads can time out."""
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        with stream:
            for line in stream:
                lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return lines


def _expect(
    lines: queue.Queue[str | None],
    tag: str,
    deadline: float,
    watch: list[subprocess.Popen[str]],
) -> str | None:
    """The payload of the next ``TAG payload`` line.

    None at end of output, at the deadline, or as soon as a watched process
    has exited with an error.
    """
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=min(0.2, max(0.0, deadline - time.monotonic())))
        except queue.Empty:
            if any(proc.poll() not in (None, 0) for proc in watch):
                return None
            continue
        if line is None:
            return None
        if line.startswith(tag + " "):
            return line[len(tag) + 1 :].strip()
    return None


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


def _run_once(row: str, size: int, opens_concurrency: int) -> float:
    """One server process and one client process; the measuring side prints RESULT."""
    # -P: do not put bench/ on the subprocess's sys.path (its modules could shadow).
    script = [_python(), "-P", str(Path(__file__).resolve())]
    common = ["--row", row, "--size", str(size), "--concurrency", str(opens_concurrency)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("LIBP2P_DEBUG", None)  # libp2p then logs only warnings, to stderr
    workdir = Path(tempfile.mkdtemp(prefix="libp2p-bench-"))
    server_err, client_err = workdir / "server.err", workdir / "client.err"
    procs: list[subprocess.Popen[str]] = []

    def failure(why: str) -> RuntimeError:
        names = ("server", "client")[: len(procs)]
        codes = ", ".join(f"{n} exit {p.poll()}" for n, p in zip(names, procs, strict=True))
        return RuntimeError(
            f"libp2p {row}: {why} ({codes})\n--- server stderr:\n{_tail(server_err)}"
            + (f"\n--- client stderr:\n{_tail(client_err)}" if len(procs) > 1 else "")
        )

    def spawn(args: list[str], stderr: IO[str]) -> tuple[subprocess.Popen[str], Any]:
        proc = subprocess.Popen(
            [*script, *args, *common],
            stdout=subprocess.PIPE,
            stderr=stderr,
            stdin=subprocess.DEVNULL,
            text=True,
            cwd=workdir,
            env=env,
        )
        procs.append(proc)
        assert proc.stdout is not None
        return proc, _line_reader(proc.stdout)

    try:
        with server_err.open("w") as s_err, client_err.open("w") as c_err:
            _, server_lines = spawn(["server"], s_err)
            address = _expect(server_lines, "ADDR", time.monotonic() + 60, procs)
            if address is None:
                raise failure("the server gave no address")
            client, client_lines = spawn(["client", "--addr", address], c_err)
            deadline = time.monotonic() + TIMEOUT
            # bulk/parallel: the receiving server measures; the other rows: the client.
            lines = server_lines if row in ("bulk", "parallel") else client_lines
            result = _expect(lines, "RESULT", deadline, procs)
            if result is None:
                late = time.monotonic() >= deadline
                raise failure(f"timed out after {TIMEOUT:.0f} s" if late else "no result")
            with contextlib.suppress(subprocess.TimeoutExpired):
                client.wait(timeout=15)  # it exits by itself once done; else killed below
            if client.poll() not in (0, None):
                raise failure("the client failed")
            return float(json.loads(result)["value"])
    finally:
        for proc in procs:
            _stop(proc)
        shutil.rmtree(workdir, ignore_errors=True)


# --------------------------------------------------------------------------
# Subprocess side: trio + libp2p (imported only here).
# --------------------------------------------------------------------------


def _report(tag: str, payload: str) -> None:
    print(f"{tag} {payload}", flush=True)


def _make_host(*, client: bool) -> IHost:
    """A host restricted to TCP + Noise + yamux (libp2p otherwise offers TLS, secio, plaintext, mplex)."""  # noqa: E501
    from libp2p import new_host
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.crypto.x25519 import create_new_key_pair as create_x25519
    from libp2p.custom_types import TProtocol
    from libp2p.network.config import ConnectionConfig
    from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_ID
    from libp2p.security.noise.transport import Transport as NoiseTransport
    from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_ID
    from libp2p.stream_muxer.yamux.yamux import Yamux

    key_pair = create_new_key_pair()
    noise = NoiseTransport(key_pair, noise_privkey=create_x25519().private_key)
    return new_host(
        key_pair=key_pair,
        sec_opt={TProtocol(NOISE_ID): noise},
        muxer_opt={TProtocol(YAMUX_ID): Yamux},
        # With the default of 3 a dial waits a fixed 250 ms (happy eyeballs)
        # for further connections before it returns.
        connection_config=ConnectionConfig(max_connections_per_peer=1) if client else None,
    )


async def _read_exactly(stream: INetStream, n: int) -> bytes:
    data = b""
    while len(data) < n:
        data += await stream.read(n - len(data))  # raises StreamEOF at the end
    return data


async def _serve(row: str, size: int) -> None:
    import multiaddr  # type: ignore[import-untyped,unused-ignore]
    import trio
    from libp2p.custom_types import TProtocol
    from libp2p.network.stream.exceptions import StreamEOF, StreamReset

    streams = PARALLEL_STREAMS if row == "parallel" else 1
    per_stream = size // streams
    first: list[float] = []
    last: list[float] = []
    received: list[int] = []
    all_done = trio.Event()
    finished = 0

    async def sink(stream: INetStream) -> None:
        """Drain ``per_stream`` bytes, wait for the other streams, then ack with 1 byte."""
        nonlocal finished
        chunk = await stream.read(CHUNK)
        first.append(time.perf_counter())
        total = len(chunk)
        try:
            while total < per_stream:
                total += len(await stream.read(CHUNK))
        except (StreamEOF, StreamReset):
            pass  # short: reported by the size check below
        last.append(time.perf_counter())
        received.append(total)
        finished += 1
        if finished == streams:
            all_done.set()
        await all_done.wait()
        await stream.write(b"k")
        await stream.close()

    async def echo(stream: INetStream) -> None:
        try:
            while True:
                await stream.write(await stream.read(CHUNK))
        except (StreamEOF, StreamReset):
            pass
        finally:
            await stream.close()

    host = _make_host(client=False)
    handler = sink if row in ("bulk", "parallel") else echo
    host.set_stream_handler(TProtocol(PROTOCOL), handler)
    listen = multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")
    async with host.run(listen_addrs=[listen]):
        _report("ADDR", str(host.get_addrs()[0]))
        if row in ("bulk", "parallel"):
            await all_done.wait()
            seconds = max(last) - min(first)
            total = sum(received)
            if total != size:
                raise RuntimeError(f"received {total} bytes, expected {size}")
            _report("RESULT", json.dumps({"value": total / seconds / 1e6, "bytes": total}))
            await trio.sleep(1)  # let the acks go out; the driver then stops us
        else:
            await trio.sleep_forever()


async def _client(row: str, size: int, address: str, concurrency: int) -> None:
    import multiaddr  # type: ignore[import-untyped,unused-ignore]
    import trio
    from libp2p.custom_types import TProtocol
    from libp2p.peer.peerinfo import info_from_p2p_addr

    peer = info_from_p2p_addr(multiaddr.Multiaddr(address))
    protocol = [TProtocol(PROTOCOL)]

    if row == "setup":
        times: list[float] = []
        for i in range(SETUP_WARMUP + SETUP_DIALS):
            host = _make_host(client=True)  # key generation: not timed
            async with host.run(listen_addrs=[]):  # host start: not timed
                start = time.perf_counter()
                await host.connect(peer)
                stream = await host.new_stream(peer.peer_id, protocol)
                await stream.write(b"x")
                echoed = await _read_exactly(stream, 1)
                elapsed = time.perf_counter() - start
                if echoed != b"x":
                    raise RuntimeError(f"bad echo {echoed!r}")
                if i >= SETUP_WARMUP:
                    times.append(elapsed)
                await stream.close()
                await host.close()
        value = statistics.median(times)
        _report("RESULT", json.dumps({"value": value, "all": times}))
        return

    host = _make_host(client=True)
    async with host.run(listen_addrs=[]):
        await host.connect(peer)
        if row in ("bulk", "parallel"):
            streams = PARALLEL_STREAMS if row == "parallel" else 1
            payload = os.urandom(CHUNK)

            async def send(amount: int) -> None:
                stream = await host.new_stream(peer.peer_id, protocol)
                sent = 0
                while sent < amount:
                    piece = payload[: min(CHUNK, amount - sent)]
                    await stream.write(piece)
                    sent += len(piece)
                ack = await stream.read(1)  # everything arrived
                if ack != b"k":
                    raise RuntimeError(f"bad ack {ack!r}")
                await stream.close()

            async with trio.open_nursery() as nursery:
                for _ in range(streams):
                    nursery.start_soon(send, size // streams)
        elif row == "rtt":
            stream = await host.new_stream(peer.peer_id, protocol)
            message = os.urandom(RTT_SIZE)
            rtts: list[float] = []
            for i in range(RTT_WARMUP + RTT_ROUNDS):
                start = time.perf_counter()
                await stream.write(message)
                echoed = await _read_exactly(stream, RTT_SIZE)
                elapsed = time.perf_counter() - start
                if echoed != message:
                    raise RuntimeError("bad echo")
                if i >= RTT_WARMUP:
                    rtts.append(elapsed)
            await stream.close()
            value = statistics.median(rtts) * 1e6
            _report("RESULT", json.dumps({"value": value}))
        elif row == "opens":

            async def one() -> None:
                stream = await host.new_stream(peer.peer_id, protocol)
                await stream.write(b"o")
                echoed = await _read_exactly(stream, 1)
                if echoed != b"o":
                    raise RuntimeError(f"bad echo {echoed!r}")
                await stream.close()

            async def worker(count: int) -> None:
                for _ in range(count):
                    await one()

            for _ in range(OPENS_WARMUP):
                await one()
            start = time.perf_counter()
            async with trio.open_nursery() as nursery:
                share, extra = divmod(OPENS_COUNT, concurrency)
                for w in range(concurrency):
                    nursery.start_soon(worker, share + (1 if w < extra else 0))
            elapsed = time.perf_counter() - start
            _report("RESULT", json.dumps({"value": OPENS_COUNT / elapsed}))
        await host.close()


def main() -> None:
    parser = argparse.ArgumentParser(description="py-libp2p bench peer (internal)")
    parser.add_argument("role", choices=["server", "client"])
    parser.add_argument("--row", choices=ROWS, required=True)
    parser.add_argument("--size", type=int, default=0, help="bytes (bulk, parallel)")
    parser.add_argument("--addr", help="the server's multiaddr (client)")
    parser.add_argument("--concurrency", type=int, default=OPENS_CONCURRENCY, help="opens")
    args = parser.parse_args()
    import trio

    async def bounded() -> None:
        with trio.fail_after(TIMEOUT):
            if args.role == "server":
                await _serve(args.row, args.size)
            else:
                await _client(args.row, args.size, args.addr, args.concurrency)

    trio.run(bounded)


if __name__ == "__main__":
    main()
