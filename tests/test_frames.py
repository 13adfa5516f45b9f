"""Frame codec: golden encodings, round trips, and garbage that only raises ProtocolError."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from capsock.core.frames import (
    Accept,
    Control,
    Data,
    Eof,
    GoAway,
    Open,
    Ping,
    Pong,
    Reject,
    Reset,
    Window,
    decode_frames,
    encode_frame,
)
from capsock.errors import ProtocolError

GOLDEN = [
    (Open(1, b"tok"), "01000000010003746f6b"),
    (Accept(2), "02000000020000"),
    (Reject(3, 4), "030000000300020004"),
    (Data(5, b"hi"), "040000000500026869"),
    (Window(0, 65536), "05000000000004" + "00010000"),
    (Window(7, 1), "05000000070004" + "00000001"),
    (Eof(9), "06000000090000"),
    (Reset(11, 5), "070000000b00020005"),
    (Ping(b"\x00" * 8), "08000000000008" + "00" * 8),
    (Pong(b"\xff" * 8), "09000000000008" + "ff" * 8),
    (GoAway(12, 8), "0a0000000000060000000c0008"),
    (Control(b"\x80"), "0b00000000000180"),
]


@pytest.mark.parametrize(("frame", "hexed"), GOLDEN)
def test_golden_encoding(frame: object, hexed: str) -> None:
    assert encode_frame(frame).hex() == hexed  # type: ignore[arg-type]
    assert decode_frames(bytes.fromhex(hexed)) == [frame]


def test_many_frames_in_one_message() -> None:
    message = b"".join(encode_frame(f) for f, _ in GOLDEN)  # type: ignore[arg-type]
    assert decode_frames(message) == [f for f, _ in GOLDEN]


@pytest.mark.parametrize(
    ("hexed", "reason"),
    [
        ("", "empty"),
        ("040000000100", "truncated"),
        ("04000000010005686869", "past the end"),
        ("ff000000010000", "unknown frame type"),
        ("04000000000001ff", "stream 0"),
        ("04000000010000", "empty DATA"),
        ("05000000010003000000", "carry 4"),
        ("05000000010004" + "00000000", "increment 0"),
        ("05000000010004" + "80000000", "out of range"),
        ("0800000001" + "0008" + "00" * 8, "stream 0"),
        ("02000000000000", "stream 0"),
        ("0200000001000100", "must carry 0"),
        ("01000000010000", "token length"),
        ("0b00000000", "truncated"),
        ("0b00000000000000", "empty CONTROL"),
    ],
)
def test_malformed(hexed: str, reason: str) -> None:
    with pytest.raises(ProtocolError, match=reason):
        decode_frames(bytes.fromhex(hexed))


@given(st.binary(max_size=512))
def test_random_bytes_only_raise_protocol_error(data: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        decode_frames(data)


@given(st.lists(st.sampled_from([f for f, _ in GOLDEN]), min_size=1, max_size=8), st.data())
def test_mutated_valid_messages(frames: list[object], data: st.DataObject) -> None:
    message = bytearray(b"".join(encode_frame(f) for f in frames))  # type: ignore[arg-type]
    i = data.draw(st.integers(0, len(message) - 1))
    message[i] ^= data.draw(st.integers(1, 255))
    cut = data.draw(st.integers(0, len(message)))
    with contextlib.suppress(ProtocolError):
        decode_frames(bytes(message[:cut]))
