"""The decisions of issue 19, tested where possible at the byte level.

Each test names the section of docs/protocol.md (or docs/capabilities.md) that
states the rule.  The wire side is ``tests/spec_client.py``, which knows only
the spec; a real ``capsock.Node`` runs in the test's event loop and the
blocking client in a worker thread.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import socket
import struct
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

import capsock
import capsock.testing
from capsock.core.frames import GoAway, encode_frame
from capsock.core.mux import Mux
from capsock.core.noise import AESGCM, available_ciphers
from capsock.keys import KeyPair
from capsock.node.forwarding import UNREACHABLE_REASON
from capsock.store import authorize
from capsock.uri import Capability, CaveatKind, TcpHint, To, UnixHint, mint_root

sys.path.insert(0, str(Path(__file__).parent))
import spec_client as sc

pytestmark = pytest.mark.anyio

DOCS = Path(__file__).resolve().parents[1] / "docs"
Frame = tuple[int, int, bytes]
REFUSED, BUSY, TIMEOUT, PROTOCOL_ERROR = 4, 6, 9, 1


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


# --- the blocking side ----------------------------------------------------------------


class Client:
    """A spec-client session, driven frame by frame."""

    def __init__(
        self, uri: str, *, offer: bytes = b"", extensions: bytes = b"", timeout: float = 20
    ) -> None:
        cap = sc.parse_capability(uri)
        self.token = cap.token
        self.sock = socket.create_connection(cap.tcp[0], timeout=timeout)
        self.s = sc.Session(self.sock, time.monotonic() + timeout)
        self.s.handshake(cap.node_id, offer=offer, extensions=extensions)
        self.pending: list[Frame] = []  # read, not yet looked at by until()

    def send(self, *frames: Frame) -> None:
        self.s.send_frames(*frames)

    def until(self, done: Callable[[Frame], bool], limit: int = 10_000) -> list[Frame]:
        """Read frames (answering PINGs) until ``done`` holds for one; return them all."""
        seen: list[Frame] = []
        for _ in range(limit):
            if not self.pending:
                self.pending = self.s.read_frames()
            while self.pending:
                frame = self.pending.pop(0)
                seen.append(frame)
                if frame[0] == sc.PING:
                    self.send((sc.PONG, 0, frame[2]))
                if done(frame):
                    return seen
        raise AssertionError(f"condition not met in {limit} messages: {seen[-5:]}")

    def ping(self, opaque: bytes = b"12345678") -> None:
        """A PING answered by its PONG: the session is alive and read everything before."""
        self.send((sc.PING, 0, opaque))
        self.until(lambda f: f[0] == sc.PONG and f[2] == opaque)

    def open(self, sid: int, token: bytes | None = None) -> Frame:
        self.send((sc.OPEN, sid, self.token if token is None else token))
        return self.until(lambda f: f[1] == sid and f[0] in (sc.ACCEPT, sc.REJECT))[-1]

    def close(self) -> None:
        self.sock.close()


def is_frame(kind: int, sid: int) -> Callable[[Frame], bool]:
    return lambda f: f[0] == kind and f[1] == sid


async def in_thread(fn: Callable[[], Any]) -> Any:
    return await anyio.to_thread.run_sync(fn)


@asynccontextmanager
async def echo_node(
    config: capsock.NodeConfig | None = None,
) -> AsyncIterator[tuple[capsock.Node, capsock.Listener]]:
    async with (
        capsock.Node(listen=["tcp:127.0.0.1:0"], config=config) as node,
        anyio.create_task_group() as tg,
    ):
        listener = await node.listen()
        tg.start_soon(listener.serve, capsock.testing.echo)
        yield node, listener
        tg.cancel_scope.cancel()


# --- 10.3: the forwarder answers every request it does not carry -----------------------


def forward_exchange(uri: str, request: object) -> tuple[Any, int | None, bool]:
    """One forwarding request; return (the answer, the RESET code, whether an EOF came)."""
    outcome = sc.forwarding_request(uri, request)
    assert outcome.trailing == b"", "one answer, nothing else"
    return outcome.answer, outcome.reset_code, outcome.eof


@asynccontextmanager
async def relay(
    config: capsock.NodeConfig | None = None,
) -> AsyncIterator[tuple[capsock.Node, str]]:
    async with capsock.Node(listen=["tcp:127.0.0.1:0"], config=config) as node:
        forwarding = await node.forwarding()
        yield node, str(forwarding.uri)


def some_node_id() -> bytes:
    return KeyPair(os.urandom(32)).node_id.raw


@pytest.mark.parametrize(
    ("request_value", "reason"),
    [
        ({"op": "forward"}, "malformed forwarding request"),
        ({"op": "forward", "to": "not bytes"}, "malformed forwarding request"),
        ({"op": "fly"}, "malformed forwarding request"),
        ([1, 2], "malformed forwarding request"),
    ],
)
async def test_a_malformed_request_is_answered_then_reset_refused(
    request_value: object, reason: str
) -> None:
    async with relay() as (_, uri):
        answer, code, eof = await in_thread(
            lambda: forward_exchange(uri, sc.forwarding_message(request_value))
        )
    assert answer == {"ok": False, "error": reason}
    assert code == REFUSED
    assert not eof  # never a clean end


async def test_forwarding_to_the_requester_or_the_forwarder_is_answered() -> None:
    async with relay() as (node, uri):
        to_forwarder = sc.forwarding_message({"op": "forward", "to": node.id.raw})
        results = [
            await in_thread(lambda: forward_exchange(uri, to_forwarder)),
            await in_thread(
                lambda: forward_exchange(
                    uri, lambda me: sc.forwarding_message({"op": "forward", "to": me})
                )
            ),
        ]
    for answer, code, eof in results:
        assert answer == {"ok": False, "error": "a node cannot be forwarded to itself"}
        assert code == REFUSED and not eof


async def test_no_request_in_time_is_answered_then_reset_timeout() -> None:
    async with relay(capsock.NodeConfig(handshake_timeout=1.5)) as (_, uri):
        answer, code, eof = await in_thread(lambda: forward_exchange(uri, None))
    assert answer == {"ok": False, "error": "no forwarding request in time"}
    assert code == TIMEOUT and not eof


async def test_an_unreadable_request_is_answered_then_reset_protocol_error() -> None:
    async with relay() as (_, uri):
        # A length prefix above 65536: not a message at all.
        answer, code, eof = await in_thread(lambda: forward_exchange(uri, b"hi there\n"))
    assert answer == {"ok": False, "error": "unreadable forwarding request"}
    assert code == PROTOCOL_ERROR and not eof


async def test_the_per_requester_limit_is_answered_then_reset_busy() -> None:
    async with relay() as (node, uri):
        node.config = dataclasses.replace(node.config, max_forwards_per_peer=0)
        request = sc.forwarding_message({"op": "forward", "to": some_node_id()})
        answer, code, _ = await in_thread(lambda: forward_exchange(uri, request))
    assert answer == {"ok": False, "error": "too many forwarded sessions from this node"}
    assert code == BUSY


async def test_the_to_caveat_is_checked_before_the_target_is_looked_at() -> None:
    """10.3 step order: a `to` mismatch answers before the self check (step 4 < 5)."""
    async with relay() as (node, uri):
        limited = str(Capability.parse(uri).attenuate(To(capsock.NodeId(some_node_id()))))
        request = sc.forwarding_message({"op": "forward", "to": node.id.raw})
        answer, code, _ = await in_thread(lambda: forward_exchange(limited, request))
    assert answer == {"ok": False, "error": "this forwarding capability does not reach that node"}
    assert code == REFUSED


async def test_an_unreachable_target_gets_one_generic_answer_without_addresses(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Forwarder privacy: the requester learns nothing about the target's addresses."""
    caplog.set_level(logging.INFO, logger="capsock.node.forwarding")
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    port = dead.getsockname()[1]
    dead.close()  # nothing listens there: the forwarder's dial fails at once
    target = KeyPair(os.urandom(32)).node_id
    known = Capability(
        target, mint_root(os.urandom(32), os.urandom(16)), (TcpHint("127.0.0.1", port),)
    )
    async with relay() as (node, uri):
        node._remember_route(known)  # as if the forwarder had connected to it once
        request = sc.forwarding_message({"op": "forward", "to": target.raw})
        answer, code, _ = await in_thread(lambda: forward_exchange(uri, request))
        unknown = sc.forwarding_message({"op": "forward", "to": some_node_id()})
        answer2, _, _ = await in_thread(lambda: forward_exchange(uri, unknown))
    assert answer == answer2 == {"ok": False, "error": UNREACHABLE_REASON}
    assert code == REFUSED
    assert str(port) not in str(answer)
    assert f"127.0.0.1:{port}" in caplog.text  # the details stay in the local log


