"""atheris harness: the binary token decoder (capsock.uri.Token.decode).

Invariant: only capsock.errors.CapsockError subclasses escape; a decoded token
encodes back to exactly the input, and its ``repr`` shows no tag.

    python fuzz/fuzz_token.py -max_total_time=600 -rss_limit_mb=1024
"""

from __future__ import annotations

import sys

from _common import golden, main

from capsock.errors import CapsockError
from capsock.uri import Token


def TestOneInput(data: bytes) -> None:
    try:
        token = Token.decode(data)
    except CapsockError:
        return
    assert token.encode() == data, "decode/encode is not exact"
    assert token.tag.hex() not in repr(token)


def seeds() -> list[bytes]:
    g = golden()
    return [bytes.fromhex(c["token"]) for c in g["valid"]] + [
        bytes.fromhex(c["hex"]) for c in g["invalid_tokens"]
    ]


if __name__ == "__main__":
    main(TestOneInput, seeds())
    sys.exit(0)
