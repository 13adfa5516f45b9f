"""Helpers for the bench's server subprocesses."""

from __future__ import annotations

import subprocess


def stop(server: subprocess.Popen[str], timeout: float = 10.0) -> None:
    """End a server that runs until its stdin closes; kill it if it does not."""
    if server.stdin is not None:
        server.stdin.close()
    try:
        server.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()
    if server.stdout is not None:
        server.stdout.close()
