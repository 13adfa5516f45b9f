"""``listen`` / ``connect`` (stdin and stdout over a stream) and ``share`` / ``forward``
(TCP services over capabilities).

Both directions are copied at once; the end of one direction is passed on as a
half-close (``send_eof``, TCP ``shutdown(SHUT_WR)``), and a pipe is done when
both directions ended, like ``nc -N``.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import queue
import socket
import stat
import struct
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import anyio.abc
import anyio.from_thread
import anyio.lowlevel

from ..errors import CapsockError, ErrorCode
from ..stream import Stream
from .common import (
    CliError,
    Exit,
    announce,
    dialing_node,
    info,
    listening_node,
    make_listener,
    read_capability,
    resetting,
    say,
)

__all__ = [
    "InputPipe",
    "bridge",
    "cmd_connect",
    "cmd_forward",
    "cmd_listen",
    "cmd_share",
    "pipe_stdio",
    "splice",
]

log = logging.getLogger("capsock.cli")

_CHUNK = 256 * 1024
_STREAM_ERRORS = (anyio.BrokenResourceError, anyio.ClosedResourceError, CapsockError, OSError)


class InputPipe:
    """Reads a file descriptor in a daemon thread, so that a read blocked on a
    terminal or an idle pipe never holds up the end of the command.

    The thread hands each chunk over through a one-slot queue (it blocks there,
    in its own thread, while the previous chunk is unread) and only wakes the
    event loop with a plain callback: it never runs a task in the loop, which
    an interrupted command would leave behind, cancelled, for asyncio's
    shutdown to report as an unhandled exception."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._queue: queue.Queue[bytes | OSError] = queue.Queue(maxsize=1)
        self._waiter: anyio.Event | None = None
        self._started = False
        self._eof = False

    def _wake(self) -> None:
        if self._waiter is not None:
            self._waiter.set()
            self._waiter = None

    def _run(self, token: anyio.lowlevel.EventLoopToken) -> None:
        try:
            while True:
                try:
                    data: bytes | OSError = os.read(self._fd, _CHUNK)
                except OSError as exc:
                    # A closed stdin (EBADF) is an empty one; anything else is reported.
                    data = b"" if exc.errno == errno.EBADF else exc
                self._queue.put(data)
                anyio.from_thread.run_sync(self._wake, token=token)
                if not data or isinstance(data, OSError):
                    return
        except BaseException:  # the event loop is gone: the command is over
            return

    async def read(self) -> bytes:
        """The next chunk; ``b""`` at the end of input (and ever after).

        Raises:
            OSError: reading failed.
        """
        if self._eof:
            return b""
        if not self._started:
            self._started = True
            token = anyio.lowlevel.current_token()
            threading.Thread(target=self._run, args=(token,), daemon=True).start()
        while True:
            try:
                data = self._queue.get_nowait()
                break
            except queue.Empty:
                self._waiter = anyio.Event()
                await self._waiter.wait()
        if isinstance(data, OSError):
            self._eof = True
            raise data
        if not data:
            self._eof = True
        return data


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


async def pipe_stdio(stream: Stream, stdin: InputPipe, stdout_fd: int = 1) -> None:
    """Copy ``stdin`` to ``stream`` and ``stream`` to stdout until both directions ended.

    Raises:
        CliError: stdout was closed by its reader.
        StreamReset / ConnectionLost / OSError: the stream or stdin failed.
    """

    async def upstream() -> None:
        while data := await stdin.read():
            await stream.send(data)
        await stream.send_eof()

    async def downstream() -> None:
        while True:
            try:
                data = await stream.receive(1 << 20)
            except anyio.EndOfStream:
                return
            try:
                await anyio.to_thread.run_sync(_write_all, stdout_fd, data)
            except BrokenPipeError:
                raise CliError("stdout was closed before the stream ended") from None

    async with anyio.create_task_group() as tg:
        tg.start_soon(upstream)
        tg.start_soon(downstream)


