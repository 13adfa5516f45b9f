"""Node internals, part 3: binding the listen addresses and the accept loop.

The accept loop never ends the node: an accept error (EMFILE, ENOBUFS, ...)
sheds a connection and backs off, and a spare descriptor tells "a dialer is
waiting" from "idle" when the descriptors run out.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
from anyio.abc import SocketAttribute

from ..uri import (
    Hint,
    TcpHint,
    UnixHint,
)
from ._admission import Admission

log = logging.getLogger("capsock.node")


def _bind_error(exc: OSError, address: str) -> OSError:
    """The same OSError (errno kept), naming the address that could not be bound."""
    return OSError(exc.errno, f"cannot listen on {address}: {exc.strerror or exc}")


def _is_wildcard(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def _open_spare() -> int | None:
    try:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None


class Binding(Admission):
    """Listening sockets and their accept loops (see the module docstring)."""

    async def _bind(self, kind: str, host: str, port: int) -> list[Hint]:
        tg = self._require_running()
        listener: anyio.abc.Listener[Any]
        if kind == "unix":
            path = Path(host)
            # anyio removes a stale socket file (never a regular file) and sets
            # the mode right after bind(); the capability, not the file mode, is
            # what authorises, so the short window before chmod is harmless.
            try:
                listener = await anyio.create_unix_listener(path, mode=0o600)
            except OSError as exc:
                raise _bind_error(exc, f"unix:{path}") from exc
            hints: list[Hint] = [UnixHint(str(path))]
        else:
            try:
                listener = await anyio.create_tcp_listener(local_host=host, local_port=port)
            except OSError as exc:
                shown = f"[{host}]" if ":" in host else host
                raise _bind_error(exc, f"tcp:{shown}:{port}") from exc
            bound = listener.extra(SocketAttribute.local_port)
            if _is_wildcard(host):
                # The machine's usable addresses with the real port (rules in
                # capsock.net._interfaces); an advertise list replaces them anyway.
                hints = []
                if self._advertise is None:
                    from ..net import _interfaces as interfaces

                    subs = getattr(listener, "listeners", [listener])
                    socks = [sub.extra(SocketAttribute.raw_socket) for sub in subs]
                    hosts = interfaces.advertised_hosts(socks)
                    hints = [TcpHint(h, bound) for h in hosts]
                    if all(ipaddress.ip_address(h).is_loopback for h in hosts):
                        log.warning(
                            "listening on wildcard %s:%d, but this machine has no address "
                            "other than loopback: URIs reach it from this machine only; name "
                            "the address others dial with advertise (--advertise tcp:HOST:PORT)",
                            host,
                            bound,
                        )
            else:
                hints = [TcpHint(host, bound)]
        self._transport_listeners.append(listener)
        tg.start_soon(self._serve_transport, listener)
        return hints

    async def _serve_transport(self, listener: anyio.abc.Listener[Any]) -> None:
        # Our own accept loop instead of ``listener.serve()``: an accept error
        # (EMFILE when the descriptors run out, ENOBUFS, ECONNABORTED, ...) must
        # never end the node.  It sheds a connection and backs off instead.
        subs: list[anyio.abc.Listener[Any]] = list(getattr(listener, "listeners", [listener]))
        with self._serve_scope:
            async with anyio.create_task_group() as tg:
                for sub in subs:
                    tg.start_soon(self._accept_loop, sub)

    async def _accept_loop(self, listener: anyio.abc.Listener[Any]) -> None:
        # A spare descriptor, given up when accept() fails for lack of them:
        # Linux takes the new descriptor before it looks for a connection, so
        # without a free one accept() fails even with nobody waiting, and only
        # a retry with one free tells "a dialer is waiting" from "idle".
        spare: int | None = _open_spare()
        failures = 0
        try:
            while True:
                try:
                    transport = await listener.accept()  # type: ignore[attr-defined]
                except anyio.ClosedResourceError:
                    return  # aclose() closed the listening socket
                except (OSError, anyio.BrokenResourceError) as exc:
                    # anyio's trio backend reports the OSError as its cause
                    cause = exc if isinstance(exc, OSError) else exc.__cause__
                    if not isinstance(cause, OSError):
                        raise
                    self._counters["accept_errors"] += 1
                    self._log_accept_error(cause)
                    if spare is not None and cause.errno in (errno.EMFILE, errno.ENFILE):
                        os.close(spare)
                        spare = None
                        continue  # retry at once, with one descriptor free
                    failures += 1
                    self._shed_one()
                    await anyio.sleep(min(1.0, 0.005 * 2 ** min(failures, 8)))
                    continue
                failures = 0
                if spare is None:
                    spare = _open_spare()
                    if spare is None:  # still none free: make room for the next
                        self._shed_one()
                self._spawn_inbound(transport)
        finally:
            if spare is not None:
                os.close(spare)

    def _log_accept_error(self, exc: OSError) -> None:
        now = anyio.current_time()
        if now - self._accept_error_logged >= 10.0:
            self._accept_error_logged = now
            log.warning(
                "accepting a connection failed (%s); shedding the cheapest connection "
                "and backing off",
                errno.errorcode.get(exc.errno or 0, str(exc)),
            )
