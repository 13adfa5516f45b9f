"""Cap'n Proto RPC (pycapnp) over capsock: calculator with pipelining, 1 MiB Data,
temporary sockets handed out by a Cap'n Proto method, clean shutdown.

pycapnp runs on asyncio only: the trio half of each test is skipped, except the
one that checks trio gets a clear error.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest

import capsock
from capsock.net.stream import Stream

capnp = pytest.importorskip("capnp", reason="pycapnp is not installed (the 'capnp' extra)")
from capsock.rpc import capnp as capnp_rpc  # noqa: E402

pytestmark = pytest.mark.anyio

SCHEMAS = Path(__file__).resolve().parents[1] / "schemas"
calculator = capnp.load(str(SCHEMAS / "calculator.capnp"))
broker = capnp.load(str(SCHEMAS / "broker.capnp"))
MiB = 1 << 20


@pytest.fixture(params=["direct", "socketpair"])
async def kj(
    anyio_backend: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[None]:
    """pycapnp's KJ event loop; each test runs with both bridges (see capsock.rpc.capnp)."""
    if anyio_backend != "asyncio":
        pytest.skip("pycapnp runs on asyncio only (its KJ event loop is driven by asyncio)")
    if request.param == "direct":
        assert capnp_rpc._DIRECT, "this pycapnp lacks AsyncIoStream._connect: update docs/rpc.md"
    monkeypatch.setattr(capnp_rpc, "_DIRECT", request.param == "direct")
    async with capnp.kj_loop():
        yield


# ------------------------------------------------------------------ implementations


class ValueImpl(calculator.Calculator.Value.Server):
    def __init__(self, value: float) -> None:
        self.value = value

    async def read(self, _context: Any, **kwargs: Any) -> float:
        return self.value


class OperatorImpl(calculator.Calculator.Function.Server):
    def __init__(self, op: str) -> None:
        self.op = op

    async def call(self, params: Any, _context: Any, **kwargs: Any) -> float:
        a, b = params
        return {"add": a + b, "subtract": a - b, "multiply": a * b, "divide": a / b}[self.op]


async def evaluate(expression: Any) -> float:
    which = expression.which()
    if which == "literal":
        return float(expression.literal)
    if which == "previousResult":
        return float((await expression.previousResult.read()).value)
    params = [await evaluate(p) for p in expression.call.params]
    return float((await expression.call.function.call(params)).value)


class CalculatorImpl(calculator.Calculator.Server):
    def __init__(self) -> None:
        self.evaluations = 0

    async def evaluate(self, expression: Any, _context: Any, **kwargs: Any) -> ValueImpl:
        self.evaluations += 1
        return ValueImpl(await evaluate(expression))

    async def getOperator(self, op: Any, _context: Any, **kwargs: Any) -> OperatorImpl:
        return OperatorImpl(str(op))


class BrokerImpl(broker.Broker.Server):
    """Mints temporary sockets bound to the caller and echoes on each once."""

    def __init__(self, node: capsock.Node, stream: Stream, tg: Any) -> None:
        self.node = node
        self.peer = stream.peer
        self.tg = tg

    async def mint(self, ttlSeconds: float, uses: int, label: str, _context: Any, **kw: Any) -> str:
        listener = await self.node.mint(
            ttl=ttlSeconds if ttlSeconds > 0 else None,
            uses=uses or None,
            peer=self.peer,
            label=label or None,
        )
        self.tg.start_soon(self._echo_once, listener)
        return str(listener.uri)

    async def _echo_once(self, listener: capsock.Listener) -> None:
        async with listener:
            stream = await listener.accept()
            async with stream:
                await stream.send(await stream.receive())

    async def echo(self, payload: bytes, _context: Any, **kwargs: Any) -> bytes:
        return payload


# ------------------------------------------------------------------ tests


async def test_calculator_with_pipelining_over_capsock(kj: None) -> None:
    impl = CalculatorImpl()
    async with (
        capsock.Node(listen=["tcp:127.0.0.1:0"]) as server,
        capsock.Node() as client,
        anyio.create_task_group() as tg,
    ):
        listener = await server.listen()
        tg.start_soon(capnp_rpc.serve, listener, lambda stream: impl)
        async with capnp_rpc.connect(client, listener.uri) as conn:
            assert conn.peer == server.id
            calc = conn.bootstrap(calculator.Calculator)
            # Pipelined: read() is sent on the Value of an evaluate() not yet answered.
            value = calc.evaluate({"literal": 123}).value
            assert (await value.read()).value == 123
            # (2 * 3) + 4, with operators fetched as capabilities (pipelined too).
            add = calc.getOperator("add").func
            multiply = calc.getOperator("multiply").func
            expression = {
                "call": {
                    "function": add,
                    "params": [
                        {
                            "call": {
                                "function": multiply,
                                "params": [{"literal": 2}, {"literal": 3}],
                            }
                        },
                        {"literal": 4},
                    ],
                }
            }
            first = calc.evaluate(expression).value
            # A previous, still unresolved result as the input of the next call.
            second = calc.evaluate(
                {
                    "call": {
                        "function": multiply,
                        "params": [{"previousResult": first}, {"literal": 10}],
                    }
                }
            ).value
            assert (await second.read()).value == 100
            assert (await first.read()).value == 10
            assert impl.evaluations == 3
        tg.cancel_scope.cancel()


