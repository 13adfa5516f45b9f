"""Every byte counted against the session window comes back exactly once
(issue 14, item 4).

A stream reset with unread data (``Stream.reset()``, ``Node.revoke()``, a
forwarder's refusal) used to drop its buffer without acknowledging it: after
about four such resets the session window was 0 and every later stream of
that peer hung, while PING/PONG kept the session alive.  Discarding is now the
mux's business: it knows how many bytes of each stream the application holds.

The property test drives two muxes (sans-IO) the way the session and its
streams do and checks the receiver's books after every step:
``receive window + unacknowledged + what the application holds`` is the
session window exactly (nothing lost, nothing returned twice), and the
sender's credit never exceeds the window.  The integration tests run real
nodes on loopback.
"""

from __future__ import annotations

import contextlib

import anyio
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import capsock
from capsock.core.mux import (
    INITIAL_SESSION_WINDOW,
    INITIAL_STREAM_WINDOW,
    DataReceived,
    EofReceived,
    Event,
    Mux,
    MuxConfig,
    OpenRequested,
    ResetReceived,
)
from capsock.errors import ErrorCode, LocalUsageError
from capsock.net.session import SessionConfig
from capsock.node import NodeConfig

SESSION_WINDOW = 2 * INITIAL_SESSION_WINDOW  # the receiver grants 1 MiB extra at start
STREAM_WINDOW = INITIAL_STREAM_WINDOW
CONFIG = MuxConfig(stream_window=STREAM_WINDOW, session_window=SESSION_WINDOW)


class _App:
    """What the receiving application holds of one stream."""

    def __init__(self) -> None:
        self.buffer = 0  # delivered, not read
        self.eof = False
        self.reset = False
        self.closed = False


