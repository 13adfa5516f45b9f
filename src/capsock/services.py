"""Sharing local services on capabilities: :func:`splice`, :func:`share`, :func:`forward`.

The library half of ``capsock share`` and ``capsock forward``:

- :func:`share` serves a local TCP or unix service on a capability: every stream
  opened with it becomes a new connection to the service.
- :func:`forward` is the other end: a local TCP or unix listener whose every
  connection becomes a new stream opened with a capability.
- :func:`splice` is what both run per connection: it copies both ways at once and
  passes the end of each direction on as a half-close, like ``nc -N``.

A connection ends cleanly only when both directions ended cleanly; if either side
fails, the other is reset (a capsock RESET, or a TCP RST), so that nobody takes a
cut-off connection for a complete one.  When the shared service cannot be reached,
:func:`share` resets the stream with :attr:`ErrorCode.UNAVAILABLE`, which the
opener sees as :class:`StreamReset` with that code (docs/protocol.md section 8).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import stat
import struct
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio
import anyio.abc

from .errors import CapsockError, ErrorCode, LocalUsageError, StreamReset
from .net.stream import Stream
from .node import Listener, Node
from .uri import Capability

__all__ = ["bridge", "check_address", "forward", "share", "splice"]

log = logging.getLogger("capsock.services")

_CHUNK = 256 * 1024
_STREAM_ERRORS = (anyio.BrokenResourceError, anyio.ClosedResourceError, CapsockError, OSError)

Report = Callable[[str], None]
"""Where :func:`share` and :func:`forward` report per-connection events."""


async def splice(a: anyio.abc.ByteStream, b: anyio.abc.ByteStream) -> None:
    """Copy both ways between two byte streams until both directions ended.

    The end of one direction (``anyio.EndOfStream`` on ``receive``) is passed on
    as ``send_eof()`` to the other stream, so half-closed protocols keep working.
    Neither stream is closed: that is the caller's (see :func:`share`, which
    also resets both on failure).

    Raises:
        Whatever either stream raises (``StreamReset``, ``ConnectionLost``,
        ``OSError``, ``anyio.BrokenResourceError``...), in an exception group.
    """

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


# ------------------------------------------------------------------ addresses


@dataclass(frozen=True, slots=True)
class _Address:
    kind: str  # "tcp" or "unix"
    host: str  # the host, or the socket path
    port: int = 0

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.host}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp:{host}:{self.port}"


def _address(text: str, *, any_port: bool = False) -> _Address:
    """``tcp:HOST:PORT`` / ``HOST:PORT`` / ``unix:/PATH``.

    Raises:
        LocalUsageError: ``text`` is none of these.
    """
    if text.startswith("unix:"):
        path = text[5:]
        if not path.startswith("/"):
            raise LocalUsageError(f"{text!r}: a unix socket path must be absolute")
        return _Address("unix", path)
    rest = text.removeprefix("tcp:")
    host, sep, port = rest.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not int(port) < 65536:
        raise LocalUsageError(f"{text!r} is not an address: use tcp:HOST:PORT")
    if int(port) == 0 and not any_port:
        raise LocalUsageError(f"{text!r} is not an address: use tcp:HOST:PORT")
    return _Address("tcp", host, int(port))


def check_address(text: str, *, any_port: bool = False) -> str:
    """``text`` (``tcp:HOST:PORT``, ``HOST:PORT``, ``unix:/PATH``) in its canonical form.

    Raises:
        LocalUsageError: ``text`` is none of these (port 0 only with ``any_port``).
    """
    return str(_address(text, any_port=any_port))


async def _connect(to: _Address) -> anyio.abc.ByteStream:
    if to.kind == "unix":
        return await anyio.connect_unix(to.host)
    return await anyio.connect_tcp(to.host, to.port)


# ------------------------------------------------------------------ resetting both ends


def _abort_socket(sock: anyio.abc.ByteStream) -> None:
    """Make the coming close of a TCP connection abortive (an RST, not a FIN)."""
    raw = sock.extra(anyio.abc.SocketAttribute.raw_socket, None)
    if raw is not None and raw.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


@asynccontextmanager
async def _closing(sock: anyio.abc.ByteStream) -> AsyncIterator[None]:
    """Close ``sock`` (or a stream) at the end; on failure abortively, so the other
    side does not take a cut-off connection for a complete one."""
    try:
        yield
    except BaseException:
        if isinstance(sock, Stream):
            sock.reset(ErrorCode.CANCELLED)
        else:
            _abort_socket(sock)
        raise
    finally:
        with anyio.CancelScope(shield=True):
            await sock.aclose()


def _first(group: BaseExceptionGroup[BaseException]) -> BaseException:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def _explain(exc: BaseException) -> str:
    if isinstance(exc, StreamReset) and exc.code == ErrorCode.UNAVAILABLE:
        return "the shared service is not reachable on the sharing side (it refused or is down)"
    return " ".join(str(exc).split()) or type(exc).__name__


async def _bridge(stream: Stream, sock: anyio.abc.ByteStream, what: str, report: Report) -> None:
    """Splice a capsock stream and a socket; a failure on either side resets both."""
    try:
        async with _closing(stream), _closing(sock):
            await splice(stream, sock)
    except* _STREAM_ERRORS as group:
        report(f"{what} ended: {_explain(_first(group))}")


async def bridge(stream: Stream, sock: anyio.abc.ByteStream, what: str, report: Report) -> None:
    """Splice ``stream`` and ``sock`` until both directions ended; a failure on either
    side resets both (a capsock RESET, a TCP RST) and is reported as one line."""
    await _bridge(stream, sock, what, report)


# ------------------------------------------------------------------ share


async def share(
    node: Node,
    connect_to: str,
    *,
    listener: Listener | None = None,
    on_info: Report | None = None,
    on_error: Report | None = None,
    task_status: anyio.abc.TaskStatus[Capability] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the local service at ``connect_to`` on a capability.

    Every stream opened with the capability becomes a new connection to the
    service, spliced to it (:func:`splice`).  Runs until the listener closes (a
    capability used up or expired, ``listener.aclose()``) or is cancelled; a
    listener it made itself it also closes.

    Use it as ``uri = await task_group.start(share, node, "tcp:127.0.0.1:8000")``.

    Args:
        node: a running :class:`Node`.
        connect_to: ``tcp:HOST:PORT``, ``HOST:PORT`` or ``unix:/PATH``.
        listener: serve on this listener (with its TTL, uses, name...) instead
            of a new ``await node.listen()``.
        on_info: called with a line per stream served (default: the
            ``capsock.services`` logger, INFO).
        on_error: called with a line per stream that could not be served
            (default: that logger, WARNING).  Never contains a token.
        task_status: set to the capability once the listener exists.

    If the service cannot be reached, the stream is reset with
    :attr:`ErrorCode.UNAVAILABLE` so the opener learns why.

    Raises:
        LocalUsageError: ``connect_to`` is not an address.
    """
    to = _address(connect_to)
    info = on_info or log.info
    error = on_error or log.warning

    async def handle(stream: Stream) -> None:
        peer = stream.peer.short()
        try:
            service = await _connect(to)
        except OSError as exc:
            error(f"stream from {peer}: cannot connect to {to}: {exc}")
            stream.reset(ErrorCode.UNAVAILABLE)
            with anyio.CancelScope(shield=True):
                await stream.aclose()
            return
        info(f"stream from {stream.peer} -> {to}")
        await _bridge(stream, service, f"stream from {peer}", info)

    own = listener is None
    served = listener if listener is not None else await node.listen()
    try:
        task_status.started(served.uri)
        await served.serve(handle)
    finally:
        if own:
            with anyio.CancelScope(shield=True):
                await served.aclose()


