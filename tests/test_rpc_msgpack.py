"""msgpack-RPC over capsock: the specification's message shapes, malformed input,
calls both ways, cancellation, and capability passing between three nodes."""

from __future__ import annotations

import ast
import logging
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import capsock
from capsock.rpc import msgpack as rpc
from capsock.rpc.wire import (
    CAPABILITY_EXT,
    SERVICE_EXT,
    Decoder,
    Malformed,
    Notification,
    Request,
    Response,
    encode,
    parse_message,
)
from capsock.testing import stream_pair

pytestmark = pytest.mark.anyio


# ------------------------------------------------------------------ services used below


class Calc(rpc.Service):
    def __init__(self) -> None:
        self.notes: list[Any] = []
        self.noted = anyio.Event()

    @rpc.method
    async def add(self, a: int, b: int) -> int:
        return a + b

    @rpc.method(name="sub")
    def subtract(self, a: int, b: int) -> int:  # a synchronous method, another wire name
        return a - b

    @rpc.method
    async def echo(self, *values: Any) -> list[Any]:
        return list(values)

    @rpc.method
    async def slow(self, seconds: float, value: Any = None) -> Any:
        await anyio.sleep(seconds)
        return value

    @rpc.method
    def fail(self, text: str) -> None:
        raise ValueError(text)

    @rpc.method
    def repeat(self, data: bytes, times: int) -> bytes:
        return data * times

    @rpc.method
    def note(self, value: Any) -> None:
        self.notes.append(value)
        self.noted.set()

    @rpc.method
    async def call_back(self, method: str, *params: Any) -> Any:
        return await rpc.current_connection().call(method, *params)

    @rpc.method
    def peer(self) -> str:
        peer = rpc.current_connection().peer
        return str(peer)

    def not_exposed(self) -> str:
        return "secret"


class Greeter(rpc.Service):
    def __init__(self, name: str) -> None:
        self.name = name
        self.calls = 0

    @rpc.method
    def hello(self, who: str) -> str:
        self.calls += 1
        return f"{self.name} greets {who}"

    @rpc.method
    def fail(self) -> None:
        raise KeyError("missing")


class Inspector(rpc.Service):
    @rpc.method
    def kind(self, obj: Any) -> str:
        return type(obj).__name__


class Broker(rpc.Service):
    """Keeps objects handed to it and hands them out again."""

    def __init__(self) -> None:
        self.kept: dict[str, Any] = {}

    @rpc.method
    async def put(self, name: str, obj: Any) -> Any:
        self.kept[name] = obj
        return await obj.call("hello", "the broker")

    @rpc.method
    def get(self, name: str) -> Any:
        return self.kept[name]

    @rpc.method
    def make(self, name: str) -> Greeter:
        return Greeter(name)


# ------------------------------------------------------------------ helpers


@asynccontextmanager
async def served(
    service: rpc.Service | None, config: rpc.RpcConfig | None = None
) -> AsyncIterator[tuple[rpc.Connection, anyio.abc.ByteStream]]:
    """A Connection serving ``service`` on one end of a capsock stream; the raw other end."""
    async with (
        stream_pair() as (raw, served_end),
        rpc.Connection(served_end, service, config=config) as conn,
    ):
        yield conn, raw


class Raw:
    """The peer's side, by hand: msgpack values in and out of a byte stream."""

    def __init__(self, stream: anyio.abc.ByteStream) -> None:
        self.stream = stream
        self.unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)

    async def send(self, obj: Any) -> None:
        await self.stream.send(msgpack.packb(obj, use_bin_type=True))

    async def receive(self) -> Any:
        with anyio.fail_after(5):
            while True:
                for obj in self.unpacker:
                    return obj
                self.unpacker.feed(await self.stream.receive())

    async def nothing_within(self, seconds: float) -> bool:
        with anyio.move_on_after(seconds):
            await self.receive()
            return False
        return True


@asynccontextmanager
async def rpc_pair(
    service: rpc.Service | None = None,
    client_service: rpc.Service | None = None,
    config: rpc.RpcConfig | None = None,
) -> AsyncIterator[tuple[rpc.Connection, capsock.Node, capsock.Node]]:
    """A server node serving ``service`` and a client Connection to it."""
    async with (
        capsock.Node(listen=["tcp:127.0.0.1:0"]) as server,
        capsock.Node(listen=["tcp:127.0.0.1:0"]) as client,
        anyio.create_task_group() as tg,
    ):
        listener = await server.listen()
        tg.start_soon(lambda: rpc.serve(listener, service, node=server, config=config))
        async with rpc.connect(client, listener.uri, client_service, config=config) as conn:
            yield conn, server, client
        tg.cancel_scope.cancel()


