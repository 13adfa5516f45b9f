"""The ASGI server half of :mod:`capsock.http`: HTTP/1.1 on h11 over one capsock stream."""

from __future__ import annotations

import contextlib
import logging
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, MutableMapping
from typing import Any, Literal

import anyio
import anyio.abc
import h11

from ..errors import CapsockError
from ..net.stream import CapsockAttribute, Stream
from ..node import Listener

log = logging.getLogger("capsock.http")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_CHUNK = 65536
_ASGI = {"version": "3.0", "spec_version": "2.4"}
_STREAM_ERRORS = (anyio.BrokenResourceError, anyio.ClosedResourceError, CapsockError)
KEEP_ALIVE = 30.0
"""Seconds a server connection may sit idle before (and between) requests."""
MAX_HEADER_BYTES = 16 * 1024
"""Largest request line + headers the server reads (h11's default)."""


class ClientDisconnected(OSError):
    """Raised by the ASGI ``send`` of a request whose client is gone (ASGI asks for an OSError)."""


def _capsock_extension(stream: Stream) -> dict[str, Any]:
    cap = stream.extra(CapsockAttribute.capability, None)
    return {
        "peer_id": stream.peer,
        "route": stream.extra(CapsockAttribute.route, None),
        "capability": cap.redacted() if cap is not None else None,
    }


def _target(target: bytes) -> tuple[str, bytes, bytes]:
    """(path, raw_path, query_string) of a request target, origin- or absolute-form."""
    if not target.startswith(b"/") and target != b"*":
        split = urllib.parse.urlsplit(target)
        target = (split.path or b"/") + (b"?" + split.query if split.query else b"")
    raw_path, _, query = target.partition(b"?")
    return urllib.parse.unquote(raw_path.decode("latin-1")), raw_path, query