class CreditBooks(RuleBasedStateMachine):
    """A (dialer) sends on streams it opens; B's application reads some of
    it, resets, half-closes and closes streams with data unread; A resets and
    half-closes too.  Frames move only when pumped, so DATA is often in flight
    when its stream is reset."""

    def __init__(self) -> None:
        super().__init__()
        self.a = Mux(dialer=True, config=CONFIG)
        self.b = Mux(dialer=False, config=CONFIG)
        self.apps: dict[int, _App] = {}  # B's view, by stream id
        self.sids: list[int] = []  # streams A opened

    # -------------------------------------------------------------- plumbing

    def _to_b(self) -> None:
        while (message := self.a.data_to_send()) is not None:
            self._on_b(self.b.receive_message(message))

    def _to_a(self) -> None:
        while (message := self.b.data_to_send()) is not None:
            self.a.receive_message(message)
            self._check_sender()

    def _on_b(self, events: list[Event]) -> None:
        for e in events:
            if isinstance(e, OpenRequested):
                if self.b.is_open(e.stream_id):  # Session.accept: not reset meanwhile
                    self.b.accept_stream(e.stream_id)
                    self.apps[e.stream_id] = _App()
            elif isinstance(e, DataReceived):
                app = self.apps[e.stream_id]
                if app.closed:  # what Stream._on_data does for a closed stream
                    self.b.acknowledge_received_data(e.stream_id, len(e.data))
                else:
                    app.buffer += len(e.data)
            elif isinstance(e, EofReceived):
                self.apps[e.stream_id].eof = True
            elif isinstance(e, ResetReceived) and e.stream_id in self.apps:
                self.apps[e.stream_id].reset = True

    def _check_sender(self) -> None:
        assert self.a.stats()["send_session_credit"] <= SESSION_WINDOW

    def _app(self, which: int) -> tuple[int, _App] | None:
        live = [(s, a) for s, a in self.apps.items() if not a.closed]
        return live[which % len(live)] if live else None

    # -------------------------------------------------------------- rules: A

    @initialize(sizes=st.lists(st.integers(1, STREAM_WINDOW), min_size=1, max_size=6))
    def some_streams_with_data(self, sizes: list[int]) -> None:
        """Start where the bugs live: open streams with data buffered at B."""
        for n in sizes:
            self.open(answered=True)
            self.a.send_data(self.sids[-1], bytes(n))
        self._to_b()

    @precondition(lambda self: len(self.sids) < 24)
    @rule(answered=st.booleans())
    def open(self, answered: bool) -> None:
        """A opens a stream; mostly B's ACCEPT (and credit) come back at once."""
        self.sids.append(self.a.open_stream(b"t"))
        if answered:
            self._to_b()
            self._to_a()

    @precondition(lambda self: self.sids)
    @rule(which=st.integers(0, 63), n=st.integers(1, 300_000), deliver=st.booleans())
    def send(self, which: int, n: int, deliver: bool) -> None:
        """A sends; delivered at once, or left in flight for a later pump."""
        sids = [s for s in self.sids if self.a.send_credit(s)]
        if sids:
            self.a.send_data(sids[which % len(sids)], bytes(n))
        if deliver:
            self._to_b()

    @precondition(lambda self: self.sids)
    @rule(which=st.integers(0, 63))
    def a_reset(self, which: int) -> None:
        self.a.reset_stream(self.sids[which % len(self.sids)])

    @precondition(lambda self: self.sids)
    @rule(which=st.integers(0, 63))
    def a_eof(self, which: int) -> None:
        with contextlib.suppress(LocalUsageError):  # not open, or sent already
            self.a.send_eof(self.sids[which % len(self.sids)])

    @rule()
    def pump_to_b(self) -> None:
        self._to_b()

    @rule()
    def pump_to_a(self) -> None:
        self._to_a()

    # -------------------------------------------------------------- rules: B's application

    @rule(which=st.integers(0, 63), n=st.integers(1, 300_000))
    def consume(self, which: int, n: int) -> None:
        """Stream.receive(): read some, acknowledge what was read."""
        picked = self._app(which)
        if picked is None or not picked[1].buffer:
            return
        sid, app = picked
        n = min(n, app.buffer)
        app.buffer -= n
        self.b.acknowledge_received_data(sid, n)

    @rule(which=st.integers(0, 63), extra=st.integers(1, 100_000))
    def over_acknowledge(self, which: int, extra: int) -> None:
        """A confused caller acknowledges everything, and more: no extra credit."""
        picked = self._app(which)
        if picked is None:
            return
        sid, app = picked
        amount, app.buffer = app.buffer + extra, 0
        self.b.acknowledge_received_data(sid, amount)

    @rule(which=st.integers(0, 63))
    def reset(self, which: int) -> None:
        """Stream.reset() / revoke / a refusal: the buffer is dropped unread."""
        picked = self._app(which)
        if picked is None or picked[1].reset:  # Stream._abort: already broken
            return
        sid, app = picked
        app.buffer, app.reset, app.closed = 0, True, True
        self.b.reset_stream(sid, ErrorCode.REFUSED)

    @rule(which=st.integers(0, 63))
    def b_eof(self, which: int) -> None:
        picked = self._app(which)
        if picked is None:
            return
        with contextlib.suppress(LocalUsageError):
            self.b.send_eof(picked[0])

    @rule(which=st.integers(0, 63))
    def aclose(self, which: int) -> None:
        """Stream.aclose() with data unread: Session.close_stream's calls."""
        picked = self._app(which)
        if picked is None:
            return
        sid, app = picked
        app.buffer, app.closed = 0, True
        self.b.discard_received(sid)
        if self.b.is_open(sid):
            with contextlib.suppress(LocalUsageError):
                self.b.send_eof(sid)
            if not app.eof and not app.reset:
                self.b.reset_stream(sid, ErrorCode.CANCELLED)

    # -------------------------------------------------------------- the books

    @invariant()
    def receiver_books_balance(self) -> None:
        stats = self.b.stats()
        held = sum(a.buffer for a in self.apps.values())
        assert stats["recv_session_window"] + stats["recv_unacked"] + held == SESSION_WINDOW
        assert held == sum(self.b.held(sid) for sid in self.apps)
        self._check_sender()

    def teardown(self) -> None:
        # The application reads or closes everything; then the sender has its
        # whole window back, less at most the batched unacknowledged rest.
        for _ in range(2):
            self._to_b()
            for sid, app in self.apps.items():
                if app.buffer:
                    self.b.acknowledge_received_data(sid, app.buffer)
                    app.buffer = 0
            self._to_a()
        stats = self.b.stats()
        assert stats["recv_session_window"] + stats["recv_unacked"] == SESSION_WINDOW
        assert stats["recv_unacked"] < SESSION_WINDOW // 2  # the rest was granted
        credit = self.a.stats()["send_session_credit"] + self.a.stats()["queued_data"]
        assert credit == stats["recv_session_window"]
        assert self.b._orphans in (None, {})


TestCreditBooks = CreditBooks.TestCase
TestCreditBooks.settings = settings(max_examples=150, stateful_step_count=50, deadline=None)


