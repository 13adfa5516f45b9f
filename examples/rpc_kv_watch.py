"""A key-value store over msgpack-RPC that hands out per-key watch streams as capabilities.

    python examples/rpc_kv_watch.py          # CAPSOCK_BACKEND=trio for trio

``watch(key)`` mints a temporary socket on the server's node -- bound to the
caller, one use, 30 seconds to open it -- and returns its capability.  The
client opens it with ``Node.connect`` and reads every change of that key as a
length-prefixed msgpack message (``capsock.messages``), for as long as it keeps
the stream open.  RPC carries the control, a plain capsock stream the data:
a watcher that falls behind is dropped instead of buffered without bound.

``subscribe(key, listener)`` shows the other way to pass authority: the client
passes a local ``Service`` object; the server gets a remote object bound to
itself and calls it on every change.  Both ends run in this one process.
"""

from __future__ import annotations

import os
from typing import Any

import anyio
import anyio.abc
from anyio.streams.memory import MemoryObjectSendStream

import capsock
from capsock.messages import receive_message, send_message
from capsock.rpc import msgpack as rpc

WATCH_QUEUE = 16
"""Changes a watcher may be behind before it is dropped."""


class KeyValue(rpc.Service):
    """get / set / delete, plus watches (capsock streams) and subscriptions (callbacks)."""

    def __init__(self, node: capsock.Node, tg: anyio.abc.TaskGroup) -> None:
        self.node = node
        self.tg = tg
        self.data: dict[str, Any] = {}
        self.version = 0
        self.watchers: dict[str, set[MemoryObjectSendStream[dict[str, Any]]]] = {}
        self.subscribers: dict[str, list[Any]] = {}

    @rpc.method
    def get(self, key: str) -> Any:
        return self.data.get(key)

    @rpc.method(name="set")
    async def set_(self, key: str, value: Any) -> int:
        self.data[key] = value
        return await self._changed(key, value)

    @rpc.method
    async def delete(self, key: str) -> int:
        self.data.pop(key, None)
        return await self._changed(key, None)

    @rpc.method
    async def watch(self, key: str) -> capsock.Capability:
        """A temporary socket that streams the changes of ``key``, starting with its value."""
        caller = rpc.current_connection().peer
        listener = await self.node.mint(ttl=30, uses=1, peer=caller, label="watch")
        self.tg.start_soon(self._feed, key, listener)
        return listener.uri

    @rpc.method
    def subscribe(self, key: str, subscriber: Any) -> None:
        """Call ``subscriber.changed(key, value, version)`` on every change of ``key``."""
        self.subscribers.setdefault(key, []).append(subscriber)

    async def _changed(self, key: str, value: Any) -> int:
        self.version += 1
        change = {"key": key, "value": value, "version": self.version}
        for queue in list(self.watchers.get(key, ())):
            try:
                queue.send_nowait(change)
            except anyio.WouldBlock:  # too slow: drop the watcher, not our memory
                queue.close()
        for subscriber in self.subscribers.get(key, []):
            await subscriber.notify("changed", key, value, self.version)
        return self.version

    async def _feed(self, key: str, listener: capsock.Listener) -> None:
        send, receive = anyio.create_memory_object_stream[dict[str, Any]](WATCH_QUEUE)
        async with listener, receive:
            try:
                stream = await listener.accept()  # ends when the socket expires unused
            except anyio.ClosedResourceError:
                return
            self.watchers.setdefault(key, set()).add(send)
            try:
                async with stream:
                    await send_message(stream, {"key": key, "value": self.data.get(key)})
                    async for change in receive:
                        await send_message(stream, change)
            except (anyio.BrokenResourceError, capsock.CapsockError):
                pass  # the watcher went away
            finally:
                self.watchers[key].discard(send)
                send.close()


class Printer(rpc.Service):
    """The client's subscriber: the server calls it back."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, Any, int]] = []
        self.got = anyio.Event()

    @rpc.method
    def changed(self, key: str, value: Any, version: int) -> None:
        print(f"  subscriber: {key} = {value!r} (version {version})")
        self.seen.append((key, value, version))
        self.got.set()


async def main() -> None:
    async with (
        capsock.Node(listen=["tcp:127.0.0.1:0"]) as server,
        capsock.Node() as client,
        anyio.create_task_group() as tg,
    ):
        listener = await server.listen()
        tg.start_soon(lambda: rpc.serve(listener, KeyValue(server, tg), node=server))
        uri = str(listener.uri)  # what a real client would get out of band

        async with rpc.connect(client, uri) as kv:
            await kv.call("set", "color", "red")
            watch = await kv.call("watch", "color")
            assert isinstance(watch, capsock.Capability)
            print(f"watch capability: {watch.redacted()}")
            stream = await client.connect(watch)
            print(f"  watch: {await receive_message(stream)}")  # the current value

            printer = Printer()
            await kv.call("subscribe", "color", printer)  # exported, bound to the server

            for value in ("green", "blue"):
                await kv.call("set", "color", value)
                print(f"  watch: {await receive_message(stream)}")
            await kv.call("delete", "color")
            print(f"  watch: {await receive_message(stream)}")
            with anyio.fail_after(5):
                while len(printer.seen) < 3:
                    await printer.got.wait()
                    printer.got = anyio.Event()
            assert [v for _, v, _ in printer.seen] == ["green", "blue", None]

            try:  # the watch socket was for one use, and only for this client
                await client.connect(watch)
            except capsock.CapabilityRejected:
                print("opening the watch a second time: refused, as it should be")
            else:
                raise AssertionError("a used-up watch capability was accepted")
            await stream.aclose()
            assert await kv.call("get", "color") is None
        tg.cancel_scope.cancel()
    print("done")


if __name__ == "__main__":
    anyio.run(main, backend=os.environ.get("CAPSOCK_BACKEND", "asyncio"))
