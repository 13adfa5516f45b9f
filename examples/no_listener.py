"""No listener reachable: R and E can only dial out, and still talk, through I.

    python examples/no_listener.py      (CAPSOCK_BACKEND=trio to run it on trio)

R and E are dial-only nodes (``capsock.Node()``: no listen address, as behind
NAT), so E's capabilities carry no route hint at all.  Both dial I, the one
node with a listen address.  E hands its service capability to I; I
introduces R to E (``introduce(cap, to=R.id, ttl=...)`` adds a ``via=`` hint:
I's forwarding capability, bound to R).  R's ``connect()`` finds no direct
hint, asks I to forward, and runs a Noise session with E *inside* the stream
I carries: end to end, I sees only ciphertext.  The stream's route says
``via <I>``.

Unlike examples/intro.py, this path needs I: when I leaves, the R-E stream
fails with ``ConnectionLost`` (never a clean end), as the script shows.
See docs/three-party.md.  Prints to stderr only.
"""

from __future__ import annotations

import os
import sys

import anyio

import capsock
from capsock.messages import receive_message, send_message


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


async def shout(stream: capsock.Stream) -> None:
    """E's service: answer every message with the same text in upper case."""
    while True:
        try:
            text = await receive_message(stream)
        except anyio.EndOfStream:
            await stream.send_eof()
            return
        await send_message(stream, str(text).upper())


async def main() -> None:
    async with (
        capsock.Node(listen=["tcp:127.0.0.1:0"]) as introducer,  # I: the only listener
        capsock.Node() as recipient,  # R: dial-only
        capsock.Node() as endpoint,  # E: dial-only
        anyio.create_task_group() as tg,
    ):
        service = await endpoint.listen()
        assert service.uri.hints == ()  # nothing to dial: E accepts no connections
        tg.start_soon(service.serve, shout)
        inbox = await introducer.listen()

        # E dials I and hands over its service capability; E keeps this stream
        # (and so its session with I) open: that session is E's way in.
        e_to_i = await endpoint.connect(inbox.uri)
        await capsock.send_capability(e_to_i, service.uri)
        from_e = await inbox.accept()
        e_service = await capsock.receive_capability(from_e)

        # R dials I too; I introduces R to E over that stream.
        r_to_i = await recipient.connect(inbox.uri)
        i_to_r = await inbox.accept()
        await capsock.send_capability(
            i_to_r, await introducer.introduce(e_service, to=recipient.id, ttl=60)
        )
        cap = await capsock.receive_capability(r_to_i)
        say(f"R received an introduction: {cap.redacted()}")

        # Without I's via= hint there is no way to reach E at all.
        try:
            await recipient.connect(cap.with_hints(()))
        except capsock.Unreachable as exc:
            say(f"without I: {exc}")
        else:
            raise AssertionError("E was reachable without a route")

        async with await recipient.connect(cap) as stream:
            assert stream.peer == endpoint.id  # E's key, checked end to end through I
            route = stream.extra(capsock.CapsockAttribute.route)
            assert route == f"via {introducer.id.short()}", route
            assert introducer.forwarder.active == 1  # I carries one nested session
            await send_message(stream, "hello through I")
            assert await receive_message(stream) == "HELLO THROUGH I"
            say(f"R -> E over {route}: I forwards ciphertext it cannot read")

            # This route needs I: when I leaves, the stream fails (never a clean end).
            for s in (e_to_i, from_e, r_to_i, i_to_r):
                await s.aclose()
            await introducer.aclose()
            try:
                with anyio.fail_after(10):
                    await stream.receive()
            except capsock.ConnectionLost:
                say("I left: the forwarded stream failed with ConnectionLost")
            else:
                raise AssertionError("a forwarded stream outlived its forwarder")
        tg.cancel_scope.cancel()


if __name__ == "__main__":
    anyio.run(main, backend=os.environ.get("CAPSOCK_BACKEND", "asyncio"))