async def cmd_listen(args: argparse.Namespace) -> int:
    """Print a capability, then pipe the first (``--once``) or every stream to stdio."""
    stdin = InputPipe(0)
    async with listening_node(args, stdin_is_data=True) as node:
        listener, cap = await make_listener(node, args)
        what = "waiting for one stream" if args.once else "waiting for streams"
        announce(args, cap, f"{what} (Ctrl-C to stop)")
        served = 0
        while True:
            try:
                stream = await listener.accept()
            except anyio.ClosedResourceError:
                if not served:  # as `send` does: an offer nobody took is a failure
                    raise CliError(
                        "nobody connected before the capability expired; run `capsock listen` again"
                    ) from None
                info("the capability is used up or expired; done")
                return Exit.OK
            served += 1
            if args.once:
                await listener.aclose()
            info(f"stream from {stream.peer}")
            if args.once:
                async with resetting(stream):
                    await pipe_stdio(stream, stdin)
                return Exit.OK
            try:
                async with resetting(stream):
                    await pipe_stdio(stream, stdin)
            except* _STREAM_ERRORS as group:
                say(f"capsock: error: stream from {stream.peer.short()}: {group.exceptions[0]}")


async def cmd_connect(args: argparse.Namespace) -> int:
    """Open a stream with the capability and pipe it to stdin and stdout."""
    cap = read_capability(args.uri, stdin_ok=False)
    stdin = InputPipe(0)
    async with dialing_node(args, cap) as node:
        stream = await node.connect(cap)
        log.info("connected to %s", cap.node.short())
        async with resetting(stream):
            await pipe_stdio(stream, stdin)
    return Exit.OK


# ------------------------------------------------------------------ TCP


async def splice(a: anyio.abc.ByteStream, b: anyio.abc.ByteStream) -> None:
    """Copy both ways between two byte streams, passing each end on as a half-close."""

    async def one_way(src: anyio.abc.ByteStream, dst: anyio.abc.ByteStream) -> None:
        while True:
            try:
                data = await src.receive(_CHUNK)
            except anyio.EndOfStream:
                await dst.send_eof()
                return
            await dst.send(data)

    async with anyio.create_task_group() as tg:
        tg.start_soon(one_way, a, b)
        tg.start_soon(one_way, b, a)


def _tcp_target(text: str, *, any_port: bool = False) -> tuple[str, str, int]:
    """``tcp:HOST:PORT`` / ``HOST:PORT`` / ``unix:/PATH`` -> (kind, host or path, port)."""
    if text.startswith("unix:"):
        path = text[5:]
        if not path.startswith("/"):
            raise CliError(f"{text!r}: a unix socket path must be absolute", Exit.USAGE)
        return "unix", path, 0
    rest = text.removeprefix("tcp:")
    host, sep, port = rest.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not int(port) < 65536:
        raise CliError(f"{text!r} is not an address: use tcp:HOST:PORT", Exit.USAGE)
    if int(port) == 0 and not any_port:
        raise CliError(f"{text!r} is not an address: use tcp:HOST:PORT", Exit.USAGE)
    return "tcp", host, int(port)


async def _connect_target(kind: str, where: str, port: int) -> anyio.abc.ByteStream:
    if kind == "unix":
        return await anyio.connect_unix(where)
    return await anyio.connect_tcp(where, port)


def _abort_socket(sock: anyio.abc.ByteStream) -> None:
    """Make the coming close of a TCP connection abortive (an RST, not a FIN)."""
    raw = sock.extra(anyio.abc.SocketAttribute.raw_socket, None)
    if raw is not None and raw.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


@asynccontextmanager
async def _resetting_socket(sock: anyio.abc.ByteStream) -> AsyncIterator[None]:
    """Close ``sock`` at the end; on failure abortively (TCP RST), so the service
    or client does not take a cut-off connection for a complete one."""
    try:
        yield
    except BaseException:
        _abort_socket(sock)
        raise
    finally:
        with anyio.CancelScope(shield=True):
            await sock.aclose()


async def bridge(stream: Stream, sock: anyio.abc.ByteStream, what: str) -> None:
    """Splice a capsock stream and a socket; a failure on either side resets both."""
    try:
        async with resetting(stream), _resetting_socket(sock):
            await splice(stream, sock)
    except* _STREAM_ERRORS as group:
        info(f"{what} ended: {group.exceptions[0]}")


