"""The state directory holds private keys: nothing in it is reached through a link,
and a directory others can write to is fixed (ours) or refused (another user's).

Each attack plants a symbolic link where a node writes (``lock``,
``node.key.tmp``, ``node.key``, ``capabilities.sqlite3``) pointing at a victim
file: the victim stays as it was and the node refuses with a
:class:`capsock.LocalUsageError` that names the problem.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import capsock
from capsock.errors import LocalUsageError
from capsock.keys import KeyPair
from tests.send_peer import snapshot

OTHER_UID = 54321


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    path = tmp_path / "victim.txt"
    path.write_bytes(b"precious\n" * 50)
    path.chmod(0o644)
    os.utime(path, (1_000_000_000, 1_000_000_000))
    return path


@pytest.fixture
def state(tmp_path: Path) -> Path:
    path = tmp_path / "state"
    path.mkdir(mode=0o700)
    return path


def _capsock(*args: str | Path, home: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "XDG_STATE_HOME": str(home / "xdg")}
    argv = [sys.executable, "-m", "capsock", *map(str, args)]
    return subprocess.run(
        argv, env=env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL
    )


@pytest.mark.parametrize("name", ["lock", "capabilities.sqlite3", "node.key"])
def test_a_planted_link_in_the_state_directory_is_refused(
    state: Path, victim: Path, name: str
) -> None:
    if name != "node.key":
        KeyPair.generate().save(state / "node.key")
    before = snapshot(victim)
    (state / name).symlink_to(victim)
    with pytest.raises(LocalUsageError, match="symbolic link"):
        capsock.Node(state)
    assert snapshot(victim) == before
    assert (state / name).is_symlink()


def test_a_planted_key_tmp_link_is_never_written_through(state: Path, victim: Path) -> None:
    before = snapshot(victim)
    (state / "node.key.tmp").symlink_to(victim)
    KeyPair.generate().save(state / "node.key")
    assert snapshot(victim) == before
    key = state / "node.key"
    assert not key.is_symlink() and stat.S_IMODE(key.lstat().st_mode) == 0o600
    assert KeyPair.load(key)  # a real key file
    assert [p.name for p in state.iterdir() if p.name.endswith(".tmp")] == ["node.key.tmp"]


def test_the_cli_refuses_a_planted_lock_link(tmp_path: Path, state: Path, victim: Path) -> None:
    before = snapshot(victim)
    (state / "lock").symlink_to(victim)
    result = _capsock("id", "--state-dir", state, home=tmp_path)
    assert snapshot(victim) == before
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("capsock: error: "), lines
    assert "symbolic link" in lines[0] and "internal error" not in lines[0]


def test_a_fifo_as_lock_is_refused_without_hanging(state: Path) -> None:
    os.mkfifo(state / "lock")
    with pytest.raises(LocalUsageError, match="not a regular file"):
        capsock.Node(state)
    from capsock import statedir

    assert statedir.lock_holder(state) is None


@pytest.mark.parametrize("mode", [0o777, 0o755, 0o770, 0o701])
def test_our_open_state_directory_is_tightened_to_0700(tmp_path: Path, mode: int) -> None:
    """Decision (docs/cli.md): a state directory of ours that others can reach is ours
    to fix; it is set to 0700 before anything is read or written in it."""
    state = tmp_path / "state"
    state.mkdir()
    state.chmod(mode)
    result = _capsock("id", "--state-dir", state, home=tmp_path)
    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE(state.stat().st_mode) == 0o700


@pytest.mark.anyio
async def test_a_node_tightens_our_world_writable_state_directory(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    state.chmod(0o777)
    old = os.umask(0)
    try:
        async with capsock.Node(state) as node:
            await node.listen("sturdy")
    finally:
        os.umask(old)
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    for name in ("node.key", "capabilities.sqlite3", "lock"):
        assert stat.S_IMODE((state / name).stat().st_mode) == 0o600, name


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to make a directory of another user")
def test_a_state_directory_of_another_user_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    state.chmod(0o777)
    os.chown(state, OTHER_UID, OTHER_UID)
    with pytest.raises(LocalUsageError, match="another user"):
        capsock.Node(state)
    assert stat.S_IMODE(state.stat().st_mode) == 0o777  # not ours to change
    assert list(state.iterdir()) == []
    result = _capsock("id", "--state-dir", state, home=tmp_path)
    assert result.returncode == 1 and "another user" in result.stderr, result.stderr
    assert list(state.iterdir()) == []


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to make a file of another user")
def test_a_key_file_of_another_user_is_refused(state: Path) -> None:
    KeyPair.generate().save(state / "node.key")
    os.chown(state / "node.key", OTHER_UID, OTHER_UID)
    with pytest.raises(LocalUsageError, match="another user"):
        KeyPair.load(state / "node.key")
    with pytest.raises(LocalUsageError, match="another user"):
        capsock.Node(state)


def test_a_symlinked_state_directory_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "elsewhere"
    real.mkdir(mode=0o755)
    (tmp_path / "state").symlink_to(real)
    with pytest.raises(LocalUsageError, match="symbolic link"):
        capsock.Node(tmp_path / "state")
    assert list(real.iterdir()) == []
    assert stat.S_IMODE(real.stat().st_mode) == 0o755


def test_a_file_as_state_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "state").write_text("not a directory")
    with pytest.raises(LocalUsageError, match="not a directory"):
        capsock.Node(tmp_path / "state")