# ------------------------------------------------------------------ forward


async def _unix_listener(path: str) -> tuple[anyio.abc.SocketListener, int]:
    """A listening unix socket at ``path``, mode 0600 from the start; and its inode.

    A stale socket (nobody accepts on it) is replaced; anything else at ``path``
    (a live socket, a regular file, a symbolic link, a directory) is refused.

    Raises:
        OSError: ``path`` is taken, or the socket cannot be created.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise OSError(f"cannot listen on unix:{path}: {exc.strerror}") from None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            raise OSError(
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
            raise OSError(f"cannot listen on unix:{path}: another process accepts on it")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # bind() creates the socket file with 0777 & ~umask: no moment with a wider mode.
    old = os.umask(0o177)
    try:
        sock.bind(path)
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on unix:{path}: {exc.strerror}") from None
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


async def forward(
    node: Node,
    capability: str | Capability,
    listen_on: str,
    *,
    on_error: Report | None = None,
    task_status: anyio.abc.TaskStatus[str] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Accept local connections on ``listen_on``; each becomes a stream opened with
    ``capability``, spliced to it (:func:`splice`).  Runs until cancelled.

    Use it as ``where = await task_group.start(forward, node, uri, "tcp:127.0.0.1:0")``:
    ``where`` is the bound address (``tcp:HOST:PORT`` with the real port, or
    ``unix:/PATH``).

    Whoever can connect to a TCP port uses the capability (on loopback: every
    local user and process); a unix socket is created with mode 0600, replaces
    only a stale socket, and is removed when ``forward`` ends.

    Args:
        node: a running :class:`Node`.
        capability: the capability URI (or parsed :class:`Capability`) to open
            streams with.
        listen_on: ``tcp:HOST:PORT`` (port 0: any free port), ``HOST:PORT`` or
            ``unix:/PATH``.
        on_error: called with a line per connection that failed (default: the
            ``capsock.services`` logger, WARNING).  A connection that could not
            be forwarded is closed with a TCP RST; a stream the sharing side
            reset as :attr:`ErrorCode.UNAVAILABLE` is reported as its service
            being unreachable.
        task_status: set to the bound address once listening.

    Raises:
        LocalUsageError: ``listen_on`` is not an address.
        InvalidCapability: ``capability`` is malformed.
        OSError: the local listener cannot be created (the message says why).
    """
    where = _address(listen_on, any_port=True)
    cap = capability if isinstance(capability, Capability) else Capability.parse(capability)
    error = on_error or log.warning

    async def handle(client: anyio.abc.SocketStream) -> None:
        try:
            stream = await node.connect(cap)
        except (CapsockError, TimeoutError, OSError) as exc:
            error(_explain(exc))
            _abort_socket(client)
            await client.aclose()
            return
        await _bridge(stream, client, "a forwarded connection", error)

    if where.kind == "unix":
        local, inode = await _unix_listener(where.host)
        try:
            async with local:
                task_status.started(str(where))
                await local.serve(handle)
        finally:
            _remove_socket(where.host, inode)
        return
    try:
        tcp = await anyio.create_tcp_listener(local_host=where.host, local_port=where.port)
    except OSError as exc:
        raise OSError(f"cannot listen on {where.host}:{where.port}: {exc}") from None
    async with tcp:
        bound = tcp.extra(anyio.abc.SocketAttribute.local_port)
        task_status.started(str(_Address("tcp", where.host, bound)))
        await tcp.serve(handle)
