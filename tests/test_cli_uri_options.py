"""Every argument that takes a capability also takes ``@FILE`` and ``-`` (docs/cli.md).

Command-line arguments are visible to every local user (``ps``), so no command
may force a capability into argv.  The parser is walked to find every
URI-valued option and positional, so one added later is checked too.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from capsock.cli import common
from capsock.cli.app import build_parser

# Commands whose stdin is the stream's data: ``-`` is refused there (the URI
# would be read from the data).
STDIN_IS_DATA = {"connect", "listen"}

# Values for the other positionals of a command, by metavar.
FILLERS = {"ADDR": "tcp:127.0.0.1:9", "PATH": "{path}", "SHELL": "bash"}
# Options without which a command fails before it reads its capability.
EXTRA = {"attenuate": ["--ttl", "60"]}


def uri_actions() -> list[tuple[str, argparse.Action]]:
    """(command, action) for every URI-valued option and positional of every command."""
    _, commands = build_parser()
    marker = getattr(common, "uri_argument", None)
    found = []
    for name, (parser, _) in commands.items():
        for action in parser._actions:
            # By convention (and docs/cli.md) a capability argument is shown as URI.
            if action.metavar == "URI" or (marker is not None and action.type is marker):
                found.append((name, action))
    return found


def _label(item: tuple[str, argparse.Action]) -> str:
    name, action = item
    return f"{name} {action.option_strings[0] if action.option_strings else action.dest}"


URI_ACTIONS = uri_actions()


def test_the_walk_finds_every_known_uri_argument() -> None:
    labels = {_label(a) for a in URI_ACTIONS}
    known = {
        "connect uri", "forward uri", "receive uri", "attenuate uri", "inspect uri",
        "revoke uri", "listen --relay", "share --relay", "send --relay",
    }  # fmt: skip
    assert known <= labels, known - labels
    for _, action in URI_ACTIONS:
        assert action.type is common.uri_argument, _label((_, action))
        assert action.metavar == "URI"


def _argv(command: str, action: argparse.Action, value: str, tmp_path: Path) -> list[str]:
    """A command line where ``action`` gets ``value`` and everything else is valid."""
    _, commands = build_parser()
    parser = commands[command][0]
    argv = [command]
    source = tmp_path / "payload.txt"
    source.write_text("payload")
    for other in parser._actions:
        if other.option_strings:
            continue
        if other.dest == action.dest:
            argv.append(value)
        elif other.metavar == "URI":
            argv.append(f"@{tmp_path / 'valid.uri'}")
        else:
            argv.append(FILLERS[str(other.metavar)].format(path=source))
    if action.option_strings:
        argv += [action.option_strings[0], value]
    return argv + EXTRA.get(command, [])


def _run(argv: list[str], tmp_path: Path, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "xdg")}
    return subprocess.run(
        [sys.executable, "-m", "capsock", *argv],
        cwd=tmp_path, env=env, input=stdin, capture_output=True, timeout=60,
    )  # fmt: skip


@pytest.fixture
def files(tmp_path: Path) -> Path:
    from tests.test_cli import offline_capability

    (tmp_path / "valid.uri").write_text(f"{offline_capability()}\n")
    (tmp_path / "bad.uri").write_text("not-a-capability\n")
    return tmp_path


@pytest.mark.parametrize("item", URI_ACTIONS, ids=[_label(a) for a in URI_ACTIONS])
def test_every_uri_argument_reads_at_file(files: Path, item: tuple[str, argparse.Action]) -> None:
    command, action = item
    bad = files / "bad.uri"
    result = _run(_argv(command, action, f"@{bad}", files), files)
    err = result.stderr.decode()
    assert result.returncode == 2, err
    assert f"{bad} is not a capsock:// capability" in err, err  # the file was read
    missing = files / "missing.uri"
    result = _run(_argv(command, action, f"@{missing}", files), files)
    assert result.returncode == 2
    assert f"cannot read the capability from {missing}" in result.stderr.decode()


@pytest.mark.parametrize("item", URI_ACTIONS, ids=[_label(a) for a in URI_ACTIONS])
def test_every_uri_argument_reads_stdin(files: Path, item: tuple[str, argparse.Action]) -> None:
    command, action = item
    result = _run(_argv(command, action, "-", files), files, stdin=b"not-a-capability\n")
    err = result.stderr.decode()
    assert result.returncode == 2, err
    if command in STDIN_IS_DATA:
        assert "stdin carries data" in err, err
    else:
        assert "stdin is not a capsock:// capability" in err, err


def test_at_most_one_dash_per_command(files: Path) -> None:
    from tests.test_cli import offline_capability

    uri = f"{offline_capability()}\n".encode()
    result = _run(["share", "tcp:127.0.0.1:9", "--relay", "-", "--relay", "-"], files, uri)
    assert result.returncode == 2
    assert "only one capability can be read from stdin" in result.stderr.decode()


def test_a_valid_at_file_works(files: Path) -> None:
    result = _run(["inspect", f"@{files / 'valid.uri'}", "--json"], files)
    assert result.returncode == 0, result.stderr
    assert b'"node"' in result.stdout
