"""A network-namespace NAT lab for tests: a relay on the "internet", two hosts behind NAT.

Topology (every address is in a documentation range)::

    namespace "relay" (the public internet + the relay host)
      br0 203.0.113.10/24 ── bridge ports to the routers' public sides
           │                          │
    "nat1": wan 203.0.113.21/24   "nat2": wan 203.0.113.22/24
            lan 192.0.2.1/25              lan 198.51.100.1/25
            MASQUERADE out of wan          MASQUERADE out of wan
            FORWARD wan->lan: only ESTABLISHED,RELATED (NEW is dropped)
           │                          │
    "a": eth0 192.0.2.10/25        "b": eth0 198.51.100.10/25
         default via 192.0.2.1          default via 198.51.100.1

- ``a`` and ``b`` can dial out to the relay; the relay sees NAT 1's / NAT 2's public address.
- Nothing can dial in to ``a`` or ``b``: the routers do no port forwarding, the public side
  has no route to the private LANs, and the routers drop NEW inbound forwards anyway.
- The routers have no default route, so ``a`` cannot reach ``b``'s LAN (and vice versa);
  dialing the other router's public address reaches that router itself (nothing listens:
  connection refused).

Usage in a test module::

    from . import netns

    lab = netns.lab_fixture(scope="module")   # a fixture named "lab"; skips or fails

    def test_x(lab: netns.NatLab) -> None:
        server = lab.popen("relay", [sys.executable, "-m", "capsock", ...])
        lab.wait_tcp("a", lab.addr("relay"), 4433)
        lab.run("a", [sys.executable, "-c", "..."])

Programs run inside a namespace with ``ip netns exec NAME argv...``: same user, environment,
working directory and file system, so ``sys.executable`` (the venv's absolute path) works.
Each lab's namespaces are named ``capsock-<pid>-<6 hex>-<host>``; they are deleted, and every
process still inside them killed, when the lab closes.

Where the lab cannot run (not root, no ``ip``/``iptables``, namespaces refused) the tests
skip with the reason, except in CI (``CI`` set) or with ``CAPSOCK_REQUIRE_NETNS=1``, where
they fail: a broken CI must never be silently green. ``scripts/install-test-deps`` installs
the Debian packages.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from socket import socket as Socket
from typing import Any, Literal, TypeVar

import anyio
import anyio.abc
import pytest

__all__ = [
    "HOSTS",
    "LabError",
    "NatLab",
    "available",
    "cleanup_stale",
    "lab_fixture",
    "netns_required",
    "open_lab",
    "require",
]

T = TypeVar("T")

PREFIX = "capsock-"
NETNS_DIR = Path("/run/netns")
_SBIN_PATH = "/usr/local/sbin:/usr/sbin:/sbin"
_CLONE_NEWNET = 0x40000000

Host = Literal["relay", "nat1", "nat2", "a", "b"]
HOSTS: tuple[Host, ...] = ("relay", "nat1", "nat2", "a", "b")


@dataclass(frozen=True)
class _HostPlan:
    addr: str  # the host's own address (a router's: its public side)
    public: str  # the address the relay sees when this host dials out
    router: Host | None = None


_PLAN: dict[Host, _HostPlan] = {
    "relay": _HostPlan("203.0.113.10", "203.0.113.10"),
    "nat1": _HostPlan("203.0.113.21", "203.0.113.21"),
    "nat2": _HostPlan("203.0.113.22", "203.0.113.22"),
    "a": _HostPlan("192.0.2.10", "203.0.113.21", router="nat1"),
    "b": _HostPlan("198.51.100.10", "203.0.113.22", router="nat2"),
}
_LAN: dict[Host, tuple[str, str]] = {  # router -> (its LAN address, prefix length)
    "nat1": ("192.0.2.1", "25"),
    "nat2": ("198.51.100.1", "25"),
}


class LabError(RuntimeError):
    """Building or using the lab failed (the message includes the command's stderr)."""


def _which(cmd: str) -> str | None:
    return shutil.which(cmd) or shutil.which(cmd, path=_SBIN_PATH)


def _tool(cmd: str) -> str:
    path = _which(cmd)
    if path is None:
        raise LabError(f"`{cmd}` not found; run scripts/install-test-deps as root")
    return path


def _cmd(argv: list[str], *, timeout: float = 20.0) -> str:
    """Run a setup command; raise LabError with its stderr on failure; return stdout."""
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LabError(f"{' '.join(argv)}: {exc}") from exc
    if proc.returncode != 0:
        err = (proc.stderr or proc.stdout).strip()
        raise LabError(f"{' '.join(argv)} exited {proc.returncode}: {err}")
    return proc.stdout


def _libc_setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _in_netns(name: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call ``fn`` in a fresh thread that has joined network namespace ``name``.

    Sockets keep the namespace they were created in, so a socket made here can be used
    afterwards from any thread (or wrapped for anyio).
    """
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            fd = os.open(NETNS_DIR / name, os.O_RDONLY | os.O_CLOEXEC)
            try:
                _libc_setns(fd)
            finally:
                os.close(fd)
            result.append(fn(*args, **kwargs))
        except BaseException as exc:
            error.append(exc)

    thread = threading.Thread(target=target, name=f"netns-{name}", daemon=True)
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


def _write_sysctl(key: str, value: str) -> None:
    Path("/proc/sys", *key.split(".")).write_text(value)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _netns_pids(ip: str, name: str) -> list[int]:
    try:
        out = subprocess.run(
            [ip, "netns", "pids", name], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [int(p) for p in out.split() if p.isdigit()]


def _delete_netns(ip: str, name: str) -> None:
    """Kill every process left in namespace ``name`` (all started by us), then delete it."""
    for _ in range(50):
        pids = [p for p in _netns_pids(ip, name) if p != os.getpid()]
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.02)
    subprocess.run([ip, "netns", "delete", name], capture_output=True, timeout=10, check=False)


def cleanup_stale() -> list[str]:
    """Delete lab namespaces left by dead processes (a test run killed with SIGKILL).

    Only namespaces named ``capsock-<pid>-...`` whose creator pid is gone and which no
    process is using are removed, so labs of other, concurrent runs are never touched.
    Returns the names removed.
    """
    ip = _which("ip")
    if ip is None or not NETNS_DIR.is_dir():
        return []
    removed = []
    for entry in NETNS_DIR.iterdir():
        parts = entry.name.split("-")
        if len(parts) < 3 or f"{parts[0]}-" != PREFIX or not parts[1].isdigit():
            continue
        if _pid_alive(int(parts[1])) or _netns_pids(ip, entry.name):
            continue
        subprocess.run(
            [ip, "netns", "delete", entry.name], capture_output=True, timeout=10, check=False
        )
        removed.append(entry.name)
    return removed


def _iptables_candidates() -> list[str]:
    return [p for p in (_which("iptables"), _which("iptables-legacy")) if p is not None]


@functools.cache
def _probe() -> tuple[str | None, str]:
    """(reason it cannot run or None, the iptables binary that does NAT in a namespace)."""
    if sys.platform != "linux":
        return f"network namespaces need Linux (this is {sys.platform})", ""
    if os.geteuid() != 0:
        return "network-namespace NAT tests need root (ip netns, iptables)", ""
    ip = _which("ip")
    if ip is None:
        return "`ip` (iproute2) not found; run scripts/install-test-deps as root", ""
    iptables = _iptables_candidates()
    if not iptables:
        return "`iptables` not found; run scripts/install-test-deps as root", ""
    name = f"{PREFIX}{os.getpid()}-{secrets.token_hex(3)}-probe"
    try:
        _cmd([ip, "netns", "add", name])
    except LabError as exc:
        return f"cannot create a network namespace: {exc}", ""
    try:
        _cmd([ip, "-n", name, "link", "add", "v0", "type", "veth", "peer", "name", "v1"])
        _cmd([ip, "-n", name, "link", "add", "br0", "type", "bridge"])
        errors = []
        for ipt in iptables:
            rule = ["-t", "nat", "-A", "POSTROUTING", "-o", "v0", "-j", "MASQUERADE"]
            fwd = ["-A", "FORWARD", "-i", "v0", "-m", "conntrack", "--ctstate"]
            try:
                _cmd([ip, "netns", "exec", name, ipt, "-w", *rule])
                _cmd([ip, "netns", "exec", name, ipt, "-w", *fwd, "ESTABLISHED", "-j", "ACCEPT"])
            except LabError as exc:
                errors.append(str(exc))
                continue
            return None, ipt
        return "iptables cannot do NAT in a network namespace: " + "; ".join(errors), ""
    except LabError as exc:
        return f"cannot build veth/bridge links in a network namespace: {exc}", ""
    finally:
        _delete_netns(ip, name)


def available() -> str | None:
    """None if the NAT lab can run here, else the reason why not (cached per process)."""
    return _probe()[0]


def netns_required() -> bool:
    """True where the lab must run: in CI (``CI`` set) or with ``CAPSOCK_REQUIRE_NETNS=1``."""
    ci = os.environ.get("CI", "").strip().lower()
    return ci not in ("", "0", "false", "no") or os.environ.get("CAPSOCK_REQUIRE_NETNS") == "1"


def require() -> None:
    """Skip the calling test if the lab cannot run here; fail instead where it is required."""
    reason = available()
    if reason is None:
        return
    if netns_required():
        pytest.fail(
            f"network-namespace NAT tests are required here (CI or CAPSOCK_REQUIRE_NETNS=1) "
            f"but cannot run: {reason}",
            pytrace=False,
        )
    pytest.skip(reason)


class NatLab:
    """Two hosts behind two NAT routers and a relay on the public side (see module doc).

    Use as a context manager (``with NatLab() as lab:``) or via :func:`lab_fixture`.
    Hosts: ``"relay"``, ``"a"``, ``"b"``, and the routers ``"nat1"``, ``"nat2"``.
    """

    def __init__(self) -> None:
        self.tag = f"{PREFIX}{os.getpid()}-{secrets.token_hex(3)}"
        self._ip = _tool("ip")
        self._iptables = _probe()[1] or _tool("iptables")
        self._created: list[str] = []
        self._procs: list[subprocess.Popen[Any]] = []
        self._lock = threading.Lock()
        self._closed = False
        self.setup_seconds = 0.0

    # -- lifecycle ---------------------------------------------------------------------

    def __enter__(self) -> NatLab:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        """Build every namespace, link, address, route and firewall rule."""
        t0 = time.monotonic()
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        self.setup_seconds = time.monotonic() - t0

    def close(self) -> None:
        """Stop the lab's processes and delete its namespaces. Idempotent; never raises."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            procs, self._procs = self._procs, []
        for proc in procs:
            _stop(proc)
        for name in reversed(self._created):
            _delete_netns(self._ip, name)
        self._created.clear()

    # -- building ----------------------------------------------------------------------

    def _ipn(self, host: Host, command: str) -> None:
        """``ip -n NS <command>``; the command is split on whitespace."""
        _cmd([self._ip, "-n", self.ns(host), *command.split()])

    def _sysctl(self, host: Host, values: dict[str, str], *, optional: bool = False) -> None:
        def write() -> None:
            for key, value in values.items():
                try:
                    _write_sysctl(key, value)
                except FileNotFoundError:
                    if not optional:
                        raise

        _in_netns(self.ns(host), write)

    def _ipt(self, host: Host, rule: str) -> None:
        """``iptables -w <rule>`` inside ``host``; the rule is split on whitespace."""
        _cmd([self._ip, "netns", "exec", self.ns(host), self._iptables, "-w", *rule.split()])

    def _build(self) -> None:
        for host in HOSTS:
            name = self.ns(host)
            _cmd([self._ip, "netns", "add", name])
            self._created.append(name)
            self._ipn(host, "link set lo up")
            # No IPv6 on the lab's links (no DAD or router-solicitation noise); lo keeps ::1.
            self._sysctl(host, {"net.ipv6.conf.default.disable_ipv6": "1"}, optional=True)
        # The internet: a bridge in the relay's namespace, the relay's address on it.
        self._ipn("relay", "link add br0 type bridge stp_state 0")
        self._ipn("relay", f"addr add {self.addr('relay')}/24 dev br0")
        self._ipn("relay", "link set br0 up")
        pairs: tuple[tuple[Host, Host], ...] = (("nat1", "a"), ("nat2", "b"))
        for router, host in pairs:
            # Public side: wan (router) <-> port named after the router, on the bridge.
            peer = f"peer name {router} netns {self.ns('relay')}"
            self._ipn(router, f"link add wan type veth {peer}")
            self._ipn("relay", f"link set {router} master br0 up")
            self._ipn(router, f"addr add {self.addr(router)}/24 dev wan")
            self._ipn(router, "link set wan up")
            # Private side: lan (router) <-> eth0 (host).
            lan_addr, plen = _LAN[router]
            peer = f"peer name eth0 netns {self.ns(host)}"
            self._ipn(router, f"link add lan type veth {peer}")
            self._ipn(router, f"addr add {lan_addr}/{plen} dev lan")
            self._ipn(router, "link set lan up")
            self._ipn(host, f"addr add {self.addr(host)}/{plen} dev eth0")
            self._ipn(host, "link set eth0 up")
            self._ipn(host, f"route add default via {lan_addr}")
            # NAT: forward, masquerade out of wan, let in only replies (NEW is dropped).
            self._sysctl(router, {"net.ipv4.ip_forward": "1"})
            self._ipt(router, "-t nat -A POSTROUTING -o wan -j MASQUERADE")
            established = "-m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT"
            self._ipt(router, f"-A FORWARD -i wan {established}")
            self._ipt(router, "-A FORWARD -i wan -j DROP")

    # -- naming ------------------------------------------------------------------------

    def ns(self, host: Host) -> str:
        """The network namespace name of ``host`` (for ``ip netns exec``)."""
        if host not in _PLAN:
            raise ValueError(f"unknown lab host {host!r}; hosts are {', '.join(HOSTS)}")
        return f"{self.tag}-{host}"

    def addr(self, host: Host) -> str:
        """The host's own IPv4 address (a router's: its public side)."""
        self.ns(host)
        return _PLAN[host].addr

    def public_addr(self, host: Host) -> str:
        """The address the public side sees when ``host`` dials out (its router's for a/b)."""
        self.ns(host)
        return _PLAN[host].public

    def router(self, host: Host) -> Host | None:
        """The NAT router in front of ``host`` (None for the public hosts)."""
        return _PLAN[host].router

    # -- running things ----------------------------------------------------------------

    def argv(self, host: Host, argv: list[str]) -> list[str]:
        """``argv`` prefixed so that it runs inside ``host``'s namespace."""
        return [self._ip, "netns", "exec", self.ns(host), *argv]

    def popen(self, host: Host, argv: list[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` inside ``host``'s namespace (keyword arguments as for Popen).

        The lab terminates the process (then kills it) at close if it is still running,
        and closes its pipes.
        """
        proc: subprocess.Popen[Any] = subprocess.Popen(self.argv(host, argv), **kwargs)
        with self._lock:
            self._procs.append(proc)
        return proc

    def run(
        self,
        host: Host,
        argv: list[str],
        *,
        check: bool = True,
        timeout: float = 30.0,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside ``host``'s namespace to completion; text stdout/stderr captured.

        With ``check``, a non-zero exit raises CalledProcessError with stderr in its notes.
        """
        proc = subprocess.run(
            self.argv(host, argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
            check=False,
        )
        if check and proc.returncode != 0:
            error = subprocess.CalledProcessError(
                proc.returncode, proc.args, proc.stdout, proc.stderr
            )
            error.add_note(f"in {host}: stderr: {proc.stderr.strip()}")
            raise error
        return proc

    def python(
        self, host: Host, code: str, *args: str, check: bool = True, timeout: float = 30.0
    ) -> subprocess.CompletedProcess[str]:
        """Run ``python -c code args...`` (this interpreter, i.e. the venv) inside ``host``."""
        return self.run(host, [sys.executable, "-c", code, *args], check=check, timeout=timeout)

    async def open_process(self, host: Host, argv: list[str], **kwargs: Any) -> anyio.abc.Process:
        """anyio.open_process inside ``host``'s namespace (use ``async with`` on the result).

        Such processes are not tracked one by one, but anything still running in the
        lab's namespaces is killed when the lab closes.
        """
        return await anyio.open_process(self.argv(host, argv), **kwargs)

    async def arun(self, host: Host, argv: list[str], **kwargs: Any) -> Any:
        """anyio.run_process inside ``host``'s namespace (returns a CompletedProcess)."""
        return await anyio.run_process(self.argv(host, argv), **kwargs)

    def call(self, host: Host, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Call ``fn(*args, **kwargs)`` in a thread inside ``host``'s network namespace.

        Blocking; from async code use ``await anyio.to_thread.run_sync(...)``. Sockets
        created by ``fn`` stay in that namespace wherever they are used later.
        """
        return _in_netns(self.ns(host), fn, *args, **kwargs)

    def socket(
        self,
        host: Host,
        family: int = socket.AF_INET,
        type: int = socket.SOCK_STREAM,
    ) -> Socket:
        """A new socket living in ``host``'s network namespace."""
        return self.call(host, socket.socket, family, type)

    def connect(self, host: Host, addr: str, port: int, timeout: float = 2.0) -> Socket:
        """A TCP connection from ``host`` to ``addr:port`` (raises OSError on failure)."""
        return self.call(host, socket.create_connection, (addr, port), timeout)

    def wait_tcp(self, host: Host, addr: str, port: int, timeout: float = 10.0) -> None:
        """Wait until ``host`` can open a TCP connection to ``addr:port`` (raises TimeoutError)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.connect(host, addr, port, timeout=min(1.0, timeout)).close()
                return
            except OSError as exc:
                if time.monotonic() >= deadline:
                    raise TimeoutError(
                        f"{host} could not connect to {addr}:{port} within {timeout}s: {exc}"
                    ) from exc
                time.sleep(0.05)


def _stop(proc: subprocess.Popen[Any]) -> None:
    try:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        pass
    finally:
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()


@contextlib.contextmanager
def open_lab() -> Iterator[NatLab]:
    """A started lab, closed on exit; skips (or fails in CI) where it cannot run."""
    require()
    cleanup_stale()
    with NatLab() as lab:
        yield lab


def lab_fixture(
    scope: Literal["session", "package", "module", "class", "function"] = "function",
) -> Any:
    """A pytest fixture yielding a :class:`NatLab`; bind it to a name in the test module.

    ``lab = netns.lab_fixture(scope="module")`` defines a fixture called ``lab``.
    """

    @pytest.fixture(scope=scope)
    def _lab() -> Iterator[NatLab]:
        with open_lab() as lab:
            yield lab

    return _lab
