"""Attacks on live nodes over real loopback sockets, each one a test.

Wrong key (a MITM with its own keys), downgrade, malformed handshake messages,
reflection, replayed / reordered / dropped / spliced transport records, every
kind of bad capability (all refused identically), oversized and zero-length
records, and secrets in logs, reprs and exception text.  The hand-driven
attacker is :class:`tests.chaos.RawDialer`: a real IK handshake over a plain
socket, then crafted records.
"""

from __future__ import annotations

import base64
import logging
import os
import traceback
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio
import anyio.abc
import pytest
from anyio.abc import SocketAttribute
from hypothesis import strategies as st
from noise.connection import Keypair, NoiseConnection

import capsock
from capsock import ErrorCode, NodeConfig
from capsock.core.frames import Data, Eof, GoAway, Open, Ping, encode_frame
from capsock.core.handshake import InitiatorHandshake
from capsock.core.noise import PROLOGUE, PROTOCOL_NAME, HandshakeState, available_ciphers
from capsock.keys import KeyPair
from capsock.uri import Capability, Expires, TcpHint, Token, UnknownCaveat

from .chaos import ChaosProxy, RawDialer, record
from .helpers import echo, read_all

pytestmark = pytest.mark.anyio
CONFIG = NodeConfig(handshake_timeout=2.0, connect_timeout=5.0)
NO_REPLAY_CACHE = NodeConfig(handshake_timeout=2.0, connect_timeout=5.0, replay_cache_size=0)
"""The replay cache drops a replayed message 1 at once (test_handshake_floods.py);
tests of the defences behind it turn it off, as if the replay came after the
cache forgot the message."""
HAS_AESGCM = "AESGCM" in available_ciphers()


@dataclass
class Target:
    server: capsock.Node
    client: capsock.Node
    echo: capsock.Listener  # served: echoes
    plain: capsock.Listener  # not served: the test accepts
    host: str
    port: int

    async def still_serves(self) -> None:
        """A well-behaved client still gets an echo (on a fresh client node)."""
        async with capsock.Node() as fresh:
            with anyio.fail_after(10):
                stream = await fresh.connect(self.echo.uri)
                await stream.send(b"still serving")
                await stream.send_eof()
                assert await read_all(stream) == b"still serving"
                await stream.aclose()


@asynccontextmanager
async def target(config: NodeConfig = CONFIG, **node_kwargs: object) -> AsyncIterator[Target]:
    async with (
        capsock.Node(listen=["tcp:127.0.0.1:0"], config=config, **node_kwargs) as server,  # type: ignore[arg-type]
        capsock.Node(config=CONFIG) as client,
        anyio.create_task_group() as tg,
    ):
        echo_listener = await server.listen()
        tg.start_soon(echo_listener.serve, echo)
        plain = await server.listen()
        hint = server.hints[0]
        assert isinstance(hint, TcpHint)
        yield Target(server, client, echo_listener, plain, hint.host, hint.port)
        tg.cancel_scope.cancel()


async def send_and_expect_hangup(
    host: str, port: int, data: bytes, seconds: float = 5, *, eof: bool = False
) -> bytes:
    """Send ``data`` on a fresh connection; return what came back before the node hung up."""
    got = bytearray()
    sock = await anyio.connect_tcp(host, port)
    async with sock:
        await sock.send(data)
        if eof:
            await sock.send_eof()
        with anyio.fail_after(seconds):
            try:
                while True:
                    got += await sock.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                pass
    return bytes(got)


def goaway_codes(frames: Sequence[object]) -> list[int]:
    return [f.code for f in frames if isinstance(f, GoAway)]


# ------------------------------------------------------------------ wrong key


async def test_mitm_with_its_own_keys_fails_before_any_token_is_sent() -> None:
    """The victim's URI, but the address leads to another node (its own keys)."""
    async with (
        target() as t,
        capsock.Node(listen=["tcp:127.0.0.1:0"], config=CONFIG) as mitm,
    ):
        await mitm.listen()
        hint = mitm.hints[0]
        assert isinstance(hint, TcpHint)
        hijacked = t.echo.uri.with_hints((hint,))
        with pytest.raises(capsock.PeerAuthenticationError) as info:
            await t.client.connect(hijacked)
        text = str(info.value)
        assert hijacked.token.encode().hex() not in text
        assert str(hijacked).split("/")[3].split("?")[0] not in text
        await anyio.sleep(0.1)
        stats = mitm.stats()
        assert stats["opens_received"] == 0, "the MITM saw an OPEN (a token)"
        assert stats["handshakes_failed"] == 1
        assert stats["sessions"] == {}
        # The same MITM spliced in as a TCP relay (it sees every byte) learns nothing.
        async with ChaosProxy(hint.host, hint.port, capture=True) as tap:
            with pytest.raises(capsock.PeerAuthenticationError):
                await t.client.connect(tap.route(t.echo.uri))
            seen = b"".join(tap.connections[0].units["up"])
            assert t.echo.uri.token.encode() not in seen
            assert t.echo.uri.token.tag not in seen
        assert mitm.stats()["opens_received"] == 0
        await t.still_serves()


# ------------------------------------------------------------------ downgrade