def test_four_resets_with_unread_data_used_to_empty_the_session_window() -> None:
    """The issue's scenario, deterministic: more than the session window in
    total, over streams the receiver resets with their data unread."""
    a, b = Mux(dialer=True, config=CONFIG), Mux(dialer=False, config=CONFIG)
    for _ in range(3 * SESSION_WINDOW // STREAM_WINDOW):
        sid = a.open_stream(b"t")
        for ev in b.receive_message(a.data_to_send() or b""):
            if isinstance(ev, OpenRequested):
                b.accept_stream(ev.stream_id)
        while (m := b.data_to_send()) is not None:
            a.receive_message(m)
        assert a.send_data(sid, bytes(STREAM_WINDOW)) == STREAM_WINDOW
        while (m := a.data_to_send()) is not None:
            b.receive_message(m)
        b.reset_stream(sid, ErrorCode.REFUSED)  # nothing was read
        while (m := b.data_to_send()) is not None:
            a.receive_message(m)
    assert a.stats()["send_session_credit"] >= SESSION_WINDOW // 2


def test_credit_for_a_forgotten_stream_is_acknowledged_once() -> None:
    """The peer reset the stream while the application held its bytes: reading
    them returns their credit; a second acknowledgement, or a later reset or
    close, returns nothing more."""
    a, b = Mux(dialer=True, config=CONFIG), Mux(dialer=False, config=CONFIG)
    sid = a.open_stream(b"t")
    b.receive_message(a.data_to_send() or b"")
    b.accept_stream(sid)
    a.receive_message(b.data_to_send() or b"")
    a.send_data(sid, bytes(1000))
    a.reset_stream(sid)
    events = b.receive_message(a.data_to_send() or b"")
    assert ResetReceived(sid, ErrorCode.CANCELLED) in events
    assert b.held(sid) == 1000 and not b.is_open(sid)
    b.acknowledge_received_data(sid, 600)
    b.acknowledge_received_data(sid, 600)
    b.reset_stream(sid)
    b.discard_received(sid)
    assert b.stats()["recv_unacked"] == 1000
    assert b.held(sid) == 0


# ---------------------------------------------------------------- real nodes

SMALL = NodeConfig(
    session=SessionConfig(
        mux=MuxConfig(stream_window=STREAM_WINDOW, session_window=INITIAL_SESSION_WINDOW)
    )
)


async def _wait_buffered(stream: capsock.Stream, amount: int) -> None:
    with anyio.fail_after(10):
        while stream.buffered < amount:
            await anyio.sleep(0.005)


@pytest.mark.anyio
@pytest.mark.parametrize("how", ["reset", "revoke", "aclose", "reset-after-peer-eof"])
async def test_streams_discarded_with_unread_data_do_not_starve_the_session(how: str) -> None:
    """The client sends 3 session windows in total over streams that the server
    drops with their data unread; a new stream on the same session still
    carries data both ways."""
    async with (
        capsock.Node(listen=["tcp:127.0.0.1:0"], config=SMALL) as server,
        capsock.Node(config=SMALL) as client,
    ):
        listener = await server.listen()
        for i in range(3 * INITIAL_SESSION_WINDOW // STREAM_WINDOW):
            # Revoking needs a capability of its own per stream (uses differ).
            cap = listener.uri.attenuate(uses=100 + i) if how == "revoke" else listener.uri
            with anyio.fail_after(10):
                stream = await client.connect(cap)
                await stream.send(bytes(STREAM_WINDOW))
                if how == "reset-after-peer-eof":
                    await stream.send_eof()
                accepted = await listener.accept()
            await _wait_buffered(accepted, STREAM_WINDOW)
            if how == "reset" or how == "reset-after-peer-eof":
                if how == "reset-after-peer-eof":
                    await accepted.send_eof()  # both ways: the mux forgets it
                    with anyio.fail_after(10):
                        while not accepted._eof:
                            await anyio.sleep(0.005)
                accepted.reset()
            elif how == "revoke":
                await server.revoke(cap)
            else:
                await accepted.aclose()
            await stream.aclose()
            await accepted.aclose()
        with anyio.fail_after(10):
            stream = await client.connect(listener.uri)
            accepted = await listener.accept()
            async with anyio.create_task_group() as tg:
                tg.start_soon(stream.send, bytes(2 * INITIAL_SESSION_WINDOW))
                got = 0
                while got < 2 * INITIAL_SESSION_WINDOW:
                    got += len(await accepted.receive())
            await accepted.send(b"done")
            assert await stream.receive() == b"done"
        (session,) = server._sessions.values()
        assert session.stats()["recv_session_window"] + session.stats()["recv_unacked"] == (
            INITIAL_SESSION_WINDOW
        )
        await stream.aclose()
        await accepted.aclose()
