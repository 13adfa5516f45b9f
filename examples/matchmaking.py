"""Match-making: a lobby pairs two players, then steps out of the way.

    python examples/matchmaking.py      (CAPSOCK_BACKEND=trio to run it on trio)

Both players hold a stream to the lobby.  When two have joined, the lobby asks
the first one (A, the host) over A's own stream to mint a socket for the
second one (B): A calls ``mint(uses=1, peer=B's id)`` -- A decides, the lobby
only asks -- and sends the capability back.  The lobby hands it to B over B's
stream and closes its node.  B opens the capability and the two play directly:
the lobby never held a capability to A's game socket that it could use (it is
bound to B), and it is not on the path.

B's node id comes from the lobby's authenticated stream with B
(``stream.peer``), not from anything B claimed.  See docs/three-party.md.
Prints to stderr only.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import anyio
import anyio.abc

import capsock
from capsock.messages import receive_message, send_message


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


async def wait_for_end(stream: capsock.Stream) -> None:
    """Read until the other side ends the stream (or its node goes away)."""
    try:
        while True:
            await stream.receive()
    except (anyio.EndOfStream, anyio.BrokenResourceError):
        pass
    await stream.aclose()


async def lobby(
    gone: anyio.Event,
    *,
    task_status: anyio.abc.TaskStatus[capsock.Capability] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Pair the first two players who join, then close."""
    async with capsock.Node(listen=["tcp:127.0.0.1:0"]) as node:
        entrance = await node.listen()
        task_status.started(entrance.uri)
        players: list[tuple[capsock.Stream, str]] = []
        while len(players) < 2:
            stream = await entrance.accept()
            hello = await receive_message(stream)
            players.append((stream, str(hello["name"])))
            say(f"lobby: {hello['name']} joined")
        (host, host_name), (guest, guest_name) = players

        # Ask the host to mint a socket bound to the guest's (authenticated) id.
        await send_message(host, {"op": "host", "opponent": guest.peer.raw, "name": guest_name})
        game = await capsock.receive_capability(host)
        assert game.node == host.peer  # it names the host's node: the lobby can check that
        await send_message(guest, {"op": "play", "name": host_name})
        await capsock.send_capability(guest, game)
        say(f"lobby: paired {host_name} (host) with {guest_name}; leaving")
        for stream in (host, guest):
            await stream.send_eof()
            await stream.aclose()
    gone.set()
    say("lobby: closed")


async def player(
    name: str, entrance: capsock.Capability, lobby_gone: anyio.Event, log: dict[str, Any]
) -> None:
    # A player listens on TCP so that it can host; the lobby decides who does.
    async with capsock.Node(listen=["tcp:127.0.0.1:0"]) as node:
        to_lobby = await node.connect(entrance)
        await send_message(to_lobby, {"op": "join", "name": name})
        order = await receive_message(to_lobby)

        if order["op"] == "host":
            opponent = capsock.NodeId(order["opponent"])
            # One stream, from that opponent only, within a minute.
            async with await node.mint(uses=1, peer=opponent, ttl=60, label="game") as sock:
                await capsock.send_capability(to_lobby, sock.uri)
                await wait_for_end(to_lobby)
                with anyio.fail_after(10):
                    game = await sock.accept()
            async with game:
                assert game.peer == opponent
                move = await receive_message(game)
                assert lobby_gone.is_set()
                await send_message(game, f"{name} answers {move} with e5")
                log["host"] = (name, move)
        else:
            cap = await capsock.receive_capability(to_lobby)
            await wait_for_end(to_lobby)
            await lobby_gone.wait()  # this demo waits, to show the lobby is not needed
            async with await node.connect(cap) as game:
                route = game.extra(capsock.CapsockAttribute.route)
                assert route.startswith("tcp="), route  # straight to the host
                await send_message(game, "e4")
                reply = await receive_message(game)
                say(f"{name} -> {order['name']} over {route}: sent e4, got {reply!r}")
                log["guest"] = (name, reply)


async def main() -> None:
    gone = anyio.Event()
    log: dict[str, Any] = {}
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            entrance = await tg.start(lobby, gone)
            tg.start_soon(player, "alice", entrance, gone, log)
            tg.start_soon(player, "bob", entrance, gone, log)
    host, move = log["host"]
    guest, reply = log["guest"]
    assert {host, guest} == {"alice", "bob"}
    assert move == "e4"
    assert reply == f"{host} answers e4 with e5"
    say(f"{host} and {guest} played after the lobby had closed")


if __name__ == "__main__":
    anyio.run(main, backend=os.environ.get("CAPSOCK_BACKEND", "asyncio"))