# ------------------------------------------------------------------ sans-IO: the wire


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add("." * node.level + (node.module or ""))
    return names


def test_the_wire_module_is_sans_io() -> None:
    """wire.py and what it imports (the rpc errors, uri, errors) never touch I/O."""
    root = Path(rpc.__file__).parent
    wire = _imports(root / "wire.py")
    assert wire <= {"__future__", "collections.abc", "dataclasses", "enum", "typing",
                    "msgpack", "..errors", "..uri", "."}, wire  # fmt: skip
    assert _imports(root / "__init__.py") <= {"__future__", "typing", "..errors"}


MESSAGES = [
    ([0, 1, "add", [1, 2]], Request(1, "add", [1, 2])),
    ([0, 2**32 - 1, "m", []], Request(2**32 - 1, "m", [])),
    ([1, 1, None, 3], Response(1, None, 3)),
    ([1, 7, ["ValueError", "x"], None], Response(7, ["ValueError", "x"], None)),
    ([2, "note", [b"\x00bin"]], Notification("note", [b"\x00bin"])),
]


def test_decoder_yields_each_shape_whole_byte_by_byte_and_split() -> None:
    data = b"".join(msgpack.packb(m, use_bin_type=True) for m, _ in MESSAGES)
    expected = [e for _, e in MESSAGES]
    assert Decoder().feed(data) == expected
    decoder = Decoder()
    got = []
    for i in range(len(data)):
        got += decoder.feed(data[i : i + 1])
    assert got == expected
    decoder = Decoder()
    assert decoder.feed(data + data[:5]) == expected  # trailing partial message: kept
    assert decoder.feed(data[5:]) == expected


def test_encode_is_the_spec_shape() -> None:
    assert msgpack.unpackb(encode([0, 3, "add", [1, 2]])) == [0, 3, "add", [1, 2]]
    assert encode([2, "n", []]) == b"\x93\x02\xa1n\x90"


@pytest.mark.parametrize(
    ("obj", "msgid", "kind"),
    [
        ({"a": 1}, None, None),
        ([], None, None),
        ("text", None, None),
        ([0, 1, "add"], 1, 0),  # arity
        ([0, 1, "add", [], "extra"], 1, 0),
        ([0], None, 0),
        ([0, "1", "add", []], None, 0),  # wrong types
        ([0, -1, "add", []], None, 0),
        ([0, 2**32, "add", []], None, 0),
        ([0, True, "add", []], None, 0),
        ([0, 7, 5, []], 7, 0),
        ([0, 7, "add", {"a": 1}], 7, 0),
        ([0, 7, b"add", []], 7, 0),
        ([1, 7, None], 7, 1),
        ([1, "x", None, None], None, 1),
        ([2, "m"], None, 2),
        ([2, 5, []], None, 2),
        ([2, "m", "not params"], None, 2),
        ([3, 1, "m", []], None, None),  # unknown type
        ([True, 1, "m", []], None, None),
        ([0.0, 1, "m", []], None, None),
    ],
    ids=repr,
)
def test_malformed_shapes_are_typed(obj: Any, msgid: int | None, kind: int | None) -> None:
    event = parse_message(obj)
    assert isinstance(event, Malformed)
    assert isinstance(event.error, rpc.MalformedMessage)
    assert isinstance(event.error, rpc.RpcProtocolError)
    assert isinstance(event.error, capsock.ProtocolError)
    assert isinstance(event.error, capsock.CapsockError)
    assert (event.error.msgid, event.error.kind) == (msgid, kind)
    # Fed as bytes, the stream stays in sync: the next message still decodes.
    decoder = Decoder()
    events = decoder.feed(msgpack.packb(obj) + msgpack.packb([2, "ok", []]))
    assert isinstance(events[0], Malformed)
    assert events[1] == Notification("ok", [])


