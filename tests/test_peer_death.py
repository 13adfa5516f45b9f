"""A peer killed mid-stream: the reader gets an error, never a clean end of stream."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

import capsock

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[1]


async def test_peer_killed_mid_stream_is_an_error_not_eof() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.peer_process", "serve"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        uri = await anyio.to_thread.run_sync(proc.stdout.readline)
        async with capsock.Node() as node:
            stream = await node.connect(uri.strip())
            received = 0
            while received < 4 << 20:
                received += len(await stream.receive())
            proc.send_signal(signal.SIGKILL)
            with anyio.fail_after(30), pytest.raises(capsock.ConnectionLost) as info:
                while True:
                    await stream.receive()
            assert isinstance(info.value, anyio.BrokenResourceError)
            assert not isinstance(info.value, anyio.EndOfStream)
            with pytest.raises(anyio.BrokenResourceError):
                await stream.send(b"anyone there?")
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
