"""The stream lifecycle is a table (capsock.core.mux.TRANSITIONS): it is total, every
(state, received frame) pair behaves as the table says on a real Mux, and
docs/protocol.md section 6.3 states the same table."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from capsock.core import mux as mux_module
from capsock.core.frames import Accept, Data, Eof, Frame, Open, Reject, Reset, Window, encode_frame
from capsock.core.mux import (
    CreditGranted,
    DataReceived,
    EofReceived,
    Mux,
    ResetReceived,
    StreamAccepted,
    StreamRejected,
)
from capsock.errors import ErrorCode, ProtocolError

State = mux_module._State
Input = mux_module._Input
Action = mux_module._Action
TABLE = mux_module.TRANSITIONS
TOKEN = b"t" * 16
PROTOCOL_MD = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"


def _mux_in(state: State) -> tuple[Mux, int]:
    """A dialer Mux with one stream in ``state``, built only through the public API."""
    m = Mux(dialer=True)
    if state is State.NEVER_OPENED:
        return m, 1
    if state is State.PENDING:
        assert m.receive_message(encode_frame(Open(2, TOKEN)))
        return m, 2
    sid = m.open_stream(TOKEN)
    if state is State.OPENING:
        return m, sid
    m.receive_message(encode_frame(Accept(sid)))
    if state is State.EOF_SENT:
        m.send_eof(sid)
    elif state is State.EOF_RECEIVED:
        m.receive_message(encode_frame(Eof(sid)))
    elif state is State.FORGOTTEN:
        m.reset_stream(sid)
    return m, sid


def _state_of(m: Mux, sid: int) -> State:
    st = m._streams.get(sid)
    if st is not None:
        return st.state
    return State.FORGOTTEN if m._was_opened(sid) else State.NEVER_OPENED


def _frame(inp: Input, sid: int) -> Frame:
    return {
        Input.ACCEPT: Accept(sid),
        Input.REJECT: Reject(sid, int(ErrorCode.REFUSED)),
        Input.DATA: Data(sid, b"xyz"),
        Input.WINDOW: Window(sid, 1),
        Input.EOF: Eof(sid),
        Input.RESET: Reset(sid, int(ErrorCode.CANCELLED)),
    }[inp]


_EVENT = {
    Action.ACCEPTED: StreamAccepted,
    Action.REJECTED: StreamRejected,
    Action.DELIVER: DataReceived,
    Action.CREDIT: CreditGranted,
    Action.EOF: EofReceived,
    Action.RESET: ResetReceived,
}


def test_table_is_total() -> None:
    assert set(TABLE) == {(s, i) for s in State for i in Input}
    # Only live streams move; forgotten and never-opened ids stay where they are.
    for (state, _), (_, nxt) in TABLE.items():
        if state in (State.FORGOTTEN, State.NEVER_OPENED):
            assert nxt is state


def test_every_state_and_action_is_used() -> None:
    assert {nxt for _, nxt in TABLE.values()} == set(State)
    assert {action for action, _ in TABLE.values()} == set(Action)


@pytest.mark.parametrize(("state", "inp"), sorted(TABLE, key=lambda k: (k[0], k[1])))
def test_real_mux_follows_the_table(state: State, inp: Input) -> None:
    action, nxt = TABLE[state, inp]
    m, sid = _mux_in(state)
    assert _state_of(m, sid) is state
    message = encode_frame(_frame(inp, sid))
    if action is Action.ERROR:
        with pytest.raises(ProtocolError):
            m.receive_message(message)
        return
    events = m.receive_message(message)
    assert _state_of(m, sid) is nxt
    if action in _EVENT:
        assert [type(e) for e in events] == [_EVENT[action]]
        assert all(e.stream_id == sid for e in events)  # type: ignore[union-attr]
    else:
        assert events == []
    if action is Action.DISCARD:
        # The discarded bytes' session credit is owed back (batched), never lost.
        assert m.stats()["recv_unacked"] == 3


# ------------------------------------------------------------ the doc's table


def _doc_cell(inp: Input, state: State, action: Action, nxt: State) -> str:
    """How section 6.3 words a cell of the table."""
    if action is Action.ERROR:
        return "error"
    if action is Action.IGNORE:
        return "ignored"
    if action is Action.DELIVER:
        return "delivered (window rules, 6.4)"
    if action is Action.DISCARD:
        return "discarded, but counted against the session window and returned at once (6.4)"
    if action is Action.CREDIT:
        return "credit added"
    if nxt is State.FORGOTTEN:
        return "forgotten"
    return f"becomes {nxt.label}"


def _doc_table() -> dict[tuple[str, str], str]:
    text = PROTOCOL_MD.read_text(encoding="utf-8")
    section = text[text.index("### 6.3 ") : text.index("### 6.4 ")]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    header = [c.strip() for c in rows[0].strip("|").split("|")]
    assert header[0] == "received"
    cells: dict[tuple[str, str], str] = {}
    for line in rows[2:]:
        parts = [c.strip() for c in line.strip("|").split("|")]
        frame = re.fullmatch(r"`(\w+)`", parts[0])
        assert frame is not None, line
        for column, cell in zip(header[1:], parts[1:], strict=True):
            cells[frame.group(1), column] = cell
    return cells


def test_protocol_md_states_the_same_table() -> None:
    from_code = {
        (inp.name, state.label): _doc_cell(inp, state, *TABLE[state, inp])
        for state in State
        for inp in Input
    }
    assert _doc_table() == from_code