async def cmd_share(args: argparse.Namespace) -> int:
    """Expose a local TCP (or unix) service: every stream becomes a new connection to it."""
    kind, where, port = _tcp_target(args.target)
    shown = f"unix:{where}" if kind == "unix" else f"tcp:{where}:{port}"

    async def handle(stream: Stream) -> None:
        peer = stream.peer.short()
        try:
            service = await _connect_target(kind, where, port)
        except OSError as exc:
            say(f"capsock: error: stream from {peer}: cannot connect to {shown}: {exc}")
            stream.reset(ErrorCode.CANCELLED)
            return
        info(f"stream from {stream.peer} -> {shown}")
        await bridge(stream, service, f"stream from {peer}")

    async with listening_node(args) as node:
        listener, cap = await make_listener(node, args)
        announce(args, cap, f"sharing {shown} (Ctrl-C to stop)")
        await listener.serve(handle)
    info("the capability is used up or expired; done")
    return Exit.OK


async def _unix_listener(path: str) -> tuple[anyio.abc.SocketListener, int]:
    """A listening unix socket at ``path``, mode 0600 from the start; and its inode.

    A stale socket (nobody accepts on it) is replaced; anything else at ``path``
    (a live socket, a regular file, a symbolic link, a directory) is refused.

    Raises:
        CliError: ``path`` is taken, or the socket cannot be created.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise CliError(f"cannot listen on unix:{path}: {exc.strerror}") from None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            raise CliError(
                f"cannot listen on unix:{path}: something that is not a socket is there; "
                "capsock replaces only a stale socket: remove it or choose another path"
            )
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            live = False
        else:
            live = True
        finally:
            probe.close()
        if live:
            raise CliError(f"cannot listen on unix:{path}: another process accepts on it")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # bind() creates the socket file with 0777 & ~umask: no moment with a wider mode.
    old = os.umask(0o177)
    try:
        sock.bind(path)
    except OSError as exc:
        sock.close()
        raise CliError(f"cannot listen on unix:{path}: {exc.strerror}") from None
    finally:
        os.umask(old)
    inode = os.lstat(path).st_ino
    sock.listen(128)
    sock.setblocking(False)
    return await anyio.abc.SocketListener.from_socket(sock), inode


def _remove_socket(path: str, inode: int) -> None:
    """Remove the socket file at ``path`` if it is still the one this process bound."""
    with contextlib.suppress(OSError):
        st = os.lstat(path)
        if stat.S_ISSOCK(st.st_mode) and st.st_ino == inode:
            os.unlink(path)


async def cmd_forward(args: argparse.Namespace) -> int:
    """Accept local connections (TCP or a unix socket); each one becomes a stream
    opened with the capability."""
    cap = read_capability(args.uri)
    spec = args.listen if ":" in args.listen else f"127.0.0.1:{args.listen}"
    kind, host, port = _tcp_target(spec, any_port=True)
    async with dialing_node(args, cap) as node:

        async def handle(client: anyio.abc.SocketStream) -> None:
            try:
                stream = await node.connect(cap)
            except (CapsockError, TimeoutError, OSError) as exc:
                say(f"capsock: error: {' '.join(str(exc).split()) or type(exc).__name__}")
                _abort_socket(client)
                await client.aclose()
                return
            await bridge(stream, client, "a forwarded connection")

        if kind == "unix":
            local, inode = await _unix_listener(host)
            try:
                async with local:
                    info(f"forwarding unix:{host} to node {cap.node} (Ctrl-C to stop)")
                    await local.serve(handle)
            finally:
                _remove_socket(host, inode)
            return Exit.OK
        try:
            tcp = await anyio.create_tcp_listener(local_host=host, local_port=port)
        except OSError as exc:
            raise CliError(f"cannot listen on {host}:{port}: {exc}") from None
        async with tcp:
            bound = tcp.extra(anyio.abc.SocketAttribute.local_port)
            info(
                f"forwarding tcp:{host}:{bound} to node {cap.node} (Ctrl-C to stop); "
                "whoever can connect to this port uses the capability (on loopback: every "
                "local user and process): use --listen unix:/PATH on a shared machine"
            )
            await tcp.serve(handle)
    return Exit.OK