def _capsock_first_message(
    key: KeyPair, remote: capsock.NodeId, prologue: bytes, name: bytes
) -> bytes:
    hs = HandshakeState(name, True, prologue, s=key.x25519_private, rs=remote.x25519())
    return record(hs.write_message(key.node_id.raw))


def _noiseprotocol_first_message(key: KeyPair, remote: capsock.NodeId, name: bytes) -> bytes:
    conn = NoiseConnection.from_name(name)
    conn.set_as_initiator()
    conn.set_prologue(PROLOGUE)
    conn.set_keypair_from_private_bytes(Keypair.STATIC, key.x25519_private)
    conn.set_keypair_from_public_bytes(Keypair.REMOTE_STATIC, remote.x25519())
    conn.start_handshake()
    return record(conn.write_message(key.node_id.raw))


DOWNGRADES: dict[str, Callable[[KeyPair, capsock.NodeId], bytes]] = {
    "prologue-v0": lambda k, r: _capsock_first_message(k, r, b"capsock/0", PROTOCOL_NAME),
    "prologue-v2": lambda k, r: _capsock_first_message(k, r, b"capsock/2", PROTOCOL_NAME),
    "no-prologue": lambda k, r: _capsock_first_message(k, r, b"", PROTOCOL_NAME),
    "pattern-NK": lambda k, r: _capsock_first_message(
        k, r, PROLOGUE, b"Noise_NK_25519_ChaChaPoly_BLAKE2b"
    ),
    "pattern-IKpsk2": lambda k, r: record(
        HandshakeState(
            b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2b",
            True,
            PROLOGUE,
            s=k.x25519_private,
            rs=r.x25519(),
            psks=[bytes(32)],
        ).write_message(k.node_id.raw)
    ),
    "hash-SHA256": lambda k, r: _noiseprotocol_first_message(
        k, r, b"Noise_IK_25519_ChaChaPoly_SHA256"
    ),
    "cipher-AESGCM": lambda k, r: _noiseprotocol_first_message(
        k, r, b"Noise_IK_25519_AESGCM_BLAKE2b"
    ),
    "hash-BLAKE2s": lambda k, r: _noiseprotocol_first_message(
        k, r, b"Noise_IK_25519_ChaChaPoly_BLAKE2s"
    ),
}


@pytest.mark.parametrize("variant", list(DOWNGRADES))
async def test_downgraded_dialer_is_rejected(variant: str) -> None:
    async with target() as t:
        message = DOWNGRADES[variant](KeyPair.generate(), t.server.id)
        assert await send_and_expect_hangup(t.host, t.port, message) == b"", "message 2 was sent"
        assert t.server.stats()["handshakes_failed"] == 1
        assert t.server.stats()["sessions"] == {}
        await t.still_serves()


def _strip_offer(unit: bytes) -> bytes:
    # e (32) | s (48) | payload: node id (32), offer 01 02 02 01, dialled id (34) | tag (16)
    message = unit[2:]
    assert len(message) == 166
    return record(message[:112] + message[116:])


def _strip_choice(unit: bytes) -> bytes:
    # e (32) | payload: choice 01 01 02 (3) | tag (16)
    message = unit[2:]
    assert len(message) == 51
    return record(message[:32] + message[35:])


@pytest.mark.skipif(not HAS_AESGCM, reason="no AES-256-GCM here: nothing is offered")
@pytest.mark.parametrize("where", ["offer", "choice"])
async def test_stripping_the_cipher_negotiation_breaks_the_handshake(where: str) -> None:
    """An on-path attacker removes the AES-GCM offer (or the choice) to force
    ChaChaPoly: both are inside the authenticated handshake, so it fails."""
    async with target() as t:
        async with ChaosProxy(t.host, t.port, unit="record") as proxy:
            if where == "offer":
                proxy.rewrite(_strip_offer, direction="up")
            else:
                proxy.rewrite(_strip_choice, direction="down")
            with pytest.raises(capsock.PeerAuthenticationError):
                await t.client.connect(proxy.route(t.echo.uri))
            assert proxy.faults_applied == 1
        await anyio.sleep(0.1)
        stats = t.server.stats()
        assert stats["opens_received"] == 0
        if where == "offer":
            assert stats["handshakes_failed"] == 1
        await t.still_serves()


# ------------------------------------------------------------------ malformed handshake


def _first(t: Target) -> bytes:
    return InitiatorHandshake(KeyPair.generate(), t.server.id).first_message()


def _flip(data: bytes, index: int) -> bytes:
    out = bytearray(data)
    out[index] ^= 0x10
    return bytes(out)