@pytest.mark.parametrize(
    "junk",
    [b"\xc1", b"\xa3\xff\xfe\xfd", b"\xd4\x00"[:1] + b"\xc1" * 3],
    ids=["reserved byte", "invalid utf-8", "junk"],
)
def test_undecodable_bytes_are_fatal(junk: bytes) -> None:
    with pytest.raises(rpc.RpcProtocolError, match="not msgpack"):
        Decoder().feed(junk)


def test_message_size_is_bounded() -> None:
    limit = 4096
    # A declared length over the limit: refused once the buffered part passes it.
    decoder = Decoder(max_message_size=limit)
    with pytest.raises(rpc.RpcProtocolError, match="larger than the limit"):
        decoder.feed(b"\xc6" + (1 << 30).to_bytes(4, "big"))
        for _ in range(100):
            decoder.feed(b"\x00" * 1000)
    # A message that only grows (an endless array of small ints) is refused too.
    decoder = Decoder(max_message_size=limit, max_items=1 << 20)
    with pytest.raises(rpc.RpcProtocolError, match="larger than the limit"):
        decoder.feed(b"\xdd" + (1 << 20).to_bytes(4, "big"))
        for _ in range(100):
            decoder.feed(b"\x01" * 1000)
    # Too many items in one array.
    with pytest.raises(rpc.RpcProtocolError):
        Decoder(max_items=10).feed(msgpack.packb([2, "m", list(range(11))]))
    # Map keys other than str or bytes (int keys allow hash-collision floods).
    with pytest.raises(rpc.RpcProtocolError):
        Decoder().feed(msgpack.packb([2, "m", [{1: 2}]]))
    with pytest.raises(rpc.RpcProtocolError):
        Decoder().feed(b"\x81\x90\x00")  # an array as a key
    # Below the limit all is well.
    ok = msgpack.packb([2, "m", [b"x" * (limit - 100)]], use_bin_type=True)
    assert len(Decoder(max_message_size=limit).feed(ok)) == 1


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512), st.integers(min_value=1, max_value=64))
def test_random_bytes_give_events_or_a_protocol_error(data: bytes, step: int) -> None:
    """The only exception out of the decoder is RpcProtocolError, however bytes arrive."""
    decoder = Decoder(max_message_size=256, max_items=16)
    try:
        for i in range(0, len(data), step):
            for event in decoder.feed(data[i : i + step]):
                assert isinstance(event, Request | Response | Notification | Malformed)
    except rpc.RpcProtocolError:
        pass


_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text()
    | st.binary(),
    lambda inner: st.lists(inner, max_size=5)
    | st.dictionaries(st.text() | st.binary(), inner, max_size=5),
    max_leaves=20,
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(st.lists(_values, max_size=6) | _values)
def test_any_msgpack_value_parses_to_an_event(obj: Any) -> None:
    """Well-framed values never break the stream: each is exactly one event."""
    data = msgpack.packb(obj, use_bin_type=True)
    events = Decoder().feed(data + msgpack.packb([2, "next", []]))
    assert len(events) == 2 and events[1] == Notification("next", [])
    assert isinstance(events[0], Request | Response | Notification | Malformed)


def test_capabilities_travel_as_extension_types() -> None:
    cap = capsock.Capability.parse(_uri())
    data = encode([0, 1, "m", [cap, {"nested": [cap]}]])
    assert msgpack.ExtType(CAPABILITY_EXT, str(cap).encode()) in msgpack.unpackb(data)[3]
    (event,) = Decoder().feed(data)
    assert isinstance(event, Request)
    assert event.params == [cap, {"nested": [cap]}]
    # A service capability goes to the hook (the connection makes a remote object).
    body = str(cap).encode()
    seen: list[capsock.Capability] = []
    decoder = Decoder(service_hook=lambda c: seen.append(c) or "proxy")
    packed = msgpack.packb([0, 2, "m", [msgpack.ExtType(SERVICE_EXT, body)]])
    assert decoder.feed(packed) == [Request(2, "m", ["proxy"])]
    assert seen == [cap]
    # Other extension types pass through untouched.
    other = msgpack.packb([2, "m", [msgpack.ExtType(5, b"app")]])
    assert Decoder().feed(other) == [Notification("m", [msgpack.ExtType(5, b"app")])]


