"""A handshake flood from its own process and source address (test_handshake_floods.py).

``python -m tests.handshake_flood HOST PORT MODE SECONDS [MESSAGE_HEX]`` dials
HOST:PORT from 127.0.0.2 for at most SECONDS (and at most 30,000
connections), in batches of 64 open at once: it sends one message 1 on each
connection of a batch, then waits until the node has hung up on each (so the
node did read it), then starts the next batch.  MODE ``replay`` sends
MESSAGE_HEX (a recorded message 1, with its length prefix) every time;
``garbage`` sends a well-sized message 1 of random bytes (a fresh "ephemeral
key" each time, so no replay cache can catch it).  Prints one JSON line:
``{"sent": N, "seconds": S}``.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time

MAX_CONNECTIONS = 30_000
BATCH = 64
GARBAGE_SIZE = 128  # the size of an honest message 1 without extensions
GARBAGE_PREFIX = GARBAGE_SIZE.to_bytes(2, "big")


def main() -> None:
    host, port, mode, seconds = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
    recorded = bytes.fromhex(sys.argv[5]) if mode == "replay" else b""
    start = time.monotonic()
    sent = 0
    while sent < MAX_CONNECTIONS and time.monotonic() - start < seconds:
        batch: list[socket.socket] = []
        for _ in range(BATCH):
            sock = socket.socket()
            sock.settimeout(5.0)
            try:
                sock.bind(("127.0.0.2", 0))
                sock.connect((host, port))
                sock.sendall(recorded or GARBAGE_PREFIX + os.urandom(GARBAGE_SIZE))
            except OSError:
                sock.close()
                continue
            batch.append(sock)
            sent += 1
        for sock in batch:
            # The node hangs up once it has read and refused the message (it
            # would answer a genuine one with message 2; read past that too).
            with contextlib.suppress(OSError):
                while sock.recv(4096):
                    pass
            sock.close()
    print(json.dumps({"sent": sent, "seconds": time.monotonic() - start}), flush=True)


if __name__ == "__main__":
    main()