class _Connection:
    """One HTTP/1.1 connection (one capsock stream): requests one after another."""

    def __init__(
        self, stream: Stream, app: ASGIApp, state: dict[str, Any], keep_alive: float, root_path: str
    ) -> None:
        self.stream = stream
        self.app = app
        self.state = state
        self.keep_alive = keep_alive
        self.root_path = root_path
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
        self.extension = _capsock_extension(stream)

    async def _next_event(self) -> Any:
        while True:
            event = self.h11.next_event()
            if event is not h11.NEED_DATA:
                return event
            try:
                data = await self.stream.receive(_CHUNK)
            except anyio.EndOfStream:
                data = b""
            self.h11.receive_data(data)

    async def _send(self, event: Any) -> None:
        data = self.h11.send(event)
        if data:
            await self.stream.send(data)

    async def run(self) -> None:
        try:
            while True:
                with anyio.move_on_after(self.keep_alive) as idle:
                    event = await self._next_event()
                if idle.cancel_called or not isinstance(event, h11.Request):
                    return  # idle too long, or the client closed (ConnectionClosed)
                if not await self._request(event) or not await self._drain():
                    return
                if self.h11.our_state is not h11.DONE:
                    return  # MUST_CLOSE: "connection: close", or HTTP/1.0
                self.h11.start_next_cycle()
        except h11.RemoteProtocolError as exc:
            log.info("bad HTTP request from %s: %s", self.stream.peer.short(), exc)
            if self.h11.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                with contextlib.suppress(h11.LocalProtocolError, *_STREAM_ERRORS):
                    await self._simple_response(exc.error_status_hint, b"bad request\n")

    async def _drain(self) -> bool:
        """Read the rest of a request body the app did not read (a GET's empty
        one, usually); False if it is large or slow: then the connection closes."""
        budget = _CHUNK
        with anyio.move_on_after(self.keep_alive):
            while self.h11.their_state is h11.SEND_BODY:
                event = await self._next_event()
                if isinstance(event, h11.Data):
                    budget -= len(event.data)
                    if budget < 0:
                        return False
                elif not isinstance(event, h11.EndOfMessage):
                    return False
        return self.h11.their_state is h11.DONE

    async def _simple_response(self, status: int, body: bytes) -> None:
        headers = [("content-type", "text/plain; charset=utf-8"), ("connection", "close")]
        headers.append(("content-length", str(len(body))))
        await self._send(h11.Response(status_code=status, headers=headers))
        await self._send(h11.Data(data=body))
        await self._send(h11.EndOfMessage())

    async def _request(self, request: h11.Request) -> bool:
        """Run the app for one request; False if the connection cannot go on."""
        path, raw_path, query = _target(request.target)
        scope: Scope = {
            "type": "http",
            "asgi": dict(_ASGI),
            "http_version": request.http_version.decode("ascii"),
            "method": request.method.decode("ascii"),
            "scheme": "http",
            "path": path,
            "raw_path": raw_path,
            "query_string": query,
            "root_path": self.root_path,
            "headers": [(name, value) for name, value in request.headers],
            "client": None,  # there is no address; who calls is in extensions
            "server": None,
            "extensions": {"capsock": dict(self.extension)},
            "state": dict(self.state),
        }
        head = request.method == b"HEAD"
        started = complete = body_done = disconnected = False
        finished = anyio.Event()
        response: h11.Response | None = None

        async def receive() -> Message:
            nonlocal body_done, disconnected
            if not (body_done or disconnected or complete):
                try:
                    if self.h11.they_are_waiting_for_100_continue:
                        await self._send(h11.InformationalResponse(status_code=100, headers=[]))
                    event = await self._next_event()
                except (*_STREAM_ERRORS, h11.RemoteProtocolError):
                    event = None
                if isinstance(event, h11.Data):
                    return {"type": "http.request", "body": bytes(event.data), "more_body": True}
                if isinstance(event, h11.EndOfMessage):
                    body_done = True
                    return {"type": "http.request", "body": b"", "more_body": False}
                disconnected = True
                finished.set()
            if not finished.is_set():  # the request is read: what is left is the disconnect
                async with anyio.create_task_group() as tg:
                    tg.start_soon(watch_the_client)
                    await finished.wait()
                    tg.cancel_scope.cancel()
            return {"type": "http.disconnect"}

        async def watch_the_client() -> None:
            """While the app waits for the disconnect: notice a client that resets
            or closes the stream.  Bytes of a next request are kept for h11 (up to a
            bound).  An EOF ends the wait too (the client can send nothing more, and
            a closing client sends it first), but ``send`` still works after it: a
            client may half-close after its request and read the response."""
            nonlocal disconnected
            kept = 0
            try:
                while kept < _CHUNK:
                    data = await self.stream.receive(_CHUNK)
                    self.h11.receive_data(data)
                    kept += len(data)
            except anyio.EndOfStream:
                self.h11.receive_data(b"")
                finished.set()
            except _STREAM_ERRORS:
                disconnected = True
                finished.set()

        async def send(message: Message) -> None:
            nonlocal started, complete, response, disconnected
            if disconnected:
                raise ClientDisconnected("the client is gone")
            kind = message["type"]
            if kind == "http.response.start" and not started:
                started = True
                headers = [(bytes(k), bytes(v)) for k, v in message.get("headers", [])]
                response = h11.Response(status_code=int(message["status"]), headers=headers)
            elif kind == "http.response.body" and started and not complete:
                try:
                    if response is not None:
                        await self._send(response)
                        response = None
                    body = bytes(message.get("body", b""))
                    if body and not head:
                        await self._send(h11.Data(data=body))
                    if not message.get("more_body", False):
                        await self._send(h11.EndOfMessage())
                        complete = True
                        finished.set()
                except _STREAM_ERRORS:
                    disconnected = True
                    finished.set()
                    raise ClientDisconnected("the client is gone") from None
            else:
                raise RuntimeError(f"unexpected ASGI message {kind!r} (started={started})")

        try:
            await self.app(scope, receive, send)
        except ClientDisconnected:
            pass
        except Exception:
            log.exception("ASGI app failed on %s %s", scope["method"], scope["path"])
        finished.set()
        if complete:
            return True
        if not started and not disconnected:
            with contextlib.suppress(*_STREAM_ERRORS):
                await self._simple_response(500, b"internal server error\n")
            return False
        self.stream.reset()  # a response cut short must not look complete
        return False