def test_a_bad_capability_extension_is_malformed_with_its_msgid() -> None:
    bad = msgpack.packb([0, 9, "m", [msgpack.ExtType(CAPABILITY_EXT, b"capsock://nope")]])
    (event,) = Decoder().feed(bad + b"")
    assert isinstance(event, Malformed)
    assert (event.error.msgid, event.error.kind) == (9, 0)
    assert "does not hold a capability" in str(event.error)
    # ...and the message after it is fine.
    good = msgpack.packb([2, "m", []])
    decoder = Decoder()
    assert [type(e) for e in decoder.feed(bad + good)] == [Malformed, Notification]


def _uri() -> str:
    from capsock.keys import KeyPair
    from capsock.uri import TcpHint, mint_root

    token = mint_root(bytes(32), bytes(16))
    return str(capsock.Capability(KeyPair(bytes(32)).node_id, token, (TcpHint("127.0.0.1", 9),)))


# ------------------------------------------------------------------ conformance on a stream


async def test_requests_and_notifications_as_the_spec_shapes_them() -> None:
    calc = Calc()
    async with served(calc) as (conn, stream):
        peer = Raw(stream)
        await peer.send([0, 5, "add", [1, 2]])
        assert await peer.receive() == [1, 5, None, 3]
        await peer.send([0, 6, "sub", [5, 2]])
        assert await peer.receive() == [1, 6, None, 3]
        await peer.send([2, "note", ["hi"]])
        with anyio.fail_after(5):
            await calc.noted.wait()
        assert calc.notes == ["hi"]
        assert await peer.nothing_within(0.1)  # a notification has no answer
        await peer.send([0, 7, "echo", [b"\x00\xff", "t", None, True, 1.5, [1], {"k": 1}]])
        assert await peer.receive() == [
            1,
            7,
            None,
            [b"\x00\xff", "t", None, True, 1.5, [1], {"k": 1}],
        ]
        assert conn.stats()["requests"] == 3
        assert conn.stats()["notifications"] == 1


async def test_answers_are_matched_by_msgid_not_order() -> None:
    async with served(Calc()) as (_, stream):
        peer = Raw(stream)
        await peer.send([0, 1, "slow", [0.3, "late"]])
        await peer.send([0, 2, "slow", [0.0, "early"]])
        assert await peer.receive() == [1, 2, None, "early"]
        assert await peer.receive() == [1, 1, None, "late"]


async def test_remote_errors_carry_type_and_message_only() -> None:
    async with served(Calc()) as (_, stream):
        peer = Raw(stream)
        await peer.send([0, 1, "fail", ["nope"]])
        assert await peer.receive() == [1, 1, ["ValueError", "nope"], None]
        await peer.send([0, 2, "missing", []])
        assert await peer.receive() == [1, 2, ["NoSuchMethod", "no method named 'missing'"], None]
        await peer.send([0, 3, "not_exposed", []])
        assert (await peer.receive())[2][0] == "NoSuchMethod"
        await peer.send([0, 4, "__init__", []])
        assert (await peer.receive())[2][0] == "NoSuchMethod"
        await peer.send([0, 5, "add", [1]])
        assert await peer.receive() == [
            1,
            5,
            ["InvalidParams", "add takes 2 parameters, got 1"],
            None,
        ]
        await peer.send([0, 6, "add", [1, "x"]])  # wrong types: the method's own TypeError
        msgid, error = (await peer.receive())[1:3]
        assert msgid == 6 and error[0] == "TypeError"


async def test_malformed_requests_are_answered_and_the_connection_goes_on() -> None:
    async with served(Calc()) as (conn, stream):
        peer = Raw(stream)
        for bad in ([0, 9, "add"], [0, 10, 5, []], [0, 11, "add", "1, 2"]):
            await peer.send(bad)
            answer = await peer.receive()
            assert answer[:2] == [1, bad[1]] and answer[3] is None
            assert answer[2][0] == "InvalidRequest"
        for unanswerable in ([0, "x", "add", []], {"not": "a message"}, [7, 1, 2, 3], [2, "m"]):
            await peer.send(unanswerable)
        assert await peer.nothing_within(0.1)
        await peer.send([0, 12, "add", [2, 2]])
        assert await peer.receive() == [1, 12, None, 4]
        assert conn.stats()["malformed"] == 7
        assert all(isinstance(e, rpc.MalformedMessage) for e in conn.protocol_errors)
        assert not conn.closed