async def test_one_mib_data_round_trips(kj: None) -> None:
    async with (
        capsock.Node(listen=["tcp:127.0.0.1:0"]) as server,
        capsock.Node() as client,
        anyio.create_task_group() as tg,
    ):
        listener = await server.listen()
        tg.start_soon(capnp_rpc.serve, listener, lambda s: BrokerImpl(server, s, tg))
        async with capnp_rpc.connect(client, listener.uri) as conn:
            remote = conn.bootstrap(broker.Broker)
            payload = bytes(range(256)) * (4 * 1024)
            assert len(payload) == MiB
            answer = await remote.echo(payload)
            assert answer.payload == payload
            # Several in flight at once, answers matched by Cap'n Proto.
            promises = [remote.echo(bytes([i]) * 1000) for i in range(20)]
            for i, promise in enumerate(promises):
                assert (await promise).payload == bytes([i]) * 1000
        tg.cancel_scope.cancel()


async def test_a_method_hands_out_a_fresh_temporary_socket(kj: None) -> None:
    async with (
        capsock.Node(listen=["tcp:127.0.0.1:0"]) as server,
        capsock.Node() as client,
        capsock.Node() as stranger,
        anyio.create_task_group() as tg,
    ):
        listener = await server.listen()
        tg.start_soon(capnp_rpc.serve, listener, lambda s: BrokerImpl(server, s, tg))
        async with capnp_rpc.connect(client, listener.uri) as conn:
            remote = conn.bootstrap(broker.Broker)
            uri = (await remote.mint(30.0, 1, "data")).uri
            cap = capsock.Capability.parse(uri)
            assert cap.node == server.id
            assert cap != listener.uri
            with pytest.raises(capsock.CapabilityRejected):  # bound to the caller
                await stranger.connect(uri)
            stream = await client.connect(uri)
            await stream.send(b"over the minted socket")
            assert await stream.receive() == b"over the minted socket"
            await stream.aclose()
            with pytest.raises(capsock.CapabilityRejected):  # one use only
                await client.connect(uri)
            assert (await remote.mint(0.0, 0, "")).uri != uri  # fresh every time
        tg.cancel_scope.cancel()


async def test_shutdown_is_clean_on_both_sides(kj: None) -> None:
    async with (
        capsock.Node(listen=["tcp:127.0.0.1:0"]) as server,
        capsock.Node() as client,
        anyio.create_task_group() as tg,
    ):
        listener = await server.listen()
        ended = anyio.Event()

        async def serve_one() -> None:
            stream = await listener.accept()
            await capnp_rpc.serve_stream(stream, CalculatorImpl())
            ended.set()

        tg.start_soon(serve_one)
        # The client leaves: the server's serve_stream returns, no stream is left.
        async with capnp_rpc.connect(client, listener.uri) as conn:
            calc = conn.bootstrap(calculator.Calculator)
            assert (await calc.evaluate({"literal": 1}).value.read()).value == 1
        with anyio.fail_after(5):
            await ended.wait()
        assert _streams(server) == _streams(client) == 0

        # The server goes away (its capability revoked, so its streams are reset):
        # the client's calls fail with a disconnect instead of hanging.
        tg.start_soon(capnp_rpc.serve, listener, lambda s: CalculatorImpl())
        async with capnp_rpc.connect(client, listener.uri) as conn:
            calc = conn.bootstrap(calculator.Calculator)
            assert (await calc.evaluate({"literal": 2}).value.read()).value == 2
            await server.revoke(listener.uri)
            with anyio.fail_after(5), pytest.raises(capnp.KjException):
                await calc.evaluate({"literal": 3}).value.read()
        await anyio.sleep(0.1)
        assert _streams(server) == _streams(client) == 0
        tg.cancel_scope.cancel()


def _streams(node: capsock.Node) -> int:
    return sum(s["streams"] for s in node.stats()["sessions"].values())


async def test_without_the_kj_loop_the_error_says_what_to_do(anyio_backend: str) -> None:
    if anyio_backend != "asyncio":
        pytest.skip("pycapnp runs on asyncio only")
    async with capsock.Node(listen=["tcp:127.0.0.1:0"]) as server, capsock.Node() as client:
        listener = await server.listen()
        with pytest.raises(capsock.LocalUsageError, match="kj_loop"):
            async with capnp_rpc.connect(client, listener.uri):
                pass
        await anyio.sleep(0.1)
        assert _streams(client) == 0  # the stream it had opened is closed again


async def test_trio_gets_a_clear_error(anyio_backend: str) -> None:
    if anyio_backend != "trio":
        pytest.skip("checks the error on trio")
    async with capsock.Node(listen=["tcp:127.0.0.1:0"]) as server, capsock.Node() as client:
        listener = await server.listen()
        with pytest.raises(capsock.LocalUsageError, match="asyncio"):
            async with capnp_rpc.connect(client, listener.uri):
                pass
        with pytest.raises(capsock.LocalUsageError, match="asyncio"):
            await capnp_rpc.serve(listener, lambda s: CalculatorImpl())
