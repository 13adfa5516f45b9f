"""A hand-made `capsock send` peer (written from docs/cli.md's protocol) for hostile tests.

The sender side runs in the test process on the library; the receiver is the
real `capsock receive` in a subprocess.  Hooks run at chosen moments of the
protocol, so a test can act as a local attacker in the receive directory
exactly when the receiver has created its partial file or directory.
"""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio

import capsock
from capsock.messages import receive_message, send_message

PROTO = "capsock-send/1"
DELETE = object()
"""An override value that removes the field from the offer."""

Hook = Callable[[], Awaitable[None] | None]
Sender = Callable[[capsock.Stream], Awaitable[Any]]


def raw_message(obj: dict[str, Any]) -> bytes:
    """One control message as sent: 4-byte length and msgpack (hashed in directory digests)."""
    import msgpack

    body: bytes = msgpack.packb(obj, use_bin_type=True)
    return len(body).to_bytes(4, "big") + body


def _offer(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    offer = dict(base)
    for key, value in overrides.items():
        if value is DELETE:
            offer.pop(key, None)
        else:
            offer[key] = value
    return offer


async def _run(hook: Hook | None) -> None:
    if hook is not None:
        result = hook()
        if result is not None:
            await result


def file_sender(
    data: bytes = b"a" * 1000,
    *,
    name: str = "x.bin",
    overrides: dict[str, Any] | None = None,
    after_request: Hook | None = None,
) -> Sender:
    """A sender of one file; returns the receiver's decline or RESULT (or the exception)."""

    async def sender(stream: capsock.Stream) -> Any:
        base = {"proto": PROTO, "kind": "file", "name": name, "size": len(data)}
        base |= {"mode": 0o644, "mtime": 1_700_000_000.0}
        await send_message(stream, _offer(base, overrides or {}))
        reply = await receive_message(stream)
        if "decline" in reply:
            return reply
        await _run(after_request)
        await send_message(stream, {"offset": 0})
        await stream.send(data)
        await send_message(stream, {"sha256": hashlib.sha256(data).digest()})
        return await receive_message(stream)

    return sender


def dir_sender(
    entries: list[tuple[dict[str, Any], bytes | None]],
    *,
    name: str = "tree",
    overrides: dict[str, Any] | None = None,
    before_entry: dict[int, Hook] | None = None,
) -> Sender:
    """A sender of a directory: ENTRY headers (with their file bytes, or None)."""

    async def sender(stream: capsock.Stream) -> Any:
        size = sum(len(d) for _, d in entries if d is not None)
        base = {"proto": PROTO, "kind": "dir", "name": name, "size": size}
        base |= {"mode": 0o755, "mtime": 1_700_000_000.0, "entries": len(entries)}
        await send_message(stream, _offer(base, overrides or {}))
        reply = await receive_message(stream)
        if "decline" in reply:
            return reply
        await send_message(stream, {"offset": 0})
        h = hashlib.sha256()
        for i, (header, data) in enumerate(entries):
            await _run((before_entry or {}).get(i))
            raw = raw_message(header)
            h.update(raw)
            await stream.send(raw)
            if data is not None:
                h.update(data)
                await stream.send(data)
        await send_message(stream, {"sha256": h.digest()})
        return await receive_message(stream)

    return sender


async def receive_from(
    sender: Sender, tmp_path: Path, *args: str, cwd: Path | None = None
) -> tuple[subprocess.CompletedProcess[bytes], Any]:
    """Run `capsock receive URI ARGS` against ``sender``; (the process, what the sender saw)."""
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "xdg")}
    seen: list[Any] = []
    done = anyio.Event()
    async with capsock.Node(listen=["tcp:127.0.0.1:0"]) as node, anyio.create_task_group() as tg:
        listener = await node.listen()

        async def serve() -> None:
            try:
                stream = await listener.accept()
                async with stream:
                    seen.append(await sender(stream))
            except Exception as exc:  # the receiver reset the stream, or closed it
                seen.append(exc)
            finally:
                done.set()

        tg.start_soon(serve)
        uri_file = tmp_path / f"uri-{time.monotonic_ns()}"
        uri_file.write_text(f"{listener.uri}\n")
        argv = [sys.executable, "-m", "capsock", "receive", f"@{uri_file}", *args]
        result = await anyio.run_process(argv, cwd=cwd or tmp_path, env=env, check=False)
        with anyio.move_on_after(20):
            await done.wait()
        tg.cancel_scope.cancel()
    return result, seen[0] if seen else None


async def wait_for(path: Path) -> None:
    """Until ``path`` exists (a link counts); 20 s at most."""
    with anyio.fail_after(20):
        while not await anyio.to_thread.run_sync(os.path.lexists, path):
            await anyio.sleep(0.01)


def snapshot(path: Path) -> tuple[bytes | None, int, int]:
    """Content (a link's target; None for a directory or socket), mode and mtime of
    ``path`` itself: to prove it unchanged."""
    st = path.lstat()
    content: bytes | None = None
    if stat.S_ISREG(st.st_mode):
        content = path.read_bytes()
    elif stat.S_ISLNK(st.st_mode):
        content = os.fsencode(os.readlink(path))
    return content, st.st_mode, st.st_mtime_ns


def error_line(stderr: bytes) -> str:
    """The one `capsock: error:` line of a failed command."""
    lines = stderr.decode().strip().splitlines()
    assert len(lines) >= 1, stderr
    errors = [line for line in lines if line.startswith("capsock: error: ")]
    assert len(errors) == 1, lines
    assert "internal error" not in errors[0], errors[0]
    return errors[0]