async def test_unknown_and_malformed_responses() -> None:
    async with served(None) as (conn, stream):
        peer = Raw(stream)
        async with anyio.create_task_group() as tg:
            results: list[Any] = []

            async def call() -> None:
                results.append(await conn.call("add", 1, 2))

            tg.start_soon(call)
            request = await peer.receive()
            assert request[0] == 0 and request[2:] == ["add", [1, 2]]
            await peer.send([1, request[1] + 1000, None, "unknown msgid"])  # logged, dropped
            await peer.send([1, request[1], None, 3])
        assert results == [3]
        assert conn.stats()["unknown_responses"] == 1
        # A malformed response for a pending call fails that call, typed.
        async with anyio.create_task_group() as tg:
            errors: list[rpc.MalformedMessage] = []

            async def failing_call() -> None:
                try:
                    await conn.call("x")
                except rpc.MalformedMessage as exc:
                    errors.append(exc)

            tg.start_soon(failing_call)
            request = await peer.receive()
            await peer.send([1, request[1], None])
        assert errors and errors[0].msgid == request[1]
        # A plain-string error from a non-capsock peer is a RemoteError too.
        async with anyio.create_task_group() as tg:

            async def string_error() -> None:
                with pytest.raises(rpc.RemoteError) as info:
                    await conn.call("y")
                assert (info.value.type_name, info.value.remote_message) == ("Error", "bad")

            tg.start_soon(string_error)
            request = await peer.receive()
            await peer.send([1, request[1], "bad", None])
        assert not conn.closed


async def test_a_peer_cannot_flood_the_log(caplog: pytest.LogCaptureFixture) -> None:
    """Unknown answers and malformed messages cost the peer a few bytes each:
    the first of each kind is a warning, the rest are counted at debug level."""
    caplog.set_level(logging.DEBUG, logger="capsock")
    async with served(None) as (conn, stream):
        peer = Raw(stream)
        for msgid in range(200):
            await peer.send([1, 10_000 + msgid, None, "nobody asked"])
            await peer.send([0, msgid, 42, []])  # method must be a string: malformed
        for _ in range(200):
            await peer.receive()  # the InvalidRequest answers
        assert conn.stats()["unknown_responses"] == 200
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 2, [r.getMessage() for r in warnings]


async def test_undecodable_bytes_close_the_connection(caplog: pytest.LogCaptureFixture) -> None:
    async with served(None) as (conn, stream):
        peer = Raw(stream)
        async with anyio.create_task_group() as tg:

            async def call() -> None:
                with pytest.raises(rpc.ConnectionClosed) as info:
                    await conn.call("x")
                assert isinstance(info.value.__cause__, rpc.RpcProtocolError)

            tg.start_soon(call)
            await peer.receive()
            await stream.send(b"\xc1")
        with anyio.fail_after(5):
            await conn.wait_closed()
        assert conn.closed
        with pytest.raises(rpc.ConnectionClosed):
            await conn.call("x")
    assert "not msgpack" in caplog.text


async def test_an_oversized_message_closes_the_connection() -> None:
    config = rpc.RpcConfig(max_message_size=4096)
    async with served(Calc(), config) as (conn, stream):
        await Raw(stream).send([0, 1, "echo", ["x" * 10000]])
        with anyio.fail_after(5):
            await conn.wait_closed()
        assert isinstance(conn.protocol_errors[-1], rpc.RpcProtocolError)
        with pytest.raises(rpc.ConnectionClosed):
            await conn.call("x")


# ------------------------------------------------------------------ calls both ways


async def test_calls_in_both_directions_and_callbacks() -> None:
    async with rpc_pair(Calc(), Greeter("client")) as (conn, _, client):
        assert await conn.call("add", 2, 3) == 5
        assert await conn.call("sub", 2, 3) == -1
        # The server calls the client back while handling the client's call.
        assert await conn.call("call_back", "hello", "server") == "client greets server"
        assert await conn.call("peer") == str(client.id)
        with pytest.raises(rpc.RemoteError) as info:
            await conn.call("call_back", "fail")
        assert info.value.type_name == "KeyError"  # passed through the server unchanged


async def test_many_calls_in_flight() -> None:
    async with rpc_pair(Calc()) as (conn, _, _):
        results: dict[int, Any] = {}

        async def one(i: int) -> None:
            results[i] = await conn.call("slow", random.random() / 20, i)

        async with anyio.create_task_group() as tg:
            for i in range(500):
                tg.start_soon(one, i)
        assert results == {i: i for i in range(500)}
        assert conn.stats()["pending"] == 0


