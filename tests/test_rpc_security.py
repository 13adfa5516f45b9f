"""What an RPC peer can make the other side do, and what it learns from errors.

* msgpack-RPC: a service capability that does not name the node that sent it is
  refused before anything is dialled, with one error whatever it holds; a
  genuine one is reached over the existing session only, never at the route
  hints the peer wrote into it.
* Cap'n Proto: the callee sends the type and message of a failed method,
  never its traceback, file paths or stack addresses.
"""

from __future__ import annotations

import logging
import re
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import msgpack
import pytest

import capsock
from capsock.keys import KeyPair
from capsock.rpc import msgpack as rpc
from capsock.rpc.wire import SERVICE_EXT
from capsock.uri import Capability, TcpHint

pytestmark = pytest.mark.anyio


# ------------------------------------------------------------------ helpers


class Raw:
    """One side of a msgpack-RPC stream, by hand."""

    def __init__(self, stream: anyio.abc.ByteStream) -> None:
        self.stream = stream
        self.unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)

    async def send(self, obj: Any) -> None:
        await self.stream.send(msgpack.packb(obj, use_bin_type=True))

    async def receive(self) -> Any:
        with anyio.fail_after(10):
            while True:
                for obj in self.unpacker:
                    return obj
                self.unpacker.feed(await self.stream.receive())


class Counter:
    """A TCP listener on loopback that counts the connections it accepts."""

    def __init__(self) -> None:
        self.accepted = 0
        self.port = 0

    async def handle(self, stream: anyio.abc.SocketStream) -> None:
        self.accepted += 1
        await stream.aclose()


@asynccontextmanager
async def counting_listener() -> AsyncIterator[Counter]:
    counter = Counter()
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    counter.port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, counter.handle)
        yield counter
        tg.cancel_scope.cancel()


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def forged(node: capsock.NodeId, token_of: Capability, port: int) -> msgpack.ExtType:
    """A service capability naming ``node``, with a real token and a tcp hint at ``port``."""
    cap = Capability(node, token_of.token, (TcpHint("127.0.0.1", port),))
    return msgpack.ExtType(SERVICE_EXT, str(cap).encode())


class Greeter(rpc.Service):
    def __init__(self) -> None:
        self.calls = 0

    @rpc.method
    def hello(self) -> str:
        self.calls += 1
        return "hello"


class Caller(rpc.Service):
    """Calls back whatever object it is given: what a forged capability would exploit."""

    def __init__(self) -> None:
        self.rang = 0

    @rpc.method
    async def ring(self, obj: Any) -> Any:
        self.rang += 1
        return await obj.call("hello")


# ------------------------------------------------------------------ msgpack-RPC


async def test_forged_service_capability_in_a_request_is_refused_before_any_dial() -> None:
    """A peer names a third node (or us) with hints at an open and at a closed
    port: the same InvalidRequest for all, the method never runs, nothing is dialled."""
    caller = Caller()
    third = KeyPair.generate().node_id
    async with (
        counting_listener() as counter,
        capsock.Node(listen=["tcp:127.0.0.1:0"]) as server,
        capsock.Node() as client,
        anyio.create_task_group() as tg,
    ):
        listener = await server.listen()
        tg.start_soon(lambda: rpc.serve(listener, caller, node=server))
        raw = Raw(await client.connect(listener.uri))
        answers = []
        for node in (third, server.id):
            for port in (counter.port, closed_port()):
                await raw.send([0, 7, "ring", [forged(node, listener.uri, port)]])
                answers.append(await raw.receive())
        first = answers[0]
        assert first[:2] == [1, 7] and first[3] is None
        assert first[2][0] == "InvalidRequest"
        assert "must name the node that sent it" in first[2][1]
        assert all(answer == first for answer in answers), answers
        assert str(counter.port) not in first[2][1]
        assert counter.accepted == 0
        assert caller.rang == 0
        await raw.stream.aclose()
        tg.cancel_scope.cancel()


async def test_genuine_export_is_reached_over_the_session_not_its_hints() -> None:
    """A capability that names the sender, with hints the sender rewrote: the
    callee's call goes over the session the two nodes share; no dial at all."""
    caller = Caller()
    greeter = Greeter()
    async with (
        counting_listener() as counter,
        capsock.Node(listen=["tcp:127.0.0.1:0"]) as server,
        capsock.Node() as client,
        anyio.create_task_group() as tg,
    ):
        listener = await server.listen()
        tg.start_soon(lambda: rpc.serve(listener, caller, node=server))
        export = await client.mint(peer=server.id, label="rpc")
        tg.start_soon(lambda: rpc.serve(export, greeter, node=client))
        raw = Raw(await client.connect(listener.uri))
        cap = export.uri.with_hints((TcpHint("127.0.0.1", counter.port),))
        await raw.send([0, 1, "ring", [msgpack.ExtType(SERVICE_EXT, str(cap).encode())]])
        assert await raw.receive() == [1, 1, None, "hello"]
        assert greeter.calls == 1
        assert counter.accepted == 0
        await raw.stream.aclose()
        tg.cancel_scope.cancel()