MALFORMED: dict[str, Callable[[bytes], bytes]] = {
    "truncated-by-one": lambda m: record(m[2:-1]),
    "truncated-to-32": lambda m: record(m[2:34]),
    "truncated-then-eof": lambda m: m[:100],  # the prefix promises more than comes
    "extended-by-one": lambda m: record(m[2:] + b"\x00"),
    "extended-by-900": lambda m: record(m[2:] + os.urandom(900)),
    "flip-length": lambda m: _flip(m, 0),  # 0x1080: over the 1024-byte cap
    "flip-ephemeral": lambda m: _flip(m, 2 + 3),
    "flip-static": lambda m: _flip(m, 2 + 40),
    "flip-payload": lambda m: _flip(m, 2 + 90),
    "flip-tag": lambda m: _flip(m, len(m) - 1),
    "zero-length-record": lambda m: b"\x00\x00" + m[2:],
    "oversized-record": lambda m: b"\xff\xff" + m[2:],
    "over-1024": lambda m: record(m[2:] + bytes(1025 - len(m) + 2)),
    "length-1025-then-silence": lambda m: b"\x04\x01" + m[2:],  # the cap, not the timeout
    "length-65535-then-silence": lambda m: b"\xff\xff" + m[2:200],
    "data-before-message-2": lambda m: m + b"\x00\x10" + bytes(16),
    "all-zero": lambda m: bytes(len(m)),
}


# A handshake timeout far longer than the hang-up the test waits for: each
# malformed message must be dropped for what it is (a failed check, or the
# 1,024-byte cap on message 1), never merely because the handshake timed out.
PATIENT = NodeConfig(handshake_timeout=120.0, connect_timeout=5.0)


@pytest.mark.parametrize("variant", list(MALFORMED))
async def test_malformed_first_message_is_dropped_and_the_node_keeps_serving(
    variant: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="capsock")
    async with target(PATIENT) as t:
        message = MALFORMED[variant](_first(t))
        answer = await send_and_expect_hangup(
            t.host, t.port, message, seconds=20, eof=variant.endswith("eof")
        )
        assert answer == b"", "the node answered a malformed message 1"
        length = int.from_bytes(message[:2], "big")
        if not 0 < length <= 1024:  # refused on its length prefix alone
            assert f"handshake record of {length} bytes (expected at most 1024)" in caplog.text
        with anyio.fail_after(5):
            while t.server.stats()["handshakes_failed"] < 1:
                await anyio.sleep(0.01)
        assert t.server.stats()["half_open"] == 0
        await t.still_serves()


async def test_truncated_first_message_on_an_open_connection_times_out() -> None:
    async with target() as t:
        sock = await anyio.connect_tcp(t.host, t.port)
        async with sock:
            await sock.send(_first(t)[:60])  # then nothing: the handshake timeout ends it
            with anyio.fail_after(CONFIG.handshake_timeout + 5):
                with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                    await sock.receive()
        assert t.server.stats()["handshakes_failed"] == 1
        await t.still_serves()


# ------------------------------------------------------------------ reflection


async def test_message_2_echoed_back_is_refused() -> None:
    async with target() as t:
        # As the first transport record of the session it answered:
        sock = await anyio.connect_tcp(t.host, t.port)
        async with sock:
            await sock.send(_first(t))
            got = bytearray()
            while len(got) < 2 or len(got) < 2 + int.from_bytes(got[:2], "big"):
                got += await sock.receive()
            await sock.send(bytes(got))  # its own message 2, straight back
            with anyio.fail_after(5), pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                while True:
                    await sock.receive()
            # ... and as message 1 of a new connection.
            assert await send_and_expect_hangup(t.host, t.port, bytes(got)) == b""
        assert t.server.stats()["handshakes_failed"] == 1  # the second one
        assert t.server.stats()["opens_received"] == 0
        await t.still_serves()


async def test_own_transport_records_echoed_back_close_the_session(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="capsock")
    async with target() as t:
        raw = await RawDialer.connect(t.host, t.port, t.server.id)
        async with raw:
            await raw.send(raw.seal(Ping(b"reflect!")))
            await raw.read_frames(5, until=lambda fs: any(type(f).__name__ == "Pong" for f in fs))
            assert raw.received_records, "the node did not answer the PING"
            for rec in raw.received_records:
                await raw.send(record(rec))  # the node's own records, reflected
            await raw.read_frames(5)
            assert raw.closed
            assert ErrorCode.PROTOCOL_ERROR in goaway_codes(raw.frames)
        assert "failed authentication" in caplog.text
        await t.still_serves()


async def test_reflected_message_1_to_its_own_dialer() -> None:
    """A 'server' that mirrors every byte: the dialer gets its own message 1 back."""
    async with target() as t:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        port = listener.extra(SocketAttribute.local_port)

        async def mirror(sock: anyio.abc.SocketStream) -> None:
            async with sock:
                try:
                    while True:
                        await sock.send(await sock.receive())
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    pass

        async with listener, anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, mirror)
            with pytest.raises(capsock.PeerAuthenticationError):
                await t.client.connect(t.echo.uri.with_hints((TcpHint("127.0.0.1", port),)))
            tg.cancel_scope.cancel()
        await t.still_serves()


async def test_a_connection_looped_back_to_the_dialer_itself_fails() -> None:
    """The network sends a node's dial for someone else back to its own listener."""
    async with target() as t, capsock.Node(listen=["tcp:127.0.0.1:0"], config=CONFIG) as other:
        elsewhere = await other.listen()
        looped = elsewhere.uri.with_hints((TcpHint(t.host, t.port),))
        with pytest.raises(capsock.PeerAuthenticationError):
            await t.server.connect(looped)
        await anyio.sleep(0.1)
        assert t.server.stats()["handshakes_failed"] == 1
        assert t.server.stats()["sessions"] == {}
        await t.still_serves()