async def test_cancelling_a_call_abandons_it_and_drops_the_late_answer() -> None:
    async with rpc_pair(Calc()) as (conn, _, _):
        with anyio.move_on_after(0.1) as scope:
            await conn.call("slow", 0.3, "too late")
        assert scope.cancelled_caught
        assert conn.stats()["pending"] == 0
        await anyio.sleep(0.4)
        assert conn.stats()["late_responses"] == 1
        assert conn.stats()["unknown_responses"] == 0
        with pytest.raises(TimeoutError):
            await conn.call("slow", 0.3, timeout=0.05)
        assert await conn.call("add", 1, 1) == 2


async def test_default_call_timeout() -> None:
    async with rpc_pair(Calc(), config=rpc.RpcConfig(call_timeout=0.05)) as (conn, _, _):
        with pytest.raises(TimeoutError):
            await conn.call("slow", 1)
        assert await conn.call("slow", 0, "quick") == "quick"


async def test_too_many_concurrent_requests_are_answered_busy() -> None:
    config = rpc.RpcConfig(max_concurrent_requests=2, busy_timeout=0.1)
    async with served(Calc(), config) as (conn, stream):
        peer = Raw(stream)
        for msgid in (1, 2, 3):
            await peer.send([0, msgid, "slow", [0.5]])
        first = await peer.receive()
        assert first[:2] == [1, 3] and first[2][0] == "Busy"
        assert {(await peer.receive())[1], (await peer.receive())[1]} == {1, 2}
        assert conn.stats()["busy"] == 1


async def test_a_closed_peer_fails_pending_calls() -> None:
    async with served(None) as (conn, stream):
        peer = Raw(stream)
        async with anyio.create_task_group() as tg:

            async def call() -> None:
                with pytest.raises(rpc.ConnectionClosed, match="peer closed"):
                    await conn.call("x")

            tg.start_soon(call)
            await peer.receive()
            await stream.send_eof()
        with anyio.fail_after(5):
            await conn.wait_closed()


async def test_local_limits_on_what_is_sent() -> None:
    config = rpc.RpcConfig(max_message_size=1024)
    async with rpc_pair(Calc(), config=config) as (conn, _, _):
        with pytest.raises(capsock.LocalUsageError, match="max_message_size"):
            await conn.call("echo", b"x" * 2000)
        with pytest.raises(TypeError):
            await conn.call("echo", object())
        with pytest.raises(rpc.RemoteError) as info:  # the answer would be too large
            await conn.call("repeat", b"x", 2000)
        assert info.value.type_name == "InvalidResult"
        assert await conn.call("add", 1, 1) == 2


async def test_over_plain_tcp_too() -> None:
    """The protocol layer needs only a byte stream (capability passing needs capsock)."""
    async with await anyio.create_tcp_listener(local_host="127.0.0.1") as listener:
        port = listener.extra(anyio.abc.SocketAttribute.local_port)
        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, lambda s: rpc.serve_stream(s, Calc()))
            stream = await anyio.connect_tcp("127.0.0.1", port)
            async with rpc.Connection(stream) as conn:
                assert conn.peer is None
                assert await conn.call("add", 40, 2) == 42
                with pytest.raises(capsock.LocalUsageError, match="capsock stream"):
                    await conn.call("echo", Greeter("x"))
            tg.cancel_scope.cancel()


# ------------------------------------------------------------------ capability passing


async def test_plain_capabilities_round_trip() -> None:
    async with rpc_pair(Calc()) as (conn, server, _):
        listener = await server.mint(ttl=60, uses=1)
        cap = listener.uri
        [back] = await conn.call("echo", cap)
        assert isinstance(back, capsock.Capability)
        assert back == cap and str(back) == str(cap)
        await listener.aclose()