async def test_after_the_peers_goaway_its_hints_are_still_not_dialled() -> None:
    """The attack the hints rule stops: the peer sends GOAWAY (the callee's
    session to it is no longer usable for new streams, but the RPC stream
    goes on), then passes its genuine export with a hint at our listener.
    Calling it fails with Unreachable; it does not dial that address."""
    from capsock.errors import ErrorCode

    caller = Caller()
    async with (
        counting_listener() as counter,
        capsock.Node(listen=["tcp:127.0.0.1:0"]) as server,
        capsock.Node() as client,
        anyio.create_task_group() as tg,
    ):
        listener = await server.listen()
        tg.start_soon(lambda: rpc.serve(listener, caller, node=server))
        export = await client.mint(peer=server.id, label="rpc")
        tg.start_soon(lambda: rpc.serve(export, Greeter(), node=client))
        raw = Raw(await client.connect(listener.uri))
        session = client._sessions[server.id]
        session._mux.goaway(ErrorCode.NO_ERROR)  # by hand: what a hostile peer may send
        session._kick()
        cap = export.uri.with_hints((TcpHint("127.0.0.1", counter.port),))
        await raw.send([0, 1, "ring", [msgpack.ExtType(SERVICE_EXT, str(cap).encode())]])
        answer = await raw.receive()
        assert answer[:2] == [1, 1] and answer[3] is None
        assert answer[2][0] == "Unreachable", answer
        assert caller.rang == 1
        assert counter.accepted == 0
        tg.cancel_scope.cancel()


async def test_forged_service_capability_in_a_result_fails_that_call() -> None:
    """The same rule for answers: the caller's call raises MalformedMessage,
    one text whatever port the forged capability names; nothing is dialled."""
    third = KeyPair.generate().node_id
    async with (
        counting_listener() as counter,
        capsock.Node(listen=["tcp:127.0.0.1:0"]) as server,
        capsock.Node() as client,
        anyio.create_task_group() as tg,
    ):
        listener = await server.listen()
        ports = [counter.port, closed_port()]

        async def answer_forged(stream: capsock.Stream) -> None:
            raw = Raw(stream)
            for port in ports:
                request = await raw.receive()
                await raw.send([1, request[1], None, forged(third, listener.uri, port)])
            await raw.receive()  # until the client goes

        tg.start_soon(listener.serve, answer_forged)
        texts = []
        async with rpc.Connection(await client.connect(listener.uri), node=client) as conn:
            for _ in ports:
                with pytest.raises(rpc.MalformedMessage) as info:
                    await conn.call("give")
                texts.append(str(info.value))
        assert texts[0] == texts[1]
        assert "must name the node that sent it" in texts[0]
        assert counter.accepted == 0
        tg.cancel_scope.cancel()


# ------------------------------------------------------------------ Cap'n Proto: errors

try:
    import capnp
except ImportError:  # the 'capnp' extra
    capnp = None

needs_capnp = pytest.mark.skipif(capnp is None, reason="pycapnp is not installed")
SCHEMAS = Path(__file__).resolve().parents[1] / "schemas"
HEX_RUN = re.compile(r"\b(?:0x)?[0-9a-f]{8,}\b")


