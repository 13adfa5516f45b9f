"""Fault injection for tests: a chaos TCP proxy, a hand-driven capsock dialer, a relay process.

:class:`ChaosProxy` sits between a dialer and a real listener::

    dialer --tcp--> ChaosProxy --tcp--> listener (a Node, a relay, ...)

Point a capability at it with ``proxy.route(cap)`` (``cap.with_hints((TcpHint(
"127.0.0.1", proxy.port),))``).  Its behaviour is switchable at runtime, for all
connections at once and per direction (``"up"``: dialer to listener, ``"down"``:
back, ``"both"``):

========================  ==========================================================
``pass_()``               forward everything unchanged (the default)
``await cut()``           close both sides of every connection; new ones are closed
                          at once until the mode changes
``stall()``               stop forwarding (bytes are held, connections stay open)
``delay(s)``              sleep ``s`` seconds before forwarding each unit
``fragment(n)``           forward each unit in pieces of 1..``n`` bytes
``corrupt(at=, bit=)``    flip one bit: at byte offset ``at`` of each connection's
                          stream in that direction, or (``at=None``) at a random
                          place in the next unit; ``count`` flips in all
``drop(count)``           drop the next ``count`` units
``duplicate(count)``      forward the next ``count`` units twice
``reorder(count)``        hold a unit back and forward it after the next one
``rewrite(fn, count)``    forward ``fn(unit)`` instead of the next ``count`` units
========================  ==========================================================

A *unit* is what one read returned (``unit="chunk"``, the default: arbitrary
slices of the byte stream, like a real network) or one capsock transport record
(``unit="record"``: 2-byte length + message, so faults hit whole Noise messages).
``capture=True`` keeps every unit per connection (``proxy.connections[i].units``)
so tests can replay or splice them; :meth:`Connection.inject` writes arbitrary
bytes into a live connection.

:class:`RawDialer` completes a real capsock handshake over a plain TCP socket
with :class:`capsock.core.handshake.InitiatorHandshake` and then sends whatever
records a test crafts; it decrypts what the node answers with a sans-IO
:class:`capsock.core.mux.Mux`.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import socket
import subprocess
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
from anyio.abc import SocketAttribute

from capsock.core.frames import Frame, decode_frames, encode_frame
from capsock.core.handshake import HandshakeResult, InitiatorHandshake
from capsock.core.records import RecordReader
from capsock.errors import ProtocolError
from capsock.keys import KeyPair, NodeId
from capsock.uri import Capability, TcpHint

__all__ = [
    "ChaosProxy",
    "Connection",
    "NodeProcess",
    "RawDialer",
    "RelayProcess",
    "free_port",
    "percentile",
    "record",
    "rss_of",
]

ROOT = Path(__file__).resolve().parents[1]
DIRECTIONS = ("up", "down")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def record(message: bytes) -> bytes:
    """A transport record: 2-byte big-endian length + ``message``."""
    return len(message).to_bytes(2, "big") + message


def _nodelay(stream: anyio.abc.SocketStream) -> None:
    with contextlib.suppress(OSError, anyio.TypedAttributeLookupError):
        sock = stream.extra(SocketAttribute.raw_socket)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _hard_close(stream: anyio.abc.SocketStream) -> None:
    """Shut the socket down now (wakes pending receives on every backend)."""
    with contextlib.suppress(OSError, anyio.TypedAttributeLookupError):
        stream.extra(SocketAttribute.raw_socket).shutdown(socket.SHUT_RDWR)


@dataclass
class _Fault:
    mode: str = "pass"
    directions: frozenset[str] = frozenset(DIRECTIONS)
    seconds: float = 0.0
    max_piece: int = 1
    at: int | None = None
    bit: int | None = None
    remaining: int = 0
    fn: Callable[[bytes], bytes] | None = None

    def hits(self, direction: str) -> bool:
        return direction in self.directions


@dataclass
class Connection:
    """One proxied connection (dialer side ``client``, listener side ``server``)."""

    client: anyio.abc.SocketStream
    server: anyio.abc.SocketStream
    index: int
    units: dict[str, list[bytes]] = field(default_factory=lambda: {"up": [], "down": []})
    """Captured units per direction (only with ``capture=True``)."""
    position: dict[str, int] = field(default_factory=lambda: {"up": 0, "down": 0})
    """Bytes that entered the proxy so far, per direction."""
    forwarded: dict[str, int] = field(default_factory=lambda: {"up": 0, "down": 0})
    corrupted: set[str] = field(default_factory=set)
    held: dict[str, bytes | None] = field(default_factory=lambda: {"up": None, "down": None})
    locks: dict[str, anyio.Lock] = field(
        default_factory=lambda: {"up": anyio.Lock(), "down": anyio.Lock()}
    )
    closed: bool = False

    def target(self, direction: str) -> anyio.abc.SocketStream:
        return self.server if direction == "up" else self.client

    async def inject(self, direction: str, data: bytes) -> None:
        """Write ``data`` into the connection as if the other side had sent it."""
        async with self.locks[direction]:
            await self.target(direction).send(data)

    def close_now(self) -> None:
        self.closed = True
        _hard_close(self.client)
        _hard_close(self.server)


class ChaosProxy:
    """A TCP proxy on 127.0.0.1 whose faults can be switched at runtime (module doc)."""

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        unit: str = "chunk",
        capture: bool = False,
        seed: int | None = None,
    ) -> None:
        if unit not in ("chunk", "record"):
            raise ValueError("unit is 'chunk' or 'record'")
        self.target_host = target_host
        self.target_port = target_port
        self.unit = unit
        self.capture = capture
        self.rng = random.Random(seed)
        self.connections: list[Connection] = []
        self.faults_applied = 0
        """Units dropped, duplicated, reordered, corrupted or cut so far."""
        self._fault = _Fault()
        self._changed = anyio.Event()
        self._listener: anyio.abc.Listener[anyio.abc.SocketStream] | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self.port = 0

    # ------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> ChaosProxy:
        self._listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        self.port = int(self._listener.extra(SocketAttribute.local_port))
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self._tg.start_soon(self._serve)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        assert self._tg is not None and self._listener is not None
        self._tg.cancel_scope.cancel()
        for conn in self.connections:
            conn.close_now()
        await self._tg.__aexit__(None, None, None)
        await self._listener.aclose()
        return None

    def route(self, cap: Capability) -> Capability:
        """``cap`` with its only route hint pointing at this proxy."""
        return cap.with_hints((TcpHint("127.0.0.1", self.port),))

    @property
    def live(self) -> list[Connection]:
        return [c for c in self.connections if not c.closed]

    def forwarded(self, direction: str = "down") -> int:
        """Bytes forwarded in ``direction`` over all connections."""
        return sum(c.forwarded[direction] for c in self.connections)

    # ------------------------------------------------------------ switches

    def _set(self, mode: str, direction: str = "both", **params: Any) -> None:
        dirs = frozenset(DIRECTIONS) if direction == "both" else frozenset({direction})
        if not dirs <= set(DIRECTIONS):
            raise ValueError("direction is 'up', 'down' or 'both'")
        self._fault = _Fault(mode, dirs, **params)
        for conn in self.connections:
            conn.corrupted.clear()
        self._changed.set()
        self._changed = anyio.Event()

    def pass_(self) -> None:
        """Forward everything unchanged (units held by ``reorder`` are released)."""
        self._set("pass")

    async def cut(self) -> None:
        """Close both sides of every connection; refuse new ones until the mode changes."""
        self._set("cut")
        for conn in self.live:
            conn.close_now()
            self.faults_applied += 1
        await anyio.lowlevel.checkpoint()

    def stall(self, direction: str = "both") -> None:
        """Stop forwarding in ``direction`` (bytes are kept and sent on ``pass_()``)."""
        self._set("stall", direction)

    def delay(self, seconds: float, direction: str = "both") -> None:
        self._set("delay", direction, seconds=seconds)

    def fragment(self, max_piece: int, direction: str = "both") -> None:
        """Forward every unit in pieces of 1..``max_piece`` bytes (separate writes)."""
        if max_piece < 1:
            raise ValueError("max_piece >= 1")
        self._set("fragment", direction, max_piece=max_piece)

    def corrupt(
        self,
        at: int | None = None,
        *,
        bit: int | None = None,
        direction: str = "both",
        count: int = 1,
    ) -> None:
        """Flip bit ``bit`` (random if None) of the byte at offset ``at`` of each
        connection's stream in ``direction`` (once per connection and direction),
        or with ``at=None`` of a random byte of the next unit; ``count`` flips in all."""
        self._set("corrupt", direction, at=at, bit=bit, remaining=count)

    def drop(self, count: int = 1, direction: str = "both") -> None:
        self._set("drop", direction, remaining=count)

    def duplicate(self, count: int = 1, direction: str = "both") -> None:
        self._set("duplicate", direction, remaining=count)

    def rewrite(
        self, fn: Callable[[bytes], bytes], direction: str = "both", count: int = 1
    ) -> None:
        """Forward ``fn(unit)`` instead of the next ``count`` units (an active attacker)."""
        self._set("rewrite", direction, fn=fn, remaining=count)

    def reorder(self, count: int = 1, direction: str = "both") -> None:
        """Swap ``count`` pairs of consecutive units."""
        self._set("reorder", direction, remaining=count)

    # ------------------------------------------------------------ serving

    async def _serve(self) -> None:
        assert self._listener is not None and self._tg is not None
        tg = self._tg

        async def handle(client: anyio.abc.SocketStream) -> None:
            tg.start_soon(self._handle, client)

        await self._listener.serve(handle)

    async def _handle(self, client: anyio.abc.SocketStream) -> None:
        async with client:
            if self._fault.mode == "cut":
                self.faults_applied += 1
                return
            try:
                server = await anyio.connect_tcp(self.target_host, self.target_port)
            except OSError:
                return
            async with server:
                _nodelay(client)
                _nodelay(server)
                conn = Connection(client, server, len(self.connections))
                self.connections.append(conn)
                try:
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(self._pump, conn, "up", tg.cancel_scope)
                        tg.start_soon(self._pump, conn, "down", tg.cancel_scope)
                finally:
                    conn.closed = True

    async def _pump(self, conn: Connection, direction: str, scope: anyio.CancelScope) -> None:
        src = conn.client if direction == "up" else conn.server
        dst = conn.target(direction)
        pending = bytearray()
        try:
            while True:
                try:
                    data = await src.receive(65536)
                except anyio.EndOfStream:
                    break
                for unit in self._units(pending, data):
                    await self._forward(conn, direction, unit)
            held = conn.held[direction]
            if held is not None:
                conn.held[direction] = None
                await self._write(conn, direction, held)
            if pending:
                await self._write(conn, direction, bytes(pending))
            async with conn.locks[direction]:
                await dst.send_eof()
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            conn.close_now()
            scope.cancel()

    def _units(self, pending: bytearray, data: bytes) -> Iterable[bytes]:
        if self.unit == "chunk":
            yield data
            return
        pending += data
        while len(pending) >= 2:
            size = 2 + ((pending[0] << 8) | pending[1])
            if len(pending) < size:
                break
            unit = bytes(pending[:size])
            del pending[:size]
            yield unit

    async def _forward(self, conn: Connection, direction: str, unit: bytes) -> None:
        start = conn.position[direction]
        conn.position[direction] = start + len(unit)
        if self.capture:
            conn.units[direction].append(unit)
        while True:
            fault = self._fault
            if fault.mode == "cut":
                conn.close_now()
                raise anyio.ClosedResourceError
            if fault.mode == "stall" and fault.hits(direction):
                await self._changed.wait()
                continue
            break
        held = conn.held[direction]
        if held is not None and not (fault.mode == "reorder" and fault.hits(direction)):
            conn.held[direction] = None  # the reorder fault ended: release what it held
            await self._write(conn, direction, held)
        if not fault.hits(direction) or fault.mode == "pass":
            await self._write(conn, direction, unit)
            return
        mode = fault.mode
        if mode == "delay":
            await anyio.sleep(fault.seconds)
            await self._write(conn, direction, unit)
        elif mode == "fragment":
            pos = 0
            while pos < len(unit):
                size = self.rng.randint(1, fault.max_piece)
                await self._write(conn, direction, unit[pos : pos + size])
                pos += size
                if fault.max_piece <= 16:
                    await anyio.lowlevel.checkpoint()
        elif mode == "corrupt":
            await self._write(conn, direction, self._corrupted(conn, direction, unit, start))
        elif mode == "rewrite" and fault.remaining > 0 and fault.fn is not None:
            fault.remaining -= 1
            self.faults_applied += 1
            await self._write(conn, direction, fault.fn(unit))
        elif mode == "drop" and fault.remaining > 0:
            fault.remaining -= 1
            self.faults_applied += 1
        elif mode == "duplicate" and fault.remaining > 0:
            fault.remaining -= 1
            self.faults_applied += 1
            await self._write(conn, direction, unit)
            await self._write(conn, direction, unit)
        elif mode == "reorder" and (fault.remaining > 0 or held is not None):
            if held is None:
                conn.held[direction] = unit
            else:
                conn.held[direction] = None
                fault.remaining -= 1
                self.faults_applied += 1
                await self._write(conn, direction, unit)
                await self._write(conn, direction, held)
        else:
            await self._write(conn, direction, unit)

    def _corrupted(self, conn: Connection, direction: str, unit: bytes, start: int) -> bytes:
        fault = self._fault
        if fault.remaining <= 0 or not unit:
            return unit
        if fault.at is None:
            index = self.rng.randrange(len(unit))
        else:
            if direction in conn.corrupted or not start <= fault.at < start + len(unit):
                return unit
            index = fault.at - start
            conn.corrupted.add(direction)
        bit = self.rng.randrange(8) if fault.bit is None else fault.bit
        fault.remaining -= 1
        self.faults_applied += 1
        out = bytearray(unit)
        out[index] ^= 1 << bit
        return bytes(out)

    async def _write(self, conn: Connection, direction: str, data: bytes) -> None:
        async with conn.locks[direction]:
            await conn.target(direction).send(data)
        conn.forwarded[direction] += len(data)


# ---------------------------------------------------------------- raw dialer


class RawDialer:
    """A capsock dialer driven by hand over a plain TCP socket (module doc).

    ``await RawDialer.connect(host, port, node_id)`` runs the real IK handshake;
    then :meth:`seal` turns frames into an encrypted record (advancing the send
    nonce), :meth:`send` writes bytes, and :meth:`read_frames` decrypts and
    decodes what the node answers until the node hangs up or the time is up.
    """

    def __init__(self, sock: anyio.abc.SocketStream, result: HandshakeResult, key: KeyPair) -> None:
        self.sock = sock
        self.result = result
        self.key = key
        self.cipher = result.cipher
        self.reader = RecordReader()
        self.received_records: list[bytes] = []
        """Every raw record (message without prefix) the node sent after message 2."""
        self.frames: list[Frame] = []
        """Every frame decrypted so far."""
        self.closed = False
        """The node hung up."""
        self.error: ProtocolError | None = None
        """Set when a record from the node failed to decrypt or decode."""

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        remote: NodeId,
        key: KeyPair | None = None,
        first_message: bytes | None = None,
    ) -> RawDialer:
        key = key or KeyPair.generate()
        hs = InitiatorHandshake(key, remote)
        sock = await anyio.connect_tcp(host, port)
        _nodelay(sock)
        try:
            await sock.send(hs.first_message() if first_message is None else first_message)
            buf = bytearray()
            while len(buf) < 2 or len(buf) < 2 + ((buf[0] << 8) | buf[1]):
                buf += await sock.receive()
            size = 2 + ((buf[0] << 8) | buf[1])
            result = hs.read_second(bytes(buf[2:size]))
        except BaseException:
            await sock.aclose()
            raise
        dialer = cls(sock, result, key)
        dialer.reader.feed(bytes(buf[size:]))
        return dialer

    def seal(self, *frames: Frame | bytes) -> bytes:
        """One encrypted record carrying ``frames`` (or raw plaintext bytes)."""
        plaintext = b"".join(f if isinstance(f, bytes) else encode_frame(f) for f in frames)
        return self.cipher.encrypt_record(plaintext)

    async def send(self, data: bytes) -> None:
        await self.sock.send(data)

    async def read_frames(
        self, seconds: float, until: Callable[[list[Frame]], bool] | None = None
    ) -> list[Frame]:
        """Decrypt what arrives for up to ``seconds``, until the node hangs up
        or ``until(self.frames)`` is true; return every frame so far."""
        with anyio.move_on_after(seconds):
            while not self.closed:
                while (rec := self.reader.next_record()) is not None:
                    raw = bytes(rec)
                    self.received_records.append(raw)
                    if self.error is None:
                        try:
                            self.frames.extend(decode_frames(self.cipher.decrypt(raw)))
                        except ProtocolError as exc:
                            self.error = exc
                if until is not None and until(self.frames):
                    break
                try:
                    data = await self.sock.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                    self.closed = True
                    break
                self.reader.feed(data)
        return self.frames

    async def aclose(self) -> None:
        await self.sock.aclose()

    async def __aenter__(self) -> RawDialer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


# ---------------------------------------------------------------- relay process


class RelayProcess:
    """`capsock relay` in a subprocess (the real command line), as tests/test_relay.py."""

    def __init__(self, state: Path, port: int) -> None:
        self.port = port
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "capsock", "relay", "--listen", f"tcp:127.0.0.1:{port}",
             "--state-dir", str(state)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )  # fmt: skip
        assert self.proc.stdout is not None
        self.uri = self.proc.stdout.readline().strip()
        assert self.uri.startswith("capsock://"), "the relay did not print its capability"

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def rss_of(pid: int) -> int:
    """Resident set size of process ``pid`` in bytes (``VmRSS`` in /proc)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0  # pragma: no cover


def percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# ---------------------------------------------------------------- a node in its own process


class NodeProcess:
    """An echo node in a subprocess, so that its memory can be measured alone.

    ``python -m tests.chaos node BACKEND CONFIG_JSON`` prints one JSON line
    (``{"uri": ...}``), serves an echo on that capability, answers ``stats``
    lines on stdin with one JSON line of counters, and exits when stdin closes.
    ``CONFIG_JSON`` holds :class:`capsock.NodeConfig` fields (``session_*``
    keys go to its :class:`capsock.SessionConfig`).
    """

    def __init__(self, backend: str, **config: float) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.chaos", "node", backend, json.dumps(config)],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, "the node process did not start"
        self.uri = Capability.parse(json.loads(line)["uri"])
        hint = self.uri.hints[0]
        assert isinstance(hint, TcpHint)
        self.host, self.port = hint.host, hint.port

    @property
    def rss(self) -> int:
        return rss_of(self.proc.pid)

    def stats(self) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("stats\n")
        self.proc.stdin.flush()
        return dict(json.loads(self.proc.stdout.readline()))

    def stop(self) -> None:
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


async def _serve_node(config_json: str) -> None:
    import capsock
    from capsock.testing import echo

    fields = json.loads(config_json)
    session = {k[len("session_") :]: v for k, v in fields.items() if k.startswith("session_")}
    node_fields = {k: v for k, v in fields.items() if not k.startswith("session_")}
    config = capsock.NodeConfig(session=capsock.SessionConfig(**session), **node_fields)
    async with (
        capsock.Node(listen=["tcp:127.0.0.1:0"], config=config) as node,
        anyio.create_task_group() as tg,
    ):
        listener = await node.listen()
        tg.start_soon(listener.serve, echo)
        print(json.dumps({"uri": str(listener.uri)}), flush=True)
        while True:
            line = await anyio.to_thread.run_sync(sys.stdin.readline)
            if not line:
                break
            stats = node.stats()
            stats["sessions"] = len(stats["sessions"])
            print(json.dumps(stats), flush=True)
        tg.cancel_scope.cancel()


if __name__ == "__main__":
    if sys.argv[1:2] == ["node"]:
        anyio.run(_serve_node, sys.argv[3], backend=sys.argv[2])
