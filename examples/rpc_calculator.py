"""A Cap'n Proto calculator served over capsock, with promise pipelining.

    python examples/rpc_calculator.py

Needs pycapnp (``pip install 'capsock[capnp]'``); asyncio only, as pycapnp is.
The schemas are ``schemas/calculator.capnp`` and ``schemas/broker.capnp``.  The
server serves the calculator on one capsock listener and a broker on another;
the broker's ``mint()`` returns a freshly minted capsock capability (as Text)
bound to the caller, which the client then opens as a plain capsock stream.
Both ends run in this one process.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import anyio
import anyio.abc

import capsock
from capsock.net.stream import Stream

try:
    import capnp
except ImportError:
    sys.exit("this example needs pycapnp: pip install 'capsock[capnp]'")

from capsock.rpc import capnp as capnp_rpc

SCHEMAS = Path(__file__).resolve().parents[1] / "schemas"
calculator = capnp.load(str(SCHEMAS / "calculator.capnp"))
broker = capnp.load(str(SCHEMAS / "broker.capnp"))


# ------------------------------------------------------------------ server side


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
    """Evaluate a Calculator.Expression; previous results and functions are capabilities."""
    which = expression.which()
    if which == "literal":
        return float(expression.literal)
    if which == "previousResult":
        return float((await expression.previousResult.read()).value)
    params = [await evaluate(p) for p in expression.call.params]
    return float((await expression.call.function.call(params)).value)


class CalculatorImpl(calculator.Calculator.Server):
    async def evaluate(self, expression: Any, _context: Any, **kwargs: Any) -> ValueImpl:
        return ValueImpl(await evaluate(expression))

    async def getOperator(self, op: Any, _context: Any, **kwargs: Any) -> OperatorImpl:
        return OperatorImpl(str(op))


class BrokerImpl(broker.Broker.Server):
    """Hands out temporary capsock sockets, bound to the caller, that echo once."""

    def __init__(self, node: capsock.Node, stream: Stream, tg: anyio.abc.TaskGroup) -> None:
        self.node = node
        self.caller = stream.peer  # the authenticated node on the other end
        self.tg = tg

    async def mint(
        self, ttlSeconds: float, uses: int, label: str, _context: Any, **kwargs: Any
    ) -> str:
        listener = await self.node.mint(
            ttl=ttlSeconds if ttlSeconds > 0 else None,
            uses=uses or None,
            peer=self.caller,
            label=label or None,
        )
        self.tg.start_soon(self.echo_once, listener)
        return str(listener.uri)  # Text: a capability URI, a secret for the caller only

    async def echo_once(self, listener: capsock.Listener) -> None:
        async with listener:
            stream = await listener.accept()
            async with stream:
                await stream.send(b"echo: " + await stream.receive())

    async def echo(self, payload: bytes, _context: Any, **kwargs: Any) -> bytes:
        return payload


# ------------------------------------------------------------------ both ends


async def main() -> None:
    async with (
        capsock.Node(listen=["tcp:127.0.0.1:0"]) as server,
        capsock.Node() as client,
        anyio.create_task_group() as tg,
    ):
        calc_listener = await server.listen()
        broker_listener = await server.listen()
        tg.start_soon(capnp_rpc.serve, calc_listener, lambda stream: CalculatorImpl())
        tg.start_soon(capnp_rpc.serve, broker_listener, lambda s: BrokerImpl(server, s, tg))

        async with capnp_rpc.connect(client, calc_listener.uri) as conn:
            calc = conn.bootstrap(calculator.Calculator)
            # Pipelining: read() goes out on the Value of an evaluate() that
            # has not been answered yet -- one round trip for both calls.
            value = await calc.evaluate({"literal": 123}).value.read()
            print(f"123 -> {value.value}")

            add = calc.getOperator("add").func  # capabilities, also pipelined
            multiply = calc.getOperator("multiply").func
            six = calc.evaluate(
                {"call": {"function": multiply, "params": [{"literal": 2}, {"literal": 3}]}}
            ).value
            ten = calc.evaluate(
                {"call": {"function": add, "params": [{"previousResult": six}, {"literal": 4}]}}
            ).value
            result = (await ten.read()).value
            print(f"(2 * 3) + 4 -> {result}")
            assert result == 10

        async with capnp_rpc.connect(client, broker_listener.uri) as conn:
            remote = conn.bootstrap(broker.Broker)
            payload = bytes(range(256)) * 4096
            assert (await remote.echo(payload)).payload == payload
            print(f"{len(payload)} bytes of Data round-tripped")

            uri = (await remote.mint(30.0, 1, "example")).uri
            print(f"minted through Cap'n Proto: {capsock.Capability.parse(uri).redacted()}")
            stream = await client.connect(uri)
            await stream.send(b"over a socket handed out by Cap'n Proto")
            print((await stream.receive()).decode())
            await stream.aclose()
        tg.cancel_scope.cancel()
    print("done")


if __name__ == "__main__":
    asyncio.run(capnp.run(main()))  # pycapnp's KJ event loop runs inside asyncio's
