"""Introductions: I introduces R to E's service, then leaves; R and E keep talking.

    python examples/intro.py            (CAPSOCK_BACKEND=trio to run it on trio)

Three nodes in one process, on loopback:

- E (the endpoint) listens on TCP and offers a service; it hands the service's
  capability to I (the introducer) over a stream it already has with I.
- R (the recipient) can only dial out; it has a stream to I.
- I calls ``introduce(cap, to=R.id, ttl=...)``: E's capability, attenuated so
  that only R can use it and only for a while, plus a ``via=`` hint through I.
  I hands it to R over the R-I stream, and its node closes.
- R opens the capability: E has a direct TCP address, so R's ``connect()``
  takes the direct route and the R-E stream does not depend on I at all.  It
  keeps working after I is gone.

See docs/three-party.md for the diagram.  Prints to stderr only.
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


async def ask(stream: capsock.Stream, text: str) -> str:
    await send_message(stream, text)
    answer = await receive_message(stream)
    assert isinstance(answer, str)
    return answer


async def main() -> None:
    async with (
        capsock.Node(listen=["tcp:127.0.0.1:0"]) as endpoint,  # E: reachable directly
        capsock.Node() as recipient,  # R: dial-only
        anyio.create_task_group() as tg,
    ):
        service = await endpoint.listen()
        tg.start_soon(service.serve, shout)

        async with capsock.Node(listen=["tcp:127.0.0.1:0"]) as introducer:  # I
            inbox = await introducer.listen()  # I's "talk to me" capability

            # E hands its service capability to I over a stream it already has.
            e_to_i = await endpoint.connect(inbox.uri)
            await capsock.send_capability(e_to_i, service.uri)
            from_e = await inbox.accept()
            e_service = await capsock.receive_capability(from_e)
            say(f"I holds E's service capability ({e_service.node.short()})")

            # R has a stream to I too.  I introduces R to E over it.
            r_to_i = await recipient.connect(inbox.uri)
            i_to_r = await inbox.accept()
            introduced = await introducer.introduce(e_service, to=recipient.id, ttl=60)
            await capsock.send_capability(i_to_r, introduced)
            cap = await capsock.receive_capability(r_to_i)
            say(f"R received an introduction: {cap.redacted()}")

            stream = await recipient.connect(cap)
            assert stream.peer == endpoint.id  # the key in the URI: R reached E itself
            route = stream.extra(capsock.CapsockAttribute.route)
            assert route.startswith("tcp="), route  # direct hints are tried first
            assert await ask(stream, "hello while I is here") == "HELLO WHILE I IS HERE"
            say(f"R -> E over {route}")
            for s in (e_to_i, from_e, r_to_i, i_to_r):
                await s.aclose()
        say("I has left (its node is closed)")

        # The R-E stream never went through I: it keeps working.
        assert await ask(stream, "hello after I left") == "HELLO AFTER I LEFT"
        say("R -> E still works after I left")

        # The introduction was bound to R: the same URI is useless to anyone else.
        async with capsock.Node() as stranger:
            try:
                await stranger.connect(cap)
            except capsock.CapabilityRejected:
                say("a stranger holding the same URI is refused")
            else:
                raise AssertionError("an introduction bound to R was accepted from a stranger")

        await stream.send_eof()
        await stream.aclose()
        tg.cancel_scope.cancel()


if __name__ == "__main__":
    anyio.run(main, backend=os.environ.get("CAPSOCK_BACKEND", "asyncio"))
