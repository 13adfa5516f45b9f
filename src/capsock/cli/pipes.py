"""``listen`` / ``connect`` (stdin and stdout over a stream) and ``share`` / ``forward``
(TCP services over capabilities).

Both directions are copied at once; the end of one direction is passed on as a
half-close (``send_eof``, TCP ``shutdown(SHUT_WR)``), and a pipe is done when
both directions ended, like ``nc -N``.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import queue
import threading
from functools import partial

import anyio
import anyio.abc
import anyio.from_thread
import anyio.lowlevel

from ..errors import CapsockError, LocalUsageError
from ..net.stream import Stream
from ..services import bridge as _splice_and_report
from ..services import check_address, forward, share, splice
from ..transfer import looks_like_offer
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


_PEEK_LIMIT = 64 * 1024 + 4
_PEEK_WAIT = 2.0


async def _peek_for_offer(stream: Stream) -> bytes:
    """The first bytes from ``stream``, unless they are a ``capsock send`` OFFER.

    Reads until :func:`capsock.transfer.looks_like_offer` can tell (at most one
    offer's worth of bytes, at most a moment after the first ones arrived).

    Raises:
        CliError: they are an offer (exit code 2): the other side is a sender.
        anyio.EndOfStream: the stream ended before any byte came.
    """
    pending = await stream.receive(1 << 20)
    with anyio.move_on_after(_PEEK_WAIT):
        while looks_like_offer(pending) is None and len(pending) < _PEEK_LIMIT:
            try:
                pending += await stream.receive(1 << 20)
            except anyio.EndOfStream:
                break
    if looks_like_offer(pending):
        raise CliError(
            "this is a `capsock send` capability (the other side offers a file): fetch it "
            "with `capsock receive URI`; nothing was received, and the sender does not "
            "count this as a use",
            Exit.USAGE,
        )
    return pending


async def pipe_stdio(
    stream: Stream, stdin: InputPipe, stdout_fd: int = 1, *, refuse_offer: bool = False
) -> None:
    """Copy ``stdin`` to ``stream`` and ``stream`` to stdout until both directions ended.

    With ``refuse_offer``, a stream whose first bytes are a ``capsock send``
    OFFER is not copied: :class:`CliError` (exit code 2) says to use ``receive``.

    Raises:
        CliError: stdout was closed by its reader; an offer with ``refuse_offer``.
        StreamReset / ConnectionLost / OSError: the stream or stdin failed.
    """

    async def upstream() -> None:
        while data := await stdin.read():
            await stream.send(data)
        await stream.send_eof()

    async def write(data: bytes) -> None:
        try:
            await anyio.to_thread.run_sync(_write_all, stdout_fd, data)
        except BrokenPipeError:
            raise CliError("stdout was closed before the stream ended") from None

    async def downstream() -> None:
        if refuse_offer:
            try:
                await write(await _peek_for_offer(stream))
            except anyio.EndOfStream:
                return
        while True:
            try:
                data = await stream.receive(1 << 20)
            except anyio.EndOfStream:
                return
            await write(data)

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
            await pipe_stdio(stream, stdin, refuse_offer=True)
    return Exit.OK


# ------------------------------------------------------------------ TCP


def _error(text: str) -> None:
    say(f"capsock: error: {text}")


async def bridge(stream: Stream, sock: anyio.abc.ByteStream, what: str) -> None:
    """Splice a capsock stream and a socket; a failure on either side resets both."""
    await _splice_and_report(stream, sock, what, info)


async def cmd_share(args: argparse.Namespace) -> int:
    """Expose a local TCP (or unix) service: every stream becomes a new connection to it."""
    try:
        shown = check_address(args.target)
    except LocalUsageError as exc:
        raise CliError(str(exc), Exit.USAGE) from None
    async with listening_node(args) as node:
        listener, cap = await make_listener(node, args)
        announce(args, cap, f"sharing {shown} (Ctrl-C to stop)")
        await share(node, args.target, listener=listener, on_info=info, on_error=_error)
    info("the capability is used up or expired; done")
    return Exit.OK


async def cmd_forward(args: argparse.Namespace) -> int:
    """Accept local connections (TCP or a unix socket); each one becomes a stream
    opened with the capability."""
    cap = read_capability(args.uri)
    spec = args.listen if ":" in args.listen else f"127.0.0.1:{args.listen}"
    try:
        check_address(spec, any_port=True)
    except LocalUsageError as exc:
        raise CliError(str(exc), Exit.USAGE) from None
    async with dialing_node(args, cap) as node, anyio.create_task_group() as tg:
        try:
            where = await tg.start(partial(forward, node, cap, spec, on_error=_error))
        except OSError as exc:
            raise CliError(str(exc)) from None
        if where.startswith("unix:"):
            info(f"forwarding {where} to node {cap.node} (Ctrl-C to stop)")
        else:
            info(
                f"forwarding {where} to node {cap.node} (Ctrl-C to stop); "
                "whoever can connect to this port uses the capability (on loopback: every "
                "local user and process): use --listen unix:/PATH on a shared machine"
            )
    return Exit.OK