async def test_a_passed_object_is_bound_to_the_receiver_and_passed_on_by_proxy(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Acceptance: A passes a local object to B, B calls it, B passes it on to C,
    C's calls reach A; after the A-B connection closes, B's capability is rejected."""
    caplog.set_level(logging.DEBUG, logger="capsock")
    broker = Broker()
    greeter = Greeter("A")
    async with (
        capsock.Node(listen=["tcp:127.0.0.1:0"]) as a,
        capsock.Node(listen=["tcp:127.0.0.1:0"]) as b,
        capsock.Node(listen=["tcp:127.0.0.1:0"]) as c,
        anyio.create_task_group() as tg,
    ):
        listener = await b.listen()
        tg.start_soon(lambda: rpc.serve(listener, broker, node=b))
        async with rpc.connect(c, listener.uri) as c_to_b:
            async with rpc.connect(a, listener.uri) as a_to_b:
                # A -> B: B calls A's object while handling put().
                assert await a_to_b.call("put", "g", greeter) == "A greets the broker"
                kept = broker.kept["g"]
                assert isinstance(kept, rpc.RemoteObject)
                assert kept.capability.node == a.id
                assert a_to_b.stats()["exports"] == 1
                # The capability A minted is bound to B: C cannot use it directly.
                with pytest.raises(capsock.CapabilityRejected):
                    await c.connect(kept.capability)
                # B -> C: C gets B's proxy, bound to C; its calls reach A.
                proxy = await c_to_b.call("get", "g")
                assert isinstance(proxy, rpc.RemoteObject)
                assert proxy.capability.node == b.id
                assert await proxy.call("hello", "C") == "A greets C"
                assert greeter.calls == 2
                with pytest.raises(rpc.RemoteError) as info:  # errors pass through unchanged
                    await proxy.call("fail")
                assert (info.value.type_name, info.value.remote_message) == (
                    "KeyError",
                    "'missing'",
                )
                # A passed back to A is A's own object again, not a proxy.
                assert await a_to_b.call("get", "g") is greeter
                # ...but only when it comes back from B, the node it was bound to:
                # C naming A's capability to A (by hand: the API cannot) does not
                # reach A's object: it names neither C nor an export of A to C,
                # so A refuses it (tests/test_rpc_security.py).
                a_listener = await a.listen()
                tg.start_soon(lambda: rpc.serve(a_listener, Inspector(), node=a))
                raw = Raw(await c.connect(a_listener.uri))
                ext = msgpack.ExtType(SERVICE_EXT, str(kept.capability).encode())
                await raw.send([0, 1, "kind", [ext]])
                answer = await raw.receive()
                assert answer[:2] == [1, 1] and answer[2][0] == "InvalidRequest"
                await raw.stream.aclose()
                assert str(kept.capability.token.encode().hex()) not in repr(kept)
            # The A-B connection is closed: A revoked what it exported to B.
            with anyio.fail_after(5):
                while True:
                    try:
                        stream = await b.connect(kept.capability)
                    except capsock.CapabilityRejected:
                        break
                    await stream.aclose()
                    await anyio.sleep(0.01)
            with pytest.raises(rpc.RemoteError) as info:
                await proxy.call("hello", "C")
            assert info.value.type_name == "ConnectionClosed"
            assert greeter.calls == 2
        tg.cancel_scope.cancel()
    secrets = [kept.capability, proxy.capability, listener.uri]
    for cap in secrets:
        token = str(cap).split("/")[3].split("?")[0]
        assert token not in caplog.text


async def test_services_returned_as_results_are_exported_too() -> None:
    async with rpc_pair(Broker()) as (conn, _, _):
        made = await conn.call("make", "fresh")
        assert isinstance(made, rpc.RemoteObject)
        assert await made.call("hello", "you") == "fresh greets you"
        assert await made.call("hello", "again") == "fresh greets again"  # one stream, reused
        await made.aclose()
        with pytest.raises(rpc.ConnectionClosed):
            await made.call("hello", "closed")


async def test_the_same_object_is_exported_once_per_connection() -> None:
    greeter = Greeter("A")
    async with rpc_pair(Calc()) as (conn, _, _):
        # Sent twice in one call and again later: one export.  The server's echo
        # sends it back to its origin, which gets its own object again.
        assert await conn.call("echo", greeter, greeter) == [greeter, greeter]
        assert await conn.call("echo", greeter) == [greeter]
        assert conn.stats()["exports"] == 1


async def test_reprs_hold_no_secrets() -> None:
    async with rpc_pair(Broker()) as (conn, _, _):
        made = await conn.call("make", "x")
        token = str(made.capability).split("/")[3].split("?")[0]
        for obj in (made, conn):
            assert token not in repr(obj)
        assert "redacted" in repr(made)