# ------------------------------------------------------------------ transport records


@asynccontextmanager
async def open_raw_stream(t: Target) -> AsyncIterator[tuple[RawDialer, capsock.Stream]]:
    """A raw dialer with one accepted stream (id 1) on ``t.plain``."""
    raw = await RawDialer.connect(t.host, t.port, t.server.id)
    async with raw:
        await raw.send(raw.seal(Open(1, t.plain.uri.token.encode())))
        frames = await raw.read_frames(
            5, until=lambda fs: any(type(f).__name__ == "Accept" for f in fs)
        )
        assert any(type(f).__name__ == "Accept" for f in frames), frames
        with anyio.fail_after(5):
            accepted = await t.plain.accept()
        async with accepted:
            yield raw, accepted


async def read_until_error(stream: capsock.Stream) -> tuple[bytes, BaseException]:
    got = bytearray()
    with anyio.fail_after(5):
        while True:
            try:
                got += await stream.receive()
            except (anyio.BrokenResourceError, anyio.EndOfStream) as exc:
                return bytes(got), exc


RECORD_ATTACKS = ["replay", "reorder", "drop", "splice", "replay-old-after-new"]


@pytest.mark.parametrize("attack", RECORD_ATTACKS)
async def test_tampered_record_sequence_closes_the_session_and_delivers_nothing_after(
    attack: str,
) -> None:
    async with target() as t, open_raw_stream(t) as (raw, accepted):
        d1, d2, d3 = (raw.seal(Data(1, word)) for word in (b"one|", b"two|", b"three|"))
        if attack == "replay":
            sequence = [d1, d1, d2]
        elif attack == "reorder":
            sequence = [d1, d3, d2]
        elif attack == "drop":
            sequence = [d1, d3]
        elif attack == "replay-old-after-new":
            sequence = [d1, d2, d1, d3]
        else:  # splice: a record from another session of the same dialer
            other = await RawDialer.connect(t.host, t.port, t.server.id, key=raw.key)
            async with other:
                foreign = other.seal(Data(1, b"evil|"))
            sequence = [d1, foreign, d2]
        for rec in sequence:
            await raw.send(rec)
        got, exc = await read_until_error(accepted)
        expected = {"replay-old-after-new": b"one|two|"}.get(attack, b"one|")
        assert got == expected, "data was delivered out of order or after a bad record"
        assert isinstance(exc, capsock.ConnectionLost), repr(exc)
        await raw.read_frames(5)
        assert raw.closed
        assert ErrorCode.PROTOCOL_ERROR in goaway_codes(raw.frames)
        await t.still_serves()


@pytest.mark.parametrize("pace", ["all-at-once", "after-message-2"])
async def test_replaying_a_whole_recorded_session_opens_nothing(pace: str) -> None:
    async with target(NO_REPLAY_CACHE) as t:
        async with ChaosProxy(t.host, t.port, unit="record", capture=True) as tap:
            stream = await t.client.connect(tap.route(t.echo.uri))
            await stream.send(b"recorded secret")
            await stream.send_eof()
            assert await read_all(stream) == b"recorded secret"
            await stream.aclose()
            recorded = tap.connections[0].units["up"]
        before = t.server.stats()
        assert before["opens_received"] == 1
        if pace == "all-at-once":
            # data behind message 1: refused before message 2 is even sent
            answer = await send_and_expect_hangup(t.host, t.port, b"".join(recorded))
            assert answer == b""
        else:
            sock = await anyio.connect_tcp(t.host, t.port)
            async with sock:
                await sock.send(recorded[0])
                message_2 = await sock.receive()  # fresh: useless without the dialer's key
                assert message_2
                await sock.send(b"".join(recorded[1:]))
                with anyio.fail_after(5):
                    with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                        while True:
                            await sock.receive()
        after = t.server.stats()
        assert after["opens_received"] == before["opens_received"], "a replay opened a stream"
        assert after["streams_accepted"] == before["streams_accepted"]
        await t.still_serves()


async def test_a_replayed_message_1_does_not_capture_the_route_to_its_dialer() -> None:
    async with (
        target(NO_REPLAY_CACHE) as t,
        capsock.Node(listen=["tcp:127.0.0.1:0"], config=CONFIG) as victim,
        anyio.create_task_group() as tg,
    ):
        victim_service = await victim.listen()
        tg.start_soon(victim_service.serve, echo)
        # The attacker records the victim's message 1 on the way to the node ...
        async with ChaosProxy(t.host, t.port, unit="record", capture=True) as tap:
            stream = await victim.connect(tap.route(t.echo.uri))
            await stream.send(b"hi")
            await stream.send_eof()
            assert await read_all(stream) == b"hi"
            await stream.aclose()
            message_1 = tap.connections[0].units["up"][0]
        for session in list(victim._sessions.values()):
            await session.aclose()
        with anyio.fail_after(5):
            while t.server.stats()["sessions"]:
                await anyio.sleep(0.01)
        # ... and replays it later, then stays silent (it cannot do anything else).
        sock = await anyio.connect_tcp(t.host, t.port)
        async with sock:
            await sock.send(message_1)
            assert await sock.receive()  # message 2
            await anyio.sleep(0.1)
            # The node now wants to talk to the victim: that must not depend on the replay.
            with anyio.fail_after(2):
                stream = await t.server.connect(victim_service.uri)
                await stream.send(b"to the victim")
                await stream.send_eof()
                assert await read_all(stream) == b"to the victim"
                await stream.aclose()
        tg.cancel_scope.cancel()


