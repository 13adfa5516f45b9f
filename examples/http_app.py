"""A Starlette web app served on a capability, called with httpx.

    pip install 'capsock[http]' starlette
    python examples/http_app.py          # CAPSOCK_BACKEND=trio for trio

The app never sees an address: ``request.client`` is ``None``, and who is
calling is the authenticated node id in ``scope["extensions"]["capsock"]``.
The app keeps a per-caller counter keyed by that id.  The client maps the
host name ``notes.example`` to the capability, sends 20 requests at once (one
capsock session, pooled streams) and shows what a second node sees: its own
counter, not the first one's.  See docs/web.md.
"""

from __future__ import annotations

import os
from collections import Counter

import anyio
import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import capsock
from capsock import http

visits: Counter[str] = Counter()


async def hello(request: Request) -> JSONResponse:
    caller = request.scope["extensions"]["capsock"]["peer_id"]  # a NodeId, authenticated
    visits[str(caller)] += 1
    return JSONResponse(
        {"caller": caller.short(), "visits": visits[str(caller)], "client": request.client}
    )


app = Starlette(routes=[Route("/hello", hello)])


async def main() -> None:
    async with (
        capsock.Node(listen=["tcp:127.0.0.1:0"]) as server,
        capsock.Node() as alice,
        capsock.Node() as bob,
    ):
        listener = await server.listen()
        async with anyio.create_task_group() as tg:
            tg.start_soon(http.serve, listener, app)

            hosts = {"notes.example": listener.uri}
            async with httpx.AsyncClient(transport=http.Transport(alice, hosts)) as web:
                answers: list[int] = []

                async def one() -> None:
                    response = await web.get("http://notes.example/hello")
                    response.raise_for_status()
                    answers.append(response.json()["visits"])

                async with anyio.create_task_group() as requests:
                    for _ in range(20):
                        requests.start_soon(one)
                assert sorted(answers) == list(range(1, 21))
                print(f"alice: 20 concurrent requests answered, counter {max(answers)}")

            async with httpx.AsyncClient(transport=http.Transport(bob, hosts)) as web:
                body = (await web.get("http://notes.example/hello")).json()
                assert body == {"caller": bob.id.short(), "visits": 1, "client": None}
                print(f"bob: counter {body['visits']}, client address {body['client']}")
            tg.cancel_scope.cancel()


if __name__ == "__main__":
    anyio.run(main, backend=os.environ.get("CAPSOCK_BACKEND", "asyncio"))
