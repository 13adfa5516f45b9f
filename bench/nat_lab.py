"""The NAT lab rows: two nodes behind two home NATs meet through a relay, then go direct.

    sudo .venv/bin/python -m bench.nat_lab --size 64 --runs 3   # these rows alone, printed
    sudo .venv/bin/python -m bench --rows nat                     # the same, as bench rows

Needs root and ``ip netns`` (iproute2) and ``iptables``; without them the rows
say ``skipped: needs root + ip netns`` instead of numbers.

The lab (network namespaces named ``capsock-bench-<pid>-<6 hex>-<host>``, only
documentation addresses, deleted with every process in them when the lab
closes, on errors, Ctrl-C and SIGTERM too; a lab left by a SIGKILLed run is
removed by the next one)::

    relay   br0 203.0.113.10/24 (the "internet", and the relay's host)
    nat1    wan 203.0.113.21 | lan 192.0.2.1/25      MASQUERADE out of wan; unsolicited
    nat2    wan 203.0.113.22 | lan 198.51.100.1/25   inbound dropped on INPUT and FORWARD
    a       192.0.2.10/25 behind nat1                (the dialing node)
    b       198.51.100.10/25 behind nat2             (the listening node, registered with
                                                      the relay)
    d1, d2  198.51.100.129/25 and .130/25 on one veth link of their own (the baseline)

Every node is its own process in its namespace (``python -m bench.nat_lab
peer ROLE ...``), on the bench's backend, with default settings unless said
otherwise.  Per run, interleaved (drift on the shared machine hits each alike):

- **punched**: a fresh node in ``a`` connects to ``b``'s capability (through
  the relay: ``connect()`` never waits for the punch), waits for the direct
  path, then sends ``--size`` MiB on a *new* stream (it takes the punched
  session), then the same on the stream ``connect()`` returned (opened before
  the punch: relayed as long as open streams do not move to the direct path).
  The times of ``connect()``, of the relayed session coming up (the log line
  "reached node ...") and of the direct path (the log line "direct path to ...
  established") are taken in that process.
- **relayed**: the same dial with ``NodeConfig(direct_paths=False)``: the round
  trip of a 64-byte echo on the relayed session (median of 200), then ``--size``
  MiB through the relay.
- **veth**: ``--size`` MiB between ``d1`` and ``d2``, a plain direct session.

The receiver times from its first payload chunk to its last (setup is not in
the number).  The relay counts every byte it forwards (its forwarder's tap);
the share of a transfer that crossed the relay is the counter's growth during
the transfer divided by the payload (about 100 % for a relayed one-way
transfer, plus framing; about 0 % for a direct one).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import json
import logging
import math
import os
import secrets
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

MiB = 1 << 20
ROOT = Path(__file__).resolve().parents[1]
PREFIX = "capsock-bench-"
NETNS_DIR = Path("/run/netns")
SKIPPED = "skipped: needs root + ip netns"
RTT_PINGS = 200
PING_SIZE = 64
DIRECT_TIMEOUT = 30.0
"""Seconds a run waits for the direct path (3 punch attempts of 2 s fit many times)."""
ROW_NAMES = ("nat", "nat direct path", "nat relay share")

_SBIN = "/usr/local/sbin:/usr/sbin:/sbin"
_CLONE_NEWNET = 0x40000000

HOSTS = ("relay", "nat1", "nat2", "a", "b", "d1", "d2")
ADDR = {
    "relay": "203.0.113.10",
    "nat1": "203.0.113.21",
    "nat2": "203.0.113.22",
    "a": "192.0.2.10",
    "b": "198.51.100.10",
    "d1": "198.51.100.129",
    "d2": "198.51.100.130",
}
_LAN = {"nat1": ("192.0.2.1", "a"), "nat2": ("198.51.100.1", "b")}  # router: (lan addr, host)

Values = dict[str, list[float] | dict[str, str]]


class LabError(RuntimeError):
    """Building or driving the lab failed; the message says which step (and a peer's stderr)."""


# --------------------------------------------------------------------------- commands


def _which(cmd: str) -> str | None:
    return shutil.which(cmd) or shutil.which(cmd, path=_SBIN)


def _cmd(argv: list[str], timeout: float = 20.0) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LabError(f"{' '.join(argv)}: {exc}") from exc
    if proc.returncode != 0:
        raise LabError(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


def _in_netns(name: str, fn: Callable[[], None]) -> None:
    """Run ``fn`` in a thread that joined network namespace ``name`` (for its /proc/sys/net)."""
    error: list[BaseException] = []

    def target() -> None:
        try:
            fd = os.open(NETNS_DIR / name, os.O_RDONLY | os.O_CLOEXEC)
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                if libc.setns(fd, _CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, os.strerror(err))
            finally:
                os.close(fd)
            fn()
        except BaseException as exc:
            error.append(exc)

    thread = threading.Thread(target=target, name=f"netns-{name}", daemon=True)
    thread.start()
    thread.join()
    if error:
        raise LabError(f"in namespace {name}: {error[0]}")


def _sysctl(values: dict[str, str], optional: bool = False) -> Callable[[], None]:
    def write() -> None:
        for key, value in values.items():
            try:
                Path("/proc/sys", *key.split(".")).write_text(value)
            except FileNotFoundError:
                if not optional:
                    raise

    return write


def _netns_pids(ip: str, name: str) -> list[int]:
    try:
        out = subprocess.run(
            [ip, "netns", "pids", name], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [int(p) for p in out.split() if p.isdigit() and int(p) != os.getpid()]


def _delete_netns(ip: str, name: str) -> None:
    """Kill what still runs in ``name`` (the lab started all of it), then delete it."""
    for _ in range(50):
        pids = _netns_pids(ip, name)
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.02)
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        subprocess.run([ip, "netns", "delete", name], capture_output=True, timeout=10, check=False)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cleanup_stale() -> list[str]:
    """Delete bench labs left by dead runs (``capsock-bench-<pid>-...`` whose pid is gone)."""
    ip = _which("ip")
    if ip is None or not NETNS_DIR.is_dir():
        return []
    removed = []
    for entry in NETNS_DIR.iterdir():
        if not entry.name.startswith(PREFIX):
            continue
        pid = entry.name.removeprefix(PREFIX).split("-", 1)[0]
        if not pid.isdigit() or _pid_alive(int(pid)) or _netns_pids(ip, entry.name):
            continue
        _delete_netns(ip, entry.name)
        removed.append(entry.name)
    return removed


def lab_namespaces(pid: int | None = None) -> list[str]:
    """Names of the bench lab namespaces that exist now (of one creating ``pid``, if given)."""
    if not NETNS_DIR.is_dir():
        return []
    head = PREFIX if pid is None else f"{PREFIX}{pid}-"
    return sorted(e.name for e in NETNS_DIR.iterdir() if e.name.startswith(head))


@functools.cache
def _probe() -> tuple[str | None, str]:
    """(why the lab cannot run here or None, the iptables binary that does NAT in a namespace)."""
    if sys.platform != "linux":
        return f"{SKIPPED} (network namespaces need Linux)", ""
    if os.geteuid() != 0:
        return SKIPPED, ""
    ip = _which("ip")
    if ip is None:
        return f"{SKIPPED} (`ip` not found)", ""
    candidates = [p for p in (_which("iptables"), _which("iptables-legacy")) if p is not None]
    if not candidates:
        return f"{SKIPPED} (`iptables` not found)", ""
    name = f"{PREFIX}{os.getpid()}-{secrets.token_hex(3)}-probe"
    try:
        _cmd([ip, "netns", "add", name])
    except LabError as exc:
        return f"{SKIPPED} ({exc})", ""
    try:
        _cmd([ip, "-n", name, "link", "add", "v0", "type", "veth", "peer", "name", "v1"])
        errors = []
        for ipt in candidates:
            rule = ["-w", "-t", "nat", "-A", "POSTROUTING", "-o", "v0", "-j", "MASQUERADE"]
            try:
                _cmd([ip, "netns", "exec", name, ipt, *rule])
            except LabError as exc:
                errors.append(str(exc))
                continue
            return None, ipt
        return f"{SKIPPED} (iptables cannot NAT in a namespace: {'; '.join(errors)})", ""
    except LabError as exc:
        return f"{SKIPPED} ({exc})", ""
    finally:
        _delete_netns(ip, name)


def available() -> str | None:
    """None if the lab can run here, else the text the rows show instead (cached)."""
    return _probe()[0]


# --------------------------------------------------------------------------- the lab


class Peer:
    """One node process in the lab: JSON lines out, command lines in, stderr to a file."""

    def __init__(self, name: str, argv: list[str], log: Path) -> None:
        self.name = name
        self._log_path = log
        self._log = log.open("wb")
        self.proc: subprocess.Popen[bytes] = subprocess.Popen(
            argv, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log
        )
        self._buf = b""

    def tell(self, text: str) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(text.encode() + b"\n")
            self.proc.stdin.flush()
        except OSError as exc:
            raise LabError(f"{self.name} is gone ({exc}){self._tail()}") from exc

    def line(self, timeout: float = 60.0) -> dict[str, Any]:
        """The next JSON line; LabError on a timeout, an exit, or an ``error`` answer."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise LabError(f"{self.name}: no answer within {timeout:.0f} s{self._tail()}")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                data = os.read(fd, 65536)
                if not data:
                    code = self.proc.wait(timeout=5)
                    raise LabError(f"{self.name} exited with {code}{self._tail()}")
                self._buf += data
        raw, _, self._buf = self._buf.partition(b"\n")
        try:
            answer: dict[str, Any] = json.loads(raw)
        except ValueError as exc:
            raise LabError(f"{self.name} printed {raw[:100]!r}, not a JSON line") from exc
        if "error" in answer:
            raise LabError(f"{self.name}: {answer['error']}")
        return answer

    def ask(self, text: str, timeout: float = 60.0) -> dict[str, Any]:
        self.tell(text)
        return self.line(timeout)

    def _tail(self) -> str:
        with contextlib.suppress(OSError):
            self._log.flush()
            text = self._log_path.read_text(errors="replace").strip()
            if text:
                return f"; its stderr ends: {text[-600:]}"
        return ""

    def stop(self) -> None:
        """Close stdin (the peer exits), then terminate and kill it if it does not."""
        with contextlib.suppress(OSError):
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=3)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(timeout=5)
        with contextlib.suppress(OSError):
            if self.proc.stdout is not None:
                self.proc.stdout.close()
        self._log.close()


class NatBenchLab:
    """The namespaces of the module docstring; a context manager that always tears down."""

    def __init__(self, workdir: Path) -> None:
        reason, self._iptables = _probe()
        if reason is not None:
            raise LabError(reason)
        ip = _which("ip")
        assert ip is not None
        self._ip = ip
        self.workdir = workdir
        self.tag = f"{PREFIX}{os.getpid()}-{secrets.token_hex(3)}"
        self._created: list[str] = []
        self._peers: list[Peer] = []
        self._closed = False
        self.setup_seconds = 0.0

    def __enter__(self) -> NatBenchLab:
        started = time.monotonic()
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        self.setup_seconds = time.monotonic() - started
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def ns(self, host: str) -> str:
        if host not in ADDR:
            raise ValueError(f"unknown lab host {host!r}")
        return f"{self.tag}-{host}"

    def _ipn(self, host: str, command: str) -> None:
        _cmd([self._ip, "-n", self.ns(host), *command.split()])

    def _ipt(self, host: str, rule: str) -> None:
        _cmd([self._ip, "netns", "exec", self.ns(host), self._iptables, "-w", *rule.split()])

    def _build(self) -> None:
        for host in HOSTS:
            _cmd([self._ip, "netns", "add", self.ns(host)])
            self._created.append(self.ns(host))
            self._ipn(host, "link set lo up")
            no_v6 = {"net.ipv6.conf.default.disable_ipv6": "1"}
            _in_netns(self.ns(host), _sysctl(no_v6, optional=True))
        self._ipn("relay", "link add br0 type bridge stp_state 0")
        self._ipn("relay", f"addr add {ADDR['relay']}/24 dev br0")
        self._ipn("relay", "link set br0 up")
        for router, (lan, host) in _LAN.items():
            self._ipn(router, f"link add wan type veth peer name {router} netns {self.ns('relay')}")
            self._ipn("relay", f"link set {router} master br0 up")
            self._ipn(router, f"addr add {ADDR[router]}/24 dev wan")
            self._ipn(router, "link set wan up")
            self._ipn(router, f"link add lan type veth peer name eth0 netns {self.ns(host)}")
            self._ipn(router, f"addr add {lan}/25 dev lan")
            self._ipn(router, "link set lan up")
            self._ipn(host, f"addr add {ADDR[host]}/25 dev eth0")
            self._ipn(host, "link set eth0 up")
            self._ipn(host, f"route add default via {lan}")
            _in_netns(self.ns(router), _sysctl({"net.ipv4.ip_forward": "1"}))
            # A home router: masquerade (ports kept), let in only replies, on both chains.
            self._ipt(router, "-t nat -A POSTROUTING -o wan -j MASQUERADE")
            for chain in ("INPUT", "FORWARD"):
                self._ipt(router, f"-A {chain} -i wan -m conntrack --ctstate "
                          "ESTABLISHED,RELATED -j ACCEPT")  # fmt: skip
                self._ipt(router, f"-A {chain} -i wan -j DROP")
        self._ipn("d1", f"link add eth0 type veth peer name eth0 netns {self.ns('d2')}")
        for host in ("d1", "d2"):
            self._ipn(host, f"addr add {ADDR[host]}/25 dev eth0")
            self._ipn(host, "link set eth0 up")

    def start(self, host: str, role: str, *args: str) -> Peer:
        """``python -m bench.nat_lab peer ROLE ARGS...`` inside ``host``'s namespace."""
        if self._closed:
            raise LabError("the lab is closed")
        argv = [self._ip, "netns", "exec", self.ns(host)]
        argv += [sys.executable, "-m", "bench.nat_lab", "peer", role, *args]
        log = self.workdir / f"{host}-{role}-{len(self._peers)}.log"
        peer = Peer(f"{role} in {host}", argv, log)
        self._peers.append(peer)
        return peer

    def close(self) -> None:
        """Stop every peer, delete every namespace. Idempotent."""
        if self._closed:
            return
        self._closed = True
        with _signals_deferred():
            for peer in reversed(self._peers):
                peer.stop()
            self._peers.clear()
            for name in reversed(self._created):
                _delete_netns(self._ip, name)
            self._created.clear()


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM while tearing down (a second Ctrl-C must not leave namespaces)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signals = {signal.SIGINT, signal.SIGTERM}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """SIGTERM raises SystemExit in the main thread, so ``finally`` blocks tear the lab down."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


# --------------------------------------------------------------------------- measuring


def _share(before: dict[str, Any], after: dict[str, Any], payload: int) -> float:
    """Percent of ``payload`` the relay forwarded between two of its counter readings."""
    return (int(after["bytes"]) - int(before["bytes"])) * 100.0 / payload


def _rate(answer: dict[str, Any]) -> float:
    seconds = float(answer["seconds"])
    if seconds <= 0:
        raise LabError(f"a transfer took no measurable time ({answer})")
    return float(answer["timed_bytes"]) / seconds / 1e6


class _Runs:
    """Per-run values of several rows; a failing group records its error and is not retried."""

    def __init__(self, names: dict[str, tuple[str, ...]]) -> None:
        self.names = names  # group -> the peer keys ("row/peer") it measures
        self.values: dict[str, list[float] | dict[str, str]] = {
            key: [] for keys in names.values() for key in keys
        }

    def run(
        self, group: str, measure: Callable[[], dict[str, float]], say: Callable[[str], None]
    ) -> None:
        keys = self.names[group]
        if any(isinstance(self.values[k], dict) for k in keys):
            return  # failed before
        try:
            got = measure()
        except Exception as exc:  # one group's failure must not sink the other rows
            why = str(exc) if isinstance(exc, LabError) else f"{type(exc).__name__}: {exc}"
            for key in keys:
                self.values[key] = {"error": why[:300]}
            say(f"  nat {group}: {why}")
            return
        for key in keys:
            entry = self.values[key]
            assert isinstance(entry, list)
            entry.append(got[key])
        say("  nat " + group + ": " + ", ".join(f"{k} {got[k]:.4g}" for k in keys))

    def row(self, row: str) -> Values:
        head = f"{row}/"
        return {k.removeprefix(head): v for k, v in self.values.items() if k.startswith(head)}


GROUPS = {
    "punched": (
        "nat/punched",
        "nat/pre-punch stream",
        "nat direct path/up → direct",
        "nat direct path/connect → direct",
        "nat relay share/punched",
        "nat relay share/pre-punch stream",
    ),
    "relayed": ("nat/relayed", "nat direct path/relayed rtt", "nat relay share/relayed"),
    "veth": ("nat/veth",),
}


def _punched(lab: NatBenchLab, relay: Peer, uri: str, size: int, backend: str) -> dict[str, float]:
    client = lab.start("a", "client", backend, uri, "direct")
    try:
        first = client.line(timeout=60)
        if not str(first["route"]).startswith("via "):
            raise LabError(f"the first stream did not go through the relay: {first['route']}")
        times = client.ask("wait-direct", timeout=DIRECT_TIMEOUT + 10)
        timeout = 60.0 + size * 2.0
        before = relay.ask("bytes")
        new = client.ask(f"sink {size} new", timeout=timeout)
        middle = relay.ask("bytes")
        old = client.ask(f"sink {size} first", timeout=timeout)
        after = relay.ask("bytes")
    finally:
        client.stop()
    if not (str(new["route"]).startswith("direct ") and str(new["route"]).endswith("(punched)")):
        raise LabError(f"the stream opened after the punch took {new['route']!r}")
    payload = size * MiB
    for answer in (new, old):
        if answer["bytes"] != payload:
            raise LabError(f"received {answer['bytes']} bytes of {payload}")
    return {
        "nat/punched": _rate(new),
        "nat/pre-punch stream": _rate(old),
        "nat direct path/up → direct": (times["direct"] - times["up"]) * 1e3,
        "nat direct path/connect → direct": times["direct"] * 1e3,
        "nat relay share/punched": _share(before, middle, payload),
        "nat relay share/pre-punch stream": _share(middle, after, payload),
    }


def _relayed(lab: NatBenchLab, relay: Peer, uri: str, size: int, backend: str) -> dict[str, float]:
    client = lab.start("a", "client", backend, uri, "relayed")
    try:
        first = client.line(timeout=60)
        if not str(first["route"]).startswith("via "):
            raise LabError(f"the relayed dial took {first['route']!r}")
        rtt = client.ask(f"rtt {RTT_PINGS} first")
        before = relay.ask("bytes")
        sink = client.ask(f"sink {size} new", timeout=60.0 + size * 2.0)
        after = relay.ask("bytes")
    finally:
        client.stop()
    if sink["bytes"] != size * MiB:
        raise LabError(f"received {sink['bytes']} bytes of {size * MiB}")
    return {
        "nat/relayed": _rate(sink),
        "nat direct path/relayed rtt": float(rtt["rtt"]) * 1e3,
        "nat relay share/relayed": _share(before, after, size * MiB),
    }


def _veth(lab: NatBenchLab, uri: str, size: int, backend: str) -> dict[str, float]:
    client = lab.start("d1", "client", backend, uri, "direct")
    try:
        client.line(timeout=60)
        sink = client.ask(f"sink {size} new", timeout=60.0 + size * 2.0)
    finally:
        client.stop()
    if sink["bytes"] != size * MiB:
        raise LabError(f"received {sink['bytes']} bytes of {size * MiB}")
    return {"nat/veth": _rate(sink)}


def measure(runs: int, size_mib: int, backend: str, say: Callable[[str], None] = print) -> _Runs:
    """Build the lab, run every group ``runs`` times interleaved, tear the lab down."""
    results = _Runs(GROUPS)
    cleanup_stale()
    with (
        _sigterm_unwinds(),
        tempfile.TemporaryDirectory(prefix="capsock-nat-lab-") as tmp,
        NatBenchLab(Path(tmp)) as lab,
    ):
        relay = lab.start("relay", "relay", backend, f"tcp:{ADDR['relay']}:0")
        relay_uri = relay.line()["uri"]
        server = lab.start("b", "serve", backend, "relay", relay_uri)
        baseline = lab.start("d2", "serve", backend, "listen", f"tcp:{ADDR['d2']}:0")
        uri, veth_uri = server.line()["uri"], baseline.line()["uri"]
        say(f"  nat lab up in {lab.setup_seconds:.1f} s ({lab.tag})")
        for _ in range(runs):
            results.run(
                "punched", lambda: _punched(lab, relay, uri, size_mib, backend), say
            )  # fmt: skip
            results.run(
                "relayed", lambda: _relayed(lab, relay, uri, size_mib, backend), say
            )  # fmt: skip
            results.run("veth", lambda: _veth(lab, veth_uri, size_mib, backend), say)
    return results


def _rows(values: Callable[[str], Values], size_mib: int) -> list[dict[str, Any]]:
    return [
        {
            "row": "nat",
            "what": f"one stream, {size_mib} MiB, a -> b, two nodes behind two home NATs"
            " (MASQUERADE, unsolicited inbound dropped) that met through a relay: punched ="
            " a stream opened once the direct path is up; pre-punch stream = the stream"
            " connect() returned before it; relayed = direct_paths=False; veth = two nodes"
            " on one veth link of the lab",
            "unit": "MB/s",
            "higher_is_better": True,
            "values": values("nat"),
            "targets": [{"subject": "punched", "peer": "veth", "op": ">=", "ratio": 0.9}],
        },
        {
            "row": "nat direct path",
            "what": "time to the direct path (log line 'direct path ... established') from"
            " the relayed session being up, and from the connect() call; relayed rtt ="
            f" median {PING_SIZE}-byte echo on the relayed session ({RTT_PINGS} of them)",
            "unit": "ms",
            "higher_is_better": False,
            "values": values("nat direct path"),
            "targets": [
                {"subject": "up → direct", "peer": "relayed rtt", "op": "<=", "ratio": 3.0}
            ],
        },
        {
            "row": "nat relay share",
            "what": "bytes the relay forwarded during each transfer of the nat row, in % of"
            " the payload (the relay's own counter)",
            "unit": "%",
            "higher_is_better": False,
            "values": values("nat relay share"),
            "targets": [],
        },
    ]


def skipped_rows(reason: str, size_mib: int) -> list[dict[str, Any]]:
    """The rows with every peer "not measured" for ``reason``."""

    def values(row: str) -> Values:
        head = f"{row}/"
        keys = [k for keys in GROUPS.values() for k in keys if k.startswith(head)]
        return {k.removeprefix(head): {"error": reason} for k in keys}

    return _rows(values, size_mib)


def rows(
    runs: int, size_mib: int, backend: str, say: Callable[[str], None] = print
) -> list[dict[str, Any]]:
    """The bench rows (``nat``, ``nat direct path``, ``nat relay share``); skipped if need be."""
    reason = available()
    if reason is not None:
        say(f"  nat: {reason}")
        return skipped_rows(reason, size_mib)
    try:
        results = measure(runs, size_mib, backend, say)
    except (LabError, OSError) as exc:  # the lab itself could not be built or started
        return skipped_rows(f"lab failed: {exc}"[:300], size_mib)
    return _rows(results.row, size_mib)


# --------------------------------------------------------------------------- peers
# Everything below runs inside a lab namespace, one role per process.


def _say(obj: object) -> None:
    print(json.dumps(obj), flush=True)


async def _stdin_line() -> str:
    import anyio

    line: str = await anyio.to_thread.run_sync(sys.stdin.readline)
    return line.strip()


async def _relay_role(listen: str) -> None:
    import capsock

    async with capsock.Node(listen=[listen]) as node:
        carried = [0]

        def tap(data: bytes) -> None:
            carried[0] += len(data)

        node.forwarder.tap = tap
        fwd = await node.forwarding()
        _say({"uri": str(fwd.uri)})
        while await _stdin_line():
            _say({"bytes": carried[0]})


async def _sink_or_echo(stream: Any) -> None:
    """Mode byte ``s``: count to EOF, answer the timing; ``e``: echo to EOF."""
    import anyio

    first = await stream.receive()
    mode, rest = first[:1], first[1:]
    if mode == b"e":
        if rest:
            await stream.send(rest)
        with contextlib.suppress(anyio.EndOfStream):
            while True:
                await stream.send(await stream.receive())
        await stream.send_eof()
        return
    total, timed = len(rest), 0
    t_first = t_last = time.perf_counter() if rest else math.nan
    with contextlib.suppress(anyio.EndOfStream):
        while True:
            chunk = await stream.receive()
            now = time.perf_counter()
            if math.isnan(t_first):
                t_first = now
            else:
                timed += len(chunk)
            t_last = now
            total += len(chunk)
    answer = {"bytes": total, "timed_bytes": timed, "seconds": t_last - t_first}
    await stream.send(json.dumps(answer).encode())
    await stream.send_eof()


async def _serve_role(how: str, where: str) -> None:
    import anyio

    import capsock

    cfg = capsock.NodeConfig(relay_backoff=(0.1, 1.0))
    kwargs: dict[str, Any] = {"relays": [where]} if how == "relay" else {"listen": [where]}
    async with capsock.Node(config=cfg, **kwargs) as node:
        with anyio.fail_after(30):
            await node.wait_registered()
        service = await node.listen()
        _say({"uri": str(service.uri)})
        async with anyio.create_task_group() as tg:
            tg.start_soon(service.serve, _sink_or_echo)
            while await _stdin_line():
                pass
            tg.cancel_scope.cancel()


class _Marks(logging.Handler):
    """Records when the node logs its session coming up and its direct path (or giving up)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.at: dict[str, float] = {}
        self.why = ""

    def emit(self, record: logging.LogRecord) -> None:
        now = time.perf_counter()
        text = str(record.msg)
        if text.startswith("reached node") and ": relayed route" in record.getMessage():
            self.at.setdefault("up", now)  # the end-to-end session (not the one to the relay)
        elif text.startswith("direct path to"):
            self.at.setdefault("direct", now)
        elif text.startswith("staying relayed"):
            self.at.setdefault("stay", now)
            self.why = record.getMessage()


async def _client_role(uri: str, mode: str) -> None:
    import anyio

    import capsock
    from capsock import CapsockAttribute
    from capsock.testing import read_to_eof

    marks = _Marks()
    logger = logging.getLogger("capsock.node")
    logger.addHandler(marks)
    logger.setLevel(logging.INFO)
    cfg = capsock.NodeConfig(direct_paths=mode == "direct")
    chunk = os.urandom(MiB)
    async with capsock.Node(config=cfg) as node:
        t0 = time.perf_counter()
        first: capsock.Stream | None = await node.connect(uri)
        connected = time.perf_counter() - t0
        assert first is not None
        _say({"connect": connected, "route": first.extra(CapsockAttribute.route)})

        async def stream_for(which: str) -> capsock.Stream:
            nonlocal first
            if which == "first":
                if first is None:
                    raise LabError("the first stream was used already")
                stream, first = first, None
                return stream
            return await node.connect(uri)

        async def wait_direct() -> dict[str, Any]:
            with anyio.move_on_after(DIRECT_TIMEOUT):
                while "direct" not in marks.at and "stay" not in marks.at:
                    await anyio.sleep(0.005)
            if "direct" not in marks.at:
                why = marks.why or f"no direct path within {DIRECT_TIMEOUT:.0f} s"
                raise LabError(why)
            return {"up": marks.at["up"] - t0, "direct": marks.at["direct"] - t0}

        async def sink(mib: int, which: str) -> dict[str, Any]:
            stream = await stream_for(which)
            route = stream.extra(CapsockAttribute.route)
            await stream.send(b"s")
            for _ in range(mib):
                await stream.send(chunk)
            await stream.send_eof()
            answer: dict[str, Any] = json.loads(await read_to_eof(stream))
            await stream.aclose()
            return answer | {"route": route}

        async def rtt(count: int, which: str) -> dict[str, Any]:
            stream = await stream_for(which)
            route = stream.extra(CapsockAttribute.route)
            ping = os.urandom(PING_SIZE)
            await stream.send(b"e")
            rounds = []
            for _ in range(count):
                start = time.perf_counter()
                await stream.send(ping)
                got = b""
                while len(got) < PING_SIZE:
                    got += await stream.receive()
                rounds.append(time.perf_counter() - start)
                if got != ping:
                    raise LabError("the echo came back different")
            await stream.send_eof()
            await read_to_eof(stream)
            await stream.aclose()
            return {"rtt": statistics.median(rounds), "route": route}

        while line := await _stdin_line():
            command, *args = line.split()
            try:
                if command == "wait-direct":
                    _say(await wait_direct())
                elif command == "sink":
                    _say(await sink(int(args[0]), args[1]))
                elif command == "rtt":
                    _say(await rtt(int(args[0]), args[1]))
                else:
                    _say({"error": f"unknown command {command!r}"})
            except Exception as exc:  # answered, so the bench says what went wrong
                _say({"error": f"{command}: {type(exc).__name__}: {exc}"})


def _peer_main(argv: list[str]) -> None:
    import anyio

    role, backend, *args = argv
    roles: dict[str, Callable[..., Any]] = {
        "relay": _relay_role,
        "serve": _serve_role,
        "client": _client_role,
    }
    anyio.run(roles[role], *args, backend=backend)


# --------------------------------------------------------------------------- standalone


def main() -> None:
    if sys.argv[1:2] == ["peer"]:
        _peer_main(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(
        prog="python -m bench.nat_lab", description=(__doc__ or "").splitlines()[0]
    )
    parser.add_argument("--size", type=int, default=64, help="MiB per transfer (default 64)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    from . import report

    produced = rows(args.runs, args.size, args.backend)
    results = {"meta": {"backend": args.backend, "runs": args.runs}, "rows": produced}
    print()
    print(report.render_markdown(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
