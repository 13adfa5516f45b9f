"""What a side offers over msgpack-RPC: :class:`Service`, :func:`method`, the config.

Public names are re-exported by :mod:`capsock.rpc.msgpack`; import them from there.
"""

from __future__ import annotations

import contextvars
import inspect
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar, overload

from ..errors import LocalUsageError
from . import RemoteError

if TYPE_CHECKING:
    from .connection import Connection
    from .remote import RemoteObject

__all__ = ["RpcConfig", "Service", "current_connection", "method"]

log = logging.getLogger("capsock.rpc")


@dataclass(slots=True)
class RpcConfig:
    """Limits and timeouts of one RPC connection; every field has a default."""

    max_message_size: int = 1 << 20
    """Largest message, in bytes, accepted from the peer (a bigger one closes the
    connection) and sent to it (a bigger one raises ``LocalUsageError``).
    Decoded values can take up to ~60x their wire size in memory (a one-byte
    empty array is a Python list); bulk data belongs on a capsock stream."""
    max_items: int = 65536
    """Most elements of one array or map in a received message."""
    max_concurrent_requests: int = 128
    """Requests and notifications from the peer handled at once.  At the limit
    the connection stops reading (the peer's sends wait on flow control) for
    up to ``busy_timeout`` seconds, then answers the next request with a
    ``Busy`` error (a notification is dropped) and reads on."""
    busy_timeout: float = 2.0
    """Seconds to wait for a free handler before answering ``Busy``.  Bounds
    the stall when every handler waits for an answer from the peer itself."""
    call_timeout: float | None = None
    """Default timeout of :meth:`Connection.call`, in seconds (``None``: none)."""
    close_grace: float = 5.0
    """Seconds the connection waits, after the peer's end of stream, for its
    own handlers to answer before it closes."""
    send_queue: int = 256
    """Messages queued for the writer before senders wait."""


_current: contextvars.ContextVar[Connection] = contextvars.ContextVar("capsock_rpc_connection")


def current_connection() -> Connection:
    """The connection whose request or notification is being handled.

    Use it inside a :class:`Service` method, e.g. to learn ``.peer``.

    Raises:
        LocalUsageError: not called from inside an RPC method.
    """
    try:
        return _current.get()
    except LookupError:
        raise LocalUsageError("current_connection() is only valid inside an RPC method") from None


F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True, slots=True)
class _MethodInfo:
    attr: str
    least: int  # positional parameters required (without self)
    most: int | None  # None: *args
    sync: bool  # a plain function (not async): may run inline in the reader


@overload
def method(fn: F, /) -> F: ...
@overload
def method(*, name: str | None = None) -> Callable[[F], F]: ...
def method(fn: Any = None, /, *, name: str | None = None) -> Any:
    """Mark a :class:`Service` method as callable over RPC (sync or async).

    ``@method`` uses the function's name; ``@method(name="x")`` another one.
    Parameters are positional, as in the specification.
    """

    def mark(f: F) -> F:
        f._capsock_rpc_name = name or f.__name__  # type: ignore[attr-defined]
        return f

    return mark(fn) if fn is not None else mark


def _check_arity(method: str, info: _MethodInfo, params: Sequence[Any]) -> None:
    n = len(params)
    if n < info.least or (info.most is not None and n > info.most):
        want = f"{info.least}" if info.most == info.least else f"{info.least} to {info.most}"
        if info.most is None:
            want = f"at least {info.least}"
        raise RemoteError("InvalidParams", f"{method} takes {want} parameters, got {n}")


def _arity(fn: Callable[..., Any]) -> tuple[int, int | None]:
    params = list(inspect.signature(fn).parameters.values())[1:]  # without self
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    least = sum(1 for p in positional if p.default is p.empty)
    variadic = any(p.kind is p.VAR_POSITIONAL for p in params)
    return least, None if variadic else len(positional)


class Service:
    """Base class of objects offered over msgpack-RPC.

    Only methods decorated with :func:`method` can be called; anything else
    (attributes, private methods, inherited ``object`` methods) answers
    ``NoSuchMethod``.  A ``Service`` instance put into params or results is
    exported to the receiving peer (see the module documentation).

    Override :meth:`rpc_call` / :meth:`rpc_notify` to dispatch dynamically.
    """

    _rpc_methods: ClassVar[dict[str, _MethodInfo]] = {}
    _rpc_default_dispatch: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        table: dict[str, _MethodInfo] = {}
        for klass in reversed(cls.__mro__):
            for attr, value in vars(klass).items():
                wire = getattr(value, "_capsock_rpc_name", None)
                if isinstance(wire, str) and callable(value):
                    least, most = _arity(value)
                    sync = not inspect.iscoroutinefunction(value)
                    table[wire] = _MethodInfo(attr, least, most, sync)
        cls._rpc_methods = table
        cls._rpc_default_dispatch = cls.rpc_call is Service.rpc_call

    async def rpc_call(self, method: str, params: list[Any]) -> Any:
        """Run ``method`` with ``params``; the default looks up :func:`method`-marked ones.

        Raises:
            RemoteError: ``NoSuchMethod`` or ``InvalidParams`` (sent to the caller as is).
            Exception: whatever the method raises (sent as ``[type name, message]``).
        """
        info = self._rpc_methods.get(method)
        if info is None:
            raise RemoteError("NoSuchMethod", f"no method named {method[:100]!r}")
        _check_arity(method, info, params)
        result = getattr(self, info.attr)(*params)
        if inspect.isawaitable(result):
            result = await result
        return result

    def _rpc_inline(self, method: str) -> Callable[..., Any] | None:
        """For the connection's fast path: a callable that answers ``method``
        synchronously exactly as :meth:`rpc_call` would, or ``None``."""
        info = self._rpc_methods.get(method)
        if info is None or not info.sync or not self._rpc_default_dispatch:
            return None
        fn = getattr(self, info.attr)

        def run(*params: Any) -> Any:
            _check_arity(method, info, params)
            result = fn(*params)
            if inspect.isawaitable(result):  # a plain function that returned an awaitable
                raise TypeError(f"{method} returned an awaitable; make it an async def")
            return result

        return run

    async def rpc_notify(self, method: str, params: list[Any]) -> None:
        """Handle a notification: by default, :meth:`rpc_call` with the result dropped."""
        await self.rpc_call(method, params)


class _Forwarder(Service):
    """Forwards every call to a remote object (what a passed-on RemoteObject exports as)."""

    def __init__(self, remote: RemoteObject) -> None:
        self.remote = remote

    async def rpc_call(self, method: str, params: list[Any]) -> Any:
        return await self.remote.call(method, *params)

    async def rpc_notify(self, method: str, params: list[Any]) -> None:
        await self.remote.notify(method, *params)


# ------------------------------------------------------------------ errors on the wire


def _error_payload(exc: Exception, method: str) -> list[str]:
    if isinstance(exc, RemoteError):
        return [exc.type_name, exc.remote_message]
    log.info("RPC method %r raised %s", method[:100], type(exc).__name__, exc_info=exc)
    return [type(exc).__name__, str(exc)[:1024]]


def _remote_error(error: Any) -> RemoteError:
    if (
        isinstance(error, list)
        and len(error) == 2
        and isinstance(error[0], str)
        and isinstance(error[1], str)
    ):
        return RemoteError(error[0], error[1], error)
    if isinstance(error, str):
        return RemoteError("Error", error, error)
    return RemoteError("Error", repr(error)[:200], error)