async def test_a_capsock_dialer_reports_the_generic_reason_as_unreachable() -> None:
    async with relay() as (_, uri), capsock.Node() as dialer, capsock.Node() as nowhere:
        target = await nowhere.listen()
        lost = target.uri.with_hints((capsock.uri.ViaHint(Capability.parse(uri)),))
        with pytest.raises(capsock.Unreachable) as info:
            await dialer.connect(lost)
    assert UNREACHABLE_REASON in str(info.value)


# --- 3.3 / 3.5: how long the responder waits for the dialer's first message -----------


async def test_a_silent_dialer_is_dropped_after_handshake_timeout_with_nothing_sent() -> None:
    async with echo_node(capsock.NodeConfig(handshake_timeout=1.0)) as (_, listener):

        def run() -> bytes:
            c = Client(str(listener.uri))
            try:
                c.sock.settimeout(15)  # generous: the node must hang up well before
                return c.sock.recv(100)
            finally:
                c.close()

        assert await in_thread(run) == b""  # a close, and not one byte after message 2


# --- 3.4: offers with unknown or repeated ids -------------------------------------------


@pytest.mark.parametrize(
    ("offer", "chosen"),
    [
        (b"\x00\x02\x02\x01", sc.AESGCM_ID),  # 0x00 is never assigned: skipped
        (b"\x02\x02\x01\x01", sc.AESGCM_ID),  # repeats change nothing
        (b"\x01\x02\x01", sc.CHACHAPOLY_ID),  # the dialer's order wins, repeat or not
        (b"\x00", sc.CHACHAPOLY_ID),  # nothing known: empty answer, ChaChaPoly
    ],
)
async def test_cipher_offer_with_zero_and_duplicate_ids(offer: bytes, chosen: int) -> None:
    if AESGCM not in available_ciphers():
        pytest.skip("libsodium has no AES-256-GCM on this CPU")
    async with echo_node() as (_, listener):

        def run() -> tuple[int, bytes]:
            c = Client(str(listener.uri), offer=offer)
            try:
                c.ping()
                return c.s.cipher_id, c.s.message2
            finally:
                c.close()

        cipher_id, message2 = await in_thread(run)
    assert cipher_id == chosen
    # An empty answer exactly when nothing known was offered (48 = e + tag).
    assert (len(message2) == 48) == (offer == b"\x00")


