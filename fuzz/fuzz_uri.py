"""atheris harness: the capability URI parser (capsock.uri.parse).

Invariant: only capsock.errors.CapsockError subclasses escape; an accepted URI
is canonical (``str(parse(s)) == s``), round-trips, and its ``repr`` shows no
token.

    python fuzz/fuzz_uri.py -max_total_time=600 -rss_limit_mb=1024
"""

from __future__ import annotations

import sys

from _common import Provider, golden, main

from capsock import uri
from capsock.errors import CapsockError

VALID = [case["uri"] for case in golden()["valid"]]


def text_of(data: bytes) -> str:
    p = Provider(data)
    mode = p.int(0, 3)
    if mode == 0:  # bytes as latin-1: any code point below 256
        return p.rest().decode("latin-1")
    if mode == 1:  # UTF-8, invalid sequences replaced
        return p.rest().decode("utf-8", "replace")
    if mode == 2 and VALID:  # a golden URI with a few byte edits
        text = bytearray(VALID[p.int(0, len(VALID) - 1)].encode())
        for _ in range(p.int(1, 4)):
            if not text or not p.remaining():
                break
            where = p.int(0, len(text) - 1)
            op = p.int(0, 2)
            if op == 0:
                text[where] = p.int(0x21, 0x7E)
            elif op == 1:
                del text[where]
            else:
                text.insert(where, p.int(0x21, 0x7E))
        return text.decode("latin-1")
    if VALID:  # two golden URIs spliced
        a = VALID[p.int(0, len(VALID) - 1)]
        b = VALID[p.int(0, len(VALID) - 1)]
        return a[: p.int(0, len(a))] + b[p.int(0, len(b)) :]
    return p.rest().decode("latin-1")


def TestOneInput(data: bytes) -> None:
    text = text_of(data)
    try:
        cap = uri.parse(text)
    except CapsockError:
        return
    assert str(cap) == text, "accepted a non-canonical URI"
    assert uri.parse(str(cap)) == cap
    assert cap.token.tag.hex() not in repr(cap)


def seeds() -> list[bytes]:
    out = [b"\x00" + u.encode() for u in VALID]
    out += [b"\x00" + case["uri"].encode("utf-8", "replace") for case in golden()["invalid"]]
    out += [b"\x02" + bytes(8), b"\x03" + bytes(8)]
    return out


if __name__ == "__main__":
    main(TestOneInput, seeds())
    sys.exit(0)
