"""capsock.http: an ASGI app (Starlette) served on a capability, called with httpx.

Both backends: the server (h11 on anyio), Starlette and httpx/httpcore all run
on asyncio and trio.  The uvicorn test is asyncio only (uvicorn is).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest

import capsock

httpx = pytest.importorskip("httpx", reason="the 'http' extra is not installed")
starlette = pytest.importorskip("starlette")
from starlette.applications import Starlette  # noqa: E402
from starlette.requests import Request  # noqa: E402
from starlette.responses import JSONResponse, Response, StreamingResponse  # noqa: E402
from starlette.routing import Route  # noqa: E402

from capsock import http  # noqa: E402

pytestmark = pytest.mark.anyio


async def whoami(request: Request) -> JSONResponse:
    ext = request.scope["extensions"]["capsock"]
    return JSONResponse(
        {
            "peer_id": str(ext["peer_id"]),
            "route": ext["route"],
            "capability": ext["capability"],
            "client": request.scope["client"],
            "server": request.scope["server"],
            "path": request.url.path,
            "query": request.url.query,
            "host": request.headers["host"],
            "started": getattr(request.state, "started", None),
        }
    )


async def echo(request: Request) -> Response:
    body = await request.body()
    return Response(body[::-1], media_type="application/octet-stream")


async def numbers(request: Request) -> StreamingResponse:
    async def gen() -> AsyncIterator[bytes]:
        for i in range(int(request.query_params["n"])):
            yield f"{i}\n".encode()

    return StreamingResponse(gen(), media_type="text/plain")


async def fails(request: Request) -> Response:
    raise ValueError("the app is broken")


async def fails_midway(request: Request) -> StreamingResponse:
    async def gen() -> AsyncIterator[bytes]:
        yield b"first part\n"
        raise ValueError("broken in the middle")

    return StreamingResponse(gen(), headers={"content-length": "1000"})


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
    yield {"started": "yes"}


APP = Starlette(
    routes=[
        Route("/whoami", whoami),
        Route("/echo", echo, methods=["POST"]),
        Route("/numbers", numbers),
        Route("/fails", fails),
        Route("/fails-midway", fails_midway),
    ],
    lifespan=lifespan,
)


@pytest.fixture
async def served() -> AsyncIterator[tuple[capsock.Node, capsock.Node, capsock.Listener]]:
    async with capsock.Node(listen=["tcp:127.0.0.1:0"]) as server, capsock.Node() as client:
        listener = await server.listen()
        async with anyio.create_task_group() as tg:
            tg.start_soon(http.serve, listener, APP)
            yield server, client, listener
            tg.cancel_scope.cancel()


def client_for(node: capsock.Node, uri: capsock.Capability, **kw: Any) -> Any:
    transport = http.Transport(node, {"api.example": uri}, **kw)
    return httpx.AsyncClient(transport=transport, base_url="http://api.example")


async def test_scope_names_the_peer_and_fakes_no_address(
    served: tuple[capsock.Node, capsock.Node, capsock.Listener],
) -> None:
    server, client, listener = served
    async with client_for(client, listener.uri) as web:
        response = await web.get("/whoami", params={"x": "a b"})
    assert response.status_code == 200
    body = response.json()
    assert body["peer_id"] == str(client.id)  # authenticated by the handshake
    assert body["client"] is None  # never a fake address
    assert body["server"] is None
    assert body["route"].startswith("inbound tcp:127.0.0.1:")
    assert body["capability"] == f"capsock://{server.id}/<redacted>"
    assert body["path"] == "/whoami"
    assert body["query"] == "x=a+b"
    assert body["host"] == "api.example"
    assert body["started"] == "yes"  # lifespan state reached the request


async def test_fifty_concurrent_requests_share_one_session(
    served: tuple[capsock.Node, capsock.Node, capsock.Listener],
) -> None:
    server, client, listener = served
    results: dict[int, bytes] = {}
    async with client_for(client, listener.uri) as web:

        async def one(i: int) -> None:
            response = await web.post("/echo", content=f"request {i}".encode())
            response.raise_for_status()
            results[i] = response.content

        async with anyio.create_task_group() as tg:
            for i in range(50):
                tg.start_soon(one, i)
    assert results == {i: f"request {i}".encode()[::-1] for i in range(50)}
    stats = server.stats()
    assert list(stats["sessions"]) == [str(client.id)]  # one session carried all the streams
    assert 1 <= stats["streams_accepted"] <= 50


async def test_keep_alive_reuses_one_stream(
    served: tuple[capsock.Node, capsock.Node, capsock.Listener],
) -> None:
    server, client, listener = served
    async with client_for(client, listener.uri) as web:
        for i in range(10):
            assert (await web.get("/whoami")).status_code == 200, i
    assert server.stats()["streams_accepted"] == 1


async def test_large_bodies_and_streaming_responses(
    served: tuple[capsock.Node, capsock.Node, capsock.Listener],
) -> None:
    _, client, listener = served
    payload = bytes(range(256)) * 4096  # 1 MiB
    async with client_for(client, listener.uri) as web:
        response = await web.post("/echo", content=payload)
        assert response.content == payload[::-1]

        async def chunks() -> AsyncIterator[bytes]:  # a chunked request body
            for i in range(0, len(payload), 100_000):
                yield payload[i : i + 100_000]

        response = await web.post("/echo", content=chunks())
        assert response.content == payload[::-1]
        response = await web.get("/numbers", params={"n": "1000"})
        assert response.headers["transfer-encoding"] == "chunked"
        assert response.text.splitlines() == [str(i) for i in range(1000)]
        head = await web.head("/numbers", params={"n": "3"})
        assert head.status_code == 405 or head.content == b""


async def test_app_errors_are_500_or_a_broken_response(
    served: tuple[capsock.Node, capsock.Node, capsock.Listener],
    caplog: pytest.LogCaptureFixture,
) -> None:
    _, client, listener = served
    caplog.set_level(logging.ERROR, "capsock.http")
    async with client_for(client, listener.uri) as web:
        response = await web.get("/fails")
        assert response.status_code == 500
        with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
            await web.get("/fails-midway")  # never a short body that looks complete
        assert (await web.get("/whoami")).status_code == 200  # the server goes on
    assert "the app is broken" in caplog.text


async def test_unknown_host_https_and_refused_capability_are_httpx_errors(
    served: tuple[capsock.Node, capsock.Node, capsock.Listener],
) -> None:
    server, client, listener = served
    token = str(listener.uri).split("/")[3].split("?")[0]
    async with client_for(client, listener.uri) as web:
        with pytest.raises(httpx.ConnectError, match=r"no capability for host 'other\.example'"):
            await web.get("http://other.example/")
        with pytest.raises(httpx.UnsupportedProtocol, match="http://"):
            await web.get("https://api.example/whoami")
        await server.revoke(listener.uri)
        with pytest.raises(httpx.ConnectError, match="refused the capability") as info:
            await web.get("/whoami")
        assert token not in str(info.value)


async def test_garbage_gets_a_400_and_the_stream_closes(
    served: tuple[capsock.Node, capsock.Node, capsock.Listener],
) -> None:
    _, client, listener = served
    stream = await client.connect(listener.uri)
    await stream.send(b"NOT HTTP AT ALL\r\n\r\n")
    answer = b""
    with anyio.fail_after(30):
        with contextlib.suppress(anyio.EndOfStream):
            while True:
                answer += await stream.receive()
    assert answer.startswith(b"HTTP/1.1 400 ")
    await stream.aclose()


async def test_an_idle_connection_is_closed_after_keep_alive() -> None:
    async with capsock.Node(listen=["tcp:127.0.0.1:0"]) as server, capsock.Node() as client:
        listener = await server.listen()
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: http.serve(listener, APP, keep_alive=0.2, lifespan="off"))
            stream = await client.connect(listener.uri)
            with anyio.fail_after(30), pytest.raises(anyio.EndOfStream):
                await stream.receive()  # the server gave up on the silent client
            await stream.aclose()
            tg.cancel_scope.cancel()


async def test_serve_stream_with_a_raw_asgi_app() -> None:
    """A bare ASGI app: request body and disconnect messages as the spec says."""
    messages: list[dict[str, Any]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        while True:
            message = await receive()
            messages.append(message)
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 201, "headers": [(b"x-a", b"1")]})
        await send({"type": "http.response.body", "body": b"ok"})
        messages.append(await receive())  # the response is done: a disconnect

    async with capsock.Node(listen=["tcp:127.0.0.1:0"]) as server, capsock.Node() as client:
        listener = await server.listen()
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: http.serve(listener, app, lifespan="auto"))
            async with client_for(client, listener.uri) as web:
                response = await web.put("/x", content=b"data")
            tg.cancel_scope.cancel()
    assert response.status_code == 201
    assert response.headers["x-a"] == "1"
    assert response.text == "ok"
    assert messages[-1] == {"type": "http.disconnect"}
    assert b"".join(m.get("body", b"") for m in messages) == b"data"


async def test_uvicorn_over_the_asyncio_bridge(anyio_backend: str) -> None:
    """Any asyncio server protocol runs on capsock.aio: here uvicorn's own HTTP
    protocol class (uvicorn internals; see docs/web.md), called with httpx."""
    if anyio_backend != "asyncio":
        pytest.skip("uvicorn runs on asyncio only")
    uvicorn = pytest.importorskip("uvicorn")
    from uvicorn.server import ServerState

    from capsock import aio

    async def app(scope: Any, receive: Any, send: Any) -> None:
        body = json.dumps({"client": scope["client"]}).encode()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})

    config = uvicorn.Config(app, http="h11", lifespan="off", log_level="warning")
    config.load()
    state = ServerState()

    def factory() -> Any:
        return config.http_protocol_class(config=config, server_state=state, app_state={})

    async with capsock.Node(listen=["tcp:127.0.0.1:0"]) as server, capsock.Node() as client:
        srv = await aio.create_server(server, factory)
        async with srv, client_for(client, srv.uri) as web:
            responses = [await web.get("/") for _ in range(3)]
    assert [r.json() for r in responses] == [{"client": None}] * 3  # no fake address


def test_the_web_page_program_runs_and_prints_what_it_says(tmp_path: Any) -> None:
    """docs/web.md: its python blocks are one program, run verbatim; its output
    is the page's ``text`` block."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    page = (root / "docs" / "web.md").read_text("utf-8")
    blocks = re.findall(r"^```python\n(.*?)^```", page, re.M | re.S)
    (expected,) = re.findall(r"^It prints:\n\n```text\n(.*?)^```", page, re.M | re.S)
    assert len(blocks) >= 4
    program = tmp_path / "web_page.py"
    program.write_text("\n".join(blocks), "utf-8")
    result = subprocess.run(
        [sys.executable, str(program)], cwd=root, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == expected


async def test_a_client_that_goes_away_is_noticed() -> None:
    """Both ways an app learns of it: ``receive()`` gives ``http.disconnect``
    while the app waits, and ``send`` raises an OSError (ClientDisconnected)."""
    events: list[str] = []
    done = anyio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await receive()  # the (empty) body
        if scope["path"] == "/wait":
            message = await receive()  # nothing to send: wait for the client to go
            events.append(message["type"])
            done.set()
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        try:
            while True:
                await send({"type": "http.response.body", "body": b"x" * 4096, "more_body": True})
        except OSError as exc:
            events.append(type(exc).__name__)
            done.set()
            raise

    async with capsock.Node(listen=["tcp:127.0.0.1:0"]) as server, capsock.Node() as client:
        listener = await server.listen()
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: http.serve(listener, app, lifespan="off"))
            for path in ["/wait", "/forever"]:
                stream = await client.connect(listener.uri)
                await stream.send(f"GET {path} HTTP/1.1\r\nhost: x\r\n\r\n".encode())
                if path == "/forever":
                    assert (await stream.receive()).startswith(b"HTTP/1.1 200 ")
                await anyio.sleep(0.1)
                await stream.aclose()  # the client goes away without waiting for the end
                with anyio.fail_after(30):
                    await done.wait()
                done = anyio.Event()
            tg.cancel_scope.cancel()
    assert events == ["http.disconnect", "ClientDisconnected"]