# --- 4.4 step 10: a RESET before the decision does not stop it ---------------------------


async def test_a_reset_before_the_decision_spends_no_use() -> None:
    config = capsock.NodeConfig(listener_backlog=1, backlog_wait=10.0)
    async with capsock.Node(listen=["tcp:127.0.0.1:0"], config=config) as node:
        listener = await node.listen()
        once = listener.uri.attenuate(uses=1)
        client: Client = await in_thread(lambda: Client(str(listener.uri)))
        try:
            # Stream 1 fills the backlog; stream 3 (uses=1) waits for room, and
            # the client gives it up at once.
            assert (await in_thread(lambda: client.open(1)))[0] == sc.ACCEPT
            await in_thread(
                lambda: client.send(
                    (sc.OPEN, 3, once.token.encode()), (sc.RESET, 3, struct.pack(">H", 5))
                )
            )
            await in_thread(client.ping)
            first = await listener.accept()  # room: a decision would happen now
            await anyio.sleep(0.2)
            peer = capsock.NodeId(client.s.node_id)
            # The reset stream was never decided: its use is not spent, and a
            # new open with the same capability is accepted.
            assert authorize(
                node._store, once.token, peer=peer, now=time.time(), consume=False
            ).allowed
            answer = await in_thread(lambda: client.open(5, once.token.encode()))
            assert answer[0] == sc.ACCEPT
            await first.aclose()
        finally:
            client.close()


