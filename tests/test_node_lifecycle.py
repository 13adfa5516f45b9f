"""Node lifecycle and robustness: cancellation, exceptions, handler failures, who speaks first."""

from __future__ import annotations

import logging

import anyio
import pytest

import capsock
from capsock.core.handshake import InitiatorHandshake
from capsock.core.mux import Mux
from capsock.core.records import RecordReader
from capsock.keys import KeyPair, NodeId
from capsock.uri import Capability, TcpHint

from .helpers import echo, read_all

pytestmark = pytest.mark.anyio


async def test_cancelling_a_node_body_shuts_down_cleanly() -> None:
    with anyio.move_on_after(0.2) as scope:
        async with capsock.Node(listen=["tcp:127.0.0.1:0"]) as node:
            await node.listen()
            await anyio.sleep(5)
    assert scope.cancelled_caught


async def test_a_cancelled_body_still_resets_its_streams_for_the_peer() -> None:
    """Cancelling the body (a timeout, Ctrl-C) must not silence the node: the
    peer learns at once that the stream was reset, not that the connection
    vanished, and the shutdown takes no timeouts (regression: the node's session
    writers were cancelled with the body, so nothing could be sent)."""
    async with capsock.Node(listen=["tcp:127.0.0.1:0"]) as server:
        listener = await server.listen()
        opened = anyio.Event()
        started = anyio.current_time()
        with anyio.move_on_after(5) as scope:
            async with capsock.Node() as client, anyio.create_task_group() as tg:

                async def hold() -> None:
                    stream = await client.connect(listener.uri)
                    await stream.send(b"x")
                    opened.set()
                    try:
                        await anyio.sleep_forever()
                    except anyio.get_cancelled_exc_class():
                        stream.reset()
                        raise

                tg.start_soon(hold)
                await opened.wait()
                scope.cancel()
        assert scope.cancelled_caught
        assert anyio.current_time() - started < 1.0  # no drain or close timeouts hit
        accepted = await listener.accept()
        assert await accepted.receive() == b"x"
        with pytest.raises(capsock.StreamReset) as caught:
            await accepted.receive()
        assert not isinstance(caught.value, capsock.ConnectionLost), caught.value


async def test_errors_from_the_body_are_not_wrapped_in_groups() -> None:
    with pytest.raises(capsock.CapabilityRejected):
        async with capsock.Node(listen=["tcp:127.0.0.1:0"]) as server, capsock.Node() as client:
            listener = await server.listen()
            await server.revoke(listener.uri)
            await client.connect(listener.uri)


async def test_a_failing_handler_does_not_stop_the_listener(
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls = 0

    async def sometimes_fails(stream: capsock.Stream) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("handler bug")
        await echo(stream)

    async with (
        capsock.Node(listen=["tcp:127.0.0.1:0"]) as server,
        capsock.Node() as client,
        anyio.create_task_group() as tg,
    ):
        listener = await server.listen()
        tg.start_soon(listener.serve, sometimes_fails)
        first = await client.connect(listener.uri)
        with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
            await first.receive()
        second = await client.connect(listener.uri)
        await second.send(b"ok")
        await second.send_eof()
        assert await read_all(second) == b"ok"
        assert "handler bug" in caplog.text
        tg.cancel_scope.cancel()


async def test_responder_waits_for_the_dialer_to_speak_first() -> None:
    async with capsock.Node(listen=["tcp:127.0.0.1:0"]) as server:
        await server.listen()
        hint = server.hints[0]
        assert isinstance(hint, TcpHint)
        me = KeyPair.generate()
        hs = InitiatorHandshake(me, server.id)
        sock = await anyio.connect_tcp(hint.host, hint.port)
        async with sock:
            await sock.send(hs.first_record())
            reader = RecordReader()
            while (message := reader.next_record()) is None:
                reader.feed(await sock.receive())
            result = hs.read_second(message)
            # Nothing follows message 2 until we speak.
            with anyio.move_on_after(0.3):
                reader.feed(await sock.receive())
            assert reader.next_record() is None
            mux = Mux(dialer=True)
            mux.ping(b"12345678")
            plaintext = mux.data_to_send()
            assert plaintext is not None
            await sock.send(result.cipher.encrypt_record(plaintext))
            with anyio.fail_after(5):
                while (record := reader.next_record()) is None:
                    reader.feed(await sock.receive())
            events = mux.receive_message(result.cipher.decrypt(record))
            assert any(type(e).__name__ == "PongReceived" for e in events)


async def test_dialing_own_key_with_the_sign_bit_flipped_is_refused() -> None:
    async with capsock.Node(listen=["tcp:127.0.0.1:0"]) as node:
        listener = await node.listen()
        raw = bytearray(node.id.raw)
        raw[31] ^= 0x80
        twin = Capability(NodeId(bytes(raw)), listener.uri.token, listener.uri.hints)
        with pytest.raises(capsock.LocalUsageError, match="own id"):
            await node.connect(twin)


async def test_many_pings_do_not_exhaust_the_control_queue() -> None:
    mux = Mux(dialer=False)
    from capsock.core.frames import Ping, encode_frame

    for _ in range(2000):
        mux.receive_message(encode_frame(Ping(b"p" * 8)) * 64)
        while mux.data_to_send() is not None:
            pass
    assert mux.stats()["queued_control"] == 0


async def test_handshake_timeout_drops_a_silent_connection(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="capsock")
    cfg = capsock.NodeConfig(handshake_timeout=0.3)
    async with capsock.Node(listen=["tcp:127.0.0.1:0"], config=cfg) as server:
        hint = server.hints[0]
        assert isinstance(hint, TcpHint)
        sock = await anyio.connect_tcp(hint.host, hint.port)
        async with sock:
            with anyio.fail_after(5), pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                await sock.receive()
        assert server.stats()["handshakes_failed"] == 1
        assert server.stats()["half_open"] == 0


async def test_half_open_limit_evicts_the_oldest_connection() -> None:
    cfg = capsock.NodeConfig(max_half_open=5, handshake_timeout=30)
    async with (
        capsock.Node(listen=["tcp:127.0.0.1:0"], config=cfg) as server,
        capsock.Node() as client,
    ):
        listener = await server.listen()
        hint = server.hints[0]
        assert isinstance(hint, TcpHint)
        idle = [await anyio.connect_tcp(hint.host, hint.port) for _ in range(5)]
        await anyio.sleep(0.2)
        assert server.stats()["half_open"] == 5
        # A newcomer is admitted; the oldest idle connection is the one dropped.
        stream = await client.connect(listener.uri)
        await stream.aclose()
        with anyio.fail_after(5), pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
            await idle[0].receive()
        for s in idle:
            await s.aclose()