# ------------------------------------------------------------------ odd records


def _plain_record(raw: RawDialer, plaintext: bytes) -> bytes:
    return raw.cipher.encrypt_record(plaintext)


BAD_RECORDS: dict[str, tuple[Callable[[RawDialer, Target], bytes], int | None]] = {
    "zero-length": (lambda r, t: b"\x00\x00", ErrorCode.PROTOCOL_ERROR),
    "shorter-than-a-tag": (lambda r, t: record(os.urandom(5)), ErrorCode.PROTOCOL_ERROR),
    "max-size-garbage": (lambda r, t: record(os.urandom(65535)), ErrorCode.PROTOCOL_ERROR),
    "empty-plaintext": (lambda r, t: _plain_record(r, b""), ErrorCode.PROTOCOL_ERROR),
    "oversized-token": (
        lambda r, t: r.seal(Open(1, b"\x01" + bytes(4096))),
        ErrorCode.PROTOCOL_ERROR,
    ),
    "frame-past-record": (
        lambda r, t: _plain_record(r, b"\x04\x00\x00\x00\x01\xff\xff" + b"x"),
        ErrorCode.PROTOCOL_ERROR,
    ),
    "unknown-frame-type": (
        lambda r, t: _plain_record(r, b"\x63\x00\x00\x00\x00\x00\x00"),
        ErrorCode.PROTOCOL_ERROR,
    ),
    "data-on-unopened-stream": (lambda r, t: r.seal(Data(7, b"x")), ErrorCode.PROTOCOL_ERROR),
    "eof-on-unopened-stream": (lambda r, t: r.seal(Eof(9)), ErrorCode.PROTOCOL_ERROR),
    "open-with-wrong-parity": (
        lambda r, t: r.seal(Open(2, t.plain.uri.token.encode())),
        ErrorCode.PROTOCOL_ERROR,
    ),
}


@pytest.mark.parametrize("variant", list(BAD_RECORDS))
async def test_bad_records_close_only_that_session(variant: str) -> None:
    make, code = BAD_RECORDS[variant]
    async with target() as t:
        raw = await RawDialer.connect(t.host, t.port, t.server.id)
        async with raw:
            await raw.send(raw.seal(Ping(b"12345678")))  # the dialer speaks first
            await raw.read_frames(5, until=lambda fs: any(type(f).__name__ == "Pong" for f in fs))
            await raw.send(make(raw, t))
            await raw.read_frames(5)
            assert raw.closed, "the node kept a session that sent a bad record"
            assert raw.error is None, "the node's own records failed to decrypt"
            assert code in goaway_codes(raw.frames)
        await t.still_serves()