# --- 4.4 step 8: the listener backlog ----------------------------------------------------


async def test_the_backlog_holds_128_streams_then_busy() -> None:
    config = capsock.NodeConfig(backlog_wait=0.3)
    async with capsock.Node(listen=["tcp:127.0.0.1:0"], config=config) as node:
        listener = await node.listen()  # nobody calls accept()

        def run() -> tuple[int, int]:
            c = Client(str(listener.uri))
            try:
                ids = range(1, 2 * 140, 2)
                c.send(*((sc.OPEN, sid, c.token) for sid in ids))
                answered: dict[int, Frame] = {}

                def done(f: Frame) -> bool:
                    if f[0] in (sc.ACCEPT, sc.REJECT):
                        answered[f[1]] = f
                    return len(answered) == 140

                c.until(done)
                accepted = sum(f[0] == sc.ACCEPT for f in answered.values())
                busy = sum(
                    f[0] == sc.REJECT and f[2] == struct.pack(">H", BUSY) for f in answered.values()
                )
                return accepted, busy
            finally:
                c.close()

        accepted, busy = await in_thread(run)
    assert node.config.listener_backlog == 128
    assert (accepted, busy) == (128, 12)


# --- 7: what a GOAWAY receiver does ------------------------------------------------------


async def test_a_goaway_receiver_keeps_serving_existing_streams_and_the_session() -> None:
    async with echo_node() as (_, listener):

        def run() -> tuple[bytes, int]:
            c = Client(str(listener.uri))
            try:
                assert c.open(1)[0] == sc.ACCEPT
                c.send((sc.GOAWAY, 0, struct.pack(">IH", 0, 0)))
                c.ping()  # the session lives on
                c.send((sc.DATA, 1, b"after goaway"), (sc.EOF, 1, b""))
                frames = c.until(is_frame(sc.EOF, 1))
                echoed = b"".join(p for t, sid, p in frames if t == sc.DATA and sid == 1)
                # An error code does not make the receiver close either: the
                # sender closes the transport itself.
                c.send((sc.GOAWAY, 0, struct.pack(">IH", 0, PROTOCOL_ERROR)))
                c.ping()
                # capsock handles an OPEN from a GOAWAY sender normally (7: MAY).
                answer = c.open(3)
                return echoed, answer[0]
            finally:
                c.close()

        echoed, answer = await in_thread(run)
    assert echoed == b"after goaway"
    assert answer == sc.ACCEPT


def test_a_goaway_receiver_opens_no_new_stream() -> None:
    mux = Mux(dialer=True)
    mux.receive_message(encode_frame(GoAway(0, capsock.ErrorCode.NO_ERROR)))
    with pytest.raises(capsock.LocalUsageError):
        mux.open_stream(b"\x01" * 50)


# --- 5 / 6.6: CONTROL bodies and unsolicited PONGs are ignored ---------------------------


async def test_control_is_ignored_whatever_its_body_and_pong_unasked() -> None:
    async with echo_node() as (_, listener):

        def run() -> None:
            c = Client(str(listener.uri))
            try:
                c.send((sc.CONTROL, 0, b"\xc1"))  # not msgpack at all
                c.send((sc.CONTROL, 0, sc.msgpack_pack({"type": "future", "x": 1})))
                c.send((sc.PONG, 0, b"unasked!"))
                c.ping()
                assert c.open(1)[0] == sc.ACCEPT
            finally:
                c.close()

        await in_thread(run)


async def test_an_empty_control_is_a_protocol_error() -> None:
    async with echo_node() as (_, listener):

        def run() -> Frame:
            c = Client(str(listener.uri))
            try:
                c.ping()
                c.send((sc.CONTROL, 0, b""))
                return c.until(lambda f: f[0] == sc.GOAWAY)[-1]
            finally:
                c.close()

        frame = await in_thread(run)
    assert struct.unpack(">IH", frame[2])[1] == PROTOCOL_ERROR


