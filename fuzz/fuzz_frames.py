"""atheris harness: the mux frame decoder (capsock.core.frames.decode_frames).

Invariant: only capsock.errors.CapsockError subclasses escape (the decoder
promises ProtocolError only); decoded frames encode back to exactly the input.

    python fuzz/fuzz_frames.py -max_total_time=600 -rss_limit_mb=1024
"""

from __future__ import annotations

import sys

from _common import main

from capsock.errors import CapsockError
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


def TestOneInput(data: bytes) -> None:
    try:
        frames = decode_frames(data)
    except CapsockError:
        return
    assert b"".join(encode_frame(f) for f in frames) == data, "decode/encode is not exact"


def seeds() -> list[bytes]:
    frames = [
        Open(1, b"\x01" + bytes(49)),
        Accept(1),
        Reject(3, 4),
        Data(1, b"hello"),
        Window(0, 15728640),
        Window(1, 1),
        Eof(1),
        Reset(1, 5),
        Ping(b"12345678"),
        Pong(b"12345678"),
        GoAway(2, 0),
        Control(b"\x81\xa2op\xa7forward"),
    ]
    out = [encode_frame(f) for f in frames]
    out.append(b"".join(out))
    return out


if __name__ == "__main__":
    main(TestOneInput, seeds())
    sys.exit(0)