async def test_data_beyond_the_window_is_a_flow_control_error() -> None:
    async with target() as t, open_raw_stream(t) as (raw, accepted):
        chunk = bytes(60000)
        window = capsock.MuxConfig().stream_window  # granted after ACCEPT; the app never reads
        for _ in range(window // len(chunk) + 2):
            await raw.send(raw.seal(Data(1, chunk)))
        await raw.read_frames(5)
        assert raw.closed
        assert ErrorCode.FLOW_CONTROL_ERROR in goaway_codes(raw.frames)
        got, exc = await read_until_error(accepted)
        assert len(got) <= window and set(got) <= {0}
        assert isinstance(exc, capsock.ConnectionLost)
        await t.still_serves()


async def test_data_beyond_the_session_window_across_streams_is_a_flow_control_error() -> None:
    """Five streams, each within its own window, together past the session's."""
    mux = capsock.MuxConfig(
        stream_window=capsock.core.mux.INITIAL_STREAM_WINDOW,
        session_window=capsock.core.mux.INITIAL_SESSION_WINDOW,
    )
    config = NodeConfig(
        handshake_timeout=2.0, connect_timeout=5.0, session=capsock.SessionConfig(mux=mux)
    )
    per_stream = mux.session_window // 4
    assert per_stream <= mux.stream_window
    async with target(config) as t:
        raw = await RawDialer.connect(t.host, t.port, t.server.id)
        async with raw:
            token = t.plain.uri.token.encode()
            sids = [1, 3, 5, 7, 9]
            await raw.send(raw.seal(*[Open(sid, token) for sid in sids]))
            await raw.read_frames(
                5, until=lambda fs: sum(type(f).__name__ == "Accept" for f in fs) == len(sids)
            )
            accepted = [await t.plain.accept() for _ in sids]  # the app never reads them
            chunk = bytes(per_stream // 8)
            for sid in sids[:4]:  # exactly the session window, each stream within its own
                for _ in range(8):
                    await raw.send(raw.seal(Data(sid, chunk)))
            await raw.send(raw.seal(Ping(b"in time!")))
            await raw.read_frames(5, until=lambda fs: any(type(f).__name__ == "Pong" for f in fs))
            assert not raw.closed and goaway_codes(raw.frames) == []
            await raw.send(raw.seal(Data(sids[4], b"x")))  # one byte on a fresh stream
            await raw.read_frames(5)
            assert raw.closed
            assert ErrorCode.FLOW_CONTROL_ERROR in goaway_codes(raw.frames)
            for stream in accepted:
                got, exc = await read_until_error(stream)
                assert len(got) <= per_stream and isinstance(exc, capsock.ConnectionLost)
                await stream.aclose()
        await t.still_serves()


# ------------------------------------------------------------------ capabilities


async def test_every_bad_capability_is_refused_identically(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="capsock")
    now = [1_800_000_000.0]
    async with (
        target(clock=lambda: now[0]) as t,
        capsock.Node(config=CONFIG) as other,
    ):
        root = t.plain.uri
        tok = root.token
        timed = root.attenuate(ttl=60, now=now[0])
        (exp,) = timed.token.caveats
        assert isinstance(exp, Expires)
        bad: dict[str, Capability] = {
            "forged": Capability(t.server.id, Token(tok.root_id, (), os.urandom(32)), root.hints),
            "altered": Capability(
                t.server.id,
                Token(tok.root_id, (Expires(exp.at + 3600),), timed.token.tag),
                root.hints,
            ),
            "caveat-removed": Capability(
                t.server.id, Token(tok.root_id, (), timed.token.tag), root.hints
            ),
            "unknown-root": Capability(
                t.server.id, Token(os.urandom(16), (), os.urandom(32)), root.hints
            ),
            "expired": root.attenuate(ttl=10, now=now[0]),
            "used-up": root.attenuate(uses=1),
            "revoked": root.attenuate(label="to revoke"),
            "wrong-peer": root.attenuate(peer=other.id),
            "unknown-caveat": root.attenuate(UnknownCaveat(200, b"new")),
        }
        first = await t.client.connect(bad["used-up"])  # the one use
        await (await t.plain.accept()).aclose()
        await first.aclose()
        await t.server.revoke(bad["revoked"])
        closed = await t.server.listen()
        await closed.aclose()
        bad["listener-closed"] = closed.uri
        now[0] += 30  # "expired" is now past, the others are not

        errors: dict[str, capsock.CapabilityRejected] = {}
        for name, cap in bad.items():
            with pytest.raises(capsock.CapabilityRejected) as info:
                await t.client.connect(cap)
            errors[name] = info.value
        # A token that does not even decode, sent on the client's session.
        session = t.client._sessions[t.server.id]
        with pytest.raises(capsock.CapabilityRejected) as info:
            await session.open_stream(b"\x01" + os.urandom(40))
        errors["malformed"] = info.value

        shapes = {(type(e), e.code, str(e)) for e in errors.values()}
        assert len(shapes) == 1, shapes
        ((kind, code, _),) = shapes
        assert kind is capsock.CapabilityRejected or issubclass(kind, capsock.CapabilityRejected)
        assert code == ErrorCode.REFUSED
        # The reasons are in the endpoint's own log only.
        for reason in ("bad tag", "unknown root", "expired", "used up", "revoked",
                       "bound to another peer", "unknown caveat",
                       "malformed token"):  # fmt: skip
            assert reason in caplog.text, reason
        # The genuine capability still works on the same session.
        stream = await t.client.connect(root)
        await (await t.plain.accept()).aclose()
        await stream.aclose()
        assert t.server.stats()["inbound_connections"] == 1


# ------------------------------------------------------------------ secrets


def _spellings(secret: bytes) -> list[str]:
    b64 = base64.urlsafe_b64encode(secret).rstrip(b"=").decode()
    std = base64.b64encode(secret).decode()
    return [secret.hex(), secret.hex().upper(), b64, std.rstrip("="), repr(secret)[2:-1]]


def _root_key(node: capsock.Node, listener: capsock.Listener) -> bytes:
    entry = node._store.get_root(listener.uri.root_id)
    assert entry is not None
    return entry.root_key


def _exception_text(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc)) + repr(exc) + str(exc)


async def test_no_secret_in_logs_reprs_or_exceptions(
    caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    caplog.set_level(logging.DEBUG, logger="capsock")
    texts: list[str] = []
    errors: list[BaseException] = []

    async def expect_error(coro: object, kind: type[BaseException], *, exact: bool = True) -> None:
        with pytest.raises(kind) as info:
            await coro  # type: ignore[misc]
        assert not exact or type(info.value) is kind, f"{type(info.value).__name__}: {info.value}"
        errors.append(info.value)

    async with (
        capsock.Node(tmp_path / "server", listen=["tcp:127.0.0.1:0"], config=CONFIG) as server,
        capsock.Node(listen=["tcp:127.0.0.1:0"], config=CONFIG) as intro,
        capsock.Node(config=CONFIG) as client,
        capsock.Node(config=CONFIG) as hidden,
        capsock.Node(listen=["tcp:127.0.0.1:0"], config=CONFIG) as relay,
        anyio.create_task_group() as tg,
    ):
        sturdy = await server.listen(name="files")
        temp = await server.mint(ttl=60, uses=3, label="tmp")
        tg.start_soon(sturdy.serve, echo)
        tg.start_soon(temp.serve, echo)
        root_keys = {"sturdy": _root_key(server, sturdy), "temp": _root_key(server, temp)}
        caps = [sturdy.uri, temp.uri]
        # ordinary traffic
        for cap in caps:
            stream = await client.connect(str(cap))
            await stream.send(b"payload")
            await stream.send_eof()
            assert await read_all(stream) == b"payload"
            texts += [repr(stream), repr(stream.extra(capsock.CapsockAttribute.capability))]
            await stream.aclose()
        # attenuation, revocation, refusals
        weaker = sturdy.uri.attenuate(ttl=30, uses=1, peer=client.id)
        caps.append(weaker)
        await server.revoke(weaker)
        await expect_error(client.connect(weaker), capsock.CapabilityRejected)
        forged = Capability(server.id, Token(sturdy.uri.root_id, (), os.urandom(32)))
        caps.append(forged.with_hints(sturdy.uri.hints))
        await expect_error(client.connect(caps[-1]), capsock.CapabilityRejected)
        # wrong key, unreachable, malformed URIs that contain a real token
        impostor = Capability(KeyPair.generate().node_id, sturdy.uri.token, sturdy.uri.hints)
        await expect_error(client.connect(impostor), capsock.PeerAuthenticationError)
        nowhere = Capability(
            KeyPair.generate().node_id, sturdy.uri.token, (TcpHint("127.0.0.1", 1),)
        )
        await expect_error(client.connect(nowhere), capsock.Unreachable)
        for junk in ("&tcp=nowhere", "&x=1", " ", "#frag", "&unix=relative"):
            await expect_error(client.connect(str(sturdy.uri) + junk), capsock.InvalidCapability)
        await expect_error(
            client.connect(str(sturdy.uri).replace("capsock", "CAPSOCK")), capsock.InvalidCapability
        )
        # an introduction: a forwarded session through a third node
        service = await hidden.listen()
        tg.start_soon(service.serve, echo)
        root_keys["service"] = _root_key(hidden, service)
        caps.append(service.uri)
        inbox = await intro.listen()
        caps.append(inbox.uri)
        root_keys["inbox"] = _root_key(intro, inbox)
        to_intro = await hidden.connect(inbox.uri)
        await capsock.send_capability(to_intro, service.uri)
        from_hidden = await inbox.accept()
        got = await capsock.receive_capability(from_hidden)
        hello = await client.connect(inbox.uri)
        await inbox.accept()
        introduced = await intro.introduce(got, to=client.id, ttl=60)
        caps.append(introduced)
        via = await client.connect(introduced)
        await via.send(b"through")
        await via.send_eof()
        assert await read_all(via) == b"through"
        texts += [repr(via), repr(introduced), introduced.redacted()]
        # a real relay: a node registered with it, reached through it, and a
        # node whose relay capability was revoked (its relay_status says why)
        forwarding = await relay.forwarding()
        root_keys["relay"] = _root_key(relay, forwarding)
        relay_cap = forwarding.uri.attenuate(label="for behind")
        dead_relay_cap = forwarding.uri.attenuate(label="revoked")
        caps += [forwarding.uri, relay_cap, dead_relay_cap]
        await relay.revoke(dead_relay_cap)
        async with (
            capsock.Node(relays=[relay_cap], config=CONFIG) as behind,
            capsock.Node(relays=[dead_relay_cap], config=CONFIG) as refused,
        ):
            relay_nodes = {"behind": behind, "refused": refused}
            behind_service = await behind.listen()
            tg.start_soon(behind_service.serve, echo)
            root_keys["behind_service"] = _root_key(behind, behind_service)
            caps.append(behind_service.uri)
            with anyio.fail_after(20):
                while list(behind.relay_status.values()) != ["registered"] or not any(
                    v.startswith("refused") for v in refused.relay_status.values()
                ):
                    await anyio.sleep(0.02)
            relayed = await client.connect(behind_service.uri)
            await relayed.send(b"relayed")
            await relayed.send_eof()
            assert await read_all(relayed) == b"relayed"
            texts += [repr(relayed), repr(behind_service.uri), behind_service.uri.redacted()]
            for node in (relay, behind, refused):
                texts += [repr(node), repr(node.relay_status), repr(node.stats())]
            await relayed.aclose()
        # a lost session with streams open
        lost = await client.connect(sturdy.uri)
        await server.aclose()
        await expect_error(lost.receive(), capsock.ConnectionLost, exact=False)  # a subclass
        for obj in (server, intro, client, hidden, sturdy, temp, inbox, service, lost, hello,
                    to_intro, from_hidden, server._key, client._key, server.stats(),
                    client.stats(), intro.stats(), intro.relay_status):  # fmt: skip
            texts.append(repr(obj))
        for session in [*client._sessions.values(), *intro._sessions.values()]:
            engine = session._engine
            texts += [repr(session), repr(engine), repr(engine._cipher), repr(engine._reader)]
        for cap in caps:
            texts += [repr(cap), repr(cap.token), cap.redacted()]
        for obj in (via, hello, to_intro, from_hidden, lost):
            await obj.aclose()
        tg.cancel_scope.cancel()

    assert len(errors) == 11
    texts += [_exception_text(e) for e in errors]
    texts += [r.getMessage() for r in caplog.records]
    texts.append(caplog.text)
    haystack = "\n".join(texts)
    assert "<redacted>" in haystack  # the reprs were collected
    assert "'registered'" in haystack and "'refused: " in haystack  # relay_status, both kinds

    secrets: dict[str, bytes] = {}
    for i, cap in enumerate(caps):
        secrets[f"cap{i}.token"] = cap.token.encode()
        secrets[f"cap{i}.tag"] = cap.token.tag
    for name, node in (
        ("server", server),
        ("intro", intro),
        ("client", client),
        ("hidden", hidden),
        ("relay", relay),
        *relay_nodes.items(),
    ):
        secrets[f"{name}.seed"] = node._key.seed
        secrets[f"{name}.x25519"] = node._key.x25519_private
    for label, root_key in root_keys.items():
        secrets[f"{label}.root_key"] = root_key
    for cap in caps:  # the token text exactly as it appears in a URI
        token_text = str(cap).split("/")[3].split("?")[0]
        secrets[f"text:{token_text[:6]}"] = token_text.encode()

    def leaks(text: str) -> list[tuple[str, str]]:
        return [
            (name, spelling)
            for name, secret in secrets.items()
            for spelling in ([secret.decode()] if name.startswith("text:") else _spellings(secret))
            if spelling in text
        ]

    # the search itself works: a URI, a key in hex or in a repr would be found
    assert leaks(str(caps[0])) and leaks(repr(root_keys["temp"])) and leaks(server._key.seed.hex())
    assert leaks(haystack) == []


# ------------------------------------------------------------------ the fuzz harnesses


FUZZ = Path(__file__).resolve().parents[1] / "fuzz"


def _harness(name: str) -> Callable[[bytes], None]:
    import importlib
    import sys

    if str(FUZZ) not in sys.path:
        sys.path.insert(0, str(FUZZ))
    module = importlib.import_module(f"fuzz_{name}")
    for seed in module.seeds():
        module.TestOneInput(seed)
    return module.TestOneInput  # type: ignore[no-any-return]


@pytest.mark.parametrize("name", ["uri", "token", "frames", "mux", "handshake"])
def test_fuzz_harness_invariants_hold_on_random_input(name: str) -> None:
    """The atheris harnesses' invariant (only capsock's typed errors escape),
    bounded, in the default suite: their seeds, then Hypothesis-generated input."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    test_one_input = _harness(name)

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.binary(max_size=600))
    def run(data: bytes) -> None:
        test_one_input(data)

    run()


@st.composite
def _mux_steps_that_flood(draw: st.DrawFn) -> bytes:
    """fuzz_mux inputs built step by step: a step is a raw message of PINGs or
    of OPENs (the answers of a peer that never reads pile up), or a drain.
    Random bytes (above) queue a few hundred bytes at most; these reach the
    harness's 4 KiB ``max_queued_control`` within its 64 steps."""
    ping = encode_frame(Ping(bytes(8)))
    out, sid = bytearray(b"\x00"), 1  # the harness's Mux is the listener: odd ids are the peer's
    for _ in range(draw(st.integers(24, 64))):
        kind = draw(st.sampled_from(["ping"] * 16 + ["open"] * 3 + ["drain"]))
        if kind == "drain":
            out += bytes([11])
            continue
        if kind == "ping":
            body = ping * draw(st.integers(6, 13))
        else:
            n = draw(st.integers(1, 14))
            body = b"".join(encode_frame(Open(sid + 2 * i, b"t")) for i in range(n))
            sid += 2 * n
        out += bytes([0, 0, len(body)]) + body  # op 0 (a message), raw, its length
    return bytes(out)


def test_fuzz_mux_harness_reaches_the_control_queue_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    """The mux harness's invariant on inputs that can reach ``max_queued_control``:
    queued answers never exceed it after an accepted message; past it the session
    is closed (``ResourceLimitExceeded``).  A spy checks that the bound was reached."""
    from hypothesis import HealthCheck, given, settings

    from capsock.errors import ResourceLimitExceeded

    test_one_input = _harness("mux")
    module = __import__("fuzz_mux")
    hits: list[int] = []

    class Spy(module.Mux):  # type: ignore[name-defined,misc]
        def receive_message(self, message: bytes) -> list[object]:
            try:
                return super().receive_message(message)  # type: ignore[no-any-return]
            except ResourceLimitExceeded:
                hits.append(self.stats()["queued_control"])
                raise

    monkeypatch.setattr(module, "Mux", Spy)

    @settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
    @given(_mux_steps_that_flood())
    def run(data: bytes) -> None:
        test_one_input(data)

    run()
    assert hits, "no input reached the control-queue bound"
    assert all(h > module.CONFIG.max_queued_control for h in hits)
