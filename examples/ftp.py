"""FTP-style transfers: a control stream, and a one-shot data socket per file.

    python examples/ftp.py              (CAPSOCK_BACKEND=trio to run it on trio)

The client opens a *control stream* to the server and asks for files by name.
For each transfer the server mints a temporary socket,
``node.mint(uses=1, peer=client_id, ttl=30)``, and sends its capability back
over the control stream, with the file's size and SHA-256.  The client opens
the data socket and reads the file to its end.

The data capability is good for one stream, from the client only, for 30
seconds.  Another node holding it is refused (and does not use it up); the
client itself cannot open it a second time.  Unlike FTP's PORT/PASV, nothing
here is guessable and nothing is reachable by a third party.

See docs/three-party.md.  Prints to stderr only.
"""

from __future__ import annotations

import hashlib
import os
import sys

import anyio

import capsock
from capsock.messages import receive_message, send_message

FILES = {
    "readme.txt": b"capsock: capabilities for byte streams\n",
    "random.bin": os.urandom(3 << 20),
}


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


async def control(node: capsock.Node, stream: capsock.Stream) -> None:
    """The server side of one control stream: a data socket per ``get``."""
    while True:
        try:
            request = await receive_message(stream)
        except anyio.EndOfStream:  # the client is done
            await stream.send_eof()
            return
        name = request.get("get") if isinstance(request, dict) else None
        if not isinstance(name, str) or name not in FILES:
            await send_message(stream, {"ok": False, "error": f"no such file: {name!r}"})
            continue
        data = FILES[name]
        # A temporary socket for this transfer: one stream, from this client only.
        async with await node.mint(uses=1, peer=stream.peer, ttl=30, label="ftp data") as sock:
            await send_message(
                stream, {"ok": True, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            )
            await capsock.send_capability(stream, sock.uri)
            with anyio.fail_after(30):
                transfer = await sock.accept()
            async with transfer:
                await transfer.send(data)
                await transfer.send_eof()


async def read_to_end(stream: capsock.Stream) -> bytes:
    out = bytearray()
    async for chunk in stream:  # ends at the peer's authenticated EOF
        out += chunk
    return bytes(out)


async def get(
    client: capsock.Node, ctl: capsock.Stream, name: str
) -> tuple[bytes, capsock.Capability]:
    """Fetch ``name`` over a fresh data socket; return its bytes and the data capability."""
    await send_message(ctl, {"get": name})
    answer = await receive_message(ctl)
    if not answer.get("ok"):
        raise FileNotFoundError(answer.get("error"))
    data_cap = await capsock.receive_capability(ctl)
    async with await client.connect(data_cap) as data:
        body = await read_to_end(data)
    assert len(body) == answer["size"]
    assert hashlib.sha256(body).hexdigest() == answer["sha256"], "hash mismatch"
    return body, data_cap


async def main() -> None:
    async with (
        capsock.Node(listen=["tcp:127.0.0.1:0"]) as server,
        capsock.Node() as client,
        capsock.Node() as mallory,
        anyio.create_task_group() as tg,
    ):
        ctl_listener = await server.listen()

        async def serve_control(stream: capsock.Stream) -> None:
            await control(server, stream)

        tg.start_soon(ctl_listener.serve, serve_control)

        ctl = await client.connect(ctl_listener.uri)
        say(f"client {client.id.short()} has a control stream to the server")

        body, _ = await get(client, ctl, "readme.txt")
        assert body == FILES["readme.txt"]
        say(f"got readme.txt ({len(body)} bytes, sha256 checked)")

        body, used = await get(client, ctl, "random.bin")
        assert body == FILES["random.bin"]
        say(f"got random.bin ({len(body)} bytes, sha256 checked)")

        # The data socket was good for one stream: opening it again is refused.
        try:
            await client.connect(used)
        except capsock.CapabilityRejected:
            say("reusing the data capability is refused")
        else:
            raise AssertionError("a used-up data capability was accepted")

        # A data capability is bound to the client: a thief cannot use it, even
        # before the client does (and the refusal does not use it up).
        await send_message(ctl, {"get": "readme.txt"})
        answer = await receive_message(ctl)
        stolen = await capsock.receive_capability(ctl)
        try:
            await mallory.connect(stolen)
        except capsock.CapabilityRejected:
            say("another node holding the data capability is refused")
        else:
            raise AssertionError("a data capability bound to the client was accepted")
        async with await client.connect(stolen) as data:
            body = await read_to_end(data)
        assert hashlib.sha256(body).hexdigest() == answer["sha256"]
        say("the client still got its file")

        # Unknown files are an error on the control stream, not a data socket.
        try:
            await get(client, ctl, "missing.txt")
        except FileNotFoundError as exc:
            say(f"error on the control stream: {exc}")
        else:
            raise AssertionError("a missing file was served")

        await ctl.send_eof()
        await ctl.aclose()
        await ctl_listener.aclose()
        tg.cancel_scope.cancel()


if __name__ == "__main__":
    anyio.run(main, backend=os.environ.get("CAPSOCK_BACKEND", "asyncio"))