# --- 6.4: DATA for a forgotten stream counts against the session window ------------------


async def test_data_for_a_forgotten_stream_is_returned_with_session_window() -> None:
    async with capsock.Node(listen=["tcp:127.0.0.1:0"]) as node, anyio.create_task_group() as tg:
        listener = await node.listen()

        async def reset_at_once() -> None:
            stream = await listener.accept()
            stream.reset()
            await stream.aclose()

        tg.start_soon(reset_at_once)
        half = node.config.session.mux.session_window // 2

        def run() -> tuple[int, bool]:
            c = Client(str(listener.uri))
            try:
                assert c.open(1)[0] == sc.ACCEPT
                c.until(is_frame(sc.RESET, 1))
                # DATA that was "in flight" when the node reset the stream: it
                # still counts against the session window, and comes back.
                sent, chunk = 0, b"x" * sc.MAX_DATA
                while sent < half + sc.MAX_DATA:
                    c.send((sc.DATA, 1, chunk))
                    sent += len(chunk)
                granted = 0

                def done(f: Frame) -> bool:
                    nonlocal granted
                    if f[0] == sc.WINDOW and f[1] == 0:
                        granted += struct.unpack(">I", f[2])[0]
                    assert f[0] != sc.GOAWAY, "the node treated forgotten DATA as an error"
                    return granted >= half

                c.until(done)
                return granted, True
            finally:
                c.close()

        granted, _ = await in_thread(run)
        tg.cancel_scope.cancel()
    assert granted >= half


# --- capabilities.md: `to` in the token table and in attenuate()'s order ------------------


def test_capabilities_doc_lists_every_caveat_kind() -> None:
    text = (DOCS / "capabilities.md").read_text("utf-8")
    for kind in CaveatKind:
        assert re.search(rf"^\| {kind.value} \| `{kind.name.lower()}` \|", text, re.M), kind.name


def test_attenuate_keyword_order_is_the_documented_one() -> None:
    root = Capability(
        KeyPair(os.urandom(32)).node_id, mint_root(os.urandom(32), os.urandom(16)), ()
    )
    other = KeyPair(os.urandom(32)).node_id
    cap = root.attenuate(ttl=10, uses=1, peer=other, to=other, label="l", now=0)
    order = [type(c).__name__ for c in cap.caveats]
    assert order == ["Expires", "Peer", "To", "Label", "Uses"]
    text = (DOCS / "capabilities.md").read_text("utf-8")
    assert "in the order `exp`, `peer`, `to`, `label`, `uses`" in " ".join(text.split())


# --- 4.1: the URI text rules, stated without Python-isms ---------------------------------

NODE = str(KeyPair(bytes(32)).node_id)
TOKEN = "AQARIjNEVWZ3iJmqu8zd7gAA7vxc2khdB8hS3P_kq4S0gsuVQqCEjKxRu57F_REl5LA"


def _uri(hint: str) -> str:
    return f"capsock://{NODE}/{TOKEN}?{hint}"


@pytest.mark.parametrize(
    "hint",
    [
        "tcp=[2001:db8::1:0:0:1]:1",  # RFC 5952 4.2.3: the longest run, the first on a tie
        "tcp=[2001:db8:0:1:1:1:1:1]:1",  # 4.2.2: one zero group is not shortened
        "tcp=[64:ff9b::102:304]:1",  # an embedded IPv4 address is written in hex
        "tcp=a-b.example:1",
        "tcp=1a.example:1",  # a label may start with a digit
        "unix=/tmp/a%20b~c",  # RFC 3986 unreserved characters stay as they are
    ],
)
def test_canonical_hints_parse(hint: str) -> None:
    assert str(Capability.parse(_uri(hint))) == _uri(hint)