@pytest.fixture(params=["direct", "socketpair"])
async def kj(
    anyio_backend: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[None]:
    """pycapnp's KJ loop, with each of capsock's two bridges (see tests/test_rpc_capnp.py)."""
    if capnp is None:
        pytest.skip("pycapnp is not installed")
    if anyio_backend != "asyncio":
        pytest.skip("pycapnp runs on asyncio only")
    from capsock.rpc import capnp as capnp_rpc

    monkeypatch.setattr(capnp_rpc, "_DIRECT", request.param == "direct")
    async with capnp.kj_loop():
        yield


def failing_broker() -> Any:
    broker = capnp.load(str(SCHEMAS / "broker.capnp"))
    calculator = capnp.load(str(SCHEMAS / "calculator.capnp"))

    class Failing(broker.Broker.Server):  # type: ignore[misc,name-defined]
        async def echo(self, payload: bytes, _context: Any, **kwargs: Any) -> bytes:
            def deeper() -> None:
                raise KeyError(f"no entry {payload.decode()}")

            try:
                deeper()
            except KeyError as exc:
                raise LookupError("the lookup failed: entry-42 is missing") from exc
            return b""

        async def mint(
            self, ttlSeconds: float, uses: int, label: str, _context: Any, **kw: Any
        ) -> str:
            # A native KJ exception: its text holds a C++ source location and
            # this process's stack addresses.
            with calculator.Calculator.Expression.from_bytes(b"\x00" * 4 + b"\x10" + b"\x00" * 3):
                pass
            return ""

    return broker, Failing


def assert_public(exc: BaseException, *expected: str) -> None:
    text, description = str(exc), str(getattr(exc, "description", ""))
    for word in expected:
        assert word in description, description
    for shown in (text, description):
        assert "Traceback" not in shown, shown
        assert ".py" not in shown and 'File "' not in shown, shown
        assert "c++" not in shown and "/" not in shown, shown
        assert "0x" not in shown, shown
    # pycapnp's str() ends with the *caller's own* stack ("stack: ..."); what
    # the server sent is the description, which holds no addresses at all.
    assert not HEX_RUN.search(description), description


@needs_capnp
async def test_capnp_callee_sends_type_and_message_not_its_traceback(
    kj: None, caplog: pytest.LogCaptureFixture
) -> None:
    from capsock.rpc import capnp as capnp_rpc

    caplog.set_level(logging.DEBUG, logger="capsock.rpc.capnp")
    broker, failing = failing_broker()
    async with (
        capsock.Node(listen=["tcp:127.0.0.1:0"]) as server,
        capsock.Node() as client,
        anyio.create_task_group() as tg,
    ):
        listener = await server.listen()
        tg.start_soon(capnp_rpc.serve, listener, lambda stream: failing())
        async with capnp_rpc.connect(client, listener.uri) as conn:
            remote = conn.bootstrap(broker.Broker)
            with pytest.raises(capnp.KjException) as info:
                await remote.echo(b"x")
            assert_public(info.value, "LookupError: the lookup failed: entry-42 is missing")
            assert "KeyError" not in info.value.description  # only the last exception
            with pytest.raises(capnp.KjException) as info:
                await remote.mint(1.0, 1, "x")
            assert_public(info.value, "KjException: failed:", "Message ends prematurely")
        tg.cancel_scope.cancel()
    # The full error stays here, at debug level.
    assert "Traceback (most recent call last)" in caplog.text
    assert "test_rpc_security.py" in caplog.text


# ------------------------------------------------------------------ the filter, sans-IO

TRACEBACK = (
    "message = Traceback (most recent call last):\n"
    '  File "/srv/app/server.py", line 10, in lookup\n'
    "    raise KeyError(key)\n"
    "KeyError: 'k'\n\n"
    "During handling of the above exception, another exception occurred:\n\n"
    "Traceback (most recent call last):\n"
    '  File "capnp/lib/capnp.pyx", line 164, in finalize\n'
    '  File "/srv/app/server.py", line 12, in lookup\n'
    "    raise app.errors.NotFound('no such key')\n"
    "    ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^\n"
    "app.errors.NotFound: no such key\n"
)


def test_public_reason() -> None:
    from capsock.rpc._capnp_errors import MAX_REASON, public_reason

    assert public_reason(TRACEBACK) == "NotFound: no such key"
    assert public_reason(
        'Traceback (most recent call last):\n  File "x.py", line 1\nValueError'
    ) == ("ValueError")
    kj_text = (
        "capnp/serialize.c++:58: failed: expected a >= b; Message ends prematurely.\n"
        "stack: 7fef470d9d75 7fef46f86d51 55ea13e9e080"
    )
    assert public_reason(kj_text) == "failed: expected a >= b; Message ends prematurely."
    nested = TRACEBACK.replace(
        "app.errors.NotFound: no such key", "capnp.lib.capnp.KjException: " + kj_text
    )
    assert (
        public_reason(nested) == "KjException: failed: expected a >= b; Message ends prematurely."
    )
    group = (
        "  + Exception Group Traceback (most recent call last):\n"
        '  |   File "/srv/app/server.py", line 3, in f\n'
        "  | ExceptionGroup: two (2 sub-exceptions)\n"
    )
    assert public_reason(group) == "Exception"
    assert public_reason("plain words") == "plain words"
    assert len(public_reason("x" * 5000)) == MAX_REASON


def rpc_messages() -> tuple[Any, list[bytes], list[bytes]]:
    """Some Cap'n Proto RPC messages: (schema, without an exception, with one)."""
    from capsock.rpc._capnp_errors import _rpc_schema

    rpc_schema = _rpc_schema()
    plain = []
    m = rpc_schema.Message.new_message()
    call = m.init("call")
    call.questionId = 9
    call.interfaceId = 0x1234
    call.params.content = "some text"
    plain.append(m.to_bytes())
    m = rpc_schema.Message.new_message()
    ret = m.init("return")
    ret.answerId = 9
    ret.init("results").content = "x" * 3000
    plain.append(m.to_bytes())
    m = rpc_schema.Message.new_message()
    m.init("finish").questionId = 9
    plain.append(m.to_bytes())
    m = rpc_schema.Message.new_message()
    m.init("resolve").promiseId = 3
    m.resolve.init("cap").senderHosted = 5
    plain.append(m.to_bytes())
    failing = []
    for kind in ("return", "abort", "resolve"):
        m = rpc_schema.Message.new_message()
        exc = m.init("abort") if kind == "abort" else m.init(kind).init("exception")
        exc.reason = TRACEBACK
        exc.trace = "at 0x7fef470d9d75"
        failing.append(m.to_bytes())
    return rpc_schema, plain, failing


@needs_capnp
def test_layout_constants_match_the_schema() -> None:
    from capsock.rpc import _capnp_errors as errors

    rpc_schema = errors._rpc_schema()
    fields = {f.name: f.discriminantValue for f in rpc_schema.Message.schema.node.struct.fields}
    assert rpc_schema.Message.schema.node.struct.discriminantOffset == 0
    assert (fields["abort"], fields["return"], fields["resolve"]) == (
        errors.MESSAGE_ABORT,
        errors.MESSAGE_RETURN,
        errors.MESSAGE_RESOLVE,
    )
    for struct_, offset in (
        (rpc_schema.Return, errors.RETURN_TAG_OFFSET),
        (rpc_schema.Resolve, errors.RESOLVE_TAG_OFFSET),
    ):
        node = struct_.schema.node.struct
        assert node.discriminantOffset == offset
        variants = {f.name: f.discriminantValue for f in node.fields}
        assert variants["exception"] == errors.EXCEPTION_VARIANT


@needs_capnp
@pytest.mark.parametrize("piece", [1, 7, 64, 100000])
def test_filter_rewrites_exceptions_only_in_any_pieces(piece: int) -> None:
    from capsock.rpc._capnp_errors import ErrorFilter

    rpc_schema, plain, failing = rpc_messages()
    stream = b"".join(plain[:2] + failing[:1] + plain[2:] + failing[1:])
    filt = ErrorFilter()
    out = b"".join(filt.feed(stream[i : i + piece]) for i in range(0, len(stream), piece))
    assert filt.pending == 0
    assert out.startswith(plain[0] + plain[1])
    # Split the output into messages again and look at each.
    seen = []
    rest = out
    while rest:
        size = _size(rest)
        with rpc_schema.Message.from_bytes(rest[:size], traversal_limit_in_words=1 << 30) as m:
            which = m.which()
            if which == "abort":
                seen.append((which, m.abort.reason, m.abort.trace))
            elif which in ("return", "resolve") and getattr(m, which).which() == "exception":
                exc = getattr(m, which).exception
                seen.append((which, exc.reason, exc.trace))
            else:
                seen.append((which, None, None))
        rest = rest[size:]
    assert [s[0] for s in seen] == [
        "call",
        "return",
        "return",
        "finish",
        "resolve",
        "abort",
        "resolve",
    ]
    rewritten = [(reason, trace) for _, reason, trace in seen if reason is not None]
    assert rewritten == [("NotFound: no such key", "")] * 3


def _size(buf: bytes) -> int:
    from capsock.rpc._capnp_errors import _message_size

    size = _message_size(buf, 0)
    assert size is not None
    return size


@needs_capnp
def test_filter_passes_messages_without_exceptions_as_the_same_object() -> None:
    from capsock.rpc._capnp_errors import ErrorFilter

    _, plain, _ = rpc_messages()
    filt = ErrorFilter()
    data = b"".join(plain)
    assert filt.feed(data) is data  # no copy on the common path
    assert filt.feed(plain[0][:5]) == b"" and filt.pending == 5
    assert filt.feed(plain[0][5:]) == plain[0]
