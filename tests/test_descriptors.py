"""File descriptors: a stranger who makes a node run out of them cannot end it.

Each node runs in its own process with a lowered ``RLIMIT_NOFILE``
(:mod:`tests.fd_node`); the attack comes from this process, from another
loopback address (:mod:`tests.strangers`).  Issue: ~1,000 handshakes with one
PING each used to make ``accept()`` raise EMFILE, which ended the node's task
group -- the whole ``capsock relay`` or ``capsock share`` process.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from capsock import Capability
from capsock.uri import TcpHint

from .strangers import close_all, good_client, stranger

pytestmark = pytest.mark.anyio
ROOT = Path(__file__).resolve().parent.parent


class LimitedNode:
    def __init__(self, backend: str, soft: int, hard: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.fd_node", backend, str(soft), str(hard)],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        first = self._read()
        self.uri = Capability.parse(first["uri"])
        self.soft = int(first["soft"])
        hint = self.uri.hints[0]
        assert isinstance(hint, TcpHint)
        self.host, self.port = hint.host, hint.port

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, f"the node process ended (exit code {self.proc.poll()})"
        return dict(json.loads(line))

    def command(self, what: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(what + "\n")
        self.proc.stdin.flush()
        return self._read()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()


@contextlib.contextmanager
def limited_node(backend: str, soft: int, hard: int) -> Iterator[LimitedNode]:
    node = LimitedNode(backend, soft, hard)
    try:
        yield node
    finally:
        node.stop()


async def flood(node: LimitedNode, count: int) -> list[anyio.abc.SocketStream | None]:
    socks: list[anyio.abc.SocketStream | None] = []
    with anyio.fail_after(120):
        for _ in range(count):
            socks.append(await stranger(node.host, node.port, node.uri.node))
    return socks


async def test_strangers_beyond_the_descriptor_limit_are_shed(anyio_backend: str) -> None:
    """600 strangers against a node that may hold 256 descriptors (and cannot
    raise the limit): it stays up, never holds more than its budget, and a good
    client is served during and after the flood."""
    with limited_node(anyio_backend, 256, 256) as node:
        assert node.soft == 256
        await good_client(node.uri)
        socks = await flood(node, 600)
        try:
            assert node.alive()
            # Shed connections close a moment later: within a few seconds the
            # node holds no more than its budget.
            with anyio.fail_after(10):
                while True:
                    stats = node.command("stats")
                    if stats["inbound_connections_open"] <= stats["descriptor_budget"]:
                        break
                    await anyio.sleep(0.1)
            assert stats["connections_shed"] > 0
            await good_client(node.uri)  # while the strangers still hold their sessions
        finally:
            await close_all(socks)
        assert node.alive()
        await good_client(node.uri)


async def test_accept_failing_with_emfile_does_not_end_the_node(anyio_backend: str) -> None:
    """The descriptors run out for another reason (the application's own
    sockets): accept() fails with EMFILE.  The node sheds a stranger, backs off,
    and keeps serving; once descriptors are free again, everyone is served."""
    with limited_node(anyio_backend, 256, 256) as node:
        socks = await flood(node, 40)
        try:
            hogged = node.command("hog")["hogged"]
            assert hogged > 0
            # Connections now meet EMFILE at accept(): the node sheds the
            # strangers one by one to get descriptors for the newcomers.
            await good_client(node.uri)
            stats = node.command("stats")
            assert stats["accept_errors"] > 0, stats
            assert node.alive()
        finally:
            await close_all(socks)
        node.command("free")
        await good_client(node.uri)
        assert node.alive()


async def test_the_soft_limit_is_raised_towards_the_hard_one(anyio_backend: str) -> None:
    with limited_node(anyio_backend, 128, 4096) as node:
        assert node.soft == 4096
        stats = node.command("stats")
        # The budget follows the raised limit, less an eighth kept in reserve.
        assert 3000 < stats["descriptor_budget"] < 4096 - 4096 // 8