@pytest.mark.parametrize(
    "hint",
    [
        "tcp=[2001:db8:0:0:1:0:0:1]:1",
        "tcp=[2001:DB8::1]:1",
        "tcp=[2001:db8::0:1]:1",
        "tcp=[::ffff:1.2.3.4]:1",
        "tcp=[64:ff9b::1.2.3.4]:1",
        "tcp=-a.example:1",
        "tcp=a-.example:1",
        "tcp=a_b.example:1",
        "tcp=example.123:1",
        "tcp=Example.com:1",
        "tcp=001.2.3.4:1",
        "tcp=1.2.3:1",
        "unix=/tmp/a%7eb",
        "unix=/tmp/a%2fb",
    ],
)
def test_non_canonical_hints_are_refused(hint: str) -> None:
    with pytest.raises(capsock.InvalidCapability):
        Capability.parse(_uri(hint))


def test_unix_and_via_percent_encoding_is_rfc3986_unreserved() -> None:
    path = "/tmp/A-z_0.9~ é/x"
    hint = UnixHint(path)
    cap = Capability(KeyPair(bytes(32)).node_id, mint_root(bytes(32), bytes(16)), (hint,))
    assert str(cap).endswith("unix=/tmp/A-z_0.9~%20%C3%A9/x")
    via = capsock.uri.ViaHint(cap)
    outer = Capability(KeyPair(bytes(range(32))).node_id, mint_root(bytes(32), bytes(16)), (via,))
    encoded = str(outer).split("via=", 1)[1]
    assert (
        encoded.startswith("capsock%3A%2F%2F") and "%2Ftmp%2FA-z_0.9~%2520%25C3%25A9%2Fx" in encoded
    )


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        ("plain", True),
        ("\u0378", True),  # unassigned (Cn) in Unicode 14.0: allowed
        ("\ue000", True),  # private use (Co): allowed
        ("a\u200bb", False),  # Cf
        ("a\u2028b", False),  # Zl
        ("a\u2029b", False),  # Zp
        ("a\x7fb", False),  # Cc
    ],
)
def test_label_character_classes(text: str, ok: bool) -> None:
    if ok:
        capsock.uri.Label(text)
    else:
        with pytest.raises(capsock.InvalidCapability):
            capsock.uri.Label(text)


# --- 11: what capsock/1 may add without a new prologue ------------------------------------


async def test_unknown_handshake_extensions_are_skipped() -> None:
    async with echo_node() as (_, listener):

        def run() -> int:
            unknown = b"\x07\x02\xaa\xbb\xfe\x00"  # type 7 (2 bytes), type 254 (empty)
            c = Client(str(listener.uri), offer=b"\x01", extensions=unknown)
            try:
                c.ping()
                return c.open(1)[0]
            finally:
                c.close()

        assert await in_thread(run) == sc.ACCEPT


async def test_a_token_with_an_unknown_caveat_kind_is_refused() -> None:
    async with echo_node() as (_, listener):
        newer = listener.uri.attenuate(capsock.uri.UnknownCaveat(6, b"future"))

        def run() -> Frame:
            c = Client(str(listener.uri))
            try:
                return c.open(1, newer.token.encode())
            finally:
                c.close()

        frame = await in_thread(run)
    assert frame[0] == sc.REJECT and struct.unpack(">H", frame[2])[0] == REFUSED


async def test_unknown_keys_in_a_forwarding_request_are_ignored() -> None:
    async with relay() as (_, uri):
        request = {"op": "forward", "to": some_node_id(), "future": [1, "x"]}
        answer, code, _ = await in_thread(lambda: forward_exchange(uri, request))
    # Not "malformed": the request reached the routing step.
    assert answer == {"ok": False, "error": UNREACHABLE_REASON}
    assert code == REFUSED


# --- the spec bundle stands alone ---------------------------------------------------------


@pytest.mark.parametrize("page", ["protocol.md", "capabilities.md"])
def test_the_spec_references_only_itself_and_public_specs(page: str) -> None:
    text = (DOCS / page).read_text("utf-8")
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if target.startswith(("#", "https://")):
            continue
        assert target.split("#")[0] in {"protocol.md", "capabilities.md"} or target.startswith(
            "vectors/"
        ), f"{page} links to {target}"
    for outside in ("DESIGN.md", "security.md", "relay.md", "tests/", "scripts/", "src/"):
        assert outside not in text, f"{page} refers to {outside}, which an implementer lacks"