async def serve_stream(
    stream: Stream,
    app: ASGIApp,
    *,
    keep_alive: float = KEEP_ALIVE,
    root_path: str = "",
    state: Mapping[str, Any] | None = None,
) -> None:
    """Serve HTTP/1.1 requests on one capsock stream until the client closes it.

    Requests on a connection are served one after another (keep-alive); an idle
    connection is closed after ``keep_alive`` seconds.  ``state`` is copied
    into each request's ``scope["state"]``.  The stream is closed on return.
    An app that fails before it started its response gets a 500 sent for it;
    one that fails mid-response has the stream reset, so the client sees an
    error, never a short body that looks complete.
    """
    try:
        await _Connection(stream, app, dict(state or {}), keep_alive, root_path).run()
    except _STREAM_ERRORS as exc:
        log.info("HTTP connection from %s ended: %s", stream.peer.short(), exc)
    finally:
        await stream.aclose()


@contextlib.asynccontextmanager
async def _lifespan(
    app: ASGIApp, mode: Literal["auto", "on", "off"]
) -> AsyncIterator[dict[str, Any]]:
    """Run the app's lifespan protocol around the body; yields the lifespan state."""
    state: dict[str, Any] = {}
    if mode == "off":
        yield state
        return
    to_app, app_in = anyio.create_memory_object_stream[Message](2)
    app_out, from_app = anyio.create_memory_object_stream[Message](2)

    async def run() -> None:
        scope: Scope = {"type": "lifespan", "asgi": dict(_ASGI), "state": state}
        with app_in, app_out:
            try:
                await app(scope, app_in.receive, app_out.send)
            except Exception as exc:
                if mode == "on":
                    log.exception("ASGI lifespan failed")
                else:
                    log.info("the app does not support lifespan (%s: %s)", type(exc).__name__, exc)

    async def step(kind: str) -> bool:
        try:
            await to_app.send({"type": f"lifespan.{kind}"})
            answer = await from_app.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError):
            if mode == "on":
                raise RuntimeError(f"the ASGI app ended during lifespan {kind}") from None
            return False
        if answer["type"] == f"lifespan.{kind}.failed":
            raise RuntimeError(f"ASGI lifespan {kind} failed: {answer.get('message', '')}")
        return True

    async with anyio.create_task_group() as tg, to_app, from_app:
        tg.start_soon(run)
        supported = await step("startup")
        try:
            yield state
        finally:
            if supported:
                with anyio.CancelScope(shield=True):
                    await step("shutdown")
            tg.cancel_scope.cancel()


async def serve(
    listener: Listener,
    app: ASGIApp,
    *,
    lifespan: Literal["auto", "on", "off"] = "auto",
    keep_alive: float = KEEP_ALIVE,
    root_path: str = "",
) -> None:
    """Serve an ASGI app on every stream the listener accepts, until it is closed
    (or the caller's task is cancelled).

    ``lifespan``: ``"auto"`` runs the app's startup/shutdown if it supports the
    lifespan protocol, ``"on"`` requires it, ``"off"`` skips it.  The
    lifespan state reaches each request as ``scope["state"]``.

    Raises:
        RuntimeError: lifespan startup failed (or, with ``"on"``, is unsupported).
    """
    async with _lifespan(app, lifespan) as state:

        async def handle(stream: Stream) -> None:
            await serve_stream(stream, app, keep_alive=keep_alive, root_path=root_path, state=state)

        await listener.serve(handle)
